"""Whisper as a target: evaluate equals plain transformers generate(), merges equal a hand-written interpolation,
sweeps equal separate evaluations, decoding is bounded and counted, rank-layers pools only audio frames,
unusable clips are named and skipped, bad input is one line."""

from __future__ import annotations

import json
import math
import shutil

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch
import transformers
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from conftest import ESC10_CLASSES, SHARED
from helpers import load_dir, same_bytes
from mamcli.checkpoint import resolve
from mamcli.data import Item, iter_clips, load_audio, load_dataset, select
from mamcli.errors import MamError
from mamcli.evaluate import EvalOptions, Evaluator, SweepOptions, sweep
from mamcli.merge import MergeOptions
from mamcli.models import InMemoryMerger, load_audio_model
from mamcli.rank import RankOptions, pooled_audio, rank_layers
from mamcli.report import write_json
from mamcli.tasks import Seq2Seq, TaskOptions

LJ = f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1"
ESC10 = f"folders:{SHARED}/esc10/ESC-10"
BERT = {"q": "query", "k": "key", "v": "value"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plain(path):
    """whisper-tiny.en as transformers loads it, in float32 (its fp16 weights widened exactly)."""
    return transformers.WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def _features(path, items):
    """log-mel features computed here, straight from transformers' feature extractor."""
    fe = transformers.WhisperFeatureExtractor.from_pretrained(path)
    return fe([load_audio(i.path, 16000) for i in items], sampling_rate=16000, return_tensors="pt")["input_features"]


def _bound(items) -> int:
    """The documented bound: ceil(10 tokens/s × the batch's longest clip) + 10."""
    return math.ceil(10 * max(len(load_audio(i.path, 16000)) for i in items) / 16000) + 10


@torch.inference_mode()
def _generate(model, path, items, **kwargs) -> torch.Tensor:
    return model.generate(_features(path, items), **kwargs)


def _texts(path, ids) -> list[str]:
    return [t.strip() for t in transformers.AutoTokenizer.from_pretrained(path).batch_decode(
        ids, skip_special_tokens=True)]


def test_whisper_tiny_en_equals_plain_generate_on_20_lj_clips(real):
    w = real("whisper-tiny.en")
    ds = select(load_dataset(LJ), limit=20)
    with resolve(str(w)) as ck:
        ev = Evaluator(ck, ds, EvalOptions(batch_size=10))
        scores = ev.evaluate()
        info = ev.describe()
    assert info["head"] == "seq2seq" and info["decoding"] == "greedy" and info["dtype"] == "float32"
    assert info["stored_dtype"] == "float16" and info["normalizer"]["name"] == "whisper"
    model = _plain(w)
    ours = {u["id"]: u["hypothesis"] for u in scores["utterances"]}
    for batch, inputs in zip(ev.batches, ev.inputs, strict=True):  # the same length-sorted batches of 10
        feats = _features(w, batch)
        assert torch.equal(inputs["input_features"], feats)
        with torch.inference_mode():
            plain = _texts(w, model.generate(feats))  # transformers' defaults: no bound but the model's 448
        assert [ours[i.id] for i in batch] == plain
    assert scores["hit_token_bound"] == 0 and len(ours) == 20
    english = EnglishTextNormalizer({})
    refs = [english(u["reference"]).strip() for u in scores["utterances"]]
    hyps = [english(u["hypothesis"]).strip() for u in scores["utterances"]]
    assert scores["wer"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12) and scores["wer"] < 0.08
    assert scores["cer"] == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)


# ---- the real pair: MiniLM (6 × 384, 12 heads) into whisper-tiny.en's encoder (4 × 384, 6 heads) ---------------

LAYERS, LAMS = "1-3", (0.1, 0.8)  # at λ = 0.8 on layers 1-3 the decoder repeats itself on LJ002-0020
SHORT = ("LJ001-0008", "LJ002-0020")  # 1.8 s and 1.5 s: few tokens to decode


