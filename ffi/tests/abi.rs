//! The C ABI's contracts, called from Rust: progress callbacks that cancel, the buffer-size
//! protocol, validation of enum-like integers and struct sizes, SFT steps, expert loads,
//! checkpoints, tokenizers, and NULL handling.
use dsv3::model::*;
use dsv3::session::*;
use dsv3::tokenizer::*;
use dsv3::train::*;
use dsv3::*;
use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn cpath(rel: &str) -> CString {
    CString::new(root().join(rel).to_str().unwrap()).unwrap()
}

fn last() -> String {
    unsafe { CStr::from_ptr(dsv3_last_error()) }.to_string_lossy().into_owned()
}

extern "C" fn cancel_at_half(user: *mut c_void, f: f32) -> i32 {
    unsafe { (*(user as *mut Vec<f32>)).push(f) };
    (f >= 0.5) as i32
}

fn load(rel: &str) -> *mut dsv3_model {
    let mut m = null_mut();
    assert_eq!(unsafe { dsv3_model_load(cpath(rel).as_ptr(), null(), &mut m) }, dsv3_status::DSV3_OK, "{}", last());
    m
}

#[test]
fn load_progress_cancel_and_param_validation() {
    unsafe {
        let mut p = std::mem::zeroed::<dsv3_model_params>();
        assert_eq!(dsv3_model_params_default(&mut p), dsv3_status::DSV3_OK);
        let mut seen: Vec<f32> = Vec::new();
        p.progress = Some(cancel_at_half);
        p.user_data = &mut seen as *mut Vec<f32> as *mut c_void;
        let mut m = null_mut();
        let path = cpath("tests/fixtures/v3_group");
        assert_eq!(dsv3_model_load(path.as_ptr(), &p, &mut m), dsv3_status::DSV3_ERR_CANCELLED);
        assert!(m.is_null() && last().contains("cancelled"), "{}", last());
        assert!(seen.len() >= 2 && seen.windows(2).all(|w| w[0] <= w[1]));
        p.progress = None;
        // device 1 + N is CUDA GPU N: without a driver or GPU, a clear UNSUPPORTED (on a GPU
        // machine ffi/tests/cuda.rs covers it); bf16 needs a GPU
        if !dsv3_kernels::device::driver_present() {
            let mut q = std::ptr::read(&p);
            q.device = 1;
            assert_eq!(dsv3_model_load(path.as_ptr(), &q, &mut m), dsv3_status::DSV3_ERR_UNSUPPORTED);
            assert!(last().contains("driver"), "{}", last());
        }
        let mut q = std::ptr::read(&p);
        q.dtype = 1;
        assert_eq!(dsv3_model_load(path.as_ptr(), &q, &mut m), dsv3_status::DSV3_ERR_UNSUPPORTED);
        assert!(last().contains("GPU"), "{}", last());
        for (field, value, code) in [
            ("device", -1, dsv3_status::DSV3_ERR_INVALID_ARGUMENT),
            ("dtype", 9, dsv3_status::DSV3_ERR_INVALID_ARGUMENT),
            ("attention", 2, dsv3_status::DSV3_ERR_INVALID_ARGUMENT),
        ] {
            let mut q = std::ptr::read(&p);
            match field {
                "device" => q.device = value,
                "dtype" => q.dtype = value,
                _ => q.attention = value,
            }
            assert_eq!(dsv3_model_load(path.as_ptr(), &q, &mut m), code, "{field} = {value}");
            assert!(last().contains(field), "{}", last());
        }
        let mut q = std::ptr::read(&p);
        q.struct_size = 8;
        assert_eq!(dsv3_model_load(path.as_ptr(), &q, &mut m), dsv3_status::DSV3_ERR_INVALID_ARGUMENT);
        assert!(last().contains("struct_size"));
        assert_eq!(dsv3_model_load(path.as_ptr(), &p, &mut m), dsv3_status::DSV3_OK);
        assert_eq!(dsv3_model_load(path.as_ptr(), &p, null_mut()), dsv3_status::DSV3_ERR_NULL_ARGUMENT);
        dsv3_model_free(m);
    }
}

