"""Merge recipes: every merge writes mam_recipe.yaml, and `mam merge --config` replays it to the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def pair(tiny):
    return tiny("bert", layers=3), tiny("hubert-ctc", layers=3)


def _hashes(out: Path) -> dict[str, str]:
    """Every output file's hash but the model card's, which names the command that made it."""
    hashes = json.loads((out / "mam_report.json").read_text())["outputs"]["hashes"]
    assert "model.safetensors" in hashes or "model.safetensors.index.json" in hashes
    return {k: v for k, v in hashes.items() if k != "README.md"}


@pytest.mark.parametrize("flags", [["--lam", "0.2", "--layers", "0,2"],
                                   ["--lam", "0.3", "--noise", "source", "--seed", "4", "--out-dtype", "fp16"],
                                   ["--lam", "0.1", "--parts", "q,v", "--bias", "--shard-size", "30KB"]])
def test_recipe_round_trip_is_byte_identical(pair, mam, tmp_path, flags):
    assert mam("merge", *pair, *flags, "-o", tmp_path / "a", "-q").code == 0
    recipe = tmp_path / "a" / "mam_recipe.yaml"
    assert recipe.read_text().startswith("# mam ")
    r = mam("merge", "--config", recipe, "-o", tmp_path / "b", "-q")
    assert r.code == 0, r.err
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")


def test_recipe_from_a_lams_file_round_trips(pair, mam, tmp_path):
    (tmp_path / "lams.json").write_text(json.dumps({"lams": {"q": [0.1, 0, 0.5], "k": [0, 0, 0.25],
                                                             "v": [1, 0, 0]}}))
    assert mam("merge", *pair, "--lams", tmp_path / "lams.json", "-o", tmp_path / "a", "-q").code == 0
    assert mam("merge", "--config", tmp_path / "a" / "mam_recipe.yaml", "-o", tmp_path / "b", "-q").code == 0
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")


def test_hand_written_recipe_and_flags_that_win(pair, mam, tmp_path):
    src, tgt = pair
    (tmp_path / "r.yaml").write_text(f"source: {src}\ntarget: {tgt}\nlam: 0.4\nlayers: [1, 2]\nseed: 3\n")
    assert mam("merge", "--config", tmp_path / "r.yaml", "-o", tmp_path / "a", "-q").code == 0
    assert mam("merge", *pair, "--lam", "0.4", "--layers", "1-2", "--seed", "3", "-o", tmp_path / "b", "-q").code == 0
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    # a flag given on the command line replaces the recipe's value
    assert mam("merge", "--config", tmp_path / "r.yaml", "--lam", "0.1", "-o", tmp_path / "c", "-q").code == 0
    assert json.loads((tmp_path / "c" / "mam_report.json").read_text())["recipe"]["lams"]["q"] == [0, 0.1, 0.1]


@pytest.mark.parametrize("flags", [["--lam", "0.2", "--layers", "0,2"],
                                   ["--lam", "0.4", "--noise", "source", "--seed", "2", "--bias"]])
def test_aligned_recipe_replays_the_same_bytes(pair, mam, tmp_path, flags):
    """The recipe of an aligned merge names its mam_align.json: the replay reads those permutations (no solve)
    and writes the same weights and the same permutation file; only the recipe's own path differs."""
    assert mam("merge", *pair, *flags, "--align", "weights", "-o", tmp_path / "a", "-q").code == 0
    recipe = tmp_path / "a" / "mam_recipe.yaml"
    assert f"align: {tmp_path / 'a' / 'mam_align.json'}" in recipe.read_text().splitlines()
    r = mam("merge", "--config", recipe, "-o", tmp_path / "b", "-q")
    assert r.code == 0, r.err
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert a.pop("mam_recipe.yaml") != b.pop("mam_recipe.yaml")  # each names its own mam_align.json
    assert a == b and "mam_align.json" in a
    for f in ("model.safetensors", "mam_align.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    report = json.loads((tmp_path / "b" / "mam_report.json").read_text())
    assert report["recipe"]["align"] == "weights" and report["alignment"]["mode"] == "weights"
    unaligned = tmp_path / "c"
    assert mam("merge", *pair, *flags, "-o", unaligned, "-q").code == 0
    assert (unaligned / "model.safetensors").read_bytes() != (tmp_path / "a" / "model.safetensors").read_bytes()
    # --align on the command line wins over the recipe's file: the unaligned merge again, byte for byte
    assert mam("merge", "--config", recipe, "--align", "none", "-o", tmp_path / "d", "-q").code == 0
    assert (tmp_path / "d" / "model.safetensors").read_bytes() == (unaligned / "model.safetensors").read_bytes()


def test_hand_written_recipe_names_the_alignment_mode(pair, mam, tmp_path):
    src, tgt = pair
    (tmp_path / "r.yaml").write_text(f"source: {src}\ntarget: {tgt}\nlam: 0.3\nalign: weights\n")
    assert mam("merge", "--config", tmp_path / "r.yaml", "-o", tmp_path / "a", "-q").code == 0
    assert mam("merge", *pair, "--lam", "0.3", "--align", "weights", "-o", tmp_path / "b", "-q").code == 0
    assert _hashes(tmp_path / "a") != _hashes(tmp_path / "b")  # the recipes name their own permutation files
    for f in ("model.safetensors", "mam_align.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


@pytest.mark.parametrize("text,code,needle", [
    ("lam: 0.1\nlamda: 0.2\n", 2, "unknown key 'lamda'"),
    ("lam: [0.1\n", 1, "not valid YAML"),
    ("- 0.1\n", 1, "expected a mapping"),
    ("lam: high\n", 1, "field lam: input should be a valid number (got str)"),
    ("lam: 0.1\nnoise: pink\n", 1, "field noise: input should be 'source', 'target' or 'normal' (got str)"),
    ("lam: 0.1\nout_dtype: fp8\n", 1, "field out_dtype: input should be 'fp32', 'fp16' or 'bf16'"),
    ("lam: 0.1\nseed: true\n", 1, "field seed: input should be a valid integer (got bool)"),
    ("lam: 0.1\nshard_size: lots\n", 1, "bad size 'lots'"),
    ("source: /no/such/model\ntarget: /no/such/either\nlam: 0.1\n", 1, "does not exist"),
    ("lams: {q: [0.1, 2, 0]}\n", 1, "field lams.q[1]: input should be less than or equal to 1"),
    ("lam: 0.1\nalign: sideways\n", 1, "field align: value error, must be one of none, weights, activations or "
                                      "a path to a mam_align.json (got str)"),
    ("lam: 0.1\nalign: /no/such/mam_align.json\n", 1, "alignment file /no/such/mam_align.json does not exist"),
])
def test_bad_recipes(pair, mam, tmp_path, text, code, needle):
    (tmp_path / "r.yaml").write_text(text)
    args = [] if "source" in text else [str(p) for p in pair]
    r = mam("merge", *args, "--config", tmp_path / "r.yaml", "-o", tmp_path / "o")
    assert r.code == code, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.err
    assert not (tmp_path / "o").exists()


def test_recipe_is_not_copied_into_a_merge_of_a_merge(pair, mam, tmp_path):
    src, _ = pair
    assert mam("merge", *pair, "--lam", "0.1", "-o", tmp_path / "a", "-q").code == 0
    assert mam("merge", src, tmp_path / "a", "--lam", "0.2", "-o", tmp_path / "b", "-q").code == 0
    recipe = (tmp_path / "b" / "mam_recipe.yaml").read_text()
    assert f"target: {tmp_path / 'a'}" in recipe


def test_recipe_values_arrive_typed(pair, mam, tmp_path):
    """A recipe's out, λ file, arch map and shard size take the types the merge needs from the recipe schema:
    the merge reads them as if given as flags."""
    src, tgt = pair
    (tmp_path / "lams.json").write_text(json.dumps({"lams": [0.5, 0, 0.25]}))
    (tmp_path / "r.yaml").write_text(f"source: {src}\ntarget: {tgt}\nout: {tmp_path / 'a'}\n"
                                     f"lams: {tmp_path / 'lams.json'}\nshard_size: 20000\narch_map: []\n")
    r = mam("merge", "--config", tmp_path / "r.yaml", "-q")
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "a" / "mam_report.json").read_text())
    assert report["recipe"]["lams"]["v"] == [0.5, 0, 0.25]
    assert sorted(report["outputs"]["hashes"])[:2] == ["README.md", "config.json"]
    assert len([f for f in report["outputs"]["hashes"] if f.endswith(".safetensors")]) > 1  # sharded at 20 kB


def test_recipe_schema_names_the_choices_merge_takes():
    """The recipe schema spells out --noise, --out-dtype and --align's modes (merge and align import torch; the
    schema must not): the same."""
    from typing import get_args

    from mamcli import align, schemas
    from mamcli.merge import NOISE_KINDS, OUT_DTYPES
    from mamcli.schemas import MergeRecipe

    def choices(field: str) -> set[str]:
        (literal, _none) = get_args(MergeRecipe.model_fields[field].annotation)
        return set(get_args(literal))

    assert choices("noise") == set(NOISE_KINDS) and choices("out_dtype") == set(OUT_DTYPES)
    assert schemas.ALIGN_MODES == align.ALIGN_MODES