@pytest.fixture(scope="module")
def pair(real, tmp_path_factory):
    """A sweep of the real pair on two short LJ clips, given to the CLI and the API as the same manifest."""
    w, m = real("whisper-tiny.en"), real("all-MiniLM-L6-v2")
    data = tmp_path_factory.mktemp("short") / "short.jsonl"
    items = [i for i in load_dataset(LJ).items if i.id in SHORT]
    data.write_text("\n".join(json.dumps({"id": i.id, "audio": str(i.path), "text": i.text}) for i in items))
    ds = load_dataset(str(data))
    with resolve(str(w)) as ck, resolve(str(m)) as src:
        ev = Evaluator(ck, ds, EvalOptions())
        result = sweep(ev, src, SweepOptions(lams=[0.0, *LAMS], layers=LAYERS, layer_map="first"))
    return w, m, data, ev, result


def _point(result, m, lam) -> dict:
    return result["details"][f"{LAYERS}|{lam}|{m.name}"]


def test_merge_in_memory_equals_a_hand_written_interpolation(pair):
    w, m, _, ev, result = pair
    assert ev.batch_size == 8 and result["first_merged_layer"] == 1  # sequence-to-sequence batches on CPU too
    assert result["replay_cache"]["batches_replayed"] == 1  # layer 0's output replayed at every point
    source, target = load_dir(m), load_dir(w)
    model = _plain(w)
    lam = LAMS[0]
    with torch.no_grad():
        for i in (1, 2, 3):  # layer map "first": target layer i takes source layer i
            for p in "qkv":
                s = source[f"encoder.layer.{i}.attention.self.{BERT[p]}.weight"]
                t = target[f"model.encoder.layers.{i}.self_attn.{p}_proj.weight"]
                merged = (lam * s + (1 - lam) * t.float()).to(t.dtype)  # in float32, stored as the target's fp16
                assert not torch.equal(merged, t)
                getattr(model.model.encoder.layers[i].self_attn, f"{p}_proj").weight.copy_(merged.float())
    hyps = {u["id"]: u["hypothesis"] for u in _point(result, m, lam)["utterances"]}
    for batch in ev.batches:  # the same batch (both clips), with the bound its longest clip sets
        plain = _texts(w, _generate(model, w, batch, max_new_tokens=_bound(batch)))
        assert plain == [hyps[i.id] for i in batch]
    # the same weights in memory: mam's merge point, applied again, equals the hand-written one to the bit
    with resolve(str(m)) as src:
        merger = InMemoryMerger(ev.store)
        plan = merger.plan(src, MergeOptions(lam=lam, layers=LAYERS, layer_map="first"))
        with merger.applied(src, plan):
            ours = {k: v.clone() for k, v in ev.am.model.state_dict().items()}
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())


def test_lam_zero_merge_transcribes_like_the_unmerged_model(pair, mam, tmp_path):
    w, m, data, _, result = pair
    out = tmp_path / "lam0"
    r = mam("merge", m, w, "--lam", "0", "--layer-map", "first", "-o", out, "-q")
    assert r.code == 0, r.err
    merged, target = load_dir(out), load_dir(w)
    assert merged.keys() == target.keys() and all(same_bytes(merged[k], target[k]) for k in target)
    with resolve(str(out)) as ck:
        scores = Evaluator(ck, load_dataset(str(data)), EvalOptions()).evaluate()
    assert scores["utterances"] == result["details"]["target"]["utterances"]


