"""Whisper decoding for evaluation: an exact greedy loop, and a fast mode that is not exact.

``generate()`` with greedy search spends most of a 4-layer decoder's time in per-token Python (logits
processors, stopping criteria, cache objects, mask building): on 2 CPU cores it costs about as much as the
encoder (benchmarks/whisper_bench.py). The exact path runs the checkpoint's own encoder module unchanged (so
merge hooks and the sweep's prefix cache see it), then a plain greedy loop over the same decoder weights with a
preallocated key/value cache and the cross-attention keys/values computed once. It applies what ``generate``
applies for Whisper without timestamps — the decoder prompt, ``suppress_tokens`` at every step and
``begin_suppress_tokens`` at the first — so it picks the same tokens; the floats differ only by kernel
rounding (SDPA here). Beam search, and multilingual prompts whose language is detected per clip, go to
``generate`` itself.

The fast mode (``fast=True``) is NOT exact: a copy of the model (:func:`quantized`) whose encoder runs its
Linear layers in int8 with a scale per activation row (:mod:`mamcli.int8`), and on CPUs that multiply bfloat16
natively its convolutions and self-attention in bf16 (:func:`encode_fast`). The same greedy loop then runs the
decoder's float32 layers; on such CPUs its cross-attention keys and values are computed and kept in bf16 (a
step's largest read), and the output projection ranks the vocabulary in int8 and scores its 16 best words again in
float32 (:class:`~mamcli.int8.ShortlistArgmax`): float32's word unless it ranked below 16th in int8, which
4,860 LJ steps never saw. Fast mode's hypotheses differ from the exact ones on some clips;
benchmarks/whisper_bench.py measures its speed and its WER against exact mode. The copy is rebuilt whenever the
model's weights change (a sweep's merge points write them in place), and is built without the model's hooks, so
a sweep's prefix cache does not replay into it. Encoding less than the 30-s window (whisper.cpp's ``audio_ctx``)
was measured and rejected: cut to the audio plus 1 s, 11 of 24 LJ clips changed, 5 into loops to the token bound;
cut to its first 15 s, no clip looped but WER moved by 0.3 pp on 337 held-out LJ clips, as much as the merges mam
measures.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from typing import Any

import torch
import torch.nn.functional as F

from mamcli.errors import MamError
from mamcli.int8 import Int8Linear, ShortlistArgmax, stack_linears

# The encoder runs on the 30-s window whatever the clip, so its products are large at any batch size; two clips
# at a time keep its activations in cache: 16 LJ clips in 3.55 s against 4.0-4.1 s as one batch of 8 (2 threads,
# quiet machine), the same floats bit for bit.
ENCODER_ROWS = 2
# Fast mode's next word: the int8 projection's best this many, scored again in float32 (float32's word ranked
# first in int8 at 98 % of 4,860 LJ steps, never below third).
SHORTLIST = 16


def generate(am: Any, inputs: dict[str, torch.Tensor], prompt: list[int | None], fast: bool = False,
             **kwargs: Any) -> torch.Tensor:
    """New token ids (batch, at most ``max_new_tokens``), the pad token after end-of-text: what
    ``am.model.generate(**inputs, **kwargs)`` returns for Whisper without timestamps, and a drop-in for it.

    ``prompt``: the task's decoder prompt (``Seq2Seq.prompt``: it already holds what ``task``, ``language`` and
    ``return_timestamps=False`` ask for; None where the language is detected per clip). ``kwargs``: generate's.
    Beam search, sampling or language detection go to ``generate`` itself. ``fast``: an int8 encoder and a float32
    decoder whose words int8 shortlists (the module's docstring); not exact."""
    greedy_ok = kwargs.get("num_beams", 1) == 1 and not kwargs.get("do_sample") and None not in prompt
    if fast:
        check_fast(greedy_ok, am.model.device.type)
    if not greedy_ok:
        return am.model.generate(**inputs, **kwargs)
    model = quantized(am.model) if fast else am.model
    hidden = (encode_fast if fast else encode)(model, inputs["input_features"])
    return greedy(model, hidden, [int(t) for t in prompt if t is not None], int(kwargs.get("max_new_tokens")
                  or am.model.config.max_target_positions - len(prompt)))


def check_fast(greedy: bool = True, device: str = "cpu") -> None:
    """Refuse what fast mode cannot do: beam search, sampling or a language detected per clip (``greedy`` False),
    or a device other than the CPU. :func:`generate` asks, and the task asks as soon as it knows (the options
    before the model loads, the prompt and device after), so the command answers before reading any audio."""
    if not greedy:
        raise MamError("--fast decodes greedily with a known decoder prompt: leave --beams out, and give --language "
                       "to a multilingual model")
    if device != "cpu":
        raise MamError("--fast (int8 dynamic quantisation) runs on CPU only; leave it out on a GPU")


def encode(model: Any, features: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden states, ``ENCODER_ROWS`` clips at a time. A module someone watches (a sweep's
    prefix cache records or replays whole batches through hooks and patched ``forward``s) sees the batch whole."""
    enc = model.get_encoder()
    watched = any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in enc.modules())
    if watched or features.shape[0] <= ENCODER_ROWS:
        return enc(features).last_hidden_state
    return torch.cat([enc(part).last_hidden_state for part in features.split(ENCODER_ROWS)])


def bf16_native() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). Elsewhere oneDNN emulates bf16 products,
    slower than float32, so fast mode keeps float32 convolutions and attention there."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def encode_fast(model: Any, features: torch.Tensor) -> torch.Tensor:
    """Fast mode's encoder, NOT exact, on :func:`quantized`'s copy: the encoder's forward written out
    (convolutions, positions, pre-norm layers, final norm) over its int8 layers, the stacked ``qkv`` product, and
    on CPUs that multiply bfloat16 natively bf16 convolutions and self-attention (:func:`_self_attend`).

    One clip at a time (0.115-0.126 s a clip against 0.145-0.148 two at a time, 8 clips, 2 threads), and with n
    threads up to n clips at once, each on its share of the threads (one, with as many clips as threads): a clip's
    many small passes (scaling, quantising, softmax, norms) then pay no hand-over between threads. 60 LJ clips in
    6.7-7.3 s against 7.3-7.7 with two threads on each clip (four alternating rounds, in-process), each clip's
    states the same bit for bit (tested)."""
    parts = features.split(1)
    threads = torch.get_num_threads()
    lanes = min(threads, len(parts))
    if lanes < 2:
        return torch.cat([_encode_clip(model, part) for part in parts])

    def clip(part: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # grad mode is per thread
            return _encode_clip(model, part)

    torch.set_num_threads(threads // lanes)  # torch's setting is global: it holds for every lane
    try:
        with ThreadPoolExecutor(lanes) as pool:
            return torch.cat(list(pool.map(clip, parts)))  # in the clips' order
    finally:
        torch.set_num_threads(threads)


def _encode_clip(model: Any, features: torch.Tensor) -> torch.Tensor:
    """:func:`encode_fast` of one clip, (1, mel bins, frames)."""
    enc = model.get_encoder()
    dtype = enc.conv1.weight.dtype  # bfloat16 where the CPU multiplies it natively (quantized)
    x = F.gelu(enc.conv2(F.gelu(enc.conv1(features.to(dtype))))).float().transpose(1, 2) + enc.embed_positions.weight
    for layer in enc.layers:
        x = x + _self_attend(layer.self_attn, layer.self_attn_layer_norm(x), dtype)
        x = x + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))
    return enc.layer_norm(x)


def _self_attend(attn: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whisper's encoder self-attention (no mask) from the stacked ``qkv`` product. In bfloat16: two products per
    clip and head (scores rounded to bf16, softmax computed in float32 inside). SDPA's CPU kernel gains nothing
    from bf16 (about 150 GFLOP/s either way on AVX512-BF16); plain bf16 products of these shapes run at 360-425,
    so a layer's attention for two clips on the 30-s window takes 31 ms against SDPA's 43 (2 threads). In
    float32: SDPA."""
    b, n, width = x.shape
    q, k, v = attn.qkv(x).split(width, dim=-1)
    q, k, v = (_heads(t.to(dtype), attn.num_heads) for t in (q * attn.scaling, k, v))
    if dtype == torch.float32:
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2)
    else:
        out = x.new_empty(b, n, attn.num_heads, width // attn.num_heads, dtype=dtype)
        for i in range(b):
            for h in range(attn.num_heads):
                out[i, :, h] = torch.softmax(q[i, h] @ k[i, h].T, dim=-1) @ v[i, h]
    return attn.out_proj(out.reshape(x.shape).float())


def describe(fast: bool) -> dict[str, Any]:
    """The decoding engine for a report: whether its hypotheses are exact (what ``generate()`` gives) or not."""
    if fast:
        bf16 = bf16_native()
        kernel = "torch.ao" if _ao_int8() else "mamcli.int8"
        return {"engine": "fast", "exact": False, "bfloat16": bf16,
                "what": "encoder: int8 Linear layers (a scale per activation row and per weight row)" +
                        (", convolutions and self-attention in bfloat16" if bf16 else "") +
                        "; decoder: float32 layers" +
                        (", cross-attention keys and values in bfloat16" if bf16 else "") +
                        f", next word ranked in int8 ({kernel}) and its {SHORTLIST} best scored again in float32; "
                        "hypotheses differ from exact on some clips"}
    return {"engine": "exact", "exact": True,
            "what": "the checkpoint's encoder, then greedy decoding with a preallocated key/value cache "
                    "(beam search and language detection: generate())"}


# the model (weakly: a freed model's address may be reused), its weights' fingerprint, its int8 copy
_QUANTIZED: list[tuple[weakref.ref[Any], tuple[tuple[int, int], ...], Any]] = []


def _fingerprint(model: Any) -> tuple[tuple[int, int], ...]:
    """Storage and version counter of every parameter: an in-place write (``copy_``) or a swap changes it."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def quantized(model: Any) -> Any:
    """The fast copy of ``model``, cached until its weights change: the encoder's Linear layers as
    :class:`~mamcli.int8.Int8Linear` (each layer's query, key and value stacked into one, ``qkv``) and, on a CPU
    that multiplies bfloat16 natively, its convolutions in bf16 and each decoder layer's cross-attention keys and
    values as one bf16 product (``kv``); the output projection as a :class:`~mamcli.int8.ShortlistArgmax`. The
    decoder's other layers stay float32: int8 ones (torch.ao, one activation scale per step) changed 18 of 60 LJ
    hypotheses against 4 (the same fast encoder states), because a step's word turns on small differences.

    The copy drops forward hooks and patched ``forward`` methods (a sweep's prefix cache), so it always computes."""
    key = _fingerprint(model)
    if _QUANTIZED and _QUANTIZED[0][0]() is model and _QUANTIZED[0][1] == key:
        return _QUANTIZED[0][2]
    copy = deepcopy(model)
    for m in copy.modules():
        m.__dict__.pop("forward", None)
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    enc = copy.get_encoder()  # runs through encode_fast only: its query, key and value are ``qkv`` alone
    for layer in enc.layers:
        attn = layer.self_attn
        attn.qkv = Int8Linear.stacked([attn.q_proj, attn.k_proj, attn.v_proj])
        del attn.q_proj, attn.k_proj, attn.v_proj
    _to_int8(enc)
    if bf16_native():
        enc.conv1.bfloat16()
        enc.conv2.bfloat16()
        for layer in copy.get_decoder().layers:  # read by _cross only
            attn = layer.encoder_attn
            attn.kv = stack_linears([attn.k_proj, attn.v_proj]).bfloat16()
            del attn.k_proj, attn.v_proj
    int8 = _ao_int8() or Int8Linear.of
    copy.proj_out = ShortlistArgmax(copy.proj_out, int8(copy.proj_out), SHORTLIST)
    _QUANTIZED[:] = [(weakref.ref(model), key, copy)]  # one model at a time: a sweep's earlier points are done
    return copy


def _to_int8(module: torch.nn.Module) -> None:
    """Every ``torch.nn.Linear`` inside ``module`` replaced by its :class:`~mamcli.int8.Int8Linear`."""
    for m in list(module.modules()):
        for name, child in list(m.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(m, name, Int8Linear.of(child))


def _ao_int8() -> Callable[[torch.nn.Linear], torch.nn.Module] | None:
    """torch.ao's dynamic int8 version of a Linear layer (a scale per weight row, one per input), or None from a
    torch that has dropped torch.ao's quantisation (torch deprecates it); :class:`~mamcli.int8.Int8Linear` then
    ranks instead. At the output projection's few rows per step fbgemm's kernel is the faster: 0.4-0.6 ms
    against 0.9-2.7 for ``torch._int_mm`` and 3-6 in float32 (1-8 rows, 2 threads)."""
    try:
        with warnings.catch_warnings():  # torch.ao's deprecation notice, on every run, is not the user's to act on
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        return None

    def int8(linear: torch.nn.Linear) -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                    dtype=torch.qint8)[0]
    return int8


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, length, width) → (batch, heads, length, width / heads)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _cross(attn: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's cross-attention keys and values, (batch, heads, frames, width / heads), contiguous (the
    products would otherwise copy them, a step's bulk, every step). Fast mode's copy on a bf16 CPU has them as one
    bf16 product, ``kv``: half the bytes to read at every step."""
    kv = getattr(attn, "kv", None)
    if kv is None:
        k, v = attn.k_proj(hidden), attn.v_proj(hidden)
    else:
        k, v = kv(hidden.to(kv.weight.dtype)).split(hidden.shape[-1], dim=-1)
    return _heads(k, attn.num_heads).contiguous(), _heads(v, attn.num_heads).contiguous()


def _attend(attn: Any, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Whisper attention with given keys/values: the query is scaled before the product, as the model does.
    One query per row: two batched products (SDPA's CPU kernel is 3× slower at this shape), else SDPA. Keys and
    values in bf16 (fast mode's cross-attention): the products in bf16, the softmax in float32."""
    q = _heads(attn.q_proj(x) * attn.scaling, attn.num_heads)
    if k.dtype != q.dtype:
        out = (torch.softmax((q.to(k.dtype) @ k.transpose(-1, -2)).float(), dim=-1).to(v.dtype) @ v).float()
    elif x.shape[1] == 1:
        out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)
    return attn.out_proj(out.transpose(1, 2).reshape(x.shape))


@torch.inference_mode()
def greedy(model: Any, hidden: torch.Tensor, prompt: list[int], max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding from encoder states: the prompt, then one token per step until every row has ended or
    ``max_new_tokens`` new tokens; logits processed as ``generate`` does for Whisper without timestamps.

    A row that has ended leaves the batch (its caches are dropped), so the rest of a batch no longer pays for it;
    rows never interact, so what remains computes the same tokens."""
    gen = model.generation_config
    dec = model.get_decoder()
    eos = gen.eos_token_id[0] if isinstance(gen.eos_token_id, list) else gen.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else eos
    batch, total = hidden.shape[0], len(prompt) + max_new_tokens
    heads, width = dec.layers[0].self_attn.num_heads, hidden.shape[-1]
    cross = [_cross(layer.encoder_attn, hidden) for layer in dec.layers]
    cache = hidden.new_empty(len(dec.layers), 2, batch, heads, total, width // heads)
    vocab = model.proj_out.out_features
    suppress = _mask(gen.suppress_tokens, vocab, hidden.device)
    begin = suppress | _mask(gen.begin_suppress_tokens, vocab, hidden.device)
    seqs = torch.full((batch, total), pad, dtype=torch.long, device=hidden.device)
    seqs[:, :len(prompt)] = torch.tensor(prompt)
    rows = torch.arange(batch, device=hidden.device)  # the rows still decoding, as indices into seqs
    start, end = 0, len(prompt)
    for step in range(max_new_tokens):
        x = dec.embed_tokens(seqs[rows, start:end]) + dec.embed_positions.weight[start:end]
        for i, layer in enumerate(dec.layers):
            h = layer.self_attn_layer_norm(x)
            cache[i, 0, :, :, start:end] = _heads(layer.self_attn.k_proj(h), heads)
            cache[i, 1, :, :, start:end] = _heads(layer.self_attn.v_proj(h), heads)
            x = x + _attend(layer.self_attn, h, cache[i, 0, :, :, :end], cache[i, 1, :, :, :end], end - start > 1)
            x = x + _attend(layer.encoder_attn, layer.encoder_attn_layer_norm(x), *cross[i], False)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))
        token = _next_word(model.proj_out, dec.layer_norm(x[:, -1]), begin if step == 0 else suppress)
        seqs[rows, end] = token
        start, end = end, end + 1
        going = token != eos
        if not bool(going.all()):
            if not bool(going.any()):
                break
            rows, cache = rows[going], cache[:, :, going]
            cross = [(k[going], v[going]) for k, v in cross]
    return _as_generate(seqs[:, len(prompt):end], eos, pad)


def _next_word(proj: Any, x: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """Greedy's word for each row of ``x``: the best of ``proj(x)`` outside ``banned``. Fast mode's projection
    (:class:`~mamcli.int8.ShortlistArgmax`) finds it itself."""
    if isinstance(proj, ShortlistArgmax):
        return proj(x, banned)
    return _logits(proj, x).masked_fill(banned, -math.inf).argmax(-1)


def _logits(proj: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``proj(x)`` for the output projection, a few rows against the whole vocabulary (Whisper's is 51,864 × 384,
    80 MB in float32, read once per step). MKL's kernel for ``F.linear`` at this shape runs at a third of the
    memory's speed; ``W @ x.T`` runs near it from two rows up (one thread, a batch of 8: 9.4 ms against 14.9 ms),
    so a lone row is paired with itself."""
    pair = x if x.shape[0] > 1 else x.repeat(2, 1)
    out = (proj.weight @ pair.T).T[:x.shape[0]]
    return out if proj.bias is None else out + proj.bias


def _as_generate(seqs: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """generate()'s short-form layout: each row without its end-of-text token, padded to the longest row."""
    ended = seqs == eos
    lengths = torch.where(ended.any(-1), ended.int().argmax(-1), seqs.shape[1])
    seqs = seqs.masked_fill(torch.arange(seqs.shape[1], device=seqs.device) >= lengths[:, None], pad)
    return seqs[:, :int(lengths.max())]


def _mask(tokens: list[int] | None, vocab: int, device: torch.device) -> torch.Tensor:
    """A (vocab,) boolean mask of ``tokens``."""
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    if tokens:
        mask[torch.tensor([t for t in tokens if t < vocab], dtype=torch.long)] = True
    return mask
