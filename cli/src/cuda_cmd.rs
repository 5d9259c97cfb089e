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

/// Steps a `--profile` of `dsv3 bench --train --device cuda` times (after the timed ones).
pub const PROFILE_TRAIN_STEPS: usize = 2;

/// Rows of the `--profile` table (the rest are summed in one more).
const PROFILE_TOP: usize = 30;

/// `dsv3 bench --device cuda`: prefill and greedy decode throughput of `batch` random prompts;
/// with `profile`, then the GPU time by kernel of one more run's decode steps.
#[allow(clippy::too_many_arguments)]
pub fn bench(
    cm: &CudaModel,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    repeat: usize,
    seed: u64,
    json: bool,
    profile: bool,
) -> Result<()> {
    if batch == 0 || prompt_len == 0 || new_tokens == 0 {
        return Err(Error::Input("--batch, --prompt-len and --new-tokens must be positive".into()));
    }
    let mut rng = dsv3_core::rng::Rng::new(seed);
    let v = cm.cfg.vocab_size;
    let prompts: Vec<Vec<u32>> =
        (0..batch).map(|_| (0..prompt_len).map(|_| rng.below(v as u64) as u32).collect()).collect();
    let (mut best_pre, mut best_dec) = (f64::INFINITY, f64::INFINITY);
    let mut prof = None;
    for r in 0..repeat + usize::from(profile) {
        // the run past `repeat` is the profiled one (its times are not counted)
        let profiled = r == repeat;
        let mut sess = CudaSession::new(cm, batch, prompt_len + new_tokens)?;
        let t0 = Instant::now();
        let inputs: Vec<(usize, &[u32])> = prompts.iter().enumerate().map(|(i, p)| (i, &p[..])).collect();
        // greedy decode with the argmax on the device (only token ids cross back)
        let mut toks = sess.step_greedy(&inputs)?;
        let pre = t0.elapsed().as_secs_f64();
        if profiled {
            cm.dev.profile_begin()?;
        }
        let t1 = Instant::now();
        for _ in 0..new_tokens {
            let next: Vec<[u32; 1]> = toks.iter().map(|&t| [t]).collect();
            let inputs: Vec<(usize, &[u32])> = next.iter().enumerate().map(|(i, t)| (i, &t[..])).collect();
            toks = sess.step_greedy(&inputs)?;
        }
        if profiled {
            prof = Some(cm.dev.profile_end()?);
            continue;
        }
        best_pre = best_pre.min(pre);
        best_dec = best_dec.min(t1.elapsed().as_secs_f64());
    }
    let pre_tps = (batch * prompt_len) as f64 / best_pre;
    let dec_tps = (batch * new_tokens) as f64 / best_dec;
    let name = &cm.dev.name;
    let pdl = dsv3_kernels::ops::pdl_enabled(&cm.dev);
    // the MLA decode kernel the steps ran (mla_kernel's choice or DSV3_MLA_MMA) and whether it
    // merged its splits itself (DSV3_MLA_COMBINE=fused): the numbers say which variant they time
    let c = &cm.cfg;
    let mla = dsv3_kernels::ops::mla::mla_kernel(
        &cm.dev,
        cm.dtype,
        c.num_attention_heads,
        c.kv_lora_rank,
        c.qk_rope_head_dim,
    );
    let fused = dsv3_kernels::ops::mla::fused_combine() && matches!(mla, dsv3_kernels::ops::mla::MlaKernel::Mma(_));
    let mla_desc = format!("{}{}", mla.name(), if fused { "+fused-merge" } else { "" });
    if json {
        println!(
            "{{\"device\":{:?},\"dtype\":\"{:?}\",\"pdl\":{pdl},\"mla\":\"{mla_desc}\",\"batch\":{batch},\"prompt_len\":{prompt_len},\"new_tokens\":{new_tokens},\"prefill_tokens_per_s\":{pre_tps:.1},\"decode_tokens_per_s\":{dec_tps:.1},\"decode_ms_per_step\":{:.4}{}}}",
            name,
            cm.dtype,
            best_dec * 1e3 / new_tokens as f64,
            profile_field(prof.as_ref(), new_tokens)
        );
    } else {
        println!(
            "{name}, {:?}, MLA {mla_desc}{}: batch {batch}, prompt {prompt_len}, {new_tokens} new tokens (best of {repeat})",
            cm.dtype,
            if pdl { ", programmatic dependent launch" } else { "" }
        );
        println!("prefill  {pre_tps:>10.1} tokens/s");
        println!("decode   {dec_tps:>10.1} tokens/s  ({:.3} ms/step)", best_dec * 1e3 / new_tokens as f64);
        if let Some(p) = &prof {
            print!("decode steps, {}", p.table(new_tokens, PROFILE_TOP));
            if dsv3_kernels::model::session::graphs_enabled() {
                println!("(each decode step ran as one CUDA graph: DSV3_CUDA_GRAPH=0 breaks it down by kernel)");
            }
        }
    }
    Ok(())
}

