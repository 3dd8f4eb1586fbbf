#!/usr/bin/env bash
# Quick start, command 1: set up the environment and run the main job on the embedded default (no download).
# Until the trained AndesVL-Tiny checkpoint lands, the embedded default is a tiny RANDOM model built here on the
# fly from the repo's own code: it exercises the real loading/processing/generation path, but its answers are
# meaningless.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh" "${ANDESVL_LINE:-tf5}" | tail -n 1)"
model="$root/outputs/AndesVL-tiny-random"
if [ ! -f "$model/model.safetensors" ]; then
  "$venv/bin/python" "$root/scripts/build_repo.py" --tiny aimv2 --seed 0 --output "$model"
fi
"$venv/bin/python" "$root/scripts/chat.py" --model "$model" --image "$root/assets/demo_shapes.png" \
  --max-new-tokens 24 --output "$root/outputs/demo_answer.json" "What shapes and colours are in this picture?"
echo "(answer above comes from a tiny random model: meaningless text, but the full AndesVL code path ran)"
