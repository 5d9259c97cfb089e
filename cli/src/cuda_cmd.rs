//! `--device cuda[:N]` for `dsv3 logits`, `dsv3 generate` and `dsv3 bench`: the model runs on a GPU
//! through dsv3-kernels. Without a driver or GPU these commands print a clear error and exit 1.
use dsv3_core::infer::sampling::SamplingParams;
use dsv3_core::{Error, Model, Result};
use dsv3_ffi::tokenizer::Tok;
use dsv3_kernels::model::{CudaModel, CudaOptions, CudaSession};
use dsv3_kernels::{DType, Device};
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

/// Where a command runs.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// cpu (default; the f32 oracle) or cuda / cuda:N (an NVIDIA GPU; needs a driver, not a toolkit).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// With --device cuda: bf16 (activations bf16, FP8 checkpoints kept FP8) or f32 (matches the CPU).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
}

impl DeviceArgs {
    /// The GPU ordinal when `--device` names CUDA, `None` for the CPU.
    pub fn cuda(&self) -> Result<Option<usize>> {
        match self.device.as_str() {
            "cpu" => Ok(None),
            "cuda" => Ok(Some(0)),
            s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Some(i)),
                _ => Err(Error::Input(format!("--device must be cpu, cuda or cuda:N, got '{s}'"))),
            },
        }
    }

    /// Opens the GPU (a clear error without one), before the model is loaded.
    pub fn open(&self, ordinal: usize) -> Result<(Arc<Device>, CudaOptions)> {
        let dtype = match self.dtype.as_str() {
            "bf16" => DType::Bf16,
            "f32" => DType::F32,
            o => return Err(Error::Input(format!("--dtype must be bf16 or f32, got '{o}'"))),
        };
        let dev = Device::new(ordinal)?;
        eprintln!("device: {}", dev.name);
        Ok((Arc::new(dev), CudaOptions { dtype, keep_fp8: true }))
    }
}

/// Uploads a loaded model.
pub fn upload(dev: Arc<Device>, model: &Model, opts: CudaOptions) -> Result<CudaModel> {
    let t0 = Instant::now();
    let cm = CudaModel::new(dev, model, opts)?;
    eprintln!(
        "uploaded {:.1} MB of weights ({:?}) in {:.0} ms",
        cm.weight_bytes() as f64 / 1e6,
        opts.dtype,
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(cm)
}

/// `dsv3 logits --device cuda`: the full forward of every row.
pub fn logits(cm: &CudaModel, seqs: &[&[u32]]) -> Result<Vec<f32>> {
    cm.forward(seqs)
}

/// `dsv3 generate --device cuda`: prefill, then decode one token per step, sampling on the host.
pub fn generate(cm: &CudaModel, prompt: &[u32], params: &SamplingParams, tk: Option<&Tok>) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::Input("the prompt needs at least one token".into()));
    }
    let mut stream = crate::stream::Streamer::new(tk);
    let mut out = std::io::stdout().lock();
    let g = dsv3_kernels::model::generate(cm, prompt, params, |t| {
        stream.push(t, &mut out);
        true
    })?;
    let (t_prefill, dec) = (g.prefill_s, g.decode_s);
    let steps = stream.generated.len().saturating_sub(1);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "prefill: {} tokens in {:.1} ms ({:.1} tokens/s); {} tokens generated, decode: {steps} steps in {:.1} ms ({:.1} tokens/s) [cuda]",
        prompt.len(),
        t_prefill * 1e3,
        prompt.len() as f64 / t_prefill.max(1e-9),
        stream.generated.len(),
        dec * 1e3,
        steps as f64 / dec.max(1e-9)
    );
    Ok(())
}

/// `dsv3 bench --device cuda`: prefill and greedy decode throughput of `batch` random prompts.
pub fn bench(
    cm: &CudaModel,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    repeat: usize,
    seed: u64,
    json: bool,
) -> Result<()> {
    if batch == 0 || prompt_len == 0 || new_tokens == 0 {
        return Err(Error::Input("--batch, --prompt-len and --new-tokens must be positive".into()));
    }
    let mut rng = dsv3_core::rng::Rng::new(seed);
    let v = cm.cfg.vocab_size;
    let prompts: Vec<Vec<u32>> =
        (0..batch).map(|_| (0..prompt_len).map(|_| rng.below(v as u64) as u32).collect()).collect();
    let (mut best_pre, mut best_dec) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..repeat {
        let mut sess = CudaSession::new(cm, batch, prompt_len + new_tokens)?;
        let t0 = Instant::now();
        let inputs: Vec<(usize, &[u32])> = prompts.iter().enumerate().map(|(i, p)| (i, &p[..])).collect();
        // greedy decode with the argmax on the device (only token ids cross back)
        let mut toks = sess.step_greedy(&inputs)?;
        let pre = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..new_tokens {
            let next: Vec<[u32; 1]> = toks.iter().map(|&t| [t]).collect();
            let inputs: Vec<(usize, &[u32])> = next.iter().enumerate().map(|(i, t)| (i, &t[..])).collect();
            toks = sess.step_greedy(&inputs)?;
        }
        best_pre = best_pre.min(pre);
        best_dec = best_dec.min(t1.elapsed().as_secs_f64());
    }
    let pre_tps = (batch * prompt_len) as f64 / best_pre;
    let dec_tps = (batch * new_tokens) as f64 / best_dec;
    let name = &cm.dev.name;
    if json {
        println!(
            "{{\"device\":{:?},\"dtype\":\"{:?}\",\"batch\":{batch},\"prompt_len\":{prompt_len},\"new_tokens\":{new_tokens},\"prefill_tokens_per_s\":{pre_tps:.1},\"decode_tokens_per_s\":{dec_tps:.1},\"decode_ms_per_step\":{:.4}}}",
            name,
            cm.dtype,
            best_dec * 1e3 / new_tokens as f64
        );
    } else {
        println!(
            "{name}, {:?}: batch {batch}, prompt {prompt_len}, {new_tokens} new tokens (best of {repeat})",
            cm.dtype
        );
        println!("prefill  {pre_tps:>10.1} tokens/s");
        println!("decode   {dec_tps:>10.1} tokens/s  ({:.3} ms/step)", best_dec * 1e3 / new_tokens as f64);
    }
    Ok(())
}
