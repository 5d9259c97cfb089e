//! DeepSeekMoE training on device (`kernels/cuda/moe_train.cu`): the dispatch plan in token order
//! ([`plan_token_order`]), the backward of the combine and dispatch ([`super::moe`]), the routing
//! weights' gradient into the router logits, the balance losses and the auxiliary-loss-free bias
//! update, mirroring `dsv3_core::model::moe`
//! (`Moe::backward`, `Router::weights_backward`, `Router::balance_loss`, `Router::loads`) and the
//! trainer's bias rule `b_i += γ·sign(mean load − load_i)`.
use super::moe::{Plan, RouteCfg, MOE_EMAX, MOE_KMAX};
use super::{dim, int, launch, KArg};
use crate::device::Device;
use crate::tensor::{download, dptr, Act, DType};
use cudarc::driver::CudaSlice;
use dsv3_core::config::ScoringFunc;
use dsv3_core::{Error, Result};

const WARPS: usize = 4;

fn scoring(s: ScoringFunc) -> i32 {
    match s {
        ScoringFunc::Sigmoid => 0,
        ScoringFunc::Softmax => 1,
    }
}

fn check_routing(what: &str, e: usize, k: usize) -> Result<()> {
    if e == 0 || e > MOE_EMAX || k == 0 || k > MOE_KMAX || k > e {
        return Err(Error::Input(format!("{what}: {e} experts (<= {MOE_EMAX}), top-{k} (<= {MOE_KMAX})")));
    }
    Ok(())
}

/// Backward of [`super::moe::combine`]'s routed part for `n` tokens, top-`k`, width `d`: from
/// `dy` `[n, d]` and the experts' outputs `ye` `[n·k, d]` (permuted order, as the grouped GEMM
/// wrote them) writes the experts' output gradient `dye[slot_of[r]] = w[r]·dy[r / k]` (`[n·k, d]`,
/// permuted) and the weights' gradient `dw[r] = dy[r / k] · ye[slot_of[r]]` (`[n, k]` f32).
#[allow(clippy::too_many_arguments)]
pub fn combine_backward(
    dev: &Device,
    dy: &Act,
    ye: &Act,
    plan: &Plan,
    w: &CudaSlice<f32>,
    dye: &mut Act,
    dw: &mut CudaSlice<f32>,
    n: usize,
    k: usize,
    d: usize,
) -> Result<()> {
    let nk = n * k;
    if nk == 0 || d == 0 {
        return Ok(());
    }
    if k > MOE_KMAX || w.len() < nk || dw.len() < nk || plan.slot_of.len() < nk {
        return Err(Error::Input(format!("moe combine_backward: routing buffers shorter than {n}x{k}")));
    }
    if dy.dtype() != ye.dtype() || dy.dtype() != dye.dtype() {
        return Err(Error::Input("moe combine_backward: dtypes differ".into()));
    }
    dy.check(n * d, "moe combine_backward dy")?;
    ye.check(nk * d, "moe combine_backward ye")?;
    dye.check(nk * d, "moe combine_backward dye")?;
    let kname = match dy.dtype() {
        DType::F32 => "moe_combine_bwd_f32",
        DType::Bf16 => "moe_combine_bwd_bf16",
    };
    launch(
        dev,
        "moe_train",
        kname,
        (dim(nk.div_ceil(WARPS), "moe_combine_bwd")?, 1, 1),
        (32 * WARPS) as u32,
        &[
            KArg::Ptr(dy.ptr(dev, 0)?),
            KArg::Ptr(ye.ptr(dev, 0)?),
            KArg::Ptr(dptr(dev, &plan.slot_of, 0)?),
            KArg::Ptr(dptr(dev, w, 0)?),
            KArg::I32(int(nk, "n·k")?),
            KArg::I32(int(k, "k")?),
            KArg::I32(int(d, "d")?),
            KArg::Ptr(dye.ptr(dev, 0)?),
            KArg::Ptr(dptr(dev, dw, 0)?),
        ],
    )
}

