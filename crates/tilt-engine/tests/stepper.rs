//! The request API and the batched stepper on the toy policy: requests as JSON, streaming,
//! cancellation, batching that changes no byte, stop sequences, choices, errors that name
//! the parameter, a failing reward that fails only its own request, and the order of
//! `generate_many`.

mod common;

use common::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tilt_engine::{
    CancelToken, ChatMessage, Engine, EngineError, ErrorKind, FinishReason, Input, Output, Params,
    Request, RequestId, Response, Role, Strategy, TokenEvent, TokenSink,
};
use tilt_models::sampling::SamplingParams;
use tilt_models::toy::ToyPolicy;
use tilt_models::Policy;

// ---------------------------------------------------------------------------------------
// Requests as JSON
// ---------------------------------------------------------------------------------------

#[test]
fn a_request_round_trips_through_json_and_unknown_fields_are_refused() {
    let tuned = SamplingParams::new(0.7, Some(3), Some(0.9)).unwrap();
    let strategies = vec![
        sample(),
        Strategy::Sample { sampling: tuned },
        bon(4),
        Strategy::Won {
            n: 2,
            sampling: tuned,
        },
        Strategy::SoftBon {
            n: 3,
            lambda: 0.25,
            sampling: tuned,
        },
        rewind(2, -0.5, 9),
        Strategy::CdToken {
            lambda: 2.5,
            top_k: 3,
            scorer: Some("linear".into()),
        },
        cd_token(0.0, 1),
        Strategy::CdBlock {
            k: 3,
            m: 2,
            scorer: Some("constant".into()),
        },
        cd_block(1, 1),
    ];
    let inputs = [
        Input::Prompt("ab".into()),
        Input::Raw("cab".into()),
        Input::Messages(vec![
            ChatMessage::new(Role::System, "Be brief."),
            ChatMessage::user("Name a fruit."),
            ChatMessage::new(Role::Assistant, "An"),
        ]),
    ];
    let mut seen = Vec::new();
    for (i, st) in strategies.into_iter().enumerate() {
        for (k, input) in inputs.iter().enumerate() {
            let r = Request {
                input: input.clone(),
                index: (i * 3 + k) as u64,
                params: Params {
                    strategy: st.clone(),
                    choices: 1 + k,
                    seed: u64::MAX - i as u64,
                    max_new_tokens: 5 + i,
                    stop: if k == 0 {
                        vec![]
                    } else {
                        vec!["bc".into(), "\n".into()]
                    },
                    reward: (k == 2).then(|| "letters".to_string()),
                    report_rewards: vec![],
                },
            };
            r.validate().unwrap();
            let j = serde_json::to_string(&r).unwrap();
            let back: Request = serde_json::from_str(&j).unwrap();
            assert_eq!(back, r, "{j}");
            assert_eq!(serde_json::to_string(&back).unwrap(), j, "stable bytes");
            seen.push(j);
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 30, "every request has its own JSON");

    // The field names, as a client writes them.
    let r: Request = serde_json::from_str(
        r#"{"input": {"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "ab"}]},
            "index": 3,
            "params": {"strategy": {"name": "cd-block", "k": 3, "m": 2, "scorer": "linear"},
                       "choices": 2, "seed": 7, "max_new_tokens": 9, "stop": ["bc"],
                       "reward": "letters"}}"#,
    )
    .unwrap();
    assert_eq!(
        r,
        Request {
            input: Input::Messages(vec![
                ChatMessage::new(Role::System, "Be brief."),
                ChatMessage::user("ab"),
            ]),
            index: 3,
            params: Params {
                strategy: Strategy::CdBlock {
                    k: 3,
                    m: 2,
                    scorer: Some("linear".into())
                },
                choices: 2,
                seed: 7,
                max_new_tokens: 9,
                stop: vec!["bc".into()],
                reward: Some("letters".into()),
                report_rewards: vec![],
            },
        }
    );
    // The defaults: index 0, one choice, seed 0, 64 new tokens, no stop, the default reward.
    let d: Request = serde_json::from_str(
        r#"{"input": {"prompt": "ab"}, "params": {"strategy": {"name": "sample"}}}"#,
    )
    .unwrap();
    assert_eq!(
        d,
        Request::new(Input::Prompt("ab".into()), Params::new(sample()))
    );

    let ok = r#""input": {"prompt": "ab"}"#;
    for bad in [
        // Misspelt fields.
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "sample"}}, "choice": 3}}}}"#),
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "sample"}}, "max_new_token": 3}}}}"#),
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "sample"}}, "stops": ["x"]}}}}"#),
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "sample"}}, "sed": 1}}}}"#),
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "bon", "N": 2}}}}}}"#),
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "best", "n": 2}}}}}}"#),
        format!(r#"{{{ok}, "parms": {{"strategy": {{"name": "sample"}}}}}}"#),
        format!(r#"{{{ok}, "indx": 1, "params": {{"strategy": {{"name": "sample"}}}}}}"#),
        r#"{"input": {"text": "ab"}, "params": {"strategy": {"name": "sample"}}}"#.into(),
        r#"{"input": {"messages": [{"role": "robot", "content": "x"}]}, "params": {"strategy": {"name": "sample"}}}"#.into(),
        r#"{"input": {"messages": [{"role": "user", "text": "x"}]}, "params": {"strategy": {"name": "sample"}}}"#.into(),
        // Extra fields, and parameters a strategy does not read.
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "sample"}}}}, "extra": 1}}"#),
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "sample"}}, "n": 4}}}}"#),
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "sample", "n": 4}}}}}}"#),
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "bon", "n": 2, "lambda": 1}}}}}}"#),
        format!(
            r#"{{{ok}, "params": {{"strategy": {{"name": "cd-token", "lambda": 1, "top_k": 2, "temperature": 1}}}}}}"#
        ),
        format!(
            r#"{{{ok}, "params": {{"strategy": {{"name": "bon", "n": 2, "sampling": {{"temp": 1}}}}}}}}"#
        ),
        // Missing and ill-typed values.
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "rewind", "n": 2, "threshold": 1}}}}}}"#),
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "sample"}}, "choices": "3"}}}}"#),
        format!(r#"{{{ok}, "params": {{"strategy": {{"name": "sample"}}, "seed": -1}}}}"#),
        format!(r#"{{{ok}}}"#),
    ] {
        assert!(serde_json::from_str::<Request>(&bad).is_err(), "{bad}");
    }
}

