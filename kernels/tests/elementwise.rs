//! Gather, RMSNorm, RoPE/YaRN, SwiGLU, add/cast and the sampling helpers against the CPU oracle
//! (dsv3_core::ops), on random data at several shapes including ragged ones. Skip without a GPU.
mod common;
use common::*;
use dsv3_core::ops::rope::Rope;
use dsv3_core::rng::Rng;
use dsv3_kernels::ops::rope::RopeLayout;
use dsv3_kernels::ops::{elementwise, gather, norm, rope, sampling};
use dsv3_kernels::tensor::{download, upload};
use dsv3_kernels::{Act, DType};

const DTYPES: [(DType, f32); 2] = [(DType::F32, 1e-6), (DType::Bf16, BF16_RTOL)];

#[test]
fn gather_rows_copies_rows_and_poisons_bad_ids() {
    let Some(dev) = device("gather_rows_copies_rows_and_poisons_bad_ids") else { return };
    let mut rng = Rng::new(1);
    for &(v, d, n) in &[(10usize, 1usize, 1usize), (37, 67, 9), (1000, 512, 33)] {
        let table = randn(&mut rng, v * d);
        let mut ids: Vec<i32> = (0..n).map(|_| rng.below(v as u64) as i32).collect();
        ids[n - 1] = v as i32; // out of range: NaN row
        for (dt, _) in DTYPES {
            let t = Act::from_f32(&dev, dt, &table).unwrap();
            let mut out = poisoned(&dev, dt, n * d);
            gather::gather_rows(&dev, &t, v, d, &upload(&dev, &ids).unwrap(), n, d, &mut out, d).unwrap();
            let got = out.to_f32(&dev).unwrap();
            let tr = if dt == DType::Bf16 { bf16r(&table) } else { table.clone() };
            for (i, &id) in ids.iter().enumerate() {
                let row = &got[i * d..(i + 1) * d];
                if i == n - 1 {
                    assert!(row.iter().all(|x| x.is_nan()));
                } else {
                    assert_eq!(row, &tr[id as usize * d..(id as usize + 1) * d], "{dt:?} row {i}");
                }
            }
        }
    }
}

#[test]
fn rmsnorm_matches_cpu_strided_and_in_place() {
    let Some(dev) = device("rmsnorm_matches_cpu_strided_and_in_place") else { return };
    let mut rng = Rng::new(2);
    for &(rows, d, ld) in &[(1usize, 1usize, 1usize), (5, 67, 67), (7, 512, 576), (130, 7168, 7168)] {
        let x = randn(&mut rng, rows * ld);
        let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.1 * rng.normal()).collect();
        for (dt, rtol) in DTYPES {
            let xin = if dt == DType::Bf16 { bf16r(&x) } else { x.clone() };
            let mut want = xin.clone();
            for r in 0..rows {
                dsv3_core::ops::norm::rmsnorm_inplace(&mut want[r * ld..r * ld + d], &w, 1e-6);
            }
            // in place over the first d columns of each row; the rest must be untouched
            let mut xa = Act::from_f32(&dev, dt, &x).unwrap();
            norm::rmsnorm(&dev, &mut xa, 0, ld, None, &upload(&dev, &w).unwrap(), d, 1e-6, rows).unwrap();
            assert_close(&xa.to_f32(&dev).unwrap(), &want, 1e-6, rtol, &format!("rmsnorm {dt:?} [{rows},{d}]/{ld}"));
            // out of place into a poisoned buffer
            let xa = Act::from_f32(&dev, dt, &x).unwrap();
            let mut xa = xa;
            let mut y = poisoned(&dev, dt, rows * d);
            norm::rmsnorm(&dev, &mut xa, 0, ld, Some((&mut y, 0, d)), &upload(&dev, &w).unwrap(), d, 1e-6, rows)
                .unwrap();
            let got = y.to_f32(&dev).unwrap();
            let want_c: Vec<f32> = (0..rows).flat_map(|r| want[r * ld..r * ld + d].to_vec()).collect();
            assert_close(&got, &want_c, 1e-6, rtol, "rmsnorm out of place");
        }
    }
}

#[test]
fn rope_and_yarn_match_cpu_on_every_head() {
    let Some(dev) = device("rope_and_yarn_match_cpu_on_every_head") else { return };
    let mut rng = Rng::new(3);
    for (dr, scaling) in ROPE_CASES {
        let rope_cpu = Rope::new(&rope_cfg(dr, scaling));
        let half = dr / 2;
        // q-like layout: [rows, heads, dn + dr] with the rope part at offset dn
        let (rows, heads, dn) = (11usize, 5usize, 16usize);
        let ld_head = dn + dr;
        let x = randn(&mut rng, rows * heads * ld_head);
        let pos: Vec<i32> = (0..rows).map(|_| rng.below(200_000) as i32).collect();
        for (dt, rtol) in DTYPES {
            let xin = if dt == DType::Bf16 { bf16r(&x) } else { x.clone() };
            let mut want = xin.clone();
            let (mut cs, mut sn, mut tmp) = (vec![0f32; half], vec![0f32; half], vec![0f32; dr]);
            for (r, &p) in pos.iter().enumerate() {
                rope_cpu.cos_sin(p as usize, &mut cs, &mut sn);
                for h in 0..heads {
                    let o = r * heads * ld_head + h * ld_head + dn;
                    Rope::apply(&mut want[o..o + dr], &cs, &sn, &mut tmp);
                }
            }
            let mut xa = Act::from_f32(&dev, dt, &x).unwrap();
            let layout = RopeLayout { rows, ld_row: heads * ld_head, heads, ld_head, offset: dn, half };
            let inv = upload(&dev, &rope_cpu.inv_freq).unwrap();
            rope::rope(&dev, &mut xa, layout, &upload(&dev, &pos).unwrap(), &inv, rope_cpu.attention_factor).unwrap();
            // f32: the same f32 roundings as HF/CPU (cos/sin in f64 rounded to f32)
            let atol = if dt == DType::F32 { 2e-6 } else { 1e-2 };
            assert_close(&xa.to_f32(&dev).unwrap(), &want, atol, rtol, &format!("rope dr {dr} {dt:?}"));
        }
    }
}