/// Backward of the dispatch (each token's row copied to its `k` permuted rows): from the
/// experts' input gradient `dxe` `[n·k, d]` (permuted) writes, or with `accumulate` adds,
/// `dx[t] = Σ_q dxe[slot_of[t·k + q]]` (`[n, d]`, f32 sums).
#[allow(clippy::too_many_arguments)]
pub fn dispatch_backward(
    dev: &Device,
    dxe: &Act,
    plan: &Plan,
    dx: &mut Act,
    n: usize,
    k: usize,
    d: usize,
    accumulate: bool,
) -> Result<()> {
    if n == 0 || d == 0 {
        return Ok(());
    }
    if k == 0 || k > MOE_KMAX || plan.slot_of.len() < n * k {
        return Err(Error::Input(format!("moe dispatch_backward: top-{k}, routing buffers shorter than {n}x{k}")));
    }
    if dxe.dtype() != dx.dtype() {
        return Err(Error::Input("moe dispatch_backward: dtypes differ".into()));
    }
    dxe.check(n * k * d, "moe dispatch_backward dxe")?;
    dx.check(n * d, "moe dispatch_backward dx")?;
    let kname = match dx.dtype() {
        DType::F32 => "moe_dispatch_bwd_f32",
        DType::Bf16 => "moe_dispatch_bwd_bf16",
    };
    launch(
        dev,
        "moe_train",
        kname,
        (dim(n, "moe_dispatch_bwd")?, 1, 1),
        128,
        &[
            KArg::Ptr(dxe.ptr(dev, 0)?),
            KArg::Ptr(dptr(dev, &plan.slot_of, 0)?),
            KArg::I32(int(n, "n")?),
            KArg::I32(int(k, "k")?),
            KArg::I32(int(d, "d")?),
            KArg::Ptr(dx.ptr(dev, 0)?),
            KArg::I32(accumulate as i32),
        ],
    )
}

/// Gradient of the router logits through the routing weights (`Router::weights_backward` for
/// every token): from the logits `[n, E]`, the chosen experts `idx` `[n, k]` and the weights'
/// gradient `dw` `[n, k]` writes `dlogits` `[n, E]` (overwritten; unchosen experts get 0 with
/// sigmoid scores).
#[allow(clippy::too_many_arguments)]
pub fn router_backward(
    dev: &Device,
    logits: &CudaSlice<f32>,
    idx: &CudaSlice<i32>,
    dw: &CudaSlice<f32>,
    cfg: &RouteCfg,
    n: usize,
    dlogits: &mut CudaSlice<f32>,
) -> Result<()> {
    let (e, k) = (cfg.n_experts, cfg.top_k);
    if n == 0 {
        return Ok(());
    }
    check_routing("moe router_backward", e, k)?;
    if logits.len() < n * e || dlogits.len() < n * e || idx.len() < n * k || dw.len() < n * k {
        return Err(Error::Input(format!("moe router_backward: buffers shorter than {n} tokens")));
    }
    launch(
        dev,
        "moe_train",
        "moe_router_bwd",
        (dim(n.div_ceil(WARPS), "moe_router_bwd")?, 1, 1),
        (32 * WARPS) as u32,
        &[
            KArg::Ptr(dptr(dev, logits, 0)?),
            KArg::Ptr(dptr(dev, idx, 0)?),
            KArg::Ptr(dptr(dev, dw, 0)?),
            KArg::I32(int(n, "n")?),
            KArg::I32(int(e, "experts")?),
            KArg::I32(int(k, "k")?),
            KArg::I32(cfg.norm_topk_prob as i32),
            KArg::F32(cfg.scaling),
            KArg::I32(scoring(cfg.scoring)),
            KArg::Ptr(dptr(dev, dlogits, 0)?),
        ],
    )
}

