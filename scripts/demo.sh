#!/usr/bin/env bash
# Quick start, command 1: set up the environment and run the main job on the embedded default (no download):
# the shipped AndesVL-Tiny (AndesVL-Tiny/, trained from scratch here by scripts/train_tiny.sh) answers questions on
# bundled held-out test images (assets/andesvl-tiny/): easy-vqa and multi-image with the base, OCR with
# adapters/ocr, a phone screen with adapters/gui, swapping the adapters at runtime with peft, and prints each
# answer next to its ground truth.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # the andesvl_tools package, run from this checkout
venv="$(bash "$root/scripts/setup_env.sh" "${ANDESVL_LINE:-tf5}" | tail -n 1)"
"$venv/bin/python" -m andesvl_tools.demo --model "$root/AndesVL-Tiny" \
  --examples "$root/assets/andesvl-tiny/examples.jsonl" --output "$root/outputs/demo.json" "$@"
