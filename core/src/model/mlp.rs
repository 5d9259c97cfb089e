//! SwiGLU MLP: `down(silu(gate(x)) ⊙ up(x))` — the dense FFN, each routed expert, and the
//! shared experts.
use crate::error::Result;
use crate::model::linear::{Fp8Mode, Linear};
use crate::ops::swiglu::swiglu;
use crate::weights::TensorStore;
use alloc::format;
use alloc::vec;

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
        let i = self.gate.out_dim;
        let mut g = vec![0f32; n * i];
        let mut u = vec![0f32; n * i];
        self.gate.forward(x, n, &mut g);
        self.up.forward(x, n, &mut u);
        let mut a = vec![0f32; n * i];
        swiglu(&g, &u, &mut a);
        self.down.forward(&a, n, y);
    }
}
