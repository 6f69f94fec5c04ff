"""BEATs (Chen et al., 2022), the paper's audio-event model, natively in PyTorch.

Written from the paper and the public model description so that official checkpoints
(``{"cfg": {...}, "model": state_dict}``, e.g. BEATs_iter3_plus_AS2M.pt) load by their own key
names: 128-bin Kaldi-style fbank at 16 kHz normalised with the release's constants, a 16×16 conv
patch embedding, a Transformer encoder with a weight-normed positional convolution, bucketed
relative position bias (shared by all layers) with gated relative position, post-norm (deep norm)
or pre-norm layers, and the optional classifier ("predictor") of fine-tuned checkpoints.
``BeatsModel`` offers the interface the rest of mam uses for transformers models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FBANK_MEAN = 15.41663  # the release's normalisation constants
FBANK_STD = 6.55582
RATE = 16000


@dataclass
class BeatsConfig:
    """The official ``cfg`` keys and defaults."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False
    predictor_dropout: float = 0.1
    predictor_class: int = 527
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept for the round trip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BeatsConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "extra"}, **d["extra"]}


# ---- features -------------------------------------------------------------------------------------

def _kaldi_mel_banks(n_mels: int, n_fft: int, rate: int, low: float = 20.0) -> torch.Tensor:
    """Kaldi's triangular filters, equally spaced on the 1127·ln(1 + f/700) scale; (n_mels, n_fft/2 + 1)."""
    def mel(f: torch.Tensor) -> torch.Tensor:
        return 1127.0 * torch.log(1.0 + f / 700.0)

    high = rate / 2
    m_low, m_high = mel(torch.tensor(low, dtype=torch.float64)), mel(torch.tensor(high, dtype=torch.float64))
    delta = (m_high - m_low) / (n_mels + 1)
    b = torch.arange(n_mels, dtype=torch.float64)[:, None]
    left, center, right = m_low + b * delta, m_low + (b + 1) * delta, m_low + (b + 2) * delta
    m = mel(rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float64))[None, :]
    banks = torch.clamp(torch.minimum((m - left) / (center - left), (right - m) / (right - center)), min=0.0)
    return F.pad(banks, (0, 1)).float()  # the Nyquist bin gets no weight


