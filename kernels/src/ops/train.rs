//! Training kernels (`kernels/cuda/train.cu`): AdamW on f32 master weights (f32 or bf16 moments)
//! and the backward passes of RMSNorm, SwiGLU, the embedding and softmax cross-entropy (RoPE/YaRN
//! beside its forward in `ops::rope`), mirroring `dsv3_core::train::optim` and `dsv3_core::ops`.
use super::{dim, grid_y, int, launch, launch_smem, max_smem_optin, KArg};
use crate::device::Device;
use crate::tensor::{dptr, Act, DType};
use cudarc::driver::CudaSlice;
use dsv3_core::{Error, Result};
use half::bf16;

/// AdamW's moments: f32, or bf16 (DeepSeek-V3; rounded after every update as core's
/// `AdamW::bf16_moments`).
pub enum Moments {
    F32 { m: CudaSlice<f32>, v: CudaSlice<f32> },
    Bf16 { m: CudaSlice<bf16>, v: CudaSlice<bf16> },
}

/// One AdamW step's scalars, as `dsv3_core::train::optim::AdamW::step` computes them: `bc1 = 1 −
/// β1^t`, `bc2 = 1 − β2^t` (core uses `libm::powf`; pass the same values for bit-exact agreement),
/// `decay = 1 − lr·weight_decay` for decayed tensors, else 1; `grad_scale` the gradient-clipping
/// factor (`AdamW::step_scaled`'s `gscale`; 1 for none): the gradient is multiplied by it as it is
/// read, bit for bit core's in-place scaling, without a pass of its own (the gradient buffer keeps
/// the unscaled values).
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub decay: f32,
    pub bc1: f32,
    pub bc2: f32,
    pub grad_scale: f32,
}

/// Elements per byte of [`adamw`]'s decay mask (`dmask[i >> 6]` in train.cu).
pub const DECAY_CHUNK: usize = 64;

/// `p[..n]` one AdamW step with gradient `g`, updating `moments`. `decay_mask`: one byte per
/// [`DECAY_CHUNK`] elements, 0 where the tensor there is not decayed (`s.decay` applies where
/// it is 1; without a mask, everywhere): the whole parameter arena in one launch. `copy`: the
/// bf16 working copy of `p`, written with the new values in the same pass (bit for bit a cast).
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    dev: &Device,
    p: &mut CudaSlice<f32>,
    g: &CudaSlice<f32>,
    moments: &mut Moments,
    n: usize,
    s: &AdamStep,
    decay_mask: Option<&CudaSlice<u8>>,
    copy: Option<&mut CudaSlice<bf16>>,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if decay_mask.is_some_and(|d| d.len() < n.div_ceil(DECAY_CHUNK)) {
        return Err(Error::Input(format!(
            "adamw: a decay mask shorter than {} for {n} parameters",
            n.div_ceil(DECAY_CHUNK)
        )));
    }
    let (ml, vl, k, mp, vp) = match moments {
        Moments::F32 { m, v } => (m.len(), v.len(), "adamw_f32", dptr(dev, m, 0)?, dptr(dev, v, 0)?),
        Moments::Bf16 { m, v } => (m.len(), v.len(), "adamw_bf16m", dptr(dev, m, 0)?, dptr(dev, v, 0)?),
    };
    if p.len() < n || g.len() < n || ml < n || vl < n || copy.as_ref().is_some_and(|c| c.len() < n) {
        return Err(Error::Input(format!("adamw: {n} parameters need p, g, m, v (and a copy) of at least {n}")));
    }
    let args = [
        KArg::Ptr(dptr(dev, p, 0)?),
        KArg::Ptr(dptr(dev, g, 0)?),
        KArg::Ptr(mp),
        KArg::Ptr(vp),
        KArg::I64(n as i64),
        KArg::F32(s.lr),
        KArg::F32(s.beta1),
        KArg::F32(s.beta2),
        KArg::F32(s.eps),
        KArg::F32(s.decay),
        KArg::F32(s.bc1),
        KArg::F32(s.bc2),
        KArg::Ptr(match decay_mask {
            Some(d) => dptr(dev, d, 0)?,
            None => 0,
        }),
        KArg::F32(s.grad_scale),
        KArg::Ptr(match copy {
            Some(c) => dptr(dev, c, 0)?,
            None => 0,
        }),
    ];
    launch(dev, "train", k, (dim(n.div_ceil(256), "adamw")?, 1, 1), 256, &args)
}

