//! A reward computed by an external program: a long-lived child speaking JSON lines.
//!
//! The child is spawned once and kept for the reward's lifetime, so a reward that loads a
//! large model pays its start-up once. The protocol (also in this crate's README):
//!
//! - tilt writes one request per (prompt, response) pair, one JSON object per line, on the
//!   child's stdin: `{"prompt": "...", "response": "..."}` (UTF-8; newlines inside strings
//!   are escaped by JSON, so a line is always one request);
//! - the child writes one reply line per request on its stdout, in order: `{"score": 1.5}`
//!   or a bare number `1.5`; `{"error": "message"}` reports a failure, which tilt raises.
//! - A batch's requests are all written before its replies are read (a reader thread
//!   drains stdout meanwhile, so a child that answers at once cannot deadlock on a full
//!   pipe). Requests are written from a thread too: a child that stops reading its stdin
//!   cannot block tilt. Each request must be taken, and each reply must come, within the
//!   timeout (default 60 s) of the previous one.
//! - At the end tilt closes stdin; the child should exit on EOF (it is killed after 2 s).
//!
//! Whatever goes wrong names the reward and the command: the child exited (its status and
//! last stderr lines), a reply that is neither JSON nor a number, a non-finite score
//! (`NaN`, `Infinity`, bare or as `{"score": NaN}`), a timeout. After a timeout or a
//! malformed reply the stream is out of step, so the child is killed and every later call
//! fails at once with the first error; after a non-finite score it is in step and the
//! child is kept.

use crate::{check_scores, json, Reward, RewardError};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many of the child's last stderr lines an error quotes.
const STDERR_LINES: usize = 10;

/// Default time allowed for each reply.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Receiver<std::io::Result<String>>,
}

enum State {
    Running(Running),
    /// Broken by an earlier failure; the message says which.
    Broken(String),
}

