//! DeepSeekMoE on device (`kernels/cuda/moe.cu`): the router, the dispatch plan that groups
//! routed rows by expert for the grouped GEMM, and the weighted combine into the residual.
use super::gemm::{gemm_epilogue, runs_epilogue, Epilogue, GemmShape, Grouped};
use super::{dim, int, launch, KArg};
use crate::device::Device;
use crate::tensor::{dptr, Act, DType, DWeight};
use cudarc::driver::CudaSlice;
use dsv3_core::config::{ScoringFunc, TopkMethod};
use dsv3_core::{Error, Result};

/// Largest expert count and top-k the router kernel takes.
pub const MOE_EMAX: usize = 512;
pub const MOE_KMAX: usize = 16;

/// Router settings (as `dsv3_core::model::moe::Router`).
#[derive(Debug, Clone, Copy)]
pub struct RouteCfg {
    pub n_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub scaling: f32,
    pub scoring: ScoringFunc,
    pub method: TopkMethod,
}

impl RouteCfg {
    /// The settings of a CPU router.
    pub fn of(r: &dsv3_core::model::moe::Router) -> RouteCfg {
        RouteCfg {
            n_experts: r.n_experts,
            top_k: r.top_k,
            n_group: r.n_group,
            topk_group: r.topk_group,
            norm_topk_prob: r.norm_topk_prob,
            scaling: r.scaling,
            scoring: r.scoring,
            method: r.method,
        }
    }
}

/// Routes `n` tokens from their router logits (`[n, E]` f32): writes the chosen experts
/// `idx` `[n, K]` (best first) and their weights `w` `[n, K]`. `bias` `[E]` for `noaux_tc`.
pub fn route(
    dev: &Device,
    logits: &CudaSlice<f32>,
    n: usize,
    bias: Option<&CudaSlice<f32>>,
    cfg: &RouteCfg,
    idx: &mut CudaSlice<i32>,
    w: &mut CudaSlice<f32>,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    check_route(cfg, n, logits, bias, idx, w)?;
    let mut args = vec![KArg::Ptr(dptr(dev, logits, 0)?)];
    args.extend(routing_args(dev, n, bias, cfg, idx, w)?);
    launch(dev, "moe", "moe_route", (dim(n.div_ceil(4), "moe_route")?, 1, 1), 128, &args)
}

/// The routing kernels' arguments after the logits, through the outputs `idx`, `w` (checked by
/// the callers: [`check_route`]).
fn routing_args(
    dev: &Device,
    n: usize,
    bias: Option<&CudaSlice<f32>>,
    cfg: &RouteCfg,
    idx: &CudaSlice<i32>,
    w: &CudaSlice<f32>,
) -> Result<Vec<KArg>> {
    let (scoring, method) = codes(cfg);
    Ok(vec![
        KArg::I32(int(n, "n")?),
        KArg::I32(int(cfg.n_experts, "experts")?),
        KArg::Ptr(match bias {
            Some(b) => dptr(dev, b, 0)?,
            None => 0,
        }),
        KArg::I32(int(cfg.n_group, "n_group")?),
        KArg::I32(int(cfg.topk_group, "topk_group")?),
        KArg::I32(int(cfg.top_k, "top_k")?),
        KArg::I32(cfg.norm_topk_prob as i32),
        KArg::F32(cfg.scaling),
        KArg::I32(scoring),
        KArg::I32(method),
        KArg::Ptr(dptr(dev, idx, 0)?),
        KArg::Ptr(dptr(dev, w, 0)?),
    ])
}

/// The dispatch plan of `nk = n·K` routed rows (device buffers, reused across calls).
pub struct Plan {
    /// `[E + 1]` first permuted row of each expert.
    pub row_offsets: CudaSlice<i32>,
    /// `[E + 1]` first GEMM row tile of each expert.
    pub tile_offsets: CudaSlice<i32>,
    /// `[nk]` permuted position of routed row `t·K + q`.
    pub slot_of: CudaSlice<i32>,
    /// `[nk]` token whose hidden state permuted row j copies.
    pub src_row: CudaSlice<i32>,
}

