//! [`CudaSession`]: up to `slots` sequences with a device latent cache per layer
//! (`[slots, max_len, C + dr]`), fed `(slot, new tokens)` pairs like `dsv3_core::infer::Session`:
//! one batched forward per step, prefill and decode alike, no host round trip between layers.
use super::weights::{DFfn, DLinear, DMla, DMlp, DQ};
use super::CudaModel;
use crate::device::{cuda_err, Device};
use crate::ops::gemm::{gemm, gemm_via, runs_skinny, GemmPath, GemmShape, Grouped, SKINNY_MAX_M};
use crate::ops::mla::{MlaCall, MlaWork};
use crate::ops::{attn, elementwise, gather, mla, moe, norm, sampling};
use crate::tensor::{upload, zeros, Act, DType};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice};
use dsv3_core::{Error, Result};

/// Sequences in flight on the device.
///
/// Decode steps (one new token per sequence) are captured into a CUDA graph per batch size the
/// second time that batch size is seen, and replayed from then on: the step's row metadata goes
/// into the graph's fixed buffers, one graph launch runs every layer and the head, one copy
/// brings the logits back. `DSV3_CUDA_GRAPH=0` turns this off (every step launches its kernels).
pub struct CudaSession<'m> {
    pub model: &'m CudaModel,
    /// Per layer `[slots, max_len, C + dr]`.
    caches: Vec<Act>,
    lens: Vec<usize>,
    slots: usize,
    max_len: usize,
    use_graphs: bool,
    /// Captured decode steps by batch size, and how often each batch size ran uncaptured.
    graphs: std::collections::HashMap<usize, DecodeGraph>,
    seen: std::collections::HashMap<usize, u32>,
    /// Which prefill rows take the flash attention path.
    flash: Flash,
}

/// Which rows of a step run the flash prefill attention (MHA form: the slot's cached latents
/// decompressed with `kv_b_proj`, then `ops::attn`) instead of the absorbed kernels. Decode rows
/// (one new token of a slot) and the f32 mode always run the absorbed kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flash {
    /// Never (`DSV3_FLASH=0`).
    Off,
    /// The default: slots with more than one new token where the MHA form needs fewer FLOPs
    /// than the absorbed one ([`flash_wins`]; every fresh prefill, chunks long enough against
    /// their cached prefix).
    Auto,
    /// Every slot with more than one new token (`DSV3_FLASH=1`).
    Always,
}

/// The session's default [`Flash`] from `DSV3_FLASH` (`0` off, `1` always, else auto).
fn flash_default() -> Flash {
    match std::env::var("DSV3_FLASH").as_deref() {
        Ok("0") => Flash::Off,
        Ok("1") => Flash::Always,
        _ => Flash::Auto,
    }
}

/// The most bytes of decompressed keys/values (`[keys, H·(dn+dv)]` bf16) the flash path holds
/// at once: slots are decompressed and attended in groups under it, and a slot alone above it
/// runs the absorbed kernels (V3: 32K cached + new tokens; 88M: 1M).
pub const FLASH_KV_BYTES: usize = 2 << 30;

/// Whether the MHA form (decompress the `p0 + nq` cached latents, `2·C·(dn+dv)` FLOPs per key
/// and head, then `2·(dk+dv)` per (query, key) pair) takes fewer FLOPs than the absorbed one
/// (`q_nope·W_UK` and `ō·W_UVᵀ`, `2·C·(dn+dv)` per query and head, then `2·(2C+dr)` per pair)
/// for `nq` new tokens after `p0` cached ones: `p0·C·(dn+dv) <= pairs·(2C + dr - dk - dv)`.
/// True for a fresh prefill wherever `2C > dn + dv` (V3: 3.4x fewer per pair, the 88M model 1.8x;
/// not v3_tiny's test config, C = 16 with dn + dv = 64); a chunk over a
/// long prefix needs about `C·(dn+dv) / (2C + dr - dk - dv)` tokens (V3: 171, 88M: 128).
pub fn flash_wins(c: &dsv3_core::Config, p0: usize, nq: usize) -> bool {
    let (ck, dn, dr, dv) = (c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim);
    let pairs = (nq * p0 + nq * (nq + 1) / 2) as f64;
    let gain = (2 * ck + dr) as f64 - (dn + dr + dv) as f64;
    (p0 * ck * (dn + dv)) as f64 <= pairs * gain
}

/// A captured decode step for `n` sequences: its fixed row buffers, logits `[n, V]` f32 and
/// their greedy choices `[n]`, and the device sampler's buffers when it was captured with one.
struct DecodeGraph {
    graph: CudaGraph,
    rows: Rows,
    logits: CudaSlice<f32>,
    greedy: CudaSlice<i32>,
    sample: Option<super::sample::SampleBufs>,
}

/// What a step brings back to the host.
#[derive(Clone, Copy)]
pub(super) enum Want<'a> {
    Logits,
    Greedy,
    /// Tokens from the device sampler, with these encoded per-row parameters (super::sample).
    Sample(&'a [f32]),
}

/// A step's result on the host.
pub(super) enum Out {
    Logits(Vec<f32>),
    Greedy(Vec<u32>),
    /// The sampler's `[n, 2]` (token, status), and the logits when a row needs the host.
    Sampled(Vec<i32>, Option<Vec<f32>>),
}

/// Whether decode steps are captured into CUDA graphs (`DSV3_CUDA_GRAPH=0` turns it off).
pub fn graphs_enabled() -> bool {
    std::env::var("DSV3_CUDA_GRAPH").map_or(true, |v| v != "0")
}

/// Whether the decode-path fusions are on (read once; `DSV3_FUSE=0` restores the unfused
/// kernels, for A/B timing and as a fallback): RMSNorms folded into the GEMMs that read them,
/// SwiGLU in the gate|up GEMM, the MoE dispatch gather in the routed gate|up GEMM, the router
/// GEMM in the routing kernel, the MoE combine in the routed down GEMM and `mla_prep` in q_b.
/// Each applies where the GEMM runs in the skinny kernels (few rows: decode); prefill keeps the
/// unfused path.
pub fn fuse_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DSV3_FUSE").map_or(true, |v| v != "0"))
}

/// The rows a norm's consumers read: normalized (`Normed`), or the residual stream with the
/// RMSNorm `(weight, eps)` folded into each consuming GEMM (the skinny kernels' `norm`).
#[derive(Clone, Copy)]
enum In<'a> {
    Normed(&'a Act),
    Fold(&'a Act, &'a CudaSlice<f32>, f32),
}

impl<'a> In<'a> {
    fn act(self) -> &'a Act {
        match self {
            In::Normed(a) | In::Fold(a, ..) => a,
        }
    }

    fn norm(self) -> Option<(&'a CudaSlice<f32>, f32)> {
        match self {
            In::Normed(_) => None,
            In::Fold(_, w, eps) => Some((w, eps)),
        }
    }
}

