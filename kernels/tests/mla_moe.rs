//! Absorbed MLA attention over the latent cache and the MoE router / dispatch / combine against
//! CPU references, on random data with ragged shapes (heads not a multiple of the head tile,
//! cache lengths not a multiple of the chunk, several slots, split-K, the SIMT and every
//! tensor-core MLA kernel). Skip without a GPU.
mod common;
use common::*;
use dsv3_core::config::{ScoringFunc, TopkMethod};
use dsv3_core::model::moe::Router;
use dsv3_core::rng::Rng;
use dsv3_kernels::ops::gemm::{gemm, GemmShape, Grouped};
use dsv3_kernels::ops::mla::{
    cache_append, gemm_prep, gemm_prep_runs, mla_decode, mla_decode_with, mla_kernel, mla_prep, mma_fits, MlaCall,
    MlaKernel, MlaWork, Prep, MMA_VARIANTS,
};
use dsv3_kernels::ops::moe::{
    combine, combine_counters, down_combine, down_combine_runs, plan, route, route_plan, router_route_plan, Plan,
    RouteCfg,
};
use dsv3_kernels::ops::norm::rmsnorm;
use dsv3_kernels::ops::rope::{rope, RopeLayout};
use dsv3_kernels::tensor::{download, upload};
use dsv3_kernels::{Act, DType, DWeight};

/// ō for one row and head: softmax over the first `len` cache entries of `(q̃·c + q_pe·k_pe)·scale`.
fn attend(qt: &[f32], qpe: &[f32], cache: &[f32], len: usize, c: usize, dr: usize, scale: f32) -> Vec<f32> {
    let w = c + dr;
    let s: Vec<f64> = (0..len)
        .map(|t| {
            let e = &cache[t * w..(t + 1) * w];
            let a: f64 = (0..c).map(|j| qt[j] as f64 * e[j] as f64).sum();
            let b: f64 = (0..dr).map(|j| qpe[j] as f64 * e[c + j] as f64).sum();
            (a + b) * scale as f64
        })
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
    let z: f64 = p.iter().sum();
    (0..c).map(|j| (0..len).map(|t| p[t] * cache[t * w + j] as f64).sum::<f64>() / z).map(|v| v as f32).collect()
}

/// The kernels to run for `dt` at these shapes: what `mla_decode` picks, then (bf16) the SIMT
/// kernel and every tensor-core variant this GPU runs, each explicitly.
fn mla_kernels(dev: &dsv3_kernels::Device, dt: DType, c: usize, dr: usize) -> Vec<Option<MlaKernel>> {
    let mut ks = vec![None];
    if dt == DType::Bf16 {
        ks.push(Some(MlaKernel::Simple));
        ks.extend(MMA_VARIANTS.iter().filter(|v| mma_fits(dev, v, c, dr)).map(|v| Some(MlaKernel::Mma(*v))));
    }
    ks
}

