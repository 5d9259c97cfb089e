//! DeepSeekMoE: a router over fine-grained experts plus always-on shared experts.
//!
//! V3 (`noaux_tc`): `s = σ(x·W_gᵀ)` in f32; selection on `s + bias` (the auxiliary-loss-free
//! correction bias), limited to the `topk_group` groups whose two best biased scores sum highest
//! (other groups masked with −inf); weights are the *unbiased* `s` of the chosen experts,
//! normalized (`norm_topk_prob`, denominator `Σw + 1e-20`) and scaled by `routed_scaling_factor`.
//! V2: softmax scores, plain top-k (`greedy`) or groups scored by their best expert
//! (`group_limited_greedy`, dropped groups masked with 0); weights are the chosen scores times
//! `routed_scaling_factor` (HF's V2 ignores `norm_topk_prob`).
use crate::config::{Config, ScoringFunc, TopkMethod};
use crate::error::Result;
use crate::model::linear::Fp8Mode;
use crate::model::mlp::{Mlp, MlpSaved};
use crate::ops::gemm::{matmul_nn, matmul_t, matmul_tn};
use crate::ops::softmax::softmax_inplace;
use crate::weights::TensorStore;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// The experts chosen for one token: `(expert, weight)` pairs, `top_k` of them.
pub type Routing = Vec<(usize, f32)>;

/// For each expert, the `(token, weight)` rows it serves.
pub type PerExpert = Vec<Vec<(usize, f32)>>;

/// The router of one MoE layer.
#[derive(Clone)]
pub struct Router {
    /// `mlp.gate.weight` `[E, D]` (the router runs in f32).
    pub weight: Vec<f32>,
    /// `mlp.gate.e_score_correction_bias` `[E]` (V3; steers selection only).
    pub bias: Option<Vec<f32>>,
    pub n_experts: usize,
    pub dim: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub scaling: f32,
    pub scoring: ScoringFunc,
    pub method: TopkMethod,
}

/// Indices of the `k` largest values (ties: lower index first), in descending order.
pub fn topk_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap_or(core::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

impl Router {
    /// Router logits `[N, E] = x[N, D] · W_gᵀ`.
    pub fn logits(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut l = vec![0f32; n * self.n_experts];
        matmul_t(n, self.n_experts, self.dim, x, self.dim, &self.weight, self.dim, &mut l, self.n_experts, false);
        l
    }

    /// Router scores of one token (`[E]`): sigmoid (V3) or softmax (V2) of the logits.
    pub fn scores(&self, logits: &[f32]) -> Vec<f32> {
        let mut scores: Vec<f32> = logits.to_vec();
        match self.scoring {
            ScoringFunc::Sigmoid => scores.iter_mut().for_each(|v| *v = crate::ops::fastmath::sigmoid(*v)),
            ScoringFunc::Softmax => softmax_inplace(&mut scores),
        }
        scores
    }

    /// Chooses the experts of one token from its router logits (`[E]`).
    pub fn select(&self, logits: &[f32]) -> Routing {
        let e = self.n_experts;
        let scores = self.scores(logits);
        let gsize = e / self.n_group;
        let idx = match self.method {
            TopkMethod::NoauxTc => {
                let biased: Vec<f32> = match &self.bias {
                    Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                    None => scores.clone(),
                };
                let gscore: Vec<f32> =
                    biased.chunks_exact(gsize).map(|g| topk_indices(g, 2).iter().map(|&i| g[i]).sum()).collect();
                let masked = mask_groups(&biased, &gscore, self.topk_group, gsize, f32::NEG_INFINITY);
                topk_indices(&masked, self.top_k)
            }
            TopkMethod::Greedy => topk_indices(&scores, self.top_k),
            TopkMethod::GroupLimitedGreedy => {
                let gscore: Vec<f32> =
                    scores.chunks_exact(gsize).map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max)).collect();
                let masked = mask_groups(&scores, &gscore, self.topk_group, gsize, 0.0);
                topk_indices(&masked, self.top_k)
            }
        };
        let mut w: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
        if self.norm_topk_prob {
            let denom: f32 = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|x| *x /= denom);
        }
        w.iter_mut().for_each(|x| *x *= self.scaling);
        idx.into_iter().zip(w).collect()
    }
}

