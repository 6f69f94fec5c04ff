"""Sequence-to-sequence speech recognition (Whisper): bounded ``generate()``, then the tokenizer.

Decoding is greedy unless ``beams`` asks for beam search, always without timestamps, with the
checkpoint's own generation config (suppressed tokens, decoder prompt). The number of new tokens
is bounded by the audio: a damaged model (a merge at too large a λ) repeats itself until the bound,
and an unbounded one would run to the model's 448-token limit on every clip.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from mamcli import whisper_engine
from mamcli.errors import MamError
from mamcli.tasks.base import Predicted, SpeechRecognition, TaskOptions

if TYPE_CHECKING:
    from mamcli.data import Clip, Item
    from mamcli.models import AudioModel

# Read English runs at about 3.2 Whisper tokens per second (LJ Speech: median 3.1, fastest clip 4.8, digits and
# punctuation included); OpenAI's own decoder allows 224 tokens per 30 s window (7.5/s). 10/s plus 10 tokens
# leaves real speech unbounded and stops a looping decoder after a clip's worth of text.
TOKENS_PER_SECOND = 10
TOKENS_SLACK = 10


def _language_token(language: str, lang_to_id: dict[str, int], spec: str) -> str:
    """``en``, ``english`` or ``<|en|>`` → ``<|en|>``, if the model knows it."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    key = language.strip().lower()
    token = f"<|{TO_LANGUAGE_CODE.get(key, key).strip('<|>')}|>"
    if token not in lang_to_id:
        known = ", ".join(t.strip("<|>") for t in list(lang_to_id)[:8])
        raise MamError(f"--language {language}: not a language of {spec} (it knows {known}, …)")
    return token


