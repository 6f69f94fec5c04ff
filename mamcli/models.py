"""Models in memory: loading for inference, batching audio, and applying a merge in place.

``evaluate`` sweeps many (λ, layers, source) points over one loaded model: each point swaps only
the merged Q/K/V tensors (originals kept to restore), and the outputs of everything before the
first merged layer (the convolutional front end, unmerged early layers) are computed once per
batch and replayed for every later point.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamcli.checkpoint import Checkpoint, TensorInfo
from mamcli.data import Clip
from mamcli.errors import MamError
from mamcli.families import FAMILIES, Arch, Family, detect
from mamcli.merge import MergedTensors, MergeOptions, MergePlan, TensorStore, plan_merge

MEMORY = Path("<memory>")


def _transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # mam draws its own progress on stderr
    return transformers


def detect_task(config: dict[str, Any]) -> str:
    """``asr`` for CTC heads, ``aec`` for audio classification heads, from config.architectures."""
    if config.get("model_type") == "beats":
        return "aec"
    archs = " ".join(config.get("architectures") or [])
    if "ForCTC" in archs:
        return "asr"
    if "ForAudioClassification" in archs or "ForSequenceClassification" in archs:
        return "aec"
    raise MamError(f"cannot tell the task from architectures {archs or 'None'}; pass --task asr|aec")


@dataclass
class AudioModel:
    """A speech/audio model with its feature extractor (and CTC tokenizer for ASR)."""

    ckpt: Checkpoint
    model: Any
    features: Any
    tokenizer: Any | None
    task: str
    rate: int
    takes_mask: bool
    padding_safe: bool
    _sig: set[str] = field(default_factory=set)

    def inputs(self, audio: list[np.ndarray]) -> dict[str, torch.Tensor]:
        kwargs: dict[str, Any] = {"sampling_rate": self.rate, "return_tensors": "pt"}
        if "padding" in self._sig:
            kwargs["padding"] = True
        if "return_attention_mask" in self._sig:
            kwargs["return_attention_mask"] = self.takes_mask
        feats = self.features(audio, **kwargs)
        return {k: v.to(self.model.device) for k, v in feats.items()
                if k in ("input_values", "input_features", "attention_mask")}

    def batches(self, clips: list[Clip], batch_size: int) -> Iterator[list[Clip]]:
        """Length-sorted batches; a model that padding would change only batches equal lengths."""
        ordered = sorted(clips, key=lambda c: (-len(c.audio), c.item.id))
        batch: list[Clip] = []
        for c in ordered:
            if batch and (len(batch) >= batch_size or (not self.padding_safe and len(c.audio) != len(batch[0].audio))):
                yield batch
                batch = []
            batch.append(c)
        if batch:
            yield batch

    def frame_mask(self, inputs: dict[str, torch.Tensor], frames: int) -> torch.Tensor:
        """Valid output frames per batch row (padding excluded), for pooling."""
        mask = inputs.get("attention_mask")
        lengths_fn = getattr(self.model, "_get_feat_extract_output_lengths", None)
        if mask is None or lengths_fn is None:
            first = next(iter(inputs.values()))
            return torch.ones(first.shape[0], frames, dtype=torch.bool, device=first.device)
        lengths = lengths_fn(mask.sum(-1)).clamp(max=frames)
        return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an unavailable device is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MamError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MamError(f"--device {name}: CUDA is not available on this machine")
    return dev


def default_batch_size(model: Any) -> int:
    """CPU: one clip at a time (measured: padding and batched convolutions cost more than they save
    on a few cores, benchmarks/eval_bench.py); accelerators: 8 length-sorted clips."""
    return 1 if model.device.type == "cpu" else 8


def load_audio_model(ckpt: Checkpoint, task: str, device: str = "cpu",
                     labels: list[str] | None = None) -> AudioModel:
    """Load with the target's own classes: CTC for ``asr``, audio classification for ``aec``, base for ``encode``.
    ``labels`` (transformers ``aec`` models): a new classifier head for these labels instead of the saved one."""
    if ckpt.fmt == "beats":
        return _load_beats(ckpt, task, device)
    tf = _transformers()
    cls = {"asr": tf.AutoModelForCTC, "aec": tf.AutoModelForAudioClassification, "encode": tf.AutoModel}[task]
    head: dict[str, Any] = {} if labels is None else {
        "num_labels": len(labels), "id2label": dict(enumerate(labels)),
        "label2id": {lab: i for i, lab in enumerate(labels)}, "ignore_mismatched_sizes": True}
    try:
        model = cls.from_pretrained(ckpt.root, **head).eval().to(resolve_device(device))
        with warnings.catch_warnings():  # AST's own defaults (128 mels, 400-point FFT) warn on every load
            warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
            features = tf.AutoFeatureExtractor.from_pretrained(ckpt.root)
        tokenizer = tf.AutoTokenizer.from_pretrained(ckpt.root) if task == "asr" else None
    except (OSError, ValueError, KeyError) as e:
        raise MamError(f"{ckpt.spec}: cannot load as a {task} model with its processor "
                       f"({str(e).strip().splitlines()[0]})") from None
    takes_mask = bool(getattr(features, "return_attention_mask", False))
    # group norm over time in the first conv mixes padding into real frames
    padding_safe = takes_mask and getattr(model.config, "feat_extract_norm", "layer") == "layer"
    rate = int(getattr(features, "sampling_rate", 16000))
    sig = set(inspect.signature(features.__call__).parameters)
    return AudioModel(ckpt, model, features, tokenizer, task, rate, takes_mask, padding_safe, sig)


def _load_beats(ckpt: Checkpoint, task: str, device: str) -> AudioModel:
    from mamcli.beats import BeatsFeatures, load_beats

    if task == "asr":
        raise MamError(f"{ckpt.spec}: BEATs is an audio-event model; use --task aec")
    cfg = {k: v for k, v in ckpt.config.items() if k != "model_type"}
    try:
        model = load_beats(cfg, {n: ckpt.get(n) for n in ckpt.infos}, ckpt.extras.get("label_dict"))
    except (ValueError, TypeError, RuntimeError) as e:
        raise MamError(f"{ckpt.spec}: {e}") from None
    model = model.eval().to(resolve_device(device))
    features = BeatsFeatures()
    sig = set(inspect.signature(features.__call__).parameters)
    return AudioModel(ckpt, model, features, None, task, features.sampling_rate, True, True, sig)


@dataclass
class TextModel:
    ckpt: Checkpoint
    model: Any
    tokenizer: Any


def load_text_model(ckpt: Checkpoint, device: str = "cpu") -> TextModel:
    tf = _transformers()
    try:
        return TextModel(ckpt, tf.AutoModel.from_pretrained(ckpt.root).eval().to(resolve_device(device)),
                         tf.AutoTokenizer.from_pretrained(ckpt.root))
    except (OSError, ValueError, KeyError) as e:
        raise MamError(f"{ckpt.spec}: cannot load as a text model with its tokenizer "
                       f"({str(e).strip().splitlines()[0]})") from None


class ModelStore:
    """A loaded model seen as a :class:`TensorStore`, so ``plan_merge`` works on it unchanged."""

    def __init__(self, model: Any, spec: str) -> None:
        self.model = model
        self.spec = spec
        self.config: dict[str, Any] = model.config.to_dict()
        self.params = dict(model.state_dict(keep_vars=True))
        self.infos: dict[str, TensorInfo] = {n: TensorInfo(n, t.dtype, tuple(t.shape), MEMORY)
                                             for n, t in self.params.items()}
        self._arch: Arch | None = None

    def get(self, name: str) -> torch.Tensor:
        return self.params[name].detach()

    def arch(self, families: tuple[Family, ...] = FAMILIES) -> Arch:
        if self._arch is None or self._arch.family not in families:
            self._arch = detect(self.infos, self.config, families, self.spec, lambda n: self.infos[n].shape)
        return self._arch


class InMemoryMerger:
    """Applies merge points to a loaded model and restores it, touching only the merged tensors."""

    def __init__(self, store: ModelStore, families: tuple[Family, ...] = FAMILIES) -> None:
        self.store = store
        self.families = families
        self._originals: dict[str, torch.Tensor] = {}
        self.stats: list[dict[str, Any]] = []

    def plan(self, source: TensorStore, options: MergeOptions) -> MergePlan:
        return plan_merge(source, self.store, options, self.families)

    def apply(self, source: TensorStore, plan: MergePlan) -> list[str]:
        """Merge into the model's tensors in place (originals kept for ``restore``); returns their names."""
        merged = MergedTensors(plan, source, self.store)
        with torch.no_grad():
            for name in merged.groups:
                param = self.store.params[name]
                original = self._originals.setdefault(name, param.detach().clone())
                param.copy_(merged.compute(name, original).to(param.dtype))
        self.stats = merged.stats
        return list(merged.groups)

    def restore(self, names: list[str]) -> None:
        with torch.no_grad():
            for name in names:
                self.store.params[name].copy_(self._originals[name])

    @contextmanager
    def applied(self, source: TensorStore, plan: MergePlan) -> Iterator[list[dict[str, Any]]]:
        names = self.apply(source, plan)
        try:
            yield self.stats
        finally:
            self.restore(names)


