#!/usr/bin/env python3
"""Decode and prefill throughput of dsv3 vs HF transformers, side by side in one run.

    python3 benches/decode_vs_hf.py [--preset bench-4m] [--threads 2] [--batch 1] \
        [--prompt-len 32] [--new-tokens 256] [--repeat 3]

1. builds the CLI (`cargo build --release -p dsv3-cli`);
2. writes a random checkpoint (`dsv3 init --preset ... --seed 1`, weights N(0, 0.02));
3. times `dsv3 bench` (greedy, no early stop; best of --repeat);
4. if `torch` and `transformers` import, loads the *same* checkpoint with HF
   (`AutoModelForCausalLM`, f32, default attention/experts implementations,
   `torch.set_num_threads(--threads)`) and times `generate()` the same way; otherwise says so.

Decode tokens/s = batch * new tokens / (generation time - prefill time) for both engines.
Numbers go into docs/PERF.md with the machine they came from.
"""
import argparse, json, os, platform, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def dsv3_bench(exe, model, a):
    out = run([exe, "bench", "--model", model, "--batch", str(a.batch), "--prompt-len", str(a.prompt_len),
               "--new-tokens", str(a.new_tokens), "--repeat", str(a.repeat), "--threads", str(a.threads), "--json"])
    return json.loads(out.strip().splitlines()[-1])


def hf_bench(model, a):
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return None, f"HF baseline skipped: {e} (pip install torch transformers to run it)"
    torch.set_num_threads(a.threads)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.config.vocab_size, (a.batch, a.prompt_len), generator=g)
    kw = dict(do_sample=False, min_new_tokens=a.new_tokens, max_new_tokens=a.new_tokens, pad_token_id=0)
    best_pre, best_gen = float("inf"), float("inf")
    with torch.inference_mode():
        m.generate(ids, **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            m(ids, use_cache=True)
            best_pre = min(best_pre, time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = m.generate(ids, **kw)
            best_gen = min(best_gen, time.perf_counter() - t0)
            assert out.shape[1] == a.prompt_len + a.new_tokens
    info = f"torch {torch.__version__}, transformers {transformers.__version__}, {a.threads} threads"
    # same checkpoint, same answer: HF's logits against `dsv3 logits` on the prompt
    from safetensors.torch import load_file, save_file
    with tempfile.TemporaryDirectory() as t:
        save_file({"input_ids": ids[:1].contiguous()}, os.path.join(t, "in.safetensors"))
        run([a.exe, "logits", "--model", model, "--input", os.path.join(t, "in.safetensors"),
             "--out", os.path.join(t, "out.safetensors")])
        ours = load_file(os.path.join(t, "out.safetensors"))["logits"]
    with torch.inference_mode():
        ref = m(ids[:1]).logits
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    info += f"; logits agree with HF to {err:.1e} (max-abs-err / max-abs-logit)"
    assert err < 1e-4, err
    return {
        "prefill_tokens_per_s": a.batch * a.prompt_len / best_pre,
        "decode_tokens_per_s": a.batch * a.new_tokens / max(best_gen - best_pre, 1e-9),
        "generate_tokens_per_s": a.batch * a.new_tokens / best_gen,
    }, info


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-4m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    run(["cargo", "build", "--release", "-q", "-p", "dsv3-cli"], cwd=ROOT)
    exe = a.exe = os.path.join(ROOT, "target", "release", "dsv3")
    with tempfile.TemporaryDirectory() as d:
        run([exe, "init", "--preset", a.preset, "--out", d, "--seed", "1"])
        ours = dsv3_bench(exe, d, a)
        hf, info = hf_bench(d, a)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; preset {a.preset}; "
          f"batch {a.batch}, prompt {a.prompt_len}, {a.new_tokens} new tokens, {a.threads} threads, best of {a.repeat}")
    print(f"{'engine':<16}{'prefill tok/s':>16}{'decode tok/s':>16}")
    print(f"{'dsv3':<16}{ours['prefill_tokens_per_s']:>16.1f}{ours['decode_tokens_per_s']:>16.1f}")
    if hf is None:
        print(info)
        return
    print(f"{'HF transformers':<16}{hf['prefill_tokens_per_s']:>16.1f}{hf['decode_tokens_per_s']:>16.1f}"
          f"   (generate() incl. prefill: {hf['generate_tokens_per_s']:.1f} tok/s; {info})")
    print(f"speed-up: decode {ours['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.2f}x, "
          f"prefill {ours['prefill_tokens_per_s'] / hf['prefill_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
