"""Architecture maps: where each family keeps its attention Q/K/V/O tensors.

Every family is a row of data (``FAMILIES``); nothing downstream branches on a family name.
A family has one or more *layouts* because the same model can be stored under several
naming schemes (e.g. transformers 5 renamed ViT's ``attention.attention.query`` to
``attention.q_proj`` in memory, while checkpoints on disk keep the legacy names).
Users can add families with ``--arch-map FILE`` (JSON or TOML with the same fields).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mamcli.errors import MamError

PARTS = ("q", "k", "v", "o")
KINDS = ("weight", "bias")
# MAM moves attention from a high-resource modality into speech or audio (the paper's two halves)
SOURCE_MODALITIES = frozenset({"text", "image"})
TARGET_MODALITIES = frozenset({"speech", "audio"})


@dataclass(frozen=True)
class Layout:
    """One naming scheme: ``{prefix}{layer}.{parts[p]}.{weight|bias}`` with ``{i}`` the layer index.

    ``fused`` names a module holding Q, K and V stacked along dim 0 (timm's ``attn.qkv``);
    its rows are split on read and stacked again on write. ``attention`` is the module under
    which every attention tensor of a layer lives (used to list unmapped tensors).
    """

    layer: str
    attention: str
    parts: Mapping[str, str] = field(default_factory=dict)
    fused: str | None = None

    def module(self, part: str) -> str:
        if part in self.parts:
            return self.parts[part]
        if self.fused and part in ("q", "k", "v"):
            return self.fused
        raise KeyError(part)

    def anchor_regex(self) -> re.Pattern[str]:
        """Regex matching the Q weight of any layer; captures the prefix and the layer index."""
        layer = re.escape(self.layer).replace(re.escape("{i}"), r"(?P<i>\d+)")
        return re.compile(rf"^(?P<prefix>(?:[^.]+\.)*?){layer}\.{re.escape(self.module('q'))}\.weight$")


@dataclass(frozen=True)
class Family:
    """An architecture family: how to recognise it, read its sizes and find its attention tensors."""

    name: str
    description: str
    modality: str
    model_types: tuple[str, ...]
    layouts: tuple[Layout, ...]
    layers_keys: tuple[str, ...]
    hidden_keys: tuple[str, ...]
    heads_keys: tuple[str, ...]
    markers: tuple[str, ...] = ()
    # modules before the first layer whose output no merge changes (cached across sweep points)
    frontend: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Family:
        try:
            layouts = tuple(
                Layout(
                    layer=lay["layer"],
                    attention=lay["attention"],
                    parts=dict(lay.get("parts", {})),
                    fused=lay.get("fused"),
                )
                for lay in d["layouts"]
            )
            fam = cls(
                name=d["name"],
                description=d.get("description", d["name"]),
                modality=d.get("modality", "unknown"),
                model_types=tuple(d.get("model_types", ())),
                layouts=layouts,
                layers_keys=tuple(d.get("layers_keys", ("num_hidden_layers",))),
                hidden_keys=tuple(d.get("hidden_keys", ("hidden_size",))),
                heads_keys=tuple(d.get("heads_keys", ("num_attention_heads",))),
                markers=tuple(d.get("markers", ())),
                frontend=tuple(d.get("frontend", ())),
            )
        except (KeyError, TypeError) as e:
            raise MamError(f"architecture map is missing field {e}") from None
        for lay in fam.layouts:
            if "{i}" not in lay.layer:
                raise MamError(f"architecture map {fam.name!r}: layer template {lay.layer!r} lacks '{{i}}'")
            if not all(p in lay.parts or (lay.fused and p != "o") for p in ("q", "k", "v")):
                raise MamError(f"architecture map {fam.name!r}: a layout must name q, k and v (or 'fused')")
        return fam


_BERT_KEYS = dict(layers_keys=("num_hidden_layers",), hidden_keys=("hidden_size",),
                  heads_keys=("num_attention_heads",))
_FAIRSEQ_SELF_ATTN = Layout(
    layer="encoder.layers.{i}", attention="self_attn",
    parts={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj"},
)
# checkpoints on disk (hub layout, written by save_pretrained of every version)
_VIT_DISK = Layout(
    layer="encoder.layer.{i}", attention="attention",
    parts={"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
           "o": "attention.output.dense"},
)
# transformers >= 5 module names of ViT-style models in memory
_VIT_MEMORY = Layout(
    layer="layers.{i}", attention="attention",
    parts={"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj"},
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert", description="BERT-style text encoders (BertModel, BertForMaskedLM, RoBERTa, ELECTRA…)",
        modality="text",
        model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "roberta-prelayernorm"),
        layouts=(Layout(
            layer="encoder.layer.{i}", attention="attention",
            parts={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                   "o": "attention.output.dense"},
        ),),
        **_BERT_KEYS,
    ),
    Family(
        name="distilbert", description="DistilBERT", modality="text", model_types=("distilbert",),
        layouts=(Layout(
            layer="transformer.layer.{i}", attention="attention",
            parts={"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "o": "attention.out_lin"},
        ),),
        layers_keys=("n_layers",), hidden_keys=("dim",), heads_keys=("n_heads",),
    ),
    Family(
        name="vit", description="ViT-style image encoders (ViT, DeiT, ViT-MSN, ViT-MAE, I-JEPA, BEiT, "
                                "data2vec-vision, YOLOS)", modality="image",
        model_types=("vit", "deit", "vit_msn", "vit_mae", "ijepa", "beit", "data2vec-vision", "yolos"),
        layouts=(_VIT_DISK, _VIT_MEMORY), frontend=("embeddings",), **_BERT_KEYS,
    ),
    Family(
        name="dinov2", description="DINOv2 image encoders (with or without registers)", modality="image",
        model_types=("dinov2", "dinov2_with_registers"),
        layouts=(
            _VIT_DISK,
            Layout(  # transformers >= 5 module names (in-memory models): the layers keep their old path
                layer="encoder.layer.{i}", attention="attention",
                parts={"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
                       "o": "attention.o_proj"},
            ),
        ),
        frontend=("embeddings",), **_BERT_KEYS,
    ),
    Family(  # ViT's names, an audio model: its own row so that its role (a target) is known
        name="ast", description="Audio Spectrogram Transformer", modality="audio",
        model_types=("audio-spectrogram-transformer",),
        layouts=(_VIT_DISK, _VIT_MEMORY), frontend=("embeddings",), **_BERT_KEYS,
    ),
    Family(
        name="wav2vec2", description="wav2vec 2.0-style speech encoders (wav2vec2, HuBERT, WavLM, data2vec-audio, "
                                     "SEW, UniSpeech)",
        modality="speech", model_types=("wav2vec2", "hubert", "wavlm", "data2vec-audio", "sew", "unispeech",
                                        "unispeech-sat"),
        layouts=(Layout(
            layer="encoder.layers.{i}", attention="attention",
            parts={"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
                   "o": "attention.out_proj"},
        ),),
        frontend=("feature_extractor", "feature_projection", "encoder.pos_conv_embed"),
        **_BERT_KEYS,
    ),
    Family(
        name="whisper", description="Whisper encoder (the decoder is never touched)", modality="speech",
        model_types=("whisper",), layouts=(_FAIRSEQ_SELF_ATTN,),
        layers_keys=("encoder_layers",), hidden_keys=("d_model",), heads_keys=("encoder_attention_heads",),
        markers=(r"(^|\.)encoder\.conv1\.weight$",),
        frontend=("encoder.conv1", "encoder.conv2"),  # the convolutions before the positions are added
    ),
    Family(
        name="beats", description="BEATs audio encoder (official .pt checkpoints, fairseq names)", modality="audio",
        model_types=("beats",), layouts=(_FAIRSEQ_SELF_ATTN,),
        layers_keys=("encoder_layers",), hidden_keys=("encoder_embed_dim",), heads_keys=("encoder_attention_heads",),
        markers=(r"(^|\.)patch_embedding\.weight$",),
        frontend=("patch_embedding", "layer_norm", "post_extract_proj", "encoder.pos_conv"),
    ),
    Family(
        name="timm-vit", description="timm ViT/DeiT (fused attn.qkv)", modality="image", model_types=(),
        layouts=(Layout(layer="blocks.{i}", attention="attn", parts={"o": "attn.proj"}, fused="attn.qkv"),),
        layers_keys=("depth",), hidden_keys=("embed_dim", "num_features"), heads_keys=("num_heads",),
    ),
)


def load_family_file(path: str | Path) -> list[Family]:
    """Read user families from JSON or TOML: one table, a list, or ``{"families": [...]}``."""
    from mamcli.schemas import FAMILY_FILE, FamilySpec, check, read_json_or_toml

    p = Path(path)
    parsed = check(FAMILY_FILE, read_json_or_toml(p, "architecture map"), p, "architecture map")
    specs = [parsed] if isinstance(parsed, FamilySpec) else (parsed if isinstance(parsed, list) else parsed.families)
    return [Family.from_dict(spec.model_dump(exclude_none=True)) for spec in specs]


def all_families(extra: Iterable[Family] = ()) -> tuple[Family, ...]:
    """User families first, so they can override a built-in one for a model type."""
    return (*extra, *FAMILIES)


@dataclass(frozen=True)
class Arch:
    """A family resolved against one checkpoint: concrete layout, prefix and sizes."""

    family: Family
    layout: Layout
    prefix: str
    num_layers: int
    hidden: int | None
    heads: int | None
    model_type: str | None

    def tensor(self, i: int, part: str, kind: str) -> str:
        return f"{self.prefix}{self.layout.layer.format(i=i)}.{self.layout.module(part)}.{kind}"

    def fused_part(self, part: str) -> bool:
        return part not in self.layout.parts and self.layout.fused is not None

    def layer_module(self, i: int) -> str:
        return f"{self.prefix}{self.layout.layer.format(i=i)}"

    def attention_prefix(self, i: int) -> str:
        return f"{self.prefix}{self.layout.layer.format(i=i)}.{self.layout.attention}."

    def describe(self) -> str:
        heads = f", {self.heads} heads × {self.hidden // self.heads}" if self.heads and self.hidden else ""
        kind = self.model_type or "no model_type"
        return f"{self.family.name} ({kind}): {self.num_layers} layers, hidden {self.hidden}{heads}"


def _first_int(config: Mapping[str, Any], keys: Iterable[str]) -> int | None:
    for k in keys:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _match_layout(family: Family, names: list[str]) -> tuple[Layout, str, set[int]] | None:
    if family.markers and not all(any(re.search(m, n) for n in names) for m in family.markers):
        return None
    for layout in family.layouts:
        rx = layout.anchor_regex()
        found = [(m["prefix"], int(m["i"])) for n in names if (m := rx.match(n))]
        if found:
            prefix = Counter(p for p, _ in found).most_common(1)[0][0]
            return layout, prefix, {i for p, i in found if p == prefix}
    return None


def detect(names: Iterable[str], config: Mapping[str, Any], families: tuple[Family, ...] = FAMILIES,
           label: str = "model", shape_of: Callable[[str], tuple[int, ...]] | None = None) -> Arch:
    """Find the family of a checkpoint: config ``model_type`` first, then tensor-name patterns.

    Without a hidden size in the config (timm, a bare .safetensors), ``shape_of`` gives it from the
    width of layer 0's Q weight."""
    names = list(names)
    model_type = config.get("model_type")
    by_type = [f for f in families if model_type and model_type in f.model_types]
    candidates = by_type + [f for f in families if f not in by_type]
    for fam in candidates:
        hit = _match_layout(fam, names)
        if hit is None:
            continue
        layout, prefix, layers = hit
        num_layers = _first_int(config, fam.layers_keys) or (max(layers) + 1)
        hidden = _first_int(config, fam.hidden_keys)
        if hidden is None and shape_of is not None:
            q_shape = shape_of(f"{prefix}{layout.layer.format(i=0)}.{layout.module('q')}.weight")
            hidden = q_shape[1] if len(q_shape) == 2 else None
        heads = _first_int(config, fam.heads_keys)
        if set(range(num_layers)) - layers:
            missing = sorted(set(range(num_layers)) - layers)
            raise MamError(f"{label}: config says {num_layers} layers but the Q weights of layers {missing} are absent")
        return Arch(fam, layout, prefix, num_layers, hidden, heads, model_type)
    known = ", ".join(f.name for f in families)
    hint = f"model_type {model_type!r}" if model_type else "no model_type in its config"
    raise MamError(f"{label}: unknown architecture ({hint}; no tensor names match the families {known}); "
                   "describe it with --arch-map FILE")


def _kind_of(arch: Arch) -> str:
    m = arch.family.modality
    return f"{'an' if m[:1] in 'aeiou' else 'a'} {m} model ({arch.model_type or arch.family.name})"


def check_roles(source: Arch, target: Arch, source_label: str, target_label: str) -> None:
    """Refuse a text/image model as target or a speech/audio model as source, in one line naming both roles.

    Only a modality the config states is trusted: a family found by tensor names alone (no ``model_type``
    or one no family lists: timm, bare weight files) may share its names with another modality (AST has
    ViT's), so it passes."""
    def known(arch: Arch) -> bool:
        return arch.model_type is not None and arch.model_type in arch.family.model_types

    bad_source = known(source) and source.family.modality in TARGET_MODALITIES
    bad_target = known(target) and target.family.modality in SOURCE_MODALITIES
    if not (bad_source or bad_target):
        return
    swapped = target.family.modality not in TARGET_MODALITIES and source.family.modality not in SOURCE_MODALITIES
    raise MamError(f"source {source_label} is {_kind_of(source)} and target {target_label} is {_kind_of(target)}: "
                   "the source must be a text or image model and the target a speech or audio model"
                   + ("; swap the two arguments" if swapped else ""))


def check_compatible(src: Arch, tgt: Arch, src_label: str, tgt_label: str) -> list[str]:
    """Refuse different widths; note differing or unknown head layouts.

    Eq. 1 is element-wise on [d, d] matrices, so equal width is all a merge needs: a source with
    other heads still merges (its heads' rows simply mix with the target's), which the note says."""
    def shape(a: Arch) -> str:
        heads = f"{a.heads} heads × {a.hidden // a.heads}" if a.heads and a.hidden else "heads unknown"
        return f"hidden {a.hidden}, {heads}"

    if src.hidden != tgt.hidden:
        raise MamError(f"hidden sizes differ: source {src_label} has {shape(src)}, target {tgt_label} has "
                       f"{shape(tgt)}; attention merging needs the same width")
    if src.heads and tgt.heads and src.heads != tgt.heads:
        return [f"head layouts differ: source {src_label} has {shape(src)}, target {tgt_label} has {shape(tgt)}; "
                "merged element-wise all the same (equal width is all Eq. 1 needs)"]
    if not (src.heads and tgt.heads):
        who = src_label if not src.heads else tgt_label
        return [f"head layout not checked: {who} does not state its number of heads"]
    return []
