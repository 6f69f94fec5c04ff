#!/usr/bin/env bash
# The main job on real pretrained weights, as a CI script would run it (`make demo` calls this):
# all-MiniLM-L6-v2 (text, BERT 6 x 384) into whisper-tiny.en (speech, encoder 4 x 384), on real LJ Speech.
# Usage: docs/demo.sh WORKDIR MAM SOURCE TARGET [LJSPEECH]
# SOURCE/TARGET may be hub ids where the Hugging Face Hub is reachable (sentence-transformers/all-MiniLM-L6-v2,
# openai/whisper-small with bert-base-uncased: any text model of the speech model's width).
set -euo pipefail
work=${1:-build/demo}
mam=${2:-mam}
source=${3:?a source (text) model}
target=${4:?a target (speech) model}
lj=${5:-$(dirname "$0")/../../shared/data/ljspeech-385/LJSpeech-1.1}
clips=${DEMO_CLIPS:-48}
mkdir -p "$work"

echo "== which tensors meet: 6 text layers spread over 4 speech layers (mam map --layer-map stride)" >&2
"$mam" map "$source" "$target" --layer-map stride --format tsv

echo "== Eq. 1: λ = 0.1 on every encoder layer; the decoder is untouched (mam merge)" >&2
"$mam" merge "$source" "$target" --lam 0.1 --layer-map stride -o "$work/merged" --force --format tsv > "$work/merged.tsv"
"$mam" verify "$work/merged" --format tsv >&2

echo "== which layers look alike on $clips paired LJ Speech clips and transcripts (mam rank-layers)" >&2
"$mam" rank-layers "$source" "$target" --data "ljspeech:$lj" --limit "$clips" --layer-map stride \
  --metric all --top-k 2 -o "$work/ranking.json" --format tsv

echo "== λ sweep on all layers against noise of the text model's statistics, picked on dev, reported on test" >&2
"$mam" evaluate "$target" --data "ljspeech:$lj" --limit "$clips" --dev-fraction 0.5 --source "$source" \
  --layer-map stride --lam 0,0.05,0.1 --noise source --pick-on-dev \
  -o "$work/evaluate.json" --plot "$work/wer.png" --format table
echo "(report: $work/evaluate.json, figure: $work/wer.png; greedy decoding, Whisper's English normaliser)" >&2
