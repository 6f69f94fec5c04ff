"""Whisper evaluation speed on real weights: mam against the transformers ASR pipeline, and a sweep against N runs.

Model: whisper-tiny.en (../shared/models, fp16 on disk, computed in float32 on CPU by both paths: the
pipeline gets the very model object mam loaded). Clips: the shared LJ Speech subset, resampled to 16 kHz.

1. throughput: the same decoded clips through (a) mam's path (features, then its bounded greedy
   ``generate()``), at batch 1 and 8 (its CPU default for Whisper), and (b) ``pipeline("automatic-speech-recognition")``
   with greedy decoding set explicitly (``num_beams=1``), at batch 1 (its default) and 8; identical hypotheses
   are required. Medians of alternating repeats, after one warm-up call each.
2. sweep: N λ points of the real pair MiniLM → whisper-tiny.en on encoder layers 2-3 (layer map first) in one
   ``sweep`` call (load, read clips, baseline, N points) against N separate evaluations of checkpoints written by
   ``merge_to_dir`` (each: load, read clips, evaluate; the merges are not counted), whose hypotheses must equal
   the sweep's.
Targets (issue 12, on this 2-core CPU): throughput ≥ 1.5× the pipeline; sweep ≤ 0.5 · N evaluations.
Results: benchmarks/results/whisper_bench.json.
Usage: python benchmarks/whisper_bench.py [--clips N] [--points N] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
LJ = f"ljspeech:{SHARED}/data/ljspeech-385/LJSpeech-1.1"
WHISPER = SHARED / "models" / "whisper-tiny.en"
MINILM = HERE.parent / ".cache" / "models" / "all-MiniLM-L6-v2"
LAYERS = "2-3"


def main() -> None:
    from transformers import pipeline

    from mamcli.checkpoint import resolve
    from mamcli.data import iter_clips, load_dataset, select
    from mamcli.evaluate import EvalOptions, Evaluator, SweepOptions, sweep
    from mamcli.merge import MergeOptions, merge_to_dir
    from mamcli.models import default_batch_size, load_audio_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--points", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ds = select(load_dataset(LJ), limit=args.clips)
    torch.set_num_threads(os.cpu_count() or 1)
    load_before = os.getloadavg()

    with resolve(str(WHISPER)) as tgt:
        am = load_audio_model(tgt, "asr", "cpu")
        task = am.task
        assert task is not None
        default_bs = default_batch_size(am.model, task)
        clips = list(iter_clips(ds, am.rate))
        audio_s = sum(len(c.audio) for c in clips) / am.rate

        def mam(bs: int, some: list | None = None) -> tuple[dict[str, str], int]:
            out: dict[str, str] = {}
            hits = 0
            with torch.inference_mode():
                for batch in am.batches(clips if some is None else some, bs):
                    pred = task.predict(am, am.inputs([c.audio for c in batch]), [len(c.audio) for c in batch])
                    out.update({c.item.id: t for c, t in zip(batch, pred.texts, strict=True)})
                    hits += sum(pred.at_bound)
            return out, hits

        pipe = pipeline("automatic-speech-recognition", model=am.model, tokenizer=am.tokenizer,
                        feature_extractor=am.features, device=am.model.device)

        def raw(some: list) -> list[dict]:  # fresh dicts: the pipeline pops their keys
            return [{"raw": c.audio, "sampling_rate": am.rate} for c in some]

        def pipeline_run(bs: int) -> dict[str, str]:
            texts = pipe(raw(clips), batch_size=bs, generate_kwargs={"num_beams": 1, "do_sample": False})
            return {c.item.id: t["text"].strip() for c, t in zip(clips, texts, strict=True)}

        sizes = sorted({1, default_bs, 8})  # 1: the pipeline's default
        mam(1, clips[:1])  # warm-up: first calls pay for lazy initialisation
        pipe(raw(clips[:1]), generate_kwargs={"num_beams": 1})
        times: dict[str, list[float]] = {}
        outputs: dict[str, dict[str, str]] = {}
        bound_hits = 0
        for _ in range(args.repeats):  # alternate the methods, so drifting load hits both alike
            for bs in sizes:
                t0 = time.perf_counter()
                outputs[f"mam_b{bs}"], bound_hits = mam(bs)
                times.setdefault(f"mam_b{bs}", []).append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                outputs[f"pipeline_b{bs}"] = pipeline_run(bs)
                times.setdefault(f"pipeline_b{bs}", []).append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        reference = outputs["pipeline_b1"]
        identical = {k: f"{sum(o[i] == reference[i] for i in reference)}/{len(reference)}" for k, o in outputs.items()}
        mam_s, pipe_s = med[f"mam_b{default_bs}"], med["pipeline_b1"]
        print(f"throughput: mam {mam_s:.1f} s (batch {default_bs}), pipeline {pipe_s:.1f} s, "
              f"{len(clips)} clips", file=sys.stderr)

        lams = [round(0.05 * (k + 1), 2) for k in range(args.points)]
        with resolve(str(MINILM)) as src:
            t0 = time.perf_counter()
            ev = Evaluator(tgt, ds, EvalOptions())
            result = sweep(ev, src, SweepOptions(lams=[0.0, *lams], layers=LAYERS, layer_map="first"))
            sweep_s = time.perf_counter() - t0
            separate: list[float] = []
            same_points = 0
            with tempfile.TemporaryDirectory() as tmp:
                for lam in lams:
                    out = Path(tmp) / f"lam{lam}"
                    merge_to_dir(src, tgt, MergeOptions(lam=lam, layers=LAYERS, layer_map="first"), out)
                    t0 = time.perf_counter()
                    with resolve(str(out)) as merged:
                        one = Evaluator(merged, ds, EvalOptions()).evaluate()
                    separate.append(time.perf_counter() - t0)
                    point = result["details"][f"{LAYERS}|{lam}|{src.spec}"]
                    same_points += one["utterances"] == point["utterances"]
        print(f"sweep: {sweep_s:.1f} s for {args.points} points + baseline; separate: {sum(separate):.1f} s",
              file=sys.stderr)

    report = {
        "benchmark": "whisper evaluate", "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "model": "whisper-tiny.en (real weights, fp16 on disk, float32 compute on CPU)", "device": "cpu",
        "clips": len(clips), "audio_seconds": round(audio_s, 1), "repeats": args.repeats,
        "decoding": "greedy (num_beams=1) for both; mam bounds max_new_tokens by clip length",
        "throughput": {"mam_batch_size": default_bs, "median_s": {k: round(v, 3) for k, v in med.items()},
                       "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
                       "mam_over_pipeline_speed": round(pipe_s / mam_s, 3),
                       "mam_b8_over_pipeline_b8_speed": round(med["pipeline_b8"] / med["mam_b8"], 3),
                       "identical_to_pipeline_b1": identical, "mam_clips_at_token_bound": bound_hits},
        "sweep": {"points": args.points, "lams": lams, "layers": LAYERS, "layer_map": "first",
                  "sweep_s": round(sweep_s, 3), "separate_evaluations_s": [round(x, 3) for x in separate],
                  "sweep_over_n_evaluations": round(sweep_s / sum(separate), 3),
                  "points_identical_to_separate": f"{same_points}/{len(lams)}",
                  "first_merged_layer": result["first_merged_layer"], "replay_cache": result["replay_cache"],
                  "baseline_wer": result["baseline"]["wer"]},
        "targets": {"mam_over_pipeline_speed": 1.5, "sweep_over_n_evaluations": 0.5},
    }
    report["meets_targets"] = (report["throughput"]["mam_over_pipeline_speed"] >= 1.5
                               and report["sweep"]["sweep_over_n_evaluations"] <= 0.5)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "whisper_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("throughput", "sweep", "meets_targets")}, indent=2))


if __name__ == "__main__":
    main()