#[test]
fn a_conversation_of_one_user_message_is_the_prompt() {
    let e = engine();
    let st = bon(3);
    let a = e.generate(&req("ab", st.clone(), 4, 6)).unwrap();
    let mut r = req("ab", st, 4, 6);
    r.input = Input::Messages(vec![ChatMessage::user("ab")]);
    assert_eq!(e.generate(&r).unwrap(), a);
}

// ---------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------

/// Check that the events of `resp` are exactly its tokens and text: for the strategies whose
/// one sequence is the output, the output's; for the others, each candidate's.
fn check_stream(what: &str, resp: &Response, events: &[Ev]) {
    for o in &resp.outputs {
        let j = o.choice;
        match o.strategy.as_str() {
            "cd-token" | "cd-block" => {
                let (tokens, text) = streamed(events, j, 0);
                assert_eq!(tokens, o.tokens, "{what} choice {j}: streamed tokens");
                assert_eq!(text, o.text, "{what} choice {j}: streamed text");
                assert!(events.iter().all(|e| e.choice != j || e.candidate == 0));
            }
            _ => {
                for (c, cand) in o.candidates.iter().enumerate() {
                    let (tokens, text) = streamed(events, j, c);
                    assert_eq!(
                        tokens, cand.tokens,
                        "{what} choice {j} candidate {c}: tokens"
                    );
                    assert_eq!(text, cand.text, "{what} choice {j} candidate {c}: text");
                }
                assert!(events
                    .iter()
                    .all(|e| e.choice != j || e.candidate < o.candidates.len()));
                if o.strategy == "sample" {
                    let (tokens, text) = streamed(events, j, 0);
                    assert_eq!((tokens, text), (o.tokens.clone(), o.text.clone()));
                }
            }
        }
    }
    assert!(events.iter().all(|e| e.choice < resp.outputs.len()));
}

