//! `tilt theory memoryless | infalign | infalign-frontier` end to end: JSON fields, the
//! convergence table, plots, and bad input (exit code 2 with one line naming the input).

use serde_json::Value;
use std::process::Command;

fn tilt(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args(args)
        .output()
        .expect("run tilt");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_ok(args: &[&str]) -> Value {
    let (code, stdout, stderr) = tilt(args);
    assert_eq!(code, 0, "tilt {args:?} failed: {stderr}");
    serde_json::from_str(stdout.trim()).expect("one JSON object")
}

fn usage_error(args: &[&str], names: &str) {
    let (code, stdout, stderr) = tilt(args);
    assert_eq!(code, 2, "tilt {args:?}: expected exit 2, stderr: {stderr}");
    assert!(stdout.is_empty());
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].contains(names), "{names} not named in: {stderr}");
}

const MODEL: [&str; 6] = [
    "theory",
    "memoryless",
    "--probs",
    "0.5,0.3,0.2",
    "--rewards",
    "0,1,2",
];

#[test]
fn memoryless_fields_and_convergence_table() {
    let mut args = MODEL.to_vec();
    args.extend(["--lengths", "10,100,1000", "--delta", "0.2"]);
    let v = json_ok(&args);
    for k in [
        "rate_function_at_x_star",
        "x_star",
        "tilt_reward_per_token",
        "bon_reward_per_token",
        "kl_tilt_bon_per_token",
        "log_n",
    ] {
        assert!(v[k].is_number(), "missing {k}: {v}");
    }
    assert!((v["rate_function_at_x_star"].as_f64().unwrap() - 0.2).abs() < 1e-12);
    assert!((v["log_n"].as_f64().unwrap() - 200.0).abs() < 1e-9);
    let table = v["table"].as_array().unwrap();
    assert_eq!(table.len(), 3);
    let gaps: Vec<f64> = table
        .iter()
        .map(|r| r["x_star_minus_bon"].as_f64().unwrap())
        .collect();
    assert!(
        gaps[0] > gaps[1] && gaps[1] > gaps[2] && gaps[2] > 0.0,
        "{gaps:?}"
    );
    let kls: Vec<f64> = table
        .iter()
        .map(|r| r["kl_tilt_bon_per_token"].as_f64().unwrap())
        .collect();
    assert!(kls[0] > kls[1] && kls[1] > kls[2], "{kls:?}");
}

#[test]
fn memoryless_plot_and_table_format() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("conv.svg");
    let svg_s = svg.to_str().unwrap();
    let mut args = MODEL.to_vec();
    args.extend(["--lengths", "5,50", "--delta", "0.1", "--plot", svg_s]);
    json_ok(&args);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("best-of-N"));
    let mut args = MODEL.to_vec();
    args.extend(["--length", "20", "--delta", "0.1", "--format", "table"]);
    let (code, stdout, _) = tilt(&args);
    assert_eq!(code, 0);
    assert!(stdout.contains("x_star") && stdout.contains("kl_tilt_bon_per_token"));
}

