//! Training kernels against the CPU oracle on random data (ragged shapes, strided rows, poisoned
//! outputs): AdamW bit for bit (f32 and bf16 moments, several steps), RMSNorm / SwiGLU / RoPE /
//! embedding / cross-entropy backward (f32 to rounding, bf16 to its precision). Skip without a GPU.
mod common;
use common::*;
use dsv3_core::ops::rope::Rope;
use dsv3_core::rng::Rng;
use dsv3_kernels::ops::rope::{self, RopeLayout};
use dsv3_kernels::ops::train::{self, AdamStep, Moments};
use dsv3_kernels::tensor::{download, upload};
use dsv3_kernels::{Act, DType};

const DTYPES: [(DType, f32); 2] = [(DType::F32, 1e-5), (DType::Bf16, BF16_RTOL)];

fn as_dtype(x: &[f32], dt: DType) -> Vec<f32> {
    if dt == DType::Bf16 {
        bf16r(x)
    } else {
        x.to_vec()
    }
}

#[test]
fn adamw_matches_core_bit_for_bit_with_f32_and_bf16_moments() {
    let Some(dev) = device("adamw_matches_core_bit_for_bit_with_f32_and_bf16_moments") else { return };
    let mut rng = Rng::new(80);
    let n = 1000 * 3 + 7;
    let p0 = randn(&mut rng, n);
    // with and without the decay mask (64 elements a byte; chunks 3, 7.. and the ragged last one
    // undecayed: the trainer's one launch over tensors with and without weight decay)
    let mask: Vec<u8> = (0..n.div_ceil(64)).map(|c| (c % 4 != 3 && c != n / 64) as u8).collect();
    for (bf16_moments, masked) in [(false, false), (true, false), (false, true), (true, true)] {
        let (b1, b2, eps, wd, lr) = (0.9f32, 0.95f32, 1e-8f32, 0.1f32, 3e-3f32);
        // core/src/train/optim.rs AdamW::step, element by element
        let round = |x: f32| if bf16_moments { half::bf16::from_f32(x).to_f32() } else { x };
        let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
        let mut pd = upload(&dev, &p0).unwrap();
        let mut mom = if bf16_moments {
            Moments::Bf16 {
                m: upload(&dev, &vec![half::bf16::ZERO; n]).unwrap(),
                v: upload(&dev, &vec![half::bf16::ZERO; n]).unwrap(),
            }
        } else {
            Moments::F32 { m: upload(&dev, &vec![0f32; n]).unwrap(), v: upload(&dev, &vec![0f32; n]).unwrap() }
        };
        for t in 1..=3 {
            let g: Vec<f32> = randn(&mut rng, n).iter().map(|x| x * 0.01).collect();
            // step 2 clipped (core scales the gradients in place first), steps 2 and 3 also
            // write the bf16 working copy
            let grad_scale = if t == 2 { 0.37f32 } else { 1.0 };
            let gs: Vec<f32> = g.iter().map(|&x| x * grad_scale).collect();
            let (bc1, bc2) = (1.0 - b1.powf(t as f32), 1.0 - b2.powf(t as f32));
            let decay = 1.0 - lr * wd;
            for j in 0..n {
                m[j] = round(b1 * m[j] + (1.0 - b1) * gs[j]);
                v[j] = round(b2 * v[j] + (1.0 - b2) * gs[j] * gs[j]);
                let (mh, vh) = (m[j] / bc1, v[j] / bc2);
                let dj = if masked && mask[j / 64] == 0 { 1.0 } else { decay };
                p[j] = p[j] * dj - lr * mh / (vh.sqrt() + eps);
            }
            let s = AdamStep { lr, beta1: b1, beta2: b2, eps, decay, bc1, bc2, grad_scale };
            let dmask = upload(&dev, &mask).unwrap();
            let mk = if masked { Some(&dmask) } else { None };
            let gd = upload(&dev, &g).unwrap();
            let mut copy = upload(&dev, &vec![half::bf16::NAN; n]).unwrap();
            let cp = if t >= 2 { Some(&mut copy) } else { None };
            train::adamw(&dev, &mut pd, &gd, &mut mom, n, &s, mk, cp).unwrap();
            let got = download(&dev, &pd).unwrap();
            let what = format!("adamw bf16 moments {bf16_moments} mask {masked} step {t}");
            for j in 0..n {
                assert_eq!(got[j].to_bits(), p[j].to_bits(), "{what} elem {j}");
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&download(&dev, &gd).unwrap()), bits(&g), "{what}: the gradient was written");
            let copy = download(&dev, &copy).unwrap();
            for j in 0..n {
                let want = if t >= 2 { half::bf16::from_f32(p[j]).to_bits() } else { half::bf16::NAN.to_bits() };
                assert_eq!(copy[j].to_bits(), want, "{what}: bf16 copy elem {j}");
            }
        }
        let (gm, gv): (Vec<f32>, Vec<f32>) = match &mom {
            Moments::F32 { m, v } => (download(&dev, m).unwrap(), download(&dev, v).unwrap()),
            Moments::Bf16 { m, v } => (
                download(&dev, m).unwrap().iter().map(|x| x.to_f32()).collect(),
                download(&dev, v).unwrap().iter().map(|x| x.to_f32()).collect(),
            ),
        };
        assert_eq!(gm, m, "first moments");
        assert_eq!(gv, v, "second moments");
    }
}