/// `norm(x)` (`[n, D]`, weight `w`) into the scratch rows `h`, allocated on first use.
fn normalize<'h>(m: &CudaModel, x: &mut Act, w: &CudaSlice<f32>, n: usize, h: &'h mut Option<Act>) -> Result<&'h Act> {
    let d = m.cfg.hidden_size;
    if h.is_none() {
        *h = Some(Act::empty(&m.dev, m.dtype, n * d)?);
    }
    let hb = h.as_mut().expect("allocated above");
    norm::rmsnorm(&m.dev, x, 0, d, Some((&mut *hb, 0, d)), w, d, m.eps, n)?;
    Ok(hb)
}

/// Per-step row metadata on the device.
struct Rows {
    ids: CudaSlice<i32>,
    pos: CudaSlice<i32>,
    slot: CudaSlice<i32>,
    len: CudaSlice<i32>,
    n: usize,
    /// Longest visible cache of any row.
    max_visible: usize,
    /// The step's input pairs on the host, in row order (empty in a captured decode).
    segs: Vec<RowSeg>,
}

/// One input pair of a step: its slot, tokens cached before the step, new tokens, first row.
#[derive(Debug, Clone, Copy)]
struct RowSeg {
    slot: usize,
    p0: usize,
    nq: usize,
    row0: usize,
}

impl<'m> CudaSession<'m> {
    /// A session of `slots` empty sequences, each up to `max_len` tokens.
    pub fn new(model: &'m CudaModel, slots: usize, max_len: usize) -> Result<CudaSession<'m>> {
        if slots == 0 || max_len == 0 {
            return Err(Error::Input("a CUDA session needs slots >= 1 and max_len >= 1".into()));
        }
        let w = model.cfg.kv_lora_rank + model.cfg.qk_rope_head_dim;
        let caches = (0..model.layers.len())
            .map(|_| Act::zeros(&model.dev, model.dtype, slots * max_len * w))
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaSession {
            model,
            caches,
            lens: vec![0; slots],
            slots,
            max_len,
            use_graphs: graphs_enabled(),
            graphs: Default::default(),
            seen: Default::default(),
            flash: flash_default(),
        })
    }

    /// Which prefill rows run the flash attention path (default from `DSV3_FLASH`).
    pub fn set_flash(&mut self, f: Flash) {
        self.flash = f;
    }

    /// The current [`Flash`] setting.
    pub fn flash(&self) -> Flash {
        self.flash
    }

    /// Tokens cached for slot `s`.
    pub fn len(&self, s: usize) -> usize {
        self.lens.get(s).copied().unwrap_or(0)
    }

    /// Whether slot `s` holds no tokens.
    pub fn is_empty(&self, s: usize) -> bool {
        self.len(s) == 0
    }

    /// Forgets slot `s`.
    pub fn reset(&mut self, s: usize) -> Result<()> {
        let n = self.slots;
        *self.lens.get_mut(s).ok_or_else(|| Error::Input(format!("slot {s} out of range ({n})")))? = 0;
        Ok(())
    }

    /// Keeps the first `len` tokens of slot `s` (their cache entries stay valid; later ones are
    /// overwritten by the next steps). `len` past the slot's length is an error.
    pub fn truncate(&mut self, s: usize, len: usize) -> Result<()> {
        let n = self.slots;
        let cur = self.lens.get_mut(s).ok_or_else(|| Error::Input(format!("slot {s} out of range ({n})")))?;
        if len > *cur {
            return Err(Error::Input(format!("slot {s} holds {} tokens: cannot truncate to {len}", *cur)));
        }
        *cur = len;
        Ok(())
    }

    /// Bytes of latent cache on the device.
    pub fn cache_bytes(&self) -> usize {
        self.caches.iter().map(|c| c.len() * c.dtype().size()).sum()
    }

    /// Feeds `(slot, new tokens)` pairs; returns the logits of the last new token of each pair,
    /// `[pairs, V]` (as `Session::step`). On an input error no cache is changed.
    pub fn step(&mut self, inputs: &[(usize, &[u32])]) -> Result<Vec<f32>> {
        match self.step_to(inputs, Want::Logits)? {
            Out::Logits(l) => Ok(l),
            _ => unreachable!("asked for logits"),
        }
    }

    /// Like [`CudaSession::step`] but returns the greedy (argmax, lowest id on ties) next token
    /// of each pair, chosen on the device: only the ids cross back to the host.
    pub fn step_greedy(&mut self, inputs: &[(usize, &[u32])]) -> Result<Vec<u32>> {
        match self.step_to(inputs, Want::Greedy)? {
            Out::Greedy(t) => Ok(t),
            _ => unreachable!("asked for tokens"),
        }
    }

    pub(super) fn step_to(&mut self, inputs: &[(usize, &[u32])], want: Want) -> Result<Out> {
        if self.use_graphs && inputs.iter().all(|(_, t)| t.len() == 1) {
            self.check(inputs)?;
            let n = inputs.len();
            let count = self.seen.entry(n).or_insert(0);
            if self.graphs.contains_key(&n) || *count >= 1 {
                return self.decode_graphed(inputs, want);
            }
            *count += 1;
        }
        let (mut x, rows) = self.forward(inputs)?;
        let mut last = Vec::with_capacity(inputs.len());
        let mut end = 0;
        for (_, t) in inputs {
            end += t.len();
            last.push((end - 1) as i32);
        }
        let dev = &*self.model.dev;
        let v = self.model.cfg.vocab_size;
        let ids = upload(dev, &last)?;
        let mut out = Act::F32(crate::tensor::empty::<f32>(dev, last.len() * v)?);
        self.head(&mut x, rows.n, Some((&ids, last.len())), &mut out)?;
        let Act::F32(logits) = out else { unreachable!("allocated as f32") };
        match want {
            Want::Logits => Ok(Out::Logits(crate::tensor::download(dev, &logits)?)),
            Want::Greedy => {
                let mut g = crate::tensor::empty::<i32>(dev, last.len())?;
                sampling::argmax_rows(dev, &logits, last.len(), v, &mut g)?;
                Ok(Out::Greedy(greedy_ids(&crate::tensor::download(dev, &g)?, v)?))
            }
            Want::Sample(prm) => super::sample::sample_now(dev, &logits, last.len(), v, prm),
        }
    }

    /// Like [`CudaSession::step`] but the logits of every new token, `[Σ len, V]`.
    pub fn step_all(&mut self, inputs: &[(usize, &[u32])]) -> Result<Vec<f32>> {
        let (mut x, rows) = self.forward(inputs)?;
        let dev = &*self.model.dev;
        let mut out = Act::F32(crate::tensor::empty::<f32>(dev, rows.n * self.model.cfg.vocab_size)?);
        self.head(&mut x, rows.n, None, &mut out)?;
        out.to_f32(dev)
    }

