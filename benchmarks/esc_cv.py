"""ESC-10 / ESC-50 the way their users score them: 5-fold cross-validation in one command.

For every test fold k: fine-tune the target on the other folds (plain, and with the merge options
given after ``--``: MAM or L-MAM), evaluate both on fold k, and pool the predictions of all test folds.
The result is the error over all clips of all test folds for each system, and the paired-bootstrap
interval of the merged system's difference to plain fine-tuning, with the clips better / worse
(mamcli.stats). Every step is the `mam` CLI, so each fold's reports stay in OUT/ for inspection.

A CV run is ten fine-tunings: a rerun with the same arguments reuses every fold/system whose test report is
complete (its arguments are kept beside it, in OUT/foldK-NAME.args.json), so a stopped run goes on where it
stopped; --jobs N runs N fine-tunings at once (on a CPU, give each OMP_NUM_THREADS=cores/N).

Usage (`make cv` runs the first):
  python benchmarks/esc_cv.py TARGET DATA OUT [--folds 1,2,3,4,5] [--epochs N] [--lr X] [--jobs N] \\
      -- --source S --lam-init 0.1
  python benchmarks/esc_cv.py ../shared/models/whisper-tiny.en folders:../shared/data/esc10/ESC-10 build/cv \\
      -- --source .cache/models/dinov2-vits14 --layer-map 0,4,7,11 --learnable-lam --lam-init 0.1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mamcli.stats import clip_counts, paired_bootstrap


def pooled(reports: list[dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """(clip ids, labels, predictions) of several `mam evaluate` reports, in one list sorted by clip id."""
    rows = sorted((c["id"], c["label"], c["predicted"])
                  for r in reports for c in r["details"]["target"]["clips_detail"])
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
        raise SystemExit("a clip was tested in two folds: the folds overlap")
    return ids, [r[1] for r in rows], [r[2] for r in rows]


def compare(plain: list[dict[str, Any]], merged: list[dict[str, Any]], resamples: int, seed: int) -> dict[str, Any]:
    """Error of each system over all test clips, and the paired difference merged − plain."""
    ids_p, labels_p, pred_p = pooled(plain)
    ids_m, labels_m, pred_m = pooled(merged)
    if ids_p != ids_m or labels_p != labels_m:
        raise SystemExit("the two systems were tested on different clips")
    a, b = clip_counts(labels_m, pred_m), clip_counts(labels_p, pred_p)
    stats = paired_bootstrap(a, b, resamples, seed)
    return {"clips": len(ids_p), "plain_error": sum(e for e, _ in b) / len(b),
            "merged_error": sum(e for e, _ in a) / len(a), **stats}


def unit(out: Path, target: str, data: str, test: str, train: str, name: str, finetune: list[str]) -> dict[str, Any]:
    """Fine-tune one system on the training folds and test it on fold ``test``; reuse the test report of an
    earlier run with exactly these arguments (a stopped CV goes on where it stopped)."""
    model, report, args_file = out / f"fold{test}-{name}", out / f"fold{test}-{name}.json", \
        out / f"fold{test}-{name}.args.json"
    args = {"target": target, "data": data, "test_fold": test, "train_folds": train, "finetune": finetune}
    if report.is_file() and args_file.is_file() and json.loads(args_file.read_text()) == args:
        print(f"reusing fold {test}, {name}: {report}", file=sys.stderr)
        return json.loads(report.read_text())
    args_file.unlink(missing_ok=True)
    _mam("finetune", target, "--task", "aec", "--data", data, "--folds", train, *finetune,
         "-o", str(model), "--force", "-q", "--format", "json")
    _mam("evaluate", str(model), "--data", data, "--folds", test, "-q", "--format", "json", "-o", str(report))
    args_file.write_text(json.dumps(args, indent=1) + "\n")  # written last: the unit is complete
    return json.loads(report.read_text())


def _mam(*args: str) -> None:
    cmd = [sys.executable, "-m", "mamcli.cli", *args]
    print("+ mam " + " ".join(args), file=sys.stderr)
    if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:  # reports go to files; stdout is ours
        raise SystemExit(f"failed: mam {' '.join(args)}")


def main() -> None:
    argv = sys.argv[1:]
    merge = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target")
    ap.add_argument("data")
    ap.add_argument("out", type=Path)
    ap.add_argument("--folds", default="1,2,3,4,5")
    ap.add_argument("--epochs", default="3")
    ap.add_argument("--lr", default="1e-4")
    ap.add_argument("--batch-size", default="8")
    ap.add_argument("--dev-fraction", default="0.1", help="of the training folds, to pick the epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=1, help="fine-tunings at once")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not merge:
        raise SystemExit("give the merge options after --, e.g. -- --source S --lam-init 0.1")
    folds = [f.strip() for f in args.folds.split(",")]
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--epochs", args.epochs, "--lr", args.lr, "--batch-size", args.batch_size,
              "--dev-fraction", args.dev_fraction, "--seed", str(args.seed)]
    jobs = [(k, name, common + extra) for k in folds for name, extra in (("plain", []), ("merged", merge))]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each job is a subprocess; threads only wait
        done = list(pool.map(lambda j: unit(args.out, args.target, args.data, j[0],
                                            ",".join(f for f in folds if f != j[0]), j[1], j[2]), jobs))
    reports: dict[str, list[dict[str, Any]]] = {"plain": [], "merged": []}
    for (_, name, _), report in zip(jobs, done, strict=True):
        reports[name].append(report)
    result = {"protocol": f"{len(folds)}-fold cross-validation: train on the other folds, test on each in turn; "
                          "errors over all clips of all test folds; paired bootstrap over clips (merged − plain)",
              "target": args.target, "data": args.data, "folds": folds, "merge_options": merge,
              "epochs": args.epochs, "lr": args.lr, "dev_fraction": args.dev_fraction, "seed": args.seed,
              **compare(reports["plain"], reports["merged"], args.resamples, args.seed),
              "wall_time_s": round(time.perf_counter() - started, 1)}
    (args.out / "cv.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
