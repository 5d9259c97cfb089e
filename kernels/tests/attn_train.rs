//! Training flash attention (`ops::attn_train`, `kernels/cuda/attn_train.cu`): the forward (O and
//! the log-sum-exp) and the backward (dQ, dK, dV, the shared rope key's gradient) against an f64
//! reference on random data in the training pass's layout (queries `[rows, H, dn + dr]`, keys /
//! values `[keys, H·(dn + dv)]`, the rope key in column C of `[keys, C + dr]`; the gradients in
//! the same layouts), ragged sequences, length 1, a cached prefix, V3's / 88M's / the tiny
//! configs' dims; the backward's bit-reproducibility; bad calls. Skip without a GPU.
mod common;
use common::*;
use dsv3_core::rng::Rng;
use dsv3_kernels::ops::attn::{FlashCall, Segment};
use dsv3_kernels::ops::attn_train::{
    flash_train_backward, flash_train_fits, flash_train_forward, FlashGrads, Strided, StridedMut,
};
use dsv3_kernels::tensor::{download, zeros};
use dsv3_kernels::{Act, DType, Device};

struct Case {
    h: usize,
    dn: usize,
    dr: usize,
    dv: usize,
    c: usize,
    segs: Vec<Segment>,
    n: usize,
    keys: usize,
    ld_q: usize,
    ld_kv: usize,
    q: Vec<f32>,
    kv: Vec<f32>,
    ckv: Vec<f32>,
    dout: Vec<f32>,
    scale: f32,
}

/// `(nq, p0)` per segment (`p0 = 0`: the training layout, query, key and rope rows the same).
fn case(rng: &mut Rng, h: usize, (dn, dr, dv): (usize, usize, usize), c: usize, segs: &[(usize, usize)]) -> Case {
    let (mut out, mut n, mut keys) = (Vec::new(), 0, 0);
    for &(nq, p0) in segs {
        out.push(Segment { q_row0: n, nq, p0, k_row0: keys, pe_row0: keys });
        n += nq;
        keys += nq + p0;
    }
    let (ld_q, ld_kv) = (h * (dn + dr) + 8, h * (dn + dv) + 16);
    Case {
        h,
        dn,
        dr,
        dv,
        c,
        n,
        keys,
        ld_q,
        ld_kv,
        q: bf16r(&randn(rng, n * ld_q)),
        kv: bf16r(&randn(rng, keys * ld_kv)),
        ckv: bf16r(&randn(rng, keys * (c + dr))),
        dout: bf16r(&randn(rng, n * h * dv)),
        scale: 0.9 / ((dn + dr) as f32).sqrt(),
        segs: out,
    }
}

