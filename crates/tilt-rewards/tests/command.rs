//! The external-command reward: a long-lived child speaking JSON lines (protocol in the
//! crate README). Children are small `python3` and `sh` scripts.

use std::time::Duration;
use tilt_rewards::{CommandReward, Reward, RewardError};

const SECOND: Duration = Duration::from_secs(20);

/// Replies `{"score": len(response) + 1000 * k}` where k counts the requests this process
/// has seen, so a second batch proves the child is the same process.
const COUNTING: &str = r#"python3 -c '
import json, sys
k = 0
for line in sys.stdin:
    req = json.loads(line)
    print(json.dumps({"score": len(req["response"]) + 1000 * k}), flush=True)
    k += 1
'"#;

#[test]
fn scores_in_order_and_the_child_lives_on() {
    let r = CommandReward::spawn_shell(COUNTING, SECOND).unwrap();
    assert!(r.name().starts_with("command:python3"));
    let s = r
        .score(&[("p", "ab"), ("p", "héllo\nworld \"q\""), ("", "")])
        .unwrap();
    assert_eq!(s, vec![2.0, 1000.0 + 15.0, 2000.0]);
    let s = r.score(&[("p", "xyz")]).unwrap();
    assert_eq!(s, vec![3003.0], "same child: its counter went on");
    assert_eq!(r.score(&[]).unwrap(), Vec::<f32>::new());
}

#[test]
fn a_large_batch_does_not_deadlock_on_full_pipes() {
    // ~5 MB of requests written before any reply is read; the child answers at once.
    let r = CommandReward::spawn_shell(COUNTING, SECOND).unwrap();
    let response = "x".repeat(1000);
    let pairs: Vec<(&str, &str)> = (0..5000).map(|_| ("prompt", response.as_str())).collect();
    let s = r.score(&pairs).unwrap();
    assert_eq!(s.len(), 5000);
    assert_eq!(s[4999], 1000.0 + 1000.0 * 4999.0);
}

#[test]
fn bare_numbers_are_accepted_and_argv_needs_no_shell() {
    let argv: Vec<String> = [
        "python3",
        "-c",
        "import sys\nfor l in sys.stdin: print(0.5, flush=True)",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let r = CommandReward::spawn(&argv, SECOND).unwrap();
    assert_eq!(r.score(&[("a", "b"), ("c", "d")]).unwrap(), vec![0.5, 0.5]);
}

#[test]
fn non_finite_replies_are_named() {
    let r = CommandReward::spawn_shell(
        r#"python3 -c '
import sys
replies = iter(["1.0", "NaN", "2.0", "{\"score\": 1e300}"])
for line in sys.stdin:
    print(next(replies), flush=True)
'"#,
        SECOND,
    )
    .unwrap();
    let e = r.score(&[("a", "b"), ("c", "d")]).unwrap_err();
    assert!(matches!(e, RewardError::NonFinite { index: 1, .. }), "{e}");
    assert!(e.to_string().contains("command:python3"), "{e}");
    // 1e300 overflows f32: infinite, also named.
    let e = r.score(&[("a", "b"), ("c", "d")]).unwrap_err();
    assert!(matches!(e, RewardError::NonFinite { index: 1, .. }), "{e}");
}

/// Python's `json.dumps({"score": float("nan")})` writes `{"score": NaN}`: a non-finite score
/// for that item, with the child kept (the stream is in step), not a malformed reply.
#[test]
fn python_nan_inside_the_object_is_a_non_finite_score_and_the_child_lives_on() {
    let r = CommandReward::spawn_shell(
        r#"python3 -c '
import json, sys
k = 0
for line in sys.stdin:
    score = [1.0, float("nan"), float("inf"), -float("inf")][k] if k < 4 else float(k)
    print(json.dumps({"score": score}), flush=True)
    k += 1
'"#,
        SECOND,
    )
    .unwrap();
    let e = r.score(&[("a", "b"), ("c", "d")]).unwrap_err();
    assert!(
        matches!(e, RewardError::NonFinite { index: 1, value, .. } if value.is_nan()),
        "{e}"
    );
    assert!(e.to_string().contains("command:python3"), "{e}");
    let e = r.score(&[("a", "b"), ("c", "d")]).unwrap_err();
    assert!(
        matches!(e, RewardError::NonFinite { index: 0, value, .. } if value == f32::INFINITY),
        "{e}"
    );
    // Same child, in step: replies 4 and 5 answer the third batch.
    assert_eq!(r.score(&[("a", "b"), ("c", "d")]).unwrap(), vec![4.0, 5.0]);
}

/// A child that never reads its stdin: once a batch is larger than the pipe's buffer, the
/// write would block forever. It must time out, name the reward, and stop the child.
#[test]
fn a_child_that_never_reads_its_stdin_times_out_while_writing() {
    let r = CommandReward::spawn_shell(
        "exec python3 -c 'import time; time.sleep(60)'",
        Duration::from_millis(500),
    )
    .unwrap();
    let response = "x".repeat(1000);
    let pairs: Vec<(&str, &str)> = (0..1500).map(|_| ("prompt", response.as_str())).collect();
    let start = std::time::Instant::now();
    let e = r.score(&pairs).unwrap_err().to_string();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        e.contains("stopped reading its stdin") && e.contains("timeout"),
        "{e}"
    );
    assert!(e.contains("of 1500 requests"), "{e}");
    assert!(e.contains("command:exec python3"), "{e}");
    let again = r.score(&[("a", "b")]).unwrap_err().to_string();
    assert!(
        again.contains("unusable") && again.contains("stopped reading"),
        "{again}"
    );
}

