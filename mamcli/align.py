"""Align the source to the target before interpolating (``--align weights|activations``).

Eq. 1 adds a source unit to the target unit of the same index, yet the source's hidden unit 17 has nothing to
do with the target's unit 17. A source can be re-indexed without changing what it computes: one permutation
π of its hidden dimension (the residual stream, which every layer reads and writes in one basis), and per
layer permutations of the attention rows that leave attention intact: whole source heads moved as blocks
(one block order σ for Q, K and V alike, since head s's scores weight head s's values) and, within a head,
one order for the Q and K rows together (q·k is a sum over them) and one for the V rows (the output
projection's columns follow them). The aligned source tensor is ``S[ρ][:, π]`` (biases ``b[ρ]``), so the merge
is ``λ · P_out · W_s · P_inᵀ + (1 − λ) · W_t`` and nothing but the order of the source's numbers changes.

The constraint uses the source's heads, whatever the target's: the permuted source is the source, so a
12 × 32 text source aligns to a 6 × 64 target by moving its 32-row heads. See docs/align.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mamcli.errors import MamError

if TYPE_CHECKING:
    from mamcli.checkpoint import Checkpoint
    from mamcli.data import Dataset
    from mamcli.families import Family
    from mamcli.merge import MergePlan, Pair

ALIGN_MODES = ("none", "weights", "activations")
ALIGN_FILE = "mam_align.json"
ALIGN_VERSION = 1
ROW_GROUP = {"q": "qk", "k": "qk", "v": "v"}  # parts that share a row permutation
MAX_ITERATIONS = 50
TOLERANCE = 1e-10  # objective gain (sum of cosines) below which the alternation stops


@dataclass
class ActivationStats:
    """Pooled hidden states of paired data: ``target[n, i]`` and ``source[n, j]`` are the outputs of block i / j
    for pair n (rank-layers' vectors: mean over valid frames / tokens)."""

    target: np.ndarray  # (pairs, target layers, hidden)
    source: np.ndarray  # (pairs, source layers, hidden)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Alignment:
    """The permutations applied to the source: aligned column c reads source column ``hidden[c]``; aligned row r
    of target layer i, part p reads source row ``rows[i][ROW_GROUP[p]][r]``."""

    mode: str
    hidden: torch.Tensor
    rows: dict[int, dict[str, torch.Tensor]]
    heads: int
    score: dict[str, Any] = field(default_factory=dict)
    raw: str | None = None  # the file's own text when replayed, so the replay writes the same bytes

    def apply(self, pair: Pair, tensor: torch.Tensor) -> torch.Tensor:
        """``S[ρ][:, π]`` for a weight, ``b[ρ]`` for a bias: exact gathers, no arithmetic."""
        rows = self.rows[pair.layer][ROW_GROUP[pair.part]].to(tensor.device)
        out = tensor.index_select(0, rows)
        return out.index_select(1, self.hidden.to(tensor.device)) if tensor.dim() == 2 else out

    def dumps(self) -> str:
        """The ``mam_align.json`` text: one key a line, each value compact (a permutation on one line); a replayed
        file's own text, so a replay's output holds the same bytes."""
        if self.raw is not None:
            return self.raw
        doc = {"version": ALIGN_VERSION, "mode": self.mode, "heads": self.heads,
               "convention": "aligned source = S[rows][:, hidden] (biases b[rows]); rows per target layer, "
                             "qk for Q and K, v for V",
               "hidden": self.hidden.tolist(),
               "rows": {str(i): {g: p.tolist() for g, p in groups.items()} for i, groups in sorted(self.rows.items())},
               "score": self.score}
        return "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items()) + "\n}\n"

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "file": ALIGN_FILE, "heads": self.heads, "layers": sorted(self.rows),
                **self.score}


# ---- linear assignment ---------------------------------------------------------------------

