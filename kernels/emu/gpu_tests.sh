#!/usr/bin/env bash
# The GPU tests on the CPU: builds kernels/emu/driver.cpp into a stand-in libcuda.so (the CUDA
# driver API over the CPU emulator; no GPU, no CUDA) and runs the GPU test files against it, so the
# host code, launchers and kernels are exercised end to end where no GPU is lent.
#
#   bash kernels/emu/gpu_tests.sh build                   only build target/emu-driver/libcuda.so
#   bash kernels/emu/gpu_tests.sh [TEST...] [-- ARGS...]  run kernels/tests/TEST.rs, or PKG:TEST (cli:cuda,
#                                                         ffi:cuda: the CLI's and the C ABI's GPU tests);
#                                                         all of them by default; with cargo test
#                                                         --release; ARGS go to the test binaries (a
#                                                         test name filter, --nocapture)
#   bash kernels/emu/gpu_tests.sh --coverage [TEST...]    also list the kernels no test launched (over
#                                                         all the tests: any such kernel fails the run)
#   bash kernels/emu/gpu_tests.sh --asan [TEST...]        the emulator and kernels built with AddressSanitizer
#                                                         (target/emu-asan): a read or write outside any
#                                                         buffer, past a launch's dynamic shared memory or a
#                                                         static __shared__ array stops the test at the access
#                                                         with its source line (the canary alone sees writes)
#   DSV3_EMU_SM=80 bash kernels/emu/gpu_tests.sh ...      the same as an sm_80 GPU (its PTX and kernels)
#   DSV3_EMU_ORDER=reverse bash kernels/emu/gpu_tests.sh  every grid's blocks, and every block's threads,
#                                                         run last to first (a result that depends on
#                                                         block order, or a missing barrier, fails)
#
# Slow (every thread is a fiber, every MMA evaluated in f64): the tiny fixtures take seconds to
# minutes per test. Timings printed by tests or benches mean nothing here. A kernel misuse the
# emulator catches prints "EMU FAILURE: ... (in kernel NAME ...)" and ends the test process.
set -euo pipefail
cd "$(dirname "$0")"
root="$(cd ../.. && pwd)"
asan=0
if [ "${1:-}" = "--asan" ]; then
  asan=1
  shift
fi
out="$root/target/emu-driver"
[ "$asan" = 1 ] && out="$root/target/emu-asan"
mkdir -p "$out"
CXX="${CXX:-$(command -v g++ || command -v clang++)}"

