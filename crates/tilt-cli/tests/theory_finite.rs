//! `tilt theory {tilt, bon, frontier, divergence, bounds}` run as a user would: JSON on
//! stdout checked against independent values, and every bad input exiting 2 with one line
//! on stderr naming the input.

use serde_json::Value;
use std::process::{Command, Output};

fn tilt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args(args)
        .output()
        .expect("run tilt")
}

fn json_of(args: &[&str]) -> Value {
    let out = tilt(args);
    assert!(
        out.status.success(),
        "tilt {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "one JSON object: {text}");
    serde_json::from_str(&text).unwrap()
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// Bad input: exit code 2, exactly one line on stderr, naming `needle`.
fn rejects(args: &[&str], needle: &str) {
    let out = tilt(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "tilt {args:?}: {err}");
    assert!(out.stdout.is_empty(), "no output on error");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(needle),
        "tilt {args:?}: {err:?} should name {needle:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

const COIN: [&str; 4] = ["--probs", "0.5,0.5", "--rewards", "0,1"];

#[test]
fn bon_on_a_fair_coin_matches_spec_closed_forms() {
    let v = json_of(&[&["theory", "bon", "--n", "4"][..], &COIN].concat());
    assert!((f(&v, "kl") - 0.459355521853).abs() < 1e-11);
    assert_eq!(f(&v, "win_rate"), 23.0 / 32.0);
    assert!((f(&v, "kl_bound") - (4f64.ln() - 0.75)).abs() < 1e-15);
    assert_eq!(f(&v, "win_rate_bound"), 0.8);
    assert!((f(&v, "kl_estimate") - 0.4991239).abs() < 1e-7);
    assert_eq!(f(&v, "expected_reward"), 0.9375);
    assert_eq!(v["n"], 4);
    assert_eq!(v["units"], "nats");
    let pmf: Vec<f64> = v["pmf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(pmf, vec![0.0625, 0.9375]);
    // Worst-of-n mirrors it; n = 10^15 stays finite and below log 2.
    let w = json_of(&[&["theory", "bon", "--n", "4", "--worst"][..], &COIN].concat());
    assert_eq!(f(&w, "expected_reward"), 0.0625);
    let big = json_of(&[&["theory", "bon", "--n", "1e15"][..], &COIN].concat());
    assert!(f(&big, "kl") <= 2f64.ln() && f(&big, "kl") > 0.69);
    // --no-pmf: the same object without the pmf.
    let mut full = json_of(&[&["theory", "bon", "--n", "4", "--worst"][..], &COIN].concat());
    let summary = json_of(
        &[
            &["theory", "bon", "--n", "4", "--worst", "--no-pmf"][..],
            &COIN,
        ]
        .concat(),
    );
    assert!(summary.get("pmf").is_none(), "{summary}");
    full.as_object_mut().unwrap().remove("pmf");
    assert_eq!(full, summary);
}

#[test]
fn tilt_by_beta_and_by_kl_agree() {
    let v = json_of(&[&["theory", "tilt", "--beta", "1"][..], &COIN].concat());
    let a = 1f64.exp() / (1.0 + 1f64.exp());
    let k = a * (2.0 * a).ln() + (1.0 - a) * (2.0 * (1.0 - a)).ln();
    assert!((f(&v, "kl") - k).abs() < 1e-15);
    assert!((f(&v, "log_partition") - (0.5 + 0.5 * 1f64.exp()).ln()).abs() < 1e-15);
    assert!((f(&v, "win_rate") - (0.25 + 0.5 * a)).abs() < 1e-15);
    let kl = format!("{k:.17e}");
    let back = json_of(&[&["theory", "tilt", "--kl", &kl][..], &COIN].concat());
    assert!((f(&back, "beta") - 1.0).abs() < 1e-11, "{back}");
    // β = ∞ at KL 0 is null under the JSON convention (never the string "inf"), and
    // lambda = 0 carries it.
    let zero = json_of(&[&["theory", "tilt", "--kl", "0"][..], &COIN].concat());
    assert_eq!(zero["beta"], serde_json::Value::Null);
    assert_eq!(zero["lambda"], 0.0);
    // The same distribution given as a CSV file, a JSON-lines file, and samples.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("d.csv");
    std::fs::write(&csv, "prob,reward\n0.5,0\n0.5,1\n").unwrap();
    let jl = dir.path().join("d.jsonl");
    std::fs::write(
        &jl,
        "{\"prob\":0.5,\"reward\":0}\n{\"prob\":0.5,\"reward\":1}\n",
    )
    .unwrap();
    let samples = dir.path().join("s.txt");
    std::fs::write(&samples, "0\n1\n").unwrap();
    for flag in [
        ["--dist", csv.to_str().unwrap()],
        ["--dist", jl.to_str().unwrap()],
        ["--samples", samples.to_str().unwrap()],
    ] {
        let w = json_of(&[&["theory", "tilt", "--beta", "1"][..], &flag].concat());
        assert_eq!(f(&w, "kl"), f(&v, "kl"), "{flag:?}");
    }
}

#[test]
fn frontier_has_both_curves_and_draws_a_plot() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("frontier.svg");
    let v = json_of(&[
        "theory",
        "frontier",
        "--probs",
        "0.2,0.3,0.1,0.4",
        "--rewards",
        "0,1,1,2",
        "--n-max",
        "64",
        "--points",
        "7",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let bon = v["bon"].as_array().unwrap();
    let tl = v["tilt"].as_array().unwrap();
    assert_eq!(bon.len(), 7);
    assert_eq!(tl.len(), 7);
    assert_eq!(bon[0]["n"], 1);
    assert_eq!(bon[6]["n"], 64);
    for (b, t) in bon.iter().zip(tl) {
        assert!((f(b, "kl") - f(t, "kl")).abs() < 1e-9);
        assert!(f(b, "expected_reward") <= f(t, "expected_reward") + 1e-9);
        assert!(f(b, "kl") <= f(b, "kl_bound") + 1e-12);
    }
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("<svg") && text.contains("KL(π‖p) (nats)"),
        "labelled axes"
    );
    let all = json_of(&[
        "theory",
        "frontier",
        "--probs",
        "0.2,0.8",
        "--rewards",
        "0,1",
        "--n-max",
        "5",
    ]);
    assert_eq!(all["bon"].as_array().unwrap().len(), 5);
}

#[test]
fn divergence_values_and_infinities() {
    let v = json_of(&[
        "theory",
        "divergence",
        "--q",
        "0.25,0.75",
        "--p",
        "0.5,0.5",
        "--alpha",
        "2",
    ]);
    let kl = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
    assert!((f(&v, "kl_q_p") - kl).abs() < 1e-15);
    assert!((f(&v, "renyi_q_p") - 1.25f64.ln()).abs() < 1e-15);
    assert_eq!(f(&v, "total_variation"), 0.25);
    assert!((f(&v, "chi_squared_q_p") - 0.25).abs() < 1e-15);
    let h = 1.0 - (0.125f64.sqrt() + 0.375f64.sqrt());
    assert!((f(&v, "hellinger_squared") - h).abs() < 1e-15);
    let inf = json_of(&["theory", "divergence", "--q", "0.5,0.5", "--p", "1,0"]);
    // +∞ is null under the JSON convention (never the string "inf").
    assert_eq!(inf["kl_q_p"], serde_json::Value::Null);
    assert_eq!(inf["chi_squared_q_p"], serde_json::Value::Null);
    assert!((f(&inf, "kl_p_q") - 2f64.ln()).abs() < 1e-15);
}

#[test]
fn bounds_hold_and_name_the_proxy() {
    let v = json_of(
        &[
            &["theory", "bounds", "--n-max", "256", "--points", "5"][..],
            &["--probs", "0.9,0.1", "--rewards", "0,1"],
        ]
        .concat(),
    );
    let ks = 0.8 / (2.0 * 9f64.ln());
    assert!((f(&v, "sigma2") - ks).abs() < 1e-9);
    assert!((f(&v, "sigma2_two_sided") - ks).abs() < 1e-9);
    // The mirror image: the rare outcome is the low one, the upper tail is light, and the
    // one-sided proxy the bound needs is the variance 0.09, below Kearns–Saul's two-sided.
    let m = json_of(
        &[
            &["theory", "bounds", "--n-max", "16", "--points", "3"][..],
            &["--probs", "0.1,0.9", "--rewards", "0,1"],
        ]
        .concat(),
    );
    assert!((f(&m, "sigma2") - 0.09).abs() < 1e-9, "{m}");
    assert!((f(&m, "sigma2_two_sided") - ks).abs() < 1e-9, "{m}");
    for r in m["rows"].as_array().unwrap() {
        assert!(f(r, "bon_improvement") <= f(r, "bound_sqrt_2_sigma2_kl") + 1e-12);
    }
    assert_eq!(f(&v, "sigma2_hoeffding"), 0.25);
    assert!(v["sigma2_method"].as_str().unwrap().contains("optimal"));
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    for r in rows {
        assert!(f(r, "bon_improvement") <= f(r, "bound_sqrt_2_sigma2_kl") + 1e-12);
        assert!(f(r, "tilt_improvement") <= f(r, "bound_sqrt_2_sigma2_kl") + 1e-12);
        assert!(f(r, "bon_improvement") <= f(r, "tilt_improvement") + 1e-12);
    }
}

#[test]
fn bad_inputs_exit_2_with_one_line_naming_the_input() {
    let t = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["theory", "bon", "--n", "3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (t(&["--probs", "", "--rewards", ""]), "--probs"),
        (
            t(&["--probs", "0.5,0.5", "--rewards", "0,1,2"]),
            "unequal lengths",
        ),
        (t(&["--probs", "-0.5,1.5", "--rewards", "0,1"]), "--probs"),
        (t(&["--probs", "nan,1", "--rewards", "0,1"]), "--probs"),
        (
            t(&["--probs", "0.5,0.5", "--rewards", "0,inf"]),
            "--rewards",
        ),
        (
            t(&["--probs", "0.5,0.6", "--rewards", "0,1"]),
            "--normalize",
        ),
        (
            t(&["--probs", "0.5,x", "--rewards", "0,1"]),
            "--probs: entry 2",
        ),
        (t(&[]), "--probs"),
        (t(&["--dist", "/nonexistent/d.csv"]), "/nonexistent/d.csv"),
        (
            vec![
                "theory".into(),
                "bon".into(),
                "--n".into(),
                "0".into(),
                "--probs".into(),
                "0.5,0.5".into(),
                "--rewards".into(),
                "0,1".into(),
            ],
            "--n",
        ),
        (
            vec![
                "theory".into(),
                "tilt".into(),
                "--kl".into(),
                "0.8".into(),
                "--probs".into(),
                "0.5,0.5".into(),
                "--rewards".into(),
                "0,1".into(),
            ],
            "--kl",
        ),
        (
            vec![
                "theory".into(),
                "tilt".into(),
                "--beta".into(),
                "-1".into(),
                "--probs".into(),
                "0.5,0.5".into(),
                "--rewards".into(),
                "0,1".into(),
            ],
            "--beta",
        ),
        (
            vec![
                "theory".into(),
                "divergence".into(),
                "--q".into(),
                "0.5,0.5".into(),
                "--p".into(),
                "1".into(),
            ],
            "unequal lengths",
        ),
        (
            vec![
                "theory".into(),
                "divergence".into(),
                "--q".into(),
                "0.5,0.5".into(),
                "--p".into(),
                "0.5,0.5".into(),
                "--alpha".into(),
                "0".into(),
            ],
            "--alpha",
        ),
        (
            vec![
                "theory".into(),
                "frontier".into(),
                "--n-max".into(),
                "0".into(),
                "--probs".into(),
                "1".into(),
                "--rewards".into(),
                "0".into(),
            ],
            "--n-max",
        ),
    ];
    for (args, needle) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        rejects(&refs, needle);
    }
    // Files: the error names the file and the line.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "prob,reward\n0.5,0\n-0.5,1\n").unwrap();
    rejects(
        &["theory", "bon", "--n", "2", "--dist", bad.to_str().unwrap()],
        "bad.csv line 3",
    );
    let hdr = dir.path().join("hdr.csv");
    std::fs::write(&hdr, "p,r\n0.5,0\n").unwrap();
    rejects(
        &["theory", "bon", "--n", "2", "--dist", hdr.to_str().unwrap()],
        "hdr.csv line 1",
    );
    let s = dir.path().join("s.txt");
    std::fs::write(&s, "1\n2\nabc\n").unwrap();
    rejects(
        &[
            "theory",
            "bon",
            "--n",
            "2",
            "--samples",
            s.to_str().unwrap(),
        ],
        "s.txt line 3",
    );
    let empty = dir.path().join("e.txt");
    std::fs::write(&empty, "\n").unwrap();
    rejects(
        &[
            "theory",
            "bon",
            "--n",
            "2",
            "--samples",
            empty.to_str().unwrap(),
        ],
        "e.txt",
    );
    // --normalize accepts what is otherwise rejected.
    let v = json_of(&[
        "theory",
        "bon",
        "--n",
        "2",
        "--probs",
        "1,1",
        "--rewards",
        "0,1",
        "--normalize",
    ]);
    assert_eq!(f(&v, "win_rate"), 0.625);
}

#[test]
fn clap_usage_errors_are_one_line_exit_2_and_help_passes_through() {
    let bon = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = vec!["theory", "bon", "--probs", "0.5,0.5", "--rewards", "0,1"];
        v.extend_from_slice(extra);
        v
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (bon(&["--n", "abc"]), "--n"),
        (bon(&["--n", "-1"]), "--n"),
        (bon(&["--n", "2.5"]), "--n"),
        (bon(&[]), "--n"),
        (bon(&["--n", "2", "--bogus"]), "--bogus"),
        (
            vec![
                "theory",
                "tilt",
                "--beta",
                "1",
                "--kl",
                "0.1",
                "--probs",
                "0.5,0.5",
                "--rewards",
                "0,1",
            ],
            "--kl",
        ),
        (vec!["theory"], "subcommand"),
        (vec!["theory", "nonsense"], "nonsense"),
    ];
    for (args, needle) in cases {
        rejects(&args, needle);
        let err = String::from_utf8(tilt(&args).stderr).unwrap();
        assert!(err.starts_with("tilt: error: "), "{err:?}");
        assert!(!err.contains("Usage"), "no usage block: {err:?}");
    }
    let both = tilt(&[
        "theory",
        "tilt",
        "--beta",
        "1",
        "--kl",
        "0.1",
        "--probs",
        "1",
        "--rewards",
        "0",
    ]);
    let err = String::from_utf8_lossy(&both.stderr);
    assert!(err.contains("--beta") && err.contains("--kl"), "{err}");
    // Neither: the error names both ways of giving it.
    let neither = tilt(&["theory", "tilt", "--probs", "1", "--rewards", "0"]);
    assert_eq!(neither.status.code(), Some(2));
    let err = String::from_utf8_lossy(&neither.stderr);
    assert!(err.contains("--beta") && err.contains("--kl"), "{err}");
    // --help and --version print normally and exit 0.
    for args in [
        vec!["--help"],
        vec!["theory", "bon", "--help"],
        vec!["--version"],
    ] {
        let out = tilt(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(!text.is_empty() && out.stderr.is_empty(), "{args:?}");
        if args[0] != "--version" {
            assert!(text.contains("Usage"), "{text}");
        } else {
            assert!(text.starts_with("tilt "), "{text}");
        }
    }
}

#[test]
fn extreme_rewards_give_exact_numbers_or_a_clear_error() {
    // λ(r − max r) underflows to −∞: KL is still exactly −log p(top) = log 2, never null.
    let v = json_of(&[
        "theory",
        "tilt",
        "--beta",
        "1e-300",
        "--probs",
        "0.5,0.5",
        "--rewards",
        "0,1e9",
    ]);
    assert!((f(&v, "kl") - 2f64.ln()).abs() < 1e-15, "{v}");
    assert_eq!(v["pmf"], serde_json::json!([0.0, 1.0]));
    // A reward range that overflows is bad input, named.
    for extra in [["--kl", "0"], ["--beta", "1"]] {
        rejects(
            &[
                &["theory", "tilt"][..],
                &extra,
                &["--probs", "0.5,0.5", "--rewards", "-1e308,1e308"],
            ]
            .concat(),
            "--rewards",
        );
    }
    rejects(
        &[
            "theory",
            "bon",
            "--n",
            "4",
            "--probs",
            "0.5,0.5",
            "--rewards",
            "-1e308,1e308",
        ],
        "overflows",
    );
}

#[test]
fn kl_estimate_of_tied_samples_uses_the_level_mass() {
    // README's worked example: no ties, D̂(½) at n = 4.
    let v = json_of(&[&["theory", "bon", "--n", "4"][..], &COIN].concat());
    assert!((f(&v, "kl_estimate") - 0.4991239194).abs() < 5e-11, "{v}");
    // The same coin as samples: each sample is an outcome of mass 1/6, its level ½.
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("coin.txt");
    std::fs::write(&s, "0\n1\n1\n0\n0\n1\n").unwrap();
    let w = json_of(&[
        "theory",
        "bon",
        "--n",
        "4",
        "--samples",
        s.to_str().unwrap(),
    ]);
    assert_eq!(f(&w, "kl_estimate"), f(&v, "kl_estimate"));
    assert_eq!(f(&w, "kl"), f(&v, "kl"));
}

#[test]
fn frontier_plot_accepts_an_upper_case_svg_extension() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("FRONTIER.SVG");
    json_of(
        &[
            &[
                "theory",
                "frontier",
                "--n-max",
                "8",
                "--plot",
                svg.to_str().unwrap(),
            ][..],
            &COIN,
        ]
        .concat(),
    );
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    let png = dir.path().join("f.png");
    rejects(
        &[
            &[
                "theory",
                "frontier",
                "--n-max",
                "8",
                "--plot",
                png.to_str().unwrap(),
            ][..],
            &COIN,
        ]
        .concat(),
        "--plot",
    );
}

/// Every string in a JSON value, with its path (to find `"inf"`/`"nan"` posing as numbers).
fn strings(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::String(s) => out.push((path.to_string(), s.clone())),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| strings(x, &format!("{path}[{i}]"), out)),
        Value::Object(m) => m
            .iter()
            .for_each(|(k, x)| strings(x, &format!("{path}.{k}"), out)),
        _ => {}
    }
}