fn pick(dt: DType, f: &'static str, b: &'static str) -> &'static str {
    match dt {
        DType::F32 => f,
        DType::Bf16 => b,
    }
}

/// Backward of RMSNorm over `rows` rows of `x` (stride `ldx`) with weight `w` `[d]` and output
/// gradient `dy` (stride `lddy`): writes `dx` (stride `lddx`) and adds into `dw` `[d]` (f32).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dev: &Device,
    x: &Act,
    ldx: usize,
    w: &CudaSlice<f32>,
    dy: &Act,
    lddy: usize,
    dx: &mut Act,
    lddx: usize,
    dw: &mut CudaSlice<f32>,
    d: usize,
    eps: f32,
    rows: usize,
) -> Result<()> {
    if rows == 0 || d == 0 {
        return Ok(());
    }
    if x.dtype() != dy.dtype() || x.dtype() != dx.dtype() || ldx < d || lddy < d || lddx < d {
        return Err(Error::Input(format!("rmsnorm_backward: dtypes or strides (d {d}, {ldx}/{lddy}/{lddx})")));
    }
    if w.len() < d || dw.len() < d {
        return Err(Error::Input(format!("rmsnorm_backward: w / dw shorter than d = {d}")));
    }
    x.check((rows - 1) * ldx + d, "rmsnorm_backward x")?;
    dy.check((rows - 1) * lddy + d, "rmsnorm_backward dy")?;
    dx.check((rows - 1) * lddx + d, "rmsnorm_backward dx")?;
    // `per` consecutive rows a block (about two blocks per SM), its column sums into one row of
    // `part`; then the partials into dw in block order: deterministic, no atomics (one launch
    // per row with d f32 atomics each was 8k-way contention on every dw element at 8k rows)
    let per = rows.div_ceil((2 * dev.sms).max(1));
    let blocks = rows.div_ceil(per);
    let part = crate::tensor::empty::<f32>(dev, blocks * d)?;
    let args = [
        KArg::Ptr(x.ptr(dev, 0)?),
        KArg::I32(int(ldx, "ldx")?),
        KArg::Ptr(dptr(dev, w, 0)?),
        KArg::Ptr(dy.ptr(dev, 0)?),
        KArg::I32(int(lddy, "lddy")?),
        KArg::Ptr(dx.ptr(dev, 0)?),
        KArg::I32(int(lddx, "lddx")?),
        KArg::Ptr(dptr(dev, &part, 0)?),
        KArg::I32(int(d, "d")?),
        KArg::F32(eps),
        KArg::I32(int(rows, "rows")?),
        KArg::I32(int(per, "rows per block")?),
    ];
    let k = pick(x.dtype(), "rmsnorm_bwd_f32", "rmsnorm_bwd_bf16");
    launch(dev, "train", k, (dim(blocks, "rmsnorm_backward blocks")?, 1, 1), 256, &args)?;
    let args = [
        KArg::Ptr(dptr(dev, &part, 0)?),
        KArg::I32(int(blocks, "blocks")?),
        KArg::I32(int(d, "d")?),
        KArg::Ptr(dptr(dev, dw, 0)?),
    ];
    launch(dev, "train", "rmsnorm_dw_reduce", (dim(d.div_ceil(256), "rmsnorm dw columns")?, 1, 1), 256, &args)
}