#[test]
fn rmsnorm_backward_matches_cpu() {
    let Some(dev) = device("rmsnorm_backward_matches_cpu") else { return };
    let mut rng = Rng::new(81);
    // the larger row counts give each block several rows (about two blocks per SM), the last
    // block fewer
    for &(rows, d, ld) in
        &[(1usize, 1usize, 1usize), (5, 67, 70), (33, 512, 576), (4, 7168, 7168), (1000, 256, 256), (2111, 128, 130)]
    {
        let x = randn(&mut rng, rows * ld);
        let dy = randn(&mut rng, rows * ld);
        let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.1 * rng.normal()).collect();
        let dw0 = randn(&mut rng, d);
        for (dt, rtol) in DTYPES {
            let (xs, dys) = (as_dtype(&x, dt), as_dtype(&dy, dt));
            let xd: Vec<f32> = (0..rows).flat_map(|r| xs[r * ld..r * ld + d].to_vec()).collect();
            let dyd: Vec<f32> = (0..rows).flat_map(|r| dys[r * ld..r * ld + d].to_vec()).collect();
            let (mut want_dx, mut want_dw) = (vec![0f32; rows * d], dw0.clone());
            dsv3_core::ops::norm::rmsnorm_backward(&xd, &w, 1e-6, &dyd, &mut want_dx, &mut want_dw);
            let (xa, dya, wd) = (
                Act::from_f32(&dev, dt, &x).unwrap(),
                Act::from_f32(&dev, dt, &dy).unwrap(),
                upload(&dev, &w).unwrap(),
            );
            let run = || {
                let mut dx = poisoned(&dev, dt, rows * d);
                let mut dw = upload(&dev, &dw0).unwrap();
                train::rmsnorm_backward(&dev, &xa, ld, &wd, &dya, ld, &mut dx, d, &mut dw, d, 1e-6, rows).unwrap();
                (dx.to_f32(&dev).unwrap(), download(&dev, &dw).unwrap())
            };
            let (dx, dw) = run();
            let what = format!("rmsnorm_backward {dt:?} [{rows}, {d}]/{ld}");
            assert_close(&dx, &want_dx, 1e-5, rtol, &format!("{what} dx"));
            assert_close(&dw, &want_dw, 1e-4, 1e-4, &format!("{what} dw"));
            // deterministic: the same bits again (dw's sums in a fixed order, no atomics)
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&run().1), bits(&dw), "{what}: dw differs between two runs");
        }
    }
}

