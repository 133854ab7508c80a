//! The runner on the toy policy: one shared prefill per prompt, batched steps, stopping,
//! determinism by seed, stream independence, and clear errors on bad input (issue 5).

use tilt_decode::generate::{
    check_batch_memory, draw_stream, prefill_prompt, sample_continuations, MAX_N,
};
use tilt_decode::{generate, DecodeError, FinishReason, GenerationConfig, Strategy};
use tilt_models::sampling::SamplingParams;
use tilt_models::toy::{ToyPolicy, TOY_EOS};
use tilt_rewards::{Reward, RewardError};

/// Reward: the length of the text.
struct LengthReward;

impl Reward for LengthReward {
    fn name(&self) -> String {
        "length".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs.iter().map(|(_, t)| t.len() as f32).collect())
    }
}

/// A reward that counts its calls (to check one batch per prompt).
struct CountingReward(std::sync::atomic::AtomicUsize);

impl Reward for CountingReward {
    fn name(&self) -> String {
        "counting".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(vec![0.0; pairs.len()])
    }
}

/// A reward that returns NaN.
struct NanReward;

impl Reward for NanReward {
    fn name(&self) -> String {
        "nan".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(vec![f32::NAN; pairs.len()])
    }
}

fn config(strategy: Strategy, n: usize, seed: u64, max_new: usize) -> GenerationConfig {
    GenerationConfig {
        strategy,
        n,
        seed,
        max_new_tokens: max_new,
        sampling: SamplingParams::default(),
        chat_template: true,
    }
}

