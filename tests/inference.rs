//! Inference behaviour: cached decode reproduces the uncached forward, batched steps equal
//! single ones, absorbed equals naive, generation is seeded and stops where it should.
mod common;
use common::*;
use dsv3::infer::{generate, Event, SamplingParams, Session};
use dsv3::model::{AttnForm, LoadOptions};

#[test]
fn cached_decode_reproduces_uncached_logits() {
    for name in ["v3_group", "v3_yarn", "v2_lite", "v3_fp8"] {
        for attn in [AttnForm::Absorbed, AttnForm::Naive] {
            let model = load(name, LoadOptions { attn, ..Default::default() });
            let ids = golden_ids(name, "input_ids").unwrap();
            let seq = &ids[0];
            let full = model.forward(&[seq]).unwrap();
            let v = model.cfg.vocab_size;
            // prefill 3 tokens, then decode the rest one by one
            let mut s = Session::new(&model, 1);
            let mut got = s.step_all(&[(0, &seq[..3])]).unwrap();
            for t in 3..seq.len() {
                got.extend(s.step(&[(0, &seq[t..t + 1])]).unwrap());
            }
            assert_eq!(s.len(0), seq.len());
            let e = rel_max_err(&got, &full[..seq.len() * v]);
            assert!(e <= 1e-5, "{name} {attn:?}: cached vs uncached {e:e}");
        }
    }
}

#[test]
fn batched_step_equals_separate_sequences() {
    let model = load("v3_group", LoadOptions::default());
    let ids = golden_ids("v3_group", "input_ids").unwrap();
    let v = model.cfg.vocab_size;
    let mut s = Session::new(&model, 2);
    // ragged: slot 0 gets 5 tokens, slot 1 gets 2, then one decode step for both
    let a = s.step(&[(0, &ids[0][..5]), (1, &ids[1][..2])]).unwrap();
    let b = s.step(&[(1, &ids[1][2..3]), (0, &ids[0][5..6])]).unwrap();
    let full0 = model.forward(&[&ids[0][..6]]).unwrap();
    let full1 = model.forward(&[&ids[1][..3]]).unwrap();
    assert!(rel_max_err(&a[..v], &full0[4 * v..5 * v]) <= 1e-5);
    assert!(rel_max_err(&a[v..], &full1[v..2 * v]) <= 1e-5);
    assert!(rel_max_err(&b[..v], &full1[2 * v..3 * v]) <= 1e-5);
    assert!(rel_max_err(&b[v..], &full0[5 * v..6 * v]) <= 1e-5);
}

#[test]
fn absorbed_equals_naive() {
    for name in ["v3_tiny", "v3_qnull", "v3_fp8"] {
        let ids = golden_ids(name, "input_ids").unwrap();
        let seqs: Vec<&[u32]> = ids.iter().map(|r| &r[..]).collect();
        let a = load(name, LoadOptions { attn: AttnForm::Absorbed, ..Default::default() }).forward(&seqs).unwrap();
        let n = load(name, LoadOptions { attn: AttnForm::Naive, ..Default::default() }).forward(&seqs).unwrap();
        assert!(rel_max_err(&a, &n) <= 1e-5, "{name}");
    }
}

#[test]
fn session_truncate_and_reset() {
    let model = load("v3_tiny", LoadOptions::default());
    let ids = golden_ids("v3_tiny", "input_ids").unwrap();
    let mut s = Session::new(&model, 1);
    let first = s.step(&[(0, &ids[0][..4])]).unwrap();
    s.step(&[(0, &ids[0][4..6])]).unwrap();
    s.truncate(0, 4).unwrap();
    assert_eq!(s.len(0), 4);
    s.reset(0).unwrap();
    assert_eq!(s.step(&[(0, &ids[0][..4])]).unwrap(), first);
    assert!(s.truncate(0, 9).is_err());
    assert!(s.step(&[(3, &ids[0][..1])]).is_err());
    assert!(s.step(&[(0, &[])]).is_err());
    assert!(s.step(&[(0, &[100_000])]).is_err());
    assert_eq!(s.len(0), 4, "a failed step leaves the cache unchanged");
}

