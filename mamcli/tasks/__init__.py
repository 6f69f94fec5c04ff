"""The task registry: one class per kind of head (CTC, sequence-to-sequence, classification).

A new kind of head is one new class here; evaluate, rank-layers and finetune call its hooks and
never branch on a task's name.
"""

from __future__ import annotations

from typing import Any

from mamcli.errors import MamError
from mamcli.tasks.base import Predicted, Task, TaskOptions
from mamcli.tasks.classify import Classify, match_labels
from mamcli.tasks.ctc import CTC
from mamcli.tasks.seq2seq import Seq2Seq

TASKS: tuple[type[Task], ...] = (CTC, Seq2Seq, Classify)
NAMES = ("asr", "aec")

__all__ = [
    "CTC",
    "NAMES",
    "TASKS",
    "Classify",
    "Predicted",
    "Seq2Seq",
    "Task",
    "TaskOptions",
    "detect",
    "make",
    "match_labels",
    "resolve",
]


def _what(config: dict[str, Any]) -> str:
    archs = ", ".join(config.get("architectures") or []) or "no architectures"
    return f"{config.get('model_type') or 'no model_type'} ({archs})"


def detect(config: dict[str, Any], spec: str = "the model") -> type[Task]:
    """The task the checkpoint was saved for, from config.architectures."""
    for task in TASKS:
        if task.matches(config):
            return task
    raise MamError(f"{spec}: {_what(config)} is not a speech or audio model this tool evaluates (no CTC, "
                   "speech sequence-to-sequence or audio-classification head); pass --task asr|aec if it is one")


def resolve(name: str, config: dict[str, Any], spec: str = "the model") -> type[Task]:
    """``auto`` → the saved head; ``asr`` → CTC or sequence-to-sequence, whichever this model type has;
    ``aec`` → classification."""
    if name == "auto":
        return detect(config, spec)
    if name not in NAMES:
        raise MamError(f"--task must be asr, aec or auto; got {name!r}")
    candidates = [t for t in TASKS if t.name == name]
    for task in candidates:  # the saved head first (a model type may have several)
        if task.matches(config):
            return task
    for task in candidates:
        if task.supports(config):
            return task
    what = "speech-recognition (CTC or sequence-to-sequence)" if name == "asr" else "audio-classification"
    raise MamError(f"{spec}: {_what(config)} has no {what} head in transformers; --task {name} needs one")


def make(name: str, config: dict[str, Any], options: TaskOptions | None = None, spec: str = "the model") -> Task:
    return resolve(name, config, spec)(options)
