"""What a kind of head needs from evaluate, rank-layers and finetune, in one object.

A task knows how its model is loaded (the transformers auto class), which checkpoints it fits
(``matches``/``supports``), what a dataset must hold (``check``), how a batch becomes hypotheses or
labels (``predict``), how they are scored and described in the report, and for fine-tuning: the
targets (``labels``), which clips the head cannot learn from (``unlearnable``), how the model is
loaded to train (``load_for_training``: a new classifier head) and what may be frozen (``freeze``).
The loops (evaluate, finetune) own batching, caching, train/eval mode and progress. Task, family
(tensor names) and checkpoint format (HF, BEATs) are independent axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from mamcli.errors import MamError
from mamcli.metrics import asr_scores, describe_normaliser, resolve_normaliser

if TYPE_CHECKING:
    from mamcli.checkpoint import Checkpoint
    from mamcli.data import Clip, Dataset, Item
    from mamcli.families import Arch
    from mamcli.models import AudioModel

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class TaskOptions:
    """Per-run choices of a task: decoding (seq2seq), text normalisation (ASR), label matching (audio events)."""

    beams: int = 1
    language: str | None = None
    normalizer: str = "auto"
    fast: bool = False  # seq2seq: int8 encoder, float32 decoder (mamcli.whisper_engine), not exact
    label_map: Path | None = None


@dataclass
class Predicted:
    """One batch's outputs: a text or dataset label per clip, and whether decoding stopped at its length bound."""

    texts: list[str]
    at_bound: list[bool] = field(default_factory=list)


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:  # a family's front end names modules some of its models lack
        return None


def _architectures(config: dict[str, Any]) -> list[str]:
    return [str(a) for a in config.get("architectures") or []]