#[test]
fn mla_decode_matches_reference_with_and_without_splits() {
    let Some(dev) = device("mla_decode_matches_reference_with_and_without_splits") else { return };
    if std::env::var("DSV3_MLA_SIMPLE").as_deref() != Ok("1") {
        let k = mla_kernel(&dev, DType::Bf16, 16, 512, 64);
        assert!(
            matches!(k, MlaKernel::Mma(_)),
            "bf16 at DeepSeek's shapes should take the tensor-core kernel, got {k:?}"
        );
    }
    let mut rng = Rng::new(20);
    // (heads, C, dr, max_len, row lengths): each row in its own slot (rows in reverse slot order),
    // plus a causal prefill of 3 rows in slot 0. `None`: one random length per slot (3 slots).
    // 16/128 heads at V3's C 512 / dr 64 and 5 heads (a partial head block) at C 128 / dr 32 take
    // the tensor-core kernel in bf16; lengths straddle its 32/64-token tiles.
    type Case = (usize, usize, usize, usize, Option<&'static [usize]>);
    let cases: &[Case] = &[
        (1, 32, 16, 5, None),
        (13, 96, 32, 301, None),
        (16, 512, 64, 1030, Some(&[1, 63, 65, 1030])),
        (128, 512, 64, 1030, Some(&[1, 65, 1030])),
        (5, 128, 32, 1100, Some(&[63, 1, 1030, 65])),
    ];
    for &(h, c, dr, max_len, lens) in cases {
        let w = c + dr;
        let (mut row_slot, mut row_len) = (Vec::new(), Vec::new());
        let slots = match lens {
            Some(l) => {
                for (i, &len) in l.iter().enumerate() {
                    row_slot.push((l.len() - 1 - i) as i32);
                    row_len.push(len as i32);
                }
                l.len()
            }
            None => {
                for s in 0..3 {
                    row_slot.push(s);
                    row_len.push(1 + rng.below(max_len as u64) as i32);
                }
                3
            }
        };
        for i in 0..3.min(max_len) {
            row_slot.push(0);
            row_len.push((i + 1) as i32);
        }
        let cache = randn(&mut rng, slots * max_len * w);
        let n = row_slot.len();
        let dq = 8 + dr; // q rows [n, h, dn + dr] with the rope part at offset 8
        let qt = randn(&mut rng, n * h * c);
        let q = randn(&mut rng, n * h * dq);
        let scale = 1.0 / ((c + dr) as f32).sqrt();
        for (dt, rtol) in [(DType::F32, 1e-5), (DType::Bf16, BF16_RTOL)] {
            let r = |v: &[f32]| if dt == DType::Bf16 { bf16r(v) } else { v.to_vec() };
            let (cr, qtr, qr) = (r(&cache), r(&qt), r(&q));
            let mut want = vec![0f32; n * h * c];
            for row in 0..n {
                let s = row_slot[row] as usize;
                for hh in 0..h {
                    let o = attend(
                        &qtr[(row * h + hh) * c..(row * h + hh + 1) * c],
                        &qr[row * h * dq + hh * dq + 8..row * h * dq + hh * dq + 8 + dr],
                        &cr[s * max_len * w..(s + 1) * max_len * w],
                        row_len[row] as usize,
                        c,
                        dr,
                        scale,
                    );
                    want[(row * h + hh) * c..(row * h + hh + 1) * c].copy_from_slice(&o);
                }
            }
            let (ca, qta, qa) = (
                Act::from_f32(&dev, dt, &cache).unwrap(),
                Act::from_f32(&dev, dt, &qt).unwrap(),
                Act::from_f32(&dev, dt, &q).unwrap(),
            );
            let (rs, rl) = (upload(&dev, &row_slot).unwrap(), upload(&dev, &row_len).unwrap());
            // 40 splits: more than the tiles of most rows (empty splits)
            for kernel in mla_kernels(&dev, dt, c, dr) {
                for splits in [1usize, 3, 40] {
                    let call = MlaCall {
                        n,
                        h,
                        c,
                        dr,
                        qt: &qta,
                        ld_qt: h * c,
                        qpe: &qa,
                        qpe_off: 8,
                        ld_qpe: h * dq,
                        hs_qpe: dq,
                        cache: &ca,
                        slots,
                        max_len,
                        row_slot: &rs,
                        row_len: &rl,
                        scale,
                        splits,
                    };
                    let mut work = MlaWork::new(&dev, splits, n, h, c).unwrap();
                    let mut out = poisoned(&dev, dt, n * h * c);
                    match kernel {
                        None => mla_decode(&dev, &call, &mut out, h * c, Some(&mut work)).unwrap(),
                        Some(k) => mla_decode_with(&dev, k, &call, &mut out, h * c, Some(&mut work)).unwrap(),
                    }
                    let name = kernel.unwrap_or_else(|| mla_kernel(&dev, dt, h, c, dr)).name();
                    // outputs are convex combinations of cache values (|v| ~ 1)
                    assert_close(
                        &out.to_f32(&dev).unwrap(),
                        &want,
                        rtol,
                        rtol,
                        &format!(
                            "mla h{h} c{c} dr{dr} {dt:?} {name}{} splits {splits}",
                            if kernel.is_none() { " (auto)" } else { "" }
                        ),
                    );
                }
            }
        }
    }
}

#[test]
fn cache_append_writes_slot_rows_and_ignores_positions_past_the_end() {
    let Some(dev) = device("cache_append_writes_slot_rows_and_ignores_positions_past_the_end") else { return };
    let mut rng = Rng::new(21);
    let (slots, max_len, w, n) = (3usize, 4usize, 10usize, 3usize);
    let src = randn(&mut rng, n * w);
    let mut cache = Act::from_f32(&dev, DType::F32, &vec![7.0; slots * max_len * w]).unwrap();
    let (slot, pos) = (upload(&dev, &[2i32, 0, 1]).unwrap(), upload(&dev, &[3i32, 0, 4]).unwrap());
    cache_append(&dev, &Act::from_f32(&dev, DType::F32, &src).unwrap(), w, &mut cache, max_len, &slot, &pos, n, w)
        .unwrap();
    let got = cache.to_f32(&dev).unwrap();
    assert_eq!(&got[(2 * max_len + 3) * w..(2 * max_len + 4) * w], &src[..w]);
    assert_eq!(&got[..w], &src[w..2 * w]);
    // position 4 is past max_len: nothing written
    assert_eq!(got.iter().filter(|&&v| v == 7.0).count(), (slots * max_len - 2) * w);
}

fn router(rng: &mut Rng, e: usize, k: usize, groups: usize, topk_group: usize, v3: bool) -> Router {
    Router {
        weight: vec![],
        bias: v3.then(|| (0..e).map(|_| 0.1 * rng.normal()).collect()),
        n_experts: e,
        dim: 0,
        top_k: k,
        n_group: groups,
        topk_group,
        norm_topk_prob: v3,
        scaling: if v3 { 2.5 } else { 1.0 },
        scoring: if v3 { ScoringFunc::Sigmoid } else { ScoringFunc::Softmax },
        method: if v3 {
            TopkMethod::NoauxTc
        } else if groups > 1 {
            TopkMethod::GroupLimitedGreedy
        } else {
            TopkMethod::Greedy
        },
    }
}

#[test]
fn router_matches_cpu_select_for_v3_and_v2() {
    let Some(dev) = device("router_matches_cpu_select_for_v3_and_v2") else { return };
    let mut rng = Rng::new(22);
    for &(e, k, g, tg, v3) in &[
        (256usize, 8usize, 8usize, 4usize, true),
        (16, 4, 4, 2, true),
        (64, 6, 1, 1, false),
        (160, 6, 8, 3, false),
        (3, 1, 1, 1, true),
    ] {
        let r = router(&mut rng, e, k, g, tg, v3);
        let n = 37;
        let logits = randn(&mut rng, n * e);
        let mut idx = upload(&dev, &vec![-1i32; n * k]).unwrap();
        let mut w = upload(&dev, &vec![f32::NAN; n * k]).unwrap();
        let bias = r.bias.as_ref().map(|b| upload(&dev, b).unwrap());
        route(&dev, &upload(&dev, &logits).unwrap(), n, bias.as_ref(), &RouteCfg::of(&r), &mut idx, &mut w).unwrap();
        let (gi, gw) = (download(&dev, &idx).unwrap(), download(&dev, &w).unwrap());
        for t in 0..n {
            let want = r.select(&logits[t * e..(t + 1) * e]);
            for (q, &(we, ww)) in want.iter().enumerate() {
                assert_eq!(gi[t * k + q] as usize, we, "token {t} choice {q} (E {e}, v3 {v3})");
                assert!((gw[t * k + q] - ww).abs() <= 1e-6 * ww.abs().max(1.0), "token {t} weight {q}");
            }
        }
    }
}

#[test]
fn fused_route_plan_equals_route_then_plan() {
    let Some(dev) = device("fused_route_plan_equals_route_then_plan") else { return };
    let mut rng = Rng::new(24);
    for &(e, k, g, tg, v3, n) in &[
        (16usize, 4usize, 4usize, 2usize, true, 1usize),
        (16, 4, 4, 2, true, 16),
        (256, 8, 8, 4, true, 5),
        (64, 6, 1, 1, false, 64),
        (160, 6, 8, 3, false, 9),
    ] {
        let r = router(&mut rng, e, k, g, tg, v3);
        let cfg = RouteCfg::of(&r);
        let logits = upload(&dev, &randn(&mut rng, n * e)).unwrap();
        let bias = r.bias.as_ref().map(|b| upload(&dev, b).unwrap());
        let run = |fused: bool| {
            let mut idx = upload(&dev, &vec![-1i32; n * k]).unwrap();
            let mut w = upload(&dev, &vec![f32::NAN; n * k]).unwrap();
            let mut p = Plan::new(&dev, e, n * k).unwrap();
            if fused {
                route_plan(&dev, &logits, n, bias.as_ref(), &cfg, &mut idx, &mut w, &mut p).unwrap();
            } else {
                route(&dev, &logits, n, bias.as_ref(), &cfg, &mut idx, &mut w).unwrap();
                plan(&dev, &idx, n, k, e, &mut p).unwrap();
            }
            let dl = |s: &cudarc::driver::CudaSlice<i32>| download(&dev, s).unwrap();
            let (slot, src) = (dl(&p.slot_of), dl(&p.src_row));
            (dl(&idx), download(&dev, &w).unwrap(), dl(&p.row_offsets), dl(&p.tile_offsets), slot, src)
        };
        let (i1, w1, ro1, to1, _, _) = run(false);
        let (i2, w2, ro2, to2, slot, src) = run(true);
        assert_eq!(i1, i2, "experts (E {e}, n {n})");
        assert_eq!(
            w1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            w2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!((ro1, to1), (ro2.clone(), to2), "plan offsets (E {e}, n {n})");
        // rows within an expert may come in another order: each routed row still lands in its
        // expert's range and points back to its token
        for j in 0..n * k {
            let s = slot[j] as usize;
            let x = i2[j] as usize;
            assert!(s >= ro2[x] as usize && s < ro2[x + 1] as usize && src[s] as usize == j / k, "row {j}");
        }
    }
    let r = router(&mut rng, 16, 4, 4, 2, true);
    let n = dsv3_kernels::ops::moe::ROUTE_PLAN_MAX + 1;
    let mut idx = upload(&dev, &vec![0i32; n * 4]).unwrap();
    let mut w = upload(&dev, &vec![0f32; n * 4]).unwrap();
    let mut p = Plan::new(&dev, 16, n * 4).unwrap();
    let logits = upload(&dev, &randn(&mut rng, n * 16)).unwrap();
    let err = route_plan(&dev, &logits, n, None, &RouteCfg::of(&r), &mut idx, &mut w, &mut p).unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
}

/// The router GEMM inside the routing kernel (decode's few tokens, small routers): its logits
/// match the host's `rmsnorm(x)·Wᵀ` (bf16 rows, f64 on the host) to f32 rounding, and the routing
/// and plan are `route_plan`'s on those logits, bit for bit; with and without the folded norm, a
/// row stride past the width, V3 and V2 routing; too large a router or f32 rows are refused.
#[test]
fn router_in_the_routing_kernel_matches_gemm_then_route_plan() {
    let Some(dev) = device("router_in_the_routing_kernel_matches_gemm_then_route_plan") else { return };
    let mut rng = Rng::new(25);
    for &(e, k, g, tg, v3, n, d, ldx, normed) in &[
        (16usize, 4usize, 4usize, 2usize, true, 1usize, 512usize, 512usize, true),
        (16, 4, 4, 2, true, 8, 512, 512, true),
        (64, 6, 1, 1, false, 5, 256, 256, false),
        (16, 4, 4, 2, true, 3, 1024, 1032, true),
    ] {
        let what = format!("E {e} n {n} d {d} ldx {ldx} norm {normed}");
        let r = router(&mut rng, e, k, g, tg, v3);
        let cfg = RouteCfg::of(&r);
        let x: Vec<f32> = randn(&mut rng, n * ldx).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let nw: Vec<f32> = (0..d).map(|_| 1.0 + 0.2 * rng.normal()).collect();
        let rw: Vec<f32> = randn(&mut rng, e * d).iter().map(|v| 0.05 * v).collect();
        let eps = 1e-6f32;
        let xd = Act::from_f32(&dev, DType::Bf16, &x).unwrap();
        let (nwd, rwd) = (upload(&dev, &nw).unwrap(), upload(&dev, &rw).unwrap());
        let bias = r.bias.as_ref().map(|b| upload(&dev, b).unwrap());
        let mut logits = upload(&dev, &vec![f32::NAN; n * e]).unwrap();
        let mut idx = upload(&dev, &vec![-1i32; n * k]).unwrap();
        let mut w = upload(&dev, &vec![f32::NAN; n * k]).unwrap();
        let mut p = Plan::new(&dev, e, n * k).unwrap();
        let norm = normed.then_some((&nwd, eps));
        router_route_plan(&dev, &xd, ldx, norm, &rwd, d, &mut logits, n, bias.as_ref(), &cfg, &mut idx, &mut w, &mut p)
            .unwrap();
        let got = download(&dev, &logits).unwrap();
        let mut want = vec![0f32; n * e];
        for t in 0..n {
            let row = &x[t * ldx..t * ldx + d];
            let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
            let inv = if normed { 1.0 / (ms + eps as f64).sqrt() } else { 1.0 };
            for c in 0..e {
                let dot: f64 = (0..d)
                    .map(|j| row[j] as f64 * if normed { nw[j] as f64 } else { 1.0 } * rw[c * d + j] as f64)
                    .sum();
                want[t * e + c] = (dot * inv) as f32;
            }
        }
        assert_close(&got, &want, 1e-5, 1e-4, &format!("{what}: logits"));
        // the routing and plan on exactly those logits
        let mut idx2 = upload(&dev, &vec![-1i32; n * k]).unwrap();
        let mut w2 = upload(&dev, &vec![f32::NAN; n * k]).unwrap();
        let mut p2 = Plan::new(&dev, e, n * k).unwrap();
        route_plan(&dev, &logits, n, bias.as_ref(), &cfg, &mut idx2, &mut w2, &mut p2).unwrap();
        let dl = |s: &cudarc::driver::CudaSlice<i32>| download(&dev, s).unwrap();
        assert_eq!(dl(&idx), dl(&idx2), "{what}: experts");
        let bits = |s: &cudarc::driver::CudaSlice<f32>| {
            download(&dev, s).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(bits(&w), bits(&w2), "{what}: weights");
        assert_eq!(
            (dl(&p.row_offsets), dl(&p.tile_offsets)),
            (dl(&p2.row_offsets), dl(&p2.tile_offsets)),
            "{what}: plan"
        );
    }
    // refused: f32 rows, a router past the fused limit
    let r = router(&mut rng, 64, 4, 1, 1, false);
    let (n, d) = (2usize, 512usize);
    let mut logits = upload(&dev, &vec![0f32; n * 64]).unwrap();
    let mut idx = upload(&dev, &vec![0i32; n * 4]).unwrap();
    let mut w = upload(&dev, &vec![0f32; n * 4]).unwrap();
    let mut p = Plan::new(&dev, 64, n * 4).unwrap();
    let rwd = upload(&dev, &vec![0.01f32; 64 * d]).unwrap();
    let xb = Act::from_f32(&dev, DType::Bf16, &randn(&mut rng, n * d)).unwrap();
    let cfg = RouteCfg::of(&r);
    let e1 = router_route_plan(&dev, &xb, d, None, &rwd, d, &mut logits, n, None, &cfg, &mut idx, &mut w, &mut p);
    assert!(e1.is_err(), "64 x 512 router weights accepted");
    let xf = Act::from_f32(&dev, DType::F32, &randn(&mut rng, n * d)).unwrap();
    let e2 = router_route_plan(&dev, &xf, d, None, &rwd, 8, &mut logits, n, None, &cfg, &mut idx, &mut w, &mut p);
    assert!(e2.is_err(), "f32 rows accepted");
}

#[test]
fn dispatch_plan_and_combine_match_cpu() {
    let Some(dev) = device("dispatch_plan_and_combine_match_cpu") else { return };
    let mut rng = Rng::new(23);
    let (n, k, e, d) = (70usize, 4usize, 9usize, 33usize);
    // distinct experts per token, skewed so that one expert gets more than a tile
    let idx: Vec<i32> = (0..n)
        .flat_map(|t| {
            let first = if t % 3 == 0 { 0 } else { 1 + rng.below((e - 1) as u64) as usize };
            (0..k).map(move |q| ((first + q * 2) % e) as i32)
        })
        .collect();
    let wts: Vec<f32> = (0..n * k).map(|_| rng.uniform()).collect();
    let idx_d = upload(&dev, &idx).unwrap();
    let mut p = Plan::new(&dev, e, n * k).unwrap();
    plan(&dev, &idx_d, n, k, e, &mut p).unwrap();
    let (ro, to, slot, src) = (
        download(&dev, &p.row_offsets).unwrap(),
        download(&dev, &p.tile_offsets).unwrap(),
        download(&dev, &p.slot_of).unwrap(),
        download(&dev, &p.src_row).unwrap(),
    );
    assert_eq!(ro[e] as usize, n * k);
    for x in 0..e {
        let cnt = idx.iter().filter(|&&v| v == x as i32).count();
        assert_eq!((ro[x + 1] - ro[x]) as usize, cnt, "expert {x}");
        assert_eq!((to[x + 1] - to[x]) as usize, cnt.div_ceil(64), "tiles of expert {x}");
    }
    for j in 0..n * k {
        let s = slot[j] as usize;
        assert!(s >= ro[idx[j] as usize] as usize && s < ro[idx[j] as usize + 1] as usize, "row {j} in its expert");
        assert_eq!(src[s] as usize, j / k);
    }
    // combine: x += shared + Σ w·y[slot]
    let y = randn(&mut rng, n * k * d);
    let shared = randn(&mut rng, n * d);
    let x0 = randn(&mut rng, n * d);
    let mut want = x0.clone();
    for t in 0..n {
        for j in 0..d {
            let r: f32 = (0..k).map(|q| wts[t * k + q] * y[slot[t * k + q] as usize * d + j]).sum();
            want[t * d + j] += shared[t * d + j] + r;
        }
    }
    let mut x = Act::from_f32(&dev, DType::F32, &x0).unwrap();
    let (ya, sa) = (Act::from_f32(&dev, DType::F32, &y).unwrap(), Act::from_f32(&dev, DType::F32, &shared).unwrap());
    combine(&dev, &ya, &p, &idx_d, &upload(&dev, &wts).unwrap(), Some(&sa), &mut x, n, k, d).unwrap();
    assert_close(&x.to_f32(&dev).unwrap(), &want, 1e-5, 1e-5, "combine");
}

/// The routed experts' down GEMM with the combine in the same launch (decode) gives the bits of
/// the grouped GEMM followed by `combine`: f32, bf16 and FP8 weights; one token (bench-88m's
/// shape) to 32, output widths that leave a partial 16-column tile, experts with no rows, with
/// and without a shared expert; a second launch on the same counters (the kernel re-arms them,
/// as graph replays need) gives the same bits again. Too many rows, a mismatched C dtype and too
/// few counters are refused.
#[test]
fn fused_down_combine_equals_down_gemm_then_combine_bit_for_bit() {
    let Some(dev) = device("fused_down_combine_equals_down_gemm_then_combine_bit_for_bit") else { return };
    let mut rng = Rng::new(26);
    // (tokens, top-k, experts, d, I)
    for &(n, k, e, d, i) in
        &[(1usize, 4usize, 16usize, 512usize, 256usize), (3, 4, 16, 72, 64), (8, 6, 9, 200, 40), (32, 4, 16, 136, 24)]
    {
        let nk = n * k;
        // distinct experts per token, from a random start
        let idx: Vec<i32> = (0..n)
            .flat_map(|_| {
                let first = rng.below(e as u64) as usize;
                (0..k).map(move |q| ((first + q) % e) as i32)
            })
            .collect();
        let wts: Vec<f32> = (0..nk).map(|_| 0.1 + rng.uniform()).collect();
        let (idx_d, w_d) = (upload(&dev, &idx).unwrap(), upload(&dev, &wts).unwrap());
        let mut p = Plan::new(&dev, e, nk).unwrap();
        plan(&dev, &idx_d, n, k, e, &mut p).unwrap();
        let max_tiles = Plan::max_tiles(nk, e);
        for kind in ["f32", "bf16", "fp8"] {
            let dt = if kind == "f32" { DType::F32 } else { DType::Bf16 };
            let down = match kind {
                "fp8" => {
                    let (q, s, _) = fp8_weight(&mut rng, e, d, i);
                    DWeight::from_fp8(&dev, e, d, i, &q, &s).unwrap()
                }
                _ => DWeight::from_f32(&dev, dt, e, d, i, &randn(&mut rng, e * d * i)).unwrap(),
            };
            assert!(down_combine_runs(&dev, dt, &down, &p, nk, max_tiles), "n {n} d {d} {kind}: not fused");
            let act = Act::from_f32(&dev, dt, &randn(&mut rng, nk * i)).unwrap();
            let x0 = randn(&mut rng, n * d);
            let with_shared = n % 2 == 1;
            let shared = Act::from_f32(&dev, dt, &randn(&mut rng, n * d)).unwrap();
            let sh = with_shared.then_some(&shared);
            let what = format!("n {n} k {k} E {e} d {d} I {i} {kind} shared {with_shared}");
            // two launches
            let mut ye = poisoned(&dev, dt, nk * d);
            let g = Grouped { row_offsets: &p.row_offsets, tile_offsets: &p.tile_offsets, max_tiles };
            gemm(&dev, &act, &down, &mut ye, &GemmShape { grouped: Some(g), ..GemmShape::plain(nk, i, d) }).unwrap();
            let mut xa = Act::from_f32(&dev, dt, &x0).unwrap();
            combine(&dev, &ye, &p, &idx_d, &w_d, sh, &mut xa, n, k, d).unwrap();
            let want: Vec<u32> = xa.to_f32(&dev).unwrap().iter().map(|v| v.to_bits()).collect();
            assert!(want.iter().all(|b| f32::from_bits(*b).is_finite()), "{what}: reference not finite");
            // one launch, twice on the same counters
            let counters = combine_counters(&dev, d).unwrap();
            for run in 0..2 {
                let mut xb = Act::from_f32(&dev, dt, &x0).unwrap();
                down_combine(&dev, &act, &down, &p, max_tiles, &idx_d, &w_d, sh, &mut xb, &counters, n, k).unwrap();
                let got: Vec<u32> = xb.to_f32(&dev).unwrap().iter().map(|v| v.to_bits()).collect();
                let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                assert_eq!(bad, 0, "{what} run {run}: {bad} of {} elements differ", want.len());
                assert!(download(&dev, &counters).unwrap().iter().all(|&c| c == 0), "{what}: counters not re-armed");
            }
        }
    }
    // refused: more rows than the skinny kernels take, C in another dtype, too few counters
    let (n, k, e, d, i) = (80usize, 4usize, 4usize, 32usize, 16usize);
    let idx: Vec<i32> = (0..n * k).map(|j| (j % e) as i32).collect();
    let (idx_d, w_d) = (upload(&dev, &idx).unwrap(), upload(&dev, &vec![0.5f32; n * k]).unwrap());
    let mut p = Plan::new(&dev, e, n * k).unwrap();
    plan(&dev, &idx_d, n, k, e, &mut p).unwrap();
    let down = DWeight::from_f32(&dev, DType::Bf16, e, d, i, &randn(&mut rng, e * d * i)).unwrap();
    let counters = combine_counters(&dev, d).unwrap();
    let act = Act::from_f32(&dev, DType::Bf16, &randn(&mut rng, n * k * i)).unwrap();
    let mut x = Act::from_f32(&dev, DType::Bf16, &randn(&mut rng, n * d)).unwrap();
    let mt = Plan::max_tiles(n * k, e);
    assert!(!down_combine_runs(&dev, DType::Bf16, &down, &p, n * k, mt));
    assert!(down_combine(&dev, &act, &down, &p, mt, &idx_d, &w_d, None, &mut x, &counters, n, k).is_err(), "320 rows");
    let n = 2;
    let mut xf = Act::from_f32(&dev, DType::F32, &randn(&mut rng, n * d)).unwrap();
    let r = down_combine(&dev, &act, &down, &p, mt, &idx_d, &w_d, None, &mut xf, &counters, n, k);
    assert!(r.is_err(), "f32 x with bf16 activations accepted");
    let few = upload(&dev, &[0i32]).unwrap();
    let r = down_combine(&dev, &act, &down, &p, mt, &idx_d, &w_d, None, &mut x, &few, n, k);
    assert!(r.is_err(), "one counter for two column tiles accepted");
}

#[test]
fn fused_prep_equals_norm_rope_and_append_bit_for_bit() {
    let Some(dev) = device("fused_prep_equals_norm_rope_and_append_bit_for_bit") else { return };
    let mut rng = Rng::new(22);
    // (heads, dn, C, dr): V3-like, and small odd ones
    for &(h, dn, c, dr) in &[(8usize, 64usize, 512usize, 64usize), (3, 8, 96, 32), (1, 4, 40, 6)] {
        let (slots, max_len, n) = (3usize, 9usize, 5usize);
        let w = c + dr;
        let dq = dn + dr;
        let ckv = randn(&mut rng, n * w);
        let q = randn(&mut rng, n * h * dq);
        let norm: Vec<f32> = randn(&mut rng, c).iter().map(|v| 1.0 + 0.1 * v).collect();
        let inv_freq: Vec<f32> = (0..dr / 2).map(|i| 10000f32.powf(-(2.0 * i as f32) / dr as f32)).collect();
        // ragged positions; the last row's position is past max_len (skipped in the cache)
        let (slot, pos) = ([2i32, 0, 1, 0, 1], [3i32, 0, 8, 1, 9]);
        let (slot_d, pos_d) = (upload(&dev, &slot).unwrap(), upload(&dev, &pos).unwrap());
        let (norm_d, freq_d) = (upload(&dev, &norm).unwrap(), upload(&dev, &inv_freq).unwrap());
        for dt in [DType::F32, DType::Bf16] {
            let fill = vec![7.0f32; slots * max_len * w];
            // unfused: normalize in place, rotate k_pe and q_pe, append
            let mut ckv_a = Act::from_f32(&dev, dt, &ckv).unwrap();
            let mut q_a = Act::from_f32(&dev, dt, &q).unwrap();
            let mut cache_a = Act::from_f32(&dev, dt, &fill).unwrap();
            rmsnorm(&dev, &mut ckv_a, 0, w, None, &norm_d, c, 1e-6, n).unwrap();
            let kl = RopeLayout { rows: n, ld_row: w, heads: 1, ld_head: w, offset: c, half: dr / 2 };
            rope(&dev, &mut ckv_a, kl, &pos_d, &freq_d, 1.3).unwrap();
            let ql = RopeLayout { rows: n, ld_row: h * dq, heads: h, ld_head: dq, offset: dn, half: dr / 2 };
            rope(&dev, &mut q_a, ql, &pos_d, &freq_d, 1.3).unwrap();
            cache_append(&dev, &ckv_a, w, &mut cache_a, max_len, &slot_d, &pos_d, n, w).unwrap();
            // fused
            let ckv_b = Act::from_f32(&dev, dt, &ckv).unwrap();
            let mut q_b = Act::from_f32(&dev, dt, &q).unwrap();
            let mut cache_b = Act::from_f32(&dev, dt, &fill).unwrap();
            let p = Prep {
                n,
                c,
                dr,
                h,
                ckv: &ckv_b,
                ckv_off: 0,
                ld_ckv: w,
                kv_norm: &norm_d,
                eps: 1e-6,
                ld_q: h * dq,
                hs_q: dq,
                q_off: dn,
                pos: &pos_d,
                slot: &slot_d,
                inv_freq: &freq_d,
                attention_factor: 1.3,
                max_len,
            };
            mla_prep(&dev, &p, &mut q_b, &mut cache_b).unwrap();
            let what = format!("prep h{h} c{c} dr{dr} {dt:?}");
            let (ca, cb) = (cache_a.to_f32(&dev).unwrap(), cache_b.to_f32(&dev).unwrap());
            assert!(ca.iter().zip(&cb).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: cache differs");
            assert_eq!(cb.iter().filter(|&&v| v == 7.0).count(), (slots * max_len - 4) * w, "{what}: rows written");
            let (qa, qb) = (q_a.to_f32(&dev).unwrap(), q_b.to_f32(&dev).unwrap());
            assert!(qa.iter().zip(&qb).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: queries differ");
        }
    }
}

/// The query projection's last GEMM with `mla_prep` in the same launch (decode) gives the bits
/// of the GEMM followed by `mla_prep`, for the queries and the cache: f32, bf16 and FP8 weights;
/// the folded layout (rope parts after all heads' latents) and the plain one (rope after each
/// head's nope part); the latent in the q_a buffer (q_a ‖ kv_a) or its own; 1 to 13 rows (two
/// row tiles), one position past the slot (not appended), with and without the folded norm and
/// a bias. Shapes the fused kernel cannot take are refused.
#[test]
fn fused_query_gemm_and_prep_equal_gemm_then_mla_prep_bit_for_bit() {
    let Some(dev) = device("fused_query_gemm_and_prep_equal_gemm_then_mla_prep_bit_for_bit") else { return };
    let mut rng = Rng::new(27);
    // (heads, C, dr, dn (0: folded), q LoRA rank, rows, latent in the q_a buffer)
    for &(h, c, dr, dn, rq, n, shared_buf) in &[
        (8usize, 128usize, 32usize, 0usize, 256usize, 1usize, true),
        (8, 128, 32, 64, 256, 3, true),
        (3, 96, 16, 0, 64, 8, false),
        (2, 64, 64, 24, 40, 13, false),
    ] {
        let w = c + dr;
        let (ld_q, hs_q, q_off) = if dn == 0 { (h * w, dr, h * c) } else { (h * (dn + dr), dn + dr, dn) };
        let (slots, max_len) = (2usize, 16usize);
        let width = if shared_buf { rq + w } else { rq };
        let qa_host = randn(&mut rng, n * width);
        let ckv_host = randn(&mut rng, n * w);
        let norm: Vec<f32> = randn(&mut rng, c).iter().map(|v| 1.0 + 0.1 * v).collect();
        let qn: Vec<f32> = randn(&mut rng, rq).iter().map(|v| 1.0 + 0.1 * v).collect();
        let bias = randn(&mut rng, ld_q);
        let inv_freq: Vec<f32> = (0..dr / 2).map(|i| 10000f32.powf(-(2.0 * i as f32) / dr as f32)).collect();
        let slot: Vec<i32> = (0..n).map(|r| (r % slots) as i32).collect();
        let mut pos: Vec<i32> = (0..n).map(|r| (r / slots) as i32 + 3).collect();
        if n > 1 {
            pos[n - 1] = max_len as i32 + 2; // outside the slot: not appended, its query still rotated
        }
        let (slot_d, pos_d) = (upload(&dev, &slot).unwrap(), upload(&dev, &pos).unwrap());
        let (norm_d, qn_d, freq_d, bias_d) = (
            upload(&dev, &norm).unwrap(),
            upload(&dev, &qn).unwrap(),
            upload(&dev, &inv_freq).unwrap(),
            upload(&dev, &bias).unwrap(),
        );
        for kind in ["f32", "bf16", "fp8"] {
            let dt = if kind == "f32" { DType::F32 } else { DType::Bf16 };
            let wb = match kind {
                "fp8" => {
                    let (q8, s, _) = fp8_weight(&mut rng, 1, ld_q, rq);
                    DWeight::from_fp8(&dev, 1, ld_q, rq, &q8, &s).unwrap()
                }
                _ => DWeight::from_f32(&dev, dt, 1, ld_q, rq, &randn(&mut rng, ld_q * rq)).unwrap(),
            };
            let qa = Act::from_f32(&dev, dt, &qa_host).unwrap();
            let ckv_own = Act::from_f32(&dev, dt, &ckv_host).unwrap();
            let (ckv, ckv_off, ld_ckv) = if shared_buf { (&qa, rq, width) } else { (&ckv_own, 0, w) };
            for (normed, biased) in [(true, false), (false, true)] {
                let what = format!("h{h} c{c} dr{dr} dn{dn} n{n} {kind} norm {normed} bias {biased}");
                let s = GemmShape {
                    lda: width,
                    norm: normed.then_some((&qn_d, 1e-6)),
                    bias: biased.then_some(&bias_d),
                    ..GemmShape::plain(n, rq, ld_q)
                };
                let p = Prep {
                    n,
                    c,
                    dr,
                    h,
                    ckv,
                    ckv_off,
                    ld_ckv,
                    kv_norm: &norm_d,
                    eps: 1e-6,
                    ld_q,
                    hs_q,
                    q_off,
                    pos: &pos_d,
                    slot: &slot_d,
                    inv_freq: &freq_d,
                    attention_factor: 1.3,
                    max_len,
                };
                assert!(gemm_prep_runs(&dev, dt, &wb, &s, &p), "{what}: not fused");
                let fill = vec![7.0f32; slots * max_len * w];
                let (mut q1, mut cache1) = (poisoned(&dev, dt, n * ld_q), Act::from_f32(&dev, dt, &fill).unwrap());
                gemm(&dev, &qa, &wb, &mut q1, &s).unwrap();
                mla_prep(&dev, &p, &mut q1, &mut cache1).unwrap();
                let (mut q2, mut cache2) = (poisoned(&dev, dt, n * ld_q), Act::from_f32(&dev, dt, &fill).unwrap());
                gemm_prep(&dev, &qa, &wb, &s, &p, &mut q2, &mut cache2).unwrap();
                let bits = |a: &Act| a.to_f32(&dev).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                let (qw, qg) = (bits(&q1), bits(&q2));
                assert!(qw.iter().all(|b| f32::from_bits(*b).is_finite()), "{what}: reference queries not finite");
                let bad = qw.iter().zip(&qg).filter(|(a, b)| a != b).count();
                assert_eq!(bad, 0, "{what}: {bad} of {} query values differ", qw.len());
                let (cw, cg) = (bits(&cache1), bits(&cache2));
                let bad = cw.iter().zip(&cg).filter(|(a, b)| a != b).count();
                assert_eq!(bad, 0, "{what}: {bad} cache values differ");
                let written = cg.iter().filter(|&&b| f32::from_bits(b) != 7.0).count();
                assert_eq!(written, if n > 1 { n - 1 } else { 1 } * w, "{what}: latents appended");
            }
        }
    }
    // refused: an odd rope offset, and a one-row GEMM wide enough for the one-row kernels
    let (h, c, dr, rq) = (2usize, 64usize, 32usize, 64usize);
    let w = c + dr;
    let ld_q = h * (7 + dr);
    let wb = DWeight::from_f32(&dev, DType::Bf16, 1, ld_q, rq, &randn(&mut rng, ld_q * rq)).unwrap();
    let qa = Act::from_f32(&dev, DType::Bf16, &randn(&mut rng, 2 * rq)).unwrap();
    let ckv = Act::from_f32(&dev, DType::Bf16, &randn(&mut rng, 2 * w)).unwrap();
    let (norm_d, freq_d) = (upload(&dev, &vec![1f32; c]).unwrap(), upload(&dev, &vec![0.5f32; dr / 2]).unwrap());
    let (pos_d, slot_d) = (upload(&dev, &[0i32, 1]).unwrap(), upload(&dev, &[0i32, 0]).unwrap());
    let mut p = Prep {
        n: 2,
        c,
        dr,
        h,
        ckv: &ckv,
        ckv_off: 0,
        ld_ckv: w,
        kv_norm: &norm_d,
        eps: 1e-6,
        ld_q,
        hs_q: 7 + dr,
        q_off: 7,
        pos: &pos_d,
        slot: &slot_d,
        inv_freq: &freq_d,
        attention_factor: 1.0,
        max_len: 4,
    };
    let s = GemmShape::plain(2, rq, ld_q);
    let mut q = Act::empty(&dev, DType::Bf16, 2 * ld_q).unwrap();
    let mut cache = Act::empty(&dev, DType::Bf16, 4 * w).unwrap();
    assert!(!gemm_prep_runs(&dev, DType::Bf16, &wb, &s, &p));
    assert!(gemm_prep(&dev, &qa, &wb, &s, &p, &mut q, &mut cache).is_err(), "odd rope offset accepted");
    let wide = 4096usize;
    let wb = DWeight::from_f32(&dev, DType::Bf16, 1, wide, rq, &randn(&mut rng, wide * rq)).unwrap();
    (p.n, p.ld_q, p.hs_q, p.q_off) = (1, wide, dr, 0);
    let s = GemmShape::plain(1, rq, wide);
    let mut q = Act::empty(&dev, DType::Bf16, wide).unwrap();
    assert!(!gemm_prep_runs(&dev, DType::Bf16, &wb, &s, &p), "a one-row-kernel GEMM taken");
    assert!(gemm_prep(&dev, &qa, &wb, &s, &p, &mut q, &mut cache).is_err());
}