impl Plan {
    /// Buffers for up to `max_nk` routed rows over `experts` experts.
    pub fn new(dev: &Device, experts: usize, max_nk: usize) -> Result<Plan> {
        // unwritten: `plan` fills every offset, and every routed row (the router writes all of
        // them with valid experts) gets a permuted position and a source
        use crate::tensor::empty;
        Ok(Plan {
            row_offsets: empty(dev, experts + 1)?,
            tile_offsets: empty(dev, experts + 1)?,
            slot_of: empty(dev, max_nk)?,
            src_row: empty(dev, max_nk)?,
        })
    }

    /// Upper bound on the row tiles of `nk` rows over `experts` experts (the grouped GEMM grid).
    pub fn max_tiles(nk: usize, experts: usize) -> usize {
        nk.div_ceil(super::gemm::GEMM_BM) + experts.min(nk)
    }
}

/// Fills `plan` from the routing `idx` (`[n, K]`): rows grouped by expert.
pub fn plan(dev: &Device, idx: &CudaSlice<i32>, n: usize, k: usize, experts: usize, plan: &mut Plan) -> Result<()> {
    let nk = n * k;
    if nk == 0 {
        return Ok(());
    }
    if experts == 0 || experts > 1024 || idx.len() < nk || plan.slot_of.len() < nk || plan.src_row.len() < nk {
        return Err(Error::Input(format!("moe plan: {experts} experts (<= 1024), {nk} routed rows")));
    }
    if plan.row_offsets.len() < experts + 1 || plan.tile_offsets.len() < experts + 1 {
        return Err(Error::Input("moe plan: offsets need experts + 1 entries".into()));
    }
    launch(
        dev,
        "moe",
        "moe_plan",
        (1, 1, 1),
        1024,
        &[
            KArg::Ptr(dptr(dev, idx, 0)?),
            KArg::I32(int(nk, "nk")?),
            KArg::I32(int(k, "k")?),
            KArg::I32(int(experts, "experts")?),
            KArg::Ptr(dptr(dev, &plan.row_offsets, 0)?),
            KArg::Ptr(dptr(dev, &plan.tile_offsets, 0)?),
            KArg::Ptr(dptr(dev, &plan.slot_of, 0)?),
            KArg::Ptr(dptr(dev, &plan.src_row, 0)?),
        ],
    )
}

/// Most tokens [`route_plan`] takes (one block of 8 warps routes them one after another).
pub const ROUTE_PLAN_MAX: usize = 64;

/// [`route`] and [`plan`] in one launch, for up to [`ROUTE_PLAN_MAX`] tokens (decode steps): the
/// same routing bit for bit, and a plan of the same offsets (the order of rows within an expert
/// may differ, which no result depends on).
#[allow(clippy::too_many_arguments)]
pub fn route_plan(
    dev: &Device,
    logits: &CudaSlice<f32>,
    n: usize,
    bias: Option<&CudaSlice<f32>>,
    cfg: &RouteCfg,
    idx: &mut CudaSlice<i32>,
    w: &mut CudaSlice<f32>,
    plan: &mut Plan,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let mut args = vec![KArg::Ptr(dptr(dev, logits, 0)?)];
    args.extend(route_plan_args(dev, logits, n, bias, cfg, idx, w, plan)?);
    launch(dev, "moe", "moe_route_plan", (1, 1, 1), 256, &args)
}

/// The most router weights (`experts · hidden`) [`router_route_plan`] takes: every warp reads them
/// all for each of its tokens (bench-88m: 16 x 512).
pub const ROUTER_FUSED_MAX_WEIGHTS: usize = 16 * 1024;

