//! The engine on the toy policy: one shared prefill per request, batched steps, stopping,
//! determinism by seed, stream independence, and clear errors on bad input naming the
//! parameter.

mod common;

use common::*;
use std::sync::Arc;
use tilt_engine::memory::check_batch_memory;
use tilt_engine::stepper::draw_stream;
use tilt_engine::strategy::{MAX_DRAWS, MAX_N};
use tilt_engine::{EngineError, ErrorKind, FinishReason, KlNote, Response};
use tilt_models::toy::TOY_EOS;

fn length_engine() -> tilt_engine::Engine<tilt_models::toy::ToyPolicy> {
    toy_engine(vec![("length", reward(LengthReward))], vec![], 4096)
}

#[test]
fn one_prefill_per_request_and_one_reward_batch_per_choice() {
    let counting = Arc::new(CountingReward::default());
    let e = toy_engine(
        vec![("counting", Arc::clone(&counting) as Arc<_>)],
        vec![],
        4096,
    );
    let toy = e.policy();
    let out = e.generate(&req("ab", bon(16), 1, 6)).unwrap();
    assert_eq!(toy.prefill_calls(), 1);
    assert_eq!(counting.calls(), 1);
    assert_eq!(*counting.sizes.lock().unwrap(), vec![16]);
    // The batch is stepped once per position, never once per sequence.
    assert!(toy.step_calls() < 6, "{} steps", toy.step_calls());
    let out = &out.outputs[0];
    assert_eq!(out.candidates.len(), 16);
    for c in &out.candidates {
        assert!(c.new_tokens >= 1 && c.new_tokens <= 6);
        assert_eq!(c.new_tokens, c.tokens.len());
        match c.finish {
            FinishReason::Eos => assert_eq!(c.tokens.last(), Some(&TOY_EOS)),
            FinishReason::Length => {
                assert_eq!(c.new_tokens, 6);
                assert!(!c.tokens.contains(&TOY_EOS));
            }
            FinishReason::Stop => panic!("no stop sequence was given"),
        }
        assert!(c.log_prob < 0.0);
    }
    // The engine prefills once per *request*: its choices share that prefill, step as one
    // batch (still once per position), and each choice scores its candidates in one call.
    let steps = toy.step_calls();
    let r = e.generate(&choices(req("ab", bon(16), 1, 6), 3)).unwrap();
    assert_eq!(r.outputs.len(), 3);
    assert_eq!(toy.prefill_calls(), 2);
    assert!(
        toy.step_calls() - steps < 6,
        "{} steps",
        toy.step_calls() - steps
    );
    assert_eq!(counting.calls(), 4);
    assert_eq!(*counting.sizes.lock().unwrap(), vec![16; 4]);
}

#[test]
fn rewind_shares_one_prefill_across_its_batches() {
    let e = length_engine();
    let toy = e.policy();
    // An unreachable threshold: every batch is drawn, the cap is hit, the best is returned.
    let r = e.generate(&req("a", rewind(4, 100.0, 30), 3, 8)).unwrap();
    let out = &r.outputs[0];
    assert_eq!(toy.prefill_calls(), 1);
    assert_eq!((out.draws, out.accepted), (30, Some(false)));
    assert_eq!(out.candidates.len(), 30);
    assert!(out.candidates.iter().all(|c| out.reward >= c.reward));
    assert_eq!(out.kl_estimate, None);
    assert_eq!(out.kl_note, KlNote::RewindNotAccepted);
    // A reachable one: the first accepted draw in draw order.
    for seed in 0..10 {
        let r = e
            .generate(&req("a", rewind(4, 5.0, 1000), seed, 8))
            .unwrap();
        let out = &r.outputs[0];
        assert_eq!(out.accepted, Some(true));
        assert_eq!(out.kl_note, KlNote::Rewind);
        assert_eq!(out.n, Some(4));
        assert!(out.reward >= 5.0);
        assert!(out.candidates[..out.selected]
            .iter()
            .all(|c| c.reward < 5.0));
        let accepted = out.candidates.iter().filter(|c| c.reward >= 5.0).count();
        let est = (out.draws as f64 / accepted as f64).ln();
        assert!((out.kl_estimate.unwrap() - est).abs() < 1e-12);
    }
    assert_eq!(toy.prefill_calls(), 11, "one prefill per request");
}

#[test]
fn rewind_output_does_not_depend_on_the_batch_size() {
    let e = length_engine();
    for seed in 0..20 {
        let a = e.generate(&req("a", rewind(1, 3.0, 100), seed, 6)).unwrap();
        let b = e.generate(&req("a", rewind(7, 3.0, 100), seed, 6)).unwrap();
        let (a, b) = (&a.outputs[0], &b.outputs[0]);
        assert_eq!((&a.text, a.selected), (&b.text, b.selected));
    }
}

fn tokens_of(r: &Response, choice: usize) -> Vec<Vec<u32>> {
    r.outputs[choice]
        .candidates
        .iter()
        .map(|c| c.tokens.clone())
        .collect()
}

