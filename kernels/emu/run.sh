#!/usr/bin/env bash
# Builds and runs the CPU emulations of CUDA kernels: the tensor-core MLA kernels
# (mla_mma_emu.cpp), the skinny GEMMs with their fused forms (skinny_emu.cpp) and the flash
# prefill attention (flash_emu.cpp). Needs a C++17 host compiler (g++ or clang++), no CUDA. Pass
# --quick for the short case lists; pass mla, skinny or flash (after --quick, if any) to run one.
set -euo pipefail
cd "$(dirname "$0")"
CXX="${CXX:-$(command -v g++ || command -v clang++)}"
quick=()
if [ "${1:-}" = "--quick" ]; then
  quick=(--quick)
  shift
fi
which="${1:-all}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
flags=(-std=c++17 -O2 -fno-strict-aliasing -w -Iinclude -I../cuda)
if [ "$which" = all ] || [ "$which" = mla ]; then
  "$CXX" "${flags[@]}" mla_mma_emu.cpp -o "$out/mla_mma_emu"
  "$out/mla_mma_emu" "${quick[@]}"
fi
if [ "$which" = all ] || [ "$which" = skinny ]; then
  "$CXX" "${flags[@]}" skinny_emu.cpp -o "$out/skinny_emu"
  "$out/skinny_emu" "${quick[@]}"
fi
if [ "$which" = all ] || [ "$which" = flash ]; then
  "$CXX" "${flags[@]}" flash_emu.cpp -o "$out/flash_emu"
  "$out/flash_emu" "${quick[@]}"
fi