/// Backward of SwiGLU over fused gate|up rows `gu` `[rows, ld]`: from `da` `[rows, ldda]` writes
/// `dgu` `[rows, lddgu]` (the gate gradient in columns `[0, inter)`, the up gradient in
/// `[inter, 2·inter)`).
#[allow(clippy::too_many_arguments)]
pub fn swiglu_backward(
    dev: &Device,
    gu: &Act,
    ld: usize,
    da: &Act,
    ldda: usize,
    dgu: &mut Act,
    lddgu: usize,
    inter: usize,
    rows: usize,
) -> Result<()> {
    if rows == 0 || inter == 0 {
        return Ok(());
    }
    if gu.dtype() != da.dtype() || gu.dtype() != dgu.dtype() || ld < 2 * inter || ldda < inter || lddgu < 2 * inter {
        return Err(Error::Input(format!("swiglu_backward: dtypes or strides (inter {inter}, {ld}/{ldda}/{lddgu})")));
    }
    gu.check((rows - 1) * ld + 2 * inter, "swiglu_backward gu")?;
    da.check((rows - 1) * ldda + inter, "swiglu_backward da")?;
    dgu.check((rows - 1) * lddgu + 2 * inter, "swiglu_backward dgu")?;
    let args = [
        KArg::Ptr(gu.ptr(dev, 0)?),
        KArg::I32(int(ld, "ld")?),
        KArg::Ptr(da.ptr(dev, 0)?),
        KArg::I32(int(ldda, "ldda")?),
        KArg::Ptr(dgu.ptr(dev, 0)?),
        KArg::I32(int(lddgu, "lddgu")?),
        KArg::I32(int(inter, "inter")?),
        KArg::I32(int(rows, "rows")?),
    ];
    let k = pick(gu.dtype(), "swiglu_bwd_f32", "swiglu_bwd_bf16");
    launch(
        dev,
        "train",
        k,
        (dim(inter.div_ceil(256), "swiglu_backward")?, grid_y(rows, "swiglu_backward rows")?, 1),
        256,
        &args,
    )
}

/// The tokens of a batch grouped by id for [`embedding_backward`], built on the host. An id with
/// more than [`EMBED_CHUNK`] rows (a byte-level corpus's space: ~1k of 8k tokens) is summed in
/// chunks of that many rows first (their partial sums in a scratch buffer, then each id's partials
/// in order), so no thread walks a thousand rows alone: two launches instead of one, the same
/// fixed order every run.
pub struct EmbedRows {
    /// The kernel's table `[order [m], start [S + 1], id [S]]`: segment s lists the token rows
    /// `order[start[s] .. start[s + 1])` (token order) to add into row `id[s]`; with chunks, the
    /// chunks are the segments and `id` numbers them (rows of the scratch buffer).
    table: CudaSlice<i32>,
    /// Tokens the ids were given for (`dy` rows).
    tokens: usize,
    /// `m`: the tokens with an id in range.
    rows: usize,
    segments: usize,
    /// With chunks (then `segments` counts the chunks, `C`): the second pass's table (`order` =
    /// the chunks `0..C`, `start` each id's first chunk, `id` the ids) and the id count `S`.
    ids: Option<(CudaSlice<i32>, usize)>,
}

/// The most rows of one id summed by one thread in one pass of [`embedding_backward`].
pub const EMBED_CHUNK: usize = 32;

impl EmbedRows {
    /// The launches [`embedding_backward`] makes: 2 where an id has more than [`EMBED_CHUNK`]
    /// rows, else 1.
    pub fn passes(&self) -> usize {
        if self.ids.is_some() {
            2
        } else {
            1
        }
    }

