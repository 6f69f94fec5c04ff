#!/usr/bin/env bash
# The main job on an embedded default, as a CI script would run it (`make demo` calls this).
# No download is possible here, so the two models are small random ones built from real
# transformers configs: a BERT (text source) and a HuBERT-CTC (speech target) of equal width.
# Usage: docs/demo.sh [WORKDIR] [MAM] [PYTHON]
set -euo pipefail
work=${1:-build/demo}
mam=${2:-mam}
py=${3:-python3}
mkdir -p "$work"
for kind in bert hubert-ctc; do
  [ -f "$work/$kind/model.safetensors" ] || "$py" -m mamcli.tiny "$kind" "$work/$kind" 64 4 4 >/dev/null
done

echo "== which tensors meet (mam map)" >&2
"$mam" map "$work/bert" "$work/hubert-ctc" --format tsv

echo "== Eq. 1: λ = 0.1 on every layer (mam merge)" >&2
"$mam" merge "$work/bert" "$work/hubert-ctc" --lam 0.1 -o "$work/merged" --force --json > "$work/merge_report.json"
"$py" - "$work/merge_report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"merged {len(r['tensors'])} tensors in {r['wall_time_s']} s; files: {', '.join(r['outputs']['files'])}")
PY

echo "== Eq. 2: layers 1-2 only, noise baseline with the source's statistics" >&2
"$mam" merge "$work/bert" "$work/hubert-ctc" --lam 0.1 --layers 1-2 --noise source --seed 0 \
  -o "$work/merged-noise" --force -q

echo "== verify the output against its report (mam verify)" >&2
"$mam" verify "$work/merged" > /dev/null && echo "verified $work/merged" >&2

lj="$(dirname "$0")/../../shared/data/ljspeech-385/LJSpeech-1.1"
if [ -d "$lj" ]; then
  echo "== which layers look alike on paired LJ Speech audio/text (mam rank-layers)" >&2
  "$mam" rank-layers "$work/bert" "$work/hubert-ctc" --data "ljspeech:$lj" --limit 16 --metric all \
    --top-k 2 -o "$work/ranking.json" -q --format tsv
  echo "== λ sweep on the top-2 SWD layers against noise, WER on 8 clips (mam evaluate)" >&2
  "$mam" evaluate "$work/hubert-ctc" --data "ljspeech:$lj" --limit 8 --source "$work/bert" \
    --lam 0,0.1,0.2 --layers "top:2:$work/ranking.json:swd" --noise normal -q --format tsv \
    -o "$work/evaluate.json"
  echo "(random tiny models: the numbers show the plumbing, not the method's gains)" >&2
else
  echo "(no ../shared/data here: skipping rank-layers and evaluate)" >&2
fi