/// `,"profile":{...}` for a JSON line, or nothing.
fn profile_field(p: Option<&dsv3_kernels::profile::Profile>, per: usize) -> String {
    p.map_or(String::new(), |p| format!(",\"profile\":{}", p.json(per)))
}

/// The dense bf16 tensor-core peak MFU is reported against: H100 SXM, 989.4 TFLOP/s (NVIDIA's
/// datasheet figure without sparsity).
pub const H100_BF16_PEAK_FLOPS: f64 = 989.4e12;

/// Training FLOPs per token of a `seq_len`-token sequence: `6 × active parameters` (forward 2,
/// backward 4; embedding lookups excluded, the head included, as `Model::active_params`) plus the
/// attention products, causal: per layer and head `QKᵀ` and `P·V` over on average `(T + 1) / 2`
/// keys, `2·(d_qk + d_v)` FLOPs per key forward, three times that for a training step.
pub fn train_flops_per_token(model: &Model, seq_len: usize) -> f64 {
    let c = &model.cfg;
    let dqk = (c.qk_nope_head_dim + c.qk_rope_head_dim) as f64;
    let dv = c.v_head_dim as f64;
    let keys = (seq_len as f64 + 1.0) / 2.0;
    let attn = 3.0 * 2.0 * (dqk + dv) * keys * (c.num_attention_heads * c.num_hidden_layers) as f64;
    6.0 * model.active_params() as f64 + attn
}

