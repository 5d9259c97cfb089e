//! MoE training kernels (`ops::moe_train`) and the causal attention softmax for training
//! (`ops::train::attn_softmax_*`) against the CPU oracle (`dsv3_core::model::moe::Router`,
//! `dsv3_core::ops::softmax`) on random data with poisoned outputs. Skip without a GPU.
mod common;
use common::*;
use dsv3_core::config::{ScoringFunc, TopkMethod};
use dsv3_core::model::moe::Router;
use dsv3_core::ops::softmax::{softmax_backward_inplace, softmax_inplace};
use dsv3_core::rng::Rng;
use dsv3_kernels::ops::fp8::t128_segments;
use dsv3_kernels::ops::moe::{self, Plan, RouteCfg};
use dsv3_kernels::ops::{moe_train, train};
use dsv3_kernels::tensor::{download, upload};
use dsv3_kernels::{Act, DType};

fn router(e: usize, k: usize, groups: usize, topk_group: usize, scoring: ScoringFunc, norm: bool) -> Router {
    let method = match scoring {
        ScoringFunc::Sigmoid => TopkMethod::NoauxTc,
        ScoringFunc::Softmax => TopkMethod::Greedy,
    };
    Router {
        weight: vec![0.0; e],
        bias: Some(vec![0.0; e]),
        n_experts: e,
        dim: 1,
        top_k: k,
        n_group: groups,
        topk_group,
        norm_topk_prob: norm,
        scaling: 2.5,
        scoring,
        method,
    }
}

/// Router logits `[n, E]` and the CPU's routing of them (experts `[n, K]` best first, weights).
fn routed(rng: &mut Rng, r: &Router, n: usize) -> (Vec<f32>, Vec<i32>, Vec<f32>, Vec<dsv3_core::model::moe::Routing>) {
    let logits: Vec<f32> = (0..n * r.n_experts).map(|_| 2.0 * rng.normal()).collect();
    let routes: Vec<_> = logits.chunks_exact(r.n_experts).map(|l| r.select(l)).collect();
    let idx = routes.iter().flat_map(|rt| rt.iter().map(|&(e, _)| e as i32)).collect();
    let w = routes.iter().flat_map(|rt| rt.iter().map(|&(_, w)| w)).collect();
    (logits, idx, w, routes)
}

#[test]
fn router_backward_matches_weights_backward() {
    let Some(dev) = device("router_backward_matches_weights_backward") else { return };
    let mut rng = Rng::new(91);
    let cases = [
        (16, 4, 4, 2, ScoringFunc::Sigmoid, true, 37),
        (256, 8, 8, 4, ScoringFunc::Sigmoid, true, 19),
        (64, 6, 1, 1, ScoringFunc::Softmax, false, 23),
        (37, 3, 1, 1, ScoringFunc::Sigmoid, false, 5),
    ];
    for (e, k, g, tg, sc, norm, n) in cases {
        let r = router(e, k, g, tg, sc, norm);
        let (logits, idx, _w, routes) = routed(&mut rng, &r, n);
        let dw = randn(&mut rng, n * k);
        let want: Vec<f32> = (0..n)
            .flat_map(|t| r.weights_backward(&logits[t * e..(t + 1) * e], &routes[t], &dw[t * k..(t + 1) * k]))
            .collect();
        let cfg = RouteCfg::of(&r);
        let mut dl = upload(&dev, &vec![f32::NAN; n * e]).unwrap();
        moe_train::router_backward(
            &dev,
            &upload(&dev, &logits).unwrap(),
            &upload(&dev, &idx).unwrap(),
            &upload(&dev, &dw).unwrap(),
            &cfg,
            n,
            &mut dl,
        )
        .unwrap();
        let got = download(&dev, &dl).unwrap();
        // same f32 operations in the same order (FMA contraction aside)
        assert_close(&got, &want, 1e-6, 1e-5, &format!("router_backward E{e} K{k} {sc:?}"));
    }
}