    pub fn new(dev: &Device, ids: &[i32], vocab: usize) -> Result<EmbedRows> {
        let mut order: Vec<i32> = Vec::with_capacity(ids.len());
        for (t, &id) in ids.iter().enumerate() {
            if id >= 0 && (id as usize) < vocab {
                order.push(int(t, "token index")?);
            }
        }
        order.sort_by_key(|&t| ids[t as usize]); // stable: token order within an id
        let (mut start, mut seg_id) = (Vec::new(), Vec::new());
        for (i, &t) in order.iter().enumerate() {
            let id = ids[t as usize];
            if seg_id.last() != Some(&id) {
                start.push(int(i, "segment start")?);
                seg_id.push(id);
            }
        }
        start.push(int(order.len(), "segment end")?);
        let rows = order.len();
        let longest = start.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        let table = |mut order: Vec<i32>, start: &[i32], id: &[i32]| -> Result<CudaSlice<i32>> {
            order.extend_from_slice(start);
            order.extend_from_slice(id);
            crate::tensor::upload(dev, &order)
        };
        if longest <= EMBED_CHUNK {
            let segments = seg_id.len();
            return Ok(EmbedRows {
                table: table(order, &start, &seg_id)?,
                tokens: ids.len(),
                rows,
                segments,
                ids: None,
            });
        }
        // chunks of at most EMBED_CHUNK rows, never across ids; id s owns chunks
        // first[s] .. first[s + 1]
        let (mut cstart, mut first) = (Vec::new(), Vec::with_capacity(seg_id.len() + 1));
        for w in start.windows(2) {
            first.push(int(cstart.len(), "chunk index")?);
            cstart.extend((w[0]..w[1]).step_by(EMBED_CHUNK));
        }
        let chunks = cstart.len();
        first.push(int(chunks, "chunk count")?);
        cstart.push(int(rows, "segment end")?);
        let numbered: Vec<i32> = (0..int(chunks, "chunk count")?).collect();
        Ok(EmbedRows {
            table: table(order, &cstart, &numbered)?,
            tokens: ids.len(),
            rows,
            segments: chunks,
            ids: Some((table(numbered, &first, &seg_id)?, seg_id.len())),
        })
    }
}

/// Embedding backward: `dtable[ids[t], :] += dy[t, :]` for the tokens of `rows` (their ids
/// grouped on the host, [`EmbedRows`]; `dy` has a row per token, stride `lddy`), `dtable`
/// `[vocab, d]` f32. Each id's rows are summed in token order (in chunks of [`EMBED_CHUNK`] rows
/// for ids with more, then the chunks in order) and added once: deterministic, no atomics.
pub fn embedding_backward(
    dev: &Device,
    rows: &EmbedRows,
    dy: &Act,
    lddy: usize,
    dtable: &mut CudaSlice<f32>,
    vocab: usize,
    d: usize,
) -> Result<()> {
    if rows.segments == 0 || d == 0 {
        return Ok(());
    }
    if lddy < d || dtable.len() < vocab * d {
        return Err(Error::Input(format!("embedding_backward: lddy {lddy}, table [{vocab}, {d}]")));
    }
    dy.check((rows.tokens - 1) * lddy + d, "embedding_backward dy")?;
    match &rows.ids {
        None => embed_pass(dev, &rows.table, rows.rows, rows.segments, dy, lddy, dtable, d),
        Some((ids, segs)) => {
            // the chunks' sums into a zeroed scratch [C, d], then each id's chunks into the table
            let chunks = rows.segments;
            let mut part = crate::tensor::zeros::<f32>(dev, chunks * d)?;
            embed_pass(dev, &rows.table, rows.rows, chunks, dy, lddy, &mut part, d)?;
            embed_pass(dev, ids, chunks, *segs, &Act::F32(part), d, dtable, d)
        }
    }
}

/// One `embed_bwd` launch: `out[id[s], :] += Σ dy[order[start[s] .. start[s + 1]], :]` over the
/// `segs` segments of `table` (`m` rows).
#[allow(clippy::too_many_arguments)]
fn embed_pass(
    dev: &Device,
    table: &CudaSlice<i32>,
    m: usize,
    segs: usize,
    dy: &Act,
    lddy: usize,
    out: &mut CudaSlice<f32>,
    d: usize,
) -> Result<()> {
    let args = [
        KArg::Ptr(dptr(dev, table, 0)?),
        KArg::I32(int(m, "embedding rows")?),
        KArg::I32(int(segs, "embedding ids")?),
        KArg::Ptr(dy.ptr(dev, 0)?),
        KArg::I32(int(lddy, "lddy")?),
        KArg::Ptr(dptr(dev, out, 0)?),
        KArg::I32(int(d, "d")?),
    ];
    let k = pick(dy.dtype(), "embed_bwd_f32", "embed_bwd_bf16");
    launch(
        dev,
        "train",
        k,
        (dim(d.div_ceil(256), "embedding_backward")?, grid_y(segs, "embedding_backward ids")?, 1),
        256,
        &args,
    )
}