impl Router {
    /// Backward of the routing weights of one token: given `dw` (`[K]`, the gradient of each
    /// chosen weight), returns the gradient of the router logits (`[E]`). The selection itself is
    /// piecewise constant; gradient flows through the chosen scores (and their normalization).
    pub fn weights_backward(&self, logits: &[f32], route: &Routing, dw: &[f32]) -> Vec<f32> {
        let sc = self.scores(logits);
        let mut ds = vec![0f32; self.n_experts];
        let c = self.scaling;
        if self.norm_topk_prob {
            let z: f32 = route.iter().map(|&(e, _)| sc[e]).sum::<f32>() + 1e-20;
            let dot: f32 = route.iter().zip(dw).map(|(&(e, _), &d)| d * sc[e]).sum();
            for (&(e, _), &d) in route.iter().zip(dw) {
                ds[e] += c * (d / z - dot / (z * z));
            }
        } else {
            for (&(e, _), &d) in route.iter().zip(dw) {
                ds[e] += c * d;
            }
        }
        self.scores_backward(&sc, &ds)
    }

    /// Gradient of the logits from the gradient `ds` of the scores `sc` (`[E]` each).
    pub fn scores_backward(&self, sc: &[f32], ds: &[f32]) -> Vec<f32> {
        match self.scoring {
            ScoringFunc::Sigmoid => ds.iter().zip(sc).map(|(&d, &s)| d * s * (1.0 - s)).collect(),
            ScoringFunc::Softmax => {
                let dot: f32 = ds.iter().zip(sc).map(|(a, b)| a * b).sum();
                ds.iter().zip(sc).map(|(&d, &s)| s * (d - dot)).collect()
            }
        }
    }

    /// The balance loss `α·Σ_i f_i·P_i` averaged over `spans` (groups of token rows: sequences
    /// for DeepSeek-V3's complementary sequence-wise loss, the whole batch for a conventional
    /// auxiliary loss), with `f_i = E/(K·T)·#{t: i chosen}` and `P_i = 1/T·Σ_t s_{i,t}/Σ_j s_{j,t}`.
    /// Adds `scale ×` its gradient to `dlogits` (`[N, E]`) and returns the loss.
    pub fn balance_loss(
        &self,
        logits: &[f32],
        routes: &[Routing],
        spans: &[core::ops::Range<usize>],
        alpha: f32,
        scale: f32,
        dlogits: &mut [f32],
    ) -> f32 {
        let (e, k) = (self.n_experts, self.top_k);
        if alpha == 0.0 || spans.is_empty() {
            return 0.0;
        }
        let mut total = 0f32;
        let groups = spans.iter().filter(|r| !r.is_empty()).count().max(1) as f32;
        for r in spans.iter().filter(|r| !r.is_empty()) {
            let t = r.len() as f32;
            let mut f = vec![0f32; e];
            for route in &routes[r.clone()] {
                for &(i, _) in route {
                    f[i] += e as f32 / (k as f32 * t);
                }
            }
            for row in r.clone() {
                let sc = self.scores(&logits[row * e..(row + 1) * e]);
                let sum: f32 = sc.iter().sum();
                let fs: f32 = f.iter().zip(&sc).map(|(a, b)| a * b).sum();
                total += alpha * fs / (sum * t);
                let c = scale * alpha / (t * groups);
                let ds: Vec<f32> = f.iter().map(|&fi| c * (fi / sum - fs / (sum * sum))).collect();
                let dl = self.scores_backward(&sc, &ds);
                for (o, d) in dlogits[row * e..(row + 1) * e].iter_mut().zip(dl) {
                    *o += d;
                }
            }
        }
        total / groups
    }

    /// Tokens routed to each expert.
    pub fn loads(&self, routes: &[Routing]) -> Vec<u32> {
        let mut l = vec![0u32; self.n_experts];
        for r in routes {
            for &(i, _) in r {
                l[i] += 1;
            }
        }
        l
    }
}

/// Keeps the `keep` groups with the highest `gscore` (ties: lower index) and sets every
/// expert of the other groups to `fill`.
fn mask_groups(scores: &[f32], gscore: &[f32], keep: usize, gsize: usize, fill: f32) -> Vec<f32> {
    let kept = topk_indices(gscore, keep);
    scores.iter().enumerate().map(|(i, &s)| if kept.contains(&(i / gsize)) { s } else { fill }).collect()
}

/// One MoE layer: router, routed experts, shared experts.
#[derive(Clone)]
pub struct Moe {
    pub router: Router,
    pub experts: Vec<Mlp>,
    pub shared: Option<Mlp>,
}

