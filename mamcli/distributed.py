"""evaluate and rank-layers under a launcher (``torchrun``, ``accelerate launch``): which process this is, its
share of the clips, and Python objects gathered from every process.

Sharding keeps one process's batches. The clips are first read in strides (process r reads clips r, r + n, …)
to learn their lengths; the lengths are gathered, and every process cuts the very length-sorted batches one
process would cut. Process r keeps batches r, r + n, … (neighbours have similar lengths, so the work is
balanced) and reads those of their clips another process read first. Equal batches matter because padding,
batched kernels and Whisper's token bound (set by the longest clip of a batch) may depend on which clips
share a batch, and the results must equal one process's. Clips are matched across processes by their id, which
a Dataset keeps unique (:class:`mamcli.data.Dataset` refuses two clips with one id), and kept in the dataset's order.

Objects travel over gloo on the CPU whatever device the model runs on: they are texts, counts and pooled
vectors, small beside a model, and a CPU group needs no GPU memory or NCCL.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from mamcli.data import Clip, Dataset, Item, iter_clips, load_clip
from mamcli.errors import MamError

if TYPE_CHECKING:
    from mamcli.models import AudioModel

T = TypeVar("T")
# a process waits in a collective while the others finish their share of a sweep point or read their clips
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Processes:
    """This process's rank among ``size`` processes (``size`` 1: alone, no process group, no collective)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: Any = None  # the gloo group objects travel over (None: the default group)

    @property
    def main(self) -> bool:
        """The process that prints, writes and reports."""
        return self.rank == 0

    def shard(self, seq: Sequence[T]) -> list[T]:
        """Every ``size``-th element, starting at this process's rank."""
        return list(seq[self.rank::self.size])

    def device(self, asked: str) -> str:
        """Under a launcher ``auto`` and ``cuda`` mean this process's own GPU (``cuda:LOCAL_RANK``)."""
        import torch

        if self.size > 1 and asked in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return asked

    def all_gather(self, obj: T) -> list[T]:
        """Every process's ``obj``, in rank order, on every process."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather(self, obj: T) -> list[T] | None:
        """Every process's ``obj``, in rank order, on the main process; None on the others."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.size if self.main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` on this process; a MamError on any process (an unreadable clip under --strict) is raised on
        every one, instead of leaving the others waiting in their next collective."""
        if self.size == 1:
            return fn()
        error: MamError | None = None
        try:
            value = fn()
        except MamError as e:
            error = e
        failed = [m for m in self.all_gather(None if error is None else str(error)) if m is not None]
        if error is not None:
            raise error
        if failed:
            raise MamError(failed[0])
        return value


ALONE = Processes()


@functools.cache
def launched() -> Processes:
    """This process's place under a launcher (WORLD_SIZE > 1: joins the launcher's process group, gloo); one
    process otherwise. Every process of the launch must call it."""
    try:
        size = int(os.environ.get("WORLD_SIZE") or "1")
    except ValueError:
        raise MamError(f"WORLD_SIZE must be a whole number; got {os.environ.get('WORLD_SIZE')!r}") from None
    if size <= 1:
        return ALONE
    import torch.distributed as dist

    if not dist.is_available():
        raise MamError("launched with WORLD_SIZE > 1, but this torch build has no torch.distributed")
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
        _JOINED.append(True)
        atexit.register(_tear_down)  # a way out that bypasses ``leave`` (a usage error): tear down before exit
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=TIMEOUT)
    return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK") or "0"), group)


_JOINED: list[bool] = []  # this process joined the launcher's group (``launched``), and tears it down


def _tear_down() -> None:
    """Destroy the group this process joined (registered at exit when it joined), if it still stands: a process
    that exits with gloo's threads still running aborts at interpreter exit ("terminate called without an active
    exception", SIGABRT)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> None:
    """End this process with exit status ``code`` if it joined a launcher's group; otherwise return.

    gloo's C++ threads did not survive interpreter exit: a process that ended first aborted at exit ("terminate
    called without an active exception", SIGABRT), even after a barrier and ``destroy_process_group``, and the
    launcher then failed the run (2 of 16 rank-layers runs on a loaded machine; twice in CI). So after a command
    that succeeded every process waits for the others (none leaves while another still receives what it sent),
    and then each leaves at once with ``os._exit``, after flushing its output: nothing of the interpreter's
    teardown runs, and mam registers nothing that needs it (its outputs are written and synced by then)."""
    if not _JOINED:
        return
    import torch.distributed as dist

    if code == 0 and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class Shard:
    """This process's batches, and what every process read."""

    batches: list[list[Clip]]  # this process's share of the batches, audio loaded
    items: list[Item]  # every usable clip, in the dataset's order
    order: list[str]  # their ids in batch order: one process's order of predictions
    bad: list[dict[str, str]]  # every clip skipped, in the dataset's order
    clips_per_process: list[int]  # clips in each process's batches, in rank order


def read_batches(ds: Dataset, am: AudioModel, batch_size: int, processes: Processes = ALONE, strict: bool = False,
                 ticker: Callable[[int, int], None] | None = None) -> Shard:
    """This process's share of the length-sorted batches that one process cuts from ``ds``'s usable clips
    (:meth:`AudioModel.batches`); unreadable and unusable clips are named in ``bad`` (fatal with ``strict``).
    ``ticker(done, total)``: the clips this process reads first."""
    held: dict[str, Clip] = {}

    def read() -> tuple[dict[str, int], list[dict[str, str]]]:
        bad: list[dict[str, str]] = []
        for clip in iter_clips(replace(ds, items=processes.shard(ds.items)), am.rate, strict, bad, ticker,
                               usable=am.usable):
            held[clip.item.id] = clip
        return {k: len(c.audio) for k, c in held.items()}, bad

    parts = processes.all_gather(processes.agree(read))
    lengths = {k: n for found, _ in parts for k, n in found.items()}
    position = {item.id: k for k, item in enumerate(ds.items)}
    bad = sorted((b for _, part in parts for b in part), key=lambda b: position[b["id"]])
    items = [i for i in ds.items if i.id in lengths]
    # batching looks at lengths and ids only: a zero-stride stand-in of each clip's length is enough
    every = list(am.batches([Clip(i, np.broadcast_to(np.float32(0), (lengths[i.id],))) for i in items], batch_size))

    def complete() -> list[list[Clip]]:
        return [[held.pop(c.item.id, None) or Clip(c.item, load_clip(c.item, am.rate)) for c in b]
                for b in processes.shard(every)]

    batches = processes.agree(complete)
    held.clear()  # clips read for their length that another process scores
    return Shard(batches, items, [c.item.id for b in every for c in b], bad,
                 processes.all_gather(sum(map(len, batches))))