/// Token rows grouped into spans (the sequences of a batch for the sequence-wise balance loss,
/// one span of all rows for a conventional auxiliary loss or the load statistics), on the device.
pub struct Spans {
    /// `[S + 1]` first row of each span.
    pub start: CudaSlice<i32>,
    /// `[n]` the span of each row.
    pub row_span: CudaSlice<i32>,
    /// Rows per span (host copy).
    pub lens: Vec<usize>,
}

impl Spans {
    /// Consecutive spans of `lens[s]` rows each.
    pub fn new(dev: &Device, lens: &[usize]) -> Result<Spans> {
        let mut start = vec![0i32];
        let mut row_span = Vec::new();
        for (s, &l) in lens.iter().enumerate() {
            let last = *start.last().unwrap_or(&0) as usize;
            start.push(int(last + l, "span rows")?);
            row_span.extend(std::iter::repeat_n(int(s, "spans")?, l));
        }
        if lens.is_empty() {
            return Err(Error::Input("moe spans: no spans".into()));
        }
        Ok(Spans {
            start: crate::tensor::upload(dev, &start)?,
            row_span: crate::tensor::upload(dev, &row_span.iter().copied().chain([0]).collect::<Vec<i32>>())?,
            lens: lens.to_vec(),
        })
    }

    /// Rows in all spans.
    pub fn rows(&self) -> usize {
        self.lens.iter().sum()
    }

    /// Spans with at least one row.
    pub fn non_empty(&self) -> usize {
        self.lens.iter().filter(|&&l| l > 0).count()
    }
}

/// Per span `s` and expert `i`: `f[s, i] = E/(K·T_s)·#{tokens of s choosing i}` (the balance
/// loss's f, `[S, E]` f32) and the raw counts `load[s, i]` (`[S, E]` i32).
pub fn expert_freq(
    dev: &Device,
    idx: &CudaSlice<i32>,
    spans: &Spans,
    e: usize,
    k: usize,
    f: &mut CudaSlice<f32>,
    load: &mut CudaSlice<i32>,
) -> Result<()> {
    check_routing("moe expert_freq", e, k)?;
    let s = spans.lens.len();
    if idx.len() < spans.rows() * k || f.len() < s * e || load.len() < s * e {
        return Err(Error::Input("moe expert_freq: buffers shorter than the spans".into()));
    }
    launch(
        dev,
        "moe_train",
        "moe_expert_freq",
        (dim(s, "moe_expert_freq")?, 1, 1),
        256,
        &[
            KArg::Ptr(dptr(dev, idx, 0)?),
            KArg::Ptr(dptr(dev, &spans.start, 0)?),
            KArg::I32(int(e, "experts")?),
            KArg::I32(int(k, "k")?),
            KArg::Ptr(dptr(dev, f, 0)?),
            KArg::Ptr(dptr(dev, load, 0)?),
        ],
    )
}

/// The balance loss `α·Σ_i f_i·P_i` over `spans` (`Router::balance_loss`): adds `scale ×` its
/// gradient into `dlogits` `[n, E]` and returns the loss (the mean over non-empty spans; the
/// per-row terms are summed on the host in the CPU's order: a download of `n` floats, which waits
/// for the stream). α = 0 does nothing and returns 0.
#[allow(clippy::too_many_arguments)]
pub fn balance_loss(
    dev: &Device,
    logits: &CudaSlice<f32>,
    idx: &CudaSlice<i32>,
    cfg: &RouteCfg,
    spans: &Spans,
    alpha: f32,
    scale: f32,
    dlogits: &mut CudaSlice<f32>,
) -> Result<f32> {
    let Some((row_loss, groups)) = balance_terms(dev, logits, idx, cfg, spans, alpha, scale, dlogits)? else {
        return Ok(0.0);
    };
    // the CPU sums the row terms in row order (span by span) and divides by the span count
    let terms = download(dev, &row_loss)?;
    Ok(terms.iter().fold(0f32, |a, &b| a + b) / groups as f32)
}

