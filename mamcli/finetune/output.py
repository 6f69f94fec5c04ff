"""What a run writes: the best epoch's weights in the run folder, then the output folder, whole, at the end.

Writing fails on the machine (a full disk, a read-only file system) as one line, exit 1 (:class:`WriteError`):
transformers and Accelerate write weights through safetensors, whose errors are not ``OSError``.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mamcli.card import write_card
from mamcli.checkpoint import Checkpoint
from mamcli.errors import MamError
from mamcli.finetune.lam import LamBank, baked_state_dict, lam_table
from mamcli.finetune.progress import no_library_bars
from mamcli.merge import MergePlan
from mamcli.models import AudioModel
from mamcli.report import write_json
from mamcli.writer import REPORT_FILE, atomic_output_dir, hash_tree

BEST_FILE = "best.pt"  # the best epoch's baked weights (and λ), in the run folder


class WriteError(MamError):
    """The machine refused a write (disk full, read-only): nothing this run made is kept."""


def _free_bytes(where: Path) -> int | None:
    """Room left on the file system of ``where`` (or of its nearest existing parent)."""
    for folder in (where, *where.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def _reason(e: Exception, where: Path) -> str | None:
    """The operating system's words for a failed write, also out of a safetensors (Rust) error or torch.save's
    (which keeps no errno: a disk with no room left is named as full); None: the error is not a failed write."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    if isinstance(e, RuntimeError):
        if "PytorchStreamWriter failed writing" not in text:
            return None
        free = _free_bytes(where)
        return os.strerror(errno.ENOSPC) if free is not None and free < 2**20 else "file write failed"
    code = re.search(r"os error (\d+)|code: (\d+)", text)  # safetensors: Rust's io::Error, printed
    if code:
        return os.strerror(int(code.group(1) or code.group(2)))
    return (text.strip().splitlines() or [type(e).__name__])[0]


@contextmanager
def writing(where: Path) -> Iterator[None]:
    """Turn a failed write under ``where`` into one line (:class:`WriteError`)."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        reason = _reason(e, where)
        if reason is None:  # a RuntimeError that is no write failure: a bug, shown as one
            raise
        raise WriteError(f"cannot write {where}: {reason}") from None


def save_best(work: Path, model: nn.Module, bank: LamBank | None, plan: MergePlan | None, num_layers: int) -> None:
    """The model as it is now, baked, as the run's best (written beside, then renamed: never half a file)."""
    lams = None
    if bank is not None and plan is not None:
        lams = json.dumps({"lams": lam_table(bank, plan, num_layers), "per_layer": bank.values()})
    tmp = work / f"{BEST_FILE}.tmp"
    with writing(work):
        torch.save({"state": baked_state_dict(model), "lams_json": lams or ""}, tmp)
        tmp.replace(work / BEST_FILE)


def load_best(work: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The best epoch's weights and its λ tables (None without L-MAM)."""
    best = torch.load(work / BEST_FILE, weights_only=True)
    return best["state"], json.loads(best["lams_json"]) if best.get("lams_json") else None


def _save_weights(tmp: Path, target: Checkpoint, am: AudioModel, state: dict[str, torch.Tensor]) -> None:
    """An ordinary checkpoint: BEATs in its official layout with a safetensors copy, anything else as
    transformers saves it, with the processor (and Whisper's decoding settings, not the defaults)."""
    if target.fmt == "beats":
        from safetensors.torch import save_file

        from mamcli.beats import save_checkpoint

        save_checkpoint(tmp / target.files[0].name, am.model, state, target.extras)
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    clean_model = type(am.model)(am.model.config)  # no parametrizations: an ordinary model
    clean_model.load_state_dict(state)
    if clean_model.can_generate():
        clean_model.generation_config = copy.deepcopy(am.model.generation_config)
    with no_library_bars():
        clean_model.save_pretrained(tmp)
    am.features.save_pretrained(tmp)
    if am.tokenizer is not None:
        am.tokenizer.save_pretrained(tmp)


def write_output(out: Path, replace: bool, inputs: list[Path], target: Checkpoint, am: AudioModel,
                 report: dict[str, Any], trajectory: list[dict[str, Any]], command: str | None, work: Path,
                 logs: list[Path]) -> None:
    """The best epoch as an ordinary checkpoint, written beside ``out`` and renamed into place once complete,
    with the run's ``logs`` (metrics.jsonl, tracker folders) so the hashes `mam verify` checks cover them."""
    state, lams = load_best(work)
    with writing(out), atomic_output_dir(out, force=replace, inputs=inputs, lock=False) as tmp:
        for log in logs:
            if log.is_dir():
                shutil.copytree(log, tmp / log.name)
            elif log.is_file():
                shutil.copy2(log, tmp / log.name)
        _save_weights(tmp, target, am, state)
        if lams is not None:
            write_json(tmp / "lams.json", {**lams, "trajectory": trajectory})
        write_card(tmp, report, command)
        report["outputs"] = {"hashes": hash_tree(tmp)}  # what `mam verify` checks
        write_json(tmp / REPORT_FILE, report)
