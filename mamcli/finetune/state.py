"""A run's resumable state, kept in a hidden sibling of the output, ``.DIR.mam-run/``.

Accelerate's ``save_state`` folder ``state-N/`` (weights with the λ logits, optimizer, scheduler, gradient
scaler, every RNG of every process), then ``run.json`` (:class:`RunState`: the position in the epoch, the
epoch's loss so far, the recipe a resume must match), which names that folder and is replaced last, so a
crash while saving resumes from the previous folder. ``metrics.jsonl`` gets a row per optimizer step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mamcli.align import ALIGN_FILE
from mamcli.errors import MamError

RUN_FILE = "run.json"  # the run's position; names the save_state folder it goes with (written last: the commit)
METRICS_FILE = "metrics.jsonl"  # one JSON object per optimizer step, copied into the output
TENSORBOARD_DIR = "tensorboard"  # --log-with tensorboard: event files, copied into the output
# all a run folder ever holds, besides the state folders (ALIGN_FILE: --align's permutations, solved once)
RUN_FILES = frozenset({RUN_FILE, f"{RUN_FILE}.tmp", "best.pt", "best.pt.tmp", METRICS_FILE, f"{METRICS_FILE}.tmp",
                       TENSORBOARD_DIR, ALIGN_FILE, f"{ALIGN_FILE}.tmp"})
STATE_DIR = re.compile(r"state-\d+")  # Accelerate's save_state folders, numbered by save


def _not_tied_weights_note(record: logging.LogRecord) -> bool:
    """Whisper ties proj_out to the decoder's embed_tokens: Accelerate's save_state drops the duplicate and warns
    "check that you don't receive any warning while reloading" at every checkpoint. mam has checked: load_state
    restores it through the tie, and a resumed run equals a straight one (tests/test_finetune_whisper.py)."""
    return "Removed shared tensor" not in record.getMessage()  # after Accelerate's "[RANK 0] "


logging.getLogger("accelerate.utils.other").addFilter(_not_tied_weights_note)


@dataclass
class RunState:
    epoch: int = 0
    step: int = 0  # optimizer steps done
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    best: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    processes: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # what a resume must match (not RESUME_MAY_CHANGE)
    loss_sum: list[float] = field(default_factory=list)  # per process: the current epoch's loss so far
    loss_count: list[int] = field(default_factory=list)
    saves: int = 0  # checkpoints written; the latest lives in state-<saves>/

    @property
    def position(self) -> tuple[int, int, int]:
        """Where the run stands: equal positions mean nothing new to save."""
        return self.epoch, self.step, self.batch_in_epoch


def run_dir(out: Path) -> Path:
    """Where a run keeps its resumable state: a hidden sibling of ``out`` (found again by --resume)."""
    raw = os.fsencode(out.name)  # the name's bytes on disk (a byte that is not UTF-8 is kept as it is, PEP 383)
    name = out.name if len(raw) <= 240 else os.fsdecode(raw[:240])  # with ".….mam-run": at most 255 bytes
    return out.with_name(f".{name}.mam-run")


def ours(path: Path) -> bool:
    """Whether a run folder's entry is one that mam writes there."""
    return path.name in RUN_FILES or (STATE_DIR.fullmatch(path.name) is not None and path.is_dir())


def read_run(work: Path) -> RunState:
    try:
        return RunState(**json.loads((work / RUN_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise MamError(f"cannot resume: {work / RUN_FILE} is unreadable ({type(e).__name__})") from None


def write_run(work: Path, st: RunState) -> None:
    """The commit point of a checkpoint: until it is replaced, the previous state folder stays the one resumed."""
    tmp = work / f"{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(st)))
    tmp.replace(work / RUN_FILE)


def load_state(acc: Any, folder: Path) -> None:
    """Accelerate's ``load_state``: weights from safetensors, the rest through ``torch.load(weights_only=True)``
    (mam registers no custom objects, the one thing Accelerate unpickles freely). A file that is not plain
    tensors and numbers is refused, not run. Accelerate only logs an RNG state it cannot restore; a resume
    that is not bit-identical is an error here."""
    from accelerate.utils import load

    try:
        acc.load_state(str(folder))
        saved = load(folder / f"random_states_{acc.process_index}.pkl")
    except Exception as e:  # whatever the files hold, the answer is one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MamError(f"cannot resume from {folder}: {first}") from None
    restored = torch.equal(saved["torch_manual_seed"], torch.get_rng_state())
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in saved:  # one state per GPU, as many GPUs
        cuda, now = saved["torch_cuda_manual_seed"], torch.cuda.get_rng_state_all()
        restored &= len(cuda) == len(now) and all(torch.equal(a, b) for a, b in zip(cuda, now, strict=True))
    if not restored:
        raise MamError(f"cannot resume from {folder}: its random state was not restored")


def trim_metrics(path: Path, step: int) -> None:
    """Keep the rows up to the saved step: the steps after it are run again on --resume (and logged again)."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # the half-written last line of a killed run
            continue
        if row.get("step", math.inf) <= step:
            rows.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(rows))
    tmp.replace(path)