/// [`balance_loss`] without its download (the training pass sums every layer's terms at its end):
/// adds `scale ×` the loss's gradient into `dlogits` and returns the per-row loss terms `[n]` and
/// the number of non-empty spans (the loss is `Σ terms / spans`, summed in row order). `None`
/// when α = 0.
#[allow(clippy::too_many_arguments)]
pub fn balance_terms(
    dev: &Device,
    logits: &CudaSlice<f32>,
    idx: &CudaSlice<i32>,
    cfg: &RouteCfg,
    spans: &Spans,
    alpha: f32,
    scale: f32,
    dlogits: &mut CudaSlice<f32>,
) -> Result<Option<(CudaSlice<f32>, usize)>> {
    let (e, k, n) = (cfg.n_experts, cfg.top_k, spans.rows());
    if alpha == 0.0 || n == 0 {
        return Ok(None);
    }
    check_routing("moe balance_loss", e, k)?;
    if logits.len() < n * e || dlogits.len() < n * e || idx.len() < n * k {
        return Err(Error::Input(format!("moe balance_loss: buffers shorter than {n} rows")));
    }
    let s = spans.lens.len();
    let mut f = crate::tensor::empty::<f32>(dev, s * e)?;
    let mut load = crate::tensor::empty::<i32>(dev, s * e)?;
    expert_freq(dev, idx, spans, e, k, &mut f, &mut load)?;
    let row_loss = crate::tensor::empty::<f32>(dev, n)?;
    let groups = spans.non_empty().max(1);
    launch(
        dev,
        "moe_train",
        "moe_balance_bwd",
        (dim(n.div_ceil(WARPS), "moe_balance_bwd")?, 1, 1),
        (32 * WARPS) as u32,
        &[
            KArg::Ptr(dptr(dev, logits, 0)?),
            KArg::Ptr(dptr(dev, &spans.row_span, 0)?),
            KArg::Ptr(dptr(dev, &spans.start, 0)?),
            KArg::Ptr(dptr(dev, &f, 0)?),
            KArg::I32(int(n, "n")?),
            KArg::I32(int(e, "experts")?),
            KArg::I32(scoring(cfg.scoring)),
            KArg::F32(alpha),
            KArg::F32(scale),
            KArg::I32(int(groups, "spans")?),
            KArg::Ptr(dptr(dev, &row_loss, 0)?),
            KArg::Ptr(dptr(dev, dlogits, 0)?),
        ],
    )?;
    Ok(Some((row_loss, groups)))
}

/// Rows per chunk of the token-order plan's kernels (`MP_CHUNK` in moe_train.cu).
const PLAN_CHUNK: usize = 256;