#[test]
fn streamed_tokens_and_text_are_the_outputs() {
    let e = engine();
    let mut checked = 0;
    for st in every_strategy() {
        for seed in 0..6 {
            let r = choices(req("ab", st.clone(), seed, 10), 1 + (seed % 3) as usize);
            let (events, sink) = recorder();
            let resp = e
                .generate_streaming(&r, Some(sink), &CancelToken::new())
                .unwrap();
            // Listening changes nothing.
            assert_eq!(resp, e.generate(&r).unwrap(), "{} seed {seed}", st.name());
            let events = events.lock().unwrap();
            assert!(!events.is_empty());
            check_stream(&format!("{} seed {seed}", st.name()), &resp, &events);
            checked += 1;
        }
    }
    assert_eq!(checked, 42);
}

// ---------------------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------------------

/// The first seed whose lone output of `r` (with that seed) satisfies `long`.
fn seed_where(e: &Engine<ToyPolicy>, r: &Request, long: impl Fn(&Output) -> bool) -> Request {
    for seed in 0..200 {
        let mut r = r.clone();
        r.params.seed = seed;
        if long(&e.generate(&r).unwrap().outputs[0]) {
            return r;
        }
    }
    panic!("no seed gives a long enough output");
}

#[test]
fn cancelling_from_the_callback_stops_the_request_within_one_step() {
    let e = engine();
    // (strategy, events before cancelling, the most events one round gives, how long the
    // lone output must be for the request to be still running when it is cancelled).
    let cases: Vec<(Strategy, usize, usize, usize)> = vec![
        (sample(), 3, 1, 6),
        (cd_token(1.0, 3), 4, 1, 7),
        (cd_block(3, 2), 3, 2, 8),
        (bon(4), 6, 4, 5),
        (rewind(3, 100.0, 12), 5, 3, 0),
    ];
    let others = vec![
        req("ca", bon(3), 11, 8),
        at(req("ab", cd_token(2.0, 2), 12, 8), 3),
        choices(req("b", sample(), 13, 8), 2),
        req("cab", cd_block(2, 3), 14, 9),
        req("a", rewind(2, 4.0, 10), 15, 8),
    ];
    let alone: Vec<Response> = others.iter().map(|r| e.generate(r).unwrap()).collect();
    for (st, k, per_round, min_len) in cases {
        let name = st.name();
        let target = seed_where(&e, &req("ab", st, 0, 20), |o| {
            o.candidates.iter().map(|c| c.new_tokens).max().unwrap() >= min_len
        });
        let mut s = e.scheduler();
        let cancel = CancelToken::new();
        let events = Arc::new(AtomicUsize::new(0));
        let after = Arc::new(AtomicUsize::new(0));
        let sink: TokenSink<'static> = {
            let (cancel, events, after) = (cancel.clone(), Arc::clone(&events), Arc::clone(&after));
            Box::new(move |_: &TokenEvent<'_>| {
                if cancel.is_cancelled() {
                    after.fetch_add(1, Ordering::SeqCst);
                }
                if events.fetch_add(1, Ordering::SeqCst) + 1 == k {
                    cancel.cancel();
                }
            })
        };
        let tid = s.submit(target, Some(sink), cancel.clone()).unwrap();
        let ids: Vec<RequestId> = others
            .iter()
            .map(|r| s.submit(r.clone(), None, CancelToken::new()).unwrap())
            .collect();
        let mut results: HashMap<RequestId, (usize, Result<Response, EngineError>)> =
            HashMap::new();
        let (mut step, mut cancelled_in) = (0, None);
        while !s.is_idle() {
            step += 1;
            for (id, r) in s.step() {
                assert!(results.insert(id, (step, r)).is_none());
            }
            if cancel.is_cancelled() && cancelled_in.is_none() {
                cancelled_in = Some(step);
            }
            assert!(step < 10_000);
        }
        let cancelled_in = cancelled_in.unwrap_or_else(|| panic!("{name}: never cancelled"));
        let (done_in, result) = results.remove(&tid).unwrap();
        match result {
            Err(err @ EngineError::Cancelled) => assert_eq!(err.kind(), ErrorKind::Cancelled),
            other => panic!("{name}: expected Cancelled, got {other:?}"),
        }
        assert!(
            done_in <= cancelled_in + 1,
            "{name}: cancelled in step {cancelled_in}, ended in step {done_in}"
        );
        let after = after.load(Ordering::SeqCst);
        assert!(
            after <= per_round,
            "{name}: {after} events after cancelling (one round gives at most {per_round})"
        );
        assert!(events.load(Ordering::SeqCst) <= k + per_round);
        for ((id, r), a) in ids.iter().zip(&others).zip(&alone) {
            let (_, got) = results.remove(id).unwrap();
            let got = got.unwrap_or_else(|e| panic!("{name}: {} failed: {e}", r.params.strategy));
            assert_eq!(
                &got, a,
                "{name}: {} beside a cancelled request",
                r.params.strategy
            );
            assert_eq!(json(&got), json(a));
        }
    }
    // The same through generate_streaming.
    let cancel = CancelToken::new();
    let c = cancel.clone();
    let sink: TokenSink<'static> = Box::new(move |_: &TokenEvent<'_>| c.cancel());
    let target = seed_where(&e, &req("ab", sample(), 0, 20), |o| o.tokens.len() >= 4);
    let err = e
        .generate_streaming(&target, Some(sink), &cancel)
        .unwrap_err();
    assert!(matches!(err, EngineError::Cancelled), "{err}");
}