def test_sweep_point_equals_separate_evaluation_and_the_bound_is_counted(pair, mam, tmp_path):
    w, m, data, ev, result = pair
    lam = LAMS[1]
    point = _point(result, m, lam)
    flagged = [u["id"] for u in point["utterances"] if u["hit_token_bound"]]
    assert point["hit_token_bound"] == len(flagged) == 1  # one clip repeats, the other ends
    row = next(p for p in result["points"] if p["lam"] == lam)
    assert row["hit_token_bound"] == len(flagged)
    out = tmp_path / "merged"
    r = mam("merge", m, w, "--lam", lam, "--layers", LAYERS, "--layer-map", "first", "-o", out, "-q")
    assert r.code == 0, r.err
    r = mam("evaluate", out, "--data", data, "-o", tmp_path / "one.json")
    assert r.code == 0, r.err
    single = json.loads((tmp_path / "one.json").read_text())["details"]["target"]
    assert single["utterances"] == point["utterances"] and single["hit_token_bound"] == 1
    # "hit the bound" means what transformers says: generate() with that max_new_tokens returns exactly that
    # many text tokens (no end-of-text), a clip that ended on its own returns fewer
    model = transformers.WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    for batch in ev.batches:
        ids = _generate(model, out, batch, max_new_tokens=_bound(batch))
        for item, row in zip(batch, ids, strict=True):
            produced = int((row != model.generation_config.pad_token_id).sum())
            assert (produced == _bound(batch)) == (item.id in flagged), (item.id, produced)


# ---- rank-layers -------------------------------------------------------------------------------------------

def test_rank_layers_on_the_real_pair_drives_a_merge(real, mam, tmp_path):
    w, m = real("whisper-tiny.en"), real("all-MiniLM-L6-v2")
    ds = select(load_dataset(LJ), limit=4)
    with resolve(str(m)) as s, resolve(str(w)) as t:
        report = rank_layers(s, t, ds, RankOptions(metric="all", top_k=2, n_projections=50, layer_map="first"))
    assert report["layer_map"] == [0, 1, 2, 3] and len(report["metrics"]["swd"]["scores"]) == 4
    write_json(tmp_path / "rank.json", report)
    chosen = report["metrics"]["inner"]["top_k"]
    out = tmp_path / "top"
    r = mam("merge", m, w, "--lam", "0.1", "--layers", f"top:2:{tmp_path / 'rank.json'}:inner", "--layer-map",
            "first", "-o", out, "-q", "--json")
    assert r.code == 0, r.err
    assert sorted({x["layer"] for x in json.loads(r.out)["tensors"]}) == chosen
    merged, target = load_dir(out), load_dir(w)
    changed = {int(k.split(".")[3]) for k in target if not torch.equal(merged[k], target[k])}
    assert changed == set(chosen)


def test_pooling_keeps_only_the_frames_that_hold_audio(real):
    """Whisper pads every clip to 30 s (1500 encoder frames); a clip of n samples fills ceil(n / 320) of them."""
    with resolve(str(real("whisper-tiny.en"))) as t:
        am = load_audio_model(t, "encode")
        clips = list(iter_clips(select(load_dataset(LJ), limit=2), am.rate))
        pooled = pooled_audio(am, clips, batch_size=2)
        feats = am.inputs([c.audio for c in clips])
        with torch.no_grad():
            hs = am.model.encoder(**feats, output_hidden_states=True).hidden_states
    for k, c in enumerate(clips):
        n_valid = math.ceil(len(c.audio) / 320)
        assert n_valid < 1500
        for layer in range(4):
            h = hs[layer + 1][k]
            expect = h[:n_valid].mean(0).numpy()
            np.testing.assert_allclose(pooled[c.item.id][layer], expect, rtol=1e-4, atol=1e-5)
            padded = h.mean(0).numpy()  # what pooling the padding would give: far from it
            assert np.abs(pooled[c.item.id][layer] - padded).max() > 0.1