/// Reference `(O [n, h, dv], lse [n, h], dQ [n, h, dk], dK [keys, h, dn], dV [keys, h, dv],
/// dK_rope [keys, dr])`, D from `o_used` (the kernel's bf16 O, as the GPU pipeline).
#[allow(clippy::type_complexity)]
fn reference(k: &Case, o_used: Option<&[f32]>) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (h, dn, dr, dv, c) = (k.h, k.dn, k.dr, k.dv, k.c);
    let (dk, wkv, lc) = (dn + dr, dn + dv, c + dr);
    let (mut o, mut lse, mut dq) = (vec![0.0; k.n * h * dv], vec![0.0; k.n * h], vec![0.0; k.n * h * dk]);
    let (mut dkn, mut dvv, mut dkr) = (vec![0.0; k.keys * h * dn], vec![0.0; k.keys * h * dv], vec![0.0; k.keys * dr]);
    let sc = k.scale as f64;
    for s in &k.segs {
        for hh in 0..h {
            let key = |t: usize, j: usize| -> f64 {
                if j < dn {
                    k.kv[(s.k_row0 + t) * k.ld_kv + hh * wkv + j] as f64
                } else {
                    k.ckv[(s.pe_row0 + t) * lc + c + j - dn] as f64
                }
            };
            let val = |t: usize, j: usize| k.kv[(s.k_row0 + t) * k.ld_kv + hh * wkv + dn + j] as f64;
            for i in 0..s.nq {
                let row = s.q_row0 + i;
                let nv = s.p0 + i + 1;
                let q = &k.q[row * k.ld_q + hh * dk..][..dk];
                let d_o = &k.dout[(row * h + hh) * dv..][..dv];
                let mut p: Vec<f64> =
                    (0..nv).map(|t| sc * (0..dk).map(|j| q[j] as f64 * key(t, j)).sum::<f64>()).collect();
                let m = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                p.iter_mut().for_each(|x| *x = (*x - m).exp());
                let z: f64 = p.iter().sum();
                p.iter_mut().for_each(|x| *x /= z);
                lse[row * h + hh] = m + z.ln();
                let mut dsum = 0.0;
                for j in 0..dv {
                    let v: f64 = (0..nv).map(|t| p[t] * val(t, j)).sum();
                    o[(row * h + hh) * dv + j] = v;
                    let used = o_used.map_or(v, |u| u[(row * h + hh) * dv + j] as f64);
                    dsum += used * d_o[j] as f64;
                }
                let ds: Vec<f64> =
                    (0..nv).map(|t| p[t] * ((0..dv).map(|j| d_o[j] as f64 * val(t, j)).sum::<f64>() - dsum)).collect();
                for j in 0..dk {
                    dq[(row * h + hh) * dk + j] = sc * (0..nv).map(|t| ds[t] * key(t, j)).sum::<f64>();
                }
                for t in 0..nv {
                    let kr = s.k_row0 + t;
                    for j in 0..dn {
                        dkn[(kr * h + hh) * dn + j] += sc * ds[t] * q[j] as f64;
                    }
                    for j in 0..dr {
                        dkr[(s.pe_row0 + t) * dr + j] += sc * ds[t] * q[dn + j] as f64;
                    }
                    for j in 0..dv {
                        dvv[(kr * h + hh) * dv + j] += p[t] * d_o[j] as f64;
                    }
                }
            }
        }
    }
    (o, lse, dq, dkn, dvv, dkr)
}

/// Asserts `|got − want| <= tol·(max |want| + |want|)` elementwise; returns the largest error
/// relative to max |want|.
fn check(got: &[f32], want: &[f64], tol: f64, what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let r = want.iter().fold(0f64, |m, w| m.max(w.abs()));
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs();
        assert!(!g.is_nan() && e <= tol * (r + w.abs()), "{what}: element {i}: got {g}, want {w} (max |want| {r})");
        worst = worst.max(e);
    }
    worst / r.max(f64::MIN_POSITIVE)
}

struct Bufs {
    q: Act,
    kv: Act,
    ckv: Act,
    dout: Act,
}

fn call<'a>(k: &'a Case, b: &'a Bufs) -> FlashCall<'a> {
    let (dn, dr, dv) = (k.dn, k.dr, k.dv);
    FlashCall {
        h: k.h,
        dn,
        dr,
        dv,
        q: &b.q,
        q_off: 0,
        ld_q: k.ld_q,
        hs_q: dn + dr,
        k: &b.kv,
        k_off: 0,
        ld_k: k.ld_kv,
        hs_k: dn + dv,
        kpe: &b.ckv,
        kpe_off: k.c,
        ld_kpe: k.c + dr,
        v: &b.kv,
        v_off: dn,
        ld_v: k.ld_kv,
        hs_v: dn + dv,
        scale: k.scale,
        segs: &k.segs,
    }
}