#[test]
fn a_request_cancelled_before_it_is_admitted_does_no_work() {
    let e = toy_engine(vec![("length", reward(LengthReward))], vec![], 4);
    let mut s = e.scheduler();
    let first = s
        .submit(req("ab", bon(4), 1, 6), None, CancelToken::new())
        .unwrap();
    // It waits behind the first (their rows do not fit in a batch of 4 together).
    let cancel = CancelToken::new();
    let second = s
        .submit(req("ab", bon(4), 2, 6), None, cancel.clone())
        .unwrap();
    let already = CancelToken::new();
    already.cancel();
    let third = s.submit(req("ab", bon(4), 3, 6), None, already).unwrap();
    let mut results = HashMap::new();
    let mut step = 0;
    while !s.is_idle() {
        step += 1;
        if step == 2 {
            cancel.cancel();
        }
        for (id, r) in s.step() {
            results.insert(id, r);
        }
    }
    assert!(results.remove(&first).unwrap().is_ok());
    assert!(matches!(
        results.remove(&second),
        Some(Err(EngineError::Cancelled))
    ));
    assert!(matches!(
        results.remove(&third),
        Some(Err(EngineError::Cancelled))
    ));
    assert_eq!(
        e.policy().prefill_calls(),
        1,
        "only the first was prefilled"
    );
}

// ---------------------------------------------------------------------------------------
// Batching
// ---------------------------------------------------------------------------------------

/// `count` requests of every strategy, mixed: prompts, indices, seeds, lengths, choices,
/// stop sequences, rewards (one of them pooled across requests) and scorers.
fn mixed(count: usize) -> Vec<Request> {
    let prompts = ["a", "ab", "cab", "b", "ca"];
    let mut strategies = every_strategy();
    strategies.extend([
        bon(6),
        Strategy::SoftBon {
            n: 2,
            lambda: 2.0,
            sampling: SamplingParams::new(0.8, None, Some(0.9)).unwrap(),
        },
        Strategy::CdToken {
            lambda: 0.5,
            top_k: 4,
            scorer: Some("constant".into()),
        },
        Strategy::CdBlock {
            k: 2,
            m: 3,
            scorer: Some("linear".into()),
        },
        rewind(1, 2.0, 5),
    ]);
    (0..count)
        .map(|i| {
            let st = strategies[i % strategies.len()].clone();
            let mut r = req(prompts[i % prompts.len()], st, 7 * i as u64 + 1, 3 + i % 6);
            r.index = (i % 4) as u64;
            r.params.choices = 1 + usize::from(i % 5 == 0) + usize::from(i % 7 == 0);
            if i % 4 == 1 {
                r.params.stop = vec!["bc".into()];
            }
            if i % 2 == 1 {
                r.params.reward = Some("letters".into());
            }
            r
        })
        .collect()
}