/// The router GEMM, [`route`] and [`plan`] in one launch for up to [`ROUTE_PLAN_MAX`] tokens of a
/// small router (`e·d <=` [`ROUTER_FUSED_MAX_WEIGHTS`]; decode steps): `logits = rmsnorm(x)·Wᵀ`
/// (`x` `[n, ldx]` bf16, its RMSNorm `(weight, eps)` folded in as the skinny GEMM folds it, or none;
/// `rw` `[e, d]` f32) into the scratch `logits` `[n, e]`, then [`route_plan`]'s routing and plan.
/// The logits agree with the separate GEMM's to rounding (another summation tree).
#[allow(clippy::too_many_arguments)]
pub fn router_route_plan(
    dev: &Device,
    x: &Act,
    ldx: usize,
    norm: Option<(&CudaSlice<f32>, f32)>,
    rw: &CudaSlice<f32>,
    d: usize,
    logits: &mut CudaSlice<f32>,
    n: usize,
    bias: Option<&CudaSlice<f32>>,
    cfg: &RouteCfg,
    idx: &mut CudaSlice<i32>,
    w: &mut CudaSlice<f32>,
    plan: &mut Plan,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let e = cfg.n_experts;
    let Act::Bf16(xs) = x else {
        return Err(Error::Input("moe router_route_plan: bf16 hidden states only".into()));
    };
    if d == 0 || ldx < d || xs.len() < (n - 1) * ldx + d || rw.len() < e * d || logits.len() < n * e {
        return Err(Error::Input(format!("moe router_route_plan: x [{n}, {ldx}], router [{e}, {d}], logits")));
    }
    if !d.is_multiple_of(8) || e * d > ROUTER_FUSED_MAX_WEIGHTS || norm.is_some_and(|(nw, _)| nw.len() < d) {
        return Err(Error::Input(format!(
            "moe router_route_plan: hidden {d} (a multiple of 8), {e} x {d} router weights (<= {ROUTER_FUSED_MAX_WEIGHTS}), norm"
        )));
    }
    let mut args = vec![
        KArg::Ptr(dptr(dev, xs, 0)?),
        KArg::I32(int(ldx, "ldx")?),
        KArg::I32(int(d, "hidden")?),
        KArg::Ptr(match norm {
            Some((nw, _)) => dptr(dev, nw, 0)?,
            None => 0,
        }),
        KArg::F32(norm.map_or(0.0, |(_, eps)| eps)),
        KArg::Ptr(dptr(dev, rw, 0)?),
        KArg::Ptr(dptr(dev, logits, 0)?),
    ];
    args.extend(route_plan_args(dev, logits, n, bias, cfg, idx, w, plan)?);
    launch(dev, "moe", "moe_router_route_plan", (1, 1, 1), 256, &args)
}

/// The arguments of `moe_route_plan` after its logits (checked).
#[allow(clippy::too_many_arguments)]
fn route_plan_args(
    dev: &Device,
    logits: &CudaSlice<f32>,
    n: usize,
    bias: Option<&CudaSlice<f32>>,
    cfg: &RouteCfg,
    idx: &mut CudaSlice<i32>,
    w: &mut CudaSlice<f32>,
    plan: &mut Plan,
) -> Result<Vec<KArg>> {
    let (e, k) = (cfg.n_experts, cfg.top_k);
    if n > ROUTE_PLAN_MAX {
        return Err(Error::Input(format!("moe route_plan: {n} tokens (at most {ROUTE_PLAN_MAX}; use route + plan)")));
    }
    check_route(cfg, n, logits, bias, idx, w)?;
    let nk = n * k;
    if plan.slot_of.len() < nk
        || plan.src_row.len() < nk
        || plan.row_offsets.len() < e + 1
        || plan.tile_offsets.len() < e + 1
    {
        return Err(Error::Input(format!("moe route_plan: plan buffers for {nk} rows over {e} experts")));
    }
    let mut args = routing_args(dev, n, bias, cfg, idx, w)?;
    args.extend([
        KArg::Ptr(dptr(dev, &plan.row_offsets, 0)?),
        KArg::Ptr(dptr(dev, &plan.tile_offsets, 0)?),
        KArg::Ptr(dptr(dev, &plan.slot_of, 0)?),
        KArg::Ptr(dptr(dev, &plan.src_row, 0)?),
    ]);
    Ok(args)
}