/// The dispatch plan of the `n·k` routed rows `idx` (`[n, k]`, device) in token order, on the
/// device (three launches, no host round trip): [`super::moe::plan`]'s layout with each expert's
/// rows in the order of core's `Moe::dispatch` (`per[e]`: by expert, then by token) where `plan`
/// leaves that order arbitrary. So the grouped products that sum over an expert's rows (the
/// Wgrad) sum them in a fixed order, and the FP8 expert Wgrad's 128-token tiles hold the tokens
/// core's hold. Also writes `t128` (`[2e + 2]`): the row offsets, then the 128-aligned token
/// segments of the FP8 expert Wgrad (`seg[0] = 0`, `seg[x + 1] = seg[x] + ceil(count_x / 128)·128`,
/// as `ops::fp8::t128_segments` of the offsets), the table `quant_t128_groups` and
/// `fp8_gemm_kgrouped` read. A routed row whose expert is outside `[0, e)` gets slot −1.
pub fn plan_token_order(
    dev: &Device,
    idx: &CudaSlice<i32>,
    n: usize,
    k: usize,
    e: usize,
    plan: &mut Plan,
    t128: &mut CudaSlice<i32>,
) -> Result<()> {
    let nk = n * k;
    if e == 0 || e > 1024 || idx.len() < nk || plan.slot_of.len() < nk || plan.src_row.len() < nk {
        return Err(Error::Input(format!("moe token-order plan: {e} experts (<= 1024), {nk} routed rows")));
    }
    if plan.row_offsets.len() < e + 1 || plan.tile_offsets.len() < e + 1 || t128.len() < 2 * e + 2 {
        return Err(Error::Input("moe token-order plan: offsets need e + 1 entries, t128 2e + 2".into()));
    }
    let chunks = nk.div_ceil(PLAN_CHUNK);
    // chunk by expert counts, then the chunks' first positions (every entry written by the count)
    let hist = crate::tensor::empty::<i32>(dev, (chunks * e).max(1))?;
    let (nk_i, e_i, chunks_i) = (int(nk, "routed rows")?, int(e, "experts")?, int(chunks, "plan chunks")?);
    if chunks > 0 {
        launch(
            dev,
            "moe_train",
            "moe_plan_count",
            (dim(chunks, "plan chunks")?, 1, 1),
            PLAN_CHUNK as u32,
            &[KArg::Ptr(dptr(dev, idx, 0)?), KArg::I32(nk_i), KArg::I32(e_i), KArg::Ptr(dptr(dev, &hist, 0)?)],
        )?;
    }
    launch(
        dev,
        "moe_train",
        "moe_plan_offsets",
        (1, 1, 1),
        1024,
        &[
            KArg::Ptr(dptr(dev, &hist, 0)?),
            KArg::I32(chunks_i),
            KArg::I32(e_i),
            KArg::I32(int(super::gemm::GEMM_BM, "tile rows")?),
            KArg::Ptr(dptr(dev, &plan.row_offsets, 0)?),
            KArg::Ptr(dptr(dev, &plan.tile_offsets, 0)?),
            KArg::Ptr(dptr(dev, t128, 0)?),
        ],
    )?;
    if chunks == 0 {
        return Ok(());
    }
    launch(
        dev,
        "moe_train",
        "moe_plan_place",
        (dim(chunks, "plan chunks")?, 1, 1),
        PLAN_CHUNK as u32,
        &[
            KArg::Ptr(dptr(dev, idx, 0)?),
            KArg::I32(nk_i),
            KArg::I32(int(k, "top-k")?),
            KArg::I32(e_i),
            KArg::Ptr(dptr(dev, &hist, 0)?),
            KArg::Ptr(dptr(dev, &plan.slot_of, 0)?),
            KArg::Ptr(dptr(dev, &plan.src_row, 0)?),
        ],
    )
}

/// [`plan_token_order`] on the host (its reference in the tests): the routed rows in core's order (`Moe::dispatch`'s `per[e]`: by expert, then by token), as
/// `moe_plan` lays them out: `row_offsets` and `tile_offsets` (`GEMM_BM`-row tiles) `[e + 1]`,
/// `slot_of[j]` (permuted position of routed row `j = t·k + q`, −1 for an invalid expert) and
/// `src_row[pos]` (its token). `idx` is `[n·k]`.
pub fn token_order_plan_host(idx: &[i32], k: usize, e: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>) {
    let nk = idx.len();
    let mut cnt = vec![0usize; e];
    for &x in idx {
        if x >= 0 && (x as usize) < e {
            cnt[x as usize] += 1;
        }
    }
    let (mut ro, mut to) = (vec![0i32; e + 1], vec![0i32; e + 1]);
    for i in 0..e {
        ro[i + 1] = ro[i] + cnt[i] as i32;
        to[i + 1] = to[i] + cnt[i].div_ceil(super::gemm::GEMM_BM) as i32;
    }
    let mut fill: Vec<i32> = ro[..e].to_vec();
    let mut slot_of = vec![-1i32; nk];
    let mut src_row = vec![0i32; nk];
    for (j, &x) in idx.iter().enumerate() {
        if x >= 0 && (x as usize) < e {
            let pos = fill[x as usize];
            fill[x as usize] += 1;
            slot_of[j] = pos;
            src_row[pos as usize] = (j / k) as i32;
        }
    }
    (ro, to, slot_of, src_row)
}

