#!/usr/bin/env python3
"""Training throughput of dsv3 vs HF transformers + torch AdamW, side by side in one run.

    python3 benches/train_vs_hf.py [--device auto|cpu|cuda] [--preset P] [--threads 2] [--batch B]
                                   [--seq-len T] [--steps N] [--rounds R]

Same random checkpoint for both (`dsv3 init --preset ... --seed 1`), random token batches, AdamW
(betas 0.9/0.95, weight decay 0.1), one optimizer step per batch; median step time after warm-up.

CPU (default without CUDA; bench-4m, batch 8 x 256): f32. dsv3 runs `dsv3 bench --train`; HF runs
`model(ids, labels=ids).loss.backward(); opt.step()` with `torch.set_num_threads(--threads)` when
torch and transformers import. The two alternate for --rounds rounds (HF's model stays loaded) and
the ratio is given per round and as their median, since a shared machine's speed drifts by tens of
percent over minutes.

CUDA (default when torch sees a GPU, or --device cuda; bench-88m, batch 8 x 1024: issue 7's shape): dsv3 runs
`dsv3 bench --train --device cuda --dtype bf16` (f32 master weights and gradients, bf16 activations
and GEMMs); HF runs the same step with f32 parameters under `torch.autocast(bfloat16)` and
`torch.optim.AdamW(fused=True)`, eagerly and through `torch.compile`. Tokens/s and MFU (the FLOPs
per token dsv3 reports, 6 x active parameters + causal attention, over the H100's dense bf16 peak
of 989.4 TFLOP/s) for each. DSV3_BIN=path/to/dsv3 uses a prebuilt binary instead of building one
(the GPU machine: DSV3_BIN=gpu/bin/dsv3 after `bash kernels/gpu_session.sh pack` here).
"""
import argparse, json, os, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK = 989.4e12  # H100 SXM dense bf16, as `dsv3 bench --train --device cuda`


def run(cmd):
    return subprocess.run(cmd, check=True, text=True, capture_output=True).stdout


def torch_cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def hf_trainer(model, a):
    """HF on the CPU: returns (measure, info), measure() times --steps steps after one warm-up step and
    returns their median; the model and optimizer stay loaded between calls (rounds)."""
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

    def measure():
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
        return {"step_ms": med * 1e3, "train_tokens_per_s": a.batch * a.seq_len / med}

    return measure, f"torch {torch.__version__}, transformers {transformers.__version__}, {a.threads} threads"