    fn check(&self, inputs: &[(usize, &[u32])]) -> Result<()> {
        let mut seen = vec![false; self.slots];
        for &(s, t) in inputs {
            if s >= self.slots {
                return Err(Error::Input(format!("slot {s} out of range (session has {})", self.slots)));
            }
            if std::mem::replace(&mut seen[s], true) {
                return Err(Error::Input(format!("slot {s} appears twice in one step")));
            }
            if t.is_empty() {
                return Err(Error::Input(format!("no tokens given for slot {s}")));
            }
            if self.lens[s] + t.len() > self.max_len {
                return Err(Error::Input(format!(
                    "slot {s}: {} cached + {} new tokens exceed the session's max_len {}",
                    self.lens[s],
                    t.len(),
                    self.max_len
                )));
            }
            if let Some(&bad) = t.iter().find(|&&v| v as usize >= self.model.cfg.vocab_size) {
                return Err(Error::Input(format!(
                    "token id {bad} is out of range (vocab_size {})",
                    self.model.cfg.vocab_size
                )));
            }
        }
        if inputs.is_empty() {
            return Err(Error::Input("a step needs at least one sequence".into()));
        }
        Ok(())
    }

    /// Host row metadata of a step: token ids, positions, slots, visible lengths.
    fn host_rows(&self, inputs: &[(usize, &[u32])]) -> [Vec<i32>; 4] {
        let (mut ids, mut pos, mut slot, mut len) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &(s, t) in inputs {
            for (i, &tok) in t.iter().enumerate() {
                ids.push(tok as i32);
                pos.push((self.lens[s] + i) as i32);
                slot.push(s as i32);
                len.push((self.lens[s] + i + 1) as i32);
            }
        }
        [ids, pos, slot, len]
    }

    fn rows(&self, inputs: &[(usize, &[u32])]) -> Result<Rows> {
        let dev = &self.model.dev;
        let [ids, pos, slot, len] = self.host_rows(inputs);
        let max_visible = len.iter().copied().max().unwrap_or(0) as usize;
        let mut segs = Vec::with_capacity(inputs.len());
        let mut row0 = 0;
        for &(slot, t) in inputs {
            segs.push(RowSeg { slot, p0: self.lens[slot], nq: t.len(), row0 });
            row0 += t.len();
        }
        Ok(Rows {
            n: ids.len(),
            ids: upload(dev, &ids)?,
            pos: upload(dev, &pos)?,
            slot: upload(dev, &slot)?,
            len: upload(dev, &len)?,
            max_visible,
            segs,
        })
    }

    /// Runs the layers over the new tokens; returns the residual stream `[N, D]` (before the
    /// final norm) and the rows. The caches are appended to.
    fn forward(&mut self, inputs: &[(usize, &[u32])]) -> Result<(Act, Rows)> {
        self.check(inputs)?;
        let rows = self.rows(inputs)?;
        let x = self.layers(&rows)?;
        for &(s, t) in inputs {
            self.lens[s] += t.len();
        }
        Ok((x, rows))
    }

    /// A decode step through the captured graph for `inputs.len()` sequences (capturing it
    /// first if this batch size has none yet). `inputs` are checked, one token each.
    fn decode_graphed(&mut self, inputs: &[(usize, &[u32])], want: Want) -> Result<Out> {
        let dev = self.model.dev.clone();
        let n = inputs.len();
        let host = self.host_rows(inputs);
        let sample = matches!(want, Want::Sample(_));
        if self.graphs.get(&n).is_none_or(|g| sample && g.sample.is_none()) {
            let g = self.capture(n, sample)?;
            self.graphs.insert(n, g);
        }
        let g = self.graphs.get_mut(&n).expect("inserted above");
        for (buf, v) in [&mut g.rows.ids, &mut g.rows.pos, &mut g.rows.slot, &mut g.rows.len].into_iter().zip(&host) {
            dev.stream.memcpy_htod(&v[..], buf).map_err(|e| cuda_err("uploading decode rows", e))?;
        }
        if let (Want::Sample(prm), Some(b)) = (want, &mut g.sample) {
            b.upload(&dev, prm)?;
        }
        let mark = crate::profile::start(&dev)?;
        g.graph.launch().map_err(|e| cuda_err("launching the decode graph", e))?;
        crate::profile::finish(&dev, mark, || format!("decode graph ({n} sequences)").into())?;
        let out = match want {
            Want::Logits => {
                Out::Logits(dev.stream.clone_dtoh(&g.logits).map_err(|e| cuda_err("downloading logits", e))?)
            }
            Want::Greedy => {
                let ids = dev.stream.clone_dtoh(&g.greedy).map_err(|e| cuda_err("downloading tokens", e))?;
                Out::Greedy(greedy_ids(&ids, self.model.cfg.vocab_size)?)
            }
            Want::Sample(_) => {
                let b = g.sample.as_ref().expect("captured with the sampler above");
                b.finish(&dev, &g.logits, n)?
            }
        };
        for &(s, _) in inputs {
            self.lens[s] += 1;
        }
        Ok(out)
    }