/// `x[t] += shared[t] + Σ_q w[t,q] · y[slot_of[t,q]]` (routed terms in ascending expert order);
/// `y` `[n·K, d]` expert outputs in permuted order, `shared` `[n, d]`, `x` `[n, d]`.
#[allow(clippy::too_many_arguments)]
pub fn combine(
    dev: &Device,
    y: &Act,
    plan: &Plan,
    idx: &CudaSlice<i32>,
    w: &CudaSlice<f32>,
    shared: Option<&Act>,
    x: &mut Act,
    n: usize,
    k: usize,
    d: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    check_combine(y, plan, idx, w, shared, x, n, k, d)?;
    let kname = match x.dtype() {
        DType::F32 => "moe_combine_f32",
        DType::Bf16 => "moe_combine_bf16",
    };
    launch(
        dev,
        "moe",
        kname,
        (dim(n, "moe_combine")?, 1, 1),
        256,
        &[
            KArg::Ptr(y.ptr(dev, 0)?),
            KArg::Ptr(dptr(dev, &plan.slot_of, 0)?),
            KArg::Ptr(dptr(dev, idx, 0)?),
            KArg::Ptr(dptr(dev, w, 0)?),
            KArg::Ptr(match shared {
                Some(s) => s.ptr(dev, 0)?,
                None => 0,
            }),
            KArg::Ptr(x.ptr(dev, 0)?),
            KArg::I32(int(n, "n")?),
            KArg::I32(int(k, "k")?),
            KArg::I32(int(d, "d")?),
        ],
    )
}

/// The buffers and dtypes [`combine`] and [`down_combine`] take.
#[allow(clippy::too_many_arguments)]
fn check_combine(
    y: &Act,
    plan: &Plan,
    idx: &CudaSlice<i32>,
    w: &CudaSlice<f32>,
    shared: Option<&Act>,
    x: &Act,
    n: usize,
    k: usize,
    d: usize,
) -> Result<()> {
    if k == 0 || k > MOE_KMAX || idx.len() < n * k || w.len() < n * k || plan.slot_of.len() < n * k {
        return Err(Error::Input("moe combine: routing buffers".into()));
    }
    if y.dtype() != x.dtype() || shared.is_some_and(|s| s.dtype() != x.dtype()) {
        return Err(Error::Input("moe combine: dtypes differ".into()));
    }
    y.check(n * k * d, "moe combine y")?;
    x.check(n * d, "moe combine x")?;
    if let Some(s) = shared {
        s.check(n * d, "moe combine shared")?;
    }
    Ok(())
}

/// The MoE combine inside the routed experts' down GEMM ([`down_combine`]; `MoeCombineArgs` in
/// kernels/cuda/gemm.cu, same field order and sizes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CombineArgs {
    /// `[ceil(d / 16)]` arrival counters, zero between launches ([`combine_counters`]).
    pub counters: u64,
    pub slot_of: u64,
    pub idx: u64,
    pub w: u64,
    /// `[n, d]` or 0.
    pub shared: u64,
    pub x: u64,
    pub tokens: i32,
    pub k: i32,
}

// SAFETY: plain integers, #[repr(C)], laid out as the CUDA struct.
unsafe impl cudarc::driver::DeviceRepr for CombineArgs {}

/// Output columns per arrival counter of [`down_combine`] (the skinny kernels' 16 columns a block).
pub const COMBINE_COLS: usize = 16;

/// Zeroed counters for [`down_combine`] with outputs `d` wide. The kernel leaves them zero, so
/// one buffer serves every call on one stream (calls on different streams need their own).
pub fn combine_counters(dev: &Device, d: usize) -> Result<CudaSlice<i32>> {
    crate::tensor::zeros(dev, d.div_ceil(COMBINE_COLS).max(1))
}

/// `DSV3_MOE_COMBINE=separate` (read once): decode runs the routed experts' down GEMM and
/// [`combine`] as two launches instead of [`down_combine`] (for comparisons).
pub fn fused_combine() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !super::env_is(&V, "DSV3_MOE_COMBINE", "separate")
}

/// The routed experts' down GEMM over `plan` (`act` `[n·K, I]` permuted rows, `down` `[E]` x
/// `[d, I]`) for a decode step's few rows.
fn down_shape<'a>(plan: &'a Plan, nk: usize, i: usize, d: usize, max_tiles: usize) -> GemmShape<'a> {
    let g = Grouped { row_offsets: &plan.row_offsets, tile_offsets: &plan.tile_offsets, max_tiles };
    GemmShape { grouped: Some(g), ..GemmShape::plain(nk, i, d) }
}

