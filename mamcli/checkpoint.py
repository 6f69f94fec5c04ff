"""Checkpoint I/O: resolve a model argument and read its tensors lazily.

A model argument is a local directory, a weight file, an alias or a hub id found in the
Hugging Face cache; an alias or hub id may name a revision (``org/name@v1.0``). Tensors are read
one at a time (safetensors ``safe_open``; torch pickles with ``weights_only=True`` and ``mmap``),
so a merge never holds two whole models.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mamcli.aliases import ALIASES
from mamcli.errors import MamError
from mamcli.families import FAMILIES, Arch, Family, detect
from mamcli.schemas import HASH_CACHE, JSON_OBJECT, ShardIndex, check, read_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
# files never copied into a merged output: weights, their indexes, the target's model card, and an earlier mam
# output's records (its report, recipe, evaluation, λ and permutations describe that output, not this one)
NOT_COPIED = re.compile(r".*(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.onnx|\.gguf|\.index\.json)$"
                        r"|README\.md|\.gitattributes|mam_report\.json|mam_recipe\.yaml|mam_eval\.json|lams\.json"
                        r"|mam_align\.json")
# what mam fetches from a Hub repo: config, tokenizer and processor files, and one weight format (safetensors, or
# transformers' pytorch_model*.bin when the repo has no safetensors; never other pickles such as training_args.bin)
HUB_FILES = ["*.json", "*.txt", "*.model"]
HUB_SAFETENSORS = ["*.safetensors"]
HUB_BIN = ["pytorch_model*.bin"]
# a branch, tag or commit after '@' (git ref characters; no '..', so refs/<rev> stays inside the cache)
REVISION = re.compile(r"(?!.*\.\.)[\w.\-]+(/[\w.\-]+)*")

# safetensors dtype strings <-> torch dtypes (the format's own names)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


def offline() -> bool:
    """huggingface_hub's own switch (HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE), so mam and the library agree."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def _offline_variable() -> str:
    """Which variable turned offline mode on, for the message (huggingface_hub reads HF_HUB_OFFLINE first)."""
    first = os.environ.get("HF_HUB_OFFLINE") or not os.environ.get("TRANSFORMERS_OFFLINE")
    return "HF_HUB_OFFLINE" if first else "TRANSFORMERS_OFFLINE"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    # byte range inside ``file`` (safetensors only: lets untouched tensors be copied as raw bytes)
    start: int | None = None
    end: int | None = None

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return dtype.itemsize * math.prod(shape)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Return (header, data start offset). safe_open validates the file; this gives byte offsets."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise MamError(f"{path}: truncated safetensors file ({path.stat().st_size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000 or n > path.stat().st_size:
            raise MamError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise MamError(f"{path}: corrupt safetensors header") from None
    return header, 8 + n


def cache_dir() -> Path:
    """Where mam keeps small caches: $MAM_CACHE_DIR, else $XDG_CACHE_HOME/mam, else ~/.cache/mam."""
    if os.environ.get("MAM_CACHE_DIR"):
        return Path(os.environ["MAM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mam"


def sha256_file(path: Path, chunk: int = 16 << 20, use_cache: bool = True) -> str:
    """sha256 of a weight file.

    Hugging Face cache blobs are already named by their sha256. Other files are hashed once and
    remembered by (path, size, mtime_ns, inode), as make and rsync decide that a file is unchanged,
    so re-merging the same inputs (a λ sweep) does not re-read gigabytes. MAM_HASH_CACHE=0 turns
    the memory off.
    """
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    use_cache = use_cache and os.environ.get("MAM_HASH_CACHE", "1") != "0"
    store = cache_dir() / "sha256.json"
    known: dict[str, str] = {}
    if use_cache:
        try:  # a cache that cannot be read or holds anything but {key: digest} is rebuilt, never fatal
            known = HASH_CACHE.validate_json(store.read_bytes())
        except (OSError, ValueError):
            known = {}
        if key in known:
            return known[key]
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(real, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    digest = h.hexdigest()
    if use_cache:
        known = {k: v for k, v in known.items() if Path(k.split("|")[0]).exists()}
        known[key] = digest
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_name(f".sha256.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(store)
        except OSError:
            pass  # a cache that cannot be written only costs time
    return digest


@dataclass
class Checkpoint:
    """A resolved model: where it lives, its config, and a lazy view of its tensors."""

    spec: str
    root: Path
    files: list[Path]
    config: dict[str, Any]
    fmt: str  # "safetensors" | "torch" | "beats"
    hub_id: str | None = None
    revision: str | None = None
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    _state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)
    extras: dict[str, Any] = field(default_factory=dict)  # other top-level entries of a .pt (BEATs label_dict)
    _arch: Arch | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The model as people call it (a hub id, or the folder's name), for tables and plots; not a path."""
        if self.hub_id:
            return self.hub_id
        path = Path(self.spec).expanduser().absolute()
        return path.name if path.is_dir() else path.stem

    # ---- reading -------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise MamError(f"{self.spec}: no tensor named {name!r}") from None

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read with a plain pread (no mmap, so untouched pages never count as memory)."""
        info = self.info(name)
        if info.start is None:
            return self._state[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(bytearray(self.raw(name)), dtype=info.dtype).reshape(info.shape)

    def raw(self, name: str) -> memoryview:
        """The tensor's stored bytes, unchanged (what an untouched tensor is copied as)."""
        info = self.info(name)
        if info.start is not None and info.end is not None:
            if info.file not in self._fds:
                self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            data = os.pread(self._fds[info.file], info.end - info.start, info.start)
            if len(data) != info.end - info.start:
                raise MamError(f"{info.file}: truncated while reading {name!r}")
            return memoryview(data)
        t = self._state[name].contiguous()
        return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")

    def arch(self, families: tuple[Family, ...] = FAMILIES) -> Arch:
        if self._arch is None or self._arch.family not in families:
            self._arch = detect(self.infos, self.config, families, self.spec, lambda n: self.info(n).shape)
        return self._arch

    def weight_hashes(self) -> dict[str, str]:
        return {p.name: sha256_file(p) for p in self.files}

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "path": str(self.root.absolute()), "hub_id": self.hub_id, "revision": self.revision,
                "format": self.fmt, "files": [p.name for p in self.files]}

    def close(self) -> None:
        self._state.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- opening -------------------------------------------------------------------------
    def _open_safetensors(self) -> None:
        for path in self.files:
            header, data_start = read_safetensors_header(path)
            try:  # the library validates offsets, dtypes and the file size
                with safe_open(str(path), framework="pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise MamError(f"{path}: corrupt or truncated safetensors file ({e})") from None
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in ST_DTYPES:
                    raise MamError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
                a, b = meta["data_offsets"]
                self.infos[name] = TensorInfo(name, ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), path,
                                              data_start + a, data_start + b)

    def _open_torch(self) -> None:
        for path in self.files:
            obj = load_torch_file(path)
            state, cfg = unwrap_state(obj, path)
            if cfg is not None:
                self.fmt = "beats"
                self.config = {"model_type": "beats", **cfg, **self.config}
                self.extras = {k: v for k, v in obj.items() if k not in ("cfg", "model")}
            for name, t in state.items():
                self._state[name] = t
                self.infos[name] = TensorInfo(name, t.dtype, tuple(t.shape), path)


def load_torch_file(path: Path) -> Any:
    """torch.load with weights_only=True (never arbitrary unpickling), memory-mapped when possible."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) pickles cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MamError(f"{path} does not exist") from None
    except Exception as e:  # torch raises many types for bad pickles
        text = str(e).strip()
        # weights_only refusals bury the reason after pages of advice: keep only the reason
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", text):
            raise MamError(f"{path}: this checkpoint holds a Python object ({found[1]}) that mam will not unpickle "
                           "(weights_only=True); save a state dict of tensors instead") from None
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1].strip()
        first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        raise MamError(f"{path}: cannot read PyTorch checkpoint: {first}") from None


def unwrap_state(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A plain state dict, ``{"state_dict": ...}``, or BEATs' ``{"cfg": ..., "model": ...}``."""
    cfg = None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        cfg = dict(obj.get("cfg") or {})
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MamError(f"{path}: not a state dict of tensors")
    return dict(obj), cfg


def _weights_in_dir(d: Path) -> tuple[list[Path], str]:
    if (d / SAFETENSORS_INDEX).is_file():
        return _from_index(d, SAFETENSORS_INDEX), "safetensors"
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"], "safetensors"
    if (d / BIN_INDEX).is_file():
        return _from_index(d, BIN_INDEX), "torch"
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"], "torch"
    singles = sorted(d.glob("*.safetensors"))
    if len(singles) == 1:
        return singles, "safetensors"
    pts = sorted(d.glob("*.pt"))
    if len(pts) == 1:
        return pts, "torch"
    if onnx := sorted(d.glob("*.onnx")):
        raise MamError(f"{d} holds an ONNX graph ({onnx[0].name}), not a checkpoint mam reads; "
                       "convert it first: see docs/image-to-audio.md")
    raise MamError(f"{d}: no weights found (expected model.safetensors, {SAFETENSORS_INDEX}, pytorch_model.bin "
                   "or one .pt file)")


def _from_index(d: Path, index: str) -> list[Path]:
    p = d / index
    weight_map = check(ShardIndex, read_json(p, "shard index"), p, "shard index").weight_map
    files = sorted({d / f for f in weight_map.values()})
    outside = [f.name for f in files if f.parent != d]
    if outside:
        raise MamError(f"shard index {p}: shard {outside[0]!r} is not a file name in {d}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MamError(f"{d / index}: shard files missing: {', '.join(missing)}")
    return files


def _read_config(d: Path) -> dict[str, Any]:
    p = d / "config.json"
    if not p.is_file():
        return {}
    return check(JSON_OBJECT, read_json(p, "model config"), p, "model config")


def hub_patterns(listing: Collection[str] | None) -> list[str]:
    """The files mam downloads from a repo whose file list is ``listing`` (None: not known yet, expect safetensors)."""
    from fnmatch import fnmatch

    has_bin_only = listing is not None and not any(f.endswith(".safetensors") for f in listing) and any(
        fnmatch(f, p) for f in listing for p in HUB_BIN)
    return [*HUB_FILES, *(HUB_BIN if has_bin_only else HUB_SAFETENSORS)]


def _cached_listing(repo_id: str, revision: str | None) -> list[str] | None:
    """The repo's file list that huggingface_hub keeps beside the cache (trees/<commit>.json), if any."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [f.path for f in get_cached_repo_tree(repo_id, revision=revision)]
    except CachedRepoTreeNotFoundError:
        return None


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The cached snapshot, checked with the patterns the download uses (so a mam download is found offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    listing: list[str] | None = None
    patterns, missing = hub_patterns(None), []
    try:
        listing = _cached_listing(repo_id, revision)
        patterns = hub_patterns(listing)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except IncompleteSnapshotError as e:
        snap = Path(e.snapshot_path)
        missing = [f for f in filter_repo_objects(listing or [], allow_patterns=patterns) if not (snap / f).is_file()]
    except LocalEntryNotFoundError:
        pass
    except Exception as e:  # invalid repo ids and cache errors: say so in one line
        raise MamError(f"{repo_id}: {str(e).splitlines()[0]}") from None
    how = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    if offline() and missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise MamError(f"{repo_id} is only partly in the Hugging Face cache ({shown} missing) and "
                       f"{_offline_variable()} is set; download it first: {how}")
    if offline():
        raise MamError(f"{repo_id} is not a local path and not in the Hugging Face cache ({_offline_variable()} is "
                       f"set); download it first: {how}")
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        # the download cached the repo's file list: a repo without safetensors gets its pytorch_model*.bin
        if (wanted := hub_patterns(_cached_listing(repo_id, path.name))) != patterns:
            path = Path(snapshot_download(repo_id, revision=path.name, allow_patterns=wanted))
        return path
    except Exception as e:  # network errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MamError(f"{repo_id} is neither local nor cached, and downloading failed ({first}); "
                       f"download it with: {how}") from None


def split_revision(spec: str) -> tuple[str, str | None]:
    """``org/name@rev`` → (``org/name``, ``rev``): one branch, tag or commit per model argument."""
    name, at, rev = spec.partition("@")
    if not at:
        return spec, None
    if not rev:
        raise MamError(f"{spec!r}: the revision after '@' is empty (write NAME@BRANCH, NAME@TAG or NAME@COMMIT)")
    if not REVISION.fullmatch(rev):
        raise MamError(f"{spec!r}: {rev!r} is not a valid revision")
    return name, rev


def resolve(spec: str, revision: str | None = None) -> Checkpoint:
    """Turn a model argument into an opened :class:`Checkpoint` (tensors still on disk).

    ``revision`` is the default for a hub id or alias without its own ``@rev``; an existing path is always a path.
    """
    path = Path(spec).expanduser()
    hub_id = None
    if not path.exists():
        name = spec.partition("@")[0]
        if name not in ALIASES and (name.startswith((".", "/", "~")) or name.endswith(WEIGHT_SUFFIXES)
                                    or name.count("/") > 1):
            raise MamError(f"{spec} does not exist")
        name, rev = split_revision(spec)
        revision = rev or revision
        hub_id = ALIASES[name][0] if name in ALIASES else name
        if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", hub_id):
            raise MamError(f"{spec!r} is not a path, an alias (see `mam models`) or a hub id")
        path = _hub_snapshot(hub_id, revision)
    if path.is_dir():
        files, fmt = _weights_in_dir(path)
        config = _read_config(path)
        root = path
    else:
        if path.suffix == ".onnx":
            raise MamError(f"{spec} is an ONNX graph, not a checkpoint mam reads; convert it first: "
                           "see docs/image-to-audio.md")
        files = [path]
        fmt = "safetensors" if path.suffix == ".safetensors" else "torch"
        config = _read_config(path.parent) if path.suffix == ".safetensors" else {}
        root = path.parent
    # a hub model's revision is the commit its snapshot folder is named by
    commit = Path(os.path.realpath(root)).name if hub_id else None
    ckpt = Checkpoint(spec=spec, root=root, files=files, config=config, fmt=fmt, hub_id=hub_id, revision=commit)
    try:
        if fmt == "safetensors":
            ckpt._open_safetensors()
        else:
            ckpt._open_torch()
    except BaseException:
        ckpt.close()
        raise
    if not ckpt.infos:
        ckpt.close()
        raise MamError(f"{spec}: the checkpoint holds no tensors")
    return ckpt


def iter_copyable_files(root: Path) -> Iterator[Path]:
    """Config, tokenizer and processor files a merged output must carry so it loads like the target."""
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.name.startswith(".") and not NOT_COPIED.fullmatch(p.name):
            yield p
