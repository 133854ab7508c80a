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
    assert!(!e.is_invalid_input());
    // 1e300 is finite but beyond f32: named as such, quoted, not called infinite.
    let e = r.score(&[("a", "b"), ("c", "d")]).unwrap_err();
    assert!(
        matches!(&e, RewardError::OutOfRange { index: 1, value, .. } if value == "1e300"),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("score 1 is 1e300, outside the range of f32") && !msg.contains("inf"),
        "{msg}"
    );
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
    // Dies after one of three replies.
    let r = CommandReward::spawn_shell("read l; echo 1; read l; exit 4", SECOND).unwrap();
    let e = r.score(&[("a", "b"), ("c", "d"), ("e", "f")]).unwrap_err();
    assert!(matches!(e, RewardError::Failed { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("died before replying to pair 1 (id 1; 1 of 3 replies received)")
            && msg.contains("exit status: 4"),
        "{msg}"
    );
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
fn a_command_that_cannot_start_is_invalid_input() {
    let e = CommandReward::spawn(&["/nonexistent/tilt-reward".to_string()], SECOND).unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
    assert!(
        e.to_string()
            .contains("cannot start \"/nonexistent/tilt-reward\""),
        "{e}"
    );
    let e = CommandReward::spawn(&[], SECOND).unwrap_err();
    assert!(
        e.is_invalid_input() && e.to_string().contains("empty command"),
        "{e}"
    );
    // A shell command that does not exist: the shell exits 127 before any reply and says
    // so on stderr. The command never ran: the user's configuration, here and after.
    let r = CommandReward::spawn_shell("/nonexistent/tilt-reward-xyz", SECOND).unwrap();
    let e = r.score(&[("a", "b")]).unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("could not run the command")
            && msg.contains("127")
            && msg.contains("command not found")
            && msg.contains("tilt-reward-xyz"),
        "{msg}"
    );
    let again = r.score(&[("a", "b")]).unwrap_err();
    assert!(
        again.is_invalid_input() && again.to_string().contains("unusable"),
        "{again}"
    );
    // Not executable: 126.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("reward.sh");
    std::fs::write(&script, "echo 1\n").unwrap();
    let r = CommandReward::spawn_shell(&script.display().to_string(), SECOND).unwrap();
    let e = r.score(&[("a", "b")]).unwrap_err();
    assert!(
        e.is_invalid_input() && e.to_string().contains("not executable"),
        "{e}"
    );
    // A command that ran and answered, then exits 127 itself: a failure at run time.
    let r = CommandReward::spawn_shell("read l; echo 1; read l; exit 127", SECOND).unwrap();
    assert_eq!(r.score(&[("a", "b")]).unwrap(), vec![1.0]);
    let e = r.score(&[("a", "b")]).unwrap_err();
    assert!(
        !e.is_invalid_input() && e.to_string().contains("died"),
        "{e}"
    );
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
    print(json.dumps({"id": req["id"], "score": len(req["response"].split())}), flush=True)
'"#,
        SECOND,
    )
    .unwrap();
    let s = r
        .score(&[("Name a fruit.", "An apple."), ("Name a fruit.", "A car.")])
        .unwrap();
    assert_eq!(s, vec![2.0, 2.0]);
    assert_eq!(r.score(&[("Name a colour.", "Blue.")]).unwrap(), vec![1.0]);
}

/// Every request carries an id: 0, 1, 2, ... over the child's life. A child that echoes
/// them is checked.
#[test]
fn requests_carry_ids_that_an_echoing_child_is_checked_against() {
    let r = CommandReward::spawn_shell(
        r#"python3 -c '
import json, sys
for line in sys.stdin:
    req = json.loads(line)
    assert set(req) == {"id", "prompt", "response"}, req
    print(json.dumps({"id": req["id"], "score": req["id"]}), flush=True)
'"#,
        SECOND,
    )
    .unwrap();
    assert_eq!(
        r.score(&[("a", "b"), ("c", "d"), ("e", "f")]).unwrap(),
        vec![0.0, 1.0, 2.0]
    );
    assert_eq!(r.score(&[("a", "b"), ("c", "d")]).unwrap(), vec![3.0, 4.0]);
}

