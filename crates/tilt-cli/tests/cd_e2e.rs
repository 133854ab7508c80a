//! Controlled decoding end to end on the real models (issue 6): `tilt train-scorer` with
//! tiny settings, then `tilt eval` with cd-block and cd-token on 2 prompts; the bad inputs
//! exit 2 with a message naming them. Uses the default SmolLM2 and MiniLM files (fetched
//! into $TILT_HOME on first use).

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn tilt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args(args)
        .output()
        .expect("run tilt")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_prompts(path: &Path, prompts: &[&str]) {
    let text: String = prompts
        .iter()
        .map(|p| format!("{}\n", serde_json::json!({ "prompt": p })))
        .collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn bad_inputs_exit_2_before_loading_models() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    write_prompts(&prompts, &["Say hi.", "Name a colour."]);
    let p = prompts.to_str().unwrap();
    let o = tilt(&[
        "eval",
        "--prompts",
        p,
        "--strategies",
        "sample; cd-block:K=0,M=8",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--strategies") && stderr(&o).contains("cd-block K is 0"),
        "{}",
        stderr(&o)
    );
    let o = tilt(&["eval", "--prompts", p, "--strategies", "cd-token:lambda=-1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("λ must be"), "{}", stderr(&o));
    let garbage = dir.path().join("scorer.safetensors");
    std::fs::write(&garbage, b"nope").unwrap();
    let o = tilt(&[
        "eval",
        "--prompts",
        p,
        "--strategies",
        "cd-block:K=2,M=4",
        "--scorer",
        garbage.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("scorer file") && stderr(&o).contains("safetensors"),
        "{}",
        stderr(&o)
    );
    let out = dir.path().join("s.safetensors");
    let o = tilt(&[
        "train-scorer",
        "--prompts",
        p,
        "--rollouts",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--rollouts"), "{}", stderr(&o));
    let one = dir.path().join("one.jsonl");
    write_prompts(&one, &["Say hi."]);
    let o = tilt(&[
        "train-scorer",
        "--prompts",
        one.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--prompts")
            && stderr(&o).contains("1 prompt")
            && stderr(&o).contains("at least 2"),
        "{}",
        stderr(&o)
    );
    // Every bad input below is refused before the models load (so quickly, and with no
    // output), each with a message naming it.
    let missing_dir = dir.path().join("no-such-dir");
    let in_missing = |name: &str| missing_dir.join(name).display().to_string();
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            vec!["train-scorer".into(), "--out".into(), "x.json".into()],
            vec!["--out x.json".into(), "NAME.safetensors".into()],
        ),
        (
            vec![
                "train-scorer".into(),
                "--out".into(),
                in_missing("s.safetensors"),
            ],
            vec!["--out".into(), "does not exist".into()],
        ),
        (
            vec![
                "train-scorer".into(),
                "--out".into(),
                out.display().to_string(),
                "--epochs".into(),
                "0".into(),
            ],
            vec!["--epochs".into()],
        ),
        (
            vec![
                "train-scorer".into(),
                "--out".into(),
                out.display().to_string(),
                "--rollouts".into(),
                "100000".into(),
            ],
            vec!["--rollouts".into(), "cap".into()],
        ),
        (
            vec![
                "train-scorer".into(),
                "--out".into(),
                out.display().to_string(),
                "--q-rounds".into(),
                "3".into(),
            ],
            vec!["--q-rounds".into(), "method q".into()],
        ),
        (
            vec![
                "train-scorer".into(),
                "--out".into(),
                out.display().to_string(),
                "--method".into(),
                "q".into(),
                "--q-rounds".into(),
                "0".into(),
            ],
            vec!["--q-rounds".into(), "1 to 256".into()],
        ),
        (
            vec!["eval".into(), "--plot".into(), in_missing("p.svg")],
            vec![
                "--plot".into(),
                "no-such-dir".into(),
                "does not exist".into(),
            ],
        ),
        (
            vec!["eval".into(), "--manifest".into(), in_missing("m.json")],
            vec!["--manifest".into(), "does not exist".into()],
        ),
        (
            vec!["eval".into(), "--gold-reward".into(), "minilm".into()],
            vec!["--gold-reward".into(), "also the --reward".into()],
        ),
        (
            vec!["eval".into(), "--gold-reward".into(), "bleu:x".into()],
            vec!["--gold-reward".into(), "unknown reward kind".into()],
        ),
        (
            vec![
                "eval".into(),
                "--strategies".into(),
                "sample; bon:100000".into(),
            ],
            vec!["--strategies".into(), "bon:100000".into(), "cap".into()],
        ),
        (
            vec![
                "eval".into(),
                "--reference-samples".into(),
                "1000000000".into(),
            ],
            vec!["--reference-samples".into(), "cap".into()],
        ),
        (
            vec![
                "eval".into(),
                "--strategies".into(),
                "sample; bon:2".into(),
                "--scorer".into(),
                garbage.display().to_string(),
            ],
            vec!["--scorer".into(), "no effect".into()],
        ),
    ];
    for (args, needles) in cases {
        let mut argv: Vec<String> = vec![args[0].clone(), "--prompts".into(), p.into()];
        argv.extend(args[1..].iter().cloned());
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let t0 = std::time::Instant::now();
        let o = tilt(&refs);
        assert_eq!(o.status.code(), Some(2), "{argv:?}: {}", stderr(&o));
        for n in &needles {
            assert!(
                stderr(&o).contains(n.as_str()),
                "{argv:?}: {n:?} in {}",
                stderr(&o)
            );
        }
        assert!(o.stdout.is_empty(), "{argv:?}");
        assert!(
            t0.elapsed().as_secs_f64() < 20.0,
            "{argv:?} took {:?}: it should fail before loading the models",
            t0.elapsed()
        );
    }
    assert!(!missing_dir.exists());
}

#[test]
fn train_scorer_then_eval_with_controlled_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    write_prompts(
        &train,
        &[
            "Say hello.",
            "Name a fruit.",
            "Name a colour.",
            "Count to three.",
        ],
    );
    let scorer = dir.path().join("scorer.safetensors");
    let o = tilt(&[
        "train-scorer",
        "--prompts",
        train.to_str().unwrap(),
        "--rollouts",
        "2",
        "--max-new-tokens",
        "6",
        "--epochs",
        "20",
        "--out",
        scorer.to_str().unwrap(),
        "--threads",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let card: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(card["hidden_size"], 576);
    assert_eq!(card["data"]["prompts"], 4);
    assert_eq!(
        card["training"]["heldout_prompts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The constant predictor's numbers, recomputed from the card's own data: each rollout
    // contributes (its length + 1) prefixes, all with its final reward as the target.
    let t = &card["training"];
    let rewards = card["data"]["rollout_rewards"].as_array().unwrap();
    let prefixes = card["data"]["rollout_prefixes"].as_array().unwrap();
    assert_eq!((rewards.len(), prefixes.len()), (4, 4));
    let held: Vec<usize> = t["heldout_prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let rows = |prompt: usize| -> Vec<(f64, f64)> {
        let rs = rewards[prompt].as_array().unwrap();
        let ns = prefixes[prompt].as_array().unwrap();
        assert_eq!((rs.len(), ns.len()), (2, 2), "2 rollouts per prompt");
        rs.iter()
            .zip(ns)
            .map(|(r, n)| (r.as_f64().unwrap(), n.as_f64().unwrap()))
            .collect()
    };
    let (mut train_sum, mut train_n, mut held_n) = (0.0, 0.0, 0.0);
    for p in 0..4 {
        for (r, n) in rows(p) {
            assert!(
                (2.0..=7.0).contains(&n),
                "1..=6 tokens give 2..=7 prefixes, got {n}"
            );
            if held.contains(&p) {
                held_n += n;
            } else {
                train_sum += r * n;
                train_n += n;
            }
        }
    }
    let c = train_sum / train_n;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + b.abs());
    assert!(close(t["constant_prediction"].as_f64().unwrap(), c), "{t}");
    let mse_constant: f64 = held
        .iter()
        .flat_map(|&p| rows(p))
        .map(|(r, n)| n * (r - c).powi(2))
        .sum::<f64>()
        / held_n;
    assert!(
        close(t["heldout_mse_constant"].as_f64().unwrap(), mse_constant),
        "{} vs {mse_constant}",
        t["heldout_mse_constant"]
    );
    assert_eq!(t["heldout_rows"].as_f64().unwrap(), held_n);
    assert_eq!(t["train_rows"].as_f64().unwrap(), train_n);
    assert_eq!(card["data"]["prefixes"].as_f64().unwrap(), held_n + train_n);
    let mse_scorer = t["heldout_mse_scorer"].as_f64().unwrap();
    assert!(mse_scorer.is_finite() && mse_scorer >= 0.0);
    if mse_constant > 0.0 {
        assert!(close(
            t["heldout_r2_vs_constant"].as_f64().unwrap(),
            1.0 - mse_scorer / mse_constant
        ));
    }
    assert!(!t["loss_curve"].as_array().unwrap().is_empty());
    // The card sits beside the scorer and names both relative to its own directory, with
    // the tool's version and commit.
    let card_file = scorer.with_extension("json");
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(&card_file).unwrap()).unwrap();
    assert_eq!(on_disk, card);
    assert_eq!(card["scorer_file"], "scorer.safetensors");
    assert_eq!(card["card_file"], "scorer.json");
    let provenance = &card["provenance"];
    assert_eq!(
        provenance["written_as"]["scorer"],
        scorer.display().to_string()
    );
    assert_eq!(provenance["tool_version"], env!("CARGO_PKG_VERSION"));
    assert!(provenance["git_commit"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    // The card and the scorer are written with the same (ordinary) permissions.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&scorer), mode(&card_file));

    let eval_prompts = dir.path().join("eval.jsonl");
    write_prompts(&eval_prompts, &["Say goodbye.", "Name an animal."]);
    let run = |threads: &str, tag: &str| {
        let manifest = dir.path().join(format!("manifest-{tag}.json"));
        let plot = dir.path().join(format!("eval-{tag}.svg"));
        let o = tilt(&[
            "eval",
            "--prompts",
            eval_prompts.to_str().unwrap(),
            "--strategies",
            "sample; bon:1,2; cd-block:K=2,M=3; cd-token:lambda=2,k=3",
            "--reference-samples",
            "3",
            "--max-new-tokens",
            "6",
            "--scorer",
            scorer.to_str().unwrap(),
            "--plot",
            plot.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
            "--threads",
            threads,
            "--gold-reward",
            "minilm:target=A kind and polite answer.",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(plot.is_file() && manifest.is_file());
        let svg = std::fs::read_to_string(&plot).unwrap();
        assert!(
            svg.contains("Proxy vs gold improvement"),
            "the gold panel is drawn"
        );
        let m: Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
        assert_eq!(m["run"]["command"], "eval");
        // The thread count the run used, as given (not the machine's default).
        assert_eq!(m["host"]["threads"], threads.parse::<u64>().unwrap());
        assert!(m["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["role"].as_str().unwrap().starts_with("scorer:")));
        o.stdout
    };
    let out1 = run("2", "a");
    let report: Value = serde_json::from_slice(&out1).unwrap();
    assert_eq!(report["units"], "nats");
    let strategies = report["strategies"].as_array().unwrap();
    assert_eq!(strategies.len(), 5);
    let by = |label: &str| {
        strategies
            .iter()
            .find(|s| s["strategy"] == label)
            .unwrap()
            .clone()
    };
    assert_eq!(by("sample")["kl"], 0.0);
    assert_eq!(by("sample")["kl_kind"], "exact");
    assert_eq!(by("bon:2")["kl_kind"], "bound");
    assert!((by("bon:2")["kl"].as_f64().unwrap() - (2f64.ln() - 0.5)).abs() < 1e-12);
    assert_eq!(by("cd-block:K=2,M=3")["kl_kind"], "bound");
    assert_eq!(by("cd-token:lambda=2,k=3")["kl_kind"], "estimate");
    for s in strategies {
        let w = s["win_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&w), "{s}");
        assert_eq!(s["outputs"], 2);
        // The interval respects the range of a win rate and holds the estimate.
        let ci = s["win_rate_ci95"].as_array().unwrap();
        let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
        assert!(0.0 <= lo && lo <= w && w <= hi && hi <= 1.0, "{s}");
    }
    assert!(!report["exact_best_of_n"].as_array().unwrap().is_empty());
    // Proxy against gold: every strategy, and the exact best-of-n curve n = 1…64 whose
    // bounds hold.
    let gold = &report["gold"];
    assert_eq!(
        gold["reward"],
        "minilm-relevance(target=\"A kind and polite answer.\")"
    );
    assert_eq!(gold["strategies"].as_array().unwrap().len(), 5);
    let f = |v: &Value| v.as_f64().unwrap();
    for s in gold["strategies"].as_array().unwrap() {
        let t = s["gold_transfer_interval"].as_array().unwrap();
        assert!(f(&t[0]) <= f(&s["proxy_improvement"]) && f(&s["proxy_improvement"]) <= f(&t[1]));
        assert!(
            f(&s["gold_bound"]) >= 0.0 && f(&s["proxy_bound"]) >= 0.0,
            "{s}"
        );
    }
    let curve = gold["best_of_n"].as_array().unwrap();
    assert_eq!(curve.len(), 64);
    for pt in curve {
        assert!(
            f(&pt["proxy_improvement"]) <= f(&pt["proxy_bound"]) + 1e-9,
            "{pt}"
        );
        assert!(
            f(&pt["gold_improvement"]) <= f(&pt["gold_bound"]) + 1e-9,
            "{pt}"
        );
        assert!(
            f(&pt["gold_improvement"]) >= f(&pt["gold_transfer_lower"]) - 1e-9,
            "{pt}"
        );
    }
    // Same seed, another thread count: the same bytes.
    let out2 = run("1", "b");
    assert_eq!(out1, out2);
    // The eval manifest replays (issue: only generate manifests replayed before).
    let rep = tilt(&[
        "reproduce",
        dir.path().join("manifest-a.json").to_str().unwrap(),
        "--threads",
        "1",
    ]);
    assert!(rep.status.success(), "{}", stderr(&rep));
    let verdict: Value = serde_json::from_slice(&rep.stdout).unwrap();
    assert_eq!(verdict["command"], "eval");
    assert_eq!(verdict["reproduced"], true);

    // Several rewards at once: a second scorer, trained on a second reward.
    let second = "minilm:target=A kind and polite answer.";
    let scorer2 = dir.path().join("polite.safetensors");
    let o = tilt(&[
        "train-scorer",
        "--prompts",
        train.to_str().unwrap(),
        "--rollouts",
        "2",
        "--max-new-tokens",
        "6",
        "--epochs",
        "20",
        "--reward",
        second,
        "--out",
        scorer2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (s1, s2) = (scorer.to_str().unwrap(), scorer2.to_str().unwrap());
    // generate, guided by 0.3·V₁ + 0.7·V₂, reports each scorer's value and each reward.
    let w1 = format!("{s1}:weight=0.3");
    let w2 = format!("{s2}:weight=0.7");
    let gen_manifest = dir.path().join("gen.manifest.json");
    let o = tilt(&[
        "generate",
        "--prompt",
        "Say thanks.",
        "--strategy",
        "cd-block",
        "--block-k",
        "2",
        "--block-m",
        "3",
        "--max-new-tokens",
        "6",
        "--choices",
        "2",
        "--scorer",
        &w1,
        "--scorer",
        &w2,
        "--report-reward",
        second,
        "--manifest",
        gen_manifest.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = String::from_utf8(o.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for line in &lines {
        let sv = line["scorer_values"].as_array().unwrap();
        assert_eq!(sv.len(), 2, "{line}");
        assert_eq!(
            (sv[0]["name"].as_str(), f(&sv[0]["weight"])),
            (Some(s1), 0.3)
        );
        assert_eq!(
            (sv[1]["name"].as_str(), f(&sv[1]["weight"])),
            (Some(s2), 0.7)
        );
        assert!(sv.iter().all(|v| f(&v["value"]).is_finite()));
        let rw = line["rewards"].as_array().unwrap();
        assert_eq!(rw.len(), 1, "{line}");
        assert_eq!(rw[0]["name"], second);
        let r2 = f(&rw[0]["value"]);
        assert!((-1.0..=1.0).contains(&r2), "{line}");
    }
    let rep = tilt(&["reproduce", gen_manifest.to_str().unwrap()]);
    assert!(rep.status.success(), "{}", stderr(&rep));
    let verdict: Value = serde_json::from_slice(&rep.stdout).unwrap();
    assert_eq!(verdict["reproduced"], true);
    // eval sweeps the weight and draws the two-reward frontier.
    let plot = dir.path().join("frontier.svg");
    let fm = dir.path().join("frontier.manifest.json");
    let o = tilt(&[
        "eval",
        "--prompts",
        eval_prompts.to_str().unwrap(),
        "--strategies",
        "sample; cd-block:K=2,M=3",
        "--reference-samples",
        "3",
        "--max-new-tokens",
        "6",
        "--scorer",
        s1,
        "--scorer",
        s2,
        "--frontier-weights",
        "0,0.5,1",
        "--second-reward",
        second,
        "--plot",
        plot.to_str().unwrap(),
        "--manifest",
        fm.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let labels: Vec<&str> = report["strategies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        [
            "sample",
            "cd-block:K=2,M=3,w=1/0",
            "cd-block:K=2,M=3,w=0.5/0.5",
            "cd-block:K=2,M=3,w=0/1"
        ]
    );
    assert_eq!(report["gold"]["strategies"].as_array().unwrap().len(), 4);
    assert_eq!(report["scorers"], serde_json::json!([s1, s2]));
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.contains("Two-reward frontier"),
        "the frontier panel is drawn"
    );
    assert!(svg.contains("w = 0.5"));
    let rep = tilt(&["reproduce", fm.to_str().unwrap()]);
    assert!(rep.status.success(), "{}", stderr(&rep));
    // Bad combinations are refused before any model loads.
    for (args, needle) in [
        (
            vec![
                "--scorer",
                s1,
                "--frontier-weights",
                "0,1",
                "--second-reward",
                second,
            ],
            "two --scorer",
        ),
        (
            vec!["--scorer", s1, "--scorer", s2, "--frontier-weights", "0,1"],
            "--second-reward",
        ),
        (
            vec![
                "--scorer",
                s1,
                "--scorer",
                s2,
                "--frontier-weights",
                "0,0",
                "--second-reward",
                second,
            ],
            "twice",
        ),
        (
            vec!["--scorer", &w1, "--scorer", "x:weight=nan"],
            "not finite",
        ),
        (vec!["--scorer", "x:weight=abc"], "not a number"),
        (vec!["--scorer", s1, "--scorer", s1], "twice"),
    ] {
        let mut argv = vec![
            "eval",
            "--prompts",
            eval_prompts.to_str().unwrap(),
            "--strategies",
            "cd-block:K=2,M=3",
        ];
        argv.extend(args.iter().copied());
        let o = tilt(&argv);
        assert_eq!(o.status.code(), Some(2), "{argv:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{needle}: {}", stderr(&o));
    }
}