#[test]
fn buffers_sessions_and_info() {
    unsafe {
        let m = load("tests/fixtures/v3_group");
        let mut info: dsv3_model_info = std::mem::zeroed();
        assert_eq!(dsv3_model_get_info(m, &mut info), dsv3_status::DSV3_ERR_INVALID_ARGUMENT, "struct_size unset");
        info.struct_size = std::mem::size_of::<dsv3_model_info>();
        assert_eq!(dsv3_model_get_info(m, &mut info), dsv3_status::DSV3_OK);
        assert_eq!((info.vocab_size, info.num_mtp_modules, info.num_experts), (128, 1, 16));
        let mut needed = 0usize;
        assert_eq!(dsv3_model_config_json(m, null_mut(), 0, &mut needed), dsv3_status::DSV3_ERR_BUFFER_TOO_SMALL);
        let mut buf = vec![0i8; needed];
        assert_eq!(dsv3_model_config_json(m, buf.as_mut_ptr(), buf.len(), &mut needed), dsv3_status::DSV3_OK);
        let json = CStr::from_ptr(buf.as_ptr()).to_str().unwrap();
        assert!(json.contains("\"model_type\":\"deepseek_v3\""));
        let mut s = null_mut();
        assert_eq!(dsv3_session_new(m, 2, &mut s), dsv3_status::DSV3_OK);
        dsv3_model_free(m); // the session keeps the model alive
        let ids = [1i32, 2, 3];
        let mut small = [0f32; 4];
        assert_eq!(
            dsv3_session_step(s, 0, ids.as_ptr(), 3, small.as_mut_ptr(), 4, &mut needed),
            dsv3_status::DSV3_ERR_BUFFER_TOO_SMALL
        );
        assert_eq!(needed, 128);
        let mut len = 9usize;
        assert_eq!(dsv3_session_length(s, 0, &mut len), dsv3_status::DSV3_OK);
        assert_eq!(len, 0, "a failed step leaves the cache unchanged");
        let mut logits = vec![0f32; 128];
        assert_eq!(
            dsv3_session_step(s, 0, ids.as_ptr(), 3, logits.as_mut_ptr(), 128, null_mut()),
            dsv3_status::DSV3_OK
        );
        assert_eq!(
            dsv3_session_step(s, 1, [500i32].as_ptr(), 1, null_mut(), 0, null_mut()),
            dsv3_status::DSV3_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            dsv3_session_step(s, 5, ids.as_ptr(), 3, null_mut(), 0, null_mut()),
            dsv3_status::DSV3_ERR_INVALID_ARGUMENT
        );
        assert_eq!(dsv3_session_truncate(s, 0, 2), dsv3_status::DSV3_OK);
        assert_eq!(dsv3_session_length(s, 0, &mut len), dsv3_status::DSV3_OK);
        assert_eq!(len, 2);
        assert_eq!(dsv3_session_reset(s, 0), dsv3_status::DSV3_OK);
        dsv3_session_free(s);
        dsv3_session_free(null_mut());
    }
}

