//! `tilt generate` and `tilt reproduce` end to end on the real default models
//! (SmolLM2-135M-Instruct and the MiniLM relevance reward, fetched on first use), issue 5:
//! bon's reward ≥ every candidate's, won's ≤; same seed ⇒ same bytes at 1 and 2 threads;
//! `tilt reproduce` verifies and detects tampering; bad inputs are clear errors that lose
//! no finished output. Kept small (N = 4, 16 new tokens, 2 prompts) to run in seconds.

use serde_json::Value;
use std::path::Path;
use std::process::Output;

mod common;
use common::{lines, stderr};

/// A private copy of the binary (overwritten at each run, in cargo's scratch directory for
/// tests): in a target directory shared with other builds, the binary can be relinked
/// between a run and its `reproduce`, which would then (rightly) differ.
fn binary() -> &'static Path {
    common::binary("generate_e2e_tilt")
}

fn tilt(args: &[&str]) -> Output {
    common::run(binary(), args)
}

fn write_prompts(dir: &Path) -> String {
    let path = dir.join("prompts.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"Name a fruit that is rich in vitamin C.\"}\n\
         {\"prompt\": \"unterminated\n\
         \"How do I boil an egg?\"\n",
    )
    .unwrap();
    path.display().to_string()
}

fn rewards(line: &Value) -> (f64, Vec<f64>) {
    let chosen = line["reward"].as_f64().unwrap();
    let all = line["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["reward"].as_f64().unwrap())
        .collect();
    (chosen, all)
}

#[test]
fn bon_and_won_choose_extremes_and_a_malformed_line_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path());
    for (strategy, best) in [("bon", true), ("won", false)] {
        let out = tilt(&[
            "generate",
            "--prompts",
            &prompts,
            "--strategy",
            strategy,
            "--n",
            "4",
            "--max-new-tokens",
            "16",
            "--seed",
            "3",
            // One thread each: the tests run side by side on small machines.
            "--threads",
            "1",
        ]);
        // The malformed line 2 makes the run fail at the end…
        assert!(!out.status.success(), "{strategy}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("prompts.jsonl line 2:"),
            "{strategy}: stderr should name line 2: {}",
            stderr(&out)
        );
        // …but every other prompt completed, in order, with the error object in its place.
        let ls = lines(&out);
        assert_eq!(ls.len(), 3, "{strategy}: {ls:?}");
        assert!(ls[1]["error"].as_str().unwrap().contains("line 2"));
        assert_eq!(ls[1]["line"], 2);
        for l in [&ls[0], &ls[2]] {
            assert_eq!(l["strategy"], strategy);
            assert_eq!(l["units"], "nats");
            assert_eq!(l["n"], 4);
            assert_eq!(l["candidates"].as_array().unwrap().len(), 4);
            let (chosen, all) = rewards(l);
            for r in &all {
                if best {
                    assert!(chosen >= *r, "bon chose {chosen} below a candidate's {r}");
                } else {
                    assert!(chosen <= *r, "won chose {chosen} above a candidate's {r}");
                }
            }
            let bound = l["kl_bound"].as_f64().unwrap();
            assert!((bound - (4f64.ln() - 0.75)).abs() < 1e-12);
            let est = l["kl_estimate"].as_f64().unwrap();
            assert!(est >= 0.0 && est <= bound + 1e-12);
        }
        assert_eq!(ls[2]["index"], 2);
    }
}

