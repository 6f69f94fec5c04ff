"""The merge formula to the bit, across architecture pairs, through the real CLI."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from helpers import load_dir, same_bytes

QKV = ("q", "k", "v")
BERT = {"q": "query", "k": "key", "v": "value"}


def bert_name(prefix: str) -> object:
    return lambda i, p: (f"{prefix}encoder.layer.{i}.attention.self.{BERT[p]}.weight", None)


def w2v_name(prefix: str) -> object:
    return lambda i, p: (f"{prefix}encoder.layers.{i}.attention.{p}_proj.weight", None)


def vit_name(prefix: str) -> object:
    return lambda i, p: (f"{prefix}encoder.layer.{i}.attention.attention.{BERT[p]}.weight", None)


def fused_name(i: int, p: str) -> tuple[str, slice]:
    j = QKV.index(p)
    return f"blocks.{i}.attn.qkv.weight", slice(32 * j, 32 * (j + 1))


# (source kind, target kind, source name fn, target name fn, target class for from_pretrained)
PAIRS = {
    "bert->hubert": ("bert", "hubert-ctc", bert_name("bert."), w2v_name("hubert."), "HubertForCTC"),
    "vit->ast": ("vit", "ast", vit_name(""), vit_name("audio_spectrogram_transformer."), "ASTForAudioClassification"),
    "roberta->wav2vec2": ("roberta", "wav2vec2-ctc", bert_name(""), w2v_name("wav2vec2."), "Wav2Vec2ForCTC"),
    "bert->whisper": ("bert", "whisper-model", bert_name("bert."),
                      lambda i, p: (f"encoder.layers.{i}.self_attn.{p}_proj.weight", None), "WhisperModel"),
    "timm->hubert": ("timm-vit", "hubert-ctc", fused_name, w2v_name("hubert."), "HubertForCTC"),
    "distilbert->wavlm": ("distilbert", "wavlm-ctc", lambda i, p: (f"transformer.layer.{i}.attention.{p}_lin.weight",
                                                                   None), w2v_name("wavlm."), "WavLMForCTC"),
}


def _get(tensors: dict[str, torch.Tensor], ref: tuple[str, slice | None]) -> torch.Tensor:
    name, rows = ref
    return tensors[name] if rows is None else tensors[name][rows]


@pytest.mark.parametrize("pair", list(PAIRS))
def test_lambda_formula_to_the_bit(pair, tiny, mam, tmp_path):
    s_kind, t_kind, s_name, t_name, cls = PAIRS[pair]
    src, tgt = tiny(s_kind, layers=3), tiny(t_kind, layers=3)
    s, t = load_dir(src), load_dir(tgt)
    outs = {}
    for lam in (0.0, 1.0, 0.3):
        out = tmp_path / f"lam{lam}"
        r = mam("merge", src, tgt, "--lam", lam, "-o", out, "-q")
        assert r.code == 0, r.err
        outs[lam] = load_dir(out)
    merged_names = {t_name(i, p)[0] for i in range(3) for p in QKV}
    # λ = 0: every tensor byte-identical to the target
    assert outs[0.0].keys() == t.keys()
    assert all(same_bytes(outs[0.0][k], t[k]) for k in t)
    for i in range(3):
        for p in QKV:
            sv, tv = _get(s, s_name(i, p)), _get(t, t_name(i, p))
            assert torch.equal(outs[1.0][t_name(i, p)[0]], sv)  # λ = 1: exactly the source
            assert torch.equal(outs[0.3][t_name(i, p)[0]], 0.3 * sv + (1 - 0.3) * tv)
    for lam in (1.0, 0.3):  # nothing else moved
        assert all(same_bytes(outs[lam][k], t[k]) for k in t if k not in merged_names)
    model = getattr(transformers, cls).from_pretrained(tmp_path / "lam0.3")
    reference = getattr(transformers, cls).from_pretrained(tgt)
    with torch.no_grad():
        if cls == "WhisperModel":
            feats = torch.randn(1, 16, 64)
            y = model.encoder(feats).last_hidden_state
            y0 = reference.encoder(feats).last_hidden_state
        elif cls == "ASTForAudioClassification":
            feats = torch.randn(1, 100, 128)
            y, y0 = model(feats).logits, reference(feats).logits
        else:
            wav = torch.randn(1, 4000)
            y, y0 = model(wav).logits, reference(wav).logits
    assert torch.isfinite(y).all() and y.shape == y0.shape and not torch.equal(y, y0)


def test_unlisted_layers_untouched(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=4), tiny("hubert-ctc", layers=4)
    t = load_dir(tgt)
    r = mam("merge", src, tgt, "--lam", "0.5", "--layers", "1-2", "-o", tmp_path / "o", "-q", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert sorted({x["layer"] for x in report["tensors"]}) == [1, 2]
    assert report["recipe"]["lams"]["q"] == [0.0, 0.5, 0.5, 0.0]
    out = load_dir(tmp_path / "o")
    changed = {k for k in t if not same_bytes(out[k], t[k])}
    assert changed == {f"hubert.encoder.layers.{i}.attention.{p}_proj.weight" for i in (1, 2) for p in QKV}


def test_layer_list_parts_and_bias(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=4), tiny("hubert-ctc", layers=4)
    s, t = load_dir(src), load_dir(tgt)
    r = mam("merge", src, tgt, "--lam", "0.25", "--layers", "0,3", "--parts", "v,o", "--bias", "-o", tmp_path / "o",
            "-q")
    assert r.code == 0, r.err
    out = load_dir(tmp_path / "o")
    expect = {}
    for i in (0, 3):
        for sp, tp in (("attention.self.value", "attention.v_proj"), ("attention.output.dense", "attention.out_proj")):
            for kind in ("weight", "bias"):
                sv, tv = s[f"bert.encoder.layer.{i}.{sp}.{kind}"], t[f"hubert.encoder.layers.{i}.{tp}.{kind}"]
                expect[f"hubert.encoder.layers.{i}.{tp}.{kind}"] = 0.25 * sv + (1 - 0.25) * tv
    changed = {k for k in t if not same_bytes(out[k], t[k])}
    assert changed == set(expect)
    assert all(torch.equal(out[k], v) for k, v in expect.items())


def test_sharded_and_bin_inputs_give_identical_output(tiny, mam, tmp_path):
    from mamcli.tiny import save_tiny

    src, tgt = tiny("bert", layers=3), tiny("hubert-ctc", layers=3)
    sharded_src = save_tiny("bert", tmp_path / "bert-sharded", layers=3, max_shard_size="20KB")
    sharded_tgt = save_tiny("hubert-ctc", tmp_path / "hubert-sharded", layers=3, max_shard_size="20KB")
    assert (sharded_src / "model.safetensors.index.json").is_file()
    bin_tgt = tmp_path / "hubert-bin"  # transformers 5 writes only safetensors: a .bin as older versions did
    bin_tgt.mkdir()
    torch.save(load_dir(tgt), bin_tgt / "pytorch_model.bin")
    (bin_tgt / "config.json").write_text((tgt / "config.json").read_text())
    runs = {"plain": (src, tgt), "sharded": (sharded_src, sharded_tgt), "bin": (sharded_src, bin_tgt)}
    results = {}
    for name, (a, b) in runs.items():
        r = mam("merge", a, b, "--lam", "0.2", "-o", tmp_path / name, "-q")
        assert r.code == 0, r.err
        results[name] = load_dir(tmp_path / name)
    for name in ("sharded", "bin"):
        assert results[name].keys() == results["plain"].keys()
        assert all(same_bytes(results[name][k], results["plain"][k]) for k in results["plain"])


def test_sharded_output_loads(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=3), tiny("hubert-ctc", layers=3)
    r = mam("merge", src, tgt, "--lam", "0.2", "--shard-size", "30KB", "-o", tmp_path / "o", "-q")
    assert r.code == 0, r.err
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["weight_map"].keys() == load_dir(tgt).keys()
    model = transformers.HubertForCTC.from_pretrained(tmp_path / "o")
    ref = load_dir(tmp_path / "o")
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if k in ref)
    assert mam("verify", tmp_path / "o").code == 0


def test_dtype_kept_and_out_dtype(tiny, mam, tmp_path):
    from mamcli.tiny import save_tiny

    src = tiny("bert", layers=2)
    tgt = save_tiny("hubert-ctc", tmp_path / "h16", layers=2, dtype=torch.float16)
    s, t = load_dir(src), load_dir(tgt)
    assert mam("merge", src, tgt, "--lam", "0.1", "-o", tmp_path / "o", "-q").code == 0
    out = load_dir(tmp_path / "o")
    name = "hubert.encoder.layers.1.attention.k_proj.weight"
    expect = (0.1 * s["bert.encoder.layer.1.attention.self.key.weight"] + (1 - 0.1) * t[name].float()).half()
    assert out[name].dtype == torch.float16 and torch.equal(out[name], expect)
    assert same_bytes(out["lm_head.weight"], t["lm_head.weight"])
    assert mam("merge", src, tgt, "--lam", "0.1", "--out-dtype", "bf16", "-o", tmp_path / "b", "-q").code == 0
    out = load_dir(tmp_path / "b")
    assert {v.dtype for v in out.values() if v.is_floating_point()} == {torch.bfloat16}
    assert json.loads((tmp_path / "b" / "config.json").read_text()).get("dtype") == "bfloat16"


@pytest.mark.parametrize("kind", ["source", "target", "normal"])
def test_noise_baselines(kind, tiny, mam, tmp_path):
    src, tgt = tiny("bert", hidden=64, layers=2), tiny("hubert-ctc", hidden=64, layers=2)
    s, t = load_dir(src), load_dir(tgt)
    r = mam("merge", src, tgt, "--lam", "1", "--noise", kind, "--seed", "7", "-o", tmp_path / "a", "-q")
    assert r.code == 0, r.err
    a = load_dir(tmp_path / "a")
    for i in range(2):
        for p in QKV:
            n = a[f"hubert.encoder.layers.{i}.attention.{p}_proj.weight"]
            ref = s[f"bert.encoder.layer.{i}.attention.self.{BERT[p]}.weight"] if kind == "source" else \
                t[f"hubert.encoder.layers.{i}.attention.{p}_proj.weight"]
            if kind == "normal":
                assert abs(float(n.mean())) < 0.1 and abs(float(n.std()) - 1) < 0.1
            else:
                assert float(n.mean()) == pytest.approx(float(ref.mean()), abs=1e-6)
                assert float(n.std()) == pytest.approx(float(ref.std()), rel=1e-4)
            assert not torch.equal(n, ref)
    assert mam("merge", src, tgt, "--lam", "1", "--noise", kind, "--seed", "7", "-o", tmp_path / "b", "-q").code == 0
    assert mam("merge", src, tgt, "--lam", "1", "--noise", kind, "--seed", "8", "-o", tmp_path / "c", "-q").code == 0
    b, c = load_dir(tmp_path / "b"), load_dir(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fused_qkv_target_is_fused_again(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("timm-vit", layers=2)
    s, t = load_dir(src), load_dir(tgt)
    r = mam("merge", src, tgt, "--lam", "0.4", "--parts", "q,v", "--bias", "-o", tmp_path / "o", "-q")
    assert r.code == 0, r.err
    out = load_dir(tmp_path / "o")
    for i in range(2):
        for kind in ("weight", "bias"):
            fused, new = t[f"blocks.{i}.attn.qkv.{kind}"], out[f"blocks.{i}.attn.qkv.{kind}"]
            for j, p in enumerate(QKV):
                rows = slice(32 * j, 32 * (j + 1))
                if p == "k":
                    assert torch.equal(new[rows], fused[rows])
                else:
                    sv = s[f"bert.encoder.layer.{i}.attention.self.{BERT[p]}.{kind}"]
                    assert torch.equal(new[rows], 0.4 * sv + (1 - 0.4) * fused[rows])
        assert same_bytes(out[f"blocks.{i}.attn.proj.weight"], t[f"blocks.{i}.attn.proj.weight"])


def test_whisper_bias_without_key_bias_is_skipped_and_decoder_untouched(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("whisper-model", layers=2)
    t = load_dir(tgt)
    r = mam("merge", src, tgt, "--lam", "0.5", "--bias", "-o", tmp_path / "o", "-q", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert {(x["layer"], x["part"]) for x in report["skipped"]} == {(0, "k"), (1, "k")}
    out = load_dir(tmp_path / "o")
    assert all(same_bytes(out[k], t[k]) for k in t if not k.startswith("encoder.layers."))


def test_layer_maps_for_different_depths(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=4), tiny("hubert-ctc", layers=2)
    s = load_dir(src)
    r = mam("merge", src, tgt, "--lam", "1", "-o", tmp_path / "x")
    assert r.code == 1 and "--layer-map" in r.err and not (tmp_path / "x").exists()
    for spec, expect in (("stride", [0, 2]), ("last", [2, 3]), ("3,1", [3, 1])):
        out = tmp_path / spec.replace(",", "_")
        assert mam("merge", src, tgt, "--lam", "1", "--layer-map", spec, "-o", out, "-q").code == 0
        o = load_dir(out)
        for i, j in enumerate(expect):
            assert torch.equal(o[f"hubert.encoder.layers.{i}.attention.q_proj.weight"],
                               s[f"bert.encoder.layer.{j}.attention.self.query.weight"])


def test_lams_file_and_report_replay(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=3), tiny("hubert-ctc", layers=3)
    s, t = load_dir(src), load_dir(tgt)
    (tmp_path / "lams.json").write_text(json.dumps({"lams": [0.1, 0.0, 0.7]}))
    assert mam("merge", src, tgt, "--lams", tmp_path / "lams.json", "-o", tmp_path / "a", "-q").code == 0
    a = load_dir(tmp_path / "a")
    for i, lam in enumerate((0.1, 0.0, 0.7)):
        n = f"hubert.encoder.layers.{i}.attention.v_proj.weight"
        sv = s[f"bert.encoder.layer.{i}.attention.self.value.weight"]
        assert torch.equal(a[n], t[n] if lam == 0 else lam * sv + (1 - lam) * t[n])
    # the report's per-layer λ replays to the same weights
    assert mam("merge", src, tgt, "--lams", tmp_path / "a" / "mam_report.json", "-o", tmp_path / "b", "-q").code == 0
    b = load_dir(tmp_path / "b")
    assert all(same_bytes(a[k], b[k]) for k in a)


def test_report_contents(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    r = mam("merge", src, tgt, "--lam", "0.1", "-o", tmp_path / "o", "--json", "-q")
    assert r.code == 0
    rep = json.loads(r.out)
    on_disk = json.loads((tmp_path / "o" / "mam_report.json").read_text())
    assert rep["tensors"] == on_disk["tensors"] and len(rep["tensors"]) == 6
    s, t = load_dir(src), load_dir(tgt)
    x = next(e for e in rep["tensors"] if e["target"] == "hubert.encoder.layers.1.attention.q_proj.weight")
    sv, tv = s["bert.encoder.layer.1.attention.self.query.weight"], t[x["target"]]
    assert x["delta_norm"] == pytest.approx(float((0.1 * sv + 0.9 * tv - tv).norm()), rel=1e-6)
    assert x["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(sv.flatten(), tv.flatten(), 0)),
                                        abs=1e-6)
    import hashlib
    for side, path in (("source", src), ("target", tgt)):
        digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        assert rep["inputs"][side]["sha256"] == {"model.safetensors": digest}
    assert rep["inputs"]["source"]["family"] == "bert" and rep["inputs"]["target"]["model_type"] == "hubert"
    assert {"mam", "torch", "transformers"} <= rep["versions"].keys()
    assert rep["peak_rss_mib"] > 0 and rep["wall_time_s"] > 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        recipe = json.loads(f.metadata()["mam_recipe"])
    assert recipe["lams"]["q"] == [0.1, 0.1] and recipe["noise"] is None
    assert (tmp_path / "o" / "vocab.json").is_file() and (tmp_path / "o" / "config.json").is_file()


def test_verify_detects_tampering(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    out = tmp_path / "o"
    assert mam("merge", src, tgt, "--lam", "0.1", "-o", out, "-q").code == 0
    r = mam("verify", out, "--format", "json")
    assert r.code == 0 and json.loads(r.out)["ok"] is True
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    r = mam("verify", out)
    assert r.code == 1 and "hash mismatch: model.safetensors" in r.err


def test_verify_covers_every_file_and_says_missing(tiny, mam, tmp_path):
    """Config and processor files are verified too; a deleted shard is "missing", a stray file "not in the report"."""
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    out = tmp_path / "o"
    assert mam("merge", src, tgt, "--lam", "0.1", "--shard-size", "20KB", "-o", out, "-q").code == 0
    report = json.loads((out / "mam_report.json").read_text())
    assert {"config.json", "vocab.json", "model.safetensors.index.json"} <= set(report["outputs"]["hashes"])
    config = out / "config.json"
    config.write_text(config.read_text().replace("\n", " \n", 1))
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    (out / "stray.txt").write_text("?")
    r = mam("verify", out)
    assert r.code == 1 and r.err.count("\n") == 1
    assert "hash mismatch: config.json" in r.err and f"missing: {shard.name}" in r.err
    assert "not in the report: stray.txt" in r.err


def test_map_lists_pairs_and_unmapped(tiny, mam):
    src, tgt = tiny("bert", layers=2), tiny("wavlm-ctc", layers=2)
    r = mam("map", src, tgt, "--format", "csv")
    assert r.code == 0, r.err
    lines = r.out.strip().splitlines()
    assert lines[0] == "layer,source_layer,part,kind,source,target,shape"
    assert len(lines) == 1 + 6
    assert "wavlm.encoder.layers.0.attention.out_proj.weight" not in r.out
    r = mam("map", src, tgt)
    assert "wavlm.encoder.layers.1.attention.gru_rel_pos_linear.weight" in r.err
    assert "wavlm.encoder.layers.0.attention.out_proj.weight" in r.err
    r = mam("merge", src, tgt, "--lam", "0.1", "--dry-run", "--json")
    assert r.code == 0 and len(json.loads(r.out)) == 6


def test_user_arch_map(tiny, mam, tmp_path):
    from safetensors.torch import save_file

    t = load_dir(tiny("bert", layers=2))
    custom = {f"enc.blocks.{i}.sa.w{p}.weight": t[f"bert.encoder.layer.{i}.attention.self.{BERT[p]}.weight"].clone()
              for i in range(2) for p in QKV}
    (tmp_path / "custom").mkdir()
    save_file(custom, str(tmp_path / "custom" / "model.safetensors"))
    r = mam("map", tmp_path / "custom", tiny("hubert-ctc", layers=2))
    assert r.code == 1 and "unknown architecture" in r.err
    fam = {"name": "mytext", "model_types": [], "layouts": [
        {"layer": "enc.blocks.{i}", "attention": "sa", "parts": {"q": "sa.wq", "k": "sa.wk", "v": "sa.wv"}}]}
    (tmp_path / "fam.toml").write_text(
        'name = "mytext"\n[[layouts]]\nlayer = "enc.blocks.{i}"\nattention = "sa"\n'
        '[layouts.parts]\nq = "sa.wq"\nk = "sa.wk"\nv = "sa.wv"\n')
    (tmp_path / "fam.json").write_text(json.dumps(fam))
    for f in ("fam.json", "fam.toml"):
        r = mam("merge", tmp_path / "custom", tiny("hubert-ctc", layers=2), "--lam", "1", "--arch-map",
                tmp_path / f, "-o", tmp_path / f"o-{f}", "-q")
        assert r.code == 0, r.err
        o = load_dir(tmp_path / f"o-{f}")
        assert torch.equal(o["hubert.encoder.layers.1.attention.k_proj.weight"], custom["enc.blocks.1.sa.wk.weight"])


def test_interrupt_leaves_nothing(tiny, tmp_path):
    from mamcli.checkpoint import resolve
    from mamcli.merge import MergeOptions, merge_to_dir

    def boom(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    s, t = resolve(str(tiny("bert", layers=2))), resolve(str(tiny("hubert-ctc", layers=2)))
    with s, t, pytest.raises(KeyboardInterrupt):
        merge_to_dir(s, t, MergeOptions(lam=0.1), tmp_path / "out", progress=boom)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_after_success(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    out = tmp_path / "o"
    assert mam("merge", src, tgt, "--lam", "0.1", "-o", out, "-q").code == 0
    before = (out / "model.safetensors").read_bytes()
    r = mam("merge", src, tgt, "--lam", "0.9", "-o", out, "-q")
    assert r.code == 1 and "--force" in r.err
    assert (out / "model.safetensors").read_bytes() == before
    r = mam("merge", src, tgt, "--lam", "0.5", "--layers", "7", "-o", out, "-q", "--force")
    assert r.code == 1 and (out / "model.safetensors").read_bytes() == before
    assert mam("merge", src, tgt, "--lam", "0.9", "-o", out, "-q", "--force").code == 0
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def _lj() -> str:
    """LJ Speech clips with their transcripts: paired data for --align activations."""
    from conftest import SHARED

    return f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1"


def test_align_activations_through_the_cli(tiny, mam, tmp_path):
    """--align activations pools --data's clips (target) and transcripts (source), solves, and merges exactly
    λ · S[rows][:, hidden] + (1 − λ) · T; the report, the card and `mam verify` name and cover the permutations."""
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    r = mam("merge", src, tgt, "--lam", "0.4", "--align", "activations", "--data", _lj(), "--limit", "6",
            "--device", "cpu", "--batch-size", "3", "-o", tmp_path / "o", "-q", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    a = report["alignment"]
    assert a["mode"] == "activations" and a["pairs"] == 6 and a["layers"] == [0, 1]
    assert a["row_correlation"]["aligned"] > a["row_correlation"]["identity"]
    doc = json.loads((tmp_path / "o" / "mam_align.json").read_text())
    s, t, out = load_dir(src), load_dir(tgt), load_dir(tmp_path / "o")
    group = {"q": "qk", "k": "qk", "v": "v"}
    for i in range(2):
        for p in QKV:
            aligned = s[f"bert.encoder.layer.{i}.attention.self.{BERT[p]}.weight"]
            aligned = aligned[torch.tensor(doc["rows"][str(i)][group[p]])][:, torch.tensor(doc["hidden"])]
            name = f"hubert.encoder.layers.{i}.attention.{p}_proj.weight"
            assert torch.equal(out[name], 0.4 * aligned + (1 - 0.4) * t[name])
    assert doc["hidden"] != list(range(32))
    assert "Aligned first (`--align activations`" in (tmp_path / "o" / "README.md").read_text()
    assert mam("verify", tmp_path / "o").code == 0


@pytest.mark.parametrize("args,code,needle", [
    (["--align", "sideways"], 2, "must be one of none, weights, activations or a path to a mam_align.json"),
    (["--align", "activations"], 1, "--align activations needs paired data (speech clips with transcripts): "
                                    "give --data"),
    (["--align", "activations", "--data", "ljspeech:/no/such/folder"], 1, "/no/such/folder"),
    (["--align", "weights", "--parts", "q,k,v,o"], 1, "--align permutes Q, K and V only"),
    (["--align", "/no/such/mam_align.json"], 1, "alignment file /no/such/mam_align.json does not exist"),
    (["--align", "weights", "--data", "ljspeech:LJSpeech-1.1"], 1, "--data is read only by --align activations"),
])
def test_align_refusals_are_one_line(args, code, needle, tiny, mam, tmp_path):
    r = mam("merge", tiny("bert", layers=2), tiny("hubert-ctc", layers=2), "--lam", "0.1", *args,
            "-o", tmp_path / "o")
    assert r.code == code and needle in r.err and r.err.strip().count("\n") == 0, r.err
    assert not (tmp_path / "o").exists()


def test_align_activations_refuses_an_image_source_and_dry_run_reads_no_clip(tiny, mam, tmp_path):
    vit, tgt = tiny("vit", layers=2), tiny("hubert-ctc", layers=2)
    r = mam("merge", vit, tgt, "--lam", "0.1", "--align", "activations", "--data", _lj(), "--limit", "2",
            "-o", tmp_path / "o", "-q")
    assert r.code == 1 and "cannot read; use --align weights" in r.err and r.err.strip().count("\n") == 0, r.err
    r = mam("merge", vit, tgt, "--lam", "0.1", "--align", "activations", "--data", _lj(), "--dry-run",
            "--format", "csv")
    assert r.code == 0 and len(r.out.strip().splitlines()) == 1 + 6, r.err
