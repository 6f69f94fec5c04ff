"""finetune on Whisper: cross-entropy after the decoder prompt lowers the loss of real whisper-tiny.en on real
clips and the output transcribes; L-MAM merges the encoder only and `mam merge --lams` replays it bit for bit;
resume equals a straight run; an audio-event head starts from a speech-recognition folder's encoder."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import ESC10_CLASSES, SHARED
from helpers import load_dir
from mamcli.checkpoint import resolve
from mamcli.data import load_audio, load_dataset
from mamcli.errors import MamError
from mamcli.finetune import FinetuneOptions, finetune, run_dir
from mamcli.metrics import normaliser
from mamcli.models import AudioModel

LJ = f"ljspeech:{SHARED}/ljspeech-385"
ESC10 = f"folders:{SHARED}/esc10/ESC-10"
QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def _lj(*ids: str):
    """LJ Speech clips by id (short ones: every clip is padded to Whisper's 30 s window anyway)."""
    full = load_dataset(LJ)
    return replace(full, items=[i for i in full.items if i.id in ids])


def test_real_whisper_learns_from_real_clips_and_its_output_transcribes(real, tmp_path):
    """whisper-tiny.en, 2 LJ Speech clips, 2 steps with the conv front end and the decoder frozen."""
    import transformers

    tgt = real("whisper-tiny.en")
    train, dev = _lj("LJ001-0008", "LJ002-0020"), _lj("LJ002-0035")
    opts = FinetuneOptions(task="asr", epochs=2, lr=1e-4, batch_size=2, freeze_feature_encoder=True,
                           freeze_decoder=True)
    with resolve(str(tgt)) as t:
        report = finetune(t, train, dev, opts, tmp_path / "ft")
    losses = [e["train_loss"] for e in report["epochs"]]
    assert losses[1] < 0.6 * losses[0], losses  # measured: 0.81 then 0.29
    assert report["task"]["head"] == "seq2seq" and report["task"]["decoder_prompt"] == [50257, 50362]
    assert all("dev_error" in e for e in report["epochs"]) and report["bad_clips"] == []
    ft, original = load_dir(tmp_path / "ft"), load_dir(tgt)
    frozen = [k for k in original if k.startswith(("model.decoder.", "model.encoder.conv"))]
    assert len(frozen) > 100 and all(torch.equal(ft[k], original[k].float()) for k in frozen)
    trained = [k for k in original if k.startswith("model.encoder.") and k.endswith(QKV)]
    assert all(not torch.equal(ft[k], original[k].float()) for k in trained)
    # an ordinary Whisper folder: model, processor and the checkpoint's generation settings
    model = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "ft").eval()
    processor = transformers.WhisperProcessor.from_pretrained(tmp_path / "ft")
    assert model.generation_config.no_timestamps_token_id == 50362
    features = processor(load_audio(dev.items[0].path, 16000), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        text = processor.batch_decode(model.generate(features.input_features), skip_special_tokens=True)[0]
    words = normaliser("whisper")
    assert words(text) == words(dev.items[0].text) == "8 the press yard", text


def test_lmam_on_whisper_merges_the_encoder_and_replays_bit_for_bit(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("whisper", layers=2)
    opts = FinetuneOptions(task="asr", lam_init=0.2, learnable_lam=True, per_part=True, batch_size=2, lr=1e-30,
                           lam_lr=0.5)
    with resolve(str(tgt)) as t, resolve(str(src)) as s:
        report = finetune(t, _lj("LJ001-0008", "LJ002-0020"), None, opts, tmp_path / "ft", s)
    assert report["mode"] == "l-mam" and report["steps"] == 1
    lams = json.loads((tmp_path / "ft" / "lams.json").read_text())
    assert len(lams["lams"]["q"]) == 2 and all(abs(v - 0.2) > 1e-3 for v in lams["per_layer"].values())
    # lr 1e-30 cannot move a float32 weight (checked below): `mam merge --lams` on the original target must
    # give the fine-tuned encoder Q/K/V exactly
    assert mam("merge", src, tgt, "--lams", tmp_path / "ft" / "lams.json", "-o", tmp_path / "replay", "-q").code == 0
    ft, replay, original = load_dir(tmp_path / "ft"), load_dir(tmp_path / "replay"), load_dir(tgt)
    merged = [k for k in original if k.startswith("model.encoder.layers.") and k.endswith(QKV)]
    assert len(merged) == 6 and all(not torch.equal(ft[k], original[k]) for k in merged)
    assert all(torch.equal(ft[k], replay[k]) for k in merged)
    assert all(torch.equal(ft[k], original[k]) for k in ft if k not in merged)  # the decoder above all


def test_whisper_resumed_run_equals_straight(tiny, tmp_path, caplog, monkeypatch):
    """Also: Accelerate's note on the tied proj_out weight at every save is not shown (this is its check)."""
    src, tgt = tiny("bert", layers=2), tiny("whisper", layers=2)
    clips = _lj("LJ001-0008", "LJ002-0020")
    base = dict(task="asr", lam_init=0.3, learnable_lam=True, lr=1e-3, lam_lr=0.1, batch_size=1,
                checkpoint_every=100)
    with resolve(str(tgt)) as t, resolve(str(src)) as s:
        straight = finetune(t, clips, None, FinetuneOptions(**base), tmp_path / "straight", s)
        inputs = AudioModel.inputs

        def crash_in_step_2(self, audio):
            if run_dir(tmp_path / "resumed").joinpath("run.json").is_file():  # step 1 is saved
                raise RuntimeError("power cut")
            return inputs(self, audio)

        monkeypatch.setattr(AudioModel, "inputs", crash_in_step_2)
        with pytest.raises(RuntimeError, match="power cut"):  # checkpoint_every may differ on --resume
            finetune(t, clips, None, FinetuneOptions(**{**base, "checkpoint_every": 1}), tmp_path / "resumed", s)
        monkeypatch.undo()
        assert json.loads((run_dir(tmp_path / "resumed") / "run.json").read_text())["step"] == 1
        resumed = finetune(t, clips, None, FinetuneOptions(**base), tmp_path / "resumed", s, resume=True)
    a, b = load_dir(tmp_path / "straight"), load_dir(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["epochs"] == straight["epochs"] and straight["steps"] == 2
    assert not [r for r in caplog.records if "shared tensor" in r.getMessage()]


def test_audio_events_from_a_whisper_speech_recognition_folder(tiny, mam, tmp_path):
    """Its encoder (``model.encoder.*`` → ``encoder.*``) under a new head for the dataset's labels."""
    import transformers

    tgt = tiny("whisper", layers=2)
    r = mam("finetune", tgt, "--task", "aec", "--data", ESC10, "--folds", "1", "--limit", "3", "--epochs", "1",
            "--batch-size", "3", "--lr", "1e-30", "-o", tmp_path / "ft", "-q")
    assert r.code == 0, r.err
    model = transformers.WhisperForAudioClassification.from_pretrained(tmp_path / "ft")
    assert sorted(model.config.id2label.values()) == ESC10_CLASSES
    assert model.config.architectures == ["WhisperForAudioClassification"]
    ft, original = load_dir(tmp_path / "ft"), load_dir(tgt)
    encoder = {k.removeprefix("model."): v for k, v in original.items() if k.startswith("model.encoder.")}
    assert len(encoder) > 20 and all(torch.equal(ft[k], v) for k, v in encoder.items())  # lr 1e-30: unmoved
    assert not any(k.startswith(("decoder.", "model.decoder.")) for k in ft)


@pytest.mark.parametrize("kind,field,needle", [("hubert-ctc", "freeze_decoder", "--freeze-decoder"),
                                               ("ast", "freeze_feature_encoder", "--freeze-feature-encoder")])
def test_freezing_what_the_model_lacks_is_an_error(kind, field, needle, tiny, tmp_path):
    task = "aec" if kind == "ast" else "asr"
    ds = load_dataset(ESC10 if task == "aec" else f"fsdd:{SHARED}/fsdd/recordings")
    with resolve(str(tiny(kind, layers=2))) as t, pytest.raises(MamError, match=needle):
        finetune(t, replace(ds, items=ds.items[:2]), None, FinetuneOptions(task=task, **{field: True}),
                 tmp_path / "ft")
    assert not run_dir(tmp_path / "ft").exists()
