//! The training pass's attention on the flash kernels ([`crate::ops::attn_train`]) in bf16 mode:
//! per layer the forward keeps the log-sum-exp (`[N, H]` f32) instead of the causal probabilities
//! (`Σ heads·seqs·len²`), and the backward recomputes them tile by tile. The explicit path
//! (scores, `attn_softmax_causal`, batched GEMMs in `block.rs`) stays the f32 oracle and runs in
//! bf16 mode too when `DSV3_TRAIN_FLASH=0` or when the head dims are not the kernels'
//! (`dn + dr <= 192`, `dv <= 128`, multiples of 8).
use super::block::Cx;
use super::mm::{f32_of, f32_of_mut};
use crate::ops::attn::{FlashCall, Segment};
use crate::ops::attn_train::{
    flash_train_backward, flash_train_fits, flash_train_forward, FlashGrads, Strided, StridedMut,
};
use crate::tensor::{Act, DType};
use dsv3_core::Result;
use std::sync::OnceLock;

/// `DSV3_TRAIN_FLASH` (read once): `0` keeps the explicit attention in bf16 mode.
fn flash_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DSV3_TRAIN_FLASH").map_or(true, |v| v.trim() != "0"))
}

impl Cx<'_> {
    /// Whether this pass runs attention on the flash kernels: bf16 mode, not switched off, the
    /// head dims taken and fitting the GPU's shared memory, and the rope key's column offset in
    /// `ckv` (`kv_lora_rank`) a multiple of 8 (the kernels' 16-byte loads; the launchers refuse
    /// it otherwise). The same answer forward and backward.
    pub(super) fn flash_attn(&self) -> bool {
        let dm = &self.dm;
        self.dt == DType::Bf16
            && flash_enabled()
            && dm.c.is_multiple_of(8)
            && flash_train_fits(self.dev, dm.dn, dm.dr, dm.dv)
    }

    /// One segment per sequence (causal within it; query, key and rope rows the same).
    fn flash_segments(&self) -> Vec<Segment> {
        let mut segs = Vec::new();
        for r in &self.b.runs {
            for s in 0..r.seqs {
                let row0 = r.row0 + s * r.len;
                segs.push(Segment { q_row0: row0, nq: r.len, p0: 0, k_row0: row0, pe_row0: row0 });
            }
        }
        segs
    }

    /// The call over the pass's buffers: `q` `[N, H, dn + dr]`, `kv` `[N, H, dn + dv]` (k_nope ‖ v
    /// per head), the rope key in column `C` of `ckv` `[N, C + dr]`.
    fn flash_call<'a>(&self, q: &'a Act, kv: &'a Act, ckv: &'a Act, segs: &'a [Segment]) -> FlashCall<'a> {
        let dm = &self.dm;
        let (h, dn, dr, dv, c) = (dm.h, dm.dn, dm.dr, dm.dv, dm.c);
        FlashCall {
            h,
            dn,
            dr,
            dv,
            q,
            q_off: 0,
            ld_q: h * (dn + dr),
            hs_q: dn + dr,
            k: kv,
            k_off: 0,
            ld_k: h * (dn + dv),
            hs_k: dn + dv,
            kpe: ckv,
            kpe_off: c,
            ld_kpe: c + dr,
            v: kv,
            v_off: dn,
            ld_v: h * (dn + dv),
            hs_v: dn + dv,
            scale: dm.scale,
            segs,
        }
    }

    /// Attention forward: writes `attn` `[N, H, dv]`, returns the log-sum-exp `[N, H]` (f32).
    pub(super) fn flash_attn_fwd(&self, q: &Act, kv: &Act, ckv: &Act, attn: &mut Act) -> Result<Act> {
        let (n, h, dv) = (self.b.n, self.dm.h, self.dm.dv);
        let mut lse = Act::empty(self.dev, DType::F32, n * h)?;
        let segs = self.flash_segments();
        let c = self.flash_call(q, kv, ckv, &segs);
        flash_train_forward(self.dev, &c, attn, 0, h * dv, dv, f32_of_mut(&mut lse)?)?;
        Ok(lse)
    }

    /// Attention backward from `dattn` (`[N, H, dv]`): returns `(dq [N, H, dn + dr], dkv [N, H,
    /// dn + dv], dckv [N, C + dr])`, dckv's rope columns written (the sum over heads), its first
    /// `C` columns left for the caller.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_attn_bwd(
        &self,
        q: &Act,
        kv: &Act,
        ckv: &Act,
        attn: &Act,
        lse: &Act,
        dattn: &Act,
    ) -> Result<(Act, Act, Act)> {
        let dm = &self.dm;
        let (n, h, dn, dr, dv, c) = (self.b.n, dm.h, dm.dn, dm.dr, dm.dv, dm.c);
        let (dk, w) = (dn + dr, h * (dn + dv));
        let mut dq = self.act_of(n * h * dk)?;
        let mut dkv = self.act_of(n * w)?;
        let mut dckv = self.act_of(n * (c + dr))?;
        let segs = self.flash_segments();
        let call = self.flash_call(q, kv, ckv, &segs);
        let g = FlashGrads {
            dq: StridedMut { buf: &mut dq, off: 0, ld: h * dk, hs: dk },
            dkv: &mut dkv,
            dk_off: 0,
            ld_dk: w,
            hs_dk: dn + dv,
            dv_off: dn,
            ld_dv: w,
            hs_dv: dn + dv,
            dkpe: if dr > 0 { Some((&mut dckv, c, c + dr)) } else { None },
        };
        let o = Strided { buf: attn, off: 0, ld: h * dv, hs: dv };
        let d_o = Strided { buf: dattn, off: 0, ld: h * dv, hs: dv };
        flash_train_backward(self.dev, &call, o, d_o, f32_of(lse)?, g)?;
        Ok((dq, dkv, dckv))
    }

    fn act_of(&self, len: usize) -> Result<Act> {
        Act::empty(self.dev, self.dt, len)
    }
}
