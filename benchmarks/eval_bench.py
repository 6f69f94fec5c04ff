"""Evaluation speed: mam's batched path against the transformers ASR pipeline, and a sweep against N runs.

Models are random (nothing can be downloaded) but shaped like real ones; speed does not depend on
the weights. The target has HuBERT-large's layout (stable layer norm, attention mask, the real
7-layer 512-channel convolutional front end) at base width: 768 wide, 12 layers.
Clips: the shared LJ Speech subset (22.05 kHz, resampled to 16 kHz).

1. throughput: the same decoded clips through (a) mam's path at batch sizes 1 (its CPU default)
   and 8 (length-sorted, attention masks) and (b) ``pipeline("automatic-speech-recognition")``
   one clip at a time, as it runs by default; both greedy CTC, from already-decoded audio, with
   the model already loaded.
2. sweep: N λ points on layers 8-11 (past the middle) in one ``sweep`` call (baseline included)
   against N separate evaluations (each: load the model, read the clips, evaluate), merge time
   not even counted for the separate runs.
Targets: throughput ≥ 1.5× the pipeline; sweep ≤ 0.5 · N evaluations.
mam's throughput is taken at its default batch size for the device (1 on CPU, 8 on GPU).
Results: benchmarks/results/eval_bench.json (eval_bench_cuda.json for --device cuda).
Usage: python benchmarks/eval_bench.py [--clips N] [--points N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
SHARED = HERE.parent.parent / "shared" / "data"
LJ = f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1"


def make_target(path: Path) -> None:
    """HuBERT-CTC with the real convolutional front end (7 layers, 512 channels) at base width."""
    import transformers

    from mamcli.tiny import CTC_VOCAB, save_ctc_processor

    cfg = transformers.HubertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, do_stable_layer_norm=True, feat_extract_norm="layer",
                                    vocab_size=len(CTC_VOCAB), pad_token_id=0)
    torch.manual_seed(0)
    transformers.HubertForCTC(cfg).save_pretrained(path)
    save_ctc_processor(path)


def main() -> None:
    from mamcli.checkpoint import resolve
    from mamcli.data import iter_clips, load_dataset, select
    from mamcli.evaluate import EvalOptions, Evaluator, SweepOptions, sweep
    from mamcli.models import default_batch_size, load_audio_model
    from mamcli.tiny import save_tiny

    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--points", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where both paths run")
    args = ap.parse_args()
    tgt_dir, src_dir = WORK / "eval-hubert-768-realconv", WORK / "eval-bert-768"
    if not (tgt_dir / "model.safetensors").is_file():
        make_target(tgt_dir)
    if not (src_dir / "model.safetensors").is_file():
        save_tiny("bert", src_dir, hidden=768, layers=12, heads=12)
    ds = select(load_dataset(LJ), limit=args.clips)
    torch.set_num_threads(os.cpu_count() or 1)

    with resolve(str(tgt_dir)) as tgt, resolve(str(src_dir)) as src:
        am = load_audio_model(tgt, "asr", args.device)
        default_bs = default_batch_size(am.model)
        clips = list(iter_clips(ds, am.rate))
        audio_s = sum(len(c.audio) for c in clips) / am.rate
        with torch.inference_mode():  # warm-up (CUDA context, kernel choice) outside every timing
            am.model(**am.inputs([clips[0].audio]))
        # (a) mam: length-sorted batches
        timings: dict[int, float] = {}
        for bs in (8, 1):  # batch 1 last: its hypotheses are compared with the pipeline's
            t0 = time.perf_counter()
            ours: dict[str, str] = {}
            with torch.inference_mode():
                for batch in am.batches(clips, bs):
                    inputs = am.inputs([c.audio for c in batch])
                    ids = am.model(**inputs).logits.argmax(-1)
                    ours.update({c.item.id: t for c, t in zip(batch, am.tokenizer.batch_decode(ids), strict=True)})
            timings[bs] = time.perf_counter() - t0
        mam_s = timings[default_bs]
        # (b) the transformers pipeline, same model object and processor
        from transformers import pipeline

        pipe = pipeline("automatic-speech-recognition", model=am.model, tokenizer=am.tokenizer,
                        feature_extractor=am.features, device=am.model.device)
        t0 = time.perf_counter()
        theirs = {c.item.id: pipe({"raw": c.audio, "sampling_rate": am.rate})["text"] for c in clips}
        pipe_s = time.perf_counter() - t0
        same = sum(ours[k] == theirs[k] for k in ours)
        print(f"throughput: mam {mam_s:.1f} s, pipeline {pipe_s:.1f} s for {len(clips)} clips", file=sys.stderr)

        lams = [round(0.05 * (k + 1), 2) for k in range(args.points)]
        opts = EvalOptions(device=args.device)
        t0 = time.perf_counter()
        single = Evaluator(tgt, ds, opts)
        single.evaluate()
        one_eval_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = Evaluator(tgt, ds, opts)
        result = sweep(ev, src, SweepOptions(lams=[0.0, *lams], layers="8-11"))
        sweep_s = time.perf_counter() - t0
        print(f"sweep: {sweep_s:.1f} s for {args.points} points + baseline; one evaluation {one_eval_s:.1f} s",
              file=sys.stderr)

    report = {
        "benchmark": "evaluate", "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
        "model": "HuBERT-CTC, stable layer norm, real conv front end, 768 wide, 12 layers, random weights",
        "device": str(am.model.device), "mam_batch_size": default_bs,
        "clips": len(clips), "audio_seconds": round(audio_s, 1),
        "throughput": {"mam_s": round(mam_s, 3), "mam_batch8_s": round(timings[8], 3), "pipeline_s": round(pipe_s, 3),
                       "mam_over_pipeline_speed": round(pipe_s / mam_s, 3),
                       "identical_hypotheses": f"{same}/{len(ours)}"},
        "sweep": {"points": args.points, "layers": "8-11", "sweep_s": round(sweep_s, 3),
                  "one_evaluation_s": round(one_eval_s, 3),
                  "sweep_over_n_evaluations": round(sweep_s / (args.points * one_eval_s), 3),
                  "first_merged_layer": result["first_merged_layer"]},
        "targets": {"mam_over_pipeline_speed": 1.5, "sweep_over_n_evaluations": 0.5},
    }
    report["meets_targets"] = (report["throughput"]["mam_over_pipeline_speed"] >= 1.5
                               and report["sweep"]["sweep_over_n_evaluations"] <= 0.5)
    (HERE / "results").mkdir(exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    (HERE / "results" / f"eval_bench{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("throughput", "sweep", "meets_targets")}, indent=2))


if __name__ == "__main__":
    main()
