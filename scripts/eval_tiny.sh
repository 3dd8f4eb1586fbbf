#!/usr/bin/env bash
# Evaluate a trained AndesVL-Tiny (scripts/train_tiny.sh) and write the reports that ship in AndesVL-Tiny/eval/.
#
#   bash scripts/eval_tiny.sh [OUT] [MODEL]     # defaults: outputs/tiny, OUT/AndesVL-Tiny
#
#   OUT/eval/test.json        base on the full held-out test splits (easy-vqa: the official 9,673 questions)
#   OUT/eval/adapters.json    base, each adapter, each adapter disabled again, the int4 base alone and with every
#                             adapter (plain LoRA and QALFT), on the first 300/200/100/200 vqa/ocr/gui/multi tests
#   OUT/eval/ci_subset.json   the fixed subset tests/test_tiny_checkpoint.py re-checks in CI (300 vqa, 100 ocr, 100 gui)
# Each report also has one JSON per task beside it (test.vqa.json, ...). Greedy decoding in float32.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # the andesvl_tools package, run from this checkout
out="${1:-$root/outputs/tiny}"
model="${2:-$out/AndesVL-Tiny}"
venv="$(bash "$root/scripts/setup_env.sh" "${ANDESVL_LINE:-tf5}" | tail -n 1)"
evaluate=("$venv/bin/python" -m andesvl_tools.evaluate --model "$model" --data "$out/datasets" --dtype float32
          --device cpu --batch-size 8 --max-new-tokens 32)
export OMP_NUM_THREADS=1  # tiny shapes: one thread is fastest
"${evaluate[@]}" --output "$out/eval/test.json"
"${evaluate[@]}" --limit vqa=300,ocr=200,gui=100,multi=200 --adapter ocr --adapter gui --adapter ocr-qalft-int4 \
  --adapter gui-qalft-int4 --quantized-model "$out/AndesVL-Tiny-int4" --output "$out/eval/adapters.json"
"${evaluate[@]}" --tasks vqa,ocr,gui --limit vqa=300,ocr=100,gui=100 --adapter ocr --adapter gui \
  --output "$out/eval/ci_subset.json"