/// Softmax cross-entropy forward and backward (`dsv3_core::ops::loss::cross_entropy`) over `rows`
/// rows of logits `z` `[rows, ldz]` (`vocab` columns): writes `dz` (stride `lddz`; the dtype of
/// `z`, or bf16 from f32 logits: the f32 gradient rounded once, bit for bit what a cast of the f32
/// result gives, without its extra pass over the logits' size) and
/// `row_loss[r] = mask[r]·(lse − z[target])`; the loss is `Σ row_loss / denom`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    dev: &Device,
    z: &Act,
    ldz: usize,
    targets: &CudaSlice<i32>,
    mask: Option<&CudaSlice<f32>>,
    denom: f32,
    dz: &mut Act,
    lddz: usize,
    row_loss: &mut CudaSlice<f32>,
    vocab: usize,
    rows: usize,
) -> Result<()> {
    cross_entropy_with(dev, None, z, ldz, targets, mask, denom, dz, lddz, row_loss, vocab, rows)
}

/// [`cross_entropy`] with the row cached in shared memory (`Some(true)`; an error where it does
/// not fit), read three times from global memory (`Some(false)`), or as it picks (`None`: cached
/// where it fits). For the benchmarks' A/B.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cross_entropy_with(
    dev: &Device,
    cache: Option<bool>,
    z: &Act,
    ldz: usize,
    targets: &CudaSlice<i32>,
    mask: Option<&CudaSlice<f32>>,
    denom: f32,
    dz: &mut Act,
    lddz: usize,
    row_loss: &mut CudaSlice<f32>,
    vocab: usize,
    rows: usize,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    // the row cached in shared memory (in the logits' dtype) where it fits (one read of the
    // logits instead of three); the static shared memory of the block reductions comes on top
    let row_bytes = vocab * z.dtype().size();
    let fits = row_bytes + 1024 <= max_smem_optin(dev);
    if cache == Some(true) && !fits {
        return Err(Error::Unsupported(format!("cross_entropy: a {vocab}-column row does not fit shared memory")));
    }
    let cache = cache.unwrap_or(fits);
    let k = match (z.dtype(), dz.dtype(), cache) {
        (DType::F32, DType::F32, false) => "cross_entropy_f32",
        (DType::Bf16, DType::Bf16, false) => "cross_entropy_bf16",
        (DType::F32, DType::Bf16, false) => "cross_entropy_f32_bf16",
        (DType::F32, DType::F32, true) => "cross_entropy_smem_f32",
        (DType::Bf16, DType::Bf16, true) => "cross_entropy_smem_bf16",
        (DType::F32, DType::Bf16, true) => "cross_entropy_smem_f32_bf16",
        (DType::Bf16, DType::F32, _) => {
            return Err(Error::Input("cross_entropy: bf16 logits with an f32 gradient".into()));
        }
    };
    if vocab == 0 || ldz < vocab || lddz < vocab {
        return Err(Error::Input(format!("cross_entropy: dtypes or strides (vocab {vocab}, {ldz}/{lddz})")));
    }
    if targets.len() < rows || row_loss.len() < rows || mask.is_some_and(|m| m.len() < rows) {
        return Err(Error::Input(format!("cross_entropy: targets / mask / row_loss shorter than {rows} rows")));
    }
    z.check((rows - 1) * ldz + vocab, "cross_entropy z")?;
    dz.check((rows - 1) * lddz + vocab, "cross_entropy dz")?;
    let args = [
        KArg::Ptr(z.ptr(dev, 0)?),
        KArg::I32(int(ldz, "ldz")?),
        KArg::Ptr(dptr(dev, targets, 0)?),
        KArg::Ptr(match mask {
            Some(m) => dptr(dev, m, 0)?,
            None => 0,
        }),
        KArg::F32(denom),
        KArg::Ptr(dz.ptr(dev, 0)?),
        KArg::I32(int(lddz, "lddz")?),
        KArg::Ptr(dptr(dev, row_loss, 0)?),
        KArg::I32(int(vocab, "vocab")?),
        KArg::I32(int(rows, "rows")?),
    ];
    let grid = (dim(rows, "cross_entropy rows")?, 1, 1);
    if cache {
        launch_smem(dev, "train", k, grid, 1024, row_bytes as u32, &args)
    } else {
        launch(dev, "train", k, grid, 256, &args)
    }
}

