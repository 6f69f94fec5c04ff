"""CTC speech recognition (HuBERT, wav2vec2, WavLM, data2vec-audio): argmax per frame, then the tokenizer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mamcli.metrics import normaliser
from mamcli.tasks.base import Predicted, SpeechRecognition

if TYPE_CHECKING:
    from mamcli.data import Clip, Item
    from mamcli.models import AudioModel


class CTC(SpeechRecognition):
    kind = "ctc"
    auto_class = "AutoModelForCTC"
    mapping = "MODEL_FOR_CTC_MAPPING_NAMES"
    arch_suffixes = ("ForCTC",)
    default_normalizer = "basic"

    def predict(self, am: AudioModel, inputs: dict[str, torch.Tensor], samples: list[int]) -> Predicted:
        ids = am.model(**inputs).logits.argmax(-1)
        return Predicted(am.tokenizer.batch_decode(ids), [False] * len(samples))

    def labels(self, am: AudioModel, items: list[Item]) -> torch.Tensor:
        """Character targets: normalised text, cased like the tokenizer's vocabulary, -100 padded."""
        f = normaliser(self.normalizer)
        vocab = am.tokenizer.get_vocab()
        upper = "A" in vocab and "a" not in vocab
        prepared = [f(i.text or "").upper() if upper else f(i.text or "") for i in items]
        enc = am.tokenizer(prepared, padding=True, return_tensors="pt", return_attention_mask=True)
        return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)

    def unlearnable(self, am: AudioModel, clip: Clip) -> str | None:
        """Also: a transcript that needs more CTC frames than its audio gives."""
        why = super().unlearnable(am, clip)
        if why is not None:
            return why
        ids = self.labels(am, [clip.item])[0]
        ids = ids[ids != -100]
        need = len(ids) + int((ids[1:] == ids[:-1]).sum())  # CTC puts a blank between repeated labels
        frames = am.output_frames(torch.tensor([len(clip.audio)]))
        if frames is not None and int(frames[0]) < need:
            return f"its transcript needs {need} CTC frames; its audio gives {int(frames[0])}"
        return None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "decoding": "greedy CTC: argmax per frame, repeats and blanks removed"}