def hf_train_cuda(model, a, compile_):
    """HF on the GPU: f32 parameters, bf16 autocast, fused AdamW; eager or torch.compile."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).cuda()
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if compile_:
        step = torch.compile(step)
    times = []
    warm = 3 if compile_ else 1  # compilation happens in the first steps
    for i in range(a.steps + warm):
        ids = torch.randint(0, m.config.vocab_size, (a.batch, a.seq_len), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(ids)
        torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    del m, opt
    torch.cuda.empty_cache()
    return {"step_ms": med * 1e3, "train_tokens_per_s": a.batch * a.seq_len / med}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--preset", default=None, help="default: bench-4m on CPU, bench-88m on CUDA")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: 256 on CPU, 1024 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="default: 5 on CPU, 10 on CUDA")
    p.add_argument("--rounds", type=int, default=3,
                   help="CPU: alternate dsv3 and HF this many times (a shared machine's speed drifts; "
                        "each round's ratio compares runs taken minutes apart at most)")
    a = p.parse_args()
    cuda = a.device == "cuda" or (a.device == "auto" and torch_cuda())
    a.preset = a.preset or ("bench-88m" if cuda else "bench-4m")
    a.seq_len = a.seq_len or (1024 if cuda else 256)
    a.steps = a.steps or (10 if cuda else 5)
    exe = os.environ.get("DSV3_BIN")  # a prebuilt binary (the GPU machine has no Rust: gpu/bin/dsv3)
    if not exe:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "dsv3-cli"], cwd=ROOT, check=True)
        exe = os.path.join(ROOT, "target", "release", "dsv3")
    with tempfile.TemporaryDirectory() as d:
        run([exe, "init", "--preset", a.preset, "--out", d, "--seed", "1"])
        if not cuda:
            measure, info = hf_trainer(d, a)
            print(f"preset {a.preset}; batch {a.batch} x {a.seq_len} tokens; {a.threads} threads; "
                  f"median of {a.steps} steps per round; {a.rounds} round(s), dsv3 and HF alternating")
            print(f"{'round':<7}{'engine':<16}{'step ms':>10}{'tokens/s':>12}")
            ratios = []
            for r in range(a.rounds):
                ours = json.loads(run([exe, "bench", "--model", d, "--train", "--batch", str(a.batch), "--prompt-len",
                                       str(a.seq_len), "--repeat", str(a.steps), "--threads", str(a.threads),
                                       "--json"]))
                print(f"{r + 1:<7}{'dsv3':<16}{ours['step_ms']:>10.1f}{ours['train_tokens_per_s']:>12.1f}")
                if measure is None:
                    continue
                hf = measure()
                print(f"{r + 1:<7}{'HF + AdamW':<16}{hf['step_ms']:>10.1f}{hf['train_tokens_per_s']:>12.1f}")
                ratios.append(ours["train_tokens_per_s"] / hf["train_tokens_per_s"])
            print(info)
            if ratios:
                print(f"speed-up per round: {', '.join(f'{x:.2f}x' for x in ratios)}; "
                      f"median {sorted(ratios)[len(ratios) // 2]:.2f}x")
            return
        common = [exe, "bench", "--model", d, "--train", "--device", "cuda", "--batch", str(a.batch),
                  "--prompt-len", str(a.seq_len), "--repeat", str(a.steps), "--json"]
        rows = []
        for dt in ["bf16", "f32"]:
            try:
                r = json.loads(run(common + ["--dtype", dt]))
                rows.append((f"dsv3 {dt}", r))
            except subprocess.CalledProcessError as e:
                print(f"dsv3 --dtype {dt} failed: {e.stderr.strip()}")
        flops_tok = rows[0][1]["flops_per_token"] if rows else None
        device = rows[0][1]["device"] if rows else "?"
        info = ""
        if torch_cuda():
            import torch
            import transformers
            info = f"torch {torch.__version__}, transformers {transformers.__version__}"
            for name, comp in [("HF eager bf16", False), ("HF compile bf16", True)]:
                try:
                    rows.append((name, hf_train_cuda(d, a, comp)))
                except Exception as e:  # noqa: BLE001 (report and go on: compile may not support the model)
                    print(f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        else:
            info = "HF baselines skipped: torch with CUDA not available"
    print(f"preset {a.preset}; {device}; batch {a.batch} x {a.seq_len} tokens; median of {a.steps} steps")
    print(f"{'engine':<18}{'step ms':>10}{'tokens/s':>12}{'MFU':>8}")
    for name, r in rows:
        tps = r["train_tokens_per_s"]
        mfu = f"{100 * tps * flops_tok / PEAK:.2f}%" if flops_tok else "-"
        print(f"{name:<18}{r['step_ms']:>10.2f}{tps:>12.1f}{mfu:>8}")
    if info:
        print(info)
    names = dict(rows)
    if "dsv3 bf16" in names:
        for peer in ["HF eager bf16", "HF compile bf16"]:
            if peer in names:
                print(f"dsv3 bf16 vs {peer}: "
                      f"{names['dsv3 bf16']['train_tokens_per_s'] / names[peer]['train_tokens_per_s']:.2f}x")
    print(f"MFU: tokens/s x {flops_tok:.3e} FLOPs/token (6 x active params + causal attention) / 989.4 TFLOP/s"
          if flops_tok else "")


if __name__ == "__main__":
    sys.exit(main())