/// Causal attention probabilities for training, in place: `mats` score matrices `[t, t]` (row
/// stride `ld`, matrix stride `mstride`, f32) become `P[i, u] = softmax_u(scale·S[i, u])` over
/// `u <= i`, 0 above the diagonal (`dsv3_core::model::mla::Mla::forward_train`).
pub fn attn_softmax_causal(
    dev: &Device,
    s: &mut CudaSlice<f32>,
    mats: usize,
    t: usize,
    ld: usize,
    mstride: usize,
    scale: f32,
) -> Result<()> {
    if mats == 0 || t == 0 {
        return Ok(());
    }
    attn_check(s.len(), mats, t, ld, mstride, "attn_softmax_causal")?;
    launch(
        dev,
        "train",
        "attn_softmax_causal_f32",
        (dim(t, "attn_softmax_causal rows")?, grid_y(mats, "attn_softmax_causal matrices")?, 1),
        128,
        &[
            KArg::Ptr(dptr(dev, s, 0)?),
            KArg::I32(int(t, "t")?),
            KArg::I32(int(ld, "ld")?),
            KArg::I64(mstride as i64),
            KArg::I32(int(mats, "mats")?),
            KArg::F32(scale),
        ],
    )
}

/// Backward of [`attn_softmax_causal`] (softmax backward, then `× scale`), in place over the
/// probabilities' gradient: `dP[i, u] ← scale·P[i, u]·(dP[i, u] − Σ_v P[i, v]·dP[i, v])`.
#[allow(clippy::too_many_arguments)]
pub fn attn_softmax_backward(
    dev: &Device,
    p: &CudaSlice<f32>,
    dp: &mut CudaSlice<f32>,
    mats: usize,
    t: usize,
    ld: usize,
    mstride: usize,
    scale: f32,
) -> Result<()> {
    if mats == 0 || t == 0 {
        return Ok(());
    }
    attn_check(p.len().min(dp.len()), mats, t, ld, mstride, "attn_softmax_backward")?;
    launch(
        dev,
        "train",
        "attn_softmax_bwd_f32",
        (dim(t, "attn_softmax_backward rows")?, grid_y(mats, "attn_softmax_backward matrices")?, 1),
        128,
        &[
            KArg::Ptr(dptr(dev, p, 0)?),
            KArg::Ptr(dptr(dev, dp, 0)?),
            KArg::I32(int(t, "t")?),
            KArg::I32(int(ld, "ld")?),
            KArg::I64(mstride as i64),
            KArg::I32(int(mats, "mats")?),
            KArg::F32(scale),
        ],
    )
}

fn attn_check(len: usize, mats: usize, t: usize, ld: usize, mstride: usize, what: &str) -> Result<()> {
    if ld < t || (mats > 1 && mstride < (t - 1) * ld + t) {
        return Err(Error::Input(format!("{what}: strides (t {t}, ld {ld}, matrix stride {mstride})")));
    }
    if len < (mats - 1) * mstride + (t - 1) * ld + t {
        return Err(Error::Input(format!("{what}: buffer of {len} shorter than {mats} matrices of {t}x{t}")));
    }
    Ok(())
}