    /// Captures a decode step of `n` rows (all layers and the head) into a graph over fixed
    /// row buffers. Attention splits depend on `max_len`, not on the step's lengths, so one
    /// graph serves every step; temporaries are allocated and freed inside the graph.
    fn capture(&mut self, n: usize, sample: bool) -> Result<DecodeGraph> {
        let dev = self.model.dev.clone();
        let v = self.model.cfg.vocab_size;
        let rows = Rows {
            ids: zeros(&dev, n)?,
            pos: zeros(&dev, n)?,
            slot: zeros(&dev, n)?,
            len: zeros(&dev, n)?,
            n,
            max_visible: self.max_len,
            segs: Vec::new(),
        };
        let mut out = Act::F32(zeros::<f32>(&dev, n * v)?);
        let mut greedy = zeros::<i32>(&dev, n)?;
        let mut sampler = if sample { Some(super::sample::SampleBufs::new(&dev, n, v)?) } else { None };
        dev.sync()?;
        dev.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| cuda_err("beginning a graph capture", e))?;
        let recorded = self.layers(&rows).and_then(|mut x| {
            self.head(&mut x, n, None, &mut out)?;
            let Act::F32(l) = &out else { unreachable!("allocated as f32") };
            sampling::argmax_rows(&dev, l, n, v, &mut greedy)?;
            sampler.as_mut().map_or(Ok(()), |b| b.launch(&dev, l, n, v))
        });
        // end the capture whatever happened, so the stream is usable again
        let graph = dev.stream.end_capture(CUgraphInstantiate_flags(0));
        recorded?;
        let graph = graph
            .map_err(|e| cuda_err("instantiating the decode graph", e))?
            .ok_or_else(|| Error::Io("CUDA: the decode capture recorded nothing".into()))?;
        let Act::F32(logits) = out else { unreachable!("allocated as f32") };
        Ok(DecodeGraph { graph, rows, logits, greedy, sample: sampler })
    }

    /// Runs the layers over `rows` (the caches are appended to); returns the residual stream
    /// `[N, D]` before the final norm.
    fn layers(&mut self, rows: &Rows) -> Result<Act> {
        let m = self.model;
        let dev = &*m.dev;
        let (n, d, dt) = (rows.n, m.cfg.hidden_size, m.dtype);
        let mut x = Act::empty(dev, dt, n * d)?;
        gather::gather_rows(dev, &m.embed, m.cfg.vocab_size, d, &rows.ids, n, d, &mut x, d)?;
        // normalized rows for the norms that are not folded into their GEMMs
        let mut h = None;
        for (l, layer) in m.layers.iter().enumerate() {
            self.attention(l, &mut h, rows, &mut x)?;
            match &layer.ffn {
                DFfn::Dense(mlp) => dense_forward(m, mlp, &layer.post_norm, &mut h, n, &mut x)?,
                DFfn::Moe { router, bias, cfg, experts, shared } => moe_forward(
                    m,
                    (router, bias.as_ref(), cfg),
                    experts,
                    shared.as_ref(),
                    &layer.post_norm,
                    &mut h,
                    n,
                    &mut x,
                )?,
            }
        }
        Ok(x)
    }

    /// Whether layer `l`'s first attention GEMMs (q_a|kv_a, or q_a / q and kv_a; the folded
    /// query projection when `absorb`) all take its input norm folded in for `n` rows.
    fn attention_folds(&self, l: usize, n: usize, absorb: bool) -> bool {
        let m = self.model;
        let layer = &m.layers[l];
        let a = &layer.attn;
        let ok = |lin: &DLinear| {
            let s = GemmShape {
                bias: lin.bias.as_ref(),
                norm: Some((&layer.input_norm, m.eps)),
                ..GemmShape::plain(n, lin.w.k, lin.w.n)
            };
            runs_skinny(&m.dev, m.dtype, &lin.w, m.dtype, &s, GemmPath::Auto)
        };
        let kv_ok = || a.kv_a.as_ref().is_some_and(ok);
        match &a.q {
            DQ::Lora { a: qa, fused_kv, .. } => ok(qa) && (*fused_kv || kv_ok()),
            DQ::Plain(p) => ok(q_last(a, p, absorb)) && kv_ok(),
        }
    }

    /// Layer `l`'s query and compressed-kv projections of `hn` (`n` rows): the queries
    /// `[N, H·dq]` (with `absorb`, [`super::weights::DAbsorbed::q`]'s `[N, H·C + H·dr]`) and the buffer holding
    /// the kv rows `(buffer, offset, row stride)`. With a LoRA, one GEMM writes q_a ‖ kv_a side
    /// by side (the kv rows then lie in that buffer), and q_a's RMSNorm folds into q_b where that
    /// GEMM runs skinny.
    ///
    /// Where q_b runs skinny with the norm folded, the GEMM is left to the caller (`Some` last:
    /// [`QbPending`]), which runs it with `mla_prep` fused in where it can; `q` is then unwritten.
    fn project(
        &self,
        l: usize,
        hn: In,
        n: usize,
        absorb: bool,
    ) -> Result<(Act, Act, usize, usize, Option<QbPending<'m>>)> {
        let m = self.model;
        let dev = &*m.dev;
        let c = &m.cfg;
        let a = &m.layers[l].attn;
        let (h, dq, w) =
            (c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim, c.kv_lora_rank + c.qk_rope_head_dim);
        let dt = m.dtype;
        let qw = if absorb { h * w } else { h * dq }; // folded: H·(C + dr)
        let mut q = Act::empty(dev, dt, n * qw)?;
        let kv_proj = || -> Result<Act> {
            let kv = a.kv_a.as_ref().ok_or_else(|| Error::Io("MLA layer without kv_a".into()))?;
            let mut ckv = Act::empty(dev, dt, n * w)?;
            linear_in(m, kv, hn, n, &mut ckv)?;
            Ok(ckv)
        };
        match &a.q {
            DQ::Lora { a: qa_l, rank: rq, fused_kv, norm: qn, b } => {
                let (rq, b) = (*rq, q_last(a, b, absorb));
                let width = qa_l.w.n; // rq, or rq + w when fused
                let mut qa = Act::empty(dev, dt, n * width)?;
                linear_in(m, qa_l, hn, n, &mut qa)?;
                let ckv = if *fused_kv { None } else { Some(kv_proj()?) };
                // q_b reads the q_a part of each row ([:rq] of `width`)
                let sb = || GemmShape { lda: width, bias: b.bias.as_ref(), ..GemmShape::plain(n, rq, b.w.n) };
                let sf = GemmShape { norm: Some((qn, m.lora_eps)), ..sb() };
                if fuse_enabled() && runs_skinny(dev, dt, &b.w, dt, &sf, GemmPath::Auto) {
                    // the caller runs q_b (norm folded), with mla_prep where it can
                    return Ok(match ckv {
                        Some(ckv) => (q, ckv, 0, w, Some(QbPending { qa: Some(qa), w: &b.w, shape: sf })),
                        None => (q, qa, rq, width, Some(QbPending { qa: None, w: &b.w, shape: sf })),
                    });
                }
                norm::rmsnorm(dev, &mut qa, 0, width, None, qn, rq, m.lora_eps, n)?;
                gemm(dev, &qa, &b.w, &mut q, &sb())?;
                Ok(match ckv {
                    Some(ckv) => (q, ckv, 0, w, None),
                    None => (q, qa, rq, width, None),
                })
            }
            DQ::Plain(p) => {
                linear_in(m, q_last(a, p, absorb), hn, n, &mut q)?;
                Ok((q, kv_proj()?, 0, w, None))
            }
        }
    }

    /// `x += o_proj(MLA(input_norm(x)))` for layer `l`, appending the new latents to its cache;
    /// `hs` is the scratch for normalized rows (unused when the norm folds into the projections).
    fn attention(&mut self, l: usize, hs: &mut Option<Act>, rows: &Rows, x: &mut Act) -> Result<()> {
        let m = self.model;
        let dev = &*m.dev;
        let c = &m.cfg;
        let a = &m.layers[l].attn;
        let (n, h, dn, dr, dv, ck) =
            (rows.n, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let dq = dn + dr;
        let dt = m.dtype;
        // the step's rows on the flash path; without any, decode-sized steps run the folded
        // projections where the layer has them (DAbsorbed: no W_UK / W_UV products)
        let flash = self.flash_segments(rows);
        let absorb = flash.is_empty() && n <= SKINNY_MAX_M && a.absorbed.is_some();
        // queries [N, H·dq] (folded: [N, H·C + H·dr]) and the compressed kv (latent ‖ k_pe,
        // normalized and rotated by mla_prep), the input norm folded into the projections when
        // they run skinny
        let input_norm = &m.layers[l].input_norm;
        let hn = if fuse_enabled() && self.attention_folds(l, n, absorb) {
            In::Fold(&*x, input_norm, m.eps)
        } else {
            In::Normed(normalize(m, x, input_norm, n, hs)?)
        };
        let (mut q, ckv_buf, ckv_off, ld_ckv, pending) = self.project(l, hn, n, absorb)?;
        // the rope part of head h: at h·dq + dn, or after all the absorbed queries (h·dr + H·C)
        let (ld_q, hs_q, q_off) = if absorb { (h * (ck + dr), dr, h * ck) } else { (h * dq, dq, dn) };
        let prep = mla::Prep {
            n,
            c: ck,
            dr,
            h,
            ckv: &ckv_buf,
            ckv_off,
            ld_ckv,
            kv_norm: &a.kv_norm,
            eps: m.lora_eps,
            ld_q,
            hs_q,
            q_off,
            pos: &rows.pos,
            slot: &rows.slot,
            inv_freq: &m.inv_freq,
            attention_factor: m.attention_factor,
            max_len: self.max_len,
        };
        match &pending {
            // q_b (its norm folded) with mla_prep in the same launch where it runs in the
            // 8-row skinny kernels, else the two launches
            Some(qb) => {
                let qa = qb.qa.as_ref().unwrap_or(&ckv_buf);
                if mla::fused_prep() && mla::gemm_prep_runs(dev, dt, qb.w, &qb.shape, &prep) {
                    mla::gemm_prep(dev, qa, qb.w, &qb.shape, &prep, &mut q, &mut self.caches[l])?;
                } else {
                    gemm(dev, qa, qb.w, &mut q, &qb.shape)?;
                    mla::mla_prep(dev, &prep, &mut q, &mut self.caches[l])?;
                }
            }
            None => mla::mla_prep(dev, &prep, &mut q, &mut self.caches[l])?,
        }
        // O [N, H·dv]: the flash path for the prefill slots it takes, the absorbed kernels for
        // the other rows (where both run in one step, the flash rows attend to nothing in the
        // absorbed kernels, row_len 0, and their output rows are overwritten by the flash kernel);
        // folded, the attention's latent output ō [N, H·C] straight into the folded o_proj
        if absorb {
            let a = a.absorbed.as_ref().expect("checked above");
            let ob = self.absorbed(l, &q, rows, &rows.len, true)?;
            return linear(m, &a.o, &ob, n, x, true);
        }
        let flash_rows: usize = flash.iter().map(|s| s.nq).sum();
        let mut oh = if flash_rows == n {
            Act::empty(dev, dt, n * h * dv)?
        } else if flash.is_empty() {
            self.absorbed(l, &q, rows, &rows.len, false)?
        } else {
            let mut len = Vec::with_capacity(n);
            for sg in &rows.segs {
                let on = flash.iter().any(|f| f.row0 == sg.row0);
                len.extend((0..sg.nq).map(|i| if on { 0 } else { (sg.p0 + i + 1) as i32 }));
            }
            self.absorbed(l, &q, rows, &upload(dev, &len)?, false)?
        };
        if !flash.is_empty() {
            self.flash_prefill(l, &q, &flash, &mut oh)?;
        }
        linear(m, &a.o, &oh, n, x, true)
    }

    /// The absorbed attention of layer `l` for every row (`row_len` visible entries each; the
    /// queries `q` `[N, H·dq]` already rotated and the new latents cached): `q̃ = q_nope·W_UK`,
    /// the MLA decode kernels over the latent cache, `O = ō·W_UVᵀ` -> `[N, H·dv]`. `folded`: `q`
    /// is [`super::weights::DAbsorbed::q`]'s `[N, H·C + H·dr]` (q̃ already), and the result is `ō` `[N, H·C]`.
    fn absorbed(&self, l: usize, q: &Act, rows: &Rows, row_len: &CudaSlice<i32>, folded: bool) -> Result<Act> {
        let m = self.model;
        let dev = &*m.dev;
        let c = &m.cfg;
        let a = &m.layers[l].attn;
        let (n, h, dn, dr, dv, ck) =
            (rows.n, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let dq = dn + dr;
        let dt = m.dtype;
        // absorbed queries q̃_h = q_nope_h · W_UK_h: [N, H, C] (folded: the first H·C of q's rows)
        let split_q;
        let (qt, ld_qt, qpe_off, ld_qpe, hs_qpe) = if folded {
            (q, h * (ck + dr), h * ck, h * (ck + dr), dr)
        } else {
            let mut qt = Act::empty(dev, dt, n * h * ck)?;
            let s = GemmShape {
                lda: h * dq,
                stride_a: dq,
                ldc: h * ck,
                stride_c: ck,
                batch: h,
                ..GemmShape::plain(n, dn, ck)
            };
            gemm(dev, q, &a.w_uk, &mut qt, &s)?;
            split_q = qt;
            (&split_q, h * ck, dn, h * dq, dq)
        };
        // attention over the cache: ō [N, H, C]
        // in a captured decode max_visible is the capacity; the kernels split each row's own
        // length, so the split count only has to suit the longest possible row
        let splits = mla::mla_splits(dev, dt, n, h, ck, dr, rows.max_visible);
        let mut work = if splits > 1 { Some(MlaWork::new(dev, splits, n, h, ck)?) } else { None };
        let mut ob = Act::empty(dev, dt, n * h * ck)?;
        let call = MlaCall {
            n,
            h,
            c: ck,
            dr,
            qt,
            ld_qt,
            qpe: q,
            qpe_off,
            ld_qpe,
            hs_qpe,
            cache: &self.caches[l],
            slots: self.slots,
            max_len: self.max_len,
            row_slot: &rows.slot,
            row_len,
            scale: m.scale,
            splits,
        };
        mla::mla_decode(dev, &call, &mut ob, h * ck, work.as_mut())?;
        if folded {
            return Ok(ob);
        }
        // O_h = ō_h · W_UV_hᵀ: [N, H·dv]
        let mut oh = Act::empty(dev, dt, n * h * dv)?;
        let s =
            GemmShape { lda: h * ck, stride_a: ck, ldc: h * dv, stride_c: dv, batch: h, ..GemmShape::plain(n, ck, dv) };
        gemm(dev, &ob, &a.w_uv, &mut oh, &s)?;
        Ok(oh)
    }

    /// The step's pairs that take the flash path: bf16 with `kv_b` on the device, head dims the
    /// kernel takes, more than one new token, and [`Flash`] / [`flash_wins`] say so.
    fn flash_segments(&self, rows: &Rows) -> Vec<RowSeg> {
        let m = self.model;
        let c = &m.cfg;
        let (dn, dr, dv, ck) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        if self.flash == Flash::Off
            || m.dtype != DType::Bf16
            || !ck.is_multiple_of(8)
            || !attn::flash_takes(dn, dr, dv)
            || m.layers.iter().any(|l| l.attn.kv_b.is_none())
        {
            return Vec::new();
        }
        rows.segs
            .iter()
            .filter(|s| s.nq > 1 && (self.flash == Flash::Always || flash_wins(c, s.p0, s.nq)))
            .filter(|s| (s.p0 + s.nq) * c.num_attention_heads * (dn + dv) * 2 <= FLASH_KV_BYTES)
            .copied()
            .collect()
    }

    /// Flash prefill attention of layer `l` for `segs` into their rows of `oh` (`[N, H·dv]`), in
    /// groups of slots whose decompressed keys/values fit [`FLASH_KV_BYTES`].
    fn flash_prefill(&self, l: usize, q: &Act, segs: &[RowSeg], oh: &mut Act) -> Result<()> {
        let c = &self.model.cfg;
        let per_key = c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim) * 2;
        let mut start = 0;
        while start < segs.len() {
            let mut end = start + 1;
            let mut bytes = (segs[start].p0 + segs[start].nq) * per_key;
            while end < segs.len() && bytes + (segs[end].p0 + segs[end].nq) * per_key <= FLASH_KV_BYTES {
                bytes += (segs[end].p0 + segs[end].nq) * per_key;
                end += 1;
            }
            self.flash_group(l, q, &segs[start..end], oh)?;
            start = end;
        }
        Ok(())
    }

    /// [`Self::flash_prefill`] for one group: each slot's cached latents (its `p0 + nq` entries,
    /// the new ones included) decompressed by `kv_b_proj` into `[keys, H, dn + dv]` (k_nope ‖ v
    /// per head), the rope keys read from the cache, causal attention from position `p0`.
    fn flash_group(&self, l: usize, q: &Act, segs: &[RowSeg], oh: &mut Act) -> Result<()> {
        let m = self.model;
        let dev = &*m.dev;
        let c = &m.cfg;
        let (h, dn, dr, dv, ck) =
            (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let kv_b = m.layers[l].attn.kv_b.as_ref().ok_or_else(|| Error::Io("flash prefill without kv_b".into()))?;
        let (w, wkv) = (ck + dr, h * (dn + dv));
        let keys: usize = segs.iter().map(|s| s.p0 + s.nq).sum();
        let mut kv = Act::empty(dev, m.dtype, keys * wkv)?;
        let mut fs = Vec::with_capacity(segs.len());
        let mut k_row0 = 0;
        for s in segs {
            let len = s.p0 + s.nq;
            let shape = GemmShape {
                a_off: s.slot * self.max_len * w,
                lda: w,
                c_off: k_row0 * wkv,
                bias: kv_b.bias.as_ref(),
                ..GemmShape::plain(len, ck, wkv)
            };
            gemm(dev, &self.caches[l], &kv_b.w, &mut kv, &shape)?;
            fs.push(attn::Segment { q_row0: s.row0, nq: s.nq, p0: s.p0, k_row0, pe_row0: s.slot * self.max_len });
            k_row0 += len;
        }
        let call = attn::FlashCall {
            h,
            dn,
            dr,
            dv,
            q,
            q_off: 0,
            ld_q: h * (dn + dr),
            hs_q: dn + dr,
            k: &kv,
            k_off: 0,
            ld_k: wkv,
            hs_k: dn + dv,
            kpe: &self.caches[l],
            kpe_off: ck,
            ld_kpe: w,
            v: &kv,
            v_off: dn,
            ld_v: wkv,
            hs_v: dn + dv,
            scale: m.scale,
            segs: &fs,
        };
        attn::flash_attention(dev, &call, oh, 0, h * dv, dv)
    }

    /// `out [r, V] = lm_head(norm(x[pick]))` for the `r` picked rows of `x` (`[n, D]`), or all
    /// `n` rows when `pick` is `None`. Where the lm_head runs skinny, one GEMM reads the picked
    /// rows and folds the norm in.
    fn head(&self, x: &mut Act, n: usize, pick: Option<(&CudaSlice<i32>, usize)>, out: &mut Act) -> Result<()> {
        let m = self.model;
        let dev = &*m.dev;
        let d = m.cfg.hidden_size;
        let r = pick.map_or(n, |p| p.1);
        let lm = &m.lm_head;
        let fused = GemmShape {
            a_rows: pick.map(|p| p.0),
            norm: Some((&m.norm, m.eps)),
            bias: lm.bias.as_ref(),
            ..GemmShape::plain(r, d, lm.w.n)
        };
        if fuse_enabled() && runs_skinny(dev, m.dtype, &lm.w, out.dtype(), &fused, GemmPath::Auto) {
            return gemm(dev, x, &lm.w, out, &fused);
        }
        let mut xs = Act::empty(dev, m.dtype, r * d)?;
        match pick {
            Some((ids, _)) => {
                gather::gather_rows(dev, x, n, d, ids, r, d, &mut xs, d)?;
                norm::rmsnorm(dev, &mut xs, 0, d, None, &m.norm, d, m.eps, r)?;
            }
            None => norm::rmsnorm(dev, x, 0, d, Some((&mut xs, 0, d)), &m.norm, d, m.eps, n)?,
        }
        linear(m, lm, &xs, r, out, false)
    }
}

/// Device argmax results as token ids (an id past the vocabulary means every logit was NaN).
fn greedy_ids(ids: &[i32], vocab: usize) -> Result<Vec<u32>> {
    ids.iter()
        .map(|&t| {
            usize::try_from(t)
                .ok()
                .filter(|&t| t < vocab)
                .map(|t| t as u32)
                .ok_or_else(|| Error::Input("the logits of a row are all NaN: no greedy token".into()))
        })
        .collect()
}

/// `y (+)= x · Wᵀ + b` for `n` rows.
fn linear(m: &CudaModel, l: &DLinear, x: &Act, n: usize, y: &mut Act, accumulate: bool) -> Result<()> {
    let s = GemmShape { accumulate, bias: l.bias.as_ref(), ..GemmShape::plain(n, l.w.k, l.w.n) };
    gemm(&m.dev, x, &l.w, y, &s)
}

/// The query's last projection of `a` (`q_b` or `q`, `own`), or with `absorb` the folded one.
fn q_last<'a>(a: &'a DMla, own: &'a DLinear, absorb: bool) -> &'a DLinear {
    match (&a.absorbed, absorb) {
        (Some(f), true) => &f.q,
        _ => own,
    }
}

/// `y = x · Wᵀ + b` for `n` rows of `x`, its norm folded in when it asks for that.
fn linear_in(m: &CudaModel, l: &DLinear, x: In, n: usize, y: &mut Act) -> Result<()> {
    let s = GemmShape { bias: l.bias.as_ref(), norm: x.norm(), ..GemmShape::plain(n, l.w.k, l.w.n) };
    gemm(&m.dev, x.act(), &l.w, y, &s)
}

/// The gate|up GEMM of `mlp` over `n` rows of `x` with SwiGLU fused in (output `[n, I]`).
fn swiglu_shape<'a>(mlp: &DMlp, x: In<'a>, n: usize) -> GemmShape<'a> {
    GemmShape { norm: x.norm(), swiglu: true, ..GemmShape::plain(n, mlp.gate_up.k, mlp.inter) }
}

