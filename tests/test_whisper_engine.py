"""The Whisper engine: its exact greedy loop gives generate()'s token ids (tiny random Whisper and the real
whisper-tiny.en), also when rows end at different steps, stops at the token bound, hands beams to generate(); the
encoder runs two clips at a time unless someone watches it; the fast mode runs, says it is not exact, follows
weight changes, its encoder (int8, bfloat16 where the CPU has it) stays near the exact one, and its decoder picks
the exact loop's words from the same encoder states (float32 layers, where keys and values stay float32)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import SHARED
from mamcli import whisper_engine
from mamcli.checkpoint import resolve
from mamcli.data import iter_clips, load_dataset
from mamcli.errors import MamError
from mamcli.int8 import Int8Linear, ShortlistArgmax
from mamcli.models import load_audio_model

SHORT = ("LJ001-0008", "LJ002-0020", "LJ001-0006")  # 1.8 s, 1.5 s and 5.7 s of real speech


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_am(tiny):
    with resolve(str(tiny("whisper", hidden=32, layers=2, heads=4))) as ck:
        return load_audio_model(ck, "asr", "cpu")


def _noise(am, seconds):
    rng = np.random.default_rng(0)
    return am.inputs([rng.standard_normal(int(s * am.rate)).astype(np.float32) * 0.1 for s in seconds])


def _generate(am, inputs, **kwargs):
    with torch.inference_mode():
        return am.model.generate(**inputs, do_sample=False, **kwargs)


def test_exact_greedy_equals_generate_and_stops_at_the_bound(tiny_am):
    inputs = _noise(tiny_am, [3.0, 1.0, 2.0])
    prompt = tiny_am.task.prompt
    assert prompt == [50257, 50362]  # start of transcript, no timestamps: English-only
    for bound in (1, 7, 25):
        ours = whisper_engine.generate(tiny_am, inputs, prompt, max_new_tokens=bound, num_beams=1)
        ref = _generate(tiny_am, inputs, max_new_tokens=bound, num_beams=1)
        assert ours.shape == ref.shape and torch.equal(ours, ref)
        assert ours.shape == (3, bound)  # a random decoder never says end-of-text: every row runs to the bound


def test_encoder_in_pairs_unless_watched(tiny_am):
    model = tiny_am.model
    features = _noise(tiny_am, [1.0, 2.0, 3.0, 1.5, 0.5])["input_features"]
    with torch.inference_mode():
        whole = model.get_encoder()(features).last_hidden_state
        seen: list[int] = []
        handle = model.get_encoder().layers[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
        try:
            watched = whisper_engine.encode(model, features)
        finally:
            handle.remove()
        assert seen == [5]  # a hook (a sweep's prefix cache) sees the batch whole
        pairs = whisper_engine.encode(model, features)
    assert torch.equal(watched, whole)
    assert pairs.shape == whole.shape and torch.allclose(pairs, whole, rtol=1e-5, atol=1e-6)


def test_beams_go_to_generate(tiny_am):
    inputs = _noise(tiny_am, [2.0, 1.0])
    ours = whisper_engine.generate(tiny_am, inputs, tiny_am.task.prompt, max_new_tokens=6, num_beams=3)
    ref = _generate(tiny_am, inputs, max_new_tokens=6, num_beams=3)
    assert torch.equal(ours, ref) and ours.shape == (2, 6)
    with pytest.raises(MamError, match="greedily"):
        whisper_engine.generate(tiny_am, inputs, tiny_am.task.prompt, fast=True, max_new_tokens=6, num_beams=3)


def test_fast_encoder_runs_a_clip_per_thread_and_gives_each_clip_its_own_numbers(tiny_am):
    """With n threads fast mode encodes up to n clips at once, each on its share of the threads: every clip's
    states are those of the same clip encoded alone, and torch's thread count is given back."""
    q = whisper_engine.quantized(tiny_am.model)
    features = _noise(tiny_am, [1.0, 2.0, 3.0, 1.5, 0.5])["input_features"]
    with torch.inference_mode():
        alone = [whisper_engine.encode_fast(q, f[None]) for f in features]
        lanes = {}
        try:
            for threads in (3, 7):  # 3 lanes of one thread; 5 lanes (one per clip) of one thread
                torch.set_num_threads(threads)
                lanes[threads] = whisper_engine.encode_fast(q, features)
                assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(1)
    for states in lanes.values():
        assert torch.equal(states, torch.cat(alone))


