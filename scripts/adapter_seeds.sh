#!/usr/bin/env bash
# Run-to-run spread of the AndesVL-Tiny scenario adapters, and what QALFT buys beyond it: train the four adapters of
# train_tiny.sh again with other seeds on the same base, then evaluate every seed on the full OCR and GUI test and val
# splits (500 + 500 each), comparing example by example (evaluate.py --compare) QALFT with plain LoRA on the int4
# base, QALFT on the int4 base with plain LoRA on the float base, and plain LoRA on the int4 base with the float base.
#
#   bash scripts/adapter_seeds.sh OUT SEED [SEED ...]     # OUT: a finished train_tiny.sh output; e.g. 1 2
#
# Writes OUT/seeds/AndesVL-Tiny (links to OUT/AndesVL-Tiny's files, its seed-0 adapters, and the new adapters
# <name>-seed<S>), OUT/seeds/runs (adapter work dirs and logs, evaluation logs) and the reports
# OUT/eval/seeds_{test,val}_{ocr,gui}.json, and OUT/eval/seeds_summary.json: every row's accuracy and each comparison
# on test and val pooled (1,000 examples per task). ship_tiny.py ships every report under OUT/eval. Resumable like
# train_tiny.sh. Measured on a 2-core CPU: 21 minutes of training per seed, 27 minutes of evaluation for seeds 0, 1, 2.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # the andesvl_tools package, run from this checkout
if [ $# -lt 2 ]; then echo "usage: bash scripts/adapter_seeds.sh OUT SEED [SEED ...]" >&2; exit 2; fi
if [ ! -d "$1" ]; then echo "OUT $1 is not a folder: run bash scripts/train_tiny.sh $1 first" >&2; exit 2; fi
out="$(cd "$1" && pwd)"; shift
seeds=("$@")
for seed in "${seeds[@]}"; do
  if ! [[ "$seed" =~ ^[1-9][0-9]*$ ]]; then
    echo "SEED must be a positive integer (0 is train_tiny.sh's), got '$seed'" >&2; exit 2
  fi
done
for path in "$out/AndesVL-Tiny/model.safetensors" "$out/AndesVL-Tiny-int4/config.json" "$out/datasets/manifest.json"; do
  if [ ! -e "$path" ]; then echo "$path is missing: run bash scripts/train_tiny.sh $out first" >&2; exit 2; fi
done
venv="$(bash "$root/scripts/setup_env.sh" "${ANDESVL_LINE:-tf5}" | tail -n 1)"
py="$venv/bin/python"
data="$out/datasets" runs="$out/seeds/runs" model="$out/seeds/AndesVL-Tiny"
reports="$out/eval"
mkdir -p "$runs" "$model/adapters" "$reports"
SECONDS=0
phase() { echo "== [$(printf '%4d' "$SECONDS") s] $*"; }
source "$root/scripts/tiny_adapters.sh"

# The base and the seed-0 adapters, linked: new adapters land beside them without touching OUT/AndesVL-Tiny.
for path in "$out/AndesVL-Tiny"/* "$out/AndesVL-Tiny/adapters"/*; do
  target="$model/${path#"$out/AndesVL-Tiny/"}"
  if [ "$(basename "$path")" != adapters ] && [ ! -e "$target" ]; then ln -s "$path" "$target"; fi
done

for seed in "${seeds[@]}"; do adapter_pairs "$seed" "-seed$seed"; done

phase "evaluate: every seed, full OCR and GUI test and val splits"
export OMP_NUM_THREADS=1  # tiny shapes: one thread is fastest
evaluate() {  # task split
  local task="$1" split="$2" args=() suffix
  for suffix in "" "${seeds[@]/#/-seed}"; do
    args+=(--adapter "$task$suffix" --adapter "$task-qalft-int4$suffix"
           --compare "int4 base + adapter:$task-qalft-int4$suffix" "int4 base + adapter:$task$suffix"
           --compare "int4 base + adapter:$task-qalft-int4$suffix" "adapter:$task$suffix"
           --compare "int4 base + adapter:$task$suffix" "adapter:$task$suffix")  # what int4 costs plain LoRA
  done
  local report="$reports/seeds_${split}_$task.json" log="$runs/eval-${split}_$task.log"
  if [ -f "$report" ]; then echo "eval ${split}_$task: done"; return; fi
  "$py" -m andesvl_tools.evaluate --model "$model" --data "$data" --split "$split" --tasks "$task" \
    --quantized-model "$out/AndesVL-Tiny-int4" --dtype float32 --device cpu --batch-size 8 --max-new-tokens 32 \
    "${args[@]}" --output "$report" > "$log" 2>&1 || { echo "eval ${split}_$task failed: see $log" >&2; return 1; }
  grep "McNemar" "$log"
}
# GUI rows take about 2.5x as long as OCR rows: one split per process, GUI first.
{ evaluate gui test && evaluate ocr test; } & first=$!
{ evaluate gui val && evaluate ocr val; } & second=$!
wait "$first"; wait "$second"

phase "summary: test and val pooled"
"$py" - "$reports" "$root/scripts" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from evaluate import comparison_line, paired_comparison
reports = Path(sys.argv[1])
summary = {"splits": ["test", "val"], "tasks": {}}
for task in ("ocr", "gui"):
    splits = [json.loads((reports / f"seeds_{split}_{task}.json").read_text()) for split in summary["splits"]]
    pooled = {name: "".join(report["rows"][name][task]["per_example"] for report in splits)
              for name in splits[0]["rows"]}
    rows = {name: {"accuracy": flags.count("1") / len(flags), "n": len(flags)} for name, flags in pooled.items()}
    comparisons = [{"task": task, "a": c["a"], "b": c["b"], **paired_comparison(pooled[c["a"]], pooled[c["b"]])}
                   for c in splits[0]["comparisons"]]
    summary["tasks"][task] = {"rows": rows, "comparisons": comparisons}
    for name, row in rows.items():
        print(f"[{task}] {name}: {100 * row['accuracy']:.1f}% (n={row['n']})")
    for comparison in comparisons:
        print(comparison_line(comparison))
(reports / "seeds_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
PY
phase "done: $reports/seeds_*.json"