#[test]
fn memoryless_bad_input() {
    let with = |extra: &[&str]| {
        let mut a = MODEL.to_vec();
        a.extend(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |extra: &[&str], name: &str| {
        let a = with(extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        usage_error(&refs, name);
    };
    run(&["--length", "10", "--delta", "5"], "--delta");
    run(&["--length", "10", "--delta", "-0.1"], "--delta");
    run(&["--length", "0", "--delta", "0.1"], "--length");
    run(&["--lengths", "10,x", "--delta", "0.1"], "--lengths");
    usage_error(
        &[
            "theory",
            "memoryless",
            "--probs",
            "0.5,0.5",
            "--rewards",
            "0,0.7071067811865476",
            "--length",
            "10",
            "--delta",
            "0.1",
            "--grid",
            "-1",
        ],
        "--grid",
    );
    usage_error(
        &[
            "theory",
            "memoryless",
            "--probs",
            "0.3,0.3,0.4",
            "--rewards",
            "0,1,1.4142135623730951",
            "--length",
            "10",
            "--delta",
            "0.1",
        ],
        "--rewards",
    );
}

#[test]
fn infalign_fields_closed_form_and_optimize() {
    // Identity at β = 1: W = 1/(1 − e^{−1}) − 1 (docs/theory.md §10).
    let v = json_ok(&[
        "theory",
        "infalign",
        "--n",
        "4",
        "--transform",
        "identity",
        "--beta",
        "1",
    ]);
    for k in ["kl", "win_rate", "inference_win_rate", "t", "beta"] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    let w = 1.0 / (1.0 - (-1f64).exp()) - 1.0;
    assert!((v["win_rate"].as_f64().unwrap() - w).abs() < 1e-11);
    let v = json_ok(&[
        "theory",
        "infalign",
        "--n",
        "2",
        "--procedure",
        "bon",
        "--transform",
        "exp",
        "--t",
        "5",
        "--kl",
        "0.5",
    ]);
    assert!((v["inference_win_rate"].as_f64().unwrap() - 0.8154).abs() < 1.5e-4);
    assert!((v["kl"].as_f64().unwrap() - 0.5).abs() < 1e-10);
    let v = json_ok(&[
        "theory",
        "infalign",
        "--n",
        "2",
        "--transform",
        "exp",
        "--kl",
        "0.5",
        "--optimize-t",
        "--t-max",
        "50",
    ]);
    assert!(v["inference_win_rate"].as_f64().unwrap() >= 0.8154 - 1e-4);
    assert_eq!(v["t_at_edge"], Value::Bool(false));
}

#[test]
fn infalign_bad_input() {
    usage_error(
        &[
            "theory",
            "infalign",
            "--n",
            "4",
            "--transform",
            "exp",
            "--t",
            "-1",
            "--beta",
            "1",
        ],
        "--t",
    );
    usage_error(
        &[
            "theory",
            "infalign",
            "--n",
            "4",
            "--transform",
            "identity",
            "--beta",
            "0",
        ],
        "--beta",
    );
    usage_error(
        &[
            "theory",
            "infalign",
            "--n",
            "4",
            "--transform",
            "identity",
            "--kl",
            "-1",
        ],
        "--kl",
    );
    usage_error(&["theory", "infalign", "--n", "0", "--beta", "1"], "--n");
    usage_error(
        &[
            "theory",
            "infalign",
            "--n",
            "4",
            "--transform",
            "exp",
            "--beta",
            "1",
        ],
        "--t",
    );
}

#[test]
fn infalign_frontier_rows_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("f.svg");
    let v = json_ok(&[
        "theory",
        "infalign-frontier",
        "--n",
        "2",
        "--kls",
        "0.25,1",
        "--t-max",
        "60",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let id = r["identity_win_rate"].as_f64().unwrap();
        let ctrl = r["ctrl_win_rate"].as_f64().unwrap();
        assert!(ctrl >= id - 1e-12, "{r}");
    }
    // docs/theory.md §10: N=2, K=0.25 identity 0.7198, CTRL at t = 4 0.7393.
    assert!((rows[0]["identity_win_rate"].as_f64().unwrap() - 0.7198).abs() < 1.5e-4);
    assert!(rows[0]["ctrl_win_rate"].as_f64().unwrap() >= 0.7393 - 1.5e-4);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("CTRL"));
}

#[test]
fn memoryless_rewards_within_rounding_or_overflowing_are_one_line_errors() {
    let base = |rewards: &'static str| -> Vec<&'static str> {
        vec![
            "theory",
            "memoryless",
            "--probs",
            "0.5,0.5",
            "--rewards",
            rewards,
            "--length",
            "10",
            "--delta",
            "0.1",
        ]
    };
    usage_error(&base("1e20,1.00000000000001e20"), "--grid");
    usage_error(&base("1e20,1.00000000000001e20"), "--rewards");
    usage_error(&base("-1e308,1e308"), "--rewards");
    // Tiny rewards on an exact grid are fine (the detection tolerance is relative).
    let v = json_ok(&base("0,1e-10"));
    assert!(
        (v["lattice_step"].as_f64().unwrap() / 1e-10 - 1.0).abs() < 1e-9,
        "{v}"
    );
    // With --grid the near-equal rewards are snapped.
    let mut a = base("1e20,1.00000000000001e20");
    a.extend(["--grid", "1e6"]);
    json_ok(&a);
}

#[test]
fn memoryless_reports_the_true_snap_error_of_a_detected_grid() {
    let v = json_ok(&[
        "theory",
        "memoryless",
        "--probs",
        "0.2,0.2,0.2,0.2,0.2",
        "--rewards",
        "0,0.1,0.7,1.2000000001,2.3",
        "--length",
        "10",
        "--delta",
        "0.1",
    ]);
    let e = v["grid_snap_error_per_token"].as_f64().unwrap();
    assert!(e > 0.0 && e < 1e-8, "{v}");
}

#[test]
fn memoryless_plot_accepts_an_upper_case_svg_extension() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("conv.SVG");
    let mut args = MODEL.to_vec();
    args.extend([
        "--lengths",
        "5,50",
        "--delta",
        "0.1",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    json_ok(&args);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
}

#[test]
fn infalign_n_beyond_the_quadrature_cap_is_refused() {
    let run = |n: &'static str, procedure: &'static str| {
        vec![
            "theory",
            "infalign",
            "--n",
            n,
            "--procedure",
            procedure,
            "--transform",
            "identity",
            "--kl",
            "0.5",
        ]
    };
    usage_error(&run("1000001", "bon"), "--n");
    usage_error(&run("1e19", "bon"), "--n");
    usage_error(&run("1e16", "won"), "--n");
    let v = json_ok(&run("1000000", "bon"));
    let w = v["best_of_m_policy_inference_win_rate"].as_f64().unwrap();
    let m = v["best_of_m_policy_m"].as_f64().unwrap();
    assert!((w - m / (m + 1.0)).abs() < 1e-10, "{v}");
    json_ok(&run("1e15", "won"));
}

// Issue item 1: --t-max 1e300 ran for minutes (1e10: 12 s, 1e12: 25 s).
#[test]
fn every_t_search_is_bounded_or_refused_by_name() {
    let opt = |t_max: &'static str| {
        vec![
            "theory",
            "infalign",
            "--n",
            "4",
            "--kl",
            "0.5",
            "--transform",
            "exp",
            "--optimize-t",
            "--t-max",
            t_max,
        ]
    };
    for t_max in ["1e10", "1e12", "1e300"] {
        let start = std::time::Instant::now();
        usage_error(&opt(t_max), "--t-max");
        assert!(start.elapsed().as_secs_f64() < 2.0);
    }
    let (_, _, stderr) = tilt(&opt("1e300"));
    assert!(
        stderr.contains("1e300") && !stderr.contains("0000000000"),
        "{stderr}"
    );
    // At the cap, and at the largest KL budget: seconds.
    let start = std::time::Instant::now();
    let v = json_ok(&opt("1e6"));
    assert!((v["t"].as_f64().unwrap() - 12.63).abs() < 0.1, "{v}");
    let mut worst = opt("1e6");
    worst[5] = "20";
    json_ok(&worst);
    assert!(start.elapsed().as_secs_f64() < 30.0);
    usage_error(
        &[
            "theory",
            "infalign",
            "--n",
            "4",
            "--kl",
            "0.5",
            "--transform",
            "exp",
            "--t",
            "1e300",
        ],
        "--t",
    );
    usage_error(
        &[
            "theory",
            "infalign-frontier",
            "--n",
            "4",
            "--kls",
            "0.5",
            "--t-max",
            "1e300",
        ],
        "--t-max",
    );
    usage_error(
        &["theory", "infalign-frontier", "--n", "4", "--kls", "0.5,21"],
        "--kls: entry 2",
    );
}

// Issue item 5: --beta 1e-300 blamed --kl.
#[test]
fn errors_name_the_flag_the_user_gave() {
    for beta in ["1e-300", "1e-14"] {
        let args = [
            "theory",
            "infalign",
            "--n",
            "4",
            "--transform",
            "identity",
            "--beta",
            beta,
        ];
        usage_error(&args, "--beta");
        let (_, _, stderr) = tilt(&args);
        assert!(!stderr.contains("--kl"), "{stderr}");
    }
    // A β whose tilt is within the limits: the baselines at its KL are computed.
    let v = json_ok(&[
        "theory",
        "infalign",
        "--n",
        "4",
        "--transform",
        "identity",
        "--beta",
        "0.05",
    ]);
    assert!(v["identity_inference_win_rate"].is_number(), "{v}");
    // --lengths errors name --lengths, not --length.
    let mut a = MODEL.to_vec();
    a.extend(["--lengths", "10,0", "--delta", "0.1"]);
    usage_error(&a, "--lengths: entry 2");
}

// Issue item 3 for lengths: too large is its own error.
#[test]
fn lengths_too_large_are_their_own_error() {
    let mut a = MODEL.to_vec();
    a.extend(["--lengths", "10,1e10", "--delta", "0.1"]);
    usage_error(&a, "exceeds the largest supported length, 1000000000");
    // Within the count cap but beyond the lattice: refused before any length is computed.
    let mut b = MODEL.to_vec();
    b.extend(["--lengths", "10,100000000", "--delta", "0.1"]);
    let start = std::time::Instant::now();
    usage_error(&b, "--lengths");
    assert!(start.elapsed().as_secs_f64() < 2.0);
}

// Issue item 4 for memoryless and infalign-frontier.
#[test]
fn bad_plot_paths_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope").join("m.svg");
    let missing = missing.to_str().unwrap();
    let mut a = MODEL.to_vec();
    a.extend([
        "--lengths",
        "10,100000",
        "--delta",
        "0.2",
        "--plot",
        missing,
    ]);
    let start = std::time::Instant::now();
    usage_error(&a, "--plot");
    usage_error(
        &[
            "theory",
            "infalign-frontier",
            "--n",
            "4",
            "--plot",
            dir.path().join("f.png").to_str().unwrap(),
        ],
        ".png is not supported",
    );
    assert!(
        start.elapsed().as_secs_f64() < 2.0,
        "checked before the work"
    );
}

// Issue items 7 and 10: the same convention and readable tables here. A KL budget of 0 is
// below the solver's 1e-12 (β = ∞ is asked for with --beta inf, below).
#[test]
fn a_zero_kl_budget_is_refused_naming_kl() {
    usage_error(
        &[
            "theory",
            "infalign",
            "--n",
            "4",
            "--transform",
            "identity",
            "--kl",
            "0",
        ],
        "--kl: 0: the KL budget must be between 1e-12 and 20 nats",
    );
}

#[test]
fn infalign_at_beta_infinity_and_tables() {
    let v = json_ok(&[
        "theory",
        "infalign",
        "--n",
        "4",
        "--transform",
        "identity",
        "--beta",
        "inf",
    ]);
    // β = ∞ is null; the baselines do not apply at KL 0 (null, not absent); t is null for
    // the identity; the optimisation fields are null without --optimize-t.
    for k in [
        "beta",
        "t",
        "identity_inference_win_rate",
        "best_of_m_policy_m",
        "t_max",
        "t_at_edge",
        "t_unconverged",
    ] {
        assert!(v[k].is_null(), "{k}: {v}");
    }
    assert_eq!(v["kl"], 0.0);
    assert_eq!(v["inference_win_rate"], 0.5);
    let table = |args: &[&str]| -> String {
        let mut a = args.to_vec();
        a.extend(["--format", "table"]);
        let (code, stdout, stderr) = tilt(&a);
        assert_eq!(code, 0, "{stderr}");
        assert!(
            !stdout.contains("items]") && !stdout.contains('{'),
            "{stdout}"
        );
        stdout
    };
    let t = table(&[
        "theory",
        "infalign",
        "--n",
        "2",
        "--transform",
        "exp",
        "--t",
        "5",
        "--kl",
        "0.5",
    ]);
    assert!(t.contains("kind  exp") && t.contains("beta "), "{t}");
    let f = table(&[
        "theory",
        "infalign-frontier",
        "--n",
        "2",
        "--kls",
        "0.25,1",
        "--t-max",
        "60",
    ]);
    assert!(f.lines().any(|l| l.trim_start().starts_with("kl ")), "{f}");
    let mut m = MODEL.to_vec();
    m.extend(["--lengths", "10,100", "--delta", "0.2"]);
    let mt = table(&m);
    let header = mt.lines().find(|l| l.contains("x_star_minus_bon")).unwrap();
    assert_eq!(header.split_whitespace().next(), Some("length"), "{mt}");
}

// Issue item 11: what the memoryless and infalign-frontier plots say.
#[test]
fn memoryless_and_infalign_plots_say_what_they_show() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("m.svg");
    let mut a = MODEL.to_vec();
    a.extend([
        "--lengths",
        "10,100,1000",
        "--delta",
        "0.2",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    json_ok(&a);
    let m = std::fs::read_to_string(&svg).unwrap();
    assert!(
        m.contains("KL per token vs length"),
        "panel title matches its content"
    );
    assert!(m.contains("Δ = 0.2 nats"), "the Δ reference line");
    assert!(
        m.contains("\n1000\n") && !m.contains("1e3"),
        "integer ticks for lengths"
    );
    assert!(!m.contains("e^{"), "no raw markup");
    assert_eq!(
        m.matches("\nbest-of-N, N = e^(LΔ)\n").count(),
        1,
        "one legend each"
    );
    let f = dir.path().join("i.svg");
    let v = json_ok(&[
        "theory",
        "infalign-frontier",
        "--n",
        "2",
        "--t-max",
        "60",
        "--plot",
        f.to_str().unwrap(),
    ]);
    let rows = v["rows"].as_array().unwrap();
    let near_zero = rows
        .iter()
        .filter(|r| r["kl"].as_f64().unwrap() <= 0.5)
        .count();
    assert!(
        near_zero >= 20,
        "a fine default grid on (0, ½]: {near_zero}"
    );
    assert!(std::fs::read_to_string(&f).unwrap().contains("CTRL"));
}
