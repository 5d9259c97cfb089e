//! SwiGLU MLP: `down(silu(gate(x)) ⊙ up(x))` — the dense FFN, each routed expert, and the
//! shared experts.
use crate::error::Result;
use crate::model::linear::{Fp8Mode, Linear};
use crate::ops::swiglu::{swiglu, swiglu_backward};
use crate::weights::TensorStore;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// A SwiGLU MLP of width `inter`: gate/up `[inter, D]`, down `[D, inter]`.
#[derive(Clone)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    /// Loads `{prefix}.{gate,up,down}_proj.weight`.
    pub fn load(
        store: &mut TensorStore,
        prefix: &str,
        d: usize,
        inter: usize,
        blk: Option<[usize; 2]>,
        mode: Fp8Mode,
    ) -> Result<Mlp> {
        Ok(Mlp {
            gate: Linear::load(store, &format!("{prefix}.gate_proj"), inter, d, false, blk, mode)?,
            up: Linear::load(store, &format!("{prefix}.up_proj"), inter, d, false, blk, mode)?,
            down: Linear::load(store, &format!("{prefix}.down_proj"), d, inter, false, blk, mode)?,
        })
    }

    /// Number of parameters.
    pub fn params(&self) -> usize {
        self.gate.params() + self.up.params() + self.down.params()
    }

    /// `y[n, D] = MLP(x[n, D])`.
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.forward_train(x, n, y);
    }

    /// Training forward: `y` and what [`Mlp::backward`] needs.
    pub fn forward_train(&self, x: &[f32], n: usize, y: &mut [f32]) -> MlpSaved {
        let i = self.gate.out_dim;
        let mut g = vec![0f32; n * i];
        let mut u = vec![0f32; n * i];
        self.gate.forward(x, n, &mut g);
        self.up.forward(x, n, &mut u);
        let mut a = vec![0f32; n * i];
        swiglu(&g, &u, &mut a);
        self.down.forward(&a, n, y);
        MlpSaved { g, u, a }
    }

    /// Backward: accumulates parameter gradients into `grad`; writes `dx` `[n, D]`.
    pub fn backward(&self, x: &[f32], n: usize, s: &MlpSaved, dy: &[f32], grad: &mut Mlp, dx: &mut [f32]) {
        let i = self.gate.out_dim;
        let mut da = vec![0f32; n * i];
        self.down.backward(&s.a, n, dy, &mut grad.down, Some(&mut da), false);
        let mut dg = vec![0f32; n * i];
        let mut du = vec![0f32; n * i];
        swiglu_backward(&s.g, &s.u, &da, &mut dg, &mut du);
        self.gate.backward(x, n, &dg, &mut grad.gate, Some(dx), false);
        self.up.backward(x, n, &du, &mut grad.up, Some(dx), true);
    }

    /// Visits `{prefix}.{gate,up,down}_proj.*`.
    pub fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut [f32])) {
        self.gate.visit(&format!("{prefix}.gate_proj"), f);
        self.up.visit(&format!("{prefix}.up_proj"), f);
        self.down.visit(&format!("{prefix}.down_proj"), f);
    }

    /// Converts FP8 weights to f32.
    pub fn make_f32(&mut self) {
        self.gate.make_f32();
        self.up.make_f32();
        self.down.make_f32();
    }
}

/// Activations an [`Mlp`] keeps for its backward: pre-activations `g`, `u` and `a = silu(g)⊙u`.
#[derive(Clone, Default)]
pub struct MlpSaved {
    pub g: Vec<f32>,
    pub u: Vec<f32>,
    pub a: Vec<f32>,
}
