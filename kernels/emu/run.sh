#!/usr/bin/env bash
# Builds and runs the CPU emulation of the tensor-core MLA kernels (see mla_mma_emu.cpp).
# Needs a C++17 host compiler (g++ or clang++), no CUDA. Pass --quick for the short case list.
set -euo pipefail
cd "$(dirname "$0")"
CXX="${CXX:-$(command -v g++ || command -v clang++)}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$CXX" -std=c++17 -O2 -fno-strict-aliasing -w -Iinclude -I../cuda mla_mma_emu.cpp -o "$out/mla_mma_emu"
"$out/mla_mma_emu" "$@"