impl Moe {
    /// Loads `{prefix}.gate.*`, `{prefix}.experts.{e}.*`, `{prefix}.shared_experts.*`.
    pub fn load(store: &mut TensorStore, prefix: &str, cfg: &Config, mode: Fp8Mode) -> Result<Moe> {
        let (d, e, i) = (cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size);
        let blk = cfg.quantization.map(|q| q.block);
        let weight = store.take_f32(&format!("{prefix}.gate.weight"), &[e, d])?;
        let bias_name = format!("{prefix}.gate.e_score_correction_bias");
        let bias = match cfg.topk_method {
            TopkMethod::NoauxTc => Some(store.take_f32(&bias_name, &[e])?),
            _ => None,
        };
        let router = Router {
            weight,
            bias,
            n_experts: e,
            dim: d,
            top_k: cfg.num_experts_per_tok,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            // HF's DeepseekV2 ignores norm_topk_prob (weights = scores · scaling)
            norm_topk_prob: cfg.norm_topk_prob && cfg.model_type == crate::config::ModelType::V3,
            scaling: cfg.routed_scaling_factor,
            scoring: cfg.scoring_func,
            method: cfg.topk_method,
        };
        let experts = (0..e)
            .map(|x| Mlp::load(store, &format!("{prefix}.experts.{x}"), d, i, blk, mode))
            .collect::<Result<Vec<_>>>()?;
        let shared = if cfg.n_shared_experts > 0 {
            Some(Mlp::load(store, &format!("{prefix}.shared_experts"), d, i * cfg.n_shared_experts, blk, mode)?)
        } else {
            None
        };
        Ok(Moe { router, experts, shared })
    }

    /// Number of parameters (all experts).
    pub fn params(&self) -> usize {
        self.router.weight.len()
            + self.router.bias.as_ref().map_or(0, |b| b.len())
            + self.experts.iter().map(Mlp::params).sum::<usize>()
            + self.shared.as_ref().map_or(0, Mlp::params)
    }

    /// Parameters one token uses: router, `top_k` experts, shared experts.
    pub fn active_params(&self) -> usize {
        self.router.weight.len()
            + self.experts.first().map_or(0, Mlp::params) * self.router.top_k
            + self.shared.as_ref().map_or(0, Mlp::params)
    }

    /// Router logits `[N, E]`, each token's routing, and each expert's `(token, weight)` rows.
    fn dispatch(&self, x: &[f32], n: usize) -> (Vec<f32>, Vec<Routing>, PerExpert) {
        let logits = self.router.logits(x, n);
        let routes: Vec<Routing> = logits.chunks_exact(self.router.n_experts).map(|l| self.router.select(l)).collect();
        let mut per: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (t, r) in routes.iter().enumerate() {
            for &(e, w) in r {
                per[e].push((t, w));
            }
        }
        (logits, routes, per)
    }

    /// `y[N, D] = Σ_k w_k · Expert_k(x) + Shared(x)` for `x` `[N, D]`. Returns the routing.
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) -> Vec<Routing> {
        let d = self.router.dim;
        let (_, routes, per) = self.dispatch(x, n);
        let active: Vec<usize> = (0..per.len()).filter(|&e| !per[e].is_empty()).collect();
        let inter = self.experts.first().map_or(0, |m| m.gate.out_dim);
        let work = n * self.router.top_k * 3 * d * inter;
        let outs = crate::ops::par_map(&active, work, |&e| {
            let rows = &per[e];
            let mut xe = vec![0f32; rows.len() * d];
            for (dst, &(t, _)) in xe.chunks_exact_mut(d).zip(rows) {
                dst.copy_from_slice(&x[t * d..(t + 1) * d]);
            }
            let mut ye = vec![0f32; rows.len() * d];
            self.experts[e].forward(&xe, rows.len(), &mut ye);
            ye
        });
        match &self.shared {
            Some(s) => s.forward(x, n, y),
            None => y[..n * d].fill(0.0),
        }
        let mut routed = vec![0f32; n * d];
        for (&e, ye) in active.iter().zip(&outs) {
            for (src, &(t, w)) in ye.chunks_exact(d).zip(&per[e]) {
                for (o, &v) in routed[t * d..(t + 1) * d].iter_mut().zip(src) {
                    *o += w * v;
                }
            }
        }
        for (o, r) in y.iter_mut().zip(&routed) {
            *o += r;
        }
        routes
    }
}