/// Run `requests` in one scheduler; check they are admitted at once; return the responses
/// in order and the number of model steps.
fn together(e: &Engine<ToyPolicy>, requests: &[Request]) -> (Vec<Response>, usize) {
    let steps = e.policy().step_calls();
    let mut s = e.scheduler();
    let ids: Vec<RequestId> = requests
        .iter()
        .map(|r| s.submit(r.clone(), None, CancelToken::new()).unwrap())
        .collect();
    let mut results = HashMap::new();
    let mut first = true;
    while !s.is_idle() {
        let done = s.step();
        if first {
            assert_eq!(s.queued(), 0, "every request admitted in the first step");
            assert_eq!(s.running() + done.len(), requests.len());
            first = false;
        }
        for (id, r) in done {
            results.insert(id, r.unwrap());
        }
    }
    let out = ids.iter().map(|id| results.remove(id).unwrap()).collect();
    (out, e.policy().step_calls() - steps)
}

#[test]
fn requests_in_one_batch_give_the_bytes_they_give_alone() {
    for count in [2, 63] {
        let requests = mixed(count);
        let e = engine();
        let mut alone = Vec::new();
        let mut most_steps = 0;
        let mut all_steps = 0;
        for r in &requests {
            let before = e.policy().step_calls();
            alone.push(e.generate(r).unwrap());
            let steps = e.policy().step_calls() - before;
            most_steps = most_steps.max(steps);
            all_steps += steps;
        }
        let (batched, steps) = together(&engine(), &requests);
        for ((a, b), r) in alone.iter().zip(&batched).zip(&requests) {
            assert_eq!(a, b, "{count}: {r:?}");
            assert_eq!(json(a), json(b));
        }
        // One model step per round for the whole batch: as many as the longest request.
        assert_eq!(steps, most_steps, "{count} requests");
        if count > 2 {
            assert!(steps * 4 < all_steps, "{steps} vs {all_steps}");
        }
        // And the order they are submitted in does not matter either.
        let mut reversed = requests.clone();
        reversed.reverse();
        let (back, _) = together(&engine(), &reversed);
        for (a, b) in alone.iter().rev().zip(&back) {
            assert_eq!(a, b);
        }
    }
}

#[test]
fn a_small_max_batch_changes_no_byte() {
    let requests = mixed(21);
    let big = engine();
    let alone: Vec<Response> = requests.iter().map(|r| big.generate(r).unwrap()).collect();
    let small = toy_engine(
        vec![
            ("length", reward(LengthReward)),
            ("letters", reward(LetterReward)),
        ],
        vec![
            ("linear", scorer(toy_scorer(W, B))),
            ("constant", scorer(constant(0.0))),
        ],
        5,
    );
    let mut got = vec![None; requests.len()];
    small.generate_many(requests.clone(), |i, r| {
        got[i] = Some(r.unwrap());
        true
    });
    for (a, b) in alone.iter().zip(got) {
        assert_eq!(Some(a), b.as_ref());
    }
}

// ---------------------------------------------------------------------------------------
// Stop sequences
// ---------------------------------------------------------------------------------------

#[test]
fn stop_sequences_cut_the_text_and_never_stream() {
    let e = engine();
    let toy = ToyPolicy::new();
    let stops = vec!["bc".to_string(), "aa".to_string()];
    let first_stop = |text: &str| stops.iter().filter_map(|s| text.find(s.as_str())).min();
    for st in [
        sample(),
        cd_token(1.0, 3),
        cd_block(3, 2),
        bon(4),
        rewind(2, 4.0, 6),
    ] {
        let name = st.name();
        let mut stopped = 0;
        for seed in 0..40 {
            let mut r = choices(req("ab", st.clone(), seed, 14), 2);
            r.params.stop = stops.clone();
            let (events, sink) = recorder();
            let resp = e
                .generate_streaming(&r, Some(sink), &CancelToken::new())
                .unwrap();
            let events = events.lock().unwrap();
            check_stream(&format!("{name} seed {seed}"), &resp, &events);
            for ev in events.iter() {
                for s in &stops {
                    assert!(
                        !ev.text.contains(s.as_str()),
                        "{name}: streamed {:?}",
                        ev.text
                    );
                }
            }
            for o in &resp.outputs {
                assert_eq!(first_stop(&o.text), None, "{name}: {:?}", o.text);
                for (c, cand) in o.candidates.iter().enumerate() {
                    let full = toy.decode(&cand.tokens).unwrap();
                    let (_, streamed_text) = streamed(&events, o.choice, c);
                    assert_eq!(first_stop(&streamed_text), None);
                    match cand.finish {
                        FinishReason::Stop => {
                            let cut = first_stop(&full).expect("a stop sequence in its tokens");
                            assert_eq!(cand.text, full[..cut], "{name}: cut before the stop");
                            if name != "cd-block" {
                                // It stopped at the token that completed the stop sequence
                                // (cd-block keeps the rest of the block it drew).
                                let before = toy.decode(&cand.tokens[..cand.tokens.len() - 1]);
                                assert_eq!(first_stop(&before.unwrap()), None);
                            }
                            stopped += 1;
                        }
                        _ => {
                            assert_eq!(first_stop(&full), None, "{name}: {full:?} ran on");
                            assert_eq!(cand.text, full);
                        }
                    }
                }
                let chosen = &o.candidates[o.selected];
                assert_eq!((o.finish_reason, &o.text), (chosen.finish, &chosen.text));
                // Without a listener, the same output.
            }
            assert_eq!(
                resp,
                e.generate(&r).unwrap(),
                "{name}: listening changed it"
            );
        }
        assert!(stopped > 10, "{name}: only {stopped} candidates stopped");
    }
}

