#!/usr/bin/env bash
# The GPU checks and benchmarks of a device session, in two halves: the device machine has CUDA
# but no Rust, so everything is built here and run there.
#
#   bash kernels/gpu_session.sh pack           here: release build, every GPU test executable,
#                                              the benches; stripped and xz-packed into gpu/gpu.tar.xz
#                                              (gpu/ is git-ignored; carry it to the device)
#   bash kernels/gpu_session.sh test [NAME...] there: unpack, run the GPU tests (kernels tests, the
#                                              CLI and C ABI GPU tests), one at a time; NAME limits
#                                              them to those test files
#   bash kernels/gpu_session.sh bench [GROUP]  there: the 88M decode bench (batch 1 and 32), its training
#                                              step bench (bf16, f32, bf16 + FP8 linears) and the
#                                              kernel benches (GEMM vs cuBLAS, MLA vs the copy
#                                              ceiling, flash prefill, FP8 GEMM vs cuBLASLt); GROUP:
#                                              decode, train or kernels (all by default)
#   bash kernels/gpu_session.sh peers          there: the same runs next to HF transformers on the GPU
#                                              (benches/train_vs_hf.py --device cuda: the training
#                                              step vs HF eager and torch.compile, bf16)
#   bash kernels/gpu_session.sh curves [STEPS] there: issue 7's FP8 vs bf16 loss curves: the bench-88m
#                                              model trained STEPS (300) steps on the GPU in bf16 and in
#                                              bf16 + FP8 linears (same seed, data, schedule), plotted
#                                              together with final-loss gaps; SVG + metrics in
#                                              $OUT/curves (or gpu/curves) for docs/FP8.md
#   bash kernels/gpu_session.sh triage [GROUP] there: the test files of the code never yet run on a
#                                              GPU, each with its default kernels and with every
#                                              fallback switch (DSV3_FP8_KERNEL=v2/v1/tma-plain, DSV3_FP8_SPLITK=1,
#                                              DSV3_FP8_SPLITK_REDUCE=separate, DSV3_FP8_TAIL_SPLIT=0,
#                                              DSV3_FP8_WGRAD_BATCH=0, DSV3_FP8_QUANT=v1,
#                                              DSV3_TRAIN_FLASH=0) and the opt-in ones
#                                              (DSV3_TRAIN_GEMM=mma, DSV3_BF16_GROUPED=mma,
#                                              DSV3_MLA_MMA=m1t32, DSV3_PDL=1,
#                                              DSV3_MLA_COMBINE=fused): a PASS/FAIL table that says
#                                              which new kernel breaks, if one does; GROUP: fp8, train
#                                              or infer (all three by default, within a 540 s budget)
#   bash kernels/gpu_session.sh next           there: everything the 2026-11-24 run left to check, in
#                                              one device command (<= 560 s; logs in $OUT): the
#                                              fixed and recalibrated tests (FP8 Wgrad alignment,
#                                              flash reproducibility, bf16/FP8 passes, moments; the
#                                              device plan, pool, deterministic pass), the
#                                              88M decode (d1w8 default vs m1t32, PDL, fused merge,
#                                              the folded MLA projections vs DSV3_ABSORB=0,
#                                              the fused MoE combine and MLA prep vs
#                                              DSV3_MOE_COMBINE=separate / DSV3_MLA_PREP=separate),
#                                              the training step (cuBLAS vs mma products, FP8,
#                                              the experts on wgmma+TMA vs mma.sync; with
#                                              --profile, its GPU time by kernel), the grouped
#                                              expert GEMM bench (kernel_bench grouped), the
#                                              head's cross-entropy (kernel_bench ce),
#                                              fp8_bench, then the loss curves in the time left
#
# A test that prints SKIP on the GPU machine is a failure of the session (only the no-GPU parts of
# tests may skip). docs/PERF.md "CUDA backend" records what these printed.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
shift || true