/// Balance-loss settings for a training pass.
#[derive(Debug, Clone, Default)]
pub struct Balance {
    /// Rows of each sequence (for the sequence-wise loss).
    pub seqs: Vec<core::ops::Range<usize>>,
    /// Weight α of DeepSeek-V3's complementary sequence-wise balance loss (V3: 0.0001).
    pub seq_alpha: f32,
    /// Weight of a conventional batch-wise auxiliary loss (0 = off; the aux-loss-free bias
    /// update is the V3 way).
    pub aux_alpha: f32,
    /// Multiplies the gradients (micro-batch weight).
    pub scale: f32,
}

/// Activations a [`Moe`] keeps for its backward.
#[derive(Clone, Default)]
pub struct MoeSaved {
    /// `[N, E]` router logits.
    pub logits: Vec<f32>,
    /// The chosen experts and weights of each token.
    pub routes: Vec<Routing>,
    /// Per expert: the (token, weight) rows it served.
    pub per: Vec<Vec<(usize, f32)>>,
    /// Per expert: its input rows `[rows, D]`, MLP activations and outputs `[rows, D]`.
    pub xe: Vec<Vec<f32>>,
    pub saved: Vec<MlpSaved>,
    pub ye: Vec<Vec<f32>>,
    pub shared: MlpSaved,
}

impl Moe {
    /// Training forward: `y[N, D]` and what [`Moe::backward`] needs.
    pub fn forward_train(&self, x: &[f32], n: usize, y: &mut [f32]) -> MoeSaved {
        let d = self.router.dim;
        let (logits, routes, per) = self.dispatch(x, n);
        let ids: Vec<usize> = (0..per.len()).collect();
        let inter = self.experts.first().map_or(0, |m| m.gate.out_dim);
        let work = n * self.router.top_k * 3 * d * inter;
        let outs = crate::ops::par_map(&ids, work, |&e| {
            let rows = &per[e];
            let mut xe = vec![0f32; rows.len() * d];
            for (dst, &(t, _)) in xe.chunks_exact_mut(d).zip(rows) {
                dst.copy_from_slice(&x[t * d..(t + 1) * d]);
            }
            let mut ye = vec![0f32; rows.len() * d];
            let sv = if rows.is_empty() {
                MlpSaved::default()
            } else {
                self.experts[e].forward_train(&xe, rows.len(), &mut ye)
            };
            (xe, sv, ye)
        });
        let shared = match &self.shared {
            Some(s) => s.forward_train(x, n, y),
            None => {
                y[..n * d].fill(0.0);
                MlpSaved::default()
            }
        };
        let mut saved = MoeSaved { logits, routes, per, shared, ..Default::default() };
        let mut routed = vec![0f32; n * d];
        for (e, (xe, sv, ye)) in outs.into_iter().enumerate() {
            for (src, &(t, w)) in ye.chunks_exact(d).zip(&saved.per[e]) {
                for (o, &v) in routed[t * d..(t + 1) * d].iter_mut().zip(src) {
                    *o += w * v;
                }
            }
            saved.xe.push(xe);
            saved.saved.push(sv);
            saved.ye.push(ye);
        }
        for (o, r) in y.iter_mut().zip(&routed) {
            *o += r;
        }
        saved
    }