def test_features_equal_the_extractors_own_bit_for_bit_with_the_silence_computed_once(real, monkeypatch):
    """mam takes Whisper's spectrogram over the clips and a little silence, and repeats the silent frame to the
    30-s window (AudioModel._silent_tail): the extractor's own numbers, for batches of mixed lengths and for a clip
    too long to leave room (the whole window computed then)."""
    with resolve(str(real("whisper-tiny.en"))) as t:
        am = load_audio_model(t, "encode")
    assert am.silent_tail
    lj = _lj_audio(5)
    long = np.random.default_rng(0).normal(0, 0.1, am.features.n_samples - 300).astype(np.float32)  # 29.98 s
    extract, spans = type(am.features).__call__, []
    monkeypatch.setattr(type(am.features), "__call__",
                        lambda fe, *a, **k: spans.append(k.get("max_length")) or extract(fe, *a, **k))
    for batch in (lj, lj[:1], [lj[0], np.zeros(1600, dtype=np.float32)], [long], [long, lj[1]]):
        spans.clear()
        ours = am.inputs(batch)["input_features"]
        theirs = extract(am.features, batch, sampling_rate=16000, return_tensors="pt")["input_features"]
        assert ours.shape == theirs.shape == (len(batch), 80, 3000)
        assert torch.equal(ours, theirs)
        assert (spans == [None]) == (batch[0] is long), spans  # the short spectrogram wherever it fits


# ---- clips a model cannot take ------------------------------------------------------------------------------

