#!/usr/bin/env bash
# Quick start, command 2: set up both supported transformers lines and run the same test suite in each.
# Usage: bash scripts/run_tests.sh [pytest args...]      (ANDESVL_LINES="tf4 tf5 vllm executorch" by default)
# The vllm line runs tests/test_vllm.py (vLLM against transformers on the same venv), the executorch line
# tests/test_executorch.py (the exported on-device programs against the eager model); tf4 and tf5 run the whole suite.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
passed=0; failed=0; status=0
for line in ${ANDESVL_LINES:-tf4 tf5 vllm executorch}; do
  venv="$(bash scripts/setup_env.sh "$line" | tail -n 1)" || { echo "setup of $line failed"; exit 1; }
  echo "=== $line: $("$venv/bin/python" -c 'import transformers, torch, peft; print("transformers", transformers.__version__, "torch", torch.__version__, "peft", peft.__version__)')"
  report="$root/outputs/pytest-$line.xml"
  mkdir -p "$root/outputs"
  if [ "$line" = vllm ]; then
    ANDESVL_REQUIRE_VLLM=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
      "$venv/bin/python" -m pytest tests/test_vllm.py -q -p no:cacheprovider --junitxml="$report" "$@"
  elif [ "$line" = executorch ]; then
    ANDESVL_REQUIRE_EXECUTORCH=1 \
      "$venv/bin/python" -m pytest tests/test_executorch.py -q -p no:cacheprovider --junitxml="$report" "$@"
  else
    "$venv/bin/python" -m pytest tests -q -p no:cacheprovider --junitxml="$report" "$@"
  fi
  code=$?
  [ "$code" -eq 0 ] || status=1
  counts="$("$venv/bin/python" - "$report" <<'PY'
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
print(tests - failures - errors - skipped, failures + errors)
PY
)" || counts="0 1"
  passed=$((passed + ${counts% *})); failed=$((failed + ${counts#* }))
  if [ "$code" -ne 0 ] && [ "${counts#* }" -eq 0 ]; then failed=$((failed + 1)); fi
done
echo "all lines: $passed passed, $failed failed"
exit $status
