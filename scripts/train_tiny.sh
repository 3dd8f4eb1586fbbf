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

# Adapters: LoRA on the text model's linears (the encoder and projector are the warm-up's, frozen in the base stages).
# Group size 16 divides every in_features of this model.
LM_TARGETS='language_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)'
GROUP=16

phase "data"
if [ ! -f "$data/manifest.json" ]; then
  "$py" "$root/scripts/make_datasets.py" --output "$data" --seed 0 --vqa-train-size all --ocr-train-size 16000
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
"$py" "$root/scripts/train.py" --init tiny-aimv2 --stage vision --vision-tasks vqa,ocr --max-steps 2000 \
  --batch-size 32 --learning-rate 6e-4 --warmup-steps 50 --work-dir "$runs/base" --output "$runs/export-vision" \
  "${base[@]}" --task-limit ocr=4000,gui=1000
phase "base: align (image-determined answers; text model)"
"$py" "$root/scripts/train.py" --init "$runs/base/vision/model" --stage align --train-modules language_model \
  --tasks vqa --drop-answers yes,no --max-steps 1000 --batch-size 16 --learning-rate 3e-4 --warmup-steps 50 \
  --work-dir "$runs/base" --output "$runs/export-align" "${base[@]}"
phase "base: pretrain (text model, all tasks)"
"$py" "$root/scripts/train.py" --init "$runs/base/align/model" --stage pretrain --train-modules language_model \
  --max-steps 3000 --batch-size 8 --learning-rate 3e-4 --warmup-steps 100 --work-dir "$runs/base" \
  --output "$runs/export-pretrain" "${base[@]}"
phase "base: sft (multi-task instruction tuning; text model)"
"$py" "$root/scripts/train.py" --init "$runs/base/pretrain/model" --stage sft --train-modules language_model \
  --max-steps 1000 --batch-size 8 --learning-rate 1e-4 --warmup-steps 30 --work-dir "$runs/base" --output "$model" \
  "${base[@]}"

adapter() {  # name train-file eval-file steps [finetune_lora flags]
  local name="$1" train="$2" eval="$3" steps="$4"; shift 4
  if [ -f "$model/adapters/$name/adapter_model.safetensors" ]; then echo "adapters/$name: done"; return; fi
  local resume=()  # continue an interrupted run from its last checkpoint
  if compgen -G "$runs/adapter-$name/checkpoint-*" > /dev/null; then resume=(--resume); fi
  "$py" "$root/scripts/finetune_lora.py" --model "$model" --name "$name" --dtype float32 --save-dtype bfloat16 \
    --train-file "$train" --eval-file "$eval" --lora-dropout 0.0 --target-modules "$LM_TARGETS" \
    --train-answer-tokens --learning-rate 1e-3 --warmup-steps 30 --max-steps "$steps" --per-device-batch-size 8 \
    --num-threads 1 --seed 0 --base-model-id AndesVL-Tiny --work-dir "$runs/adapter-$name" \
    --output-dir "$model/adapters/$name" --save-steps 200 --eval-steps "$steps" --logging-steps 20 "${resume[@]}" \
    "$@" > "$runs/adapter-$name.log" 2>&1 \
    || { echo "adapters/$name failed: see $runs/adapter-$name.log" >&2; return 1; }
  echo "adapters/$name: $(tail -c 300 "$runs/adapter-$name.log" | tr '\n' ' ')"
}
# Every adapter also trains the embedding rows of its answer tokens (--train-answer-tokens: a LoRA cannot move the
# digits' output vectors; measured, without them the ocr adapter read 7.6% of held-out numbers, with them 29.5%).
# ocr: rank 32 and the projector in full, on the number images. gui: rank 16, 1,200 steps (measured: validation loss
# 0.61, 15.5% of 200 GUI tests; rank 8 and 400 steps: 0.89, 0%), the projector left to ocr (the folder stays under
# 48 MB).
# Two single-threaded trainings at a time use both cores better than one two-threaded one.
ocr=("$data/ocr/train-numbers.jsonl" "$data/ocr/val-numbers.jsonl" 2000 --lora-rank 32 --lora-alpha 64
     --train-projector)
gui=("$data/gui/train.jsonl" "$data/gui/val.jsonl" 1200 --lora-rank 16 --lora-alpha 32)
phase "adapters: ocr (plain LoRA | QALFT int4)"
adapter ocr "${ocr[@]}" & first=$!
adapter ocr-qalft-int4 "${ocr[@]}" --qalft int4 --qalft-group-size "$GROUP" & second=$!
wait "$first"; wait "$second"
phase "adapters: gui (plain LoRA | QALFT int4)"
adapter gui "${gui[@]}" & first=$!
adapter gui-qalft-int4 "${gui[@]}" --qalft int4 --qalft-group-size "$GROUP" & second=$!
wait "$first"; wait "$second"

phase "int4 base"
if [ ! -f "$out/AndesVL-Tiny-int4/config.json" ]; then
  "$py" "$root/scripts/quantize.py" --model "$model" --bits 4 --group-size "$GROUP" --output "$out/AndesVL-Tiny-int4"
fi
phase "done: $model ($(du -shL "$model" | cut -f1))"
echo "next: bash scripts/eval_tiny.sh $out   (reports), python scripts/ship_tiny.py --work $out   (into the repo)"