#[test]
fn a_child_that_dies_is_reported_with_status_and_stderr() {
    let r =
        CommandReward::spawn_shell("read line; echo 'model failed to load' >&2; exit 3", SECOND)
            .unwrap();
    let e = r.score(&[("a", "b"), ("c", "d")]).unwrap_err().to_string();
    assert!(e.contains("died"), "{e}");
    assert!(e.contains("exit status: 3"), "{e}");
    assert!(e.contains("model failed to load"), "{e}");
    assert!(e.contains("command:read line"), "{e}");
    let again = r.score(&[("a", "b")]).unwrap_err().to_string();
    assert!(
        again.contains("unusable after an earlier failure"),
        "{again}"
    );
}

#[test]
fn a_command_that_cannot_start_is_an_error() {
    let e = CommandReward::spawn(&["/nonexistent/tilt-reward".to_string()], SECOND).unwrap_err();
    assert!(e.to_string().contains("cannot start"), "{e}");
    let e = CommandReward::spawn(&[], SECOND).unwrap_err();
    assert!(e.to_string().contains("empty command"), "{e}");
    // A shell command that does not exist: the shell exits 127 and says so on stderr.
    let r = CommandReward::spawn_shell("/nonexistent/tilt-reward-xyz", SECOND).unwrap();
    let e = r.score(&[("a", "b")]).unwrap_err().to_string();
    assert!(e.contains("died") && e.contains("127"), "{e}");
}

#[test]
fn malformed_and_error_replies_are_named() {
    let r =
        CommandReward::spawn_shell("while read l; do echo 'score: high'; done", SECOND).unwrap();
    let e = r.score(&[("a", "b")]).unwrap_err().to_string();
    assert!(
        e.contains("malformed reply") && e.contains("score: high"),
        "{e}"
    );

    let r = CommandReward::spawn_shell(
        r#"while read l; do echo '{"error": "GPU out of memory"}'; done"#,
        SECOND,
    )
    .unwrap();
    let e = r.score(&[("a", "b")]).unwrap_err().to_string();
    assert!(
        e.contains("reported an error") && e.contains("GPU out of memory"),
        "{e}"
    );
}

#[test]
fn a_silent_child_times_out() {
    let r = CommandReward::spawn_shell("read line; sleep 30", Duration::from_millis(300)).unwrap();
    assert_eq!(r.timeout(), Duration::from_millis(300));
    let e = r.score(&[("a", "b")]).unwrap_err().to_string();
    assert!(e.contains("timeout") && e.contains("pair 0"), "{e}");
    let again = r.score(&[("a", "b")]).unwrap_err().to_string();
    assert!(
        again.contains("unusable") && again.contains("timeout"),
        "{again}"
    );
}

/// The README's example command.
#[test]
fn the_readme_python_command_works() {
    let r = CommandReward::spawn_shell(
        r#"python3 -c '
import json, sys
for line in sys.stdin:
    req = json.loads(line)
    print(json.dumps({"score": len(req["response"].split())}), flush=True)
'"#,
        SECOND,
    )
    .unwrap();
    let s = r
        .score(&[("Name a fruit.", "An apple."), ("Name a fruit.", "A car.")])
        .unwrap();
    assert_eq!(s, vec![2.0, 2.0]);
}
