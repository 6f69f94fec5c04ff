"""Alignment before interpolating (mamcli/align.py): exact recovery, invariance, the formula to the bit, replay."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import load_dir, same_bytes
from mamcli.align import ALIGN_FILE, ActivationStats, collect_activations
from mamcli.checkpoint import resolve
from mamcli.errors import MamError
from mamcli.families import FAMILIES
from mamcli.merge import MergedTensors, MergeOptions, merge_to_dir, plan_merge, verify_dir

QKV = ("q", "k", "v")
BERT = {"q": "query", "k": "key", "v": "value"}
GROUP = {"q": "qk", "k": "qk", "v": "v"}


def src_name(i: int, p: str, kind: str = "weight") -> str:
    return f"bert.encoder.layer.{i}.attention.self.{BERT[p]}.{kind}"


def tgt_name(i: int, p: str, kind: str = "weight") -> str:
    return f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"


def head_perm(g: torch.Generator, d: int, heads: int) -> dict[str, torch.Tensor]:
    """A random row permutation per group that keeps ``heads`` heads whole (one head order for all groups)."""
    h = d // heads
    sigma = torch.randperm(heads, generator=g)
    return {grp: torch.cat([int(sigma[b]) * h + torch.randperm(h, generator=g) for b in range(heads)])
            for grp in ("qk", "v")}


def inverse(p: torch.Tensor) -> torch.Tensor:
    return torch.argsort(p)


def rewrite(src: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of checkpoint ``src`` with some tensors replaced."""
    shutil.copytree(src, out)
    state = load_file(str(src / "model.safetensors"))
    state.update({k: v.contiguous() for k, v in tensors.items()})
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def permuted_source(src: Path, out: Path, donor: dict[str, torch.Tensor], name: object, layers: int, d: int,
                    heads: int, seed: int) -> tuple[Path, torch.Tensor, dict[int, dict[str, torch.Tensor]]]:
    """``src`` whose Q/K/V (and biases) are ``donor``'s re-indexed by a hidden permutation and per-layer row
    permutations that keep ``heads`` heads whole: aligned = S[rows][:, hidden] recovers the donor."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randperm(d, generator=g)
    rows = {i: head_perm(g, d, heads) for i in range(layers)}
    new = {}
    for i in range(layers):
        for p in QKV:
            r = inverse(rows[i][GROUP[p]])
            new[src_name(i, p)] = donor[name(i, p)][r][:, inverse(hidden)]  # type: ignore[operator]
            b = donor.get(name(i, p, "bias"))  # type: ignore[operator]
            if b is not None:
                new[src_name(i, p, "bias")] = b[r]
    return rewrite(src, out, new), hidden, rows


def merge(src: Path, tgt: Path, out: Path, **kw: object) -> dict:
    with resolve(str(src)) as s, resolve(str(tgt)) as t:
        return merge_to_dir(s, t, MergeOptions(**kw), out)  # type: ignore[arg-type]


def aligned_source(state: dict[str, torch.Tensor], doc: dict, i: int, p: str, kind: str = "weight") -> torch.Tensor:
    rows = torch.tensor(doc["rows"][str(i)][GROUP[p]])
    t = state[src_name(i, p, kind)].index_select(0, rows)
    return t.index_select(1, torch.tensor(doc["hidden"])) if kind == "weight" else t


@pytest.mark.parametrize("src_heads", [4, 8])
def test_permuted_copy_of_the_target_aligns_back_exactly(src_heads, tiny, tmp_path):
    """A source that is the target re-indexed (hidden units, heads as blocks, rows within heads) comes back as
    the target to the bit; with 8 source heads of 4 rows against the target's 4 × 8, the source's heads."""
    bert = tiny("bert", layers=2, heads=src_heads)
    tgt = tiny("whisper-model", layers=2)
    target = load_file(str(tgt / "model.safetensors"))
    src, hidden, _ = permuted_source(bert, tmp_path / "src", target, tgt_name, 2, 32, src_heads, seed=1)
    assert not torch.equal(hidden, torch.arange(32))
    report = merge(src, tgt, tmp_path / "out", lam=1.0, align="weights")
    doc = json.loads((tmp_path / "out" / ALIGN_FILE).read_text())
    state = load_file(str(src / "model.safetensors"))
    merged = load_dir(tmp_path / "out")
    for i in range(2):
        for p in QKV:
            assert torch.equal(aligned_source(state, doc, i, p), target[tgt_name(i, p)])
            assert torch.equal(merged[tgt_name(i, p)], target[tgt_name(i, p)])  # λ = 1: the aligned source
            h = 32 // src_heads
            blocks = torch.tensor(doc["rows"][str(i)][GROUP[p]]).reshape(src_heads, h) // h
            assert (blocks == blocks[:, :1]).all()  # the source's heads stay whole
    assert report["alignment"]["cosine"]["aligned"] == pytest.approx(1.0, abs=1e-9)
    assert report["alignment"]["cosine"]["identity"] < 0.3
    assert report["recipe"]["align"] == "weights"


# how each BertModel tensor is re-indexed when its hidden units and attention rows are: (rows, columns), first match
BERT_PERMUTATION = (
    (r"embeddings\.\w+_embeddings\.weight$", None, "hidden"),
    (r"LayerNorm\.", "hidden", None),
    (r"attention\.self\.(query|key)\.", "qk", "hidden"),
    (r"attention\.self\.value\.", "v", "hidden"),
    (r"attention\.output\.dense\.", "hidden", "v"),  # its columns read the V rows, head by head
    (r"intermediate\.dense\.|pooler\.dense\.", None, "hidden"),
    (r"output\.dense\.", "hidden", None),
)


def permute_bert(state: dict[str, torch.Tensor], hidden: torch.Tensor, rows: dict[int, dict[str, torch.Tensor]]
                 ) -> dict[str, torch.Tensor]:
    """Every tensor of a BertModel re-indexed consistently: new unit c is old unit hidden[c]."""
    out = {}
    for name, t in state.items():
        rule = next(((r, c) for rx, r, c in BERT_PERMUTATION if re.search(rx, name)), (None, None))
        layer = re.search(r"layer\.(\d+)\.", name)
        perm = {"hidden": hidden, **(rows[int(layer[1])] if layer else {})}
        if rule[0] is not None:
            t = t.index_select(0, perm[rule[0]])
        if rule[1] is not None and t.dim() == 2:
            t = t.index_select(1, perm[rule[1]])
        out[name] = t
    return out


def test_re_indexing_the_source_leaves_the_aligned_merge_unchanged(tiny, tmp_path):
    """Permuting every tensor of the source consistently (hidden units, head order, rows within heads) does not
    change what it computes (its outputs are the same, re-indexed), and the aligned merge is the same bytes."""
    import transformers

    bert = tiny("bert-model", layers=2)
    tgt = tiny("whisper-model", layers=2)
    original = load_file(str(bert / "model.safetensors"))
    g = torch.Generator().manual_seed(2)
    hidden = torch.randperm(32, generator=g)
    shuffled = rewrite(bert, tmp_path / "shuffled",
                       permute_bert(original, hidden, {i: head_perm(g, 32, 4) for i in range(2)}))
    ids = torch.randint(0, 64, (2, 7), generator=g)
    with torch.no_grad():
        before = transformers.BertModel.from_pretrained(bert).eval()(ids).last_hidden_state
        after = transformers.BertModel.from_pretrained(shuffled).eval()(ids).last_hidden_state
    assert torch.allclose(after, before[..., hidden], atol=1e-5) and not torch.allclose(after, before, atol=1e-2)
    a = merge(bert, tgt, tmp_path / "a", lam=0.3, bias=True, align="weights")
    b = merge(shuffled, tgt, tmp_path / "b", lam=0.3, bias=True, align="weights")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tgt / "model.safetensors").read_bytes()
    ma, mb = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert all(same_bytes(ma[k], mb[k]) for k in ma)
    assert a["alignment"]["cosine"]["aligned"] == b["alignment"]["cosine"]["aligned"]  # identity differs
    assert a["alignment"]["cosine"]["aligned"] > a["alignment"]["cosine"]["identity"]
    objective = a["alignment"]["objective"]
    assert all(y >= x for x, y in itertools.pairwise(objective))  # the alternation never loses


def test_aligned_merge_is_the_formula_and_touches_nothing_else(tiny, tmp_path):
    src, tgt = tiny("bert", layers=3), tiny("whisper-model", layers=3)
    report = merge(src, tgt, tmp_path / "o", lam=0.3, layers="0,2", bias=True, align="weights")
    doc = json.loads((tmp_path / "o" / ALIGN_FILE).read_text())
    s, t = load_file(str(src / "model.safetensors")), load_file(str(tgt / "model.safetensors"))
    out = load_dir(tmp_path / "o")
    touched = set()
    for i in (0, 2):
        for p in QKV:
            for kind in ("weight", "bias"):
                if tgt_name(i, p, kind) not in t:  # Whisper's k_proj has no bias
                    continue
                want = 0.3 * aligned_source(s, doc, i, p, kind) + (1 - 0.3) * t[tgt_name(i, p, kind)]
                assert torch.equal(out[tgt_name(i, p, kind)], want)
                touched.add(tgt_name(i, p, kind))
    assert len(touched) == 2 * 5 and sorted(doc["rows"]) == ["0", "2"]
    assert all(same_bytes(out[k], t[k]) for k in t if k not in touched)
    assert {r["target"] for r in report["tensors"]} == touched
    assert report["outputs"]["hashes"][ALIGN_FILE]
    assert verify_dir(tmp_path / "o")["ok"]
    (tmp_path / "o" / ALIGN_FILE).write_text((tmp_path / "o" / ALIGN_FILE).read_text().replace("[", "[ ", 1))
    check = verify_dir(tmp_path / "o")
    assert not check["ok"] and check["files"][ALIGN_FILE]["status"] == "hash mismatch"


def test_replay_from_the_permutation_file_writes_the_same_bytes(tiny, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("whisper-model", layers=2)
    merge(src, tgt, tmp_path / "a", lam=0.2, align="weights")
    recipe = (tmp_path / "a" / "mam_recipe.yaml").read_text()
    assert f"align: {tmp_path / 'a' / ALIGN_FILE}" in recipe
    merge(src, tgt, tmp_path / "b", lam=0.2, align=str(tmp_path / "a" / ALIGN_FILE))
    for f in ("model.safetensors", ALIGN_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    # unaligned outputs keep their bytes: no align key anywhere
    merge(src, tgt, tmp_path / "c", lam=0.2)
    assert not (tmp_path / "c" / ALIGN_FILE).exists()
    assert "align" not in (tmp_path / "c" / "mam_recipe.yaml").read_text()
    # a merge whose target is an aligned merge carries only its own permutations
    merge(src, tmp_path / "a", tmp_path / "d", lam=0.2)
    assert not (tmp_path / "d" / ALIGN_FILE).exists() and verify_dir(tmp_path / "d")["ok"]


def test_noise_donors_are_aligned_by_the_same_procedure(tiny, tmp_path):
    from mamcli.merge import noise_like

    src, tgt = tiny("bert", layers=2), tiny("whisper-model", layers=2)
    real = merge(src, tgt, tmp_path / "real", lam=0.5, align="weights")
    noise = merge(src, tgt, tmp_path / "noise", lam=0.5, noise="source", seed=3, align="weights")
    doc = json.loads((tmp_path / "noise" / ALIGN_FILE).read_text())
    assert doc["hidden"] != json.loads((tmp_path / "real" / ALIGN_FILE).read_text())["hidden"]
    assert noise["alignment"]["cosine"]["aligned"] > noise["alignment"]["cosine"]["identity"] + 0.01
    s, t = load_file(str(src / "model.safetensors")), load_file(str(tgt / "model.safetensors"))
    out = load_dir(tmp_path / "noise")
    n = noise_like("source", s[src_name(1, "v")], t[tgt_name(1, "v")], 3, "1.v.weight")
    aligned = n[torch.tensor(doc["rows"]["1"]["v"])][:, torch.tensor(doc["hidden"])]
    assert torch.equal(out[tgt_name(1, "v")], 0.5 * aligned + 0.5 * t[tgt_name(1, "v")])
    assert real["alignment"]["cosine"]["aligned"] > real["alignment"]["cosine"]["identity"]


def test_activations_recover_a_permuted_copy(tiny, tmp_path):
    """Residual states of the source = the target's re-indexed, source weights likewise: activation matching
    finds the permutations from correlations alone."""
    bert, tgt = tiny("bert", layers=2), tiny("whisper-model", layers=2)
    target = load_file(str(tgt / "model.safetensors"))
    src, hidden, _ = permuted_source(bert, tmp_path / "src", target, tgt_name, 2, 32, 4, seed=4)
    states = np.random.default_rng(0).standard_normal((200, 2, 32)).astype(np.float32)
    stats = ActivationStats(states, states[:, :, inverse(hidden).numpy()], {"pairs": 200})
    report = merge(src, tgt, tmp_path / "out", lam=1.0, align="activations", align_data=stats)
    merged = load_dir(tmp_path / "out")
    assert all(torch.equal(merged[tgt_name(i, p)], target[tgt_name(i, p)]) for i in range(2) for p in QKV)
    assert report["alignment"]["residual_correlation"]["aligned"] == pytest.approx(1.0, abs=1e-9)
    assert report["alignment"]["row_correlation"]["aligned"] == pytest.approx(1.0, abs=1e-9)
    assert report["alignment"]["residual_correlation"]["aligned_shuffled_pairs"] < 0.5  # chance, pairing broken
    assert abs(report["alignment"]["residual_correlation"]["identity"]) < 0.1


def test_refusals(tiny, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("whisper-model", layers=2)
    with resolve(str(src)) as s, resolve(str(tgt)) as t:
        with pytest.raises(MamError, match="Q, K and V only"):
            plan_merge(s, t, MergeOptions(lam=0.1, parts=("q", "k", "v", "o"), align="weights"))
        with pytest.raises(MamError, match="needs paired data"):
            plan_merge(s, t, MergeOptions(lam=0.1, align="activations"))
        with pytest.raises(MamError, match="--align must be one of"):
            plan_merge(s, t, MergeOptions(lam=0.1, align="sideways"))
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"mode": "weights", "heads": 4, "hidden": [0] * 32, "rows": {}}))
        with pytest.raises(MamError, match="no qk rows for merged layer 0"):
            MergedTensors(plan_merge(s, t, MergeOptions(lam=0.1, align=str(bad))), s, t)
        bad.write_text(json.dumps({"mode": "weights", "heads": 4, "hidden": [0] * 32,
                                   "rows": {str(i): {"qk": list(range(32)), "v": list(range(32))} for i in range(2)}}))
        with pytest.raises(MamError, match="hidden is not a permutation"):
            MergedTensors(plan_merge(s, t, MergeOptions(lam=0.1, align=str(bad))), s, t)
    with resolve(str(tiny("vit", layers=2))) as v, resolve(str(tgt)) as t, \
            pytest.raises(MamError, match=r"image model\).*use --align weights"):
        collect_activations(v, t, None, FAMILIES)  # type: ignore[arg-type]


def test_in_memory_merge_equals_the_written_one(tiny, tmp_path):
    """evaluate/search/finetune merge in memory (InMemoryMerger): the aligned tensors are those `merge` writes."""
    import transformers

    from mamcli.models import InMemoryMerger, ModelStore

    src, tgt = tiny("bert", layers=2), tiny("whisper-model", layers=2)
    merge(src, tgt, tmp_path / "o", lam=0.3, align="weights")
    written = load_dir(tmp_path / "o")
    store = ModelStore(transformers.WhisperModel.from_pretrained(tgt).eval(), str(tgt))
    merger = InMemoryMerger(store)
    with resolve(str(src)) as s:
        plan = merger.plan(s, MergeOptions(lam=0.3, align="weights"))
        with merger.applied(s, plan):
            assert all(torch.equal(store.params[tgt_name(i, p)], written[tgt_name(i, p)])
                       for i in range(2) for p in QKV)
    assert torch.equal(store.params[tgt_name(0, "q")], load_file(str(tgt / "model.safetensors"))[tgt_name(0, "q")])


def test_fused_qkv_source_is_aligned_part_by_part(tiny, tmp_path):
    """timm's fused attn.qkv: each part's rows are split off, aligned, and merged into the target's own tensor."""
    src, tgt = tiny("timm-vit", layers=2), tiny("hubert-ctc", layers=2)
    merge(src, tgt, tmp_path / "o", lam=1.0, align="weights")
    doc = json.loads((tmp_path / "o" / ALIGN_FILE).read_text())
    fused, out = load_file(str(src / "model.safetensors")), load_dir(tmp_path / "o")
    for i in range(2):
        for j, p in enumerate(QKV):
            s = fused[f"blocks.{i}.attn.qkv.weight"][32 * j:32 * (j + 1)]
            want = s[torch.tensor(doc["rows"][str(i)][GROUP[p]])][:, torch.tensor(doc["hidden"])]
            assert torch.equal(out[f"hubert.encoder.layers.{i}.attention.{p}_proj.weight"], want)
    assert sorted(doc["hidden"]) == list(range(32)) and doc["hidden"] != list(range(32))