#[test]
fn swiglu_backward_matches_cpu() {
    let Some(dev) = device("swiglu_backward_matches_cpu") else { return };
    let mut rng = Rng::new(82);
    // 65539 rows: past CUDA's 65535 grid.y (the launcher caps y, the kernel walks rows grid-stride)
    for &(rows, inter) in &[(1usize, 1usize), (3, 300), (17, 1408), (65536 + 3, 2)] {
        let gu = randn(&mut rng, rows * 2 * inter);
        let da = randn(&mut rng, rows * inter);
        for (dt, rtol) in DTYPES {
            let (g, a) = (as_dtype(&gu, dt), as_dtype(&da, dt));
            let mut want = vec![0f32; rows * 2 * inter];
            for r in 0..rows {
                let row = &g[r * 2 * inter..(r + 1) * 2 * inter];
                let (dg, du) = want[r * 2 * inter..(r + 1) * 2 * inter].split_at_mut(inter);
                dsv3_core::ops::swiglu::swiglu_backward(
                    &row[..inter],
                    &row[inter..],
                    &a[r * inter..(r + 1) * inter],
                    dg,
                    du,
                );
            }
            let mut out = poisoned(&dev, dt, rows * 2 * inter);
            let (ga, aa) = (Act::from_f32(&dev, dt, &gu).unwrap(), Act::from_f32(&dev, dt, &da).unwrap());
            train::swiglu_backward(&dev, &ga, 2 * inter, &aa, inter, &mut out, 2 * inter, inter, rows).unwrap();
            assert_close(&out.to_f32(&dev).unwrap(), &want, 1e-6, rtol, &format!("swiglu_backward {dt:?}"));
        }
    }
}

#[test]
fn rope_backward_matches_cpu() {
    let Some(dev) = device("rope_backward_matches_cpu") else { return };
    let mut rng = Rng::new(83);
    for (dr, scaling) in ROPE_CASES {
        let rope_cpu = Rope::new(&rope_cfg(dr, scaling));
        let half = dr / 2;
        let (rows, heads, dn) = (11usize, 5usize, 16usize);
        let ld_head = dn + dr;
        let x = randn(&mut rng, rows * heads * ld_head);
        let pos: Vec<i32> = (0..rows).map(|_| rng.below(200_000) as i32).collect();
        for (dt, rtol) in DTYPES {
            let mut want = as_dtype(&x, dt);
            let (mut cs, mut sn, mut tmp) = (vec![0f32; half], vec![0f32; half], vec![0f32; dr]);
            for (r, &p) in pos.iter().enumerate() {
                rope_cpu.cos_sin(p as usize, &mut cs, &mut sn);
                for h in 0..heads {
                    let o = r * heads * ld_head + h * ld_head + dn;
                    Rope::apply_backward(&mut want[o..o + dr], &cs, &sn, &mut tmp);
                }
            }
            let mut xa = Act::from_f32(&dev, dt, &x).unwrap();
            let layout = RopeLayout { rows, ld_row: heads * ld_head, heads, ld_head, offset: dn, half };
            let inv = upload(&dev, &rope_cpu.inv_freq).unwrap();
            rope::rope_backward(&dev, &mut xa, layout, &upload(&dev, &pos).unwrap(), &inv, rope_cpu.attention_factor)
                .unwrap();
            let atol = if dt == DType::F32 { 2e-6 } else { 1e-2 };
            assert_close(&xa.to_f32(&dev).unwrap(), &want, atol, rtol, &format!("rope_backward dr {dr} {dt:?}"));
        }
    }
}