#[test]
fn generation_is_seeded_streams_and_stops() {
    let model = load("v3_group", LoadOptions::default());
    let prompt = [1u32, 2, 3];
    let p =
        SamplingParams { temperature: 0.8, top_p: 0.9, top_k: 20, seed: 42, max_new_tokens: 10, stop_tokens: vec![] };
    let mut streamed = Vec::new();
    let a = generate(&model, &[&prompt], &p, |e| {
        if let Event::Token { token, .. } = e {
            streamed.push(token)
        }
        true
    })
    .unwrap();
    let b = generate(&model, &[&prompt], &p, |_| true).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.tokens[0].len(), 10);
    assert_eq!(streamed, a.tokens[0]);
    // greedy equals argmax over the uncached forward
    let g = SamplingParams { max_new_tokens: 4, ..Default::default() };
    let out = generate(&model, &[&prompt], &g, |_| true).unwrap();
    let mut seq = prompt.to_vec();
    for &t in &out.tokens[0] {
        let l = model.forward(&[&seq]).unwrap();
        let v = model.cfg.vocab_size;
        let last = &l[(seq.len() - 1) * v..];
        assert_eq!(t as usize, dsv3::infer::sampling::argmax(last));
        seq.push(t);
    }
    // a stop token ends the sequence, and the callback can stop it
    let stop = SamplingParams { stop_tokens: vec![out.tokens[0][1]], ..g.clone() };
    let s = generate(&model, &[&prompt], &stop, |_| true).unwrap();
    assert_eq!(s.tokens[0].len(), 2);
    assert!(s.stopped[0]);
    let c = generate(&model, &[&prompt, &prompt[..2]], &g, |e| !matches!(e, Event::Token { seq: 1, .. })).unwrap();
    assert_eq!(c.tokens[1].len(), 1);
    assert_eq!(c.tokens[0].len(), 4);
}

#[test]
fn grouped_generation_shares_the_prefill() {
    use dsv3::infer::generate_grouped;
    let model = load("v3_group", LoadOptions::default());
    let (a, b) = ([1u32, 2, 3], [4u32, 5]);
    // greedy: each group member equals plain generation of its prompt
    let g = SamplingParams { max_new_tokens: 5, ..Default::default() };
    let grouped = generate_grouped(&model, &[&a, &b], 3, &g, |_| true).unwrap();
    let plain = generate(&model, &[&a, &b], &g, |_| true).unwrap();
    assert_eq!(grouped.tokens.len(), 6);
    for (i, t) in grouped.tokens.iter().enumerate() {
        assert_eq!(t, &plain.tokens[i / 3], "row {i}");
    }
    // sampling: the rows of a group differ, and the same seed gives the same rows; the stream
    // reports every row and one prefill of the unique prompts
    let p = SamplingParams { temperature: 1.0, seed: 7, max_new_tokens: 6, ..Default::default() };
    let mut prefill = 0;
    let mut seen = [0usize; 6];
    let s1 = generate_grouped(&model, &[&a, &b], 3, &p, |e| {
        match e {
            Event::PrefillDone { tokens } => prefill = tokens,
            Event::Token { seq, .. } => seen[seq] += 1,
        }
        true
    })
    .unwrap();
    assert_eq!(prefill, 5);
    assert_eq!(seen, [6; 6]);
    assert_eq!(s1, generate_grouped(&model, &[&a, &b], 3, &p, |_| true).unwrap());
    assert!(s1.tokens[0] != s1.tokens[1] || s1.tokens[1] != s1.tokens[2], "{:?}", s1.tokens);
    // a forked slot continues from the copied prefix exactly like the original
    let mut sess = Session::new(&model, 2);
    sess.step(&[(0, &a[..])]).unwrap();
    sess.fork(0, 1).unwrap();
    assert_eq!(sess.len(1), 3);
    assert_eq!(sess.step(&[(0, &[7][..])]).unwrap(), sess.step(&[(1, &[7][..])]).unwrap());
    assert!(sess.fork(0, 5).is_err() && sess.fork(9, 0).is_err());
    assert!(generate_grouped(&model, &[&a], 0, &g, |_| true).is_err());
}