def test_exact_on_real_speech_equals_generate(real):
    with resolve(str(real("whisper-tiny.en"))) as ck:
        am = load_audio_model(ck, "asr", "cpu")
    ds = load_dataset(f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1")
    ds.items = [i for i in ds.items if i.id in SHORT]
    inputs = am.inputs([c.audio for c in iter_clips(ds, am.rate)])
    ours = whisper_engine.generate(am, inputs, am.task.prompt, max_new_tokens=40, num_beams=1)
    ref = _generate(am, inputs, max_new_tokens=40, num_beams=1)
    assert torch.equal(ours, ref)
    assert ours.shape[1] < 40  # real speech ends before the bound
    pad = am.model.generation_config.pad_token_id
    assert int((ours == pad).any(-1).sum()) == 2  # the short clips ended first: their rows left the batch
    texts = am.tokenizer.batch_decode(ours, skip_special_tokens=True)
    assert sum(len(t.split()) for t in texts) >= 4


def test_fast_mode_runs_is_not_exact_and_follows_weight_changes(tiny_am):
    assert whisper_engine.describe(fast=True)["exact"] is False
    assert whisper_engine.describe(fast=False)["exact"] is True
    inputs = _noise(tiny_am, [2.0, 1.0])
    out = whisper_engine.generate(tiny_am, inputs, tiny_am.task.prompt, fast=True, max_new_tokens=5, num_beams=1)
    assert out.shape == (2, 5) and out.dtype == torch.long
    q = whisper_engine.quantized(tiny_am.model)
    assert isinstance(q.model.encoder.layers[0].self_attn.qkv, Int8Linear)
    assert isinstance(q.model.encoder.layers[0].fc1, Int8Linear)
    assert type(q.model.decoder.layers[0].self_attn.q_proj) is torch.nn.Linear  # the decoder's layers: float32
    assert type(q.model.decoder.layers[0].fc1) is torch.nn.Linear
    assert isinstance(q.proj_out, ShortlistArgmax)
    assert isinstance(q.proj_out.ranker, torch.ao.nn.quantized.dynamic.Linear)
    assert whisper_engine.quantized(tiny_am.model) is q  # unchanged weights: the same copy
    param = tiny_am.model.model.encoder.layers[0].self_attn.q_proj.weight
    original = param.detach().clone()
    with torch.no_grad():
        param.mul_(2.0)  # what a sweep's merge point does: an in-place write
    try:
        q2 = whisper_engine.quantized(tiny_am.model)
        assert q2 is not q
        w = q2.model.encoder.layers[0].self_attn.qkv.dequantized()[:param.shape[0]]  # the query's rows come first
        assert torch.allclose(w, param.detach(), atol=float(param.detach().abs().max()) / 100)
    finally:
        with torch.no_grad():
            param.copy_(original)


def test_fast_mode_without_torch_ao_ranks_words_with_mamcli_int8(tiny_am, monkeypatch):
    """torch deprecates torch.ao's quantisation: on a torch without it, the output projection ranks in
    mamcli.int8."""
    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)  # ``from torch.ao.quantization import`` fails
    monkeypatch.setattr(whisper_engine, "_QUANTIZED", [])
    q = whisper_engine.quantized(tiny_am.model)
    assert isinstance(q.proj_out.ranker, Int8Linear)
    assert "ranked in int8 (mamcli.int8)" in whisper_engine.describe(fast=True)["what"]
    inputs = _noise(tiny_am, [2.0, 1.0])
    out = whisper_engine.generate(tiny_am, inputs, tiny_am.task.prompt, fast=True, max_new_tokens=5, num_beams=1)
    assert out.shape == (2, 5) and out.dtype == torch.long


@pytest.mark.parametrize("bf16", [True, False])
def test_fast_encoder_is_close_to_exact_and_each_clip_its_own(tiny_am, monkeypatch, bf16):
    """Both kernels of fast mode's encoder (bfloat16 where the CPU multiplies it natively, else float32 SDPA)
    stay near the exact encoder, and a clip's states do not depend on the clips beside it."""
    monkeypatch.setattr(whisper_engine, "bf16_native", lambda: bf16)
    monkeypatch.setattr(whisper_engine, "_QUANTIZED", [])  # a copy built under this CPU answer
    features = _noise(tiny_am, [1.0, 2.0, 3.0])["input_features"]
    with torch.inference_mode():
        exact = whisper_engine.encode(tiny_am.model, features)
        q = whisper_engine.quantized(tiny_am.model)
        assert q.model.encoder.conv1.weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
        fast = whisper_engine.encode_fast(q, features)
        alone = whisper_engine.encode_fast(q, features[1:2])
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    rel = float((fast - exact).norm() / exact.norm())
    assert 0 < rel < 0.01  # not exact, and close
    assert torch.equal(alone[0], fast[1])


@pytest.mark.parametrize("bf16", [True, False])
def test_fast_decoder_picks_the_exact_loops_words_from_the_same_states(tiny_am, monkeypatch, bf16):
    """From the same encoder states, fast mode's decoder (float32 layers, words ranked in int8 and re-scored in
    float32) picks the exact loop's words; bf16 cross-attention keys and values (where the CPU multiplies bf16
    natively) are the one difference, checked to stay near float32's."""
    monkeypatch.setattr(whisper_engine, "bf16_native", lambda: bf16)
    monkeypatch.setattr(whisper_engine, "_QUANTIZED", [])
    features = _noise(tiny_am, [1.0, 2.0, 3.0])["input_features"]
    prompt = tiny_am.task.prompt
    with torch.inference_mode():
        hidden = whisper_engine.encode(tiny_am.model, features)
        q = whisper_engine.quantized(tiny_am.model)
        attn = tiny_am.model.model.decoder.layers[0].encoder_attn
        k, v = whisper_engine._cross(q.model.decoder.layers[0].encoder_attn, hidden)
        k32, v32 = whisper_engine._cross(attn, hidden)
        exact = whisper_engine.greedy(tiny_am.model, hidden, prompt, 12)
        fast = whisper_engine.greedy(q, hidden, prompt, 12)
    assert k.dtype == v.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert torch.allclose(v.float(), v32, rtol=1e-2, atol=1e-2 * float(v32.abs().max()))
    if bf16:
        assert fast.shape == exact.shape
    else:
        assert torch.equal(k, k32)
        assert torch.equal(fast, exact)
