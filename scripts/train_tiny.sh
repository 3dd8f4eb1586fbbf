#!/usr/bin/env bash
# The full AndesVL-Tiny recipe in one command: data -> staged base (vision, align, pretrain, sft) -> scenario adapters
# (ocr, gui; plain LoRA and QALFT int4) -> int4 base. About 30 minutes on a 2-core CPU; resumable (re-run it).
#
#   bash scripts/train_tiny.sh [OUT]          # default OUT: outputs/tiny
#
# Writes OUT/datasets (make_datasets.py), OUT/runs (checkpoints, per-stage metrics + loss PNGs),
# OUT/AndesVL-Tiny (bf16 repo folder with adapters/{ocr,gui,ocr-qalft-int4,gui-qalft-int4}) and
# OUT/AndesVL-Tiny-int4 (quantize.py). Every step is seeded; a finished step is skipped when the script re-runs
# (delete OUT to retrain from scratch: adapters of an older base are not retrained). Then scripts/eval_tiny.sh writes
# the evaluation reports and andesvl_tools.ship_tiny copies the result into the repo (AndesVL-Tiny/).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # the andesvl_tools package, run from this checkout
out="${1:-$root/outputs/tiny}"
venv="$(bash "$root/scripts/setup_env.sh" "${ANDESVL_LINE:-tf5}" | tail -n 1)"
py="$venv/bin/python"
data="$out/datasets" runs="$out/runs" model="$out/AndesVL-Tiny"
mkdir -p "$runs"
SECONDS=0
phase() { echo "== [$(printf '%4d' "$SECONDS") s] $*"; }

source "$root/scripts/tiny_adapters.sh"  # adapter settings (LM_TARGETS, GROUP, adapter, adapter_pairs)

phase "data"
if [ ! -f "$data/manifest.json" ]; then
  "$py" -m andesvl_tools.make_datasets --output "$data" --seed 0 --vqa-train-size all --ocr-train-size 16000
fi
for split in train val; do  # the OCR adapters learn from the numbers: held-out words use word pieces no answer taught
  if [ ! -f "$data/ocr/$split-numbers.jsonl" ]; then
    "$py" -c 'import json, sys
rows = [line for line in open(sys.argv[1]) if json.loads(line)["meta"]["kind"] == "number"]
open(sys.argv[2], "w").writelines(rows)' "$data/ocr/$split.jsonl" "$data/ocr/$split-numbers.jsonl"
  fi
done

# Base: a vision warm-up, then the three stages of the paper at small scale, all from scratch. The scenario tasks (ocr,
# gui) are capped at 1,000 examples in the base stages, so the base knows their format; the adapters get the full data.
# vision: the from-scratch encoder learns, through linear heads on its visual tokens, the shape and colour of each
# easy-vqa train image and the characters on each of 4,000 OCR images (the official sizes start from a pretrained
# encoder instead). Measured: trained through the language model alone, the encoder learned colour but never shape
# (39% after 1,500 align steps), and never learned to read.
# align, pretrain, sft train the text model only: the encoder and projector stay as the warm-up made them. Measured:
# when the base stages also trained the encoder, the characters a linear probe reads from its tokens fell from 58% to
# 20%, and no OCR adapter on that base learned to read (loss 2.12 after 650 steps, vs 0.96 on this base).
# align trains on answers only the image determines: the easy-vqa colour and shape questions. Measured: with yes/no
# questions (which a text prior half answers) in the mix from step 0 the model learned to ignore the image.
# Learning rates: 1e-3 made the from-scratch encoder unstable (shape at chance).
base=(--data "$data" --task-limit ocr=1000,gui=1000 --val --max-val-examples 200 --seed 0
      --num-threads 2 --resume --save-steps 500 --eval-steps 1000 --logging-steps 20)
phase "base: vision warm-up (encoder + projector; shape/colour heads, per-token OCR character heads)"
"$py" -m andesvl_tools.train --init tiny-aimv2 --stage vision --vision-tasks vqa,ocr --max-steps 2000 \
  --per-device-batch-size 32 --learning-rate 6e-4 --warmup-steps 50 --work-dir "$runs/base" --output "$runs/export-vision" \
  "${base[@]}" --task-limit ocr=4000,gui=1000
phase "base: align (image-determined answers; text model)"
"$py" -m andesvl_tools.train --init "$runs/base/vision/model" --stage align --train-modules language_model \
  --tasks vqa --drop-answers yes,no --max-steps 1000 --per-device-batch-size 16 --learning-rate 3e-4 --warmup-steps 50 \
  --work-dir "$runs/base" --output "$runs/export-align" "${base[@]}"
phase "base: pretrain (text model, all tasks)"
"$py" -m andesvl_tools.train --init "$runs/base/align/model" --stage pretrain --train-modules language_model \
  --max-steps 3000 --per-device-batch-size 8 --learning-rate 3e-4 --warmup-steps 100 --work-dir "$runs/base" \
  --output "$runs/export-pretrain" "${base[@]}"
phase "base: sft (multi-task instruction tuning; text model)"
"$py" -m andesvl_tools.train --init "$runs/base/pretrain/model" --stage sft --train-modules language_model \
  --max-steps 1000 --per-device-batch-size 8 --learning-rate 1e-4 --warmup-steps 30 --work-dir "$runs/base" --output "$model" \
  "${base[@]}"

adapter_pairs 0 ""  # scripts/tiny_adapters.sh

phase "int4 base"
if [ ! -f "$out/AndesVL-Tiny-int4/config.json" ]; then
  "$py" -m andesvl_tools.quantize --model "$model" --bits 4 --group-size "$GROUP" --scale-dtype "$SCALE_DTYPE" --output "$out/AndesVL-Tiny-int4"
fi
phase "done: $model ($(du -shL "$model" | cut -f1))"
echo "next: bash scripts/eval_tiny.sh $out   (reports), python -m andesvl_tools.ship_tiny --work $out   (into the repo)"
