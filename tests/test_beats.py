"""BEATs: fbank against an independent computation, official-layout round trip, merge, forward, evaluate, fine-tune."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from conftest import ESC10_CLASSES, SHARED
from helpers import load_dir
from mamcli.beats import BeatsFeatures, kaldi_fbank, load_beats, official_state
from mamcli.checkpoint import resolve
from mamcli.models import load_audio_model

ESC10 = f"folders:{SHARED}/esc10/ESC-10"
QKV = ("q", "k", "v")
VIT = {"q": "query", "k": "key", "v": "value"}


def test_fbank_matches_an_independent_kaldi_computation():
    """transformers' numpy spectrogram with Kaldi's povey window, mel scale and options is the reference."""
    t = np.arange(16000) / 16000
    wave = (0.3 * np.sin(2 * math.pi * 440 * t) + 0.2 * np.sin(2 * math.pi * (200 + 3000 * t) * t)).astype(np.float32)
    exact = kaldi_fbank(torch.from_numpy(wave), dtype=torch.float64).numpy()
    ours = kaldi_fbank(torch.from_numpy(wave)).numpy()
    mel = mel_filter_bank(num_frequency_bins=257, num_mel_filters=128, min_frequency=20, max_frequency=8000,
                          sampling_rate=16000, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)
    ref = spectrogram(wave * 2**15, window_function(400, "povey", periodic=False), frame_length=400,
                      hop_length=160, fft_length=512, power=2.0, center=False, preemphasis=0.97, mel_filters=mel,
                      log_mel="log", mel_floor=1.192092955078125e-07, remove_dc_offset=True).T
    assert ours.shape == exact.shape == ref.shape == (98, 128)
    np.testing.assert_allclose(exact, ref, atol=1e-4, rtol=1e-5)  # the formula, to float64 noise
    # float32, as Kaldi and torchaudio compute it: its FFT rounding adds ~0.05 to each power bin
    # (peak energies reach ~1e10 here), so only bins well above that are compared tightly
    audible = ref > 3
    np.testing.assert_allclose(ours[audible], ref[audible], atol=1e-2)
    np.testing.assert_allclose(ours, ref, atol=0.15)
    feats = BeatsFeatures()([wave])
    np.testing.assert_allclose(feats["input_values"][0].numpy(), (ours - 15.41663) / (2 * 6.55582), atol=1e-6)


def test_official_layout_round_trip(tiny):
    path = tiny("beats-ft", layers=2)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"cfg", "model", "label_dict"}
    model = load_beats(saved["cfg"], saved["model"], saved["label_dict"])
    state = official_state(model)
    assert state.keys() == saved["model"].keys()
    assert all(torch.equal(state[k], saved["model"][k]) for k in state)
    assert "encoder.pos_conv.0.weight_g" in state and "encoder.layers.1.self_attn.grep_a" in state
    assert model.cfg.to_dict() == saved["cfg"]


def test_forward_shapes_and_padding(tiny):
    with resolve(str(tiny("beats-ft", layers=2))) as ck:
        am = load_audio_model(ck, "aec")
        waves = [np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1,
                 np.random.default_rng(1).standard_normal(24000).astype(np.float32) * 0.1]
        inputs = am.inputs(waves)
        with torch.no_grad():
            out = am.model(**inputs, output_hidden_states=True)
            alone = am.model(**am.inputs(waves[:1])).logits
    frames = inputs["input_values"].shape[1]
    assert out.logits.shape == (2, 10) and len(out.hidden_states) == 3
    assert out.hidden_states[2].shape == (2, (frames // 16) * 8, 32)
    assert torch.allclose(out.logits[0], alone[0], atol=1e-4)  # padding does not leak into the short clip


def test_merge_vit_into_beats_writes_official_layout(tiny, mam, tmp_path):
    src, tgt = tiny("vit", layers=2), tiny("beats-ft", layers=2)
    s = load_dir(src)
    t = torch.load(tgt, weights_only=True)
    r = mam("merge", src, tgt, "--lam", "0.1", "-o", tmp_path / "o", "-q", "--json")
    assert r.code == 0, r.err
    out = torch.load(tmp_path / "o" / "BEATs_tiny.pt", weights_only=True)
    assert out["cfg"] == t["cfg"] and out["label_dict"] == t["label_dict"]
    st = load_dir(tmp_path / "o")
    merged = set()
    for i in range(2):
        for p in QKV:
            name = f"encoder.layers.{i}.self_attn.{p}_proj.weight"
            sv = s[f"encoder.layer.{i}.attention.attention.{VIT[p]}.weight"]
            assert torch.equal(out["model"][name], 0.1 * sv + (1 - 0.1) * t["model"][name])
            merged.add(name)
    for k, v in t["model"].items():
        assert torch.equal(out["model"][k], st[k])
        if k not in merged:
            assert torch.equal(out["model"][k], v)
    load_beats(out["cfg"], out["model"], out["label_dict"])  # strict: every official key present
    report = json.loads(r.out)
    assert "BEATs_tiny.pt" in report["outputs"]["files"] and mam("verify", tmp_path / "o").code == 0


def test_evaluate_rank_and_finetune_accept_beats(tiny, mam, tmp_path):
    tgt = tiny("beats-ft", layers=2)
    classes = ESC10_CLASSES
    (tmp_path / "map.json").write_text(json.dumps({c: f"/m/{i:02d}" for i, c in enumerate(classes)}))
    r = mam("evaluate", tgt, "--data", ESC10, "--folds", "1", "--limit", "6", "--label-map", tmp_path / "map.json",
            "--source", tiny("vit", layers=2), "--lam", "0,0.3", "--layers", "1", "-q", "--format", "json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)
    assert [x["lam"] for x in rows] == [0.0, 0.3] and all(0 <= x[next(iter(x.keys() - {"split", "layers", "lam"}))]
                                                          <= 1 for x in rows[:1])
    r = mam("rank-layers", tiny("bert", layers=2), tgt, "--data", f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1",
            "--limit", "3", "--metric", "euclidean", "--top-k", "1", "-q", "--format", "csv")
    assert r.code == 0, r.err
    assert len(r.out.strip().splitlines()) == 3
    r = mam("finetune", tiny("beats", layers=2), "--data", ESC10, "--folds", "1", "--limit", "8", "--task", "aec",
            "--source", tiny("vit", layers=2), "--learnable-lam", "--lam-init", "0.1", "--epochs", "2",
            "--batch-size", "4", "-o", tmp_path / "ft", "-q", "--format", "json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["mode"] == "l-mam" and report["epochs"][-1]["train_loss"] > 0
    out = torch.load(tmp_path / "ft" / "BEATs_tiny.pt", weights_only=True)
    assert sorted(out["label_dict"]) == classes and out["cfg"]["finetuned_model"] is True
    model = load_beats(out["cfg"], out["model"])
    assert model.predictor.out_features == 10
    assert (tmp_path / "ft" / "lams.json").is_file() and (tmp_path / "ft" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["beats"])
def test_pretrained_beats_has_no_classifier_for_evaluation(kind, tiny, mam):
    r = mam("evaluate", tiny(kind, layers=2), "--data", ESC10, "--limit", "2", "-q")
    assert r.code == 1 and r.err.count("\n") == 1 and "no classifier head" in r.err, r.err
