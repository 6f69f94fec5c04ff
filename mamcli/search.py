"""`mam search`: find a merge that helps on dev, confirm it once on test, or say that none does.

The race (dev split). Every candidate (λ = 0, and each source or noise at each λ and layer set) is scored on
the same clips, a round at a time, in one seeded order of the length-sorted batches. After each round a
candidate leaves when its paired difference to the best candidate so far is above 0 with a bound that holds
at every round at once and for every pair: the asymptotic confidence sequence of Waudby-Smith, Arnold, Wu,
Wang & Ramdas (2024, "Time-uniform central limit theory and asymptotic confidence sequences", Ann. Statist.
52(6)), two-sided at α / P for the P = K(K−1)/2 pairs of K candidates (Bonferroni). It needs no bound on the
per-clip difference (a WER's insertions have none worth using), adapts to its variance, and may be looked
at after every round: a plain test per round would inflate the error rate with every look (F-Race, a
bootstrap per round). The ancestor is the Hoeffding race of Maron & Moore (1997). A candidate that breaks
the model (more clips at the decoder's token bound than λ = 0, or an error above 50 % where λ = 0 is below)
leaves after the first round: it costs the most per clip. The race ends with one survivor, when the clip
budget is spent (default 0.3× the full grid's dev clip evaluations), or when dev is spent.

The confirmation (test split, never seen by the race): the pick against λ = 0 and against noise with the
source's statistics at the same λ and layers, once each (:func:`mamcli.stats.compare`: exact for
classification error, paired bootstrap for WER). ``helps`` only if the pick's interval against λ = 0 lies
below 0; ``inconclusive`` if test does not confirm what dev picked; ``none`` if λ = 0 won on dev.

With ``align`` every merged candidate is aligned before interpolating (the noise ones and the test's control by
the same procedure, :mod:`mamcli.align`), one alignment per donor and layer set shared by its λ; ``activations``
are pooled from dev clips only, so nothing the test split holds shapes the merge it confirms.

Per-clip predictions of every candidate are kept on disk (:func:`mamcli.checkpoint.cache_dir` ``/search``),
keyed by everything that makes them (models, λ, layers, parts, noise, alignment, data, decoding and its
engine, the meaning of clip ids; each clip's file is checked too): a rerun with more
candidates or budget, or after an interruption, runs only what it has not seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mamcli.align import ALIGN_MODES, ActivationStats, Alignment
from mamcli.checkpoint import Checkpoint, cache_dir, sha256_file
from mamcli.data import Dataset
from mamcli.errors import MamError
from mamcli.evaluate import EvalOptions, Evaluator, SweepOptions, alignment_report, share_alignment, sweep
from mamcli.families import FAMILIES, Family
from mamcli.merge import NOISE_KINDS, MergeOptions
from mamcli.metrics import normaliser
from mamcli.models import InMemoryMerger, PrefixCache
from mamcli.report import peak_rss_mib, versions
from mamcli.stats import RESAMPLES, compare, detail_counts, method

Progress = Callable[[str], None] | None
KEYS = ("error", "baseline_error", "delta", "delta_lo", "delta_hi", "better", "worse", "clips")
BUDGET_SHARE = 0.3  # the default budget: this share of the full grid's dev clip evaluations
CLIP_IDS = 2  # the meaning of clip ids in the cache (issue 23 renamed colliding manifest clips)
RACE_METHOD = ("asymptotic confidence sequence (Waudby-Smith, Arnold, Wu, Wang & Ramdas 2024), two-sided, valid at "
               "every round at once; Bonferroni over the candidate pairs")


@dataclass
class SearchOptions:
    """What to race and how sure its decisions must be."""

    lams: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3])  # λ = 0 always races
    layers: list[str] = field(default_factory=lambda: ["all"])  # one layer set each (a spec of parse_layers)
    blocks: int | None = None  # consecutive blocks of N layers instead of ``layers``
    noises: list[str] = field(default_factory=list)  # noise kinds that race beside the sources
    control: str = "source"  # the noise kind of the test's control
    parts: tuple[str, ...] = ("q", "k", "v")
    bias: bool = False
    layer_map: str | None = None
    seed: int = 0  # the order of the clips, the noise and the bootstrap
    alpha: float = 0.05  # the error rate of all the race's drops together, and of the test comparison
    budget_clips: int | None = None  # dev clip evaluations; None: BUDGET_SHARE of the full grid's
    round_clips: int = 16  # clips per round (whole batches: at least this many)
    resamples: int = RESAMPLES
    use_cache: bool = True
    align: str | Path = "none"  # none | weights | activations (a stored mam_align.json is refused: a search solves)
    align_data: ActivationStats | None = field(default=None, repr=False)  # activations: pooled from dev only

    def validate(self) -> None:
        if not 0 < self.alpha < 1:
            raise MamError(f"--alpha must lie strictly between 0 and 1; got {self.alpha}")
        if any(not 0 < lam <= 1 for lam in self.lams):
            raise MamError(f"--lam values of a search must lie in (0, 1] (λ = 0 always races); got {self.lams}")
        if not self.lams:
            raise MamError("a search needs at least one λ > 0")
        for n in [*self.noises, self.control]:
            if n not in NOISE_KINDS:
                raise MamError(f"--noise takes {', '.join(NOISE_KINDS)}; got {n!r}")
        if self.budget_clips is not None and self.budget_clips < 1:
            raise MamError(f"--budget-clips must be at least 1; got {self.budget_clips}")
        if self.round_clips < 1:
            raise MamError(f"clips per round must be at least 1; got {self.round_clips}")
        if self.align not in ALIGN_MODES:
            raise MamError(f"a search solves its own alignments: --align takes {', '.join(ALIGN_MODES)}; got "
                           f"{str(self.align)!r}")
        if self.align == "activations" and self.align_data is None:
            raise MamError("--align activations needs paired data (speech clips with transcripts) from dev")

    def align_key(self) -> dict[str, Any] | None:
        """What the alignment of a merged candidate depends on, for the clip cache: the mode and, for
        activations, the pooled states it was solved from (their digest: other clips, another alignment)."""
        if self.align == "none":
            return None
        if self.align_data is None:
            return {"mode": str(self.align)}
        digest = hashlib.sha256(self.align_data.target.tobytes() + self.align_data.source.tobytes())
        return {"mode": str(self.align), "data": self.align_data.data, "states": digest.hexdigest()[:24]}

    def report(self) -> dict[str, Any]:
        """The options as the report states them (the pooled states are summarised in ``alignment``)."""
        return {**{k: v for k, v in asdict(self).items() if k != "align_data"}, "parts": list(self.parts),
                "align": str(self.align)}

    def layer_sets(self, num_layers: int) -> list[tuple[str, list[int]]]:
        """(label, layers) of every layer set, in the order given, without repeats."""
        sets: dict[str, list[int]] = {}
        for spec in [None] if self.blocks is not None else self.layers:
            sw = SweepOptions(layers=None if spec in (None, "all") else spec, blocks=self.blocks)
            sets.update(dict(sw.layer_sets(num_layers)))
        return list(sets.items())


@dataclass
class Candidate:
    """One point of the grid and what the race learnt of it."""

    key: str
    layers: str | None
    lam: float
    column: str
    noise: str | None = None
    source: int | None = None  # index into the sources
    errors: list[int] = field(default_factory=list)  # per clip seen, in race order
    at_bound: int = 0
    left_round: int | None = None
    reason: str | None = None
    bound: tuple[float, float] | None = None  # its difference to the best, in error-rate units
    trace: list[dict[str, float]] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.left_round is None

    def point(self) -> dict[str, Any]:
        return {"layers": self.layers, "lam": self.lam, "column": self.column, "noise": self.noise}


def _fingerprint(ckpt: Checkpoint) -> str:
    """The weights' hashes (cached by mam's hash cache): a rebuilt model at the same path is another model."""
    return hashlib.sha256("".join(sha256_file(p) for p in ckpt.files).encode()).hexdigest()[:24]


class ClipCache:
    """Per-clip predictions of one candidate on one corpus, on disk: clip id → [prediction, at the bound, the
    clip's place (``Item.place``: its absolute file, or table and row)]. An entry counts only where the place
    matches: an id may name another clip than it did when the entry was kept (issue 23 renamed the clips of
    colliding manifests; a manifest may be rewritten)."""

    def __init__(self, key: dict[str, Any], enabled: bool, main: bool) -> None:
        text = json.dumps(key, sort_keys=True, default=str)
        self.path = cache_dir() / "search" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
        self.key, self.enabled, self.main = key, enabled, main
        self.clips: dict[str, list[Any]] = {}
        if enabled and self.path.is_file():
            try:
                self.clips = json.loads(self.path.read_text())["clips"]
            except (ValueError, KeyError, OSError):
                self.clips = {}  # a torn or foreign file: evaluate again
        self.loaded = set(self.clips)  # kept by an earlier run
        self.reused: set[str] = set()  # of those, the clips this run took instead of evaluating

    def save(self) -> None:
        if not (self.enabled and self.main):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": self.key, "clips": self.clips}))
        os.replace(tmp, self.path)


@dataclass
class _Setup:
    """What the race and the confirmation share: models, merger, plans, caches."""

    target: Checkpoint
    sources: list[Checkpoint]
    merger: InMemoryMerger
    plans: dict[str, Any]
    eval_opts: EvalOptions
    opts: SearchOptions
    base_key: dict[str, Any]
    caches: dict[tuple[str, str], ClipCache] = field(default_factory=dict)
    alignments: dict[Any, Alignment] = field(default_factory=dict)  # one per (donor, noise, layer set)

    def cache(self, cand: Candidate, ds: Dataset, main: bool) -> ClipCache:
        if (cand.key, ds.spec) not in self.caches:
            src = self.sources[cand.source].spec if cand.source is not None else None
            point = {**cand.point(), **({"seed": self.opts.seed} if cand.noise else {}),  # the noise's draw
                     **({"align": self.opts.align_key()} if cand.lam > 0 and self.opts.align != "none" else {})}
            key = {**self.base_key, "data": ds.spec, "text_field": ds.text_field, "point": point,
                   "source": None if src is None or cand.noise in ("target", "normal") else self.base_key[
                       f"source:{src}"]}
            self.caches[cand.key, ds.spec] = ClipCache(key, self.opts.use_cache, main)
        return self.caches[cand.key, ds.spec]


def candidates(sources: list[Checkpoint], sets: list[tuple[str, list[int]]], opts: SearchOptions) -> list[Candidate]:
    """λ = 0 first, then every (layer set, λ, column): each source, and each raced noise (noise:source once per
    source, named after it when there are several; noise:target and noise:normal once)."""
    columns: list[tuple[str, int, str | None]] = [(s.name, i, None) for i, s in enumerate(sources)]
    for n in opts.noises:
        if n == "source":
            columns += [(f"noise:source({s.name})" if len(sources) > 1 else "noise:source", i, n)
                        for i, s in enumerate(sources)]
        else:
            columns.append((f"noise:{n}", 0, n))
    out = [Candidate("target", None, 0.0, "target")]
    out += [Candidate(f"{label}|{lam}|{col}", label, lam, col, noise, i)
            for label, _ in sets for lam in sorted(set(opts.lams)) for col, i, noise in columns]
    return out


def _run(ev: Evaluator, setup: _Setup, cand: Candidate, which: list[int] | None) -> tuple[dict[str, str], set[str]]:
    """Predictions of ``cand`` on this process's batches ``which`` (None: all) and the union's clips at the token
    bound, from the clip cache where it holds every clip (the same decision on every process)."""
    cache = setup.cache(cand, ev.ds, ev.processes.main)
    ids = [i.id for k in (range(len(ev.batches)) if which is None else which) for i in ev.batches[k]]
    everyone = [x for part in ev.processes.all_gather(ids) for x in part]
    where = {i.id: list(i.place) for i in ev.items}  # the file itself, absolute, whatever the cwd
    if all(cache.clips.get(i, [])[2:] == [where[i]] for i in everyone):
        cache.reused.update(i for i in everyone if i in cache.loaded)
        return {i: cache.clips[i][0] for i in everyone}, {i for i in everyone if cache.clips[i][1]}
    if cand.lam > 0:
        donor = setup.sources[cand.source or 0]
        with setup.merger.applied(donor, setup.plans[cand.key]):
            preds = ev.predict(which)
    else:
        preds = ev.predict(which)
    hit = set(ev.at_bound)
    cache.clips.update({i: [p, i in hit, where[i]] for i, p in preds.items()})
    cache.save()
    return preds, hit


def _counts(ev: Evaluator, preds: dict[str, str], hit: set[str]) -> tuple[list[str], list[tuple[int, int]], bool]:
    """(clip ids, (errors, words) per clip, whether the task is classification) of one set of predictions."""
    norm = normaliser(getattr(ev.task, "normalizer", "basic"), getattr(ev.task, "spelling", None))
    scores = ev.score(preds, hit)
    return (*detail_counts(scores, norm), "clips_detail" in scores)


def cs_radius(sd: float, t: int, alpha: float, t_star: int) -> float:
    """Half-width of the two-sided asymptotic confidence sequence for a mean after ``t`` observations (Waudby-Smith
    et al. 2024, Eq. 2.3 form with ρ tuned to be tightest near ``t_star``): valid at every t at once."""
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / t_star
    return sd * math.sqrt(2 * (t * rho2 + 1) / (t * t * rho2) * math.log(math.sqrt(t * rho2 + 1) / alpha))


def _rounds(ev: Evaluator, round_clips: int, seed: int) -> list[list[int]]:
    """Per round, this process's batches: the global batches in one seeded order, cut into rounds of at least
    ``round_clips`` clips; process r holds global batches r, r + size, … (:func:`distributed.read_batches`)."""
    sizes = ev.processes.all_gather([len(b) for b in ev.batches])
    size = ev.processes.size
    total = sum(len(s) for s in sizes)
    order = np.random.default_rng(seed).permutation(total)
    rounds: list[list[int]] = []
    current: list[int] = []
    clips = 0
    for g in order.tolist():
        current.append(g)
        clips += sizes[g % size][g // size]
        if clips >= round_clips:
            rounds.append(current)
            current, clips = [], 0
    if current:
        rounds.append(current)
    rank = ev.processes.rank
    return [sorted(g // size for g in r if g % size == rank) for r in rounds]


def _judge(ran: list[Candidate], words: np.ndarray, alpha_pair: float, t_star: int, round_no: int) -> None:
    """Bound every candidate of this round (``ran``) against the best one still in, and drop those whose difference
    is above 0 beyond the confidence sequence."""
    best = min((c for c in ran if c.alive), key=_rank)
    seen = len(best.errors)
    total_words = float(words[:seen].sum())
    b = np.asarray(best.errors, dtype=float)
    for c in ran:
        d = np.asarray(c.errors, dtype=float) - b
        # a unit pseudo-observation of spread: a difference alike on every clip of a short run is not certainty
        sd = math.sqrt((1.0 + float(((d - d.mean()) ** 2).sum())) / (seen + 1))
        r = cs_radius(sd, seen, alpha_pair, t_star)
        scale = seen / total_words  # mean per-clip difference → difference of pooled error rates
        c.bound = (float(d.mean() - r) * scale, float(d.mean() + r) * scale)
        c.trace.append({"clips": seen, "error": sum(c.errors) / total_words, "lo": c.bound[0], "hi": c.bound[1]})
        if c.alive and c is not best and c.bound[0] > 0:
            c.left_round, c.reason = round_no, f"worse than {best.key} beyond the bound"


def _rank(c: Candidate) -> tuple[float, float, str]:
    """The selection order, one for the race, the pick and ``evaluate --pick-on-dev``: fewest errors, then the
    smaller λ (the gentler merge), then the name."""
    return (sum(c.errors), c.lam, str(c.layers))


def best_point(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The selection rule on a finished sweep's points (lowest error; ties: smaller λ, earlier layers)."""
    return min(points, key=lambda p: (p["error"], p["lam"], str(p["layers"])))


def _degenerate(cands: list[Candidate], words: np.ndarray) -> None:
    """After round one: candidates that broke the model leave (they cost the most per clip)."""
    base = cands[0]
    seen = len(base.errors)

    def rate(c: Candidate) -> float:
        return sum(c.errors) / float(words[:seen].sum())

    for c in cands[1:]:
        if c.alive and c.at_bound > base.at_bound:
            c.left_round, c.reason = 1, f"degenerate: {c.at_bound} clip(s) at the token bound (λ = 0: {base.at_bound})"
        elif c.alive and rate(c) > 0.5 >= rate(base):
            c.left_round, c.reason = 1, f"degenerate: error {rate(c):.1%} above 50 %"


def race(ev: Evaluator, setup: _Setup, cands: list[Candidate], progress: Progress = None) -> dict[str, Any]:
    """Race ``cands`` on ``ev``'s clips (dev) until one is left, the budget is spent or dev is spent."""
    opts = setup.opts
    rounds = _rounds(ev, opts.round_clips, opts.seed)
    n_dev = len(ev.items)
    full = len(cands) * n_dev
    budget = opts.budget_clips if opts.budget_clips is not None else max(1, math.floor(full * BUDGET_SHARE))
    pairs = max(1, len(cands) * (len(cands) - 1) // 2)
    alpha_pair = opts.alpha / pairs
    t_star = max(opts.round_clips, n_dev // 2)
    words: list[int] = []
    spent, started, ended = 0, time.perf_counter(), "dev spent"
    for r, which in enumerate(rounds, 1):
        alive = [c for c in cands if c.alive]
        if len(alive) == 1:
            ended = "one candidate left"
            break
        size = sum(ev.processes.all_gather(sum(len(ev.batches[k]) for k in which)))
        if r > 1 and spent + len(alive) * size > budget:
            ended = "budget spent"
            break
        for c in alive:
            preds, hit = _run(ev, setup, c, which)
            _, counts, _ = _counts(ev, preds, hit)
            c.errors += [e for e, _ in counts]
            c.at_bound += len(hit)
        words += [w for _, w in counts]
        spent += len(alive) * size
        w = np.asarray(words, dtype=float)
        if r == 1:
            _degenerate(cands, w)
        _judge(alive, w, alpha_pair, t_star, r)
        if progress:
            left = [c for c in cands if c.alive]
            pace = (time.perf_counter() - started) / max(spent, 1)
            todo = min(budget - spent, len(left) * (n_dev - len(words)))
            progress(f"round {r}: {len(left)} of {len(cands)} candidates left, {len(words)} of {n_dev} dev clips "
                     f"seen, {spent} of {budget} clip evaluations spent, about {max(todo, 0) * pace:.0f} s left")
    else:
        ended = "one candidate left" if sum(c.alive for c in cands) == 1 else "dev spent"
    return {"ended": ended, "clip_evaluations": spent, "full_grid_clip_evaluations": full, "budget_clips": budget,
            "dev_clips": n_dev, "clips_seen": len(words), "pairs": pairs, "alpha": opts.alpha,
            "alpha_per_pair": alpha_pair, "t_star": t_star, "method": RACE_METHOD,
            "seconds": round(time.perf_counter() - started, 3)}


def _comparison(ev: Evaluator, setup: _Setup, row: Candidate, base: Candidate) -> dict[str, Any]:
    """One test comparison ``row − base`` on every clip of ``ev``, in the issue's keys (+ p and method)."""
    ids_r, counts_r, classification = _counts(ev, *_run(ev, setup, row, None))
    ids_b, counts_b, _ = _counts(ev, *_run(ev, setup, base, None))
    if ids_r != ids_b:
        raise MamError("the test comparison was scored on different clips")  # a bug, not user input
    st = compare(counts_r, counts_b, setup.opts.resamples, setup.opts.seed, classification=classification,
                 confidence=1 - setup.opts.alpha)
    words = sum(w for _, w in counts_b)
    out = {"error": sum(e for e, _ in counts_r) / words, "baseline_error": sum(e for e, _ in counts_b) / words,
           **{k: st[k] for k in ("delta", "delta_lo", "delta_hi", "better", "worse", "shown", "method")},
           "clips": len(counts_b)}
    return out | ({"p_value": st["p_value"], "mid_p": st["mid_p"]} if "p_value" in st else {})


def confirm(test_ev: Evaluator, setup: _Setup, pick: Candidate) -> dict[str, Any]:
    """On test, once: the pick against λ = 0, the noise control against λ = 0, and the pick against the noise."""
    base = Candidate("target", None, 0.0, "target")
    control = Candidate(f"{pick.layers}|{pick.lam}|noise:{setup.opts.control}", pick.layers, pick.lam,
                        f"noise:{setup.opts.control}", setup.opts.control, pick.source)
    if control.key not in setup.plans:
        setup.plans[control.key] = _plan(setup, control)
    test = _comparison(test_ev, setup, pick, base)
    noise = _comparison(test_ev, setup, control, base)
    versus = _comparison(test_ev, setup, pick, control)
    helps = test["shown"] and test["delta_hi"] < 0
    return {"verdict": "helps" if helps else "inconclusive", "test": test,
            "noise_control": {**noise, "column": control.column},
            "source_vs_noise": {**versus, "source_beat_noise": bool(versus["shown"] and versus["delta_hi"] < 0)},
            "test_clip_evaluations": 3 * test["clips"]}


def _plan(setup: _Setup, c: Candidate) -> Any:
    """The candidate's merge plan, aligned as asked (one alignment shared by the λ of a donor and layer set)."""
    so = setup.opts
    o = MergeOptions(lam=c.lam, layers=c.layers, parts=so.parts, bias=so.bias, noise=c.noise, seed=so.seed,
                     layer_map=so.layer_map, align=so.align, align_data=so.align_data)
    donor = setup.sources[c.source or 0]
    plan = setup.merger.plan(donor, o)
    share_alignment(plan, (c.source, c.noise, c.layers), donor, setup.merger.store, setup.alignments)
    return plan


def _setup(ev: Evaluator, target: Checkpoint, sources: list[Checkpoint], eval_opts: EvalOptions,
           opts: SearchOptions, families: tuple[Family, ...]) -> tuple[_Setup, list[Candidate]]:
    arch = ev.store.arch(families)
    cands = candidates(sources, opts.layer_sets(arch.num_layers), opts)
    merger = InMemoryMerger(ev.store, families)
    base_key = {"target": _fingerprint(target), "decoding": {**asdict(eval_opts.task_options()),
                                                             "task": eval_opts.task, "dtype": eval_opts.dtype,
                                                             "batch_size": ev.batch_size,
                                                             "device": str(ev.am.model.device.type)},
                "task": ev.task.describe(),  # how it predicts: a changed engine (Whisper's --fast) is another model
                "parts": list(opts.parts), "bias": opts.bias, "layer_map": opts.layer_map, "clip_ids": CLIP_IDS,
                **{f"source:{s.spec}": _fingerprint(s) for s in sources}}
    setup = _Setup(target, sources, merger, {}, eval_opts, opts, base_key)
    for c in cands[1:]:  # plan everything first: bad input fails before any work
        setup.plans[c.key] = _plan(setup, c)
    first = min((min(p.lams) for p in setup.plans.values() if p.lams), default=0)
    ev.cache = PrefixCache(ev.am.model, arch, first, int(eval_opts.cache_gb * 2**30))
    return setup, cands


def search(target: Checkpoint, sources: list[Checkpoint], dev: Dataset, test: Dataset, eval_opts: EvalOptions,
           opts: SearchOptions, families: tuple[Family, ...] = FAMILIES, progress: Progress = None,
           ticker: Callable[[int, int], None] | None = None, processes: Any = None) -> dict[str, Any]:
    """Race on ``dev``, confirm on ``test``; the report of the issue's JSON contract (on every process of a
    launch; only the main one should print it)."""
    from mamcli.distributed import ALONE

    opts.validate()
    if not sources:
        raise MamError("a search needs at least one --source")
    if {i.id for i in dev.items} & {i.id for i in test.items}:
        raise MamError("dev and test share clips: a search needs disjoint splits")
    started = time.perf_counter()
    procs = processes or ALONE
    ev = Evaluator(target, dev, eval_opts, progress=progress, ticker=ticker, processes=procs)
    setup, cands = _setup(ev, target, sources, eval_opts, opts, families)
    if progress and procs.main:
        progress(f"racing {len(cands)} candidates (λ = 0 among them) on {len(ev.items)} dev clips")
    cost = race(ev, setup, cands, progress if procs.main else None)
    pick = min((c for c in cands if c.alive), key=_rank)
    out: dict[str, Any] = {"command": "search", "verdict": "none",
                           "picked": {**pick.point(), "source": _src(setup, pick)},
                           "test": None, "noise_control": None, "source_vs_noise": None}
    test_clips = 0
    bad = list(ev.bad)
    if pick.lam > 0:
        if progress and procs.main:
            progress(f"dev picked layers {pick.layers}, λ = {pick.lam}, {pick.column}; confirming it on test")
        test_ev = Evaluator(target, test, eval_opts, progress=progress, am=ev.am, ticker=ticker, processes=procs)
        first = min(setup.plans[pick.key].lams or [0])
        test_ev.cache = PrefixCache(ev.am.model, ev.store.arch(families), first, int(eval_opts.cache_gb * 2**30))
        confirmed = confirm(test_ev, setup, pick)
        test_clips = confirmed.pop("test_clip_evaluations")
        out.update(confirmed)
        bad += test_ev.bad
        out["evaluation_test"] = test_ev.describe()
    reused = sum(len(c.reused) for c in setup.caches.values())
    out["cost"] = {"clip_evaluations": cost["clip_evaluations"],
                   "full_grid_clip_evaluations": cost["full_grid_clip_evaluations"],
                   "share_of_full_grid": round(cost["clip_evaluations"] / cost["full_grid_clip_evaluations"], 4),
                   "test_clip_evaluations": test_clips, "reused_from_cache": reused,
                   "seconds": round(time.perf_counter() - started, 3)}
    out["race"] = {k: v for k, v in cost.items() if k not in ("clip_evaluations", "full_grid_clip_evaluations")}
    out["race"]["survivors"] = [c.key for c in cands if c.alive]
    out["race"]["seed"] = opts.seed
    out["rounds"] = [_candidate_row(c) for c in cands]
    out["options"] = opts.report()
    out.update(alignment_report(opts.align, opts.align_data, len(setup.alignments)))
    if "alignment" in out and pick.lam > 0:
        out["alignment"]["picked"] = setup.plans[pick.key].alignment.summary()
    out["statistics"] = {"test": method(ev.task.kind == "classify", opts.resamples), "confidence": 1 - opts.alpha,
                         "comparisons_on_test": 0 if out["test"] is None else 3, "seed": opts.seed}
    out["summary"] = summary(out)
    out.update({"inputs": {"target": target.describe(), "sources": [s.describe() for s in sources],
                           "dev": dev.describe(), "test": test.describe()},
                "evaluation": ev.describe(), "bad_clips": bad, "versions": versions(),
                "peak_rss_mib": peak_rss_mib()})
    return out


def _src(setup: _Setup, c: Candidate) -> str | None:
    return None if c.source is None or c.lam == 0 else setup.sources[c.source].spec


def _candidate_row(c: Candidate) -> dict[str, Any]:
    last = c.trace[-1] if c.trace else {}
    return {"key": c.key, **c.point(), "clips": len(c.errors), "error": last.get("error"),
            "bound": list(c.bound) if c.bound else None, "left_round": c.left_round,
            "reason": c.reason or "survived", "at_token_bound": c.at_bound, "trace": c.trace}


def summary(report: dict[str, Any]) -> str:
    """The verdict in one sentence, for people (renderer-neutral: plain text)."""
    cost = report["cost"]
    spent = (f"dev cost {cost['clip_evaluations']} clip evaluations, "
             f"{cost['share_of_full_grid']:.0%} of the full grid's {cost['full_grid_clip_evaluations']}")
    survivors = report["race"]["survivors"]
    tied = f"; {len(survivors)} survivors left unseparated" if len(survivors) > 1 else ""
    if report["verdict"] == "none":
        return f"No merge beat λ = 0 on dev ({report['race']['ended']}{tied}); {spent}."
    p, t = report["picked"], report["test"]
    where = f"layers {p['layers']}, λ = {p['lam']}, {p['column']}"
    interval = (f"Δ {100 * t['delta']:+.2f} pp [{100 * t['delta_lo']:+.2f}, {100 * t['delta_hi']:+.2f}] "
                f"on {t['clips']} test clips")
    noise = "it beat" if report["source_vs_noise"]["source_beat_noise"] else "it did not beat"
    if report["verdict"] == "helps":
        return f"The merge at {where} helps: {interval}; {noise} noise of the same statistics; {spent}{tied}."
    gain = -100 * t["delta_lo"]
    allows = f" (no detectable gain: the interval allows up to {gain:.2f} pp)" if gain > 0 else ""
    return (f"Dev picked {where}, but test does not confirm it: {interval}{allows}; {noise} noise of the same "
            f"statistics; {spent}{tied}.")


def race_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per candidate for a table: clips seen, running error, bound, the round and reason it left."""
    return [{"candidate": r["key"], "clips": r["clips"], "error": r["error"],
             "bound_lo": r["bound"][0] if r["bound"] else None, "bound_hi": r["bound"][1] if r["bound"] else None,
             "left_round": r["left_round"], "reason": r["reason"]} for r in report["rounds"]]


def race_series(report: dict[str, Any]) -> dict[str, tuple[list[float], list[float]]]:
    """Each candidate's running error against clips seen, for ``plots.line_plot`` (``--plot``)."""
    return {r["key"]: ([t["clips"] for t in r["trace"]], [t["error"] for t in r["trace"]]) for r in report["rounds"]}


def race_intervals(report: dict[str, Any]) -> dict[str, tuple[list[float], list[float]]]:
    """Each candidate's bound, drawn around its running error (``--plot``): the bound is on its difference to the
    best so far, so the band is the error ± the bound's half-width, and a candidate leaves when its band's lower
    end clears the best's running error."""
    return {r["key"]: ([t["error"] - (t["hi"] - t["lo"]) / 2 for t in r["trace"]],
                       [t["error"] + (t["hi"] - t["lo"]) / 2 for t in r["trace"]]) for r in report["rounds"]}


def write_pick(report: dict[str, Any], target: Checkpoint, sources: list[Checkpoint], out: Path,
               families: tuple[Family, ...] = FAMILIES, force: bool = False, command: str | None = None,
               align_data: ActivationStats | None = None) -> dict[str, Any] | None:
    """On ``helps``: write the picked merge exactly as `mam merge` would, its card naming the test result;
    otherwise write nothing (None). ``align_data``: the pooled dev states the search aligned with (activations),
    so the written merge is solved as the evaluated one was."""
    from mamcli.card import add_evaluation
    from mamcli.merge import merge_to_dir

    if report["verdict"] != "helps":
        return None
    p = report["picked"]
    source = next(s for s in sources if s.spec == p["source"])
    o = report["options"]
    options = MergeOptions(lam=p["lam"], layers=p["layers"], parts=tuple(o["parts"]), bias=o["bias"],
                           seed=o["seed"], layer_map=o["layer_map"], align=o.get("align", "none"),
                           align_data=align_data)
    made = merge_to_dir(source, target, options, out, force=force, families=families, command=command)
    t, n = report["test"], report["noise_control"]
    point = {"layers": p["layers"], "lam": p["lam"]}
    card = {"evaluation": report.get("evaluation_test") or {}, "inputs": {"data": report["inputs"]["test"]},
            "best_on_dev": p,
            "test": {"points": [{**point, "lam": 0.0, "layers": None, "column": "target",
                                 "error": t["baseline_error"]},
                                {**point, "column": p["column"], "error": t["error"],
                                 **{k: t[k] for k in ("delta", "delta_lo", "delta_hi", "better", "worse")}},
                                {**point, "column": n["column"], "error": n["error"],
                                 **{k: n[k] for k in ("delta", "delta_lo", "delta_hi", "better", "worse")}}]}}
    add_evaluation(out, card)
    return made


def pick_on_dev(target: Checkpoint, source: Checkpoint | None, dev: Dataset, test: Dataset, opts: EvalOptions,
                sw: SweepOptions, families: tuple[Family, ...] = FAMILIES, progress: Progress = None,
                ticker: Callable[[int, int], None] | None = None,
                processes: Any = None) -> tuple[dict[str, Any], Evaluator, list[dict[str, str]]]:
    """`evaluate --pick-on-dev`: the full sweep on dev, the point :func:`best_point` picks, then that point and
    λ = 0 on test. Returns (result with ``dev``, ``best_on_dev``, ``test``, ``selection``; the dev Evaluator for
    :func:`evaluate_report`; the skipped clips of both splits)."""
    from dataclasses import replace

    from mamcli.distributed import ALONE

    procs = processes or ALONE
    ev = Evaluator(target, dev, opts, progress=progress, ticker=ticker, processes=procs)
    result = sweep(ev, source, sw, families, progress=progress)
    best = best_point(result["points"])
    if progress and procs.main:
        what = ("λ = 0 (the unmerged target)" if best["lam"] == 0 else
                f"λ = {best['lam']} on layers {best['layers'] or 'all'}, from {best['column']}")
        progress(f"best on dev: {what}; evaluating it on test")
    test_ev = Evaluator(target, test, opts, progress=progress, am=ev.am, ticker=ticker, processes=procs)
    if best["lam"] > 0:  # the chosen point only
        one = replace(sw, lams=[best["lam"]], layers=best["layers"], blocks=None, baseline="target",
                      noises=[best["noise"]] if best.get("noise") else [],
                      with_source=best["column"] == (source.name if source else None))
    else:  # λ = 0 won: the target alone, in the dev table's columns (one schema for spreadsheets)
        one = replace(sw, lams=[0.0], blocks=None, baseline="target")
    tested = sweep(test_ev, source, one, families, progress=progress)
    selection = {"picked_on": "dev", "dev_points": len(result["points"]),
                 "note": "the dev table's best row is picked on dev (optimistic there); test is one comparison, "
                         "made once, on clips the pick never saw"}
    return {"dev": result, "best_on_dev": best, "test": tested, "selection": selection}, ev, ev.bad + test_ev.bad

