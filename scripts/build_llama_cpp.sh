#!/usr/bin/env bash
# Build the llama.cpp peer of the quantization benchmark (not part of CI): llama-bench and llama-quantize from the
# llama.cpp tree vendored in the llama-cpp-python sdist (PyPI is reachable where the Hub and GitHub are not), plus
# what its convert_hf_to_gguf.py needs in the benchmark's venv. Prints the tree to pass as --llama-cpp.
# Usage: bash scripts/build_llama_cpp.sh [VENV] [DEST]   (defaults: .venv/tf5, outputs/llama.cpp)
#   python -m andesvl_tools.benchmark --sections quant --prompt-tokens 230 --llama-cpp "$(bash scripts/build_llama_cpp.sh | tail -1)"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv/tf5}"
dest="${2:-$root/outputs/llama.cpp}"
version=0.3.36  # llama-cpp-python; its vendor/llama.cpp is what gets built
tree="$dest/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -x "$tree/build/bin/llama-bench" ] || [ ! -x "$tree/build/bin/llama-quantize" ]; then
  mkdir -p "$dest"
  "$venv/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$dest" >&2
  tar -xzf "$dest/llama_cpp_python-$version.tar.gz" -C "$dest"
  # The vector extensions this CPU lists, without AMX: ggml's AMX path dies with SIGILL on `ldtilecfg` in this
  # workplace's VMs (cpuinfo lists amx_* and arch_prctl grants the tile state, yet the instruction traps), and a
  # -march=native build enables it, so the ISA flags are set one by one.
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
  isa=()
  for pair in avx:AVX avx2:AVX2 bmi2:BMI2 fma:FMA f16c:F16C avx_vnni:AVX_VNNI avx512f:AVX512 \
      avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    if [[ " $flags " == *" ${pair%%:*} "* ]]; then isa+=("-DGGML_${pair#*:}=ON"); else isa+=("-DGGML_${pair#*:}=OFF"); fi
  done
  cmake -S "$tree" -B "$tree/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF "${isa[@]}" -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  cmake --build "$tree/build" --target llama-bench llama-quantize -j "$(nproc)" >&2
fi
# convert_hf_to_gguf.py imports sentencepiece before it falls back to the BPE tokenizer.json that Qwen3 uses
"$venv/bin/pip" install -q sentencepiece >&2
echo "$tree"
