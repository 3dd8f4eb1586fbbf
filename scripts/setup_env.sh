#!/usr/bin/env bash
# Create (or reuse) the virtual environment for one supported transformers line.
# Usage: bash scripts/setup_env.sh tf4|tf5|minimal|vllm|executorch   -> prints the venv path on the last line.
# (minimal: only what the model needs, no peft; tests/test_minimal_install.py loads and generates in it.
#  vllm: the serving line, see requirements/vllm.txt)
set -euo pipefail
line="${1:?usage: setup_env.sh tf4|tf5|minimal|vllm|executorch}"
root="$(cd "$(dirname "$0")/.." && pwd)"
req="$root/requirements/$line.txt"
[ -f "$req" ] || { echo "unknown transformers line '$line' (expected tf4, tf5, minimal, vllm or executorch)" >&2; exit 2; }
venv="$root/.venv/$line"
inputs=("$root/requirements/common.txt" "$req")
[ "$line" = vllm ] && inputs+=("$root/pyproject.toml")  # the plugin's entry point is declared there
stamp="$venv/.installed-$(sha1sum "${inputs[@]}" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  # torch first and alone: the CPU wheel on disk satisfies every later requirement.
  "$venv/bin/pip" install -q "torch==2.13.0" >&2
  "$venv/bin/pip" install -q -r "$req" >&2
  if [ "$line" = vllm ]; then
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2
    "$venv/bin/pip" install -q --no-deps -e "$root" >&2  # the andesvl_vllm plugin (vLLM's entry point)
  fi
  rm -f "$venv"/.installed-*; touch "$stamp"
fi
echo "$venv"