#[test]
fn same_seed_same_bytes_across_threads_and_reproduce_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("run.json");
    let manifest = manifest.to_str().unwrap();
    let args = [
        "generate",
        "--prompt",
        "Suggest a name for a pet turtle.",
        "--strategy",
        "bon",
        "--n",
        "4",
        "--max-new-tokens",
        "16",
        "--seed",
        "11",
    ];
    let one = tilt(&[&args[..], &["--threads", "1", "--manifest", manifest]].concat());
    assert!(one.status.success(), "{}", stderr(&one));
    let two = tilt(&[&args[..], &["--threads", "2"]].concat());
    assert!(two.status.success(), "{}", stderr(&two));
    assert_eq!(one.stdout, two.stdout, "output depends on the thread count");
    assert!(!one.stdout.is_empty());

    // The manifest records the run and re-runs to the same bytes (at the other thread count).
    let m: Value = serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    // The typed request is recorded once: the seed lives only in its parameters.
    assert_eq!(m["run"]["command"], "generate");
    assert_eq!(m["run"]["params"]["seed"], 11);
    assert_eq!(m["run"]["params"]["strategy"]["name"], "bon");
    assert_eq!(m["run"]["params"]["strategy"]["n"], 4);
    assert!(m.get("seed").is_none() && m.get("args").is_none());
    assert!(m["git_commit"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(m["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["role"] == "policy" && f["sha256"].as_str().is_some_and(|s| s.len() == 64)));
    assert!(m["host"]["cpu_model"].is_string());
    assert!(m["wall_seconds"]["total"].as_f64().unwrap() > 0.0);
    let rep = tilt(&["reproduce", manifest, "--threads", "2"]);
    assert!(rep.status.success(), "{}", stderr(&rep));
    let verdict: Value = serde_json::from_slice(&rep.stdout).unwrap();
    assert_eq!(verdict["identical"], true);
    assert_eq!(verdict["reproduced"], true);
    assert_eq!(verdict["largest_relative_difference"], Value::Null);
    assert!(stderr(&rep).contains("identical"));

    // Tamper with the recorded output: reproduce says exactly what differs.
    let mut t = m.clone();
    let mut line: Value = serde_json::from_str(t["output"]["lines"][0].as_str().unwrap()).unwrap();
    line["candidates"][2]["reward"] = Value::from(123.5);
    t["output"]["lines"][0] = Value::from(serde_json::to_string(&line).unwrap());
    let tampered = dir.path().join("tampered.json");
    std::fs::write(&tampered, serde_json::to_string_pretty(&t).unwrap()).unwrap();
    let rep = tilt(&["reproduce", tampered.to_str().unwrap()]);
    assert!(!rep.status.success());
    let verdict: Value = serde_json::from_slice(&rep.stdout).unwrap();
    assert_eq!(verdict["identical"], false);
    assert_eq!(verdict["manifest_consistent"], false);
    let diffs = verdict["differences"].as_array().unwrap();
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert_eq!(diffs[0]["line"], 1);
    assert_eq!(diffs[0]["field"], "candidates[2].reward");
    assert_eq!(diffs[0]["expected"], 123.5);
    assert!(
        stderr(&rep).contains("candidates[2].reward"),
        "{}",
        stderr(&rep)
    );
    // Every difference is a number: the largest relative one is given (|r − 123.5| / 123.5,
    // r the real reward in [-1, 1]).
    let now = diffs[0]["actual"].as_f64().unwrap();
    let rel = verdict["largest_relative_difference"].as_f64().unwrap();
    assert!((rel - (now - 123.5).abs() / 123.5).abs() < 1e-12, "{rel}");
    assert!(
        stderr(&rep).contains("every difference is a number"),
        "{}",
        stderr(&rep)
    );
}

#[test]
fn bad_inputs_are_clear_usage_errors() {
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--prompt".into(), "".into()], "empty prompt"),
        (
            vec!["--prompt".into(), "hi".into(), "--n".into(), "0".into()],
            "--n",
        ),
        (
            vec![
                "--prompt".into(),
                "hi".into(),
                "--strategy".into(),
                "best".into(),
            ],
            "invalid value 'best'",
        ),
        (
            vec![
                "--prompt".into(),
                "hi".into(),
                "--n".into(),
                "4096".into(),
                "--max-new-tokens".into(),
                "4000".into(),
            ],
            "GiB",
        ),
        (
            vec![
                "--prompt".into(),
                "hello ".repeat(9000),
                "--max-new-tokens".into(),
                "4".into(),
            ],
            "longer than the model's context",
        ),
        (
            vec![
                "--prompt".into(),
                "hi".into(),
                "--strategy".into(),
                "soft-bon".into(),
                "--lambda".into(),
                "0".into(),
            ],
            "--lambda",
        ),
    ];
    let scorer = example_scorer();
    let cd = |strategy: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--prompt",
            "hi",
            "--strategy",
            strategy,
            "--scorer",
            &scorer,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut cases = cases;
    cases.extend([
        (
            cd("cd-token", &["--temperature", "0.7"]),
            "--temperature: cd-token samples",
        ),
        (
            cd("cd-block", &["--top-p", "0.9"]),
            "--top-p: cd-block samples",
        ),
        (
            cd("cd-block", &["--n", "8"]),
            "--n: cd-block returns one output",
        ),
        (
            cd("cd-block", &["--block-k", "0"]),
            "--block-k: 0 continuations",
        ),
        (cd("cd-token", &["--lambda=-1"]), "--lambda"),
        (
            vec![
                "--prompt".into(),
                "hi".into(),
                "--strategy".into(),
                "cd-token".into(),
            ],
            "--scorer: --strategy cd-token needs a prefix scorer file",
        ),
        (
            vec![
                "--prompt".into(),
                "hi".into(),
                "--manifest".into(),
                "/nonexistent-dir/m.json".into(),
            ],
            "--manifest /nonexistent-dir/m.json: directory /nonexistent-dir does not exist",
        ),
    ]);
    for (extra, expect) in cases {
        let mut args = vec!["generate".to_string()];
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tilt(&refs);
        assert_eq!(out.status.code(), Some(2), "{expect}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expect),
            "expected {expect:?} in {}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "{expect}: no output expected");
    }
}

/// The trained scorer committed in `examples/cd/` (hidden size 576, SmolLM2-135M).
fn example_scorer() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/cd/scorer.safetensors")
        .display()
        .to_string()
}

/// A valid linear scorer file for hidden size `d`, written by hand in the safetensors
/// format (8-byte little-endian header length, JSON header, little-endian f32 data).
fn write_linear_scorer(path: &Path, d: usize) {
    let tensors: [(&str, Vec<f32>); 4] = [
        ("feature_mean", vec![0.0; d]),
        ("feature_std", vec![1.0; d]),
        ("linear.weight", vec![0.5; d]),
        ("linear.bias", vec![0.25]),
    ];
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, values) in &tensors {
        let start = data.len();
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": [values.len()], "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_string(&header).unwrap().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn controlled_decoding_in_generate_and_a_dash_prompt_reproduce() {
    let dir = tempfile::tempdir().unwrap();
    let scorer = example_scorer();
    let manifest = dir.path().join("cd-token.json");
    let manifest = manifest.to_str().unwrap();
    // cd-token, a prompt starting with '-', the default top-k left to the manifest.
    let out = tilt(&[
        "generate",
        "--prompt=-Name a colour.",
        "--strategy",
        "cd-token",
        "--scorer",
        &scorer,
        "--lambda",
        "4",
        "--max-new-tokens",
        "4",
        "--seed",
        "2",
        "--threads",
        "1",
        "--manifest",
        manifest,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ls = lines(&out);
    assert_eq!(ls.len(), 1);
    let l = &ls[0];
    assert_eq!(l["prompt"], "-Name a colour.");
    assert_eq!(l["strategy"], "cd-token");
    assert!(l["n"].is_null(), "cd-token's batch is its top_k, not n");
    assert_eq!(l["units"], "nats");
    assert!(l["kl_bound"].is_null());
    assert!(l["kl_estimate"].as_f64().unwrap().is_finite());
    assert_eq!(l["kl_note"], "cd-token-log-ratio");
    let c = &l["candidates"].as_array().unwrap()[0];
    assert_eq!(c["reward"], l["reward"]);
    assert!((1..=4).contains(&c["new_tokens"].as_u64().unwrap()));
    // The manifest holds the typed request, defaults written out, and the scorer's hash.
    let m: Value = serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    let run = &m["run"];
    assert_eq!(run["prompts"]["input"]["prompt"], "-Name a colour.");
    assert_eq!(
        run["params"]["strategy"],
        serde_json::json!({"name": "cd-token", "lambda": 4.0, "top_k": 10, "scorer": scorer})
    );
    assert!(
        m["engine"]["model"].is_null(),
        "the default model, found anew on replay"
    );
    assert!(m["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["role"] == "policy" && f["path"].as_str().unwrap().ends_with(".gguf")));
    assert!(m["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["role"].as_str().unwrap().starts_with("scorer:")));
    let rep = tilt(&["reproduce", manifest, "--threads", "2"]);
    assert!(rep.status.success(), "{}", stderr(&rep));
    let verdict: Value = serde_json::from_slice(&rep.stdout).unwrap();
    assert_eq!(verdict["identical"], true);

    // cd-block: the bound of this output's blocks.
    let out = tilt(&[
        "generate",
        "--prompt",
        "Say hello.",
        "--strategy",
        "cd-block",
        "--scorer",
        &scorer,
        "--block-k",
        "2",
        "--block-m",
        "2",
        "--max-new-tokens",
        "3",
        "--threads",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let l = &lines(&out)[0];
    assert_eq!(l["strategy"], "cd-block");
    assert!(l["n"].is_null(), "cd-block's batch is its block_k, not n");
    let tokens = l["candidates"][0]["new_tokens"].as_u64().unwrap();
    let blocks = tokens.div_ceil(2) as f64;
    let bound = l["kl_bound"].as_f64().unwrap();
    assert!(
        (bound - blocks * (2f64.ln() - 0.5)).abs() < 1e-12,
        "{bound}"
    );
    assert_eq!(l["draws"].as_f64().unwrap(), blocks * 2.0);
    assert_eq!(l["blocks"].as_f64().unwrap(), blocks);
    assert_eq!(l["kl_note"], "cd-block-chain-bound");

    // A valid scorer file for another model: refused, naming the file and both sizes.
    let wide = dir.path().join("wide.safetensors");
    write_linear_scorer(&wide, 7);
    let out = tilt(&[
        "generate",
        "--prompt",
        "hi",
        "--strategy",
        "cd-token",
        "--scorer",
        wide.to_str().unwrap(),
        "--max-new-tokens",
        "2",
        "--threads",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("--scorer")
            && e.contains("wide.safetensors")
            && e.contains("size 7")
            && e.contains("576"),
        "{e}"
    );
    assert!(out.stdout.is_empty());
}

/// Hardening on the real model: too many threads are capped with a note (the output does
/// not change), a missing `head:` reward file is bad input (exit 2), a conversation and a
/// stop sequence work, several choices come out as several lines, a raw prompt runs without
/// the chat template, and `--format table` prints for people.
#[test]
fn threads_rewards_conversations_stops_choices_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    let base = [
        "generate",
        "--prompt",
        "Name a colour.",
        "--strategy",
        "sample",
        "--max-new-tokens",
        "8",
    ];
    let capped = tilt(&[&base[..], &["--threads", "1000"]].concat());
    assert!(capped.status.success(), "{}", stderr(&capped));
    assert!(
        stderr(&capped).contains("1000 asked for") && stderr(&capped).contains("cores"),
        "{}",
        stderr(&capped)
    );
    let plain = tilt(&[&base[..], &["--threads", "1"]].concat());
    assert_eq!(capped.stdout, plain.stdout);
    assert_eq!(lines(&plain)[0]["draws"], 1, "sample draws one candidate");

    let missing = dir.path().join("no-head.safetensors");
    let out = tilt(
        &[
            &base[..],
            &["--reward", &format!("head:{}", missing.display())],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no-head.safetensors"),
        "{}",
        stderr(&out)
    );

    // A conversation from a prompts file, with a stop sequence and two choices.
    let prompts = dir.path().join("chat.jsonl");
    std::fs::write(
        &prompts,
        "{\"messages\": [{\"role\": \"system\", \"content\": \"Answer in one word.\"}, {\"role\": \"user\", \"content\": \"Name a colour.\"}]}\n",
    )
    .unwrap();
    let out = tilt(&[
        "generate",
        "--prompts",
        prompts.to_str().unwrap(),
        "--strategy",
        "bon",
        "--n",
        "2",
        "--choices",
        "2",
        "--stop",
        " ",
        "--max-new-tokens",
        "12",
        "--threads",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ls = lines(&out);
    assert_eq!(ls.len(), 2, "one line per choice");
    for (j, l) in ls.iter().enumerate() {
        assert_eq!(l["choice"], j);
        assert_eq!(
            l["prompt"], "Name a colour.",
            "the reward sees the user's message"
        );
        assert!(!l["text"].as_str().unwrap().contains(' '), "{l}");
        if l["finish_reason"] == "stop" {
            assert!(
                l["candidates"][l["selected"].as_u64().unwrap() as usize]["new_tokens"]
                    .as_u64()
                    .unwrap()
                    >= 1
            );
        }
    }

    let raw = tilt(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--no-chat-template",
        "--strategy",
        "sample",
        "--max-new-tokens",
        "4",
        "--format",
        "table",
    ]);
    assert!(raw.status.success(), "{}", stderr(&raw));
    let table = String::from_utf8(raw.stdout).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("kl_note") && l.contains("reference")),
        "{table}"
    );
    assert!(
        serde_json::from_str::<Value>(&table).is_err(),
        "a table, not JSON"
    );
}

/// The README's first command gives what it gave before the engine library existed
/// (`fixtures/readme_first_command_pre_engine.jsonl`, recorded by that code): the same
/// candidates, rewards, choice and KL figures, bit for bit. Only the format moved on (a
/// `kl_note` code instead of a paragraph, `choice`, `finish_reason`, `distinct_candidates`).
#[test]
fn the_readme_first_command_is_unchanged_by_the_engine() {
    let out = tilt(&[
        "generate",
        "--prompt",
        "Give me three tips for staying focused while studying.",
        "--strategy",
        "bon",
        "--n",
        "8",
        "--max-new-tokens",
        "48",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let now = &lines(&out)[0];
    let before: Value = serde_json::from_str(include_str!(
        "fixtures/readme_first_command_pre_engine.jsonl"
    ))
    .unwrap();
    // Everything tilt computes is compared bit for bit: texts, choice, log-probs, KL. The
    // rewards come from MiniLM on candle's gemm, which picks its microkernel from the CPU
    // at run time (AVX-512 and AVX2 sum in different orders): the fixture was recorded on
    // an AVX-512 machine, so a reward may differ there in its last f32 bits, never more.
    let same_reward = |a: &Value, b: &Value, what: &str| {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "{what}: {a} vs {b}"
        );
    };
    same_reward(&before["reward"], &now["reward"], "reward");
    for key in [
        "text",
        "selected",
        "strategy",
        "n",
        "seed",
        "draws",
        "kl_bound",
        "kl_estimate",
        "units",
        "prompt",
        "index",
    ] {
        assert_eq!(before[key], now[key], "{key}");
    }
    let (b, n) = (
        before["candidates"].as_array().unwrap(),
        now["candidates"].as_array().unwrap(),
    );
    assert_eq!(b.len(), n.len(), "candidates");
    for (i, (b, n)) in b.iter().zip(n).enumerate() {
        let mut b = b.as_object().unwrap().clone();
        let mut n = n.as_object().unwrap().clone();
        same_reward(
            &b["reward"],
            &n["reward"],
            &format!("candidates[{i}].reward"),
        );
        b.remove("reward");
        n.remove("reward");
        assert_eq!(b, n, "candidates[{i}]");
    }
    assert_eq!(now["kl_note"], "selection-bound");
}
