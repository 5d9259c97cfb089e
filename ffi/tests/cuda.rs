//! The C ABI on a GPU (device >= 1): sessions and generation against the same model on the CPU.
//! Skips with a visible line where there is no CUDA GPU.
use dsv3::model::*;
use dsv3::session::*;
use dsv3::*;
use std::ffi::{CStr, CString};
use std::ptr::null_mut;

fn fixture(name: &str) -> CString {
    // DSV3_FIXTURES: where tests/fixtures is when the test binary runs on another machine
    let root = std::env::var_os("DSV3_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    CString::new(root.join(name).to_str().unwrap()).unwrap()
}

fn last() -> String {
    unsafe { CStr::from_ptr(dsv3_last_error()) }.to_string_lossy().into_owned()
}

fn gpu(test: &str) -> bool {
    match dsv3_kernels::device_count() {
        Ok(n) if n > 0 => true,
        r => {
            // straight to stderr: libtest captures the output of passing tests
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "SKIP {test}: no CUDA GPU ({r:?})");
            false
        }
    }
}

fn load(name: &str, device: i32, dtype: i32) -> *mut dsv3_model {
    unsafe {
        let mut p = std::mem::zeroed::<dsv3_model_params>();
        assert_eq!(dsv3_model_params_default(&mut p), dsv3_status::DSV3_OK);
        p.device = device;
        p.dtype = dtype;
        let mut m = null_mut();
        assert_eq!(dsv3_model_load(fixture(name).as_ptr(), &p, &mut m), dsv3_status::DSV3_OK, "{}", last());
        m
    }
}

/// Steps `ids` through slot 0 of a new session (max_len 0 = default) and returns the logits.
unsafe fn step(s: *mut dsv3_session, ids: &[i32], v: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; v];
    let st = dsv3_session_step(s, 0, ids.as_ptr(), ids.len(), out.as_mut_ptr(), v, null_mut());
    assert_eq!(st, dsv3_status::DSV3_OK, "{}", last());
    out
}

#[test]
fn gpu_sessions_and_generation_match_the_cpu() {
    if !gpu("gpu_sessions_and_generation_match_the_cpu") {
        return;
    }
    unsafe {
        for name in ["v3_tiny", "v2_lite"] {
            let (cpu, cuda) = (load(name, 0, 0), load(name, 1, 0));
            let mut info = std::mem::zeroed::<dsv3_model_info>();
            info.struct_size = std::mem::size_of::<dsv3_model_info>();
            assert_eq!(dsv3_model_get_info(cpu, &mut info), dsv3_status::DSV3_OK);
            let v = info.vocab_size as usize;
            let (mut a, mut b) = (null_mut(), null_mut());
            assert_eq!(dsv3_session_new(cpu, 2, &mut a), dsv3_status::DSV3_OK);
            assert_eq!(dsv3_session_new_ex(cuda, 2, 16, &mut b), dsv3_status::DSV3_OK, "{}", last());
            // prefill, decode (the second decode replays a CUDA graph), truncate, decode again
            let prompt = [3i32, 1, 4, 1, 5];
            for ids in [&prompt[..], &[9], &[2], &[6]] {
                let (x, y) = (step(a, ids, v), step(b, ids, v));
                let e = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
                assert!(e < 1e-4, "{name}: GPU f32 logits differ from the CPU by {e}");
            }
            let mut len = 0usize;
            assert_eq!(dsv3_session_length(b, 0, &mut len), dsv3_status::DSV3_OK);
            assert_eq!(len, 8);
            assert_eq!(dsv3_session_truncate(a, 0, 5), dsv3_status::DSV3_OK);
            assert_eq!(dsv3_session_truncate(b, 0, 5), dsv3_status::DSV3_OK);
            assert_eq!(dsv3_session_truncate(b, 0, 9), dsv3_status::DSV3_ERR_INVALID_ARGUMENT);
            let (x, y) = (step(a, &[7], v), step(b, &[7], v));
            let e = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(e < 1e-4, "{name}: after truncate, logits differ by {e}");
            // past max_len (16): an error, the slot unchanged
            let long = [1i32; 12];
            let mut out = vec![0f32; v];
            let st = dsv3_session_step(b, 0, long.as_ptr(), long.len(), out.as_mut_ptr(), v, null_mut());
            assert_eq!(st, dsv3_status::DSV3_ERR_INVALID_ARGUMENT, "{}", last());
            assert_eq!(dsv3_session_length(b, 0, &mut len), dsv3_status::DSV3_OK);
            assert_eq!(len, 6);
            assert_eq!(dsv3_session_reset(b, 0), dsv3_status::DSV3_OK);
            dsv3_session_free(a);
            dsv3_session_free(b);
            // greedy generation: the same tokens as on the CPU
            let mut sp = std::mem::zeroed::<dsv3_sampling_params>();
            assert_eq!(dsv3_sampling_params_default(&mut sp), dsv3_status::DSV3_OK);
            sp.max_new_tokens = 12;
            let (mut ta, mut tb) = (vec![-1i32; 12], vec![-1i32; 12]);
            let (mut na, mut nb) = (0usize, 0usize);
            let g = |m, t: &mut Vec<i32>, n: &mut usize| {
                dsv3_generate(m, prompt.as_ptr(), prompt.len(), &sp, None, null_mut(), t.as_mut_ptr(), 12, n)
            };
            assert_eq!(g(cpu, &mut ta, &mut na), dsv3_status::DSV3_OK, "{}", last());
            assert_eq!(g(cuda, &mut tb, &mut nb), dsv3_status::DSV3_OK, "{}", last());
            assert_eq!((na, &ta), (nb, &tb), "{name}: greedy tokens differ between CPU and GPU");
            dsv3_model_free(cpu);
            dsv3_model_free(cuda);
        }
        // bf16 on the GPU loads and generates; a GPU that does not exist is a clear error
        let m = load("v3_fp8", 1, 1);
        let mut sp = std::mem::zeroed::<dsv3_sampling_params>();
        assert_eq!(dsv3_sampling_params_default(&mut sp), dsv3_status::DSV3_OK);
        sp.max_new_tokens = 4;
        sp.temperature = 0.8;
        let (mut t, mut n) = (vec![-1i32; 4], 0usize);
        let st = dsv3_generate(m, [1i32, 2].as_ptr(), 2, &sp, None, null_mut(), t.as_mut_ptr(), 4, &mut n);
        assert_eq!(st, dsv3_status::DSV3_OK, "{}", last());
        assert_eq!(n, 4);
        dsv3_model_free(m);
        let mut p = std::mem::zeroed::<dsv3_model_params>();
        assert_eq!(dsv3_model_params_default(&mut p), dsv3_status::DSV3_OK);
        p.device = 1000;
        let mut m = null_mut();
        assert_eq!(
            dsv3_model_load(fixture("v3_tiny").as_ptr(), &p, &mut m),
            dsv3_status::DSV3_ERR_INVALID_ARGUMENT,
            "{}",
            last()
        );
        assert!(m.is_null() && last().contains("does not exist"), "{}", last());
    }
}