/// The embedding's gradient (`train::embedding_backward` over `EmbedRows`): every id's rows summed
/// and added once, ids out of range left out, more ids than CUDA's 65535 grid.y, thousands of
/// rows for one id (the values then multiples of 1/64 below 4: exact in bf16, every partial sum
/// exact in any order), ids past `vocab` or negative skipped; the same bits from run to run. Ids
/// with more than `EMBED_CHUNK` rows are summed in chunks first (two passes): ~112 rows per id
/// with unrounded values, and the thousands.
#[test]
fn embedding_backward_sums_each_ids_rows() {
    let Some(dev) = device("embedding_backward_sums_each_ids_rows") else { return };
    let mut rng = Rng::new(84);
    for &(vocab, d, tokens) in
        &[(1usize, 1usize, 3usize), (50, 67, 200), (8, 300, 900), (1000, 512, 33), (7, 2, 65536 + 5), (70000, 3, 70010)]
    {
        let exact = |v: Vec<f32>| -> Vec<f32> {
            if tokens > 1000 {
                v.into_iter().map(|x| (x * 64.0).round().clamp(-255.0, 255.0) / 64.0).collect()
            } else {
                v
            }
        };
        let dy = exact(randn(&mut rng, tokens * d));
        let mut ids: Vec<i32> = if vocab > tokens {
            // a permutation's prefix: nearly every id once (> 65535 segments)
            let mut all: Vec<i32> = (0..vocab as i32).collect();
            for i in (1..all.len()).rev() {
                all.swap(i, rng.below(i as u64 + 1) as usize);
            }
            all.truncate(tokens);
            all
        } else {
            (0..tokens).map(|_| rng.below(vocab as u64) as i32).collect()
        };
        ids[0] = vocab as i32; // out of range: skipped
        if tokens > 2 {
            ids[2] = -1;
        }
        let t0 = exact(randn(&mut rng, vocab * d));
        for (dt, rtol) in DTYPES {
            let dys = as_dtype(&dy, dt);
            let mut want = t0.clone();
            for (t, &id) in ids.iter().enumerate() {
                if id >= 0 && (id as usize) < vocab {
                    for j in 0..d {
                        want[id as usize * d + j] += dys[t * d + j];
                    }
                }
            }
            let dya = Act::from_f32(&dev, dt, &dy).unwrap();
            let mut count = vec![0usize; vocab];
            ids.iter().filter(|&&i| i >= 0 && (i as usize) < vocab).for_each(|&i| count[i as usize] += 1);
            let chunked = count.iter().any(|&c| c > train::EMBED_CHUNK);
            assert_eq!(train::EmbedRows::new(&dev, &ids, vocab).unwrap().passes(), if chunked { 2 } else { 1 });
            let run = || {
                let mut table = upload(&dev, &t0).unwrap();
                let rows = train::EmbedRows::new(&dev, &ids, vocab).unwrap();
                train::embedding_backward(&dev, &rows, &dya, d, &mut table, vocab, d).unwrap();
                download(&dev, &table).unwrap()
            };
            let got = run();
            let what = format!("embedding_backward {dt:?} vocab {vocab} d {d} tokens {tokens}");
            assert_close(&got, &want, 1e-5, rtol.min(1e-5), &what);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&run()), bits(&got), "{what}: differs between two runs");
        }
    }
}