class Task:
    """One kind of head. Subclasses fill the class attributes and the hooks they need."""

    name: ClassVar[str]  # what reports and --task call it: "asr" | "aec"
    kind: ClassVar[str]  # "ctc" | "seq2seq" | "classify"
    auto_class: ClassVar[str]  # transformers auto class that loads the head
    mapping: ClassVar[str]  # transformers' model_type → class table of that auto class
    arch_suffixes: ClassVar[tuple[str, ...]]  # config.architectures endings that mean this head
    default_lr: ClassVar[float]  # fine-tuning's --lr unless given (docs/finetune.md says where each was measured)
    has_decoder: ClassVar[bool] = False  # a decoder of its own (--freeze-decoder)
    needs_tokenizer: ClassVar[bool] = False
    default_normalizer: ClassVar[str | None] = None  # ASR tasks: what "auto" means
    cpu_batch_size: int = 1  # clips per batch on CPU unless asked (models.default_batch_size); options may change it

    def __init__(self, options: TaskOptions | None = None) -> None:
        self.options = options or TaskOptions()
        if self.options.beams < 1:
            raise MamError(f"--beams must be at least 1; got {self.options.beams}")
        if self.options.beams > 1 and self.kind != "seq2seq":
            raise MamError(f"--beams applies to sequence-to-sequence models (Whisper); {self.describe_head()} "
                           "decodes greedily")
        if self.options.fast and self.kind != "seq2seq":
            raise MamError(f"--fast applies to sequence-to-sequence models (Whisper); this is {self.describe_head()}")
        if self.options.language is not None and self.kind != "seq2seq":
            raise MamError(f"--language applies to multilingual sequence-to-sequence models (Whisper); "
                           f"this is {self.describe_head()}")
        self.normalizer = resolve_normaliser(self.options.normalizer, self.default_normalizer or "basic")

    # ---- which checkpoints -------------------------------------------------------------------
    @classmethod
    def supports(cls, config: dict[str, Any]) -> bool:
        """transformers has this head for the checkpoint's model_type."""
        from transformers.models.auto import modeling_auto

        return str(config.get("model_type")) in getattr(modeling_auto, cls.mapping)

    @classmethod
    def matches(cls, config: dict[str, Any]) -> bool:
        """The checkpoint was saved with this head (config.architectures)."""
        return cls.supports(config) and any(a.endswith(cls.arch_suffixes) for a in _architectures(config))

    def describe_head(self) -> str:
        return {"ctc": "a CTC model", "seq2seq": "a sequence-to-sequence model",
                "classify": "an audio-classification model"}[self.kind]

    # ---- hooks ---------------------------------------------------------------------------------
    def bind(self, am: AudioModel) -> None:
        """Check the options against the loaded model (e.g. --language on an English-only Whisper)."""

    def check(self, ds: Dataset) -> None:
        """Refuse a dataset that lacks what this task scores (transcripts, labels)."""

    def predict(self, am: AudioModel, inputs: dict[str, torch.Tensor], samples: list[int]) -> Predicted:
        """Hypotheses (or dataset labels) of one batch; ``samples``: each clip's length at the model's rate."""
        raise NotImplementedError

    def score(self, items: list[Item], preds: dict[str, str], at_bound: set[str]) -> dict[str, Any]:
        """Scores of one pass; ``at_bound``: the clips whose decoding stopped at its length bound."""
        raise NotImplementedError

    def labels(self, am: AudioModel, items: list[Item]) -> torch.Tensor:
        """Fine-tuning targets of one batch, as the head's ``labels=`` takes them (-100 where ignored)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "head": self.kind}

    # ---- fine-tuning ---------------------------------------------------------------------------
    def load_for_training(self, target: Checkpoint, labels: list[str], device: str) -> AudioModel:
        """The model to train, in float32 everywhere (a half-precision checkpoint would train in fp16 on a
        GPU); ``labels``: the training data's, for a head that is built for them."""
        from mamcli.models import load_audio_model

        return load_audio_model(target, self, device, dtype=torch.float32)

    def unlearnable(self, am: AudioModel, clip: Clip) -> str | None:
        """Why the head cannot learn from this clip (None: it can). Such a clip gives an infinite or undefined
        loss, which would otherwise surface later as a "non-finite loss" with the wrong advice."""
        if not np.isfinite(clip.audio).all():
            return "its audio holds NaN or infinite samples"
        return None

    def freeze(self, am: AudioModel, arch: Arch, *, feature_encoder: bool, decoder: bool) -> None:
        """Keep parts out of training: the convolutional front end (transformers' ``freeze_feature_encoder``,
        else the family's front end when it is all convolutions: Whisper's conv1/conv2) and the decoder."""
        model = am.model
        if feature_encoder:
            if hasattr(model, "freeze_feature_encoder"):
                model.freeze_feature_encoder()
            else:
                convs = [_submodule(model, arch.prefix + name) for name in arch.family.frontend]
                if not convs or not all(isinstance(m, CONVOLUTIONS) for m in convs):
                    raise MamError(f"--freeze-feature-encoder: {am.ckpt.spec} has no convolutional front end "
                                   "that mam knows")
                for module in convs:
                    module.requires_grad_(False)
        if decoder:
            if not self.has_decoder:
                raise MamError(f"--freeze-decoder: {am.ckpt.spec} has no decoder (only sequence-to-sequence "
                               "models do)")
            model.get_decoder().requires_grad_(False)


class SpeechRecognition(Task):
    """What CTC and sequence-to-sequence recognition share: transcripts, WER/CER, the normaliser."""

    name = "asr"
    needs_tokenizer = True
    default_lr = 1e-5
    spelling: dict[str, str] | None = None  # the tokenizer's English spelling map, when it ships one

    def check(self, ds: Dataset) -> None:
        if any(not i.text for i in ds.items):
            raise MamError(f"dataset {ds.spec!r} has clips without transcripts; ASR needs text")

    def score(self, items: list[Item], preds: dict[str, str], at_bound: set[str]) -> dict[str, Any]:
        refs = [i.text or "" for i in items]
        hyps = [preds[i.id] for i in items]
        scores = asr_scores(refs, hyps, self.normalizer, self.spelling)
        scores["error"] = scores["wer"]
        scores["utterances"] = [{"id": i.id, "reference": r, "hypothesis": h}
                                for i, r, h in zip(items, refs, hyps, strict=True)]
        return scores

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "normalizer": {
            "name": self.normalizer, "asked": self.options.normalizer,
            "steps": describe_normaliser(self.normalizer, self.spelling), "applied_to": "references and hypotheses"}}