/// `silu(gate(x)) ⊙ up(x)` of a (non-grouped) SwiGLU MLP on `dev`'s stream, `[n, I]`: one GEMM
/// with the SwiGLU (and a folded norm) where it runs skinny, else GEMM + swiglu. A folded-norm
/// input must be one that runs skinny (see [`swiglu_shape`]).
fn mlp_act(dev: &Device, m: &CudaModel, mlp: &DMlp, x: In, n: usize) -> Result<Act> {
    let i = mlp.inter;
    let mut act = Act::empty(dev, m.dtype, n * i)?;
    let fused = swiglu_shape(mlp, x, n);
    if x.norm().is_some()
        || (fuse_enabled() && runs_skinny(dev, m.dtype, &mlp.gate_up, m.dtype, &fused, GemmPath::Auto))
    {
        gemm(dev, x.act(), &mlp.gate_up, &mut act, &fused)?;
    } else {
        let mut gu = Act::empty(dev, m.dtype, n * 2 * i)?;
        gemm(dev, x.act(), &mlp.gate_up, &mut gu, &GemmShape::plain(n, mlp.gate_up.k, 2 * i))?;
        elementwise::swiglu(dev, &gu, 2 * i, &mut act, i, i, n)?;
    }
    Ok(act)
}

/// `out (+)= down(act)` of a (non-grouped) MLP on `dev`'s stream.
fn mlp_down(dev: &Device, mlp: &DMlp, act: &Act, n: usize, out: &mut Act, accumulate: bool) -> Result<()> {
    let s = GemmShape { accumulate, ..GemmShape::plain(n, mlp.inter, mlp.down.n) };
    gemm(dev, act, &mlp.down, out, &s)
}

