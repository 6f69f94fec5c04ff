"""Streaming safetensors output and atomic output directories.

``safetensors.torch.save_file`` needs every tensor in memory at once; a merge must not hold a
whole model, so the header is planned up front from the shapes and the tensors are streamed in,
one at a time, in the format's own layout (8-byte header length, JSON header, raw data).
Outputs are read back with ``safe_open`` in the tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import signal
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import BinaryIO

import torch

from mamcli.checkpoint import SAFETENSORS_INDEX, TORCH_TO_ST, nbytes
from mamcli.errors import MamError


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or plain bytes → bytes (decimal units like transformers' max_shard_size)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise MamError(f"bad size {text!r}: use e.g. 5GB, 500MB or 2GiB") from None
    if unit not in units or value <= 0:
        raise MamError(f"bad size {text!r}: use e.g. 5GB, 500MB or 2GiB")
    return int(value * units[unit])


def plan_shards(tensors: list[OutTensor], shard_size: int | None) -> list[list[OutTensor]]:
    """Group tensors (in order) into shards of at most ``shard_size`` bytes; one tensor never splits."""
    if not shard_size:
        return [tensors]
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        if t.dtype not in TORCH_TO_ST:
            raise MamError(f"tensor {t.name!r} has dtype {t.dtype}, which safetensors cannot store")
        end = offset + t.nbytes
        header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format recommends 8-byte alignment of the data
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Writes planned tensors in plan order across one or more shard files.

    Output hashes are computed on a second thread (hashlib and file writes both release the
    GIL), and every file is fsynced before it counts as written. Syncing every ``SYNC_EVERY``
    bytes lets the disk write back while the hash thread catches up, instead of one long
    fsync after all hashing (measured: about a fifth faster on a 1.3 GB merge).
    """

    SYNC_EVERY = 256 << 20

    def __init__(self, directory: Path, tensors: list[OutTensor], metadata: dict[str, str],
                 shard_size: int | None = None, stem: str = "model") -> None:
        self.dir = directory
        self.shards = plan_shards(tensors, shard_size)
        n = len(self.shards)
        self.files = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{k + 1:05d}-of-{n:05d}.safetensors"
                                                            for k in range(n)]
        self.metadata = metadata
        self._queue = iter(list(zip(self.files, self.shards, strict=True)))
        self._pending: list[OutTensor] = []
        self._fh: BinaryIO | None = None
        self._file = ""
        self._unsynced = 0
        self._digests: dict[str, hashlib._Hash] = {}
        self._to_hash: queue.Queue[tuple[str, bytes | memoryview] | None] = queue.Queue(maxsize=8)
        self._hasher = threading.Thread(target=self._hash_loop, daemon=True)
        self._hasher.start()
        self._advance()

    def _hash_loop(self) -> None:
        while (item := self._to_hash.get()) is not None:
            self._digests.setdefault(item[0], hashlib.sha256()).update(item[1])

    def _advance(self) -> None:
        self._finish_file()
        nxt = next(self._queue, None)
        if nxt is None:
            return
        self._file, shard = nxt
        self._pending = list(shard)
        self._fh = open(self.dir / self._file, "wb")  # noqa: SIM115 - closed in _finish_file
        self._emit(_header(shard, self.metadata))

    def _emit(self, data: bytes | memoryview) -> None:
        assert self._fh is not None
        self._fh.write(data)
        self._to_hash.put((self._file, data))
        self._unsynced += memoryview(data).nbytes
        if self._unsynced >= self.SYNC_EVERY:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._unsynced = 0

    def _finish_file(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def write(self, name: str, data: memoryview) -> None:
        while not self._pending and self._fh is not None:
            self._advance()
        if not self._pending or self._pending[0].name != name:
            expected = self._pending[0].name if self._pending else "nothing"
            raise RuntimeError(f"writer expected {expected}, got {name}")
        spec = self._pending.pop(0)
        if data.nbytes != spec.nbytes:
            raise RuntimeError(f"{name}: {data.nbytes} bytes, planned {spec.nbytes}")
        self._emit(data)

    def close(self) -> dict[str, str]:
        """Finish all files, write the index for sharded output; returns {file: sha256}."""
        while self._fh is not None:
            if self._pending:
                raise RuntimeError(f"writer closed before {self._pending[0].name} was written")
            self._advance()
        self._stop_hasher()
        if len(self.files) > 1:
            weight_map = {t.name: f for f, shard in zip(self.files, self.shards, strict=True) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}
            (self.dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return {f: self._digests[f].hexdigest() for f in self.files}

    def _stop_hasher(self) -> None:
        if self._hasher.is_alive():
            self._to_hash.put(None)
            self._hasher.join()

    def abort(self) -> None:
        """Stop after a failure; the caller deletes the temporary directory."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        while self._hasher.is_alive():  # drain so the hasher can see the stop marker
            try:
                self._to_hash.put(None, timeout=0.1)
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._to_hash.get_nowait()
        self._hasher.join()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class _Terminated(BaseException):
    """SIGTERM turned into an exception so cleanup runs (like Ctrl-C's KeyboardInterrupt)."""


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success rename it to ``out``, otherwise delete it.

    An existing ``out`` is an error unless ``force``; with ``force`` it is only replaced once the
    new output is complete, so an interrupted run never leaves a half-written or missing DIR.
    """
    out = out.expanduser().absolute()
    if out.exists() and not force:
        raise MamError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise MamError(f"{out} exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".mam-tmp", dir=out.parent))
    except OSError as e:
        raise MamError(f"cannot create output next to {out}: {e.strerror}") from None

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if in_main else None
    try:
        yield tmp
        fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.mam-old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        fsync_dir(out.parent)
    except _Terminated:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KeyboardInterrupt from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)



def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (new files, a rename) so a crash cannot lose them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