def _assign(score: torch.Tensor) -> torch.Tensor:
    """The permutation p maximising Σ_r score[r, p[r]] (scipy's linear_sum_assignment, exact)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    assert np.array_equal(rows, np.arange(len(rows)))
    return torch.from_numpy(cols.astype(np.int64))


def solve_rows(sims: Mapping[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """Row permutations per group (``qk``, ``v``) maximising Σ_g Σ_r sims[g][r, ρ_g[r]] over the permutations
    that keep the source's heads: one head order σ for every group, any order within a head per group.
    Exact: for a fixed σ the within-head orders are independent assignments, so every (position, source
    head) pair is solved first and σ is the assignment over their totals."""
    d = next(iter(sims.values())).shape[0]
    h = d // heads
    cost = torch.zeros(heads, heads, dtype=torch.float64)
    within: dict[tuple[str, int, int], torch.Tensor] = {}
    for g, sim in sims.items():
        blocks = sim.reshape(heads, h, heads, h).permute(0, 2, 1, 3)  # [position b, source head s, row, row]
        for b in range(heads):
            for s in range(heads):
                perm = _assign(blocks[b, s])
                within[g, b, s] = perm
                cost[b, s] += blocks[b, s][torch.arange(h), perm].sum()
    sigma = _assign(cost)
    return {g: torch.cat([int(sigma[b]) * h + within[g, b, int(sigma[b])] for b in range(heads)]) for g in sims}


# ---- the tensors the solvers read ----------------------------------------------------------------

@dataclass
class _Layer:
    """One merged target layer: unit-norm float64 target and donor weights per part."""

    layer: int
    source_layer: int
    target: dict[str, torch.Tensor]
    source: dict[str, torch.Tensor]


def _unit(w: torch.Tensor) -> torch.Tensor:
    w = w.to(torch.float64)
    n = w.norm()
    return w / n if n > 0 else w


def gather_layers(plan: MergePlan, pair_tensors: Callable[[Pair], tuple[torch.Tensor, torch.Tensor]]
                  ) -> list[_Layer]:
    """Every merged weight, grouped by target layer; ``pair_tensors(p)`` → (target, donor) as merged."""
    layers: dict[int, _Layer] = {}
    for p in plan.pairs:
        if p.kind != "weight":
            continue
        t, s = pair_tensors(p)
        lay = layers.setdefault(p.layer, _Layer(p.layer, p.source_layer, {}, {}))
        lay.target[p.part], lay.source[p.part] = _unit(t.cpu()), _unit(s.cpu())
    return [layers[i] for i in sorted(layers)]


def _row_sims(lay: _Layer, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    sims: dict[str, torch.Tensor] = {}
    for part, t in lay.target.items():
        g = ROW_GROUP[part]
        sim = t @ lay.source[part][:, hidden].T
        sims[g] = sims[g] + sim if g in sims else sim
    return sims


def _hidden_sim(layers: list[_Layer], rows: Mapping[int, Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """B[c, c'] = Σ_layers,parts ⟨target column c, row-aligned source column c'⟩."""
    total: torch.Tensor | None = None
    for lay in layers:
        for part, t in lay.target.items():
            b = t.T @ lay.source[part][rows[lay.layer][ROW_GROUP[part]]]
            total = b if total is None else total + b
    assert total is not None
    return total


def _sorted_distance(t: torch.Tensor, s: torch.Tensor, dim: int) -> torch.Tensor:
    """−‖sort(t_a) − sort(s_b)‖² for every slice a of ``t`` and b of ``s`` along ``dim`` (0: columns, 1: rows)."""
    ts, ss = t.sort(dim).values, s.sort(dim).values
    if dim == 1:
        ts, ss = ts.T, ss.T
    return 2 * ts.T @ ss - (ts * ts).sum(0)[:, None] - (ss * ss).sum(0)[None, :]


def _column_start(layers: list[_Layer]) -> torch.Tensor:
    """π matching columns by their sorted values, which no row permutation changes."""
    return _assign(sum((_sorted_distance(t, lay.source[p], 0) for lay in layers for p, t in lay.target.items()),
                       torch.zeros(())))


def _row_start(layers: list[_Layer], heads: int) -> dict[int, dict[str, torch.Tensor]]:
    """Rows matched by their sorted values, which no hidden permutation changes."""
    rows = {}
    for lay in layers:
        sims: dict[str, torch.Tensor] = {}
        for part, t in lay.target.items():
            d = _sorted_distance(t, lay.source[part], 1)
            g = ROW_GROUP[part]
            sims[g] = sims[g] + d if g in sims else d
        rows[lay.layer] = solve_rows(sims, heads)
    return rows


def _mean_cosine(layers: list[_Layer], hidden: torch.Tensor | None,
                 rows: Mapping[int, Mapping[str, torch.Tensor]] | None) -> float:
    vals = []
    for lay in layers:
        for part, t in lay.target.items():
            s = lay.source[part]
            if rows is not None and hidden is not None:
                s = s[rows[lay.layer][ROW_GROUP[part]]][:, hidden]
            vals.append(float((t * s).sum()))
    return round(float(np.mean(vals)), 6)


def _alternate(layers: list[_Layer], heads: int, rows: dict[int, dict[str, torch.Tensor]]
               ) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]], list[float]]:
    """π for fixed rows (one assignment on the summed column similarity), then rows for a fixed π (exact,
    :func:`solve_rows`), until the objective stops rising: no step can lower it."""
    trace: list[float] = []
    while True:
        sim = _hidden_sim(layers, rows)
        hidden = _assign(sim)
        trace.append(float(sim[torch.arange(len(hidden)), hidden].sum()))
        if (len(trace) > 1 and trace[-1] - trace[-2] <= TOLERANCE) or len(trace) == MAX_ITERATIONS:
            return hidden, rows, trace
        rows = {lay.layer: solve_rows(_row_sims(lay, hidden), heads) for lay in layers}


def solve_weights(layers: list[_Layer], heads: int) -> Alignment:
    """Weight matching (Git Re-Basin): maximise Σ cos(W_t, P_out·W_s·P_inᵀ) over every merged Q/K/V weight by
    alternation, from two starts that ignore how the source orders its units (so neither does the result):
    rows for the π of sorted columns, and rows matched by their sorted values. The higher objective wins."""
    hidden = _column_start(layers)
    starts = {"columns": {lay.layer: solve_rows(_row_sims(lay, hidden), heads) for lay in layers},
              "rows": _row_start(layers, heads)}
    runs = {name: _alternate(layers, heads, rows) for name, rows in starts.items()}
    best = max(runs, key=lambda k: runs[k][2][-1])
    hidden, rows, trace = runs[best]
    score = {"cosine": {"identity": _mean_cosine(layers, None, None), "aligned": _mean_cosine(layers, hidden, rows)},
             "start": best, "iterations": len(trace), "objective": [round(v, 6) for v in trace],
             "other_start_objective": round(runs[min(runs, key=lambda k: runs[k][2][-1])][2][-1], 6)}
    return Alignment("weights", hidden, rows, heads, score)


def _centered(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float64) - x.astype(np.float64).mean(0))


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every column of ``a`` with every column of ``b`` (both centred, pairs × units)."""
    na, nb = a.norm(dim=0).clamp_min(1e-30), b.norm(dim=0).clamp_min(1e-30)
    return (a.T @ b) / na[:, None] / nb[None, :]


def _block_input(states: np.ndarray, i: int) -> np.ndarray:
    """The state entering block i: block i−1's output (block 0 reads the embeddings, which rank-layers' vectors
    do not hold: block 0's output stands in, the same residual basis one block on)."""
    return states[:, max(i - 1, 0)]


def _residual(layers: list[_Layer], stats: ActivationStats, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """π from the residual correlations summed over the merged layers, with source pair n matched to target pair
    n + ``shift``; returns π and the summed correlation matrix."""
    resid = sum((_corr(_centered(_block_input(stats.target, lay.layer)),
                       _centered(np.roll(_block_input(stats.source, lay.source_layer), shift, axis=0)))
                 for lay in layers), torch.zeros(()))
    hidden = _assign(resid)
    return hidden, resid


def _matched(sim: torch.Tensor, perm: torch.Tensor) -> float:
    """Mean of ``sim[r, perm[r]]``: the similarity a permutation achieves (identity: the diagonal)."""
    return float(sim[torch.arange(len(perm)), perm].mean())


def solve_activations(layers: list[_Layer], heads: int, stats: ActivationStats) -> Alignment:
    """Activation matching: π from the correlation of target and source residual units over the paired data,
    summed over the merged layers; each layer's rows from the correlation of the Q/K/V outputs, computed from
    the cross-covariance of that layer's inputs (a linear map's outputs correlate as W_t·C_ts·W_sᵀ). The
    source's outputs do not depend on π (W_s·P_inᵀ·P_in·x = W_s·x), so rows and π are independent: no
    alternation. The score also gives the matched correlation with the pairing broken (source pair n against
    target pair n + N/2): what matching finds by chance in this many pairs."""
    if stats.target.shape[-1] != stats.source.shape[-1]:
        raise MamError("activation statistics: target and source widths differ")
    hidden, resid = _residual(layers, stats, 0)
    shuffled_hidden, shuffled_sim = _residual(layers, stats, len(stats.source) // 2)
    shuffled = _matched(shuffled_sim, shuffled_hidden)
    identity = torch.arange(len(hidden))
    rows, row_corr = {}, {"identity": [], "aligned": []}
    for lay in layers:
        xt = _centered(_block_input(stats.target, lay.layer))
        xs = _centered(_block_input(stats.source, lay.source_layer))
        corrs = {part: _corr(xt @ t.T, xs @ lay.source[part].T) for part, t in lay.target.items()}
        sims: dict[str, torch.Tensor] = {}
        for part, c in corrs.items():
            g = ROW_GROUP[part]
            sims[g] = sims[g] + c if g in sims else c
        rows[lay.layer] = solve_rows(sims, heads)
        for part, c in corrs.items():
            row_corr["identity"].append(_matched(c, torch.arange(len(c))))
            row_corr["aligned"].append(_matched(c, rows[lay.layer][ROW_GROUP[part]]))
    n = len(layers)
    score = {"cosine": {"identity": _mean_cosine(layers, None, None), "aligned": _mean_cosine(layers, hidden, rows)},
             "residual_correlation": {"identity": round(_matched(resid, identity) / n, 6),
                                      "aligned": round(_matched(resid, hidden) / n, 6),
                                      "aligned_shuffled_pairs": round(shuffled / n, 6)},
             "row_correlation": {k: round(float(np.mean(v)), 6) for k, v in row_corr.items()},
             "pairs": int(stats.target.shape[0]), "data": stats.data}
    return Alignment("activations", hidden, rows, heads, score)


# ---- replay ---------------------------------------------------------------------------------

def _perm(values: Any, n: int, what: str, path: Path) -> torch.Tensor:
    if not isinstance(values, list) or sorted(values) != list(range(n)):
        raise MamError(f"alignment file {path}: {what} is not a permutation of 0..{n - 1}")
    return torch.tensor(values, dtype=torch.int64)


def load_alignment(path: Path, plan: MergePlan) -> Alignment:
    """Read a ``mam_align.json`` and check that it fits ``plan``: every merged layer and row group present,
    permutations of the right lengths that keep the recorded heads whole."""
    try:
        raw = path.read_text(encoding="utf-8")
        doc = json.loads(raw)
        mode, heads, hidden, rows = doc["mode"], int(doc["heads"]), doc["hidden"], doc["rows"]
        if mode not in ALIGN_MODES[1:]:
            raise ValueError(mode)
    except FileNotFoundError:
        raise MamError(f"alignment file {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise MamError(f"{path} is not a mam alignment file (mode, heads, hidden, rows)") from None
    width = plan.target.hidden or len(hidden)
    perms: dict[int, dict[str, torch.Tensor]] = {}
    for p in plan.pairs:
        groups = rows.get(str(p.layer)) if isinstance(rows, dict) else None
        g = ROW_GROUP[p.part]
        if not isinstance(groups, dict) or g not in groups:
            raise MamError(f"alignment file {path} has no {g} rows for merged layer {p.layer}")
        perm = _perm(groups[g], p.shape[0], f"layer {p.layer} {g} rows", path)
        if heads < 1 or p.shape[0] % heads or not _keeps_heads(perm, heads):
            raise MamError(f"alignment file {path}: layer {p.layer} {g} rows do not keep {heads} heads whole")
        perms.setdefault(p.layer, {})[g] = perm
    return Alignment(mode, _perm(hidden, width, "hidden", path), perms, heads, doc.get("score", {}), raw)


def _keeps_heads(perm: torch.Tensor, heads: int) -> bool:
    h = len(perm) // heads
    blocks = perm.reshape(heads, h) // h
    return bool((blocks == blocks[:, :1]).all())


def check_alignable(plan: MergePlan) -> int:
    """The source's number of heads, or a one-line refusal of what alignment cannot permute."""
    if "o" in plan.options.parts:
        raise MamError("--align permutes Q, K and V only; merge the output projection (--parts …,o) unaligned")
    src = plan.source
    if not src.heads or not src.hidden or src.hidden % src.heads:
        raise MamError(f"--align needs the source's head layout to keep heads whole; {src.describe()} does not "
                       "state its number of heads")
    return src.heads


# ---- paired data (rank-layers' vectors) ---------------------------------------------------------

def collect_activations(source: Checkpoint, target: Checkpoint, ds: Dataset, families: tuple[Family, ...], *,
                        device: str = "cpu", batch_size: int | None = None, dtype: str | None = None,
                        strict: bool = False) -> ActivationStats:
    """Speech clips through the target and their transcripts through the source, pooled as rank-layers pools
    them (:mod:`mamcli.rank`). An image source has no pairing with speech clips: refused in one line."""
    from mamcli.distributed import read_batches
    from mamcli.models import compute_dtype, default_batch_size, load_audio_model, load_text_model
    from mamcli.rank import pooled_audio, pooled_text

    src_arch = source.arch(families)
    if src_arch.family.modality != "text":
        raise MamError(f"--align activations pairs speech clips with their transcripts, which {source.spec} "
                       f"({src_arch.family.modality} model) cannot read; use --align weights")
    if any(not i.text for i in ds.items):
        raise MamError("--align activations needs a transcript for every clip")
    cdtype = compute_dtype(dtype, device)
    am = load_audio_model(target, "encode", device, dtype=cdtype)
    tm = load_text_model(source, device, dtype=cdtype)
    bs = batch_size or default_batch_size(am.model)
    shard = read_batches(ds, am, bs, strict=strict)
    audio = pooled_audio(am, [c for b in shard.batches for c in b], bs)
    text = pooled_text(tm, {i.id: i.text or "" for i in shard.items}, bs)
    ids = sorted(audio)
    if len(ids) < 2:
        raise MamError(f"--align activations needs at least 2 usable clips; got {len(ids)}")
    return ActivationStats(np.stack([audio[k] for k in ids]), np.stack([text[k] for k in ids]),
                           {**ds.describe(), "pairs": len(ids)})
