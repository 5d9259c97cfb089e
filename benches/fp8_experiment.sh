#!/usr/bin/env bash
# The FP8 experiment: the same training run (same seed, data and schedule) with the decoder's
# GEMMs in f32, bf16 and fp8 (DeepSeek-V3's recipe, emulated exactly on CPU), plotted together.
#   bash benches/fp8_experiment.sh [OUT_DIR] [STEPS]
# Data: the engine's own Rust sources concatenated (byte-level text, ~300 KB); model: the `tiny`
# preset (byte vocabulary). Prints each run's final loss, its gap to f32, and training speed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/fp8-experiment}
STEPS=${2:-400}
mkdir -p "$OUT"
cargo build --release -q -p dsv3-cli
find core/src cli/src -name '*.rs' | sort | xargs cat > "$OUT/corpus.txt"
for p in f32 bf16 fp8; do
  moments=f32; [ "$p" != f32 ] && moments=bf16
  rm -rf "$OUT/$p"
  target/release/dsv3 train --preset tiny --data "$OUT/corpus.txt" --out "$OUT/$p" --steps "$STEPS" \
    --batch 16 --seq-len 128 --lr 2e-3 --warmup 40 --seed 7 --precision "$p" --adam-moments "$moments" --quiet --log-every 100
done
target/release/dsv3 plot --metrics "$OUT/f32/metrics.jsonl,$OUT/bf16/metrics.jsonl,$OUT/fp8/metrics.jsonl" \
  --labels f32,bf16,fp8 --tail 50 --title "tiny preset: f32 vs bf16 vs fp8 GEMMs (same seed and data)" --out "$OUT/fp8_loss.svg"
for p in f32 bf16 fp8; do
  python3 - "$OUT/$p/metrics.jsonl" "$p" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tps = sorted(r["tokens_per_s"] for r in rows[5:])
print(f"{sys.argv[2]:<5} median training speed {tps[len(tps)//2]:.0f} tokens/s")
PY
done