pack() {
  cargo build --release
  cargo build --release -p dsv3-kernels --example kernel_bench --example fp8_bench
  rm -rf gpu/bin && mkdir -p gpu/bin
  cp target/release/dsv3 target/release/examples/kernel_bench target/release/examples/fp8_bench gpu/bin/
  local exe
  for f in kernels/tests/*.rs; do
    t="$(basename "$f" .rs)"
    exe="$(cargo test --release -p dsv3-kernels --test "$t" --no-run --message-format=json 2>/dev/null |
      python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1)"
    [ -n "$exe" ] && cp "$exe" "gpu/bin/k_$t"
  done
  for pair in cli:cuda ffi:cuda; do
    exe="$(cargo test --release -p "dsv3-${pair%%:*}" --test "${pair#*:}" --no-run --message-format=json 2>/dev/null |
      python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1)"
    [ -n "$exe" ] && cp "$exe" "gpu/bin/${pair%%:*}_${pair#*:}"
  done
  strip gpu/bin/* 2>/dev/null || true
  tar -C gpu -cJf gpu/gpu.tar.xz bin
  rm -rf gpu/bin
  ls -la gpu/gpu.tar.xz
  echo "carry gpu/ and run: bash kernels/gpu_session.sh test && bash kernels/gpu_session.sh bench"
}

unpack() {
  [ -d gpu/bin ] || tar -C gpu -xJf gpu/gpu.tar.xz
  export DSV3_FIXTURES="$PWD/tests/fixtures" DSV3_BIN="$PWD/gpu/bin/dsv3"
}

run_tests() {
  unpack
  local fail=0 skips=0 out
  for exe in gpu/bin/k_* gpu/bin/cli_cuda gpu/bin/ffi_cuda; do
    [ -x "$exe" ] || continue
    name="$(basename "$exe")"
    if [ $# -gt 0 ]; then
      want=0
      for w in "$@"; do [ "$name" = "k_$w" ] || [ "$name" = "$w" ] && want=1; done
      [ "$want" = 1 ] || continue
    fi
    echo "== $name"
    # a hung kernel (an mbarrier wait that never completes) must not eat the session: 5 minutes each
    rc=0
    out="$(timeout 300 "$exe" --test-threads 1 2>&1)" || rc=$?
    if [ "$rc" != 0 ]; then
      fail=1
      [ "$rc" = 124 ] && echo "TIMEOUT: $name ran past 300 s (a hung kernel? retry with DSV3_FP8_KERNEL=v2 / DSV3_TRAIN_FLASH=0)"
    fi
    echo "$out" | grep -E "^test |test result|SKIP|panicked|FAILED|assert" | grep -v "\.\.\. ok$" || true
    skips=$((skips + $(echo "$out" | grep -c "SKIP " || true)))
  done
  echo "== GPU tests: $([ $fail = 0 ] && echo passed || echo FAILED), $skips SKIP line(s)"
  return $fail
}

# bench [GROUP...]: decode (the 88M decode, batch 1 and 32, defaults and opt-ins), train (its
# training step: bf16, f32, bf16 on cuBLAS, bf16 + FP8 linears), kernels (kernel_bench, fp8_bench);
# all three by default (split them over calls to stay under the device tool's 600 s per command).
run_bench() {
  unpack
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  gpu/bin/dsv3 init --preset bench-88m --out /tmp/m88 >/dev/null
  local groups=("$@")
  [ ${#groups[@]} -gt 0 ] || groups=(decode train kernels)
  for grp in "${groups[@]}"; do
    case "$grp" in
      decode) bench_decode ;;
      train) bench_train ;;
      kernels)
        gpu/bin/kernel_bench
        timeout 300 gpu/bin/fp8_bench || echo "fp8_bench failed or timed out (DSV3_FP8_KERNEL=v2 times the cp.async kernel)"
        ;;
      *) echo "unknown bench group: $grp (decode, train, kernels)" >&2; return 2 ;;
    esac
  done
}

bench_decode() {
  local dec=(gpu/bin/dsv3 bench --model /tmp/m88 --device cuda --prompt-len 128 --new-tokens 256)
  for b in 1 32; do
    "${dec[@]}" --batch "$b"
    # the earlier MLA decode defaults beside d1w8 (kernel_bench compares every variant)
    for v in m1t32 d1t32; do
      DSV3_MLA_MMA=$v "${dec[@]}" --batch "$b"
    done
    # programmatic dependent launch (kernel launch latency overlapped; off by default until measured)
    DSV3_PDL=1 "${dec[@]}" --batch "$b"
    # the MoE combine as its own launch instead of inside the routed down GEMM (the default)
    DSV3_MOE_COMBINE=separate "${dec[@]}" --batch "$b"
    DSV3_MLA_PREP=separate "${dec[@]}" --batch "$b"
    # the split merge inside the MLA kernel, alone and with PDL (both off by default until measured)
    DSV3_MLA_COMBINE=fused "${dec[@]}" --batch "$b"
    DSV3_MLA_COMBINE=fused DSV3_PDL=1 "${dec[@]}" --batch "$b"
  done
}

# training steps (CudaTrainer: pass + AdamW), tokens/s and MFU
bench_train() {
  local tr=(gpu/bin/dsv3 bench --model /tmp/m88 --train --device cuda --batch 8 --prompt-len 1024 --repeat 5)
  for dt in bf16 f32; do
    "${tr[@]}" --dtype "$dt" || echo "training bench ($dt) failed"
  done
  # the dense bf16 products on the mma kernels instead of cuBLAS (DSV3_TRAIN_GEMM=mma), same step
  DSV3_TRAIN_GEMM=mma "${tr[@]}" --dtype bf16 || echo "training bench (bf16, mma products) failed"
  "${tr[@]}" --dtype bf16 --precision fp8 || echo "training bench (bf16 + fp8) failed"
  DSV3_PDL=1 "${tr[@]}" --dtype bf16 || echo "training bench (bf16, PDL) failed"
}

# One test binary under an environment, a line of the table; the failures' first lines after it.
# TRIAGE_TIMEOUT (150 s) bounds each run; once TRIAGE_BUDGET (540 s, under the device tool's 600 s
# per command) is spent, the remaining runs are listed as NOT RUN (run them with a group argument).
triage_one() {
  local exe="$1" env_desc="$2" rc=0 out t0 limit="${TRIAGE_TIMEOUT:-150}"
  shift 2
  if [ $(($(date +%s) - triage_t0)) -ge "${TRIAGE_BUDGET:-540}" ]; then
    printf '%-16s %-34s %s\n' "$exe" "$env_desc" "NOT RUN (budget spent)"
    return
  fi
  [ -x "gpu/bin/$exe" ] || { printf '%-16s %-34s %s\n' "$exe" "$env_desc" "MISSING"; return; }
  t0=$(date +%s)
  out="$(env "$@" timeout "$limit" "gpu/bin/$exe" --test-threads 1 2>&1)" || rc=$?
  local verdict=PASS
  [ "$rc" = 0 ] || verdict="FAIL (rc $rc)"
  [ "$rc" = 124 ] && verdict="TIMEOUT ($limit s: a hung kernel?)"
  echo "$out" | grep -q "SKIP " && verdict="$verdict, SKIP lines"
  printf '%-16s %-34s %-30s %4ss\n' "$exe" "$env_desc" "$verdict" "$(($(date +%s) - t0))"
  # (a run killed by its timeout may print no such line: grep's status must not end the triage)
  [ "$rc" = 0 ] || { echo "$out" | grep -E "panicked|FAILED|assert" | head -6 | sed 's/^/    /' || true; }
}

# triage [GROUP...]: fp8 (the FP8 GEMM and FP8 training), train (the training pass and step, their
# kernels and switches), infer (MLA variants, decode with PDL, sampling, the CLI); all three in that
# order by default. Each run: the defaults, then the fallback and opt-in switches.
run_triage() {
  unpack
  triage_t0=$(date +%s)
  local groups=("$@")
  [ ${#groups[@]} -gt 0 ] || groups=(fp8 train infer)
  echo "== triage (${groups[*]}): never-run-on-a-GPU code, defaults vs each fallback and opt-in switch"
  for grp in "${groups[@]}"; do
    case "$grp" in
      fp8)
        triage_one k_fp8 "default (Auto: fp8_gemm_tma)"
        triage_one k_fp8 "DSV3_FP8_SPLITK=1" DSV3_FP8_SPLITK=1
        triage_one k_train_fp8 "default"
        triage_one k_train_fp8 "DSV3_FP8_KERNEL=v2" DSV3_FP8_KERNEL=v2
        triage_one k_train_fp8 "DSV3_FP8_KERNEL=v1" DSV3_FP8_KERNEL=v1
        triage_one k_train_fp8 "DSV3_FP8_KERNEL=tma-plain" DSV3_FP8_KERNEL=tma-plain
        triage_one k_train_fp8 "DSV3_FP8_SPLITK_REDUCE=separate" DSV3_FP8_SPLITK_REDUCE=separate
        triage_one k_train_fp8 "DSV3_FP8_TAIL_SPLIT=0" DSV3_FP8_TAIL_SPLIT=0
        triage_one k_train_fp8 "DSV3_FP8_WGRAD_BATCH=0" DSV3_FP8_WGRAD_BATCH=0
        triage_one k_train_fp8 "DSV3_FP8_QUANT=v1" DSV3_FP8_QUANT=v1
        ;;
      train)
        triage_one k_train_step "default"
        triage_one k_train_step "DSV3_FP8_KERNEL=v2" DSV3_FP8_KERNEL=v2
        triage_one k_train_step "DSV3_TRAIN_GEMM=mma" DSV3_TRAIN_GEMM=mma
        triage_one k_train_step "DSV3_PDL=1" DSV3_PDL=1
        triage_one k_train_pass "default"
        triage_one k_train_pass "DSV3_TRAIN_FLASH=0" DSV3_TRAIN_FLASH=0
        triage_one k_train_pass "DSV3_TRAIN_GEMM=mma" DSV3_TRAIN_GEMM=mma
        triage_one k_train_pass "DSV3_BF16_GROUPED=mma" DSV3_BF16_GROUPED=mma
        triage_one k_train_pass "DSV3_BF16_GROUPED=tma-regs" DSV3_BF16_GROUPED=tma-regs
        triage_one k_attn_train "default"
        triage_one k_attn_train "DSV3_TRAIN_FLASH=0" DSV3_TRAIN_FLASH=0
        # gemm: the mma kernels' layouts and the training products on cuBLAS
        triage_one k_gemm "default"
        triage_one k_train "default"
        ;;
      infer)
        # mla_moe runs every MLA decode variant explicitly (the depth-split d1* ones included)
        triage_one k_mla_moe "default (every MLA variant)"
        triage_one k_mla_moe "DSV3_PDL=1" DSV3_PDL=1
        triage_one k_mla_moe "DSV3_MLA_COMBINE=fused" DSV3_MLA_COMBINE=fused
        triage_one k_model "DSV3_MLA_COMBINE=fused" DSV3_MLA_COMBINE=fused
        triage_one k_model "DSV3_PDL=1" DSV3_PDL=1
        triage_one k_model "DSV3_MOE_COMBINE=separate" DSV3_MOE_COMBINE=separate
        triage_one k_model "DSV3_MLA_PREP=separate" DSV3_MLA_PREP=separate
        triage_one k_sampling "default"
        triage_one cli_cuda "default"
        triage_one cli_cuda "DSV3_MLA_MMA=m1t32" DSV3_MLA_MMA=m1t32
        triage_one cli_cuda "DSV3_PDL=1" DSV3_PDL=1
        ;;
      *) echo "unknown triage group: $grp (fp8, train, infer)" >&2; return 2 ;;
    esac
  done
}

# curves_into DIR STEPS LIMIT: the bench-88m model trained STEPS steps on the GPU in bf16 and in
# bf16 + FP8 linears (same seed, data, schedule; each run at most LIMIT s) into DIR/bf16 and
# DIR/fp8, plotted together into DIR/fp8_gpu_loss.svg; only the metrics and the plot are kept.
curves_into() {
  local dir="$1" steps="$2" limit="$3"
  mkdir -p "$dir"
  # the engine's sources as byte tokens (u32 ids < 256; bench-88m has no tokenizer)
  find core/src cli/src kernels/src -name '*.rs' | sort | xargs cat |
    python3 -c 'import array, sys; array.array("I", list(sys.stdin.buffer.read())).tofile(open(sys.argv[1], "wb"))' "$dir/corpus.u32"
  for p in bf16 fp8; do
    rm -rf "${dir:?}/$p"
    local prec=()
    [ "$p" = fp8 ] && prec=(--precision fp8)
    timeout "$limit" gpu/bin/dsv3 train --preset bench-88m --data "$dir/corpus.u32" --out "$dir/$p" --device cuda \
      --dtype bf16 "${prec[@]}" --steps "$steps" --batch 8 --seq-len 512 --lr 1e-3 --warmup 30 --seed 7 \
      --quiet --log-every 50 || echo "curves: the $p run ended with $?"
  done
  gpu/bin/dsv3 plot --metrics "$dir/bf16/metrics.jsonl,$dir/fp8/metrics.jsonl" --labels bf16,fp8 --tail 50 \
    --title "bench-88m on the GPU: bf16 vs bf16 + FP8 linears (same seed and data)" --out "$dir/fp8_gpu_loss.svg" ||
    echo "curves: plot failed"
  # keep $OUT small (the device tool returns 8 files): metrics and the plot
  rm -f "$dir/corpus.u32"
  find "$dir/bf16" "$dir/fp8" -mindepth 1 ! -name metrics.jsonl -exec rm -rf {} + 2>/dev/null || true
}

run_curves() {
  unpack
  curves_into "${OUT:-gpu}/curves" "${1:-300}" 900
  ls -laR "${OUT:-gpu}/curves"
}

run_peers() {
  unpack
  DSV3_BIN="$PWD/gpu/bin/dsv3" python3 benches/train_vs_hf.py --device cuda
}

# next: one device command for what the 2026-11-24 run left unchecked (see the header); each
# part bounded by timeout, every log under $OUT (at most 8 files come back).
run_next() {
  unpack
  local out="${OUT:-gpu/out}" t0
  mkdir -p "$out"
  t0=$(date +%s)
  el() { echo $(($(date +%s) - t0)); }
  one() {
    local lim=$1
    shift
    local rc=0
    echo "=== $* [${E:-}] at $(el)s"
    # shellcheck disable=SC2086 # E holds VAR=value words
    env ${E:-} timeout "$lim" "$@" 2>&1 || rc=$?
    echo "=== rc $rc"
  }
  # the wgmma + TMA grouped bf16 GEMM first: it has never run on a GPU, and the training tests
  # and benches below use it; if it fails (or hangs), the rest of the session keeps the experts on
  # the mma.sync kernel instead of losing every later run to it
  local grc=0
  timeout 60 gpu/bin/k_gemm --test-threads 1 grouped_products_on_wgmma_tma >"$out/grouped_first.log" 2>&1 || grc=$?
  if [ "$grc" != 0 ]; then
    # first without its TMA-store epilogue (new since): if that passes, only the epilogue is at fault
    if DSV3_BF16_GROUPED=tma-regs timeout 60 gpu/bin/k_gemm --test-threads 1 grouped_products_on_wgmma_tma \
      >>"$out/grouped_first.log" 2>&1; then
      echo "gemm_tma_grouped_bf16's TMA-store epilogue FAILED (rc $grc, $out/grouped_first.log): DSV3_BF16_GROUPED=tma-regs for the rest"
      export DSV3_BF16_GROUPED=tma-regs
    else
      echo "gemm_tma_grouped_bf16 FAILED (rc $grc, $out/grouped_first.log): DSV3_BF16_GROUPED=mma for the rest"
      export DSV3_BF16_GROUPED=mma
    fi
  fi
  # likewise the FP8 TMA kernel's epilogue fusions (never run on a GPU; the defaults): the TMA-store
  # epilogue, the in-kernel split-K sum and the last wave's split
  local src=0
  timeout 60 gpu/bin/k_fp8 --test-threads 1 tma_store_epilogue split_k_summed the_last_waves \
    >"$out/tma_store_first.log" 2>&1 || src=$?
  if [ "$src" != 0 ]; then
    # first without the last-wave split (newest): if that passes, only the split is at fault
    if DSV3_FP8_TAIL_SPLIT=0 timeout 60 gpu/bin/k_fp8 --test-threads 1 tma_store_epilogue split_k_summed \
      >>"$out/tma_store_first.log" 2>&1; then
      echo "fp8_gemm_tma's last-wave split FAILED (rc $src, $out/tma_store_first.log): DSV3_FP8_TAIL_SPLIT=0 for the rest"
      export DSV3_FP8_TAIL_SPLIT=0
    else
      echo "fp8_gemm_tma's epilogue fusions FAILED (rc $src, $out/tma_store_first.log): DSV3_FP8_KERNEL=tma-plain for the rest"
      export DSV3_FP8_KERNEL=tma-plain
    fi
  fi
  {
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    one 60 gpu/bin/k_fp8 --test-threads 1
    one 60 gpu/bin/k_attn_train --test-threads 1
    one 60 gpu/bin/k_attn --test-threads 1 --nocapture
    one 30 gpu/bin/k_elementwise --test-threads 1
    one 90 gpu/bin/k_train_pass --test-threads 1 --nocapture
    E=DSV3_TRAIN_GEMM=mma one 60 gpu/bin/k_train_pass --test-threads 1 bf16_pass
    one 60 gpu/bin/k_train_step --test-threads 1
    one 90 gpu/bin/k_train_fp8 --test-threads 1 --nocapture
    one 30 gpu/bin/k_moe_train --test-threads 1
    one 20 gpu/bin/k_device --test-threads 1
    one 30 gpu/bin/k_train --test-threads 1
    one 60 gpu/bin/k_gemm --test-threads 1 --skip mma_gemm_layouts_match_the_reference
    E=DSV3_BF16_GROUPED=mma one 60 gpu/bin/k_gemm --test-threads 1 grouped
    one 60 gpu/bin/k_mla_moe --test-threads 1
    one 60 gpu/bin/k_model --test-threads 1
    one 60 gpu/bin/cli_cuda --test-threads 1
  } >"$out/tests.log"
  echo "tests done at $(el)s"
  gpu/bin/dsv3 init --preset bench-88m --out /tmp/m88 >/dev/null
  local dec=(gpu/bin/dsv3 bench --model /tmp/m88 --device cuda --prompt-len 128 --new-tokens 256)
  {
    for b in 1 32; do
      one 40 "${dec[@]}" --batch "$b"
      E=DSV3_MLA_MMA=m1t32 one 40 "${dec[@]}" --batch "$b"
      E=DSV3_ABSORB=0 one 40 "${dec[@]}" --batch "$b"
      # the MoE combine as its own launch instead of inside the routed down GEMM (the default)
      E=DSV3_MOE_COMBINE=separate one 40 "${dec[@]}" --batch "$b"
      # mla_prep as its own launch instead of inside the query GEMM (the default)
      E=DSV3_MLA_PREP=separate one 40 "${dec[@]}" --batch "$b"
      E=DSV3_PDL=1 one 40 "${dec[@]}" --batch "$b"
      E=DSV3_MLA_COMBINE=fused one 40 "${dec[@]}" --batch "$b"
      E="DSV3_MLA_COMBINE=fused DSV3_PDL=1" one 40 "${dec[@]}" --batch "$b"
      # where a decode step's time goes, kernel by kernel (uncaptured, so its numbers are not the above)
      E=DSV3_CUDA_GRAPH=0 one 40 "${dec[@]}" --batch "$b" --new-tokens 64 --repeat 1 --profile
    done
  } >"$out/decode.log"
  echo "decode done at $(el)s"
  local tr=(gpu/bin/dsv3 bench --model /tmp/m88 --train --device cuda --batch 8 --prompt-len 1024 --repeat 5)
  {
    one 60 "${tr[@]}" --dtype bf16 --profile
    E=DSV3_TRAIN_GEMM=mma one 60 "${tr[@]}" --dtype bf16
    one 60 "${tr[@]}" --dtype bf16 --precision fp8 --profile
    E=DSV3_PDL=1 one 60 "${tr[@]}" --dtype bf16
    E=DSV3_BF16_GROUPED=mma one 60 "${tr[@]}" --dtype bf16
  } >"$out/train.log"
  echo "train done at $(el)s"
  {
    one 60 gpu/bin/kernel_bench grouped
    # the wgmma kernel storing from registers instead of by TMA stores
    E=DSV3_BF16_GROUPED=tma-regs one 60 gpu/bin/kernel_bench grouped
  } >"$out/grouped.log"
  one 30 gpu/bin/kernel_bench ce >"$out/ce.log"
  one 100 gpu/bin/fp8_bench >"$out/fp8bench.log"
  echo "fp8 done at $(el)s"
  local left=$((540 - $(el)))
  if [ "$left" -gt 60 ]; then
    curves_into "$out/curves" 300 $((left / 2 - 5)) >"$out/curves.log" 2>&1
  fi
  echo "all done at $(el)s"
}

case "$mode" in
  pack) pack ;;
  test) run_tests "$@" ;;
  bench) run_bench "$@" ;;
  peers) run_peers ;;
  triage) run_triage "$@" ;;
  curves) run_curves "$@" ;;
  next) run_next ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
