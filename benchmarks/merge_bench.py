"""Time and peak memory of `mam merge` against the copy floor and the naive transformers path.

Generates (never commits) a BERT-large-shaped and a HuBERT-large-shaped random checkpoint
(24 × 1024, about 1.3 GB each) under benchmarks/work/, then runs, side by side and alternating:
  floor: copy the target's weight bytes and fsync them (what any safe merge must at least do);
  floor_nosync: the same copy left in the page cache (recorded for transparency);
  mam_cold: mamcli.merge.merge_to_dir (λ = 0.1 on all 24 layers' Q/K/V), hashing every input byte;
  mam:   the same merge again (a sweep's case): input hashes come from mam's hash cache;
  naive: from_pretrained both models, edit the state dict, save_pretrained.
With --real the pair is the real one instead: all-MiniLM-L6-v2 (make models) into whisper-tiny.en
(../shared/models, fp16, 75 MB), λ = 0.1 with the stride layer map (6 text layers onto 4 encoder
layers); results: benchmarks/results/merge_bench_real.json.
Each method runs in its own fresh process, after os.sync() so that none pays for the disk
writeback another left behind; the time is measured inside it (imports excluded) and peak RSS is
that process's own (os.wait4). Results: benchmarks/results/merge_bench.json.
Usage: python benchmarks/merge_bench.py [--repeats N] [--small | --real]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"

MAKE = r"""
import sys, torch, transformers
from pathlib import Path
kind, out, small = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
h, n, a, ff = (256, 6, 4, 1024) if small else (1024, 24, 16, 4096)
torch.manual_seed(0)
if kind == "bert":
    cfg = transformers.BertConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=a, intermediate_size=ff)
    model = transformers.BertForMaskedLM(cfg)
else:
    cfg = transformers.HubertConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=a, intermediate_size=ff,
                                    do_stable_layer_norm=True, feat_extract_norm="layer", vocab_size=32)
    model = transformers.HubertForCTC(cfg)
model.save_pretrained(out)
"""

RUN = r"""
import json, resource, shutil, sys, time
from pathlib import Path
method, src, tgt, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
real = sys.argv[5] == "1"  # MiniLM -> whisper-tiny.en, 6 text layers spread over 4 (stride: 0, 1, 3, 4)
if method.startswith("floor"):
    import os
    out.mkdir()
    t0 = time.perf_counter()
    shutil.copyfile(tgt / "model.safetensors", out / "model.safetensors")
    if method == "floor":  # the same durability as mam's atomic output: data on disk before the rename
        fd = os.open(out / "model.safetensors", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
elif method.startswith("mam"):
    import os
    if method == "mam_cold":  # first merge of these inputs: every input byte is hashed
        os.environ["MAM_HASH_CACHE"] = "0"
    from mamcli.checkpoint import resolve
    from mamcli.merge import MergeOptions, merge_to_dir
    t0 = time.perf_counter()
    with resolve(str(src)) as s, resolve(str(tgt)) as t:
        merge_to_dir(s, t, MergeOptions(lam=0.1, layer_map="stride" if real else None), out)
else:
    import torch, transformers
    t0 = time.perf_counter()
    if real:
        source = transformers.BertModel.from_pretrained(src)
        target = transformers.WhisperForConditionalGeneration.from_pretrained(tgt, dtype=torch.float16)
        src_name, tgt_name, layer_map = "encoder.layer.{j}.attention.self.{a}.weight", \
            "model.encoder.layers.{i}.self_attn.{b}.weight", [0, 1, 3, 4]
    else:
        source = transformers.BertForMaskedLM.from_pretrained(src)
        target = transformers.HubertForCTC.from_pretrained(tgt)
        src_name, tgt_name = "bert.encoder.layer.{j}.attention.self.{a}.weight", \
            "hubert.encoder.layers.{i}.attention.{b}.weight"
        layer_map = list(range(target.config.num_hidden_layers))
    s, t = source.state_dict(), target.state_dict()
    names = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
    with torch.no_grad():
        for i, j in enumerate(layer_map):
            for a, b in names.items():
                w = t[tgt_name.format(i=i, b=b)]
                w.copy_(0.1 * s[src_name.format(j=j, a=a)] + 0.9 * w)
    target.save_pretrained(out)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds}))
"""


def _run(code: str, *args: str) -> tuple[dict, float]:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"benchmark step failed: {args}")
    return (json.loads(out.strip().splitlines()[-1]) if out.strip() else {}), usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="a 256-wide, 6-layer pair for a quick check")
    ap.add_argument("--real", action="store_true", help="all-MiniLM-L6-v2 into whisper-tiny.en")
    args = ap.parse_args()
    tag = "real" if args.real else "small" if args.small else "large"
    src, tgt = WORK / f"bert-{tag}", WORK / f"hubert-{tag}"
    if args.real:
        src, tgt = HERE.parent / ".cache/models/all-MiniLM-L6-v2", HERE.parents[1] / "shared/models/whisper-tiny.en"
    WORK.mkdir(parents=True, exist_ok=True)
    for kind, path in (("bert", src), ("hubert", tgt)) if not args.real else ():
        if not (path / "model.safetensors").is_file():
            print(f"generating {path} …", file=sys.stderr)
            _run(MAKE, kind, str(path), "1" if args.small else "0")
    results: dict[str, dict[str, list[float]]] = {m: {"seconds": [], "peak_rss_mib": []}
                                                  for m in ("floor", "floor_nosync", "mam_cold", "mam", "naive")}
    for r in range(args.repeats):
        for method in results:
            out = WORK / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # no method pays for the writeback another one left behind
            res, rss = _run(RUN, method, str(src), str(tgt), str(out), "1" if args.real else "0")
            results[method]["seconds"].append(round(res["seconds"], 3))
            results[method]["peak_rss_mib"].append(round(rss, 1))
            shutil.rmtree(out, ignore_errors=True)
            print(f"repeat {r + 1}: {method:5s} {res['seconds']:.2f} s, peak {rss:.0f} MiB", file=sys.stderr)
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in results.items()}
    summary = {
        "time_mam_over_floor": round(med["mam"]["seconds"] / med["floor"]["seconds"], 3),
        "time_mam_over_floor_nosync": round(med["mam"]["seconds"] / med["floor_nosync"]["seconds"], 3),
        "time_mam_cold_over_floor": round(med["mam_cold"]["seconds"] / med["floor"]["seconds"], 3),
        "rss_mam_over_naive": round(med["mam"]["peak_rss_mib"] / med["naive"]["peak_rss_mib"], 3),
        "targets": {"time_mam_over_floor": 1.3, "rss_mam_over_naive": 0.25},
    }
    summary["meets_targets"] = (summary["time_mam_over_floor"] <= 1.3 and summary["rss_mam_over_naive"] <= 0.25)
    size = (tgt / "model.safetensors").stat().st_size
    report = {"benchmark": "merge", "shape": tag, "target_bytes": size, "repeats": args.repeats,
              "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "median": med, "runs": results,
              **summary}
    (HERE / "results").mkdir(exist_ok=True)
    out_file = HERE / "results" / f"merge_bench{'' if tag == 'large' else '_' + tag}.json"
    out_file.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