fn no_number_strings(v: &Value) {
    let mut s = Vec::new();
    strings(v, "", &mut s);
    for (path, text) in s {
        let t = text.to_ascii_lowercase();
        assert!(
            !["inf", "-inf", "nan", "infinity"].contains(&t.as_str()),
            "{path} is the string {text:?}: numbers are numbers or null"
        );
    }
}

// Issue item 2: subnormal probabilities printed "chi_squared_q_p":"nan".
#[test]
fn divergences_of_subnormal_pmfs_are_numbers_or_one_named_error() {
    let out = tilt(&["theory", "divergence", "--q", "0.5,0.5", "--p", "1e-310,1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(out.stdout.is_empty());
    assert!(err.contains("--q/--p: χ²(q‖p) = e^712.415084"), "{err}");
    assert!(err.contains("D_2(q‖p) = log(1 + χ²)"), "{err}");
    // One step inside the range of doubles: every field a number, none NaN.
    let v = json_of(&["theory", "divergence", "--q", "0.5,0.5", "--p", "1e-300,1"]);
    for k in [
        "kl_q_p",
        "kl_p_q",
        "renyi_q_p",
        "total_variation",
        "chi_squared_q_p",
        "hellinger_squared",
    ] {
        assert!(v[k].is_number(), "{k}: {v}");
    }
    assert!(
        (f(&v, "chi_squared_q_p") / 2.5e299 - 1.0).abs() < 1e-12,
        "{v}"
    );
    for alpha in ["inf", "1e300", "0.5"] {
        let d = json_of(&[
            "theory",
            "divergence",
            "--q",
            "0.5,0.5",
            "--p",
            "1e-300,1",
            "--alpha",
            alpha,
        ]);
        assert!(d["renyi_q_p"].is_number(), "{d}");
        no_number_strings(&d);
    }
}

// Issue item 3: huge counts were clamped silently or called "not a whole number".
#[test]
fn counts_beyond_u64_are_their_own_error() {
    for n in ["18446744073709551616", "1e20", "1e400"] {
        rejects(
            &[&["theory", "bon", "--n", n][..], &COIN].concat(),
            "exceeds the largest supported n, 18446744073709551615",
        );
    }
    rejects(
        &[&["theory", "bon", "--n", "2.5"][..], &COIN].concat(),
        "not a non-negative whole number",
    );
    let v = json_of(&[&["theory", "bon", "--n", "18446744073709551615"][..], &COIN].concat());
    assert_eq!(v["n"].as_u64(), Some(u64::MAX));
    assert!(f(&v, "kl") <= 2f64.ln());
    // --points takes the same exact parser.
    let v = json_of(
        &[
            &["theory", "frontier", "--n-max", "1e3", "--points", "1e1"][..],
            &COIN,
        ]
        .concat(),
    );
    assert_eq!(v["bon"].as_array().unwrap().len(), 10);
    rejects(
        &[
            &["theory", "frontier", "--n-max", "8", "--points", "1e20"][..],
            &COIN,
        ]
        .concat(),
        "--points",
    );
}

// Issue item 4: --plot into a missing folder was found only after the computation.
#[test]
fn bad_plot_paths_exit_2_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-folder").join("f.svg");
    let png = dir.path().join("f.png");
    let folder = dir.path().to_str().unwrap().to_string();
    for (path, needle) in [
        (missing.to_str().unwrap(), "does not exist"),
        (png.to_str().unwrap(), ".png is not supported"),
        (folder.as_str(), "is a directory"),
    ] {
        // --n-max 10^6 without --points is 10^6 points of work: refused before any of it.
        let start = std::time::Instant::now();
        rejects(
            &[
                &["theory", "frontier", "--n-max", "1000000", "--plot", path][..],
                &COIN,
            ]
            .concat(),
            needle,
        );
        assert!(
            start.elapsed().as_secs_f64() < 2.0,
            "checked before the work"
        );
        let out = tilt(
            &[
                &["theory", "frontier", "--n-max", "4", "--plot", path][..],
                &COIN,
            ]
            .concat(),
        );
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("tilt: error: --plot "));
    }
    assert!(!png.exists());
}

