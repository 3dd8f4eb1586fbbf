#!/usr/bin/env bash
# Create (or reuse) the virtual environment for one supported transformers line.
# Usage: bash scripts/setup_env.sh tf4|tf5|minimal   -> prints the venv path on the last line.
# (minimal: only what the model needs, no peft; tests/test_minimal_install.py loads and generates in it)
set -euo pipefail
line="${1:?usage: setup_env.sh tf4|tf5|minimal}"
root="$(cd "$(dirname "$0")/.." && pwd)"
req="$root/requirements/$line.txt"
[ -f "$req" ] || { echo "unknown transformers line '$line' (expected tf4, tf5 or minimal)" >&2; exit 2; }
venv="$root/.venv/$line"
stamp="$venv/.installed-$(sha1sum "$root"/requirements/common.txt "$req" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  # torch first and alone: the CPU wheel on disk satisfies every later requirement.
  "$venv/bin/pip" install -q "torch==2.13.0" >&2
  "$venv/bin/pip" install -q -r "$req" >&2
  rm -f "$venv"/.installed-*; touch "$stamp"
fi
echo "$venv"