class PrefixCache:
    """Replays, per batch, the outputs of modules that no merge point changes.

    ``record(key)`` captures the outputs of the front end and of layer ``first - 1`` while a
    normal forward runs; ``replay(key)`` makes those modules return the captured outputs (the
    layers before ``first - 1`` return the same object, so their work is skipped too).
    The outputs take about 0.5 MiB per second of audio at width 768, so at most ``budget_bytes``
    are kept: batches beyond it are not recorded and run in full at every point.
    """

    def __init__(self, model: Any, arch: Arch, first_merged: int, budget_bytes: int) -> None:
        self.model = model
        names = [f"{arch.prefix}{m}" for m in arch.family.frontend]
        self.frontend = [model.get_submodule(n) for n in names if _has_module(model, n)]
        self.layers = [model.get_submodule(arch.layer_module(i)) for i in range(first_merged)]
        self.store: dict[Any, list[Any]] = {}
        self.budget = budget_bytes
        self.used = 0
        self.full = False  # a batch did not fit: later batches are not recorded either

    @property
    def modules(self) -> list[Any]:
        return self.frontend + self.layers[-1:]

    @contextmanager
    def record(self, key: Any) -> Iterator[None]:
        outputs: list[Any] = [None] * len(self.modules)

        def hook(idx: int) -> Any:
            def fn(module: Any, args: Any, output: Any) -> None:
                outputs[idx] = output
            return fn

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self.modules)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        size = _nbytes(outputs)
        if self.used + size > self.budget:
            self.full = True
        else:
            self.store[key] = outputs
            self.used += size

    def describe(self, batches: int) -> dict[str, Any]:
        return {"budget_bytes": self.budget, "used_bytes": self.used, "batches_replayed": len(self.store),
                "batches": batches}

    @contextmanager
    def replay(self, key: Any) -> Iterator[None]:
        outputs = self.store[key]
        patched = list(zip(self.modules, outputs, strict=True))
        if self.layers:  # earlier layers are skipped: their output is overwritten by the last one's anyway
            patched += [(layer, outputs[-1]) for layer in self.layers[:-1]]
        for module, out in patched:
            module.forward = (lambda o: (lambda *a, **k: o))(out)
        try:
            yield
        finally:
            for module, _ in patched:
                del module.forward


def _nbytes(value: Any) -> int:
    """Bytes held by the tensors in a module output (tensors, tuples, lists, dicts, ModelOutputs)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):  # ModelOutput is an OrderedDict
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def _has_module(model: Any, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
