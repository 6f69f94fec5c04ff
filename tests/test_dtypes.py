"""Half-precision checkpoints work everywhere: a bf16 or fp16 output of `mam merge` evaluates, ranks and
fine-tunes, computed in float32 on CPU, and the report says which dtype was stored and which computed."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from conftest import SHARED

LJ = f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1"


@pytest.mark.parametrize("dtype,stored", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_half_precision_outputs_evaluate_rank_and_finetune(dtype, stored, tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    half = tmp_path / "half"
    assert mam("merge", src, tgt, "--lam", "0.1", "--out-dtype", dtype, "-o", half, "-q").code == 0
    with safe_open(str(half / "model.safetensors"), framework="pt") as f:
        assert str(f.get_tensor("hubert.encoder.layers.0.attention.q_proj.weight").dtype) == f"torch.{stored}"
    r = mam("evaluate", half, "--data", LJ, "--limit", "2", "-o", tmp_path / "e.json", "-q")
    assert r.code == 0, r.err
    ev = json.loads((tmp_path / "e.json").read_text())["evaluation"]
    assert ev["dtype"] == "float32" and ev["stored_dtype"] == stored
    r = mam("rank-layers", src, half, "--data", LJ, "--limit", "3", "--top-k", "1", "-q", "--format", "json")
    assert r.code == 0, r.err
    assert len(json.loads(r.out)["metrics"]["swd"]["scores"]) == 2
    r = mam("finetune", half, "--data", LJ, "--limit", "4", "--batch-size", "2", "--max-steps", "1",
            "-o", tmp_path / "ft", "-q", "--format", "json")
    assert r.code == 0, r.err


def test_dtype_option_computes_in_bfloat16_and_says_so(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    r = mam("evaluate", tgt, "--data", LJ, "--limit", "2", "--dtype", "bfloat16", "-q", "-o", tmp_path / "e.json")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "e.json").read_text())["evaluation"]["dtype"] == "bfloat16"
    r = mam("rank-layers", src, tgt, "--data", LJ, "--limit", "3", "--top-k", "1", "--dtype", "bfloat16", "-q",
            "--format", "json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["dtype"] == "bfloat16"
    r = mam("evaluate", tgt, "--data", LJ, "--limit", "2", "--dtype", "float16", "--device", "cpu")
    assert r.code == 1 and r.err.strip() == "mam: error: --dtype float16 needs a GPU; on CPU use float32 or bfloat16"
    r = mam("evaluate", tgt, "--data", LJ, "--dtype", "float8")
    assert r.code == 2 and "--dtype" in r.err