@contextmanager
def _generation_quiet() -> Iterator[None]:
    """generate() warns on every batch about choices mam makes on purpose (max_new_tokens beside the config's
    max_length, no attention mask for Whisper's fixed 30 s input): silent unless -v asked for info."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    if level > logging.INFO:  # unless -v (or TRANSFORMERS_VERBOSITY=info/debug) asked to see everything
        logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


class Seq2Seq(SpeechRecognition):
    kind = "seq2seq"
    auto_class = "AutoModelForSpeechSeq2Seq"
    mapping = "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"
    arch_suffixes = ("ForConditionalGeneration",)
    default_normalizer = "whisper"
    cpu_batch_size = 8  # the batch shares each decoder step (benchmarks/whisper_bench.py)
    has_decoder = True

    def __init__(self, options: TaskOptions | None = None) -> None:
        super().__init__(options)
        if self.options.fast:
            whisper_engine.check_fast(greedy=self.options.beams == 1)
            # fast mode encodes one clip at a time whatever the batch, and its decoder steps share more rows: 60 LJ
            # clips decoded in 2.75-2.89 s against 3.06-3.20 at 8 (in-process, 2 threads, three rounds)
            self.cpu_batch_size = 16
        self.multilingual = False
        self.timestamps = False
        self.language_token: str | None = None
        self.prompt: list[int | None] = []  # None: the language token Whisper detects per clip
        self.limit = 0  # most new tokens the decoder takes after the prompt
        self.special: set[int] = set()

    def bind(self, am: AudioModel) -> None:
        gen = am.model.generation_config
        self.multilingual = bool(getattr(gen, "is_multilingual", False))
        if self.options.language is not None:
            if not self.multilingual:
                raise MamError(f"--language {self.options.language}: {am.ckpt.spec} is an English-only model; "
                               "leave --language out")
            self.language_token = _language_token(self.options.language, getattr(gen, "lang_to_id", None) or {},
                                                  am.ckpt.spec)
        self.spelling = getattr(am.tokenizer, "english_spelling_normalizer", None) or None
        self.timestamps = getattr(gen, "no_timestamps_token_id", None) is not None
        self.prompt = self.decoder_prompt(am)
        if self.options.fast:
            whisper_engine.check_fast(greedy=None not in self.prompt, device=am.model.device.type)
        longest = getattr(am.model.config, "max_target_positions", None) or gen.max_length
        self.limit = int(longest) - len(self.prompt)
        ids = (gen.pad_token_id, gen.eos_token_id, gen.decoder_start_token_id, *am.tokenizer.all_special_ids)
        self.special = {int(i) for t in ids if t is not None for i in (t if isinstance(t, list) else [t])}

    def decoder_prompt(self, am: AudioModel) -> list[int | None]:
        """start-of-transcript, then (multilingual) language and transcribe, then no-timestamps."""
        gen = am.model.generation_config
        prompt: list[int | None] = [int(gen.decoder_start_token_id)]
        if self.multilingual:
            prompt += [int(gen.lang_to_id[self.language_token]) if self.language_token else None,
                       int(gen.task_to_id["transcribe"])]
        if self.timestamps:
            prompt.append(int(gen.no_timestamps_token_id))
        return prompt

    def bound(self, seconds: float) -> int:
        return min(math.ceil(TOKENS_PER_SECOND * seconds) + TOKENS_SLACK, self.limit)

    def predict(self, am: AudioModel, inputs: dict[str, torch.Tensor], samples: list[int]) -> Predicted:
        bound = self.bound(max(samples) / am.rate)  # batches are length-sorted: the longest clip sets it
        kwargs: dict[str, Any] = {"max_new_tokens": bound, "num_beams": self.options.beams, "do_sample": False}
        if self.timestamps:
            kwargs["return_timestamps"] = False
        if self.multilingual:
            kwargs["task"] = "transcribe"
            if self.language_token:
                kwargs["language"] = self.language_token
        with _generation_quiet():
            out = whisper_engine.generate(am, inputs, self.prompt, fast=self.options.fast, **kwargs)
        seqs = out if isinstance(out, torch.Tensor) else out["sequences"]
        texts = [t.strip() for t in am.tokenizer.batch_decode(seqs, skip_special_tokens=True)]
        # a clip that ended with end-of-text has fewer than `bound` text tokens (the bound counts the end token)
        special = torch.tensor(sorted(self.special), device=seqs.device)
        produced = (~torch.isin(seqs, special)).sum(-1)
        return Predicted(texts, [int(n) >= bound for n in produced])

    def score(self, items: list[Item], preds: dict[str, str], at_bound: set[str]) -> dict[str, Any]:
        scores = super().score(items, preds, at_bound)
        scores["hit_token_bound"] = len(at_bound)
        for u in scores["utterances"]:
            u["hit_token_bound"] = u["id"] in at_bound
        return scores

    def labels(self, am: AudioModel, items: list[Item]) -> torch.Tensor:
        """The decoder prompt without its first token (the model shifts labels right and puts
        decoder_start_token_id first), the transcript's tokens, end-of-text; -100 padded."""
        if self.multilingual and self.language_token is None:
            raise MamError(f"{am.ckpt.spec} is multilingual: give --language (its decoder prompt names one)")
        eos = am.model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        prompt = [int(t) for t in self.prompt[1:] if t is not None]
        rows = [prompt + am.tokenizer(" " + (i.text or "").strip(), add_special_tokens=False)["input_ids"]
                + [int(eos)] for i in items]
        out = torch.full((len(rows), max(map(len, rows))), -100, dtype=torch.long)
        for k, row in enumerate(rows):
            out[k, :len(row)] = torch.tensor(row)
        return out

    def unlearnable(self, am: AudioModel, clip: Clip) -> str | None:
        """Also: a transcript longer than the decoder's positions."""
        why = super().unlearnable(am, clip)
        if why is not None:
            return why
        ids = self.labels(am, [clip.item])[0]
        tokens, longest = int((ids != -100).sum()), int(am.model.config.max_target_positions)
        return f"its transcript is {tokens} tokens; the decoder takes at most {longest}" if tokens > longest else None

    def describe(self) -> dict[str, Any]:
        beams = self.options.beams
        return {**super().describe(),
                "decoding": "greedy" if beams == 1 else f"beam search, {beams} beams",
                **whisper_engine.describe(self.options.fast),
                "token_bound": f"max_new_tokens = ceil({TOKENS_PER_SECOND} tokens/s × longest clip of the batch) + "
                               f"{TOKENS_SLACK}, at most {self.limit}",
                "language": self.options.language if self.options.language else
                ("detected per clip" if self.multilingual else "English-only model"),
                "task_token": "transcribe" if self.multilingual else None, "timestamps": False,
                "decoder_prompt": self.prompt,
                "generation_config": "the checkpoint's (suppressed tokens, prompt); only the bound, beams and "
                                     "language above are set"}