/// A reward computed by an external command (protocol in the [module docs](self)).
pub struct CommandReward {
    display: String,
    timeout: Duration,
    state: Mutex<State>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl std::fmt::Debug for CommandReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandReward")
            .field("command", &self.display)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl CommandReward {
    /// Spawn `sh -c CMD` (on Windows `cmd /C CMD`).
    ///
    /// # Errors
    /// [`RewardError::Failed`] if the shell cannot be started.
    pub fn spawn_shell(cmd: &str, timeout: Duration) -> Result<Self, RewardError> {
        let argv: Vec<String> = if cfg!(windows) {
            vec!["cmd".into(), "/C".into(), cmd.into()]
        } else {
            vec!["sh".into(), "-c".into(), cmd.into()]
        };
        Self::spawn_with_display(&argv, cmd.to_string(), timeout)
    }

    /// Spawn a program with arguments, without a shell.
    ///
    /// # Errors
    /// [`RewardError::Failed`] if `argv` is empty or the program cannot be started.
    pub fn spawn(argv: &[String], timeout: Duration) -> Result<Self, RewardError> {
        Self::spawn_with_display(argv, argv.join(" "), timeout)
    }

    fn spawn_with_display(
        argv: &[String],
        display: String,
        timeout: Duration,
    ) -> Result<Self, RewardError> {
        let fail = |m: String| RewardError::Failed {
            reward: format!("command:{display}"),
            message: m,
        };
        let Some((program, args)) = argv.split_first() else {
            return Err(fail("empty command".into()));
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot start {program:?}: {e}")))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| fail("no stdout pipe".into()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| fail("no stderr pipe".into()))?;
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let stop = line.is_err();
                if tx.send(line).is_err() || stop {
                    break;
                }
            }
        });
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = Arc::clone(&stderr_tail);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == STDERR_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        let shown = display.clone();
        tracing::debug!(command = %shown, "spawned reward command");
        Ok(Self {
            display,
            timeout,
            state: Mutex::new(State::Running(Running {
                child,
                stdin,
                replies,
            })),
            stderr_tail,
        })
    }

    /// The time allowed for each reply.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn stderr_tail(&self) -> String {
        // Give the stderr thread a moment to collect a dying child's last words.
        std::thread::sleep(Duration::from_millis(50));
        let t = self.stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
        if t.is_empty() {
            "(nothing on stderr)".to_string()
        } else {
            t.iter().cloned().collect::<Vec<_>>().join(" | ")
        }
    }

    fn died(&self, run: &mut Running, when: &str) -> String {
        let status = match run.child.try_wait() {
            Ok(Some(s)) => s.to_string(),
            _ => {
                std::thread::sleep(Duration::from_millis(100));
                match run.child.try_wait() {
                    Ok(Some(s)) => s.to_string(),
                    _ => "closed its stdout".to_string(),
                }
            }
        };
        format!(
            "the child process died {when} ({status}); its last stderr: {}",
            self.stderr_tail()
        )
    }

    /// Write the request lines from a thread, so that a child that stops reading its stdin
    /// (once the pipe's buffer, ~64 KiB, is full) cannot block tilt: each line must be
    /// taken within the timeout of the previous one, or the child is reported (and then
    /// killed by the caller). A write that fails means the child closed its stdin: died.
    fn write_requests(&self, run: &mut Running, lines: Vec<String>) -> Result<(), String> {
        enum Written {
            Line,
            Done(ChildStdin),
            Failed,
        }
        let Some(mut stdin) = run.stdin.take() else {
            return Err("stdin is closed".into());
        };
        let (total, bytes) = (lines.len(), lines.iter().map(String::len).sum::<usize>());
        let (tx, written) = mpsc::channel();
        // If the child never reads, this thread stays blocked until the child is killed
        // (its stdin pipe then breaks) and ends on its own.
        std::thread::spawn(move || {
            for line in &lines {
                if stdin.write_all(line.as_bytes()).is_err() {
                    let _ = tx.send(Written::Failed);
                    return;
                }
                let _ = tx.send(Written::Line);
            }
            let _ = tx.send(match stdin.flush() {
                Ok(()) => Written::Done(stdin),
                Err(_) => Written::Failed,
            });
        });
        let mut done = 0usize;
        loop {
            match written.recv_timeout(self.timeout) {
                Ok(Written::Line) => done += 1,
                Ok(Written::Done(stdin)) => {
                    run.stdin = Some(stdin);
                    return Ok(());
                }
                Ok(Written::Failed) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.died(run, "before reading its requests"))
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "the child stopped reading its stdin: {done} of {total} requests \
                         ({bytes} bytes) written, nothing more taken within {:.3} s (timeout); \
                         the child was stopped",
                        self.timeout.as_secs_f64()
                    ))
                }
            }
        }
    }

    fn score_running(&self, run: &mut Running, pairs: &[(&str, &str)]) -> Result<Vec<f32>, String> {
        // Drop replies left over from nothing: there should be none.
        if let Ok(extra) = run.replies.try_recv() {
            return Err(format!("the child wrote an unrequested line: {extra:?}"));
        }
        let lines: Vec<String> = pairs
            .iter()
            .map(|(prompt, response)| {
                let mut line =
                    serde_json::json!({ "prompt": prompt, "response": response }).to_string();
                line.push('\n');
                line
            })
            .collect();
        self.write_requests(run, lines)?;
        let mut scores = Vec::with_capacity(pairs.len());
        for i in 0..pairs.len() {
            let line = match run.replies.recv_timeout(self.timeout) {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => return Err(format!("cannot read the child's stdout: {e}")),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no reply to pair {i} within {:.3} s (timeout); the child was stopped",
                        self.timeout.as_secs_f64()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.died(run, &format!("before replying to pair {i}")))
                }
            };
            scores.push(parse_reply(&line).map_err(|m| format!("reply to pair {i}: {m}"))?);
        }
        Ok(scores)
    }
}