#[test]
fn a_candidate_depends_only_on_seed_prompt_index_and_draw_number() {
    let e = length_engine();
    let four = e.generate(&at(req("ab", bon(4), 9, 5), 2)).unwrap();
    let eight = e.generate(&at(req("ab", won(8), 9, 5), 2)).unwrap();
    for (a, b) in tokens_of(&four, 0).iter().zip(&tokens_of(&eight, 0)) {
        assert_eq!(a, b);
    }
    // Another prompt index or seed draws other candidates.
    let other = e.generate(&at(req("ab", bon(4), 9, 5), 3)).unwrap();
    let reseed = e.generate(&at(req("ab", bon(4), 10, 5), 2)).unwrap();
    assert_ne!(tokens_of(&four, 0), tokens_of(&other, 0));
    assert_ne!(tokens_of(&four, 0), tokens_of(&reseed, 0));
    // And it is the same sequence as sampling that stream directly.
    assert_eq!(
        direct_sample("ab", 9, draw_stream(2, 1), 5),
        four.outputs[0].candidates[1].tokens
    );
    // The other choices of a request: candidate d of choice j draws from stream
    // draw_stream(index, j·MAX_N + d) (bon, won, soft-bon, sample), rewind's draw d from
    // draw_stream(index, j·MAX_DRAWS + d).
    let three = e
        .generate(&choices(at(req("ab", bon(4), 9, 5), 2), 3))
        .unwrap();
    let sampled = e
        .generate(&choices(at(req("ab", sample(), 9, 5), 2), 3))
        .unwrap();
    let rewound = e
        .generate(&choices(at(req("ab", rewind(2, 100.0, 6), 9, 5), 2), 3))
        .unwrap();
    for j in 0..3u64 {
        for d in 0..4u64 {
            assert_eq!(
                direct_sample("ab", 9, draw_stream(2, j * MAX_N as u64 + d), 5),
                three.outputs[j as usize].candidates[d as usize].tokens,
                "bon choice {j} candidate {d}"
            );
        }
        assert_eq!(
            direct_sample("ab", 9, draw_stream(2, j * MAX_N as u64), 5),
            sampled.outputs[j as usize].tokens,
            "sample choice {j}"
        );
        for d in 0..6u64 {
            assert_eq!(
                direct_sample("ab", 9, draw_stream(2, j * MAX_DRAWS as u64 + d), 5),
                rewound.outputs[j as usize].candidates[d as usize].tokens,
                "rewind choice {j} draw {d}"
            );
        }
    }
}

#[test]
fn same_seed_same_json_bytes() {
    let e = engine();
    for st in every_strategy()
        .into_iter()
        .chain([bon(6), won(6), soft_bon(6, 0.5)])
    {
        let name = st.name();
        let a = e.generate(&req("cab", st.clone(), 77, 7)).unwrap();
        let b = e.generate(&req("cab", st.clone(), 77, 7)).unwrap();
        assert_eq!(json(&a), json(&b), "{name}");
        assert_eq!(a, b, "{name}: the tokens too");
        let o = &a.outputs[0];
        assert_eq!(o.units, "nats");
        assert_eq!(o.strategy, name);
        assert_eq!(o.seed, 77);
        // sample draws exactly one candidate (it has no n); Output.n is None for sample
        // and the cd strategies, whose batches are their own parameters.
        match name {
            "sample" => {
                assert_eq!(o.candidates.len(), 1);
                assert_eq!(o.n, None);
                assert_eq!(o.kl_note, KlNote::Reference);
                assert_eq!((o.kl_bound, o.kl_estimate), (Some(0.0), Some(0.0)));
            }
            "cd-token" | "cd-block" => assert_eq!(o.n, None),
            "rewind" => assert_eq!(o.n, Some(2)),
            _ => assert_eq!(o.n, Some(o.candidates.len())),
        }
    }
}

#[test]
fn best_and_worst_choose_extremes_and_cost_fields_are_set() {
    let e = length_engine();
    let b = e.generate(&req("a", bon(8), 5, 6)).unwrap();
    let w = e.generate(&req("a", won(8), 5, 6)).unwrap();
    let (b, w) = (&b.outputs[0], &w.outputs[0]);
    assert!(b.candidates.iter().all(|c| b.reward >= c.reward));
    assert!(w.candidates.iter().all(|c| w.reward <= c.reward));
    assert_eq!(b.candidates[b.selected].text, b.text);
    assert_eq!(w.candidates[w.selected].text, w.text);
    let bound = 8f64.ln() - 7.0 / 8.0;
    assert!((b.kl_bound.unwrap() - bound).abs() < 1e-12);
    let est = b.kl_estimate.unwrap();
    assert!(est > 0.0 && est <= bound + 1e-12, "{est}");
    // kl_note is now a code; its explanation carries the reference.
    assert_eq!(b.kl_note, KlNote::SelectionBound);
    assert!(b.kl_note.explain().contains("2401.01879"));
    let j = serde_json::to_value(b).unwrap();
    assert_eq!(j["kl_note"], "selection-bound");
}

