#!/usr/bin/env bash
# The full AndesVL-Tiny recipe in one command: data -> staged base (vision, align, pretrain, sft) -> scenario adapters
# (ocr, gui; plain LoRA and QALFT int4) -> int4 base. About 60 minutes on a 2-core CPU; resumable (re-run it).
#
#   bash scripts/train_tiny.sh [OUT]          # default OUT: outputs/tiny
#
# Writes OUT/datasets (make_datasets.py), OUT/runs (checkpoints, per-stage metrics + loss PNGs),
# OUT/AndesVL-Tiny (bf16 repo folder with adapters/{ocr,gui,ocr-qalft-int4,gui-qalft-int4}) and
# OUT/AndesVL-Tiny-int4 (quantize.py). Every step is seeded; a finished step is skipped when the script re-runs
# (delete OUT to retrain from scratch: adapters of an older base are not retrained). Then scripts/eval_tiny.sh writes
# the evaluation reports and scripts/ship_tiny.py copies the result into the repo (AndesVL-Tiny/).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/outputs/tiny}"
venv="$(bash "$root/scripts/setup_env.sh" "${ANDESVL_LINE:-tf5}" | tail -n 1)"
py="$venv/bin/python"
data="$out/datasets" runs="$out/runs" model="$out/AndesVL-Tiny"
mkdir -p "$runs"
SECONDS=0
phase() { echo "== [$(printf '%4d' "$SECONDS") s] $*"; }

# LoRA on every linear of the language model, the vision encoder and the projector; rank 8 keeps the four adapters
# at ~0.6 MB each (the whole folder stays under 48 MB). Group size 16 divides every in_features of this model.
LORA_TARGETS='(language_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)|vision_encoder\.trunk\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[123])|mlp\.[02])'
GROUP=16

phase "data"
if [ ! -f "$data/manifest.json" ]; then
  "$py" "$root/scripts/make_datasets.py" --output "$data" --seed 0 --vqa-train-size all
fi

# Base: a vision warm-up, then the three stages of the paper at small scale, all from scratch. The scenario tasks (ocr,
# gui) are capped at 1,000 examples in the base, so the base knows their format; the adapters get the full data.
# vision: the from-scratch encoder learns the shape and colour of each easy-vqa train image through linear heads (the
# official sizes start from a pretrained encoder instead). Measured: trained through the language model alone, the
# encoder learned colour but never shape (39% after 1,500 align steps; 41% in the previous recipe's final model).
# `--vision-tasks vqa,ocr` adds per-token OCR character heads; measured (2,000 x 32 at 6e-4, 634 s): characters 58%
# linearly readable from the visual tokens, shape 93%, but the OCR adapters still read nothing (0% exact match, 30%
# token accuracy after 2,500 steps) and the recipe took 62 minutes, so the shipped recipe keeps the vqa-only warm-up.
# align trains every module (the text model is random too) on answers only the image determines: the easy-vqa colour
# and shape questions. Measured: with yes/no questions (which a text prior half answers) in the mix from step 0 the
# model learned to ignore the image; with OCR in the mix its long answers dominate the token-mean loss.
# Learning rates: 1e-3 made the from-scratch encoder unstable (shape at chance); 3e-4 learns.
base=(--data "$data" --task-limit ocr=1000,gui=1000 --val --max-val-examples 200 --seed 0
      --num-threads 2 --resume --save-steps 500 --eval-steps 1000 --logging-steps 20)
phase "base: vision warm-up (encoder + projector, image-level shape/colour heads)"
"$py" "$root/scripts/train.py" --init tiny-aimv2 --stage vision --vision-tasks vqa --max-steps 2000 --batch-size 32 \
  --learning-rate 3e-4 --warmup-steps 50 --work-dir "$runs/base" --output "$runs/export-vision" "${base[@]}"
phase "base: align (image-determined answers; all modules)"
"$py" "$root/scripts/train.py" --init "$runs/base/vision/model" --stage align \
  --train-modules vision_encoder,mlp,language_model --tasks vqa --drop-answers yes,no --max-steps 1000 \
  --batch-size 16 --learning-rate 3e-4 --warmup-steps 50 --work-dir "$runs/base" --output "$runs/export-align" \
  "${base[@]}"
phase "base: pretrain (all modules, all tasks)"
"$py" "$root/scripts/train.py" --init "$runs/base/align/model" --stage pretrain --max-steps 3000 --batch-size 8 \
  --learning-rate 3e-4 --warmup-steps 100 --work-dir "$runs/base" --output "$runs/export-pretrain" "${base[@]}"
phase "base: sft (multi-task instruction tuning)"
"$py" "$root/scripts/train.py" --init "$runs/base/pretrain/model" --stage sft --max-steps 1000 --batch-size 8 \
  --learning-rate 1e-4 --warmup-steps 30 --work-dir "$runs/base" --output "$model" "${base[@]}"

adapter() {  # name task steps [--qalft int4 --qalft-group-size N]
  local name="$1" task="$2" steps="$3"; shift 3
  if [ -f "$model/adapters/$name/adapter_model.safetensors" ]; then echo "adapters/$name: done"; return; fi
  local resume=()  # continue an interrupted run from its last checkpoint
  if compgen -G "$runs/adapter-$name/checkpoint-*" > /dev/null; then resume=(--resume); fi
  "$py" "$root/scripts/finetune_lora.py" --model "$model" --name "$name" --dtype float32 \
    --train-file "$data/$task/train.jsonl" --eval-file "$data/$task/val.jsonl" \
    --lora-rank 8 --lora-alpha 16 --lora-dropout 0.0 --target-modules "$LORA_TARGETS" \
    --learning-rate 1e-3 --warmup-steps 30 --max-steps "$steps" --per-device-batch-size 8 --num-threads 1 --seed 0 \
    --base-model-id AndesVL-Tiny --work-dir "$runs/adapter-$name" --output-dir "$model/adapters/$name" \
    --save-steps 200 --eval-steps "$steps" --logging-steps 20 "${resume[@]}" "$@" > "$runs/adapter-$name.log" 2>&1 \
    || { echo "adapters/$name failed: see $runs/adapter-$name.log" >&2; return 1; }
  echo "adapters/$name: $(tail -c 300 "$runs/adapter-$name.log" | tr '\n' ' ')"
}
# Two single-threaded trainings at a time use both cores better than one two-threaded one.
phase "adapters: ocr (plain LoRA | QALFT int4)"
adapter ocr ocr 1500 & first=$!
adapter ocr-qalft-int4 ocr 1500 --qalft int4 --qalft-group-size "$GROUP" & second=$!
wait "$first"; wait "$second"
phase "adapters: gui (plain LoRA | QALFT int4)"
adapter gui gui 400 & first=$!
adapter gui-qalft-int4 gui 400 --qalft int4 --qalft-group-size "$GROUP" & second=$!
wait "$first"; wait "$second"

phase "int4 base"
if [ ! -f "$out/AndesVL-Tiny-int4/config.json" ]; then
  "$py" "$root/scripts/quantize.py" --model "$model" --bits 4 --group-size "$GROUP" --output "$out/AndesVL-Tiny-int4"
fi
phase "done: $model ($(du -shL "$model" | cut -f1))"
echo "next: bash scripts/eval_tiny.sh $out   (reports), python scripts/ship_tiny.py --work $out   (into the repo)"