/// Parse one reply line: `{"score": x}`, a bare number, or `{"error": "..."}`.
/// Non-finite values come back as non-finite numbers so that [`check_scores`] names them
/// (the stream is still in step): Python's `json.dumps` spellings `NaN`, `Infinity`,
/// `-Infinity` anywhere a value may stand ([`json::parse`]), and for a bare line also
/// what Python's `print` writes (`nan`, `inf`, `-inf`, any case).
fn parse_reply(line: &str) -> Result<f32, String> {
    let t = line.trim();
    match t
        .trim_start_matches(['-', '+'])
        .to_ascii_lowercase()
        .as_str()
    {
        "nan" => return Ok(f32::NAN),
        "infinity" | "inf" => {
            return Ok(if t.starts_with('-') {
                f32::NEG_INFINITY
            } else {
                f32::INFINITY
            })
        }
        _ => {}
    }
    let value = json::parse(t).map_err(|e| format!("malformed reply {t:?}: {e}"))?;
    match &value {
        serde_json::Value::Object(map) => {
            if let Some(err) = map.get("error") {
                return Err(format!("the command reported an error: {err}"));
            }
            match map.get("score") {
                Some(v) => json::score(v).map_err(|m| format!("\"score\" is {m}")),
                None => Err(format!("malformed reply {t:?}: no \"score\" field")),
            }
        }
        serde_json::Value::Array(_) | serde_json::Value::Bool(_) | serde_json::Value::Null => Err(
            format!("malformed reply {t:?}: expected a number or an object, got {value}"),
        ),
        // A number, or a bare non-finite literal.
        v => json::score(v).map_err(|m| format!("malformed reply {t:?}: {m}")),
    }
}

impl Reward for CommandReward {
    fn name(&self) -> String {
        format!("command:{}", self.display)
    }

    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        let name = self.name();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let result = match &mut *state {
            State::Broken(first) => {
                return Err(RewardError::Failed {
                    reward: name,
                    message: format!("unusable after an earlier failure: {first}"),
                })
            }
            State::Running(run) => self.score_running(run, pairs),
        };
        match result {
            Ok(scores) => {
                let checked = check_scores(&name, pairs.len(), scores);
                if let Err(e) = &checked {
                    // A non-finite score is the child's answer, the stream is still in step.
                    tracing::debug!(error = %e, "command reward returned a bad score");
                }
                checked
            }
            Err(message) => {
                if let State::Running(run) = &mut *state {
                    let _ = run.child.kill();
                    let _ = run.child.wait();
                }
                *state = State::Broken(message.clone());
                Err(RewardError::Failed {
                    reward: name,
                    message,
                })
            }
        }
    }
}

impl Drop for CommandReward {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let State::Running(run) = state {
            run.stdin.take(); // EOF: the child should exit
            for _ in 0..40 {
                if let Ok(Some(_)) = run.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = run.child.kill();
            let _ = run.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_reply;

    #[test]
    fn replies_parse() {
        assert_eq!(parse_reply("1.5").unwrap(), 1.5);
        assert_eq!(parse_reply(" {\"score\": -2} \r").unwrap(), -2.0);
        assert!(parse_reply("NaN").unwrap().is_nan());
        assert_eq!(parse_reply("-Infinity").unwrap(), f32::NEG_INFINITY);
        assert_eq!(parse_reply("1e300").unwrap(), f32::INFINITY);
        assert_eq!(parse_reply("-inf").unwrap(), f32::NEG_INFINITY);
        // What Python's json.dumps writes for non-finite floats.
        assert!(parse_reply("{\"score\": NaN}").unwrap().is_nan());
        assert_eq!(
            parse_reply("{\"score\": -Infinity}").unwrap(),
            f32::NEG_INFINITY
        );
        assert!(parse_reply("{\"scor\": 1}")
            .unwrap_err()
            .contains("no \"score\""));
        assert!(parse_reply("hello").unwrap_err().contains("malformed"));
        assert!(parse_reply("{\"score\": \"1\"}")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_reply("{\"error\": \"boom\"}")
            .unwrap_err()
            .contains("boom"));
        assert!(parse_reply("[1]")
            .unwrap_err()
            .contains("expected a number"));
    }
}