def kaldi_fbank(wave: torch.Tensor, n_mels: int = 128, rate: int = RATE, dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
    """Log mel filter bank as Kaldi computes it (25 ms povey windows every 10 ms, pre-emphasis 0.97,
    DC removal, 512-point power spectrum, no dither) of a float waveform in [-1, 1]; (frames, n_mels).
    float32 like torchaudio's Kaldi path; float64 to check the formula exactly."""
    x = wave.to(dtype) * 2**15  # Kaldi works on 16-bit sample values
    length, shift, n_fft = int(0.025 * rate), int(0.010 * rate), 512
    if x.numel() < length:
        raise ValueError(f"audio shorter than one 25 ms frame ({x.numel()} samples)")
    frames = x.unfold(0, length, shift)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * previous
    n = torch.arange(length, dtype=torch.float64)
    window = (0.5 - 0.5 * torch.cos(2 * math.pi * n / (length - 1))).pow(0.85).to(dtype)
    power = torch.fft.rfft(frames * window, n=n_fft).abs().pow(2)
    energies = power @ _kaldi_mel_banks(n_mels, n_fft, rate).to(dtype).T
    return torch.log(torch.clamp(energies, min=torch.finfo(torch.float32).eps)).float()


class BeatsFeatures:
    """Feature extractor in the transformers calling convention: fbank, normalised, padded, with a mask."""

    sampling_rate = RATE
    return_attention_mask = True

    def __call__(self, raw_speech: list[np.ndarray], sampling_rate: int = RATE, return_tensors: str = "pt",
                 padding: bool = True, return_attention_mask: bool = True) -> dict[str, torch.Tensor]:
        if sampling_rate != RATE:
            raise ValueError(f"BEATs takes {RATE} Hz audio, got {sampling_rate}")
        feats = [(kaldi_fbank(torch.as_tensor(a)) - FBANK_MEAN) / (2 * FBANK_STD) for a in raw_speech]
        longest = max(f.shape[0] for f in feats)
        values = torch.zeros(len(feats), longest, feats[0].shape[1])
        mask = torch.zeros(len(feats), longest, dtype=torch.long)
        for i, f in enumerate(feats):
            values[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = 1
        return {"input_values": values, "attention_mask": mask}


# ---- the network (parameter names follow the official checkpoints) --------------------------------

class _WeightNormConv(nn.Module):
    """Conv1d with weight normalisation over dim 2, stored as weight_g / weight_v like the release."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.randn(dim, dim // groups, kernel) * math.sqrt(4 / (kernel * dim)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        y = F.conv1d(x, weight, self.bias, padding=self.kernel // 2, groups=self.groups)
        return y[:, :, :-1] if self.kernel % 2 == 0 else y  # "same" padding for even kernels


class _PosConv(nn.Module):
    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        self.add_module("0", _WeightNormConv(cfg.encoder_embed_dim, cfg.conv_pos, cfg.conv_pos_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(getattr(self, "0")(x))


class _Attention(nn.Module):
    def __init__(self, cfg: BeatsConfig, relative_bias: nn.Embedding | None) -> None:
        super().__init__()
        d, h = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.heads, self.head_dim = h, d // h
        self.scaling = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        if relative_bias is not None:
            self.relative_attention_bias = relative_bias
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, h, 1, 1))
        self.dropout = cfg.attention_dropout

    def _buckets(self, rel: torch.Tensor) -> torch.Tensor:
        half = self.num_buckets // 2
        buckets = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(self.max_distance / exact) * (half - exact)).long()
        large = torch.clamp(large, max=half - 1)
        return buckets + torch.where(rel < exact, rel, large)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(length, device=device)
        return self.relative_attention_bias(self._buckets(pos[None, :] - pos[:, None])).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None, pos_bias: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, d = x.shape
        if pos_bias is None and hasattr(self, "relative_attention_bias"):
            pos_bias = self.position_bias(t, x.device)  # (heads, t, t), shared by the later layers
        alpha = 32.0  # the release scales scores down and back up for numerical range
        q = (self.q_proj(x) * self.scaling / alpha).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2)
        scores = (scores - scores.amax(dim=-1, keepdim=True)) * alpha
        if pad is not None:
            scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        if pos_bias is not None:
            bias = pos_bias[None]
            if self.gru_rel_pos:
                query = q * alpha / self.scaling
                gates = torch.sigmoid(self.grep_linear(query).view(b, self.heads, t, 2, 4).sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
            scores = scores + bias
        probs = F.dropout(scores.softmax(-1), self.dropout, self.training)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(b, t, d)), pos_bias


class _Layer(nn.Module):
    def __init__(self, cfg: BeatsConfig, relative_bias: nn.Embedding | None) -> None:
        super().__init__()
        d = cfg.encoder_embed_dim
        self.self_attn = _Attention(cfg, relative_bias)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, cfg.encoder_ffn_embed_dim), nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.pre_norm = cfg.layer_norm_first
        self.alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0
        self.dropout, self.act_dropout = cfg.dropout, cfg.activation_dropout

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(F.gelu(self.fc1(x)), self.act_dropout, self.training)
        return F.dropout(self.fc2(x), self.dropout, self.training)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None, pos_bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pre_norm:
            a, pos_bias = self.self_attn(self.self_attn_layer_norm(x), pad, pos_bias)
            x = x + F.dropout(a, self.dropout, self.training)
            return x + self._ffn(self.final_layer_norm(x)), pos_bias
        a, pos_bias = self.self_attn(x, pad, pos_bias)
        x = self.self_attn_layer_norm(x * self.alpha + F.dropout(a, self.dropout, self.training))
        return self.final_layer_norm(x * self.alpha + self._ffn(x)), pos_bias


class _Encoder(nn.Module):
    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        self.pos_conv = _PosConv(cfg)
        shared = nn.Embedding(cfg.num_buckets, cfg.encoder_attention_heads) if cfg.relative_position_embedding else None
        self.layers = nn.ModuleList([_Layer(cfg, shared) for _ in range(cfg.encoder_layers)])
        self.layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)
        self.pre_norm, self.dropout = cfg.layer_norm_first, cfg.dropout


class BeatsModel(nn.Module):
    """BEATs with the calling convention mam uses for transformers audio models.

    ``forward(input_values=fbank, attention_mask=…, labels=…, output_hidden_states=…)`` returns
    ``logits`` (the predictor's frame logits averaged over valid frames, before the release's
    sigmoid), ``hidden_states`` (the encoder input, then every layer's output), ``loss``
    (cross-entropy with ``labels``) and ``last_hidden_state``.
    """

    def __init__(self, cfg: BeatsConfig, id2label: dict[int, str] | None = None) -> None:
        super().__init__()
        if cfg.activation_fn != "gelu":
            raise ValueError(f"BEATs cfg asks for activation {cfg.activation_fn!r}; mam implements the released gelu")
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, cfg.input_patch_size, cfg.input_patch_size,
                                         bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        if cfg.embed_dim != cfg.encoder_embed_dim:
            self.post_extract_proj = nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
        self.encoder = _Encoder(cfg)
        if cfg.finetuned_model:
            self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)
        labels = id2label or {i: f"LABEL_{i}" for i in range(cfg.predictor_class if cfg.finetuned_model else 0)}
        self.config = SimpleNamespace(
            model_type="beats", architectures=["BeatsForAudioClassification" if cfg.finetuned_model else "BeatsModel"],
            id2label=labels, label2id={v: k for k, v in labels.items()}, num_labels=len(labels),
            to_dict=lambda: {"model_type": "beats", **cfg.to_dict()})

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def _patch_mask(self, mask: torch.Tensor, positions: int) -> torch.Tensor:
        """Padding per patch position (True = padding): a position counts only if its whole time patch lies
        inside the clip, as when the clip runs alone. (The release maps frames onto positions in
        contiguous chunks, which lets a partly padded time patch through in padded batches.)"""
        valid = self._get_feat_extract_output_lengths(mask.sum(-1))
        return torch.arange(positions, device=mask.device)[None, :] >= valid[:, None]

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool = False) -> SimpleNamespace:
        x = self.patch_embedding(input_values.unsqueeze(1))
        x = self.layer_norm(x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2))
        pad = self._patch_mask(attention_mask, x.shape[1]) if attention_mask is not None else None
        if hasattr(self, "post_extract_proj"):
            x = self.post_extract_proj(x)
        x = F.dropout(x, self.cfg.dropout_input, self.training)
        enc = self.encoder
        if pad is not None:
            x = x.masked_fill(pad[..., None], 0.0)
        x = x + enc.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not enc.pre_norm:
            x = enc.layer_norm(x)
        x = F.dropout(x, enc.dropout, self.training)
        hidden = [x]
        pos_bias = None
        for layer in enc.layers:
            if not self.training or np.random.random() > self.cfg.encoder_layerdrop:
                x, pos_bias = layer(x, pad, pos_bias)
            hidden.append(x)
        if enc.pre_norm:
            x = enc.layer_norm(x)
            hidden[-1] = x
        out = SimpleNamespace(last_hidden_state=x, hidden_states=tuple(hidden) if output_hidden_states else None,
                              logits=None, loss=None)
        if hasattr(self, "predictor"):
            frame_logits = self.predictor(F.dropout(x, self.cfg.predictor_dropout, self.training))
            if pad is not None and pad.any():
                valid = (~pad).unsqueeze(-1).to(frame_logits.dtype)
                out.logits = (frame_logits * valid).sum(1) / valid.sum(1).clamp(min=1)
            else:
                out.logits = frame_logits.mean(1)
            if labels is not None:
                out.loss = F.cross_entropy(out.logits, labels)
        return out

    def _get_feat_extract_output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Valid patch positions for a number of valid fbank frames (time-major, 8 per 16 frames at 128 bins)."""
        per_step = 128 // self.cfg.input_patch_size
        return (frames // self.cfg.input_patch_size) * per_step


def new_head(model: BeatsModel, labels: list[str]) -> None:
    """Replace (or add) the classifier with one sized to ``labels`` (fine-tuning on a new dataset)."""
    model.cfg.finetuned_model = True
    model.cfg.predictor_class = len(labels)
    model.predictor = nn.Linear(model.cfg.encoder_embed_dim, len(labels)).to(model.device)
    id2label = dict(enumerate(labels))
    model.config.id2label, model.config.label2id = id2label, {v: k for k, v in id2label.items()}
    model.config.num_labels = len(labels)
    model.config.architectures = ["BeatsForAudioClassification"]


def load_beats(cfg: dict[str, Any], state: dict[str, torch.Tensor], label_dict: dict[str, Any] | None = None
               ) -> BeatsModel:
    """Build from an official checkpoint's cfg and state dict (strict: every key must match)."""
    config = BeatsConfig.from_dict(cfg)
    id2label = None
    if label_dict:  # fine-tuned releases map label ids (e.g. AudioSet mids) to class indices
        id2label = {int(v): str(k) for k, v in label_dict.items()}
    model = BeatsModel(config, id2label)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"BEATs checkpoint does not match its cfg: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def official_state(model: BeatsModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(path: Any, model: BeatsModel, state: dict[str, torch.Tensor], extras: dict[str, Any]) -> None:
    """Write the official layout; a classifier's labels go into ``label_dict`` (label → index)."""
    entry: dict[str, Any] = {**extras, "cfg": model.cfg.to_dict(), "model": {k: v.detach().cpu() for k, v in
                                                                          state.items()}}
    if hasattr(model, "predictor"):
        entry["label_dict"] = {str(v): int(k) for k, v in model.config.id2label.items()}
    torch.save(entry, path)