// Issue item 6: a negative "largest achievable" KL on 10^6 equal rewards.
#[test]
fn a_million_equal_samples_have_a_largest_kl_of_exactly_zero() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("ties.txt");
    std::fs::write(&s, "0.5\n".repeat(1_000_000)).unwrap();
    let s = s.to_str().unwrap();
    let out = tilt(&["theory", "tilt", "--kl", "0.1", "--samples", s]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("largest achievable, 0 nats"), "{err}");
    let v = json_of(&["theory", "frontier", "--n-max", "4", "--samples", s]);
    assert_eq!(v["max_kl"], 0.0);
    for b in v["bon"].as_array().unwrap() {
        assert_eq!(b["kl"], 0.0);
    }
}

// Issue item 7: one JSON convention, numbers or null, across commands.
#[test]
fn non_finite_values_are_null_and_fields_keep_their_type() {
    let t = json_of(&[&["theory", "tilt", "--kl", "0"][..], &COIN].concat());
    assert!(t["beta"].is_null() && t["lambda"] == 0.0 && t["log_partition"] == 0.0);
    let top = json_of(
        &[
            &["theory", "tilt", "--kl", &2f64.ln().to_string()][..],
            &COIN,
        ]
        .concat(),
    );
    assert!(
        top["lambda"].is_null() && top["log_partition"].is_null(),
        "{top}"
    );
    assert_eq!(top["beta"], 0.0);
    let fr = json_of(&[&["theory", "frontier", "--n-max", "2000"][..], &COIN].concat());
    let tl = fr["tilt"].as_array().unwrap();
    assert!(tl[0]["beta"].is_null());
    // Every row has the same fields with the same JSON type (number or null).
    let keys: Vec<&String> = tl[0].as_object().unwrap().keys().collect();
    for r in tl {
        assert_eq!(r.as_object().unwrap().keys().collect::<Vec<_>>(), keys);
        for k in &keys {
            assert!(r[k.as_str()].is_number() || r[k.as_str()].is_null(), "{r}");
        }
    }
    for v in [t, top, fr] {
        no_number_strings(&v);
    }
}