/// A dense layer's MLP: `x += MLP(post_norm(x))`, the norm folded into the gate|up GEMM where it
/// runs skinny (`hs`: the scratch for normalized rows otherwise).
fn dense_forward(
    m: &CudaModel,
    mlp: &DMlp,
    post_norm: &CudaSlice<f32>,
    hs: &mut Option<Act>,
    n: usize,
    x: &mut Act,
) -> Result<()> {
    let dev = &*m.dev;
    let act = {
        let fold = In::Fold(&*x, post_norm, m.eps);
        let src = if fuse_enabled()
            && runs_skinny(dev, m.dtype, &mlp.gate_up, m.dtype, &swiglu_shape(mlp, fold, n), GemmPath::Auto)
        {
            fold
        } else {
            In::Normed(normalize(m, x, post_norm, n, hs)?)
        };
        mlp_act(dev, m, mlp, src, n)?
    };
    mlp_down(dev, mlp, &act, n, x, true)
}

/// Token counts up to which the router and the dispatch plan run as one launch
/// (`moe::route_plan`, one block; `DSV3_FUSE=0` turns it off): decode steps. Above it the router's
/// grid spreads the tokens over blocks.
const ROUTE_PLAN_FUSED_MAX: usize = 16;

/// Most tokens whose router GEMM runs inside the routing kernel (one token per warp of its one
/// block; more would serialize on it).
const ROUTER_FUSED_MAX_TOKENS: usize = 8;

