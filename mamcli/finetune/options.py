"""What a fine-tuning run is asked to do, checked where it is built (the CLI bounds the numbers as well)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mamcli.errors import MamError
from mamcli.schemas import check_align

MIXED_PRECISION = ("no", "fp16", "bf16")  # Accelerate's
TRACKERS = {"tensorboard": ("torch.utils.tensorboard", "tensorboardX")}  # --log-with → modules, any one will do
RESUME_MAY_CHANGE = ("checkpoint_every", "device", "log_with")  # the others must match on --resume


@dataclass
class FinetuneOptions:
    task: str = "asr"  # or "aec", or "auto" (the saved head): finetune() puts the resolved name here
    lam_init: float | None = None  # with a source: MAM (fixed) or the initial λ of L-MAM
    learnable_lam: bool = False
    layers: str | None = None
    layer_map: str | None = None  # source layer per target layer, as for merge (sources of another depth)
    per_part: bool = False
    parts: tuple[str, ...] = ("q", "k", "v")
    # none | weights | activations (the training clips with their transcripts) | a mam_align.json to replay
    align: str = "none"
    epochs: int = 1
    lr: float | None = None  # None: the task's default_lr (1e-5 speech recognition, 1e-4 audio events)
    lam_lr: float = 1e-2
    batch_size: int = 8
    grad_accum: int = 1
    warmup: int = 0
    weight_decay: float = 0.01
    freeze_feature_encoder: bool = False  # the convolutional front end (wav2vec2 family, Whisper's conv1/conv2)
    freeze_decoder: bool = False  # sequence-to-sequence models (Whisper): train the encoder only
    language: str | None = None  # Whisper: the transcripts' language (multilingual checkpoints only)
    beams: int = 1  # Whisper: beam search width of the dev decoding
    seed: int = 0
    max_steps: int | None = None  # as transformers' Trainer: the run's length in optimizer steps, over --epochs
    checkpoint_every: int = 50
    device: str = "cpu"
    normalizer: str = "auto"  # the task's default: whisper for Whisper, basic for CTC (shapes CTC's targets too)
    max_grad_norm: float | None = 1.0  # clip the gradients' total norm to this (0 or None: no clipping)
    mixed_precision: str = "no"  # Accelerate's: no, fp16 (a GPU only), bf16
    log_with: str | None = None  # "tensorboard": Accelerate's tracker, beside the run and then in DIR

    def __post_init__(self) -> None:
        """Bad numbers are one line however the options were built (the CLI bounds them as well)."""
        if self.task not in ("asr", "aec", "auto"):
            raise MamError(f"--task must be asr, aec or auto; got {self.task!r}")
        for flag, rate in (("--lr", self.lr), ("--lam-lr", self.lam_lr)):
            if rate is not None and not (math.isfinite(rate) and rate > 0):
                raise MamError(f"{flag} must be a finite number above 0; got {rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise MamError(f"weight decay must be a finite number, 0 or more; got {self.weight_decay}")
        counts = (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum),
                  ("--max-steps", self.max_steps), ("--checkpoint-every", self.checkpoint_every))
        for flag, n in counts:
            if n is not None and n < 1:
                raise MamError(f"{flag} must be at least 1; got {n}")
        if self.warmup < 0:
            raise MamError(f"--warmup must be 0 or more; got {self.warmup}")
        if self.lam_init is not None and not (math.isfinite(self.lam_init) and 0 <= self.lam_init <= 1):
            raise MamError(f"--lam-init must lie in [0, 1]; got {self.lam_init}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise MamError(f"--max-grad-norm must be a finite number, 0 or more (0: no clipping); "
                           f"got {self.max_grad_norm}")
        try:
            check_align(self.align)
        except ValueError as e:
            raise MamError(f"--align {e}; got {self.align!r}") from None
        if self.mixed_precision not in MIXED_PRECISION:
            raise MamError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}; "
                           f"got {self.mixed_precision!r}")
        if self.log_with is not None and self.log_with not in TRACKERS:
            raise MamError(f"--log-with must be one of {', '.join(TRACKERS)}; got {self.log_with!r}")
