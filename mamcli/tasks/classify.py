"""Audio classification (AST, BEATs, WhisperForAudioClassification): argmax, then the model's label names,
matched to the dataset's labels by normalised name or an explicit map."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mamcli.errors import MamError
from mamcli.metrics import classification_scores
from mamcli.tasks.base import Predicted, Task, TaskOptions

if TYPE_CHECKING:
    from mamcli.checkpoint import Checkpoint
    from mamcli.data import Dataset, Item
    from mamcli.models import AudioModel


def _norm_label(s: str) -> str:
    return re.sub(r"[\s_\-]+", " ", s).strip().lower()


def match_labels(dataset_labels: list[str], id2label: dict[int, str], label_map: Path | None) -> dict[str, str]:
    """Model label → dataset label, by normalised name or an explicit ``{dataset: model}`` JSON map."""
    model_labels = [str(v) for v in id2label.values()]
    if label_map is not None:
        try:
            mapping = json.loads(Path(label_map).read_text())
        except FileNotFoundError:
            raise MamError(f"label map {label_map} does not exist") from None
        except ValueError as e:
            raise MamError(f"label map {label_map}: invalid JSON ({e})") from None
        if not isinstance(mapping, dict):
            raise MamError(f"label map {label_map}: expected an object {{dataset label: model label}}")
        unknown = [m for m in mapping.values() if m not in model_labels]
        if unknown:
            raise MamError(f"label map {label_map} names model labels that do not exist: {', '.join(unknown[:5])}")
    else:
        by_name = {_norm_label(m): m for m in model_labels}
        mapping = {d: by_name[_norm_label(d)] for d in dataset_labels if _norm_label(d) in by_name}
    missing = [d for d in dataset_labels if d not in mapping]
    if missing:
        raise MamError(f"{len(missing)} dataset label(s) match no model label (e.g. {missing[0]!r}); "
                       "give --label-map FILE with {\"dataset label\": \"model label\"}")
    return {m: d for d, m in mapping.items()}


class Classify(Task):
    name = "aec"
    kind = "classify"
    auto_class = "AutoModelForAudioClassification"
    mapping = "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"
    arch_suffixes = ("ForAudioClassification", "ForSequenceClassification")
    default_lr = 1e-4  # measured: whisper-tiny.en's encoder on ESC-10 trains at 1e-4, stays near chance at 1e-3

    def __init__(self, options: TaskOptions | None = None) -> None:
        super().__init__(options)
        self.id2label: dict[int, str] = {}
        self.to_dataset: dict[str, str] = {}

    @classmethod
    def matches(cls, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "beats" or super().matches(config)  # BEATs .pt: read natively

    def bind(self, am: AudioModel) -> None:
        self.id2label = {int(k): str(v) for k, v in (am.model.config.id2label or {}).items()}
        if not self.id2label:
            raise MamError(f"{am.ckpt.spec} has no classifier head; fine-tune one first (mam finetune --task aec)")
        self.label2id = {v: k for k, v in self.id2label.items()}

    def check(self, ds: Dataset) -> None:
        if any(i.label is None for i in ds.items):
            raise MamError(f"dataset {ds.spec!r} has clips without labels; audio events need labels")
        self.to_dataset = match_labels(ds.all_labels, self.id2label, self.options.label_map)

    def predict(self, am: AudioModel, inputs: dict[str, torch.Tensor], samples: list[int]) -> Predicted:
        ids = am.model(**inputs).logits.argmax(-1)
        names = [self.id2label[int(i)] for i in ids]
        return Predicted([self.to_dataset.get(n, n) for n in names], [False] * len(names))

    def score(self, items: list[Item], preds: dict[str, str], at_bound: set[str]) -> dict[str, Any]:
        scores = classification_scores([i.label or "" for i in items], [preds[i.id] for i in items])
        scores["clips_detail"] = [{"id": i.id, "label": i.label, "predicted": preds[i.id]} for i in items]
        return scores

    def labels(self, am: AudioModel, items: list[Item]) -> torch.Tensor:
        """Class ids of the model's head (built for the dataset's labels when fine-tuning)."""
        return torch.tensor([self.label2id[i.label or ""] for i in items])

    def load_for_training(self, target: Checkpoint, labels: list[str], device: str) -> AudioModel:
        """A new classifier head sized to ``labels`` when the model's own labels differ (or it has none: a
        Whisper speech-recognition folder gives its encoder, which transformers loads from the folder's
        ``model.encoder.*``). transformers builds the head while loading, so the model is read once; a BEATs
        encoder may have no head yet, so its head is made after loading."""
        from mamcli.models import load_audio_model

        fp32 = torch.float32
        if target.fmt != "beats":
            saved = sorted(str(v) for v in (target.config.get("id2label") or {}).values())
            return load_audio_model(target, self, device, labels=None if saved == sorted(labels) else labels,
                                    dtype=fp32)
        am = load_audio_model(target, "encode", device, dtype=fp32)
        if sorted(str(v) for v in (am.model.config.id2label or {}).values()) != sorted(labels):
            from mamcli.beats import new_head

            new_head(am.model, labels)
        am.task = self
        self.bind(am)
        return am

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "decoding": "argmax over the classifier's labels",
                "label_map": str(self.options.label_map) if self.options.label_map else "by normalised name"}