/// The hostile case: two lines per request. With ids echoed, the second line of the first
/// request is read as the reply to the second request and refused: no shifted scores.
#[test]
fn two_replies_to_one_request_with_ids_are_caught_at_once() {
    let r = CommandReward::spawn_shell(
        r#"python3 -c '
import json, sys
for line in sys.stdin:
    i = json.loads(line)["id"]
    print(json.dumps({"id": i, "score": 1.0}), flush=True)
    print(json.dumps({"id": i, "score": 2.0}), flush=True)
'"#,
        SECOND,
    )
    .unwrap();
    let e = r.score(&[("a", "b"), ("c", "d")]).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, RewardError::Failed { .. }), "{msg}");
    assert!(
        msg.contains("command:python3")
            && msg.contains("reply to pair 1 (id 1)")
            && msg.contains(r#"carries "id": 0"#)
            && msg.contains("out of step"),
        "{msg}"
    );
    assert!(!msg.contains("Ok(") && !msg.contains("Err("), "{msg}");
    let again = r.score(&[("a", "b")]).unwrap_err().to_string();
    assert!(
        again.contains("unusable") && again.contains("out of step"),
        "{again}"
    );
}

/// Two lines per request, bare numbers (no ids to check): the extra line is an error as
/// soon as it is seen, quoting it, and never Rust's Debug form (`Ok("0.5")`).
#[test]
fn an_extra_reply_line_without_ids_is_an_error_quoting_it() {
    // The second line comes a moment after the first, so the first batch is complete
    // before it arrives; it is found before the next batch is written.
    let r = CommandReward::spawn_shell(
        "while read l; do echo 0.5; sleep 0.2; echo 0.75; done",
        SECOND,
    )
    .unwrap();
    assert_eq!(r.score(&[("a", "b")]).unwrap(), vec![0.5]);
    std::thread::sleep(Duration::from_millis(600));
    let e = r.score(&[("a", "b")]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("command:while read l")
            && msg.contains("before this batch was written")
            && msg.contains(r#"no request was waiting for: "0.75""#),
        "{msg}"
    );
    assert!(!msg.contains("Ok(") && !msg.contains("Err("), "{msg}");

    // The extra line is already there when the batch's replies are read (the child writes
    // its three lines in one write, which the reader thread takes in one read and passes
    // on at once): found after the batch, and the batch's scores are not returned.
    let r = CommandReward::spawn_shell("read l; read l; printf '1\\n2\\n3\\n'; sleep 30", SECOND)
        .unwrap();
    let msg = match r.score(&[("a", "b"), ("c", "d")]) {
        Ok(s) => panic!("an extra line was missed: {s:?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("after its 2 replies to this batch") && msg.contains(r#""3""#),
        "{msg}"
    );
}

/// A child that prints a banner on stdout before its first reply: an error quoting the
/// banner (found before the batch is written, or read as the first reply).
#[test]
fn a_banner_on_stdout_is_an_error_quoting_it() {
    let r = CommandReward::spawn_shell(
        "echo 'loading model'; while read l; do echo 1; done",
        SECOND,
    )
    .unwrap();
    let msg = r.score(&[("a", "b")]).unwrap_err().to_string();
    assert!(msg.contains(r#""loading model""#), "{msg}");
}

#[test]
fn an_error_reply_with_an_id_is_reported() {
    let r = CommandReward::spawn_shell(
        r#"while read l; do echo '{"id": 0, "error": "GPU out of memory"}'; done"#,
        SECOND,
    )
    .unwrap();
    let e = r.score(&[("a", "b")]).unwrap_err();
    assert!(!e.is_invalid_input(), "{e}");
    assert!(
        e.to_string().contains(
            r#"reply to pair 0 (id 0): the command reported an error: "GPU out of memory""#
        ),
        "{e}"
    );
}

#[test]
fn an_endless_or_binary_reply_line_is_an_error_not_a_memory_hog() {
    // 2 MiB without a newline, then nothing: refused at the cap, not buffered to the end.
    let r = CommandReward::spawn_shell(
        "read l; head -c 2097152 /dev/zero | tr '\\0' x; sleep 30",
        SECOND,
    )
    .unwrap();
    let msg = r.score(&[("a", "b")]).unwrap_err().to_string();
    assert!(
        msg.contains("a line longer than 1048576 bytes") && msg.contains("xxxx"),
        "{msg}"
    );
    assert!(
        msg.len() < 1000,
        "the line is quoted in part: {} bytes",
        msg.len()
    );

    let r =
        CommandReward::spawn_shell("read l; printf '\\377\\376 1\\n'; sleep 30", SECOND).unwrap();
    let msg = r.score(&[("a", "b")]).unwrap_err().to_string();
    assert!(msg.contains("not UTF-8"), "{msg}");
}

#[test]
fn a_dying_childs_long_stderr_is_quoted_in_part() {
    let r = CommandReward::spawn_shell(
        "read l; head -c 100000 /dev/zero | tr '\\0' e >&2; echo >&2; echo 'last words' >&2; exit 1",
        SECOND,
    )
    .unwrap();
    let msg = r.score(&[("a", "b")]).unwrap_err().to_string();
    assert!(msg.contains("died") && msg.contains("last words"), "{msg}");
    assert!(msg.len() < 2000, "{} bytes", msg.len());
}