/// `x += Σ_k w_k · Expert_k(h) + Shared(h)` for `h = post_norm(x)` on device: route, plan,
/// grouped GEMMs, combine. On the decode path (few rows, fusions on) the norm folds into the
/// router, the shared expert's and the routed experts' gate|up GEMMs (all three read x), the
/// routed one reads its rows through the plan's `src_row` (no gather) and both gate|up GEMMs
/// apply the SwiGLU; otherwise `h` is computed into the scratch `hs` and the rows gathered.
#[allow(clippy::too_many_arguments)]
fn moe_forward(
    m: &CudaModel,
    router: (&crate::tensor::DWeight, Option<&CudaSlice<f32>>, &moe::RouteCfg),
    experts: &DMlp,
    shared: Option<&DMlp>,
    post_norm: &CudaSlice<f32>,
    hs: &mut Option<Act>,
    n: usize,
    x: &mut Act,
) -> Result<()> {
    let dev = &*m.dev;
    let dt = m.dtype;
    let (rw, bias, cfg) = router;
    let (d, e, k) = (m.cfg.hidden_size, cfg.n_experts, cfg.top_k);
    let (nk, i) = (n * k, experts.inter);
    let mut plan = moe::Plan::new(dev, e, nk)?;
    let max_tiles = moe::Plan::max_tiles(nk, e);
    // the router reads bf16 hidden states against its f32 weights in the skinny kernel (few rows)
    let router_skinny = dt == DType::Bf16 && n <= crate::ops::gemm::SKINNY_MAX_M && d.is_multiple_of(8);
    let router_path = if router_skinny { GemmPath::Skinny } else { GemmPath::Auto };
    fn router_shape<'a>(x: In<'a>, n: usize, d: usize, e: usize) -> GemmShape<'a> {
        GemmShape { norm: x.norm(), ..GemmShape::plain(n, d, e) }
    }
    // the routed gate|up + SwiGLU: permuted row r reads token row src_row[r]
    fn routed_shape<'a>(experts: &DMlp, x: In<'a>, plan: &'a moe::Plan, nk: usize, max_tiles: usize) -> GemmShape<'a> {
        let g = Grouped { row_offsets: &plan.row_offsets, tile_offsets: &plan.tile_offsets, max_tiles };
        GemmShape { grouped: Some(g), a_rows: Some(&plan.src_row), ..swiglu_shape(experts, x, nk) }
    }
    let src = {
        let fold = In::Fold(&*x, post_norm, m.eps);
        let folds = fuse_enabled()
            && (dt == DType::F32 || router_skinny)
            && runs_skinny(dev, dt, rw, DType::F32, &router_shape(fold, n, d, e), router_path)
            && runs_skinny(
                dev,
                dt,
                &experts.gate_up,
                dt,
                &routed_shape(experts, fold, &plan, nk, max_tiles),
                GemmPath::Auto,
            )
            && shared.is_none_or(|s| runs_skinny(dev, dt, &s.gate_up, dt, &swiglu_shape(s, fold, n), GemmPath::Auto));
        if folds {
            fold
        } else {
            In::Normed(normalize(m, x, post_norm, n, hs)?)
        }
    };
    // the shared expert does not depend on the routing: it runs on the side stream, beside the
    // router, the dispatch and the routed experts. Its output belongs to the main stream, and the
    // main stream joins the side one before anything returns (errors too), so no buffer is freed
    // while the other stream may still use it. (Both streams only read x until the combine.)
    let mut sh = None;
    let mut sh_result = Ok(());
    let side = match shared {
        Some(s) => {
            let mut o = Act::empty(dev, dt, n * d)?;
            let side = dev.fork()?;
            sh_result = mlp_act(&side, m, s, src, n).and_then(|act| mlp_down(&side, s, &act, n, &mut o, false));
            sh = Some(o);
            Some(side)
        }
        None => None,
    };
    // the down GEMM and the combine in one launch (decode: the down GEMM runs skinny); it waits
    // for the shared expert like the separate combine would
    let down_combine =
        fuse_enabled() && moe::fused_combine() && moe::down_combine_runs(dev, dt, &experts.down, &plan, nk, max_tiles);
    // the routed experts over the plan: permuted rows [nk, D] -> act [nk, I] (gate|up + SwiGLU)
    // -> down [nk, D] (not with down_combine); returns (act or down rows, idx, w)
    let routed_experts = |plan: &moe::Plan, idx: CudaSlice<i32>, w: CudaSlice<f32>| -> Result<_> {
        let mut act = Act::empty(dev, dt, nk * i)?;
        let fused = routed_shape(experts, src, plan, nk, max_tiles);
        if src.norm().is_some()
            || (fuse_enabled() && runs_skinny(dev, dt, &experts.gate_up, dt, &fused, GemmPath::Auto))
        {
            gemm(dev, src.act(), &experts.gate_up, &mut act, &fused)?;
        } else {
            let mut xe = Act::empty(dev, dt, nk * d)?;
            gather::gather_rows(dev, src.act(), n, d, &plan.src_row, nk, d, &mut xe, d)?;
            let mut gu = Act::empty(dev, dt, nk * 2 * i)?;
            let g = Grouped { row_offsets: &plan.row_offsets, tile_offsets: &plan.tile_offsets, max_tiles };
            gemm(
                dev,
                &xe,
                &experts.gate_up,
                &mut gu,
                &GemmShape { grouped: Some(g), ..GemmShape::plain(nk, d, 2 * i) },
            )?;
            elementwise::swiglu(dev, &gu, 2 * i, &mut act, i, i, nk)?;
        }
        if down_combine {
            return Ok((act, idx, w));
        }
        let mut ye = Act::empty(dev, dt, nk * d)?;
        let g = Grouped { row_offsets: &plan.row_offsets, tile_offsets: &plan.tile_offsets, max_tiles };
        gemm(dev, &act, &experts.down, &mut ye, &GemmShape { grouped: Some(g), ..GemmShape::plain(nk, i, d) })?;
        Ok((ye, idx, w))
    };
    // a decode step's few tokens against a small router: the router GEMM inside the routing
    // kernel (moe::router_route_plan), one launch for logits, routing and plan
    let router_fused = match &rw.buf {
        crate::tensor::WeightBuf::F32(w) if fuse_enabled() && dt == DType::Bf16 && n <= ROUTER_FUSED_MAX_TOKENS => {
            (d.is_multiple_of(8) && e * d <= moe::ROUTER_FUSED_MAX_WEIGHTS && e <= moe::MOE_EMAX).then_some(w)
        }
        _ => None,
    };
    let mut routed = || -> Result<_> {
        let mut idx = crate::tensor::empty::<i32>(dev, n * k)?;
        let mut w = crate::tensor::empty::<f32>(dev, n * k)?;
        if let Some(rwf) = router_fused {
            let mut logits = crate::tensor::empty::<f32>(dev, n * e)?;
            moe::router_route_plan(
                dev,
                src.act(),
                d,
                src.norm(),
                rwf,
                d,
                &mut logits,
                n,
                bias,
                cfg,
                &mut idx,
                &mut w,
                &mut plan,
            )?;
            return routed_experts(&plan, idx, w);
        }
        // router logits in f32
        let mut logits = Act::F32(crate::tensor::empty::<f32>(dev, n * e)?);
        if dt == DType::F32 || router_skinny {
            gemm_via(dev, src.act(), rw, &mut logits, &router_shape(src, n, d, e), router_path)?;
        } else {
            let mut hf = Act::F32(crate::tensor::empty::<f32>(dev, n * d)?);
            elementwise::cast(dev, src.act(), &mut hf, n * d)?;
            gemm(dev, &hf, rw, &mut logits, &GemmShape::plain(n, d, e))?
        }
        let Act::F32(logits) = logits else { unreachable!("allocated as f32") };
        if fuse_enabled() && n <= ROUTE_PLAN_FUSED_MAX && e <= moe::MOE_EMAX {
            moe::route_plan(dev, &logits, n, bias, cfg, &mut idx, &mut w, &mut plan)?;
        } else {
            moe::route(dev, &logits, n, bias, cfg, &mut idx, &mut w)?;
            moe::plan(dev, &idx, n, k, e, &mut plan)?;
        }
        routed_experts(&plan, idx, w)
    };
    let routed = routed();
    if let Some(side) = &side {
        dev.join(side)?;
    }
    sh_result?;
    // (the routed rows: the SwiGLU activations with down_combine, else the down GEMM's output)
    let (rows, idx, w) = routed?;
    if down_combine {
        let counters = &m.moe_counters;
        return moe::down_combine(
            dev,
            &rows,
            &experts.down,
            &plan,
            max_tiles,
            &idx,
            &w,
            sh.as_ref(),
            x,
            counters,
            n,
            k,
        );
    }
    moe::combine(dev, &rows, &plan, &idx, &w, sh.as_ref(), x, n, k, d)
}

/// The query LoRA's last GEMM left to `CudaSession::attention` (see `project`): q_b (`w`, its
/// norm folded into `shape`) over rows `qa`, or (`None`) over the buffer that also holds the kv
/// rows (q_a ‖ kv_a in one GEMM).
struct QbPending<'m> {
    qa: Option<Act>,
    w: &'m crate::DWeight,
    shape: GemmShape<'m>,
}
