#!/usr/bin/env bash
# Compiles kernels/cuda/*.cu to PTX for sm_90a (H100) and sm_80 (A100 and newer, JIT-compiled by the
# driver) into kernels/ptx/<arch>/<name>.ptx, which are committed and embedded with include_str!.
#
#   bash kernels/build_ptx.sh            regenerate kernels/ptx/ and assemble it with ptxas
#   bash kernels/build_ptx.sh --verify   regenerate into a temporary directory, fail if it differs
#                                        from the committed PTX (drift), and assemble the committed
#                                        PTX with ptxas (what CI runs; no GPU needed)
#
# nvcc/ptxas come from pinned PyPI wheels installed into kernels/.toolchain/venv (git-ignored; ~100 MB,
# seconds). Pinned to 13.0: newer wheels emit PTX 9.5, which the CUDA 13.0 driver rejects. If the
# wheels cannot be installed (no network) the script fails with a message saying so: a PTX check
# that silently does nothing would let stale PTX through. Set DSV3_NVCC_BIN to a directory holding
# nvcc and ptxas 13.0 to use an installed toolkit instead.
set -euo pipefail
cd "$(dirname "$0")"
ARCHS=(sm_90a sm_80)
VENV=.toolchain/venv
PINS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.88
  nvidia-cuda-cccl==13.0.85)

verify=0
case "${1:-}" in
  --verify) verify=1 ;;
  "") ;;
  *) echo "usage: $0 [--verify]" >&2; exit 2 ;;
esac

if [ -n "${DSV3_NVCC_BIN:-}" ]; then
  BIN="$DSV3_NVCC_BIN"
else
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" || { echo "ERROR: python3 -m venv failed (install python3-venv)" >&2; exit 1; }
  fi
  BIN="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13/bin"
  if [ ! -x "$BIN/nvcc" ] || ! "$BIN/nvcc" --version | grep -q "V13.0.88"; then
    echo "installing the pinned nvcc wheels (${PINS[*]})"
    "$VENV/bin/pip" install -q --disable-pip-version-check "${PINS[@]}" || {
      echo "ERROR: could not install nvcc 13.0.88 from PyPI (offline?). The PTX check needs it;" >&2
      echo "       set DSV3_NVCC_BIN=/path/to/cuda-13.0/bin to use an installed toolkit." >&2
      exit 1
    }
  fi
fi
export PATH="$BIN:$PATH"
nvcc --version | tail -1

out=ptx
if [ "$verify" = 1 ]; then
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi
for arch in "${ARCHS[@]}"; do
  mkdir -p "$out/$arch"
  for src in cuda/*.cu; do
    name="$(basename "$src" .cu)"
    nvcc -ptx -arch="$arch" -O3 -Icuda "$src" -o "$out/$arch/$name.ptx"
  done
done

if [ "$verify" = 1 ]; then
  if ! diff -r -q ptx "$out" >/dev/null; then
    diff -r -q ptx "$out" || true
    echo "ERROR: kernels/ptx/ is stale: run 'bash kernels/build_ptx.sh' and commit kernels/ptx/" >&2
    exit 1
  fi
  echo "kernels/ptx/ is current"
fi

# Assemble every committed PTX file: registers, spills, shared memory per kernel.
fail=0
for arch in "${ARCHS[@]}"; do
  for f in ptx/"$arch"/*.ptx; do
    if ! log="$(ptxas -arch="$arch" -v "$f" -o /dev/null 2>&1)"; then
      echo "$log" >&2
      echo "ERROR: ptxas failed on $f" >&2
      fail=1
      continue
    fi
    spills="$(echo "$log" | grep -Eo '[0-9]+ bytes spill stores' | awk '{s+=$1} END {print s+0}')"
    kernels="$(echo "$log" | grep -c 'Compiling entry function' || true)"
    echo "ptxas $arch $(basename "$f"): $kernels kernels, $spills bytes of spill stores"
  done
done
exit $fail