def _manifest(tmp_path, clips: dict[str, tuple[np.ndarray, int]], text: str = "one") -> str:
    rows = []
    for name, (audio, rate) in clips.items():
        sf.write(tmp_path / f"{name}.wav", audio, rate)
        rows.append({"audio": f"{name}.wav", "text": text, "label": "Dog"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(tmp_path / "m.jsonl")


def _lj_audio(n: int) -> list[np.ndarray]:
    return [load_audio(i.path, 16000) for i in select(load_dataset(LJ), limit=n).items]


def test_too_short_clip_is_named_and_skipped_in_evaluate_and_rank(tiny, mam, tmp_path):
    tgt = tiny("hubert-ctc", layers=2)
    good = _lj_audio(2)
    data = _manifest(tmp_path, {"a": (good[0], 16000), "b": (good[1], 16000),
                                "short": (np.zeros(160, dtype=np.float32), 16000)})  # 0.01 s
    # the minimum comes from the model's conv stack (kernels 10,4,4,4, strides 5,4,4,4): 325 samples
    n = 1
    for k, s in reversed(list(zip((10, 4, 4, 4), (5, 4, 4, 4), strict=True))):
        n = (n - 1) * s + k
    with resolve(str(tgt)) as t:
        am = load_audio_model(t, "asr")
    assert am.min_samples == n == 325
    with torch.no_grad(), pytest.raises(RuntimeError):
        am.model(torch.zeros(1, n - 1))  # one sample less and transformers' forward fails
    assert am.model(torch.zeros(1, n)).logits.shape[1] == 1
    r = mam("evaluate", tgt, "--data", data, "-o", tmp_path / "r.json")
    assert r.code == 0, r.err
    assert "skipped clip short" in r.err and "too short for the model's front end (10 ms" in r.err
    ev = json.loads((tmp_path / "r.json").read_text())["evaluation"]
    assert ev["clips"] == 2 and ev["skipped_clips"] == 1 and [b["id"] for b in ev["bad_clips"]] == ["short"]
    r = mam("evaluate", tgt, "--data", data, "--strict", "-q")
    assert r.code == 1 and r.err.count("\n") == 1 and "short.wav" in r.err and "too short" in r.err
    src = tiny("bert", layers=2)
    r = mam("rank-layers", src, tgt, "--data", data, "-o", tmp_path / "rank.json", "--format", "csv")
    assert r.code == 0, r.err
    rank = json.loads((tmp_path / "rank.json").read_text())
    assert rank["samples"] == ["a", "b"] and rank["skipped_clips"] == 1 and "skipped clip short" in r.err
    r = mam("rank-layers", src, tgt, "--data", data, "--strict", "-q")
    assert r.code == 1 and r.err.count("\n") == 1 and "too short" in r.err


def test_clip_longer_than_30_s_is_skipped_and_counted(tiny, mam, tmp_path):
    good = _lj_audio(2)
    long = np.concatenate([good[0]] * 4)  # 38.6 s
    data = _manifest(tmp_path, {"long": (long, 16000), "ok": (good[1], 16000)})
    r = mam("evaluate", tiny("whisper", layers=2), "--data", data, "-o", tmp_path / "r.json")
    assert r.code == 0, r.err
    assert "skipped clip long" in r.err and "longer than the 30 s the model takes (38.6 s)" in r.err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["evaluation"]["clips"] == 1 and rep["evaluation"]["skipped_clips"] == 1
    # a random decoder never ends its text: the bound stops it, and both report and stderr say so
    assert rep["details"]["target"]["hit_token_bound"] == 1 and "1 of 1 clip(s) stopped at the token bound" in r.err
    assert rep["evaluation"]["token_bound"].startswith("max_new_tokens = ceil(10 tokens/s × longest clip")


# ---- the tiny Whisper: decoding options, labels for fine-tuning, audio events -------------------------------

@pytest.fixture(scope="module")
def multilingual(tiny, tmp_path_factory):
    """The tiny Whisper with a multilingual generation config (its tokenizer has the language tokens)."""
    path = tmp_path_factory.mktemp("multi") / "whisper"
    shutil.copytree(tiny("whisper", layers=2), path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(is_multilingual=True, lang_to_id={"<|en|>": 50258, "<|de|>": 50260},
               task_to_id={"translate": 50357, "transcribe": 50358})
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def test_language_and_beams_reach_generate(multilingual):
    path = multilingual
    ds = select(load_dataset(LJ), limit=2)
    with resolve(str(path)) as ck:
        ev = Evaluator(ck, ds, EvalOptions(language="german", beams=2))
        hyps = {u["id"]: u["hypothesis"] for u in ev.evaluate()["utterances"]}
        info = ev.describe()
    assert info["decoder_prompt"] == [50257, 50260, 50358, 50362] and info["decoding"] == "beam search, 2 beams"
    model = _plain(path)
    for batch in ev.batches:
        plain = _texts(path, _generate(model, path, batch, language="de", task="transcribe", num_beams=2,
                                       max_new_tokens=_bound(batch)))
        assert plain == [hyps[i.id] for i in batch]
    with resolve(str(path)) as ck, pytest.raises(MamError, match="not a language of") as e:
        Evaluator(ck, ds, EvalOptions(language="xx"))
    assert "\n" not in str(e.value)


def test_fast_mode_refuses_what_it_cannot_do_before_reading_audio(multilingual, monkeypatch):
    """Beam search is refused from the options alone (no model), a language left to detection once the model's
    prompt is known: either way before a clip is read."""
    with pytest.raises(MamError, match="--fast decodes greedily"):
        Seq2Seq(TaskOptions(fast=True, beams=3))
    monkeypatch.setattr("mamcli.data.load_clip", lambda *a: pytest.fail("audio read before the refusal"))
    ds = select(load_dataset(LJ), limit=1)
    with resolve(str(multilingual)) as ck, pytest.raises(MamError, match="give --language") as e:
        Evaluator(ck, ds, EvalOptions(fast=True))
    assert "\n" not in str(e.value)


def test_fast_mode_batches_16_clips_on_cpu_unless_told(tiny):
    ds = select(load_dataset(LJ), limit=1)
    with resolve(str(tiny("whisper", layers=2))) as ck:
        sizes = [Evaluator(ck, ds, EvalOptions(**o)).batch_size for o in ({"fast": True}, {}, {"fast": True,
                                                                                              "batch_size": 3})]
    assert sizes == [16, 8, 3]


def test_seq2seq_labels_carry_the_decoder_prompt(multilingual):
    """Fine-tuning targets: language, transcribe, no-timestamps, text, end-of-text (the model prepends the
    start of transcript when it shifts them into decoder inputs), -100 padded."""
    with resolve(str(multilingual)) as ck:
        task = Seq2Seq(TaskOptions(language="en"))
        am = load_audio_model(ck, task)
    items = [Item("a", SHARED, text="Hello there."), Item("b", SHARED, text="Hi")]
    labels = task.labels(am, items)
    tok = am.tokenizer
    rows = [[50258, 50358, 50362, *tok(" " + t, add_special_tokens=False)["input_ids"], 50256]
            for t in ("Hello there.", "Hi")]
    assert labels[0].tolist() == rows[0]
    assert labels[1].tolist() == rows[1] + [-100] * (len(rows[0]) - len(rows[1]))
    feats = am.inputs(_lj_audio(2))
    with torch.no_grad():
        loss = am.model(**feats, labels=labels).loss
        decoder_in = torch.tensor([[50257, *r[:-1]] + [50256] * (len(rows[0]) - len(r)) for r in rows])
        logits = am.model(**feats, decoder_input_ids=decoder_in).logits
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels), atol=1e-6)


def test_whisper_audio_classification_evaluates_like_ast(tiny, mam, tmp_path):
    aec = tiny("whisper-aec", layers=2)
    (tmp_path / "map.json").write_text(json.dumps({c: f"LABEL_{i}" for i, c in enumerate(ESC10_CLASSES)}))
    r = mam("evaluate", aec, "--data", ESC10, "--folds", "1", "--limit", "4", "--label-map", tmp_path / "map.json",
            "-o", tmp_path / "r.json")
    assert r.code == 0, r.err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["evaluation"]["head"] == "classify"
    detail = rep["details"]["target"]["clips_detail"]
    model = transformers.WhisperForAudioClassification.from_pretrained(aec).eval()
    fe = transformers.WhisperFeatureExtractor.from_pretrained(aec)
    by_model = {f"LABEL_{i}": c for i, c in enumerate(ESC10_CLASSES)}
    items = {i.id: i for i in load_dataset(ESC10).items}
    for d in detail:
        feats = fe([load_audio(items[d["id"]].path, 16000)], sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            label = model.config.id2label[int(model(**feats).logits.argmax(-1))]
        assert d["predicted"] == by_model[label]


# ---- bad input: one line ---------------------------------------------------------------------------------

def test_bad_targets_are_one_line(tiny, mam, tmp_path):
    whisper = tiny("whisper", layers=2)
    no_tok, no_fe = tmp_path / "no-tok", tmp_path / "no-fe"
    shutil.copytree(whisper, no_tok)
    shutil.copytree(whisper, no_fe)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / f).unlink()
    (no_fe / "processor_config.json").unlink()
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                                         n_positions=32)).save_pretrained(gpt2)
    cases = [((tiny("bert", layers=2),), "is not a speech or audio model"),
             ((gpt2,), "is not a speech or audio model"),
             ((gpt2, "--task", "asr"), "has no speech-recognition"),
             ((no_tok,), "no tokenizer"), ((no_fe,), "no feature extractor")]
    for args, needle in cases:
        r = mam("evaluate", *args, "--data", LJ, "--limit", "1", "-q", "-o", tmp_path / "r.json")
        assert r.code == 1 and needle in r.err and r.err.count("\n") == 1, r.err
        assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("opts,needle", [
    ({"language": "en"}, "is an English-only model"), ({"beams": 0}, "--beams must be at least 1"),
    ({"normalizer": "fancy"}, "--normalizer"),
])
def test_bad_decoding_options_are_one_line(opts, needle, tiny):
    ds = select(load_dataset(LJ), limit=1)
    with resolve(str(tiny("whisper", layers=2))) as ck, pytest.raises(MamError, match=needle) as e:
        Evaluator(ck, ds, EvalOptions(**opts))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("opts,needle", [({"beams": 3}, "--beams applies to"), ({"language": "en"}, "--language")])
def test_decoding_options_on_ctc_are_refused(opts, needle, tiny):
    ds = select(load_dataset(LJ), limit=1)
    with resolve(str(tiny("hubert-ctc", layers=2))) as ck, pytest.raises(MamError, match=needle):
        Evaluator(ck, ds, EvalOptions(**opts))