/// `dsv3 bench --train --device cuda`: median time of `steps` `CudaTrainer` steps (AdamW as
/// DeepSeek-V3, constant lr 1e-4, default clipping and balancing; the decoder's linears in
/// `precision`: f32 = the dtype's GEMMs, or FP8) on `batch` random sequences of `seq_len` tokens,
/// after two warm-up steps; tokens/s and MFU (against the bf16 dense peak, FP8 runs included).
#[allow(clippy::too_many_arguments)]
pub fn bench_train(
    dev: Arc<Device>,
    dtype: DType,
    precision: dsv3_core::model::linear::Precision,
    model: Model,
    batch: usize,
    seq_len: usize,
    steps: usize,
    seed: u64,
    json: bool,
    profile: bool,
) -> Result<()> {
    use dsv3_core::train::{AdamW, LrSchedule, MicroBatch, TrainConfig};
    use dsv3_kernels::train::CudaTrainer;
    if batch == 0 || seq_len < 2 {
        return Err(Error::Input("--batch must be positive and --prompt-len >= 2".into()));
    }
    let flops_tok = train_flops_per_token(&model, seq_len);
    let active = model.active_params();
    let mut rng = dsv3_core::rng::Rng::new(seed);
    let v = model.cfg.vocab_size as u64;
    let cfg = TrainConfig { schedule: LrSchedule::Constant { lr: 1e-4 }, precision, ..Default::default() };
    let mut tr = CudaTrainer::from_model(dev.clone(), model, AdamW::deepseek_v3(), cfg, dtype)?;
    let mut step = |rng: &mut dsv3_core::rng::Rng| -> Result<f64> {
        let seqs = (0..batch).map(|_| (0..seq_len).map(|_| rng.below(v) as u32).collect()).collect();
        let mb = [MicroBatch { seqs, mask: None }];
        let t0 = Instant::now();
        tr.train_step(&mb)?;
        dev.sync()?;
        Ok(t0.elapsed().as_secs_f64())
    };
    for _ in 0..2 {
        step(&mut rng)?; // warm-up: module loads, allocations
    }
    let mut times: Vec<f64> = (0..steps).map(|_| step(&mut rng)).collect::<Result<_>>()?;
    let prof = if profile {
        dev.profile_begin()?;
        for _ in 0..PROFILE_TRAIN_STEPS {
            step(&mut rng)?;
        }
        Some(dev.profile_end()?)
    } else {
        None
    };
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    let tps = (batch * seq_len) as f64 / med;
    let tflops = tps * flops_tok / 1e12;
    let mfu = tps * flops_tok / H100_BF16_PEAK_FLOPS;
    let name = &dev.name;
    // the engine of the non-FP8 products (DSV3_TRAIN_GEMM; f32 mode is always cuBLAS; in bf16
    // mode the routed experts' grouped products run on the engine's kernels, DSV3_BF16_GROUPED)
    let gemm = if dtype == DType::F32 {
        "cublas"
    } else {
        // the experts' forward and input-gradient products (their weight gradients stay on mma)
        match (dsv3_kernels::train::mm::train_gemm_cublas(), dsv3_kernels::ops::gemm_tma::enabled(&dev)) {
            (true, true) => "cublas+wgmma-experts",
            (true, false) => "cublas+mma-experts",
            (false, true) => "mma+wgmma-experts",
            (false, false) => "mma",
        }
    };
    if json {
        println!(
            "{{\"device\":{name:?},\"dtype\":\"{dtype:?}\",\"precision\":\"{precision:?}\",\"gemm\":\"{gemm}\",\"batch\":{batch},\"seq_len\":{seq_len},\"steps\":{steps},\"step_ms\":{:.3},\"train_tokens_per_s\":{tps:.1},\"active_params\":{active},\"flops_per_token\":{flops_tok:.0},\"tflops\":{tflops},\"mfu\":{mfu},\"peak_tflops\":{:.1}{}}}",
            med * 1e3,
            H100_BF16_PEAK_FLOPS / 1e12,
            profile_field(prof.as_ref(), PROFILE_TRAIN_STEPS)
        );
    } else {
        println!(
            "{name}, {dtype:?}, linears {precision:?}, products on {gemm}: train, batch {batch} x {seq_len} tokens, median of {steps} steps"
        );
        println!("step {:.2} ms, {tps:.1} tokens/s", med * 1e3);
        println!(
            "{tflops:.2} TFLOP/s ({:.3e} FLOPs/token: 6 x {active} active params + attention), MFU {:.2}% of {:.1} TFLOP/s (H100 SXM dense bf16 peak)",
            flops_tok,
            mfu * 100.0,
            H100_BF16_PEAK_FLOPS / 1e12
        );
        if let Some(p) = &prof {
            print!("{}", p.table(PROFILE_TRAIN_STEPS, PROFILE_TOP));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_flops_count_six_per_active_parameter_plus_causal_attention() {
        let cfg = dsv3_core::presets::preset("tiny").unwrap();
        let mut store = dsv3_core::weights::TensorStore::new();
        let t = dsv3_core::weights::init::random_checkpoint(&cfg, 1, 0.02);
        store.add_bytes(dsv3_core::weights::write::to_bytes(&t).unwrap(), "<init>").unwrap();
        let m = Model::from_store(cfg, store, Default::default()).unwrap();
        let c = &m.cfg;
        let per_key = 6.0 * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) as f64;
        let heads = (c.num_attention_heads * c.num_hidden_layers) as f64;
        let f1 = train_flops_per_token(&m, 1);
        assert_eq!(f1, 6.0 * m.active_params() as f64 + per_key * heads);
        // T = 127: 64 keys on average
        assert_eq!(train_flops_per_token(&m, 127) - f1, per_key * heads * 63.0);
    }
}