    /// Backward: accumulates gradients into `grad` (router weight, experts, shared experts) and
    /// writes `dx` `[N, D]`. The correction bias gets no gradient (it is updated by the
    /// load-balancing rule instead). Returns the balance losses of `bal`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        x: &[f32],
        n: usize,
        s: &MoeSaved,
        dy: &[f32],
        grad: &mut Moe,
        dx: &mut [f32],
        bal: &Balance,
    ) -> f32 {
        let (d, e_n) = (self.router.dim, self.router.n_experts);
        match (&self.shared, &mut grad.shared) {
            (Some(sh), Some(gs)) => sh.backward(x, n, &s.shared, dy, gs, dx),
            _ => dx[..n * d].fill(0.0),
        }
        // d(weight) of every (token, slot), found by expert
        let mut dw_tok: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n];
        for (e, rows) in s.per.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let ye = &s.ye[e];
            let mut dye = vec![0f32; rows.len() * d];
            for (r, &(t, w)) in rows.iter().enumerate() {
                let dyt = &dy[t * d..(t + 1) * d];
                let yr = &ye[r * d..(r + 1) * d];
                dw_tok[t].push((e, dyt.iter().zip(yr).map(|(a, b)| a * b).sum()));
                for (o, &g) in dye[r * d..(r + 1) * d].iter_mut().zip(dyt) {
                    *o = w * g;
                }
            }
            let mut dxe = vec![0f32; rows.len() * d];
            self.experts[e].backward(&s.xe[e], rows.len(), &s.saved[e], &dye, &mut grad.experts[e], &mut dxe);
            for (r, &(t, _)) in rows.iter().enumerate() {
                for (o, &g) in dx[t * d..(t + 1) * d].iter_mut().zip(&dxe[r * d..(r + 1) * d]) {
                    *o += g;
                }
            }
        }
        // through the routing weights into the router logits
        let mut dlogits = vec![0f32; n * e_n];
        for t in 0..n {
            let route = &s.routes[t];
            let dw: Vec<f32> =
                route.iter().map(|&(e, _)| dw_tok[t].iter().find(|p| p.0 == e).map_or(0.0, |p| p.1)).collect();
            let dl = self.router.weights_backward(&s.logits[t * e_n..(t + 1) * e_n], route, &dw);
            dlogits[t * e_n..(t + 1) * e_n].copy_from_slice(&dl);
        }
        let r = &self.router;
        let mut loss = r.balance_loss(&s.logits, &s.routes, &bal.seqs, bal.seq_alpha, bal.scale, &mut dlogits);
        loss += r.balance_loss(
            &s.logits,
            &s.routes,
            core::slice::from_ref(&(0..n)),
            bal.aux_alpha,
            bal.scale,
            &mut dlogits,
        );
        matmul_tn(e_n, d, n, &dlogits, x, &mut grad.router.weight, true);
        matmul_nn(n, d, e_n, &dlogits, &self.router.weight, dx, true);
        loss
    }

    /// Visits `{prefix}.gate.weight`, `{prefix}.experts.{e}.*`, `{prefix}.shared_experts.*`
    /// (not the correction bias: it is a buffer, not trained by gradient).
    pub fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut [f32])) {
        f(&format!("{prefix}.gate.weight"), &mut self.router.weight);
        for (e, m) in self.experts.iter_mut().enumerate() {
            m.visit(&format!("{prefix}.experts.{e}"), f);
        }
        if let Some(s) = &mut self.shared {
            s.visit(&format!("{prefix}.shared_experts"), f);
        }
    }

    /// Converts FP8 weights to f32.
    pub fn make_f32(&mut self) {
        self.experts.iter_mut().for_each(Mlp::make_f32);
        if let Some(s) = &mut self.shared {
            s.make_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(e: usize, k: usize, g: usize, tg: usize, bias: Vec<f32>) -> Router {
        Router {
            weight: vec![0.0; e],
            bias: Some(bias),
            n_experts: e,
            dim: 1,
            top_k: k,
            n_group: g,
            topk_group: tg,
            norm_topk_prob: true,
            scaling: 2.5,
            scoring: ScoringFunc::Sigmoid,
            method: TopkMethod::NoauxTc,
        }
    }

    #[test]
    fn group_limited_selection_uses_bias_for_choice_only() {
        // 8 experts in 4 groups of 2; keep 2 groups; pick 2 experts.
        let logits = [3.0f32, 2.9, -1.0, -1.0, 0.5, 0.4, 0.0, 0.0];
        // bias boosts group 3 (experts 6, 7) enough to win a group slot.
        let bias = vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.9];
        let r = router(8, 2, 4, 2, bias);
        let sel = r.select(&logits);
        let experts: Vec<usize> = sel.iter().map(|p| p.0).collect();
        // biased: g0 = σ3+σ2.9 ≈ 1.9, g3 = 2·(0.5+0.9) = 2.8, g2 ≈ 1.22 → groups 3 and 0 kept
        assert_eq!(experts, vec![6, 7]); // σ(0)+0.9 = 1.4 > σ(3) ≈ 0.95
                                         // weights come from unbiased sigmoid (0.5 each), normalized then scaled: 1.25 each
        for &(_, w) in &sel {
            assert!((w - 1.25).abs() < 1e-6);
        }
    }

    #[test]
    fn dropped_groups_are_never_chosen() {
        let logits = [5.0f32, -5.0, 4.0, 4.0, -9.0, -9.0];
        let r = router(6, 3, 3, 1, vec![0.0; 6]);
        let sel: Vec<usize> = r.select(&logits).iter().map(|p| p.0).collect();
        // group 1 (experts 2,3) has the best pair sum; K=3 > 2 allowed → one −inf pick (lowest index)
        assert_eq!(&sel[..2], &[2, 3]);
    }
}
