#!/usr/bin/env bash
# Builds and runs the CPU emulations of CUDA kernels, every kernels/emu/<name>_emu.cpp: the real
# kernel source on the emulator's runtime (include/emu.h) against references (mla_mma: the
# tensor-core MLA decode; skinny: the skinny GEMMs and their fused forms; flash: the prefill
# attention; attn_train: the training flash attention (forward with lse, backward); tiled: the tensor-core tiled GEMMs; fp8gemm: the FP8 GEMMs (wgmma and SIMT); sampling: on-device sampling; train: the MoE
# training and attention softmax kernels; optim: the optimizer step's gradient norm and clip scale; fp8quant: the FP8 quantization kernels' grid-stride rows). Needs a C++17 host compiler (g++ or clang++), no CUDA.
#
#   bash kernels/emu/run.sh [--asan] [--quick] [NAME...]   NAME: a prefix of the emulations to run (all by
#                                                          default); --asan: built with AddressSanitizer
#                                                          (reads outside buffers and shared memory stop the run)
set -euo pipefail
cd "$(dirname "$0")"
CXX="${CXX:-$(command -v g++ || command -v clang++)}"
asan=()
if [ "${1:-}" = "--asan" ]; then
  asan=(-O1 -fsanitize=address -fno-omit-frame-pointer)
  export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:detect_stack_use_after_return=0}"
  shift
fi
quick=()
if [ "${1:-}" = "--quick" ]; then
  quick=(--quick)
  shift
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
flags=(-std=c++17 -O2 -fno-strict-aliasing -w -Wno-psabi -Iinclude -I../cuda)
# misaligned vector accesses (a float2 store at a 4-byte address faults on the GPU, silently works
# on x86): UBSan's alignment check aborts the emulation on them, where the compiler has it
echo 'int main() { return 0; }' >"$out/probe.cpp"
if "$CXX" -fsanitize=alignment -fno-sanitize-recover=alignment "$out/probe.cpp" -o "$out/probe" 2>/dev/null; then
  flags+=(-fsanitize=alignment -fno-sanitize-recover=alignment)
else
  echo "note: $CXX has no -fsanitize=alignment; misaligned vector accesses go unchecked"
fi
flags+=("${asan[@]}")
ran=0
for src in *_emu.cpp; do
  name="${src%_emu.cpp}"
  if [ $# -gt 0 ]; then
    want=0
    for w in "$@"; do case "$name" in "$w"*) want=1 ;; esac; done
    [ "$want" = 1 ] || continue
  fi
  echo "-- $name ($src)"
  "$CXX" "${flags[@]}" "$src" -o "$out/$name"
  "$out/$name" "${quick[@]}"
  ran=$((ran + 1))
done
[ "$ran" -gt 0 ] || { echo "no emulation matches: $*" >&2; exit 2; }
