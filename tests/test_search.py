"""mam search: the race finds a merge known to help and test confirms it; noise never "helps"; the true best is
never dropped; the pick agrees with the full grid; a rerun reuses the kept per-clip results.

The positive control is built so that the answer is known. W is a tiny AST classifier whose attention is made
input-dependent (larger Q/K/V, patch projection and head), and every clip is labelled with W's own prediction, so
W makes no error. The target is W with its attention weights damaged by noise E; the source is a ViT holding
W − E in its Q/K/V. At λ = 0.5 on all layers the merge gives 0.5 (W − E) + 0.5 (W + E) = W exactly: the only
candidate back at zero error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SHARED
from helpers import timeless, torchrun
from mamcli import search as S
from mamcli.checkpoint import resolve
from mamcli.data import load_dataset, select
from mamcli.errors import MamError
from mamcli.evaluate import EvalOptions, Evaluator, SweepOptions

QKV = ("query", "key", "value")
CLIPS = 160


def _edit(folder: Path, fn) -> None:
    sd = load_file(folder / "model.safetensors")
    save_file(fn(sd), folder / "model.safetensors", metadata={"format": "pt"})


def _attn(name: str) -> bool:
    return "attention.attention." in name and name.endswith("weight") and name.split(".")[-2] in QKV


@pytest.fixture(scope="module")
def control(tiny, tmp_path_factory):
    """(target W + E, source W − E, a noise source, the labelled manifest's dev and test splits)."""
    root = tmp_path_factory.mktemp("search")
    w = root / "w"
    shutil.copytree(tiny("ast", layers=2), w)
    g = torch.Generator().manual_seed(0)

    def sharpen(sd):  # an attention that depends on the input, and a head that tells clips apart
        for k, v in sd.items():
            if _attn(k):
                sd[k] = v * 30
            elif "patch_embeddings.projection.weight" in k:
                sd[k] = v * 10
            elif k == "classifier.dense.weight":
                sd[k] = torch.randn(v.shape, generator=g)
        return sd

    _edit(w, sharpen)
    weights = load_file(w / "model.safetensors")
    damage = {k: 0.2 * v.std() * torch.randn(v.shape, generator=g) for k, v in weights.items() if _attn(k)}
    target = root / "target"
    shutil.copytree(w, target)
    _edit(target, lambda sd: {k: v + damage[k] if k in damage else v for k, v in sd.items()})
    source, noise = root / "vit-fix", root / "vit-noise"
    shutil.copytree(tiny("vit", layers=2), source)
    shutil.copytree(tiny("vit", layers=2), noise)
    ast_name = {k.removeprefix("audio_spectrogram_transformer."): k for k in damage}
    _edit(source, lambda sd: {k: weights[ast_name[k]] - damage[ast_name[k]] if k in ast_name else v
                              for k, v in sd.items()})
    _edit(noise, lambda sd: {k: weights[ast_name[k]].std() * torch.randn(v.shape, generator=g) if k in ast_name
                             else v for k, v in sd.items()})
    clips = sorted((SHARED / "fsdd/recordings").glob("*.flac"))[::17][:CLIPS]
    man = root / "clips.jsonl"
    man.write_text("\n".join(json.dumps({"audio": str(p), "label": "LABEL_0"}) for p in clips))
    with resolve(str(w)) as ck:  # the labels: W's own predictions
        labelled = Evaluator(ck, load_dataset(str(man)), EvalOptions(batch_size=8)).evaluate()
    truth = {c["id"]: c["predicted"] for c in labelled["clips_detail"]}
    man.write_text("\n".join(json.dumps({"audio": str(p), "label": truth[p.stem]}) for p in clips))
    ds = load_dataset(str(man))
    return target, source, noise, select(ds, "dev", 0.5, 0), select(ds, "test", 0.5, 0)


def _search(control, source=1, **kw):
    target, dev, test = control[0], control[3], control[4]
    opts = S.SearchOptions(**{"lams": [0.25, 0.5, 0.75], "layers": ["all", "0", "1"], **kw})
    with resolve(str(target)) as t, resolve(str(control[source])) as s:
        return S.search(t, [s], dev, test, EvalOptions(batch_size=8), opts)


def test_positive_control_is_found_and_confirmed(control):
    rep = _search(control)
    assert rep["verdict"] == "helps", rep["summary"]
    assert (rep["picked"]["layers"], rep["picked"]["lam"]) == ("all", 0.5)
    t = rep["test"]
    assert t["error"] == 0.0 and t["baseline_error"] > 0.1  # W restored exactly; the damage is real
    assert t["worse"] == 0 and t["better"] == round(t["baseline_error"] * t["clips"])
    assert t["delta_hi"] < 0 and t["p_value"] < 0.05
    assert rep["source_vs_noise"]["source_beat_noise"] is True
    cost = rep["cost"]
    assert cost["full_grid_clip_evaluations"] == 10 * len(control[3].items)
    assert cost["clip_evaluations"] <= cost["full_grid_clip_evaluations"] // 3  # the default budget
    assert cost["test_clip_evaluations"] == 3 * len(control[4].items)
    rows = {r["key"]: r for r in rep["rounds"]}
    assert rows["all|0.5|vit-fix"]["reason"] == "survived" and rows["target"]["clips"] >= 16
    assert rep["summary"].startswith("The merge at layers all, λ = 0.5, vit-fix helps")


def test_pure_noise_never_helps(control):
    rep = _search(control, source=2)
    assert rep["verdict"] in ("none", "inconclusive"), rep["summary"]


def test_race_never_drops_the_true_best(control):
    """Without a budget the race runs to one survivor or the end of dev; over several clip orders the restoring
    merge is never dropped, and every drop was beyond its bound (or a degenerate candidate)."""
    full = 10 * len(control[3].items)
    for seed in range(3):
        rep = _search(control, seed=seed, budget_clips=full)
        rows = {r["key"]: r for r in rep["rounds"]}
        assert rows["all|0.5|vit-fix"]["reason"] == "survived", seed
        assert (rep["picked"]["layers"], rep["picked"]["lam"]) == ("all", 0.5)
        dropped = [r for r in rep["rounds"] if r["left_round"] is not None]
        assert dropped and all(r["bound"][0] > 0 or r["reason"].startswith("degenerate") for r in dropped)
    assert rep["cost"]["reused_from_cache"] > 0


def test_pick_is_the_full_grids_best_and_pick_on_dev_agrees(control):
    """One round as long as dev is the full grid: the race's pick is its lowest error, and `evaluate
    --pick-on-dev` (search.pick_on_dev) picks the same point by the same rule."""
    dev = control[3]
    rep = _search(control, round_clips=len(dev.items), budget_clips=10 * len(dev.items))
    grid = [r for r in rep["rounds"] if r["clips"] == len(dev.items)]
    assert len(grid) == 10 and rep["cost"]["clip_evaluations"] == 10 * len(dev.items)
    best = min(grid, key=lambda r: (r["error"], r["lam"], str(r["layers"])))
    assert (rep["picked"]["layers"], rep["picked"]["lam"]) == (best["layers"], best["lam"]) == ("all", 0.5)
    target, source, _, dev, test = control
    with resolve(str(target)) as t, resolve(str(source)) as s:
        result, _, _ = S.pick_on_dev(t, s, dev, test, EvalOptions(batch_size=8),
                                     SweepOptions(lams=[0, 0.25, 0.5], layers=None, resamples=100))
    by_key = {r["key"]: r["error"] for r in grid}
    assert [p["error"] for p in result["dev"]["points"]] == pytest.approx(
        [by_key["target"], by_key["all|0.25|vit-fix"], by_key["all|0.5|vit-fix"]], abs=1e-12)
    assert (result["best_on_dev"]["layers"], result["best_on_dev"]["lam"]) == ("all", 0.5)
    assert {p["column"] for p in result["test"]["points"]} == {"target", "vit-fix"}
    assert result["test"]["paired_statistics"]["comparisons"] == 1 and result["selection"]["picked_on"] == "dev"


def test_resume_reuses_every_clip(control):
    first = _search(control, seed=11, lams=[0.5], layers=["all"])
    again = _search(control, seed=11, lams=[0.5], layers=["all"])
    assert again["cost"]["reused_from_cache"] == first["cost"]["clip_evaluations"] + \
        first["cost"]["test_clip_evaluations"]
    assert again["test"] == first["test"] and again["rounds"] == first["rounds"]


def test_a_task_that_predicts_differently_reuses_nothing(control, monkeypatch):
    """The clip cache is keyed by the task's description: when how it predicts changes (Whisper's --fast engine
    did), predictions cached before must not come back."""
    from mamcli.tasks.classify import Classify

    first = _search(control, seed=12, lams=[0.5], layers=["all"])
    described = Classify.describe
    monkeypatch.setattr(Classify, "describe", lambda self: {**described(self), "engine": "another"})
    again = _search(control, seed=12, lams=[0.5], layers=["all"])
    assert first["cost"]["clip_evaluations"] > 0 and again["cost"]["reused_from_cache"] == 0
    assert again["cost"]["clip_evaluations"] == first["cost"]["clip_evaluations"]


def test_write_on_helps_is_mam_merge(control, tmp_path, mam):
    rep = _search(control, lams=[0.5], layers=["all"])
    target, source = control[0], control[1]
    with resolve(str(target)) as t, resolve(str(source)) as s:
        made = S.write_pick(rep, t, [s], tmp_path / "out")
    assert made is not None
    assert mam("merge", source, target, "--lam", "0.5", "-o", tmp_path / "ref", "-q").code == 0
    assert load_file(tmp_path / "out/model.safetensors").keys() == load_file(tmp_path / "ref/model.safetensors").keys()
    for k, v in load_file(tmp_path / "ref/model.safetensors").items():
        assert torch.equal(v, load_file(tmp_path / "out/model.safetensors")[k]), k
    assert "Best on dev: layers all, λ = 0.5" in (tmp_path / "out/README.md").read_text()
    rep["verdict"] = "none"
    assert S.write_pick(rep, target, [], tmp_path / "nothing") is None and not (tmp_path / "nothing").exists()


def test_confidence_sequence_is_wider_than_one_look_and_shrinks():
    from scipy.stats import norm

    one_look = norm.ppf(0.975) / 10  # sd 1, t = 100, a single two-sided test at 5 %
    assert S.cs_radius(1.0, 100, 0.05, 100) > one_look
    assert S.cs_radius(1.0, 400, 0.05, 100) < S.cs_radius(1.0, 100, 0.05, 100)
    assert S.cs_radius(2.0, 100, 0.05, 100) == pytest.approx(2 * S.cs_radius(1.0, 100, 0.05, 100))


def test_anytime_validity_on_simulated_races():
    """Under the null (mean 0), the sequence excludes 0 at *any* of 50 looks in at most about α of the runs;
    a test at each look without correction does so far more often."""
    rng = __import__("numpy").random.default_rng(0)
    from scipy.stats import norm

    runs, looks, step = 400, 50, 10
    x = rng.normal(size=(runs, looks * step))
    cs = naive = 0
    for row in x:
        hit_cs = hit_naive = False
        for t in range(step, looks * step + 1, step):
            m, sd = row[:t].mean(), row[:t].std()
            hit_cs |= abs(m) > S.cs_radius(sd, t, 0.05, 100)
            hit_naive |= abs(m) > norm.ppf(0.975) * sd / t ** 0.5
        cs += hit_cs
        naive += hit_naive
    assert cs / runs <= 0.06 and naive / runs > 0.2


@pytest.mark.parametrize(("kw", "needle"), [({"alpha": 1.5}, "--alpha"), ({"lams": [0.0]}, "λ = 0 always"),
                                            ({"noises": ["pink"]}, "--noise"), ({"budget_clips": 0}, "--budget")])
def test_bad_options_are_one_line(kw, needle):
    with pytest.raises(MamError, match=needle):
        S.SearchOptions(**kw).validate()



def test_speech_recognition_search_reports_the_contract(tiny):
    """WER path on tiny random CTC models: every key scripts read is there, JSON-clean, and nothing "helps"."""
    lj = load_dataset(f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1")
    dev, test = select(lj, "dev", 0.5, 0, limit=8), select(lj, "test", 0.5, 0, limit=8)
    opts = S.SearchOptions(lams=[0.5, 1.0], layers=["all", "1"], round_clips=4, budget_clips=200, resamples=200)
    with resolve(str(tiny("hubert-ctc", layers=2))) as t, resolve(str(tiny("bert", layers=2))) as s:
        rep = S.search(t, [s], dev, test, EvalOptions(batch_size=4), opts)
    rep = json.loads(json.dumps(rep))
    assert rep["verdict"] in ("none", "inconclusive")
    assert set(rep["cost"]) >= {"clip_evaluations", "full_grid_clip_evaluations", "test_clip_evaluations", "seconds"}
    assert rep["cost"]["full_grid_clip_evaluations"] == 5 * 8 and rep["race"]["pairs"] == 10
    assert rep["picked"].keys() >= {"layers", "lam", "column"} and len(rep["rounds"]) == 5
    for block in ("test", "noise_control"):
        assert rep[block] is None or set(S.KEYS) <= set(rep[block])
    if rep["test"] is not None:
        assert "bootstrap" in rep["test"]["method"]
    assert rep["summary"] == S.summary(rep) and S.race_rows(rep)[0]["candidate"] == "target"


# ---- through the command line --------------------------------------------------------------------------------


def _cli(control, source: int, *extra):
    """`mam search` on the control's manifest, split as the library tests split it (dev 0.5, seed 0)."""
    return ("search", control[0], "--source", control[source], "--data", control[0].parent / "clips.jsonl",
            "--dev-fraction", "0.5", "--lam", "0.5", "--layers", "all", "--batch-size", "8", *extra)


def test_cli_positive_control_helps_writes_a_verified_merge_and_reuses_its_cache(control, mam, tmp_path):
    r = mam(*_cli(control, 1, "--write", tmp_path / "out", "-o", tmp_path / "r.json", "--plot", tmp_path / "r.png"))
    assert r.code == 0, r.err
    assert r.out.startswith("The merge at layers all, λ = 0.5, vit-fix helps: Δ ")  # the verdict first
    assert "the race on dev" in r.out and f"wrote {tmp_path / 'out'}" in r.err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verdict"] == "helps" and rep["picked"] == {"layers": "all", "lam": 0.5, "column": "vit-fix",
                                                           "noise": None, "source": str(control[1])}
    assert set(S.KEYS) <= set(rep["test"]) and set(S.KEYS) <= set(rep["noise_control"])
    assert rep["test"]["error"] == 0.0 and rep["test"]["clips"] == len(control[4].items)
    assert {"clip_evaluations", "full_grid_clip_evaluations", "test_clip_evaluations", "seconds"} <= set(rep["cost"])
    assert rep["written"] == str(tmp_path / "out") and (tmp_path / "r.png").stat().st_size > 1000
    assert mam("verify", tmp_path / "out", "--format", "csv").code == 0
    assert "Best on dev: layers all, λ = 0.5" in (tmp_path / "out/README.md").read_text()
    again = mam(*_cli(control, 1, "--format", "json", "-q"))
    assert again.code == 0, again.err
    cost = json.loads(again.out)["cost"]
    assert cost["reused_from_cache"] == cost["clip_evaluations"] + cost["test_clip_evaluations"] > 0


def test_search_on_two_processes_equals_one(control, mam, tmp_path, monkeypatch):
    """Under torchrun each round's dev clips and the test split are sharded over the processes: the race (rounds,
    candidates left, bounds), the pick, the test confirmation and its noise control are one process's. Each run
    starts from an empty per-clip cache, so both compute every clip."""
    args = _cli(control, 1, "--lam", "0.25,0.5", "--layers", "0", "--format", "json")
    run = torchrun(*args, "-o", tmp_path / "two.json", env={"MAM_CACHE_DIR": str(tmp_path / "cache-two")})
    assert run.returncode == 0, run.stderr[-3000:]
    monkeypatch.setenv("MAM_CACHE_DIR", str(tmp_path / "cache-one"))
    one_run = mam(*args, "-o", tmp_path / "one.json")
    assert one_run.code == 0, one_run.err
    assert run.stderr.count("reading ") == one_run.err.count("reading ") > 0  # progress from the main process only
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert json.loads(run.stdout)["verdict"] == one["verdict"] == "helps"  # stdout: exactly one JSON document
    assert two["cost"]["reused_from_cache"] == one["cost"]["reused_from_cache"] == 0
    assert timeless(two) == timeless(one)
    assert one["test"]["clips"] == len(control[4].items) and one["noise_control"]["clips"] == len(control[4].items)


def test_cli_noise_source_writes_nothing_and_says_so(control, mam, tmp_path):
    r = mam(*_cli(control, 2, "--write", tmp_path / "out", "--format", "csv"))
    assert r.code == 0, r.err
    assert r.out.startswith("candidate,clips,error,bound_lo,bound_hi,left_round,reason\ntarget,")
    assert any(f"verdict {v}: no merge written to {tmp_path / 'out'}" in r.err for v in ("none", "inconclusive"))
    assert not (tmp_path / "out").exists()


def test_cli_cache_key_holds_the_alignment(tiny, mam, tmp_path):
    """--align weights through search: the merged candidates are new to the cache (their predictions depend on
    the alignment), λ = 0 is not; the report states the alignment, solved once per layer set."""
    lj = f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1"
    args = ("search", tiny("hubert-ctc", layers=2), "--source", tiny("bert", layers=2), "--data", lj, "--limit", "4",
            "--dev-fraction", "0.5", "--lam", "0.5,1", "--layers", "all", "--seed", "3", "--format", "json", "-q")
    plain = mam(*args)
    assert plain.code == 0, plain.err
    r = mam(*args, "--align", "weights")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["alignment"]["mode"] == "weights" and rep["alignment"]["solved"] == 1
    assert rep["options"]["align"] == "weights"
    # λ = 0's clips came from the cache, none of the aligned candidates' did
    assert rep["rounds"][0]["clips"] == 4 <= rep["cost"]["reused_from_cache"] < rep["cost"]["clip_evaluations"]
    r = mam(*args, "--align", "activations")  # pooled from the dev clips alone, and another cache entry again
    assert r.code == 0, r.err
    act = json.loads(r.out)
    assert act["alignment"]["mode"] == "activations" and act["alignment"]["data"]["pairs"] == 4
    assert act["alignment"]["data"]["split"] == "dev"
    assert act["cost"]["reused_from_cache"] == rep["cost"]["reused_from_cache"]


def test_cli_shows_the_race_on_a_terminal(tiny, mam, monkeypatch):
    """On a terminal stderr follows the race round by round (candidates left, clips seen, time left); stdout
    holds the verdict sentence first, as the JSON report's summary states it."""
    import io

    from rich.console import Console

    import mamcli.cli

    buf = io.StringIO()
    monkeypatch.setattr(mamcli.cli, "err", Console(file=buf, force_terminal=True, width=160))
    lj = f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1"
    args = ("search", tiny("hubert-ctc", layers=2), "--source", tiny("bert", layers=2), "--data", lj, "--limit", "4",
            "--dev-fraction", "0.5", "--lam", "0.5", "--seed", "5")
    r = mam(*args)
    assert r.code == 0, r.err
    shown = buf.getvalue()
    assert "racing 2 candidates (λ = 0 among them) on 4 dev clips" in shown
    assert "round 1: " in shown and "candidates left, 4 of 4 dev clips seen" in shown and " s left" in shown
    assert r.out.split("\n", 1)[0] == json.loads(mam(*args, "--format", "json", "-q").out)["summary"]


def test_the_verdict_sentence_gives_differences_in_points_and_the_gain_an_interval_still_allows():
    """An unconfirmed pick is 'no detectable gain' with the gain its test interval still allows, in pp."""
    diff = {"delta": -0.0013, "delta_lo": -0.0045, "delta_hi": 0.0017, "clips": 272}
    rep = {"verdict": "inconclusive", "picked": {"layers": "2", "lam": 0.05, "column": "minilm"}, "test": diff,
           "source_vs_noise": {"source_beat_noise": False}, "race": {"survivors": ["target", "2|0.05|minilm"]},
           "cost": {"clip_evaluations": 592, "share_of_full_grid": 0.2495, "full_grid_clip_evaluations": 2373}}
    assert S.summary(rep) == (
        "Dev picked layers 2, λ = 0.05, minilm, but test does not confirm it: Δ -0.13 pp [-0.45, +0.17] on 272 "
        "test clips (no detectable gain: the interval allows up to 0.45 pp); it did not beat noise of the same "
        "statistics; dev cost 592 clip evaluations, 25% of the full grid's 2373; 2 survivors left unseparated.")