#[test]
fn balance_loss_loads_and_bias_update_match_the_oracle() {
    let Some(dev) = device("balance_loss_loads_and_bias_update_match_the_oracle") else { return };
    let mut rng = Rng::new(92);
    for (sc, lens) in [(ScoringFunc::Sigmoid, vec![5usize, 0, 17, 9]), (ScoringFunc::Softmax, vec![23])] {
        let (e, k) = (16, 4);
        let r = router(e, k, 4, 2, sc, true);
        let n: usize = lens.iter().sum();
        let (logits, idx, _w, routes) = routed(&mut rng, &r, n);
        let (alpha, scale) = (0.01f32, 0.5f32);
        let dl0 = randn(&mut rng, n * e);
        let mut want = dl0.clone();
        let mut spans = Vec::new();
        let mut at = 0;
        for &l in &lens {
            spans.push(at..at + l);
            at += l;
        }
        let want_loss = r.balance_loss(&logits, &routes, &spans, alpha, scale, &mut want);
        let d_spans = moe_train::Spans::new(&dev, &lens).unwrap();
        let cfg = RouteCfg::of(&r);
        let (dlog, didx) = (upload(&dev, &logits).unwrap(), upload(&dev, &idx).unwrap());
        let mut dl = upload(&dev, &dl0).unwrap();
        let loss = moe_train::balance_loss(&dev, &dlog, &didx, &cfg, &d_spans, alpha, scale, &mut dl).unwrap();
        assert!((loss - want_loss).abs() <= 1e-6 * want_loss.abs() + 1e-9, "balance loss {loss} vs {want_loss}");
        assert_close(&download(&dev, &dl).unwrap(), &want, 1e-6, 1e-5, &format!("balance dlogits {sc:?}"));
        // loads and the bias rule (core::train::trainer::update_biases)
        let load = moe_train::expert_loads(&dev, &didx, n, e, k).unwrap();
        let want_load = r.loads(&routes);
        let got_load = download(&dev, &load).unwrap();
        assert_eq!(got_load.iter().map(|&v| v as u32).collect::<Vec<_>>(), want_load);
        let b0 = randn(&mut rng, e);
        let mut bias = upload(&dev, &b0).unwrap();
        moe_train::bias_update(&dev, &load, e, 0.001, &mut bias).unwrap();
        let mean = want_load.iter().sum::<u32>() as f32 / e as f32;
        let want_b: Vec<f32> = b0
            .iter()
            .zip(&want_load)
            .map(|(&b, &l)| {
                let d = mean - l as f32;
                b + 0.001
                    * if d > 0.0 {
                        1.0
                    } else if d < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }
            })
            .collect();
        assert_eq!(download(&dev, &bias).unwrap(), want_b, "bias update");
    }
}

#[test]
fn combine_and_dispatch_backward_match_the_cpu() {
    let Some(dev) = device("combine_and_dispatch_backward_match_the_cpu") else { return };
    let mut rng = Rng::new(93);
    for (dt, tol) in [(DType::F32, 1e-5f32), (DType::Bf16, BF16_RTOL)] {
        let (e, k, n, d) = (16, 4, 29, 70);
        let r = router(e, k, 4, 2, ScoringFunc::Sigmoid, true);
        let (_logits, idx, w, _routes) = routed(&mut rng, &r, n);
        let didx = upload(&dev, &idx).unwrap();
        let mut plan = Plan::new(&dev, e, n * k).unwrap();
        moe::plan(&dev, &didx, n, k, e, &mut plan).unwrap();
        let slot: Vec<usize> = download(&dev, &plan.slot_of).unwrap().iter().map(|&s| s as usize).collect();
        let round = |v: Vec<f32>| if dt == DType::Bf16 { bf16r(&v) } else { v };
        let dy = round(randn(&mut rng, n * d));
        let ye = round(randn(&mut rng, n * k * d));
        let dxe = round(randn(&mut rng, n * k * d));
        let dx0 = round(randn(&mut rng, n * d));
        // combine backward
        let mut dye = poisoned(&dev, dt, n * k * d);
        let mut dw = upload(&dev, &vec![f32::NAN; n * k]).unwrap();
        let (a_dy, a_ye) = (Act::from_f32(&dev, dt, &dy).unwrap(), Act::from_f32(&dev, dt, &ye).unwrap());
        let dw_in = upload(&dev, &w).unwrap();
        moe_train::combine_backward(&dev, &a_dy, &a_ye, &plan, &dw_in, &mut dye, &mut dw, n, k, d).unwrap();
        let mut want_dye = vec![0f32; n * k * d];
        let mut want_dw = vec![0f32; n * k];
        for rr in 0..n * k {
            let (t, s) = (rr / k, slot[rr]);
            for j in 0..d {
                want_dye[s * d + j] = w[rr] * dy[t * d + j];
                want_dw[rr] += dy[t * d + j] * ye[s * d + j];
            }
        }
        assert_close(&dye.to_f32(&dev).unwrap(), &round(want_dye), 1e-6, tol, &format!("dye {dt:?}"));
        assert_close(&download(&dev, &dw).unwrap(), &want_dw, 1e-4, 1e-4, &format!("dw {dt:?}"));
        // dispatch backward, overwrite and accumulate
        for acc in [false, true] {
            let mut dx = Act::from_f32(&dev, dt, &dx0).unwrap();
            let a_dxe = Act::from_f32(&dev, dt, &dxe).unwrap();
            moe_train::dispatch_backward(&dev, &a_dxe, &plan, &mut dx, n, k, d, acc).unwrap();
            let want: Vec<f32> = (0..n * d)
                .map(|i| {
                    let (t, j) = (i / d, i % d);
                    (0..k).fold(if acc { dx0[i] } else { 0.0 }, |s, q| s + dxe[slot[t * k + q] * d + j])
                })
                .collect();
            assert_close(&dx.to_f32(&dev).unwrap(), &want, 1e-5, tol, &format!("dispatch_backward {dt:?} acc {acc}"));
        }
    }
}

