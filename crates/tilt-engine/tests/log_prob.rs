//! `Engine::log_prob` and `Engine::score` on the toy policy, whose next-token law is a
//! known table: the log-probability of a response is checked against the product of the
//! table's entries, computed here independently.

mod common;

use common::{CountC, NanReward};
use std::sync::Arc;
use tilt_engine::{Engine, ErrorKind, Input};
use tilt_models::toy::ToyPolicy;
use tilt_rewards::Reward;

fn engine() -> Engine<ToyPolicy> {
    Engine::from_parts(
        ToyPolicy::new(),
        vec![
            ("c-count".into(), Arc::new(CountC) as Arc<dyn Reward>),
            ("nan".into(), Arc::new(NanReward) as Arc<dyn Reward>),
        ],
        Vec::new(),
        8,
    )
    .unwrap()
}

/// The toy's table (rows: previous token a, b, c; columns: a, b, c, end).
const TABLE: [[f64; 4]; 3] = [
    [0.10, 0.40, 0.30, 0.20],
    [0.30, 0.10, 0.40, 0.20],
    [0.40, 0.30, 0.10, 0.20],
];

fn token(c: char) -> usize {
    "abc".find(c).unwrap()
}

#[test]
fn log_prob_is_the_product_of_the_next_token_law() {
    let e = engine();
    for (prompt, response) in [("a", "b"), ("ab", "cab"), ("c", "ccccaa"), ("bca", "a")] {
        let lp = e.log_prob(&Input::Raw(prompt.into()), response).unwrap();
        let mut prev = token(prompt.chars().last().unwrap());
        let mut want = Vec::new();
        for c in response.chars() {
            want.push(TABLE[prev][token(c)].ln());
            prev = token(c);
        }
        assert_eq!(lp.tokens.len(), response.len());
        assert_eq!(lp.units, "nats");
        for (got, want) in lp.token_log_probs.iter().zip(&want) {
            // The policy's log-probabilities are f32.
            assert!(
                (got - want).abs() < 1e-6,
                "{prompt}/{response}: {got} vs {want}"
            );
        }
        let total: f64 = want.iter().sum();
        assert!((lp.total - total).abs() < 1e-5, "{} vs {total}", lp.total);
    }
}

#[test]
fn log_prob_names_a_bad_response_or_prompt() {
    let e = engine();
    let err = e.log_prob(&Input::Raw("a".into()), "").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("response"), "{err}");
    let long = "a".repeat(ToyPolicy::CONTEXT_LENGTH);
    let err = e.log_prob(&Input::Raw("a".into()), &long).unwrap_err();
    assert!(err.to_string().contains("response"), "{err}");
    assert!(err.to_string().contains("context"), "{err}");
    let err = e.log_prob(&Input::Raw(String::new()), "a").unwrap_err();
    assert!(err.to_string().contains("prompt"), "{err}");
}

#[test]
fn score_scores_each_pair_in_order_and_names_mismatched_lists() {
    let e = engine();
    let p = vec!["a".to_string(), "b".into(), "c".into()];
    let r = vec!["ccc".to_string(), "".into(), "acb".into()];
    assert_eq!(e.score(None, &p, &r).unwrap(), vec![3.0, 0.0, 1.0]);
    assert_eq!(
        e.score(Some("c-count"), &p, &r).unwrap(),
        vec![3.0, 0.0, 1.0]
    );
    let err = e.score(None, &p, &r[..2]).unwrap_err();
    assert!(err.to_string().contains("responses"), "{err}");
    // A score that is not a number is an error naming the reward, never passed on.
    let err = e.score(Some("nan"), &p, &r).unwrap_err();
    assert!(err.to_string().contains("nan"), "{err}");
    let err = e.score(Some("gold"), &p, &r).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("gold"), "{err}");
}