#[test]
fn one_prefill_per_prompt_and_one_reward_batch() {
    let toy = ToyPolicy::new();
    let reward = CountingReward(Default::default());
    let out = generate(&toy, &reward, "ab", 0, &config(Strategy::Bon, 16, 1, 6)).unwrap();
    assert_eq!(toy.prefill_calls(), 1);
    assert_eq!(reward.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The batch is stepped once per position, never once per sequence.
    assert!(toy.step_calls() < 6, "{} steps", toy.step_calls());
    assert_eq!(out.candidates.len(), 16);
    for c in &out.candidates {
        assert!(c.new_tokens >= 1 && c.new_tokens <= 6);
        match c.finish {
            FinishReason::Eos => assert_eq!(c.tokens.last(), Some(&TOY_EOS)),
            FinishReason::Length => {
                assert_eq!(c.new_tokens, 6);
                assert!(!c.tokens.contains(&TOY_EOS));
            }
        }
        assert!(c.log_prob < 0.0);
    }
}

#[test]
fn rewind_shares_one_prefill_across_its_batches() {
    let toy = ToyPolicy::new();
    // An unreachable threshold: every batch is drawn, the cap is hit, the best is returned.
    let st = Strategy::Rewind {
        threshold: 100.0,
        max_draws: 30,
    };
    let out = generate(&toy, &LengthReward, "a", 0, &config(st, 4, 3, 8)).unwrap();
    assert_eq!(toy.prefill_calls(), 1);
    assert_eq!((out.draws, out.accepted), (30, Some(false)));
    assert!(out.candidates.iter().all(|c| out.reward >= c.reward));
    assert_eq!(out.kl_estimate, None);
    // A reachable one: the first accepted draw in draw order.
    let st = Strategy::Rewind {
        threshold: 5.0,
        max_draws: 1000,
    };
    for seed in 0..10 {
        let out = generate(&toy, &LengthReward, "a", 0, &config(st, 4, seed, 8)).unwrap();
        assert_eq!(out.accepted, Some(true));
        assert!(out.reward >= 5.0);
        assert!(out.candidates[..out.selected]
            .iter()
            .all(|c| c.reward < 5.0));
        let accepted = out.candidates.iter().filter(|c| c.reward >= 5.0).count();
        let est = (out.draws as f64 / accepted as f64).ln();
        assert!((out.kl_estimate.unwrap() - est).abs() < 1e-12);
    }
}

#[test]
fn rewind_output_does_not_depend_on_the_batch_size() {
    let st = Strategy::Rewind {
        threshold: 3.0,
        max_draws: 100,
    };
    let toy = ToyPolicy::new();
    for seed in 0..20 {
        let a = generate(&toy, &LengthReward, "a", 0, &config(st, 1, seed, 6)).unwrap();
        let b = generate(&toy, &LengthReward, "a", 0, &config(st, 7, seed, 6)).unwrap();
        assert_eq!((a.text, a.selected), (b.text, b.selected));
    }
}

#[test]
fn a_candidate_depends_only_on_seed_prompt_index_and_draw_number() {
    let toy = ToyPolicy::new();
    let four = generate(
        &toy,
        &LengthReward,
        "ab",
        2,
        &config(Strategy::Bon, 4, 9, 5),
    )
    .unwrap();
    let eight = generate(
        &toy,
        &LengthReward,
        "ab",
        2,
        &config(Strategy::Won, 8, 9, 5),
    )
    .unwrap();
    for (a, b) in four.candidates.iter().zip(&eight.candidates) {
        assert_eq!(a.tokens, b.tokens);
    }
    // Another prompt index or seed draws other candidates.
    let other = generate(
        &toy,
        &LengthReward,
        "ab",
        3,
        &config(Strategy::Bon, 4, 9, 5),
    )
    .unwrap();
    let reseed = generate(
        &toy,
        &LengthReward,
        "ab",
        2,
        &config(Strategy::Bon, 4, 10, 5),
    )
    .unwrap();
    let toks = |o: &tilt_decode::GenerationOutput| -> Vec<Vec<u32>> {
        o.candidates.iter().map(|c| c.tokens.clone()).collect()
    };
    assert_ne!(toks(&four), toks(&other));
    assert_ne!(toks(&four), toks(&reseed));
    // And it is the same sequence as sampling that stream directly.
    let pre = prefill_prompt(&toy, vec![0, 1]).unwrap();
    let direct = sample_continuations(
        &toy,
        &pre,
        9,
        &[draw_stream(2, 1)],
        5,
        &SamplingParams::default(),
    )
    .unwrap();
    assert_eq!(direct[0].tokens, four.candidates[1].tokens);
}

#[test]
fn same_seed_same_json_bytes() {
    let toy = ToyPolicy::new();
    for st in [
        Strategy::Sample,
        Strategy::Bon,
        Strategy::Won,
        Strategy::SoftBon { lambda: 0.5 },
    ] {
        let a = generate(&toy, &LengthReward, "cab", 0, &config(st, 6, 77, 7)).unwrap();
        let b = generate(&toy, &LengthReward, "cab", 0, &config(st, 6, 77, 7)).unwrap();
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        assert_eq!(a.units, "nats");
        assert_eq!(a.strategy, st.name());
    }
}

#[test]
fn best_and_worst_choose_extremes_and_cost_fields_are_set() {
    let toy = ToyPolicy::new();
    let b = generate(&toy, &LengthReward, "a", 0, &config(Strategy::Bon, 8, 5, 6)).unwrap();
    let w = generate(&toy, &LengthReward, "a", 0, &config(Strategy::Won, 8, 5, 6)).unwrap();
    assert!(b.candidates.iter().all(|c| b.reward >= c.reward));
    assert!(w.candidates.iter().all(|c| w.reward <= c.reward));
    let bound = 8f64.ln() - 7.0 / 8.0;
    assert!((b.kl_bound.unwrap() - bound).abs() < 1e-12);
    let est = b.kl_estimate.unwrap();
    assert!(est > 0.0 && est <= bound + 1e-12, "{est}");
    assert!(b.kl_note.contains("2401.01879"));
}

fn input_error(r: Result<tilt_decode::GenerationOutput, DecodeError>, what: &str) -> String {
    let e = r.expect_err("bad input must be refused");
    assert!(e.is_input_error(), "{e} should be an input error");
    let msg = e.to_string();
    assert!(msg.contains(what), "{msg:?} should name {what:?}");
    msg
}

#[test]
fn bad_inputs_are_clear_errors() {
    let toy = ToyPolicy::new();
    let r = &LengthReward;
    input_error(
        generate(&toy, r, "", 0, &config(Strategy::Bon, 4, 0, 4)),
        "empty prompt",
    );
    input_error(
        generate(&toy, r, "  \n", 0, &config(Strategy::Bon, 4, 0, 4)),
        "empty prompt",
    );
    input_error(
        generate(&toy, r, "a", 0, &config(Strategy::Bon, 0, 0, 4)),
        "--n",
    );
    input_error(
        generate(&toy, r, "a", 0, &config(Strategy::Bon, MAX_N + 1, 0, 4)),
        "--n",
    );
    input_error(
        generate(&toy, r, "a", 0, &config(Strategy::Bon, 2, 0, 0)),
        "--max-new-tokens",
    );
    let long = "ab".repeat(20);
    let msg = input_error(
        generate(&toy, r, &long, 0, &config(Strategy::Bon, 2, 0, 4)),
        "prompt",
    );
    assert!(msg.contains("longer than the model's context"), "{msg}");
    let msg = input_error(
        generate(&toy, r, &"a".repeat(30), 0, &config(Strategy::Bon, 2, 0, 4)),
        "prompt",
    );
    assert!(msg.contains("at most 2"), "{msg}");
    input_error(
        generate(
            &toy,
            r,
            "a",
            0,
            &config(Strategy::SoftBon { lambda: 0.0 }, 2, 0, 4),
        ),
        "--lambda",
    );
    input_error(
        generate(
            &toy,
            r,
            "a",
            0,
            &config(
                Strategy::Rewind {
                    threshold: f64::NAN,
                    max_draws: 4,
                },
                2,
                0,
                4,
            ),
        ),
        "--threshold",
    );
    // A reward returning NaN is an error naming the reward, not a silent NaN.
    let e = generate(&toy, &NanReward, "a", 0, &config(Strategy::Bon, 2, 0, 4)).unwrap_err();
    assert!(
        e.to_string().contains("nan") && e.to_string().contains("not finite"),
        "{e}"
    );
}

#[test]
fn too_large_a_batch_for_memory_is_refused() {
    // SmolLM2-135M: 30 layers × 3 KV heads × 64 dims × 2 × 4 bytes = 46080 bytes per token.
    let per_token = 30 * 3 * 64 * 2 * 4;
    assert!(check_batch_memory("--n", 16, 64, 64, per_token, 49152, 8 << 30).is_ok());
    let e = check_batch_memory("--n", 4096, 64, 8192, per_token, 49152, 8 << 30).unwrap_err();
    assert!(e.is_input_error());
    assert!(
        e.to_string().contains("--n") && e.to_string().contains("GiB"),
        "{e}"
    );
    // The error names the flag that sets the batch, whichever it is.
    let e = check_batch_memory("--block-k", 4096, 0, 8192, per_token, 49152, 8 << 30).unwrap_err();
    assert!(
        e.to_string().starts_with("--block-k:") && e.to_string().contains("lower --block-k"),
        "{e}"
    );
}