#[test]
fn cross_entropy_matches_cpu_with_mask() {
    let Some(dev) = device("cross_entropy_matches_cpu_with_mask") else { return };
    let mut rng = Rng::new(85);
    // 60000 columns of f32 and 120000 of bf16 exceed the shared memory of a block (the uncached
    // kernel; 60000 bf16 are cached)
    for &(rows, vocab) in &[(1usize, 1usize), (7, 300), (33, 32000), (3, 60000), (2, 120000)] {
        let z: Vec<f32> = randn(&mut rng, rows * vocab).iter().map(|x| 3.0 * x).collect();
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u64) as u32).collect();
        let mask: Vec<f32> = (0..rows).map(|r| if r % 3 == 1 { 0.0 } else { 1.0 }).collect();
        for (dt, rtol) in DTYPES {
            let zs = as_dtype(&z, dt);
            for use_mask in [false, true] {
                let m = use_mask.then_some(&mask[..]);
                let denom = m.map_or(rows as f32, |m| m.iter().sum());
                let mut want_dz = vec![0f32; rows * vocab];
                let want_loss = dsv3_core::ops::loss::cross_entropy(&zs, &targets, m, None, &mut want_dz);
                let mut dz = poisoned(&dev, dt, rows * vocab);
                let mut rl = upload(&dev, &vec![f32::NAN; rows]).unwrap();
                let t: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
                let md = upload(&dev, &mask).unwrap();
                let za = Act::from_f32(&dev, dt, &z).unwrap();
                let mref = if use_mask { Some(&md) } else { None };
                dev.profile_begin().unwrap();
                train::cross_entropy(
                    &dev,
                    &za,
                    vocab,
                    &upload(&dev, &t).unwrap(),
                    mref,
                    denom,
                    &mut dz,
                    vocab,
                    &mut rl,
                    vocab,
                    rows,
                )
                .unwrap();
                let ran: Vec<String> = dev.profile_end().unwrap().kernels.into_iter().map(|k| k.name).collect();
                let what = format!("cross_entropy {dt:?} mask {use_mask} [{rows}, {vocab}]");
                // the row is cached in shared memory up to the GPU's opt-in limit (H100 227 KiB,
                // A100 163 KiB: 32000 f32 and 60000 bf16 fit, 60000 f32 and 120000 bf16 do not)
                let cached = ran.iter().any(|k| k.starts_with("cross_entropy_smem_"));
                assert!(ran.iter().any(|k| k.starts_with("cross_entropy_")), "{what}: ran {ran:?}");
                assert_eq!(cached, vocab * dt.size() <= 128_000, "{what}: ran {ran:?}");
                // dz = exp(z - lse)·w/denom: its relative error is the error of lse, a sum of
                // `vocab` exponentials that the CPU adds one by one and the GPU as a tree; in f32
                // the sequential sum is off by ~sqrt(vocab)·2^-24 typically (1e-5 at 32000,
                // measured 3.3e-5 on an H100), so the bound grows with the vocabulary.
                let rtol = rtol.max(if vocab >= 1000 { 1e-4 } else { 0.0 });
                assert_close(&dz.to_f32(&dev).unwrap(), &want_dz, 1e-7, rtol, &format!("{what} dz"));
                let loss = download(&dev, &rl).unwrap().iter().map(|&v| v as f64).sum::<f64>() / denom as f64;
                assert!(
                    ((loss as f32) - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
                    "{what}: loss {loss} vs {want_loss}"
                );
                if dt == DType::F32 {
                    // f32 logits with a bf16 gradient (the bf16 training head): the f32
                    // gradient rounded to nearest even, bit for bit, and the same losses
                    let f32_dz = dz.to_f32(&dev).unwrap();
                    let mut dzb = poisoned(&dev, DType::Bf16, rows * vocab);
                    let mut rlb = upload(&dev, &vec![f32::NAN; rows]).unwrap();
                    let td = upload(&dev, &t).unwrap();
                    train::cross_entropy(&dev, &za, vocab, &td, mref, denom, &mut dzb, vocab, &mut rlb, vocab, rows)
                        .unwrap();
                    let want: Vec<u16> = f32_dz.iter().map(|&g| half::bf16::from_f32(g).to_bits()).collect();
                    let got: Vec<u16> =
                        dzb.to_f32(&dev).unwrap().iter().map(|&g| half::bf16::from_f32(g).to_bits()).collect();
                    assert_eq!(got, want, "{what}: bf16 gradient from f32 logits");
                    let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                    assert_eq!(
                        bits(download(&dev, &rlb).unwrap()),
                        bits(download(&dev, &rl).unwrap()),
                        "{what}: row losses"
                    );
                    // bf16 logits with an f32 gradient: refused
                    let zb = Act::from_f32(&dev, DType::Bf16, &z).unwrap();
                    let err =
                        train::cross_entropy(&dev, &zb, vocab, &td, mref, denom, &mut dz, vocab, &mut rlb, vocab, rows);
                    assert!(err.is_err(), "{what}: bf16 logits with an f32 gradient accepted");
                }
            }
        }
    }
}