#[test]
fn causal_attention_softmax_and_backward_match_core() {
    let Some(dev) = device("causal_attention_softmax_and_backward_match_core") else { return };
    let mut rng = Rng::new(94);
    // 65539 matrices (heads x sequences): past CUDA's 65535 grid.y (the launcher caps y, the
    // kernels walk the matrices grid-stride)
    for (mats, t, ld_pad, ms_pad) in [(3, 5, 2, 7), (2, 37, 0, 0), (4, 130, 3, 1), (65536 + 3, 2, 1, 0)] {
        let ld = t + ld_pad;
        let ms = (t - 1) * ld + t + ms_pad;
        let len = (mats - 1) * ms + (t - 1) * ld + t;
        let scale = 0.125f32;
        let s0: Vec<f32> = (0..len).map(|_| 3.0 * rng.normal()).collect();
        let dp0 = randn(&mut rng, len);
        let mut s = upload(&dev, &s0).unwrap();
        train::attn_softmax_causal(&dev, &mut s, mats, t, ld, ms, scale).unwrap();
        let p = download(&dev, &s).unwrap();
        let mut dp = upload(&dev, &dp0).unwrap();
        train::attn_softmax_backward(&dev, &s, &mut dp, mats, t, ld, ms, scale).unwrap();
        let ds = download(&dev, &dp).unwrap();
        for m in 0..mats {
            for i in 0..t {
                let o = m * ms + i * ld;
                // core's Mla::forward_train / backward row by row
                let mut row: Vec<f32> =
                    (0..t).map(|u| if u <= i { s0[o + u] * scale } else { f32::NEG_INFINITY }).collect();
                softmax_inplace(&mut row);
                assert_close(&p[o..o + t], &row, 1e-7, 1e-5, &format!("P m{m} row {i} (t {t})"));
                let mut d = dp0[o..o + t].to_vec();
                softmax_backward_inplace(&row, &mut d);
                d.iter_mut().for_each(|v| *v *= scale);
                assert_close(&ds[o..o + t], &d, 1e-6, 1e-4, &format!("dS m{m} row {i} (t {t})"));
            }
        }
    }
}

/// The training pass's dispatch plan on the device (`moe_train::plan_token_order`) is the host's
/// token-order plan exactly (every offset, slot and source row: each expert's rows in token
/// order) with `t128` = the offsets and `t128_segments` of them: one token, ragged chunk counts,
/// more than a chunk's rows on one expert (skewed routing), empty experts, routed rows with no
/// valid expert (slot −1), top-1 and 256 experts; outputs poisoned before.
#[test]
fn token_order_plan_on_device_matches_the_host() {
    let Some(dev) = device("token_order_plan_on_device_matches_the_host") else { return };
    let mut rng = Rng::new(31);
    for (n, k, e, skew, invalid) in [
        (1usize, 1usize, 1usize, false, false),
        (29, 4, 16, false, true),
        (300, 2, 5, true, false),
        (700, 8, 256, false, true),
        (1030, 6, 64, true, true),
        (2048, 4, 16, false, false),
    ] {
        let mut idx = Vec::with_capacity(n * k);
        for _ in 0..n {
            let mut chosen: Vec<i32> = Vec::new();
            while chosen.len() < k.min(e) {
                // skewed: expert 0 on most tokens (runs of > 256 rows of one expert)
                let x = if skew && !chosen.contains(&0) && rng.below(8) != 0 { 0 } else { rng.below(e as u64) as i32 };
                if !chosen.contains(&x) {
                    chosen.push(x);
                }
            }
            chosen.resize(k, -1);
            if invalid && rng.below(9) == 0 {
                chosen[rng.below(k as u64) as usize] = if rng.below(2) == 0 { -1 } else { e as i32 };
            }
            idx.extend(chosen);
        }
        let nk = n * k;
        let (ro, to, slot_of, src_row) = moe_train::token_order_plan_host(&idx, k, e);
        let poison = |len: usize| upload(&dev, &vec![i32::MIN; len]).unwrap();
        let mut plan =
            Plan { row_offsets: poison(e + 1), tile_offsets: poison(e + 1), slot_of: poison(nk), src_row: poison(nk) };
        let mut t128 = poison(2 * e + 2);
        let didx = upload(&dev, &idx).unwrap();
        moe_train::plan_token_order(&dev, &didx, n, k, e, &mut plan, &mut t128).unwrap();
        let what = format!("n {n} k {k} e {e} skew {skew} invalid {invalid}");
        assert_eq!(download(&dev, &plan.row_offsets).unwrap(), ro, "{what}: row offsets");
        assert_eq!(download(&dev, &plan.tile_offsets).unwrap(), to, "{what}: tile offsets");
        assert_eq!(download(&dev, &plan.slot_of).unwrap(), slot_of, "{what}: slots");
        let rows = ro[e] as usize;
        assert_eq!(download(&dev, &plan.src_row).unwrap()[..rows], src_row[..rows], "{what}: source rows");
        let mut want = ro.clone();
        want.extend(t128_segments(&ro).unwrap().iter().map(|&s| s as i32));
        assert_eq!(download(&dev, &t128).unwrap(), want, "{what}: t128");
    }
}
