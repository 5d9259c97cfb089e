#!/usr/bin/env python3
"""Training throughput of dsv3 vs HF transformers + torch AdamW, side by side in one run.

    python3 benches/train_vs_hf.py [--preset bench-4m] [--threads 2] [--batch 8] [--seq-len 256] [--steps 5]

Same random checkpoint for both (`dsv3 init --preset ... --seed 1`), f32, random token batches,
AdamW (betas 0.9/0.95, weight decay 0.1), one optimizer step per batch; median step time after a
warm-up step. dsv3 runs `dsv3 bench --train`; HF runs `model(ids, labels=ids).loss.backward();
opt.step()` with `torch.set_num_threads(--threads)` when torch and transformers import.
"""
import argparse, json, os, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    return subprocess.run(cmd, check=True, text=True, capture_output=True).stdout


def hf_train(model, a):
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return None, f"HF baseline skipped: {e}"
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for i in range(a.steps + 1):
        ids = torch.randint(0, m.config.vocab_size, (a.batch, a.seq_len))
        t0 = time.perf_counter()
        loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return {"step_ms": med * 1e3, "train_tokens_per_s": a.batch * a.seq_len / med}, \
        f"torch {torch.__version__}, transformers {transformers.__version__}, {a.threads} threads"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-4m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "dsv3-cli"], cwd=ROOT, check=True)
    exe = os.path.join(ROOT, "target", "release", "dsv3")
    with tempfile.TemporaryDirectory() as d:
        run([exe, "init", "--preset", a.preset, "--out", d, "--seed", "1"])
        ours = json.loads(run([exe, "bench", "--model", d, "--train", "--batch", str(a.batch), "--prompt-len",
                               str(a.seq_len), "--repeat", str(a.steps), "--threads", str(a.threads), "--json"]))
        hf, info = hf_train(d, a)
    print(f"preset {a.preset}; batch {a.batch} x {a.seq_len} tokens; {a.threads} threads; median of {a.steps} steps")
    print(f"{'engine':<16}{'step ms':>10}{'tokens/s':>12}")
    print(f"{'dsv3':<16}{ours['step_ms']:>10.1f}{ours['train_tokens_per_s']:>12.1f}")
    if hf is None:
        print(info)
        return
    print(f"{'HF + AdamW':<16}{hf['step_ms']:>10.1f}{hf['train_tokens_per_s']:>12.1f}   ({info})")
    print(f"speed-up: {ours['train_tokens_per_s'] / hf['train_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