// Issue item 10: --format table on every command of this file, reading well.
#[test]
fn every_command_prints_a_table() {
    let run = |args: &[&str]| -> String {
        let out = tilt(&[args, &["--format", "table"]].concat());
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            !text.contains("items]") && !text.contains('{'),
            "{args:?}:\n{text}"
        );
        text
    };
    let t = run(&[&["theory", "tilt", "--kl", "0"][..], &COIN].concat());
    assert!(
        t.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["beta", "inf"]),
        "{t}"
    );
    let b = run(&[&["theory", "bon", "--n", "4"][..], &COIN].concat());
    assert!(b.contains("[0.0625, 0.9375]"), "{b}");
    let fr = run(&[&["theory", "frontier", "--n-max", "3"][..], &COIN].concat());
    let header = fr
        .lines()
        .find(|l| l.trim_start().starts_with('n'))
        .unwrap();
    assert!(
        header.split_whitespace().next() == Some("n"),
        "n leads: {fr}"
    );
    run(&["theory", "divergence", "--q", "0.5,0.5", "--p", "1,0"]);
    run(&[
        &["theory", "bounds", "--n-max", "16", "--points", "3"][..],
        &COIN,
    ]
    .concat());
}

// Issue item 9: frontier rows stream; long runs show progress without ANSI codes.
#[test]
fn frontier_streams_a_million_points_in_bounded_memory() {
    let out = tilt(
        &[
            &[
                "theory", "frontier", "--n-max", "1e12", "--points", "1000000",
            ][..],
            &["--probs", "0.2,0.3,0.5", "--rewards", "0,1,2"],
        ]
        .concat(),
    );
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains('\u{1b}'),
        "no ANSI codes off a terminal: {stderr}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (bon, tl) = (v["bon"].as_array().unwrap(), v["tilt"].as_array().unwrap());
    assert_eq!(bon.len(), tl.len());
    // 10^6 log-spaced n in [1, 10^12], repeats among the small ones merged.
    assert_eq!(bon.len(), 656_307);
    assert_eq!(bon.last().unwrap()["n"], 1_000_000_000_000u64);
}

// Issue item 11: what the frontier plot says.
#[test]
fn the_frontier_plot_labels_n_uses_unicode_and_survives_ties() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("f.svg");
    let p = svg.to_str().unwrap();
    json_of(&[
        "theory",
        "frontier",
        "--probs",
        "0.2,0.3,0.1,0.4",
        "--rewards",
        "0,1,1,2",
        "--n-max",
        "64",
        "--plot",
        p,
    ]);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("n = 1") && text.contains("n = 2"), "n labels");
    assert!(
        text.contains("p·e^(r/β)") && !text.contains("e^{"),
        "no raw markup"
    );
    // All rewards equal: every KL is 0, and the plot still has readable ticks.
    json_of(&[
        "theory",
        "frontier",
        "--probs",
        "0.5,0.5",
        "--rewards",
        "1,1",
        "--n-max",
        "16",
        "--plot",
        p,
    ]);
    let flat = std::fs::read_to_string(&svg).unwrap();
    assert!(
        flat.contains("\n0.5\n") && !flat.contains("0000000"),
        "readable ticks"
    );
}