#[test]
fn swiglu_add_and_cast_match_cpu() {
    let Some(dev) = device("swiglu_add_and_cast_match_cpu") else { return };
    let mut rng = Rng::new(4);
    // 65539 rows: past CUDA's 65535 grid.y (the launcher caps y, the kernel walks rows grid-stride)
    for &(rows, inter) in &[(1usize, 1usize), (3, 300), (17, 1408), (65536 + 3, 2)] {
        let gu = randn(&mut rng, rows * 2 * inter);
        for (dt, rtol) in DTYPES {
            let gin = if dt == DType::Bf16 { bf16r(&gu) } else { gu.clone() };
            let mut want = vec![0f32; rows * inter];
            for r in 0..rows {
                let row = &gin[r * 2 * inter..(r + 1) * 2 * inter];
                dsv3_core::ops::swiglu::swiglu(&row[..inter], &row[inter..], &mut want[r * inter..(r + 1) * inter]);
            }
            let a = Act::from_f32(&dev, dt, &gu).unwrap();
            let mut out = poisoned(&dev, dt, rows * inter);
            elementwise::swiglu(&dev, &a, 2 * inter, &mut out, inter, inter, rows).unwrap();
            assert_close(&out.to_f32(&dev).unwrap(), &want, 1e-6, rtol, &format!("swiglu {dt:?}"));
        }
    }
    let x = randn(&mut rng, 1001);
    let y = randn(&mut rng, 1001);
    let mut xa = Act::from_f32(&dev, DType::F32, &x).unwrap();
    elementwise::add(&dev, &mut xa, &Act::from_f32(&dev, DType::F32, &y).unwrap(), 1001).unwrap();
    let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    assert_eq!(xa.to_f32(&dev).unwrap(), want);
    let mut b = poisoned(&dev, DType::Bf16, 1001);
    elementwise::cast(&dev, &Act::from_f32(&dev, DType::F32, &x).unwrap(), &mut b, 1001).unwrap();
    assert_eq!(b.to_f32(&dev).unwrap(), bf16r(&x), "round to nearest even, as half::bf16");
    // and back: bf16 -> f32 is exact (the one kernel no other test launched)
    let mut f = poisoned(&dev, DType::F32, 1001);
    elementwise::cast(&dev, &b, &mut f, 1001).unwrap();
    assert_eq!(f.to_f32(&dev).unwrap(), bf16r(&x), "bf16 -> f32 exact");
}

#[test]
fn argmax_and_softmax_match_cpu() {
    let Some(dev) = device("argmax_and_softmax_match_cpu") else { return };
    let mut rng = Rng::new(5);
    for &(rows, n) in &[(1usize, 1usize), (4, 1000), (3, 32000), (2, 32001)] {
        let mut x = randn(&mut rng, rows * n);
        if n > 10 {
            x[5] = x[..n].iter().copied().fold(f32::MIN, f32::max); // a tie: the first index wins
        }
        let xs = upload(&dev, &x).unwrap();
        let mut out = upload(&dev, &vec![-1i32; rows]).unwrap();
        sampling::argmax_rows(&dev, &xs, rows, n, &mut out).unwrap();
        let want: Vec<i32> = x.chunks(n).map(|r| dsv3_core::infer::sampling::argmax(r) as i32).collect();
        assert_eq!(download(&dev, &out).unwrap(), want);
        let mut xs = upload(&dev, &x).unwrap();
        sampling::softmax_rows(&dev, &mut xs, rows, n, 0.7).unwrap();
        let mut want = x.iter().map(|v| v / 0.7).collect::<Vec<_>>();
        want.chunks_mut(n).for_each(dsv3_core::ops::softmax::softmax_inplace);
        assert_close(&download(&dev, &xs).unwrap(), &want, 1e-7, 1e-5, "softmax");
    }
}

#[test]
fn launchers_reject_bad_shapes_without_launching() {
    let Some(dev) = device("launchers_reject_bad_shapes_without_launching") else { return };
    let t = Act::from_f32(&dev, DType::F32, &[1.0; 12]).unwrap();
    let mut out = poisoned(&dev, DType::F32, 4);
    let ids = upload(&dev, &[0i32, 1]).unwrap();
    assert!(gather::gather_rows(&dev, &t, 3, 4, &ids, 2, 4, &mut out, 4).is_err(), "output too small");
    let mut b = poisoned(&dev, DType::Bf16, 12);
    assert!(gather::gather_rows(&dev, &t, 3, 4, &ids, 2, 4, &mut b, 4).is_err(), "dtype mismatch");
}
