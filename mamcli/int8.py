"""Linear layers in int8 with a scale per activation row (the products of mam's fast Whisper encoder), and a
float32 argmax over a large output layer whose candidates an int8 product picks (its decoder's next word).

torch.ao's dynamic quantisation (``quantize_dynamic``) gives a whole input one activation scale. Whisper's encoder
input is a 30-s window: a clip's speech rows and its padding rows (and a batch partner's rows) then share one scale
set by the loudest of them, and the quiet rows lose most of their bits. Here each row gets its own scale (its
largest magnitude / 127) and each weight row its own, so on 4 LJ clips whisper-tiny.en's encoder states differ
from float32 by rms 0.031 against torch.ao's 0.144 — and a row's result does not depend on what it was batched
with. The products are ``torch._int_mm`` (int8 × int8 → exact int32 sums, oneDNN's VNNI kernel on CPU), the same
private operator torchao's int8 paths call; the rest is plain tensor code, not torch.ao, which torch deprecates.
"""

from __future__ import annotations

import math

import torch

_TINY = torch.finfo(torch.float32).tiny  # an all-zero row or weight row gets this scale instead of 0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (rows, width) as int8 and its per-row scales (rows, 1): ``x ≈ q * scale``, symmetric, rounded.
    amax and amin, not ``abs().amax()`` or ``aminmax`` (a 3000 × 1536 input: 0.2 ms against 0.4 and 5 ms)."""
    scale = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_()).clamp_min_(_TINY).div_(127)
    return x.div(scale).round_().to(torch.int8), scale


def stack_linears(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One float32 layer whose outputs are those of ``linears`` side by side (a missing bias counts as zeros):
    layers that read the same input then take one product."""
    weight = torch.cat([lin.weight.detach().float() for lin in linears])
    bias = torch.cat([lin.bias.detach().float() if lin.bias is not None else weight.new_zeros(lin.out_features)
                      for lin in linears])
    out = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out


class Int8Linear(torch.nn.Module):
    """``y = x Wᵀ + b`` with W quantised once per output channel and x per row at every call (see the module).
    Inputs and outputs are float32; several Linear layers that read the same input can be stacked into one
    (:meth:`stacked`): one quantisation of the input, one product, the same numbers as each alone."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        q, scale = quantize_rows(weight.detach().float())  # a weight row is an output channel
        self.register_buffer("scale", scale[:, 0])  # (out,)
        self.register_buffer("weight_t", q.T.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    @classmethod
    def of(cls, linear: torch.nn.Linear) -> Int8Linear:
        """The int8 version of ``linear``."""
        return cls(linear.weight, linear.bias)

    @classmethod
    def stacked(cls, linears: list[torch.nn.Linear]) -> Int8Linear:
        """:func:`stack_linears` in int8: per-channel weight scales and per-row input scales make each part equal
        to that layer alone."""
        return cls.of(stack_linears(linears))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = quantize_rows(x.reshape(-1, self.in_features))
        # the int32 sums to float first, then scaled in place: int32 × float32 promotes 3× slower than this
        y = torch._int_mm(q, self.weight_t).float().mul_(self.scale).mul_(s)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight as it is used, (out, in) float32: what a test compares with the original."""
        return self.weight_t.T.float() * self.scale[:, None]


class ShortlistArgmax(torch.nn.Module):
    """The best allowed output of a float32 Linear layer, per row, with an int8 product for the search: ``ranker``
    (an int8 version of ``linear``) ranks every output, and its ``k`` best are scored again in float32, so the
    pick is float32's own unless float32's best ranked below ``k`` in int8. Made for Whisper's output projection
    (51,864 words × 384, 80 MB in float32, read once per decoding step): on 60 LJ clips (4,860 steps of
    whisper-tiny.en) an int8 projection alone picked another word than float32 at 2 % of steps, and float32's
    word never ranked below third in int8."""

    def __init__(self, linear: torch.nn.Linear, ranker: torch.nn.Module, k: int) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        self.ranker, self.k = ranker, k
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
        """Per row of ``x`` (rows, in), the index of the largest output outside ``banned`` (out,) boolean."""
        rough = self.ranker(x).masked_fill_(banned, -math.inf)
        top = rough.topk(min(self.k, self.out_features), dim=-1).indices  # (rows, k)
        exact = torch.einsum("rkd,rd->rk", self.weight[top], x)
        if self.bias is not None:
            exact += self.bias[top]
        exact.masked_fill_(banned[top], -math.inf)  # fewer than k allowed outputs: a banned one stays out
        return top.gather(1, exact.argmax(-1, keepdim=True))[:, 0]