/// Tokens routed to each expert over all `n` rows of `idx` (`[n, k]`): `load` `[E]` on the device.
pub fn expert_loads(dev: &Device, idx: &CudaSlice<i32>, n: usize, e: usize, k: usize) -> Result<CudaSlice<i32>> {
    let spans = Spans::new(dev, &[n])?;
    let mut f = crate::tensor::empty::<f32>(dev, e)?;
    let mut load = crate::tensor::empty::<i32>(dev, e)?;
    expert_freq(dev, idx, &spans, e, k, &mut f, &mut load)?;
    Ok(load)
}

/// The auxiliary-loss-free bias update from the step's loads `[E]`: `bias[i] += γ·sign(mean −
/// load[i])` (DeepSeek-V3: γ = 0.001).
pub fn bias_update(dev: &Device, load: &CudaSlice<i32>, e: usize, gamma: f32, bias: &mut CudaSlice<f32>) -> Result<()> {
    if e == 0 || e > MOE_EMAX || load.len() < e || bias.len() < e {
        return Err(Error::Input(format!("moe bias_update: {e} experts (<= {MOE_EMAX}), buffers")));
    }
    if gamma == 0.0 {
        return Ok(());
    }
    launch(
        dev,
        "moe_train",
        "moe_bias_update",
        (1, 1, 1),
        256,
        &[
            KArg::Ptr(dptr(dev, load, 0)?),
            KArg::I32(int(e, "experts")?),
            KArg::F32(gamma),
            KArg::Ptr(dptr(dev, bias, 0)?),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm::GEMM_BM;
    use dsv3_core::rng::Rng;

    #[test]
    fn token_order_plan_is_cores_dispatch_order() {
        let mut rng = Rng::new(3);
        for (n, k, e) in [(1usize, 1usize, 1usize), (37, 2, 5), (300, 4, 3), (70, 6, 16)] {
            // distinct experts per token, as the router picks them; one invalid entry
            let mut idx = Vec::with_capacity(n * k);
            for _ in 0..n {
                let mut chosen: Vec<i32> = Vec::new();
                while chosen.len() < k.min(e) {
                    let x = rng.below(e as u64) as i32;
                    if !chosen.contains(&x) {
                        chosen.push(x);
                    }
                }
                chosen.resize(k, -1);
                idx.extend(chosen);
            }
            let (ro, to, slot_of, src_row) = token_order_plan_host(&idx, k, e);
            // core: per[e] = the tokens routed to e, in token order
            let mut per: Vec<Vec<i32>> = vec![Vec::new(); e];
            for (j, &x) in idx.iter().enumerate() {
                if x >= 0 {
                    per[x as usize].push((j / k) as i32);
                }
            }
            let mut tile = 0;
            for x in 0..e {
                assert_eq!(ro[x + 1] - ro[x], per[x].len() as i32);
                assert_eq!(&src_row[ro[x] as usize..ro[x + 1] as usize], &per[x][..]);
                assert_eq!(to[x], tile);
                tile += per[x].len().div_ceil(GEMM_BM) as i32;
            }
            assert_eq!(to[e], tile);
            for (j, &x) in idx.iter().enumerate() {
                if x < 0 {
                    assert_eq!(slot_of[j], -1);
                } else {
                    let p = slot_of[j] as usize;
                    assert!(p >= ro[x as usize] as usize && p < ro[x as usize + 1] as usize);
                    assert_eq!(src_row[p], (j / k) as i32);
                }
            }
        }
    }
}