build() {
  grep -ho '\.entry [A-Za-z0-9_]*' ../ptx/sm_90a/*.ptx | awk '{print "R(" $2 ")"}' | sort -u >"$out/emu_kernels.inc.new"
  if ! cmp -s "$out/emu_kernels.inc.new" "$out/emu_kernels.inc" 2>/dev/null; then mv "$out/emu_kernels.inc.new" "$out/emu_kernels.inc"; fi
  rm -f "$out/emu_kernels.inc.new"
  # registers per thread of every kernel, as ptxas assembles each architecture's PTX (the driver
  # refuses a block those registers cannot fit, as a GPU does); redone when the PTX changes
  local ptxas=""
  for p in "${DSV3_NVCC_BIN:-/nonexistent}/ptxas" ../.toolchain/venv/lib/python3*/site-packages/nvidia/cu13/bin/ptxas "$(command -v ptxas || true)"; do
    [ -n "$p" ] && [ -x "$p" ] && { ptxas="$p"; break; }
  done
  local regs_stale=0
  [ -f "$out/emu_regs.inc" ] || regs_stale=1
  for f in ../ptx/sm_90a/*.ptx ../ptx/sm_80/*.ptx; do [ "$f" -nt "$out/emu_regs.inc" ] && regs_stale=1; done
  if [ -n "$ptxas" ] && { [ "$regs_stale" = 1 ] || ! grep -q '^G(' "$out/emu_regs.inc"; }; then
    echo "registers per kernel from $ptxas -v (sm_90a, sm_80)"
    for arch in sm_90a sm_80; do
      for f in ../ptx/$arch/*.ptx; do
        "$ptxas" -arch="$arch" -v "$f" -o /dev/null 2>&1 |
          awk -v a="${arch:3:2}" '/Compiling entry function/ {k = $0; sub(/.*function ./, "", k); sub(/. for .*/, "", k)}
                                 /Used [0-9]+ registers/ {print "G(" a ", " k ", " $5 ")"}'
      done
    done >"$out/emu_regs.inc.new"
    mv "$out/emu_regs.inc.new" "$out/emu_regs.inc"
  elif [ -z "$ptxas" ]; then
    echo "note: no ptxas (bash kernels/build_ptx.sh installs it): launches are not checked against the kernels' registers"
    [ -f "$out/emu_regs.inc" ] || : >"$out/emu_regs.inc"
  fi
  local flags=(-std=c++17 -O2 -g -fPIC -shared -fno-strict-aliasing -w -Wno-psabi -Iinclude -I../cuda -I"$out")
  [ "$asan" = 1 ] && flags+=(-O1 -fsanitize=address -fno-omit-frame-pointer)
  echo 'int main() { return 0; }' >"$out/probe.cpp"
  if "$CXX" -fsanitize=alignment -fno-sanitize-recover=alignment "$out/probe.cpp" -o "$out/probe" 2>/dev/null; then
    flags+=(-fsanitize=alignment -fno-sanitize-recover=alignment)
  fi
  local deps=(driver.cpp include/*.h ../cuda/*.cu ../cuda/*.cuh "$out/emu_kernels.inc" "$out/emu_regs.inc")
  local stale=0
  [ -f "$out/libcuda.so" ] || stale=1
  for d in "${deps[@]}"; do [ "$d" -nt "$out/libcuda.so" ] && stale=1; done
  if [ "$stale" = 1 ]; then
    echo "building $out/libcuda.so (the CPU emulator as a CUDA driver)"
    "$CXX" "${flags[@]}" driver.cpp -o "$out/libcuda.so.tmp.$$"
    mv "$out/libcuda.so.tmp.$$" "$out/libcuda.so"
  fi
  ln -sf libcuda.so "$out/libcuda.so.1"
  ln -sf libcuda.so "$out/libcublas.so"  # the cuBLAS GEMMs live in the same library (one state)
}

# one build at a time (several runs of this script may start together)
if command -v flock >/dev/null; then
  exec 9>"$out/.lock"
  flock 9
  build
  flock -u 9
else
  build
fi
[ "${1:-}" = "build" ] && exit 0
coverage=""
if [ "${1:-}" = "--coverage" ]; then
  shift
  coverage="$out/coverage.txt"
  rm -f "$coverage"
  export DSV3_EMU_COVERAGE="$coverage"
fi
tests=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do tests+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
all=0
if [ ${#tests[@]} -eq 0 ]; then
  all=1
  for f in ../tests/*.rs; do tests+=("$(basename "$f" .rs)"); done
  tests+=(cli:cuda ffi:cuda)
fi
export LD_LIBRARY_PATH="$out${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "$asan" = 1 ]; then
  # the test binaries (not cargo) start with the ASan runtime preloaded: cargo's runner setting
  libasan="$("$CXX" -print-file-name=libasan.so)"
  [ -f "$libasan" ] || { echo "--asan: $CXX has no libasan.so" >&2; exit 2; }
  host="$(rustc -vV | sed -n 's/^host: //p' | tr 'a-z-' 'A-Z_')"
  export "CARGO_TARGET_${host}_RUNNER=env LD_PRELOAD=$libasan ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0"
fi
export DSV3_FIXTURES="${DSV3_FIXTURES:-$root/tests/fixtures}"
cd "$root"
rc=0
for t in "${tests[@]}"; do
  pkg=kernels
  case "$t" in *:*) pkg="${t%%:*}" t="${t#*:}" ;; esac
  echo "== dsv3-$pkg --test $t (on the CPU emulator)"
  cargo test --release -q -p "dsv3-$pkg" --test "$t" -- --test-threads=1 "$@" || rc=1
done
if [ -n "$coverage" ]; then
  echo "== kernel coverage: launches per kernel over these tests ($coverage)"
  launched="$(awk '{n[$1] += $2} END {for (k in n) print k}' "$coverage" 2>/dev/null | sort)"
  echo "$(echo "$launched" | grep -c . || true) of $(grep -c . "$out/emu_kernels.inc") kernels launched; never launched:"
  never="$(sed 's/^R(\(.*\))$/\1/' "$out/emu_kernels.inc" | sort | comm -23 - <(echo "$launched"))"
  echo "${never:-  (none)}" | sed 's/^\([^ ]\)/  \1/'
  if [ "$all" = 1 ] && [ -n "$never" ]; then
    echo "FAIL: every kernel needs a test that launches it (kernels/tests, cli, ffi)"
    rc=1
  fi
fi
exit $rc
