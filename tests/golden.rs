//! Goldens: our logits against HF transformers' f32 logits (eager attention), on every fixture
//! of tests/fixtures (written by tests/fixtures/generate.py). Tolerance: max-abs-error /
//! max-abs-logit <= 1e-4, in both MLA forms; FP8 both kept and dequantized at load.
mod common;
use common::*;
use dsv3::model::{AttnForm, Fp8Mode, LoadOptions};

const TOL: f32 = 1e-4;

const FIXTURES: &[&str] =
    &["v3_tiny", "v3_group", "v3_yarn", "v3_yarn_mscale", "v3_qnull", "v2_lite", "v2_group", "v3_fp8"];

fn check_logits(name: &str, opts: LoadOptions, ids_name: &str, logits_name: &str) -> Option<f32> {
    let ids = golden_ids(name, ids_name)?;
    let (shape, want) = golden_f32(name, logits_name).unwrap();
    let model = load(name, opts);
    let seqs: Vec<&[u32]> = ids.iter().map(|r| &r[..]).collect();
    let got = model.forward(&seqs).unwrap();
    assert_eq!(shape, vec![ids.len(), ids[0].len(), model.cfg.vocab_size]);
    let e = rel_max_err(&got, &want);
    assert!(e <= TOL, "{name} {logits_name} ({opts:?}): relative max error {e:e} > {TOL:e}");
    Some(e)
}

fn all_opts() -> Vec<LoadOptions> {
    let mut v = Vec::new();
    for attn in [AttnForm::Absorbed, AttnForm::Naive] {
        for fp8 in [Fp8Mode::Keep, Fp8Mode::Dequantize] {
            v.push(LoadOptions { attn, fp8, load_mtp: true });
        }
    }
    v
}

#[test]
fn every_fixture_matches_hf_logits() {
    let mut checked = 0;
    for name in FIXTURES {
        if !fixture(name).exists() {
            // v2_group exists only when HF supports group_limited_greedy (see the fixtures README)
            assert_eq!(*name, "v2_group", "fixture {name} is missing");
            continue;
        }
        for opts in all_opts() {
            let e = check_logits(name, opts, "input_ids", "logits").expect("input_ids in golden");
            eprintln!("{name:16} {:?}/{:?}: rel max err {e:.2e}", opts.attn, opts.fp8);
            if let Some(e) = check_logits(name, opts, "input_ids_long", "logits_long") {
                eprintln!("{name:16} long: rel max err {e:.2e}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 7 * 4);
}

#[test]
fn mtp_logits_match_hf() {
    let mut checked = 0;
    for name in FIXTURES {
        if !fixture(name).exists() || golden_f32(name, "mtp_logits").is_none() {
            continue;
        }
        let ids = golden_ids(name, "input_ids").unwrap();
        let (_, want) = golden_f32(name, "mtp_logits").unwrap();
        for opts in all_opts() {
            let model = load(name, opts);
            assert_eq!(model.mtp.len(), 1, "{name}: MTP module not loaded");
            let seqs: Vec<&[u32]> = ids.iter().map(|r| &r[..]).collect();
            let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache()).collect();
            let mut refs: Vec<_> = caches.iter_mut().collect();
            let (hidden, _) = model.forward_hidden(&seqs, &mut refs).unwrap();
            let got = model.mtp_logits(0, &seqs, &hidden).unwrap();
            let e = rel_max_err(&got, &want);
            assert!(e <= TOL, "{name} mtp ({opts:?}): relative max error {e:e}");
            checked += 1;
        }
    }
    assert!(checked >= 2 * 4, "expected MTP goldens in v3_group and v3_fp8");
}