// ---------------------------------------------------------------------------------------
// Choices
// ---------------------------------------------------------------------------------------

#[test]
fn choices_are_independent_runs_and_choice_zero_is_the_lone_output() {
    let e = engine();
    for st in every_strategy() {
        let name = st.name();
        // How often choice j (1, 2) differs from choice 0. Independent draws coincide only
        // where one output is likely (the toy's empty answer is, under cd-token); a copied
        // stream would coincide every time.
        let mut differ = [0u64; 3];
        let seeds = 12u64;
        for seed in 0..seeds {
            let r = at(req("cab", st.clone(), seed, 8), 2);
            let lone = e.generate(&r).unwrap();
            let three = e.generate(&choices(r.clone(), 3)).unwrap();
            assert_eq!(three.outputs.len(), 3);
            assert_eq!(three.usage.prompt_tokens, lone.usage.prompt_tokens);
            assert_eq!((three.index, &three.prompt), (lone.index, &lone.prompt));
            for (j, o) in three.outputs.iter().enumerate() {
                assert_eq!(o.choice, j);
            }
            assert_eq!(three.outputs[0], lone.outputs[0], "{name}: choice 0");
            let usage: usize = three
                .outputs
                .iter()
                .map(|o| {
                    if name == "cd-block" {
                        0
                    } else {
                        o.candidates.iter().map(|c| c.new_tokens).sum::<usize>()
                    }
                })
                .sum();
            if name != "cd-block" {
                assert_eq!(three.usage.completion_tokens, usage, "{name}");
            }
            let as_zero = |o: &Output| Output {
                choice: 0,
                ..o.clone()
            };
            for j in 1..3 {
                if as_zero(&three.outputs[j]) != three.outputs[0] {
                    differ[j] += 1;
                }
            }
            if three.outputs[1].candidates != three.outputs[2].candidates {
                differ[0] += 1;
            }
        }
        // differ[0] counts choices 1 and 2 apart.
        for (j, d) in differ.iter().enumerate() {
            assert!(
                d * 2 >= seeds,
                "{name}: choice {j} repeats another ({d} of {seeds} differ)"
            );
        }
    }
    // n × choices above the cap of sequences is refused naming choices.
    for r in [
        choices(req("a", bon(2048), 0, 4), 3),
        choices(req("a", rewind(1000, 1.0, 2000), 0, 4), 5),
        choices(req("a", cd_block(40, 2), 0, 4), 128),
        choices(req("a", sample(), 0, 4), 129),
        choices(req("a", bon(2), 0, 4), 0),
    ] {
        let err = e.generate(&r).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        assert_eq!(err.param(), Some("choices"), "{err}");
    }
    assert!(
        e.generate(&choices(req("a", bon(2048), 0, 2), 2))
            .unwrap()
            .outputs
            .len()
            == 2
    );
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// `r` is refused at submission, before any model work, as an input error naming `param`.
fn refused<P: Policy>(e: &Engine<P>, r: Request, param: &str) -> EngineError {
    let err = e.generate(&r).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert_eq!(err.param(), Some(param), "{err}");
    assert!(!err.to_string().contains("--"), "no CLI flag in {err}");
    let again = e
        .scheduler()
        .submit(r, None, CancelToken::new())
        .unwrap_err();
    assert_eq!(again.param(), Some(param));
    err
}

#[test]
fn bad_requests_are_input_errors_naming_the_parameter() {
    let e = engine();
    let mut r = req("ab", bon(2), 0, 4);
    r.params.reward = Some("nope".into());
    let err = refused(&e, r, "reward");
    assert!(err.to_string().contains("length, letters"), "{err}");
    let r = req(
        "ab",
        Strategy::CdToken {
            lambda: 1.0,
            top_k: 2,
            scorer: Some("nope".into()),
        },
        0,
        4,
    );
    refused(&e, r, "scorer");
    let r = req(
        "ab",
        Strategy::CdBlock {
            k: 2,
            m: 2,
            scorer: Some("nope".into()),
        },
        0,
        4,
    );
    refused(&e, r, "scorer");
    let no_scorer = toy_engine(vec![("length", reward(LengthReward))], vec![], 64);
    for st in [cd_token(1.0, 2), cd_block(2, 2)] {
        let err = refused(&no_scorer, req("ab", st, 0, 4), "scorer");
        assert!(err.to_string().contains("prefix scorer"), "{err}");
    }
    let err = refused(&e, req(&"abc".repeat(11), sample(), 0, 1), "prompt");
    assert!(err.to_string().contains("33 tokens"), "{err}");
    refused(
        &e,
        req("abc".repeat(10).as_str(), sample(), 0, 3),
        "max_new_tokens",
    );
    refused(&e, req("ab", sample(), 0, 31), "max_new_tokens");
    refused(&e, at(req("ab", sample(), 0, 4), 1 << 31), "index");
    let mut r = req("ab", sample(), 0, 4);
    r.params.stop = vec![String::new()];
    refused(&e, r, "stop");
    let mut r = req("ab", sample(), 0, 4);
    r.params.stop = vec!["a".into(); 17];
    refused(&e, r, "stop");
    assert_eq!(
        e.policy().prefill_calls(),
        0,
        "refused before any model work"
    );
    assert_eq!(no_scorer.policy().prefill_calls(), 0);
    // The boundary: a prompt and its new tokens that exactly fill the context run.
    e.generate(&req("abc".repeat(10).as_str(), sample(), 0, 2))
        .unwrap();
}

/// Run `requests` in one scheduler; their results in order.
fn in_one_batch<P: Policy>(
    e: &Engine<P>,
    requests: &[Request],
) -> Vec<Result<Response, EngineError>> {
    let mut s = e.scheduler();
    let ids: Vec<RequestId> = requests
        .iter()
        .map(|r| s.submit(r.clone(), None, CancelToken::new()).unwrap())
        .collect();
    let mut results = HashMap::new();
    while !s.is_idle() {
        results.extend(s.step());
    }
    ids.iter().map(|id| results.remove(id).unwrap()).collect()
}

#[test]
fn a_reward_returning_nan_fails_only_its_own_request() {
    let e = toy_engine(
        vec![
            ("length", reward(LengthReward)),
            ("nan", reward(NanReward)),
            ("letters", reward(LetterReward)),
        ],
        vec![("linear", scorer(toy_scorer(W, B)))],
        4096,
    );
    let mut requests = vec![
        req("ab", bon(3), 1, 4),
        req("ab", sample(), 2, 4),
        choices(req("ca", cd_token(1.0, 2), 3, 4), 2),
        req("b", rewind(2, 3.0, 6), 4, 4),
        req("cab", won(2), 5, 4),
    ];
    for (i, st) in [bon(3), cd_token(1.0, 2), rewind(2, 1.0, 4)]
        .into_iter()
        .enumerate()
    {
        let mut r = req("ab", st, 6 + i as u64, 4);
        r.params.reward = Some("nan".into());
        requests.insert(2 * i + 1, r);
    }
    requests[0].params.reward = Some("letters".into());
    let results = in_one_batch(&e, &requests);
    let mut failed = 0;
    for (r, got) in requests.iter().zip(results) {
        if r.params.reward.as_deref() == Some("nan") {
            let err = got.unwrap_err();
            assert!(
                err.to_string().contains("nan") && err.to_string().contains("not finite"),
                "{err}"
            );
            failed += 1;
        } else {
            assert_eq!(got.unwrap(), e.generate(r).unwrap(), "{r:?}");
        }
    }
    assert_eq!(failed, 3);
}

#[test]
fn a_nan_from_a_pooled_reward_fails_only_the_request_it_scored() {
    // A reward whose scores do not depend on the batch may have the pairs of several
    // requests scored in one call. A NaN for one request's pair must still fail only that
    // request: here the reward gives NaN for the prompt "c" and a length otherwise.
    for invariant in [false, true] {
        let e = toy_engine(
            vec![(
                "r",
                reward(NanForPrompt {
                    bad_prompt: "c",
                    invariant,
                }),
            )],
            vec![],
            4096,
        );
        // One new token each: all of them are scored in the first round, together.
        let requests = [
            req("a", bon(2), 1, 1),
            req("c", bon(2), 2, 1),
            req("b", sample(), 3, 1),
        ];
        let results = in_one_batch(&e, &requests);
        let alone: Vec<_> = requests.iter().map(|r| e.generate(r)).collect();
        assert!(alone[1].is_err() && alone[0].is_ok() && alone[2].is_ok());
        for (i, (got, a)) in results.into_iter().zip(alone).enumerate() {
            match (got, a) {
                (Ok(got), Ok(a)) => assert_eq!(got, a),
                (Err(got), Err(_)) => {
                    assert!(got.to_string().contains("not finite"), "{got}")
                }
                (got, a) => panic!(
                    "batch-invariant reward = {invariant}: request {i} gave {:?} in the batch \
                     and {:?} alone",
                    got.map(|_| "a response").map_err(|e| e.to_string()),
                    a.map(|_| "a response").map_err(|e| e.to_string())
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// generate_many
// ---------------------------------------------------------------------------------------

#[test]
fn generate_many_hands_results_back_in_input_order() {
    let recording = Arc::new(RecordingReward::default());
    let e = toy_engine(
        vec![("recording", Arc::clone(&recording) as Arc<_>)],
        vec![("linear", scorer(toy_scorer(W, B)))],
        4096,
    );
    // The first request draws 16 batches of one (an unreachable threshold); the later ones
    // are done in a round or two.
    let requests = vec![
        req("abc", rewind(1, 100.0, 16), 1, 8),
        req("b", sample(), 2, 1),
        req("", sample(), 3, 1),
        req("ca", bon(2), 4, 2),
        req("cc", cd_token(1.0, 2), 5, 1),
        req(&"a".repeat(40), sample(), 6, 1),
    ];
    let alone: Vec<_> = requests.iter().map(|r| e.generate(r)).collect();
    recording.calls.lock().unwrap().clear();
    let mut order = Vec::new();
    let mut got = Vec::new();
    e.generate_many(requests.clone(), |i, r| {
        order.push(i);
        got.push(r);
        true
    });
    assert_eq!(order, (0..requests.len()).collect::<Vec<_>>());
    for (i, (g, a)) in got.iter().zip(&alone).enumerate() {
        match (g, a) {
            (Ok(g), Ok(a)) => assert_eq!(g, a, "request {i}"),
            (Err(g), Err(a)) => {
                assert_eq!(g.param(), a.param());
                assert_eq!(g.to_string(), a.to_string());
            }
            _ => panic!("request {i}: {g:?} vs {a:?}"),
        }
    }
    assert_eq!(got[2].as_ref().unwrap_err().param(), Some("prompt"));
    assert_eq!(got[5].as_ref().unwrap_err().param(), Some("prompt"));
    // The later requests did finish first: the first request's last reward call came after
    // theirs.
    let calls = recording.calls.lock().unwrap();
    let last_of = |p: &str| calls.iter().rposition(|c| c[0] == p).unwrap();
    assert_eq!(calls.iter().filter(|c| c[0] == "abc").count(), 16);
    for p in ["b", "ca", "cc"] {
        assert!(
            last_of(p) < last_of("abc"),
            "{p} finished after the first request"
        );
    }
    // (The reward locks `calls` too.)
    drop(calls);
    // Stopping early: on_response returning false ends the run.
    let mut seen = Vec::new();
    e.generate_many(requests, |i, _| {
        seen.push(i);
        i < 1
    });
    assert_eq!(seen, vec![0, 1]);
}