#[test]
fn trainer_sft_expert_load_checkpoint_and_preset() {
    unsafe {
        let m = load("tests/fixtures/v3_group");
        let mut p: dsv3_train_params = std::mem::zeroed();
        dsv3_train_params_default(&mut p);
        p.schedule = 0;
        let mut t = null_mut();
        assert_eq!(dsv3_trainer_new(m, &p, &mut t), dsv3_status::DSV3_OK);
        let ids: Vec<i32> = (0..16).map(|i| i * 7 % 128).collect();
        let mut mask = [1f32; 2 * 7];
        mask[..3].fill(0.0);
        let mut met: dsv3_step_metrics = std::mem::zeroed();
        met.struct_size = std::mem::size_of::<dsv3_step_metrics>();
        assert_eq!(
            dsv3_trainer_step_sft(t, ids.as_ptr(), mask.as_ptr(), 2, 8, &mut met),
            dsv3_status::DSV3_OK,
            "{}",
            last()
        );
        assert!(met.loss > 0.0 && met.tokens == 16 && met.max_over_mean_load >= 1.0);
        let mut loads = [0u32; 16];
        let mut n = 0usize;
        assert_eq!(dsv3_trainer_expert_load(t, 0, loads.as_mut_ptr(), 16, &mut n), dsv3_status::DSV3_OK);
        assert_eq!((n, loads.iter().sum::<u32>()), (16, 16 * 4), "every token picks top-4");
        assert_eq!(
            dsv3_trainer_expert_load(t, 9, loads.as_mut_ptr(), 16, &mut n),
            dsv3_status::DSV3_ERR_INVALID_ARGUMENT
        );
        assert_eq!(dsv3_trainer_step(t, ids.as_ptr(), 2, 1, null_mut()), dsv3_status::DSV3_ERR_INVALID_ARGUMENT);
        mask[0] = f32::NAN;
        assert_eq!(
            dsv3_trainer_step_sft(t, ids.as_ptr(), mask.as_ptr(), 2, 8, null_mut()),
            dsv3_status::DSV3_ERR_INVALID_ARGUMENT
        );
        let dir = std::env::temp_dir().join(format!("dsv3-abi-ckpt-{}", std::process::id()));
        let cdir = CString::new(dir.to_str().unwrap()).unwrap();
        assert_eq!(dsv3_trainer_save(t, cdir.as_ptr()), dsv3_status::DSV3_OK, "{}", last());
        let mut t2 = null_mut();
        assert_eq!(dsv3_trainer_load(cdir.as_ptr(), &p, &mut t2), dsv3_status::DSV3_OK, "{}", last());
        let mut snap = null_mut();
        assert_eq!(dsv3_trainer_model(t2, &mut snap), dsv3_status::DSV3_OK);
        let mut out = [0i32; 4];
        let mut nout = 0usize;
        let mut sp: dsv3_sampling_params = std::mem::zeroed();
        dsv3_sampling_params_default(&mut sp);
        sp.max_new_tokens = 4;
        assert_eq!(
            dsv3_generate(snap, [1i32, 2].as_ptr(), 2, &sp, None, null_mut(), out.as_mut_ptr(), 4, &mut nout),
            dsv3_status::DSV3_OK
        );
        assert_eq!(nout, 4);
        sp.max_new_tokens = 9;
        assert_eq!(
            dsv3_generate(snap, [1i32].as_ptr(), 1, &sp, None, null_mut(), out.as_mut_ptr(), 4, &mut nout),
            dsv3_status::DSV3_ERR_BUFFER_TOO_SMALL
        );
        p.precision = 5;
        assert_eq!(dsv3_trainer_new(m, &p, &mut t2), dsv3_status::DSV3_ERR_INVALID_ARGUMENT);
        p.precision = 2;
        let mut pt = null_mut();
        let name = CString::new("tiny").unwrap();
        assert_eq!(dsv3_trainer_new_preset(name.as_ptr(), &p, &mut pt), dsv3_status::DSV3_OK);
        let bad = CString::new("huge").unwrap();
        assert_eq!(dsv3_trainer_new_preset(bad.as_ptr(), &p, &mut t2), dsv3_status::DSV3_ERR_INVALID_ARGUMENT);
        assert!(last().contains("tiny"), "{}", last());
        for h in [t, pt] {
            dsv3_trainer_free(h);
        }
        dsv3_model_free(snap);
        dsv3_model_free(m);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn tokenizers() {
    unsafe {
        let mut tk = null_mut();
        assert_eq!(
            dsv3_tokenizer_load(cpath("tests/fixtures/tokenizer/tokenizer.json").as_ptr(), &mut tk),
            dsv3_status::DSV3_OK
        );
        let text = CString::new("12345+678=13023").unwrap();
        let mut n = 0usize;
        assert_eq!(
            dsv3_tokenizer_encode(tk, text.as_ptr(), 1, null_mut(), 0, &mut n),
            dsv3_status::DSV3_ERR_BUFFER_TOO_SMALL
        );
        let mut ids = vec![0i32; n];
        assert_eq!(dsv3_tokenizer_encode(tk, text.as_ptr(), 1, ids.as_mut_ptr(), n, &mut n), dsv3_status::DSV3_OK);
        assert_eq!(ids[0], 0, "BOS first");
        let mut buf = vec![0i8; 64];
        assert_eq!(
            dsv3_tokenizer_decode(tk, ids.as_ptr(), n, 1, buf.as_mut_ptr(), 64, null_mut()),
            dsv3_status::DSV3_OK
        );
        assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str().unwrap(), "12345+678=13023");
        let eos = CString::new("<｜end▁of▁sentence｜>").unwrap();
        let mut id = -1;
        assert_eq!(dsv3_tokenizer_token_to_id(tk, eos.as_ptr(), &mut id), dsv3_status::DSV3_OK);
        assert_eq!(id, 1);
        let nope = CString::new("<no such token>").unwrap();
        assert_eq!(dsv3_tokenizer_token_to_id(tk, nope.as_ptr(), &mut id), dsv3_status::DSV3_ERR_INVALID_ARGUMENT);
        let mut v = 0usize;
        assert_eq!(dsv3_tokenizer_vocab_size(tk, &mut v), dsv3_status::DSV3_OK);
        assert_eq!(v, 300);
        dsv3_tokenizer_free(tk);
        // a model without tokenizer.json whose vocabulary is not byte-level
        let m = load("tests/fixtures/v3_tiny");
        assert_eq!(dsv3_tokenizer_for_model(m, &mut tk), dsv3_status::DSV3_ERR_INVALID_ARGUMENT);
        assert!(last().contains("tokenizer"));
        dsv3_model_free(m);
        assert_eq!(dsv3_tokenizer_load(cpath("nope.json").as_ptr(), &mut tk), dsv3_status::DSV3_ERR_IO);
        assert!(!CStr::from_ptr(dsv3_version()).to_str().unwrap().is_empty());
    }
}

#[test]
fn huge_sizes_are_errors_not_aborts() {
    unsafe {
        let m = load("tests/fixtures/v3_tiny");
        let mut s = null_mut();
        assert_eq!(dsv3_session_new(m, usize::MAX / 2, &mut s), dsv3_status::DSV3_ERR_INVALID_ARGUMENT);
        let mut t = null_mut();
        assert_eq!(dsv3_trainer_new(m, null(), &mut t), dsv3_status::DSV3_OK);
        let ids = [1i32; 4];
        assert_eq!(
            dsv3_trainer_step(t, ids.as_ptr(), usize::MAX / 2, 4, null_mut()),
            dsv3_status::DSV3_ERR_INVALID_ARGUMENT
        );
        let mut sp: dsv3_sampling_params = std::mem::zeroed();
        dsv3_sampling_params_default(&mut sp);
        let stops = [-5i32];
        sp.stop_tokens = stops.as_ptr();
        sp.n_stop_tokens = 1;
        let mut out = [0i32; 64];
        let mut n = 0usize;
        assert_eq!(
            dsv3_generate(m, ids.as_ptr(), 1, &sp, None, null_mut(), out.as_mut_ptr(), 64, &mut n),
            dsv3_status::DSV3_ERR_INVALID_ARGUMENT
        );
        dsv3_trainer_free(t);
        dsv3_model_free(m);
    }
}

/// A host reward: counts its calls (through user data) and rewards completions by their share
/// of lowercase letters; NaN (does not apply) when the prompt has no reference answer.
unsafe extern "C" fn host_reward(
    user: *mut c_void,
    prompt: *const std::ffi::c_char,
    completion: *const std::ffi::c_char,
    answer: *const std::ffi::c_char,
) -> f32 {
    *(user as *mut usize) += 1;
    assert!(!CStr::from_ptr(prompt).to_bytes().is_empty());
    if answer.is_null() {
        return f32::NAN;
    }
    let c = CStr::from_ptr(completion).to_string_lossy();
    let n = c.chars().count().max(1);
    c.chars().filter(|x| x.is_ascii_lowercase()).count() as f32 / n as f32
}

#[test]
fn grpo_with_host_and_builtin_rewards() {
    use dsv3::grpo::*;
    unsafe {
        let mut tp = std::mem::zeroed::<dsv3_train_params>();
        dsv3_train_params_default(&mut tp);
        tp.schedule = 0;
        tp.lr = 1e-3;
        let mut t = null_mut();
        assert_eq!(dsv3_trainer_new_preset(c"tiny".as_ptr(), &tp, &mut t), dsv3_status::DSV3_OK, "{}", last());
        let mut m = null_mut();
        assert_eq!(dsv3_trainer_model(t, &mut m), dsv3_status::DSV3_OK);
        let mut p = std::mem::zeroed::<dsv3_grpo_params>();
        assert_eq!(dsv3_grpo_params_default(&mut p), dsv3_status::DSV3_OK);
        p.num_generations = 4;
        p.max_completion_length = 5;
        p.beta = 0.04;
        let mut bad = std::mem::zeroed::<dsv3_grpo_params>();
        dsv3_grpo_params_default(&mut bad);
        bad.loss_type = 9;
        let mut g = null_mut();
        assert_eq!(dsv3_grpo_new(m, &tp, &bad, &mut g), dsv3_status::DSV3_ERR_INVALID_ARGUMENT);
        assert!(last().contains("loss_type"), "{}", last());
        bad.loss_type = 3;
        bad.num_generations = 1;
        assert_eq!(dsv3_grpo_new(m, &tp, &bad, &mut g), dsv3_status::DSV3_ERR_INVALID_ARGUMENT);
        assert_eq!(dsv3_grpo_new(m, &tp, &p, &mut g), dsv3_status::DSV3_OK, "{}", last());
        let prompts = [c"ab".as_ptr(), c"cd".as_ptr(), c"no answer".as_ptr()];
        let answers = [c"x".as_ptr(), c"y".as_ptr(), null()];
        let mut met = dsv3_grpo_metrics { struct_size: std::mem::size_of::<dsv3_grpo_metrics>(), ..Default::default() };
        assert_eq!(
            dsv3_grpo_step(g, null(), prompts.as_ptr(), answers.as_ptr(), 3, &mut met),
            dsv3_status::DSV3_ERR_INVALID_ARGUMENT
        );
        assert!(last().contains("reward"), "{}", last());
        assert_eq!(
            dsv3_grpo_add_reward(g, c"bogus".as_ptr(), 1.0, None, null_mut()),
            dsv3_status::DSV3_ERR_INVALID_ARGUMENT
        );
        let mut calls = 0usize;
        let user = &mut calls as *mut usize as *mut c_void;
        assert_eq!(dsv3_grpo_add_reward(g, c"lower".as_ptr(), 1.0, Some(host_reward), user), dsv3_status::DSV3_OK);
        assert_eq!(dsv3_grpo_add_reward(g, c"exact".as_ptr(), 0.5, None, null_mut()), dsv3_status::DSV3_OK);
        assert_eq!(
            dsv3_grpo_add_reward(g, c"exact".as_ptr(), 1.0, None, null_mut()),
            dsv3_status::DSV3_ERR_INVALID_ARGUMENT
        );
        assert!(last().contains("already"), "{}", last());
        let mut rewards = Vec::new();
        for _ in 0..40 {
            let st = dsv3_grpo_step(g, null(), prompts.as_ptr(), answers.as_ptr(), 3, &mut met);
            assert_eq!(st, dsv3_status::DSV3_OK, "{}", last());
            rewards.push(met.reward);
        }
        assert_eq!(calls, 40 * 12, "the host reward runs once per completion");
        assert!(met.completion_length_max <= 5 && met.sampling_s > 0.0 && met.learning_s > 0.0);
        assert!(met.kl > 0.0, "β > 0: the policy moved away from the reference");
        let (first, tail) = (rewards[..8].iter().sum::<f32>() / 8.0, rewards[32..].iter().sum::<f32>() / 8.0);
        assert!(tail > first + 0.1, "the host reward rises: {rewards:?}");
        let (mut mean, mut std) = (0f32, 0f32);
        assert_eq!(dsv3_grpo_reward_stats(g, 0, &mut mean, &mut std), dsv3_status::DSV3_OK);
        assert!(mean > 0.0 && mean <= 1.0);
        assert_eq!(dsv3_grpo_reward_stats(g, 2, &mut mean, &mut std), dsv3_status::DSV3_ERR_INVALID_ARGUMENT);
        // completions: 12 of them; the third prompt's has no applicable reward (NaN)
        let mut buf = [0 as std::ffi::c_char; 64];
        let (mut need, mut r) = (0usize, 0f32);
        assert_eq!(dsv3_grpo_completion(g, 11, buf.as_mut_ptr(), 64, &mut need, &mut r), dsv3_status::DSV3_OK);
        assert!(r.is_nan() && need >= 1);
        assert_eq!(dsv3_grpo_completion(g, 0, buf.as_mut_ptr(), 64, &mut need, &mut r), dsv3_status::DSV3_OK);
        assert!(r.is_finite());
        assert_eq!(
            dsv3_grpo_completion(g, 12, buf.as_mut_ptr(), 64, &mut need, &mut r),
            dsv3_status::DSV3_ERR_INVALID_ARGUMENT
        );
        // stop tokens, snapshot model, checkpoint
        let stop = [10u32];
        assert_eq!(dsv3_grpo_set_stop_tokens(g, stop.as_ptr(), 1), dsv3_status::DSV3_OK);
        let big = [100_000u32];
        assert_eq!(dsv3_grpo_set_stop_tokens(g, big.as_ptr(), 1), dsv3_status::DSV3_ERR_INVALID_ARGUMENT);
        let mut pm = null_mut();
        assert_eq!(dsv3_grpo_model(g, &mut pm), dsv3_status::DSV3_OK);
        let dir = std::env::temp_dir().join(format!("dsv3-abi-grpo-{}", std::process::id()));
        let cdir = CString::new(dir.to_str().unwrap()).unwrap();
        assert_eq!(dsv3_grpo_save(g, cdir.as_ptr()), dsv3_status::DSV3_OK, "{}", last());
        assert!(dir.join("model.safetensors").exists());
        let mut n = 0usize;
        assert_eq!(dsv3_grpo_num_completions(g, &mut n), dsv3_status::DSV3_OK);
        assert_eq!(n, 12);
        // resume: the step count carries over; rewards are added again
        let mut g2 = null_mut();
        assert_eq!(dsv3_grpo_load(cdir.as_ptr(), m, &tp, &p, &mut g2), dsv3_status::DSV3_OK, "{}", last());
        assert_eq!(dsv3_grpo_add_reward(g2, c"exact".as_ptr(), 1.0, None, null_mut()), dsv3_status::DSV3_OK);
        assert_eq!(dsv3_grpo_step(g2, null(), prompts.as_ptr(), answers.as_ptr(), 3, &mut met), dsv3_status::DSV3_OK);
        assert_eq!(met.step, 40, "{}", last());
        dsv3_grpo_free(g2);
        let _ = std::fs::remove_dir_all(&dir);
        met.struct_size = 8;
        assert_eq!(
            dsv3_grpo_step(g, null(), prompts.as_ptr(), answers.as_ptr(), 3, &mut met),
            dsv3_status::DSV3_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            dsv3_grpo_step(null_mut(), null(), prompts.as_ptr(), null(), 3, null_mut()),
            dsv3_status::DSV3_ERR_NULL_ARGUMENT
        );
        dsv3_model_free(pm);
        dsv3_grpo_free(g);
        dsv3_model_free(m);
        dsv3_trainer_free(t);
    }
}