/// Runs forward and backward; returns (O, lse, dQ, dKV, dCKV) as downloaded.
#[allow(clippy::type_complexity)]
fn run(dev: &Device, k: &Case, b: &Bufs) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (h, dn, dr, dv) = (k.h, k.dn, k.dr, k.dv);
    let c = call(k, b);
    let mut o = poisoned(dev, DType::Bf16, k.n * h * dv);
    let mut lse = zeros::<f32>(dev, k.n * h).unwrap();
    flash_train_forward(dev, &c, &mut o, 0, h * dv, dv, &mut lse).unwrap();
    let mut dq = poisoned(dev, DType::Bf16, k.n * k.ld_q);
    let mut dkv = poisoned(dev, DType::Bf16, k.keys * k.ld_kv);
    let mut dckv = poisoned(dev, DType::Bf16, k.keys * (k.c + dr));
    let g = FlashGrads {
        dq: StridedMut { buf: &mut dq, off: 0, ld: k.ld_q, hs: dn + dr },
        dkv: &mut dkv,
        dk_off: 0,
        ld_dk: k.ld_kv,
        hs_dk: dn + dv,
        dv_off: dn,
        ld_dv: k.ld_kv,
        hs_dv: dn + dv,
        dkpe: if dr > 0 { Some((&mut dckv, k.c, k.c + dr)) } else { None },
    };
    let os = Strided { buf: &o, off: 0, ld: h * dv, hs: dv };
    let ds = Strided { buf: &b.dout, off: 0, ld: h * dv, hs: dv };
    flash_train_backward(dev, &c, os, ds, &lse, g).unwrap();
    (
        o.to_f32(dev).unwrap(),
        download(dev, &lse).unwrap(),
        dq.to_f32(dev).unwrap(),
        dkv.to_f32(dev).unwrap(),
        dckv.to_f32(dev).unwrap(),
    )
}

fn bufs(dev: &Device, k: &Case) -> Bufs {
    let up = |v: &[f32]| Act::from_f32(dev, DType::Bf16, v).unwrap();
    Bufs { q: up(&k.q), kv: up(&k.kv), ckv: up(&k.ckv), dout: up(&k.dout) }
}

#[test]
fn flash_train_matches_the_reference_and_is_deterministic() {
    let Some(dev) = device("flash_train_matches_the_reference_and_is_deterministic") else { return };
    let mut rng = Rng::new(41);
    type Spec = (usize, (usize, usize, usize), usize, &'static [(usize, usize)]);
    let specs: &[Spec] = &[
        (4, (128, 64, 128), 512, &[(257, 0), (1, 0), (70, 0)]),
        (8, (64, 32, 64), 128, &[(300, 0), (64, 0), (1, 0)]),
        (4, (16, 8, 16), 32, &[(19, 0), (130, 0)]),
        (4, (32, 16, 32), 64, &[(129, 0), (2, 0)]),
        (2, (8, 8, 8), 16, &[(5, 0), (33, 0)]),
        (2, (128, 64, 128), 64, &[(90, 100), (3, 61)]),
        (1, (40, 0, 120), 32, &[(65, 2)]),
    ];
    for &(h, dims, c, segs) in specs {
        let (dn, dr, dv) = dims;
        assert!(flash_train_fits(&dev, dn, dr, dv));
        let k = case(&mut rng, h, dims, c, segs);
        let b = bufs(&dev, &k);
        let (o, lse, dq, dkv, dckv) = run(&dev, &k, &b);
        let (ro, rl, rq, rk, rv, rr) = reference(&k, Some(&o));
        let what = format!("flash train h{h} dims {dims:?} segs {segs:?}");
        let eo = check(&o, &ro, 1.2e-2, &format!("{what} O"));
        let el = check(&lse, &rl, 1e-3, &format!("{what} lse"));
        // dQ rows: h·dk of ld_q (padding stays NaN)
        let (dk, wkv) = (dn + dr, dn + dv);
        let gq: Vec<f32> = (0..k.n).flat_map(|r| dq[r * k.ld_q..][..h * dk].to_vec()).collect();
        assert!((0..k.n).all(|r| dq[r * k.ld_q + h * dk..][..8].iter().all(|x| x.is_nan())), "{what}: dQ padding");
        let eq = check(&gq, &rq, 1e-2, &format!("{what} dQ"));
        let (mut gk, mut gv) = (Vec::new(), Vec::new());
        for r in 0..k.keys {
            for hh in 0..h {
                gk.extend_from_slice(&dkv[r * k.ld_kv + hh * wkv..][..dn]);
                gv.extend_from_slice(&dkv[r * k.ld_kv + hh * wkv + dn..][..dv]);
            }
        }
        let ek = check(&gk, &rk, 1e-2, &format!("{what} dK"));
        let ev = check(&gv, &rv, 1e-2, &format!("{what} dV"));
        let er = if dr > 0 {
            let gr: Vec<f32> = (0..k.keys).flat_map(|r| dckv[r * (c + dr) + c..][..dr].to_vec()).collect();
            assert!((0..k.keys).all(|r| dckv[r * (c + dr)..][..c].iter().all(|x| x.is_nan())), "{what}: dckv[..C]");
            check(&gr, &rr, 1e-2, &format!("{what} dK_rope"))
        } else {
            0.0
        };
        eprintln!("{what}: rel err O {eo:.2e} lse {el:.2e} dQ {eq:.2e} dK {ek:.2e} dV {ev:.2e} dK_rope {er:.2e}");
        // bit-reproducible (compared as bits: the untouched poison is NaN, and NaN != NaN)
        let again = run(&dev, &k, &b);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&again.2) == bits(&dq) && bits(&again.3) == bits(&dkv), "{what}: backward not reproducible");
        assert_eq!(bits(&again.4), bits(&dckv), "{what}: dK_rope not reproducible");
    }
}