/// Whether [`down_combine`] takes this step: `nk` rows few enough for the skinny kernels, K
/// (`I`) a multiple of 8, activations in `dt` (the fused kernels' dtypes).
pub fn down_combine_runs(dev: &Device, dt: DType, down: &DWeight, plan: &Plan, nk: usize, max_tiles: usize) -> bool {
    let e = Epilogue::MoeCombine(CombineArgs::default(), 0);
    runs_epilogue(dev, dt, down, dt, &down_shape(plan, nk, down.k, down.n, max_tiles), &e)
}

/// `x[t] += shared[t] + Σ_q w[t,q] · (act · down_eᵀ)[slot_of[t,q]]`: the routed experts' down
/// GEMM and [`combine`] in one launch (`gemm_skinny_combine_*`): the last block of each 16
/// columns to finish adds them into `x` with `combine`'s arithmetic, so the result is the two
/// launches' bit for bit. `act` `[n·K, I]` in the plan's row order, `down` the experts' `[d, I]`
/// (grouped), `counters` from [`combine_counters`]; `max_tiles` as the grouped GEMM's. Only
/// where [`down_combine_runs`] (an error otherwise).
#[allow(clippy::too_many_arguments)]
pub fn down_combine(
    dev: &Device,
    act: &Act,
    down: &DWeight,
    plan: &Plan,
    max_tiles: usize,
    idx: &CudaSlice<i32>,
    w: &CudaSlice<f32>,
    shared: Option<&Act>,
    x: &mut Act,
    counters: &CudaSlice<i32>,
    n: usize,
    k: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let (d, i) = (down.n, down.k);
    let mut y = Act::empty(dev, x.dtype(), n * k * d)?;
    check_combine(&y, plan, idx, w, shared, x, n, k, d)?;
    act.check(n * k * i, "moe down_combine act")?;
    let q = CombineArgs {
        counters: dptr(dev, counters, 0)?,
        slot_of: dptr(dev, &plan.slot_of, 0)?,
        idx: dptr(dev, idx, 0)?,
        w: dptr(dev, w, 0)?,
        shared: match shared {
            Some(s) => s.ptr(dev, 0)?,
            None => 0,
        },
        x: x.ptr(dev, 0)?,
        tokens: int(n, "n")?,
        k: int(k, "k")?,
    };
    let e = Epilogue::MoeCombine(q, counters.len());
    gemm_epilogue(dev, act, down, &mut y, &down_shape(plan, n * k, i, d, max_tiles), e)
}

/// The routing settings and buffers a router kernel takes.
fn check_route(
    cfg: &RouteCfg,
    n: usize,
    logits: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    idx: &CudaSlice<i32>,
    w: &CudaSlice<f32>,
) -> Result<()> {
    let (e, k) = (cfg.n_experts, cfg.top_k);
    if e == 0 || e > MOE_EMAX || k == 0 || k > MOE_KMAX || k > e || cfg.n_group == 0 || e % cfg.n_group != 0 {
        return Err(Error::Input(format!(
            "moe route: {e} experts (<= {MOE_EMAX}), top-{k} (<= {MOE_KMAX}), {} groups",
            cfg.n_group
        )));
    }
    if cfg.n_group > 64 {
        return Err(Error::Input("moe route: at most 64 expert groups".into()));
    }
    if logits.len() < n * e || idx.len() < n * k || w.len() < n * k || bias.is_some_and(|b| b.len() < e) {
        return Err(Error::Input("moe route: buffer sizes".into()));
    }
    Ok(())
}

/// The kernels' codes for the scoring function and the top-k method.
fn codes(cfg: &RouteCfg) -> (i32, i32) {
    let scoring = match cfg.scoring {
        ScoringFunc::Sigmoid => 0,
        ScoringFunc::Softmax => 1,
    };
    let method = match cfg.method {
        TopkMethod::NoauxTc => 0,
        TopkMethod::Greedy => 1,
        TopkMethod::GroupLimitedGreedy => 2,
    };
    (scoring, method)
}