/// The error of a request that must be refused: an input error naming `param`, with no
/// CLI flag in its message.
fn input_error(r: Result<Response, EngineError>, param: &str) -> String {
    let e = r.expect_err("bad input must be refused");
    assert_eq!(
        e.kind(),
        ErrorKind::InvalidInput,
        "{e} should be an input error"
    );
    assert_eq!(e.param(), Some(param), "{e} should name {param}");
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("{param}: ")), "{msg}");
    assert!(!msg.contains("--"), "no CLI flag in {msg:?}");
    msg
}

#[test]
fn bad_inputs_are_clear_errors() {
    let e = toy_engine(
        vec![("length", reward(LengthReward)), ("nan", reward(NanReward))],
        vec![],
        4096,
    );
    let msg = input_error(e.generate(&req("", bon(4), 0, 4)), "prompt");
    assert!(msg.contains("empty prompt"), "{msg}");
    let msg = input_error(e.generate(&req("  \n", bon(4), 0, 4)), "prompt");
    assert!(msg.contains("empty prompt"), "{msg}");
    input_error(e.generate(&req("a", bon(0), 0, 4)), "n");
    input_error(e.generate(&req("a", bon(MAX_N + 1), 0, 4)), "n");
    input_error(e.generate(&req("a", won(0), 0, 4)), "n");
    input_error(e.generate(&req("a", bon(2), 0, 0)), "max_new_tokens");
    let long = "ab".repeat(20);
    let msg = input_error(e.generate(&req(&long, bon(2), 0, 4)), "prompt");
    assert!(msg.contains("longer than the model's context"), "{msg}");
    // A prompt that fits but leaves too little room: the parameter to lower is
    // max_new_tokens (the old message named the prompt; the neutral name is the one that
    // says what to change).
    let msg = input_error(
        e.generate(&req(&"a".repeat(30), bon(2), 0, 4)),
        "max_new_tokens",
    );
    assert!(msg.contains("at most 2"), "{msg}");
    input_error(e.generate(&req("a", soft_bon(2, 0.0), 0, 4)), "lambda");
    input_error(
        e.generate(&req("a", rewind(2, f64::NAN, 4), 0, 4)),
        "threshold",
    );
    input_error(e.generate(&req("a", rewind(2, 1.0, 0), 0, 4)), "max_draws");
    input_error(
        e.generate(&req("a", rewind(2, 1.0, MAX_DRAWS + 1), 0, 4)),
        "max_draws",
    );
    assert_eq!(
        e.policy().prefill_calls(),
        0,
        "refused before any model work"
    );
    // A reward returning NaN is an error naming the reward, not a silent NaN.
    let mut r = req("a", bon(2), 0, 4);
    r.params.reward = Some("nan".into());
    let err = e.generate(&r).unwrap_err();
    assert!(
        err.to_string().contains("nan") && err.to_string().contains("not finite"),
        "{err}"
    );
}

#[test]
fn too_large_a_batch_for_memory_is_refused() {
    // SmolLM2-135M: 30 layers × 3 KV heads × 64 dims × 2 × 4 bytes = 46080 bytes per token.
    let per_token = 30 * 3 * 64 * 2 * 4;
    assert!(check_batch_memory("n", 16, 64, 64, per_token, 49152, 8 << 30).is_ok());
    let e = check_batch_memory("n", 4096, 64, 8192, per_token, 49152, 8 << 30).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(e.param(), Some("n"));
    assert!(e.to_string().contains("GiB"), "{e}");
    // The error names the parameter that sets the batch, whichever it is.
    let e = check_batch_memory("block_k", 4096, 0, 8192, per_token, 49152, 8 << 30).unwrap_err();
    assert!(
        e.to_string().starts_with("block_k:") && e.to_string().contains("lower block_k"),
        "{e}"
    );
    // Through the engine, before any model work: a policy whose KV cache per token is a
    // thousandth of the memory available, so ~1000 tokens of a batch fill it.
    let Some(heavy) = heavy_engine() else {
        eprintln!("no /proc/meminfo: the engine's memory check is off here");
        return;
    };
    heavy.generate(&req("a", bon(2), 0, 4)).unwrap();
    let prefills = heavy.policy().toy.prefill_calls();
    for (r, param) in [
        (req("a", bon(4000), 0, 8), "n"),
        (req("a", rewind(4000, 1.0, 8000), 0, 8), "n"),
        (req("a", cd_block(4000, 2), 0, 8), "block_k"),
        (choices(req("a", bon(20), 0, 8), 100), "choices"),
        (choices(req("a", sample(), 0, 30), 128), "choices"),
    ] {
        let err = heavy.generate(&r).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        assert_eq!(err.param(), Some(param), "{err}");
        assert!(err.to_string().contains("GiB"), "{err}");
        assert!(err.to_string().contains(&format!("lower {param}")), "{err}");
    }
    assert_eq!(
        heavy.policy().toy.prefill_calls(),
        prefills,
        "no model work"
    );
}