#[test]
fn flash_train_rejects_bad_calls() {
    let Some(dev) = device("flash_train_rejects_bad_calls") else { return };
    let mut rng = Rng::new(5);
    let k = case(&mut rng, 2, (16, 8, 16), 32, &[(20, 0)]);
    let b = bufs(&dev, &k);
    let mut o = poisoned(&dev, DType::Bf16, k.n * 2 * 16);
    let mut lse = zeros::<f32>(&dev, k.n * 2).unwrap();
    let good = call(&k, &b);
    let bad_ld = FlashCall { ld_q: k.ld_q - 4, ..call(&k, &b) };
    let bad_dims = FlashCall { dv: 136, ..call(&k, &b) };
    let long = [Segment { q_row0: 0, nq: 21, p0: 0, k_row0: 0, pe_row0: 0 }];
    let past = FlashCall { segs: &long, ..call(&k, &b) };
    for (what, c) in [("ld_q not a multiple of 8", &bad_ld), ("dv 136", &bad_dims), ("rows past the buffers", &past)] {
        let r = flash_train_forward(&dev, c, &mut o, 0, 32, 16, &mut lse);
        assert!(matches!(r, Err(dsv3_core::Error::Input(_))), "{what}: {r:?}");
    }
    let mut short = zeros::<f32>(&dev, k.n).unwrap();
    let r = flash_train_forward(&dev, &good, &mut o, 0, 32, 16, &mut short);
    assert!(matches!(r, Err(dsv3_core::Error::Input(_))), "short lse: {r:?}");
    flash_train_forward(&dev, &good, &mut o, 0, 32, 16, &mut lse).unwrap();
    // the backward: dkpe missing with dr > 0; dq too short
    let mut dq = poisoned(&dev, DType::Bf16, k.n * k.ld_q);
    let mut dkv = poisoned(&dev, DType::Bf16, k.keys * k.ld_kv);
    let mut small = poisoned(&dev, DType::Bf16, 8);
    let mut dckv = poisoned(&dev, DType::Bf16, k.keys * 40);
    for case_ in 0..2 {
        let g = FlashGrads {
            dq: if case_ == 1 {
                StridedMut { buf: &mut small, off: 0, ld: k.ld_q, hs: 24 }
            } else {
                StridedMut { buf: &mut dq, off: 0, ld: k.ld_q, hs: 24 }
            },
            dkv: &mut dkv,
            dk_off: 0,
            ld_dk: k.ld_kv,
            hs_dk: 32,
            dv_off: 16,
            ld_dv: k.ld_kv,
            hs_dv: 32,
            dkpe: if case_ == 1 { Some((&mut dckv, 32, 40)) } else { None },
        };
        let os = Strided { buf: &o, off: 0, ld: 32, hs: 16 };
        let ds = Strided { buf: &b.dout, off: 0, ld: 32, hs: 16 };
        let r = flash_train_backward(&dev, &good, os, ds, &lse, g);
        assert!(matches!(r, Err(dsv3_core::Error::Input(_))), "backward case {case_}: {r:?}");
    }
}
