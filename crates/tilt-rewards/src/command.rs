//! A reward computed by an external program: a long-lived child speaking JSON lines.
//!
//! The child is spawned once and kept for the reward's lifetime, so a reward that loads a
//! large model pays its start-up once. The protocol (also in this crate's README):
//!
//! - tilt writes one request per (prompt, response) pair, one JSON object per line, on the
//!   child's stdin: `{"id": 0, "prompt": "...", "response": "..."}` (UTF-8; newlines
//!   inside strings are escaped by JSON, so a line is always one request). `id` numbers
//!   the requests 0, 1, 2, … over the child's whole life, in the order they are written.
//! - the child writes one reply line per request on its stdout, in order:
//!   `{"id": 0, "score": 1.5}`, or `{"score": 1.5}`, or a bare number `1.5`;
//!   `{"id": 0, "error": "message"}` (or without `id`) reports a failure, which tilt
//!   raises. A reply that carries `"id"` must carry the id of the request it answers: a
//!   child that echoes the ids makes every misalignment (a reply lost, doubled or out of
//!   order) an error at the first reply concerned. Replies without `id` are matched by
//!   order alone.
//! - A line that arrives when no request is waiting for its reply (a second line for one
//!   request, a log line on stdout) is an error quoting that line; tilt looks for one after
//!   each batch's replies (a line that arrived with the batch's last reply is always seen
//!   then, and the batch's scores are not returned) and before writing the next batch.
//!   Without ids, a line that comes later than the batch's last reply is caught by the
//!   next batch: echo the ids to be safe from the first wrong reply on.
//! - A batch's requests are all written before its replies are read (a reader thread
//!   drains stdout meanwhile, so a child that answers at once cannot deadlock on a full
//!   pipe). Requests are written from a thread too: a child that stops reading its stdin
//!   cannot block tilt. Each request must be taken, and each reply must come, within the
//!   timeout (default 60 s) of the previous one. A reply line may be at most
//!   [`MAX_REPLY_BYTES`] long.
//! - At the end tilt closes stdin; the child should exit on EOF (it is killed after 2 s).
//!
//! Whatever goes wrong names the reward and the command. At setup: a program that cannot
//! be started, or (through `sh -c`) a shell that exits with status 127 or 126 (command not
//! found, not executable) before any reply: [`RewardError::Invalid`]. While it runs
//! ([`RewardError::Failed`]): the child exited (its status and last stderr lines), a reply
//! that is neither JSON nor a number, a wrong `id`, an extra line, a timeout. After any of
//! these the stream is out of step, so the child is killed and every later call fails at
//! once with the first error. A non-finite score (`NaN`, `Infinity`, bare or as
//! `{"score": NaN}`: [`RewardError::NonFinite`]) or one beyond `f32`'s range (`1e300`:
//! [`RewardError::OutOfRange`]) is the child's answer, in step: the child is kept.

use crate::json::{self, Sent};
use crate::{quote, quote_excerpt, Reward, RewardError};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many of the child's last stderr lines an error quotes.
const STDERR_LINES: usize = 10;
/// At most this many characters of each stderr line are kept.
const STDERR_LINE_CHARS: usize = 300;
/// At most this many characters of a reply are quoted in an error.
const QUOTED_REPLY: usize = 200;

/// The longest reply line accepted, in bytes (a reply is a number or a small object; a
/// longer line is an error, not a memory hog).
pub const MAX_REPLY_BYTES: usize = 1 << 20;

/// Default time allowed for each reply.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A line from the child's stdout, or why none could be read (the reader then stops).
type ReplyLine = Result<String, String>;

/// The child's stdout as the reader thread passes it on: the lines of one read at a time,
/// so that lines that arrived together are seen together.
struct Replies {
    rx: Receiver<Vec<ReplyLine>>,
    /// Lines received but not yet taken.
    pending: VecDeque<ReplyLine>,
}

impl Replies {
    /// The next line, waiting at most `timeout` for it.
    fn next(&mut self, timeout: Duration) -> Result<ReplyLine, RecvTimeoutError> {
        if self.pending.is_empty() {
            self.pending.extend(self.rx.recv_timeout(timeout)?);
        }
        self.pending.pop_front().ok_or(RecvTimeoutError::Timeout)
    }

    /// The next line if one has arrived, without waiting.
    fn try_next(&mut self) -> Result<ReplyLine, TryRecvError> {
        if self.pending.is_empty() {
            self.pending.extend(self.rx.try_recv()?);
        }
        self.pending.pop_front().ok_or(TryRecvError::Empty)
    }
}

struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Replies,
    /// The id of the next request.
    next_id: u64,
    /// Replies read so far, over the child's life.
    replied: u64,
}

enum State {
    Running(Running),
    /// Broken by an earlier failure.
    Broken(Failure),
}

/// Why a batch failed, and whether that is the user's configuration.
#[derive(Clone)]
struct Failure {
    message: String,
    invalid: bool,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self {
            message,
            invalid: false,
        }
    }
}

/// A reward computed by an external command (protocol in the [module docs](self)).
pub struct CommandReward {
    display: String,
    /// Run through `sh -c` (exit statuses 126 and 127 are then the shell's).
    shell: bool,
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
    /// [`RewardError::Invalid`] if the shell cannot be started.
    pub fn spawn_shell(cmd: &str, timeout: Duration) -> Result<Self, RewardError> {
        let argv: Vec<String> = if cfg!(windows) {
            vec!["cmd".into(), "/C".into(), cmd.into()]
        } else {
            vec!["sh".into(), "-c".into(), cmd.into()]
        };
        Self::spawn_with_display(&argv, cmd.to_string(), !cfg!(windows), timeout)
    }

    /// Spawn a program with arguments, without a shell.
    ///
    /// # Errors
    /// [`RewardError::Invalid`] if `argv` is empty or the program cannot be started (not
    /// found, not executable); [`RewardError::Failed`] if the system refuses a new process.
    pub fn spawn(argv: &[String], timeout: Duration) -> Result<Self, RewardError> {
        Self::spawn_with_display(argv, argv.join(" "), false, timeout)
    }

    fn spawn_with_display(
        argv: &[String],
        display: String,
        shell: bool,
        timeout: Duration,
    ) -> Result<Self, RewardError> {
        let reward = format!("command:{display}");
        let invalid = |message: String| RewardError::Invalid {
            reward: reward.clone(),
            message,
        };
        let failed = |message: String| RewardError::Failed {
            reward: reward.clone(),
            message,
        };
        let Some((program, args)) = argv.split_first() else {
            return Err(invalid("empty command".into()));
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                let message = format!("cannot start {}: {e}", quote(program));
                match e.kind() {
                    std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::InvalidInput => invalid(message),
                    _ => failed(message),
                }
            })?;
        let stdin = child.stdin.take();
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed("the child has no stdout or stderr pipe".into()));
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || read_replies(stdout, &tx));
        let replies = Replies {
            rx,
            pending: VecDeque::new(),
        };
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = Arc::clone(&stderr_tail);
        std::thread::spawn(move || keep_stderr_tail(stderr, &tail));
        let shown = display.clone();
        tracing::debug!(command = %shown, "spawned reward command");
        Ok(Self {
            display,
            shell,
            timeout,
            state: Mutex::new(State::Running(Running {
                child,
                stdin,
                replies,
                next_id: 0,
                replied: 0,
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

    /// The child is gone (`when`: at which point). With a shell, exit status 127 (command
    /// not found) or 126 (not executable) before any reply means the command never ran:
    /// the user's configuration.
    fn died(&self, run: &mut Running, when: &str) -> Failure {
        let status = match run.child.try_wait() {
            Ok(Some(s)) => Some(s),
            _ => {
                std::thread::sleep(Duration::from_millis(100));
                run.child.try_wait().ok().flatten()
            }
        };
        let code = status.and_then(|s| s.code());
        let status = status.map_or_else(|| "closed its stdout".to_string(), |s| s.to_string());
        let stderr = self.stderr_tail();
        if self.shell && run.replied == 0 && matches!(code, Some(126 | 127)) {
            let why = if code == Some(127) {
                "command not found"
            } else {
                "not executable"
            };
            return Failure {
                message: format!(
                    "the shell could not run the command ({status}, {why}); its last stderr: \
                     {stderr}"
                ),
                invalid: true,
            };
        }
        format!("the child process died {when} ({status}); its last stderr: {stderr}").into()
    }

    /// Write the request lines from a thread, so that a child that stops reading its stdin
    /// (once the pipe's buffer, ~64 KiB, is full) cannot block tilt: each line must be
    /// taken within the timeout of the previous one, or the child is reported (and then
    /// killed by the caller). A write that fails means the child closed its stdin: died.
    fn write_requests(&self, run: &mut Running, lines: Vec<String>) -> Result<(), Failure> {
        enum Written {
            Line,
            Done(ChildStdin),
            Failed,
        }
        let Some(mut stdin) = run.stdin.take() else {
            return Err(String::from("stdin is closed").into());
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
                    )
                    .into())
                }
            }
        }
    }

    /// A line the child wrote with no request waiting for it, if one has arrived.
    fn extra_line(&self, run: &mut Running, after: &str) -> Result<(), Failure> {
        match run.replies.try_next() {
            Err(TryRecvError::Empty) => Ok(()),
            Ok(Ok(line)) => Err(format!(
                "{after}, the child wrote a line no request was waiting for: {} (write one \
                 reply line per request on stdout, and logs on stderr)",
                quote_excerpt(&line, QUOTED_REPLY)
            )
            .into()),
            Ok(Err(why)) => Err(why.into()),
            Err(TryRecvError::Disconnected) => Err(self.died(run, after)),
        }
    }

    fn score_running(
        &self,
        run: &mut Running,
        pairs: &[(&str, &str)],
    ) -> Result<Vec<Sent>, Failure> {
        self.extra_line(run, "before this batch was written")?;
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let first_id = run.next_id;
        let lines: Vec<String> = pairs
            .iter()
            .enumerate()
            .map(|(i, (prompt, response))| {
                let mut line = serde_json::json!({
                    "id": first_id + i as u64,
                    "prompt": prompt,
                    "response": response,
                })
                .to_string();
                line.push('\n');
                line
            })
            .collect();
        run.next_id += pairs.len() as u64;
        self.write_requests(run, lines)?;
        let mut scores = Vec::with_capacity(pairs.len());
        for i in 0..pairs.len() {
            let id = first_id + i as u64;
            let line = match run.replies.next(self.timeout) {
                Ok(Ok(line)) => line,
                Ok(Err(why)) => return Err(format!("reply to pair {i} (id {id}): {why}").into()),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no reply to pair {i} (id {id}; {i} of {} replies received) within \
                         {:.3} s (timeout); the child was stopped",
                        pairs.len(),
                        self.timeout.as_secs_f64()
                    )
                    .into())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.died(
                        run,
                        &format!(
                            "before replying to pair {i} (id {id}; {i} of {} replies received)",
                            pairs.len()
                        ),
                    ))
                }
            };
            run.replied += 1;
            scores.push(
                parse_reply(&line, id).map_err(|m| format!("reply to pair {i} (id {id}): {m}"))?,
            );
        }
        self.extra_line(
            run,
            &format!("after its {} replies to this batch", pairs.len()),
        )?;
        Ok(scores)
    }
}

/// Read the child's stdout into `tx`, the complete lines of each read together: each line
/// without its `\n` (or `\r\n`), or why reading stopped (a line that is not UTF-8 or longer
/// than [`MAX_REPLY_BYTES`], a read error). Ends at EOF (a last line without `\n` counts).
fn read_replies(stdout: impl Read, tx: &mpsc::Sender<Vec<ReplyLine>>) {
    let mut reader = BufReader::with_capacity(64 << 10, stdout);
    // The start of a line whose end has not arrived yet.
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let chunk = match reader.fill_buf() {
            Ok([]) => {
                if !partial.is_empty() {
                    let _ = tx.send(vec![finish_line(partial)]);
                }
                return;
            }
            Ok(chunk) => chunk,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(vec![Err(format!("cannot read the child's stdout: {e}"))]);
                return;
            }
        };
        let mut lines = Vec::new();
        let mut consumed = 0;
        for piece in chunk.split_inclusive(|&b| b == b'\n') {
            consumed += piece.len();
            let (body, ended) = match piece.strip_suffix(b"\n") {
                Some(body) => (body, true),
                None => (piece, false),
            };
            partial.extend_from_slice(body);
            if partial.len() > MAX_REPLY_BYTES {
                lines.push(Err(format!(
                    "the child wrote a line longer than {MAX_REPLY_BYTES} bytes, starting {}",
                    quote_excerpt(&String::from_utf8_lossy(&partial[..200]), QUOTED_REPLY)
                )));
                break;
            }
            if ended {
                lines.push(finish_line(std::mem::take(&mut partial)));
                if lines.last().is_some_and(Result::is_err) {
                    break;
                }
            }
        }
        reader.consume(consumed);
        let stop = lines.last().is_some_and(Result::is_err);
        if (!lines.is_empty() && tx.send(lines).is_err()) || stop {
            return;
        }
    }
}

/// A complete line's bytes (without `\n`) as text, without a trailing `\r`.
fn finish_line(mut bytes: Vec<u8>) -> ReplyLine {
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "the child wrote a line that is not UTF-8: {}",
            quote_excerpt(&String::from_utf8_lossy(e.as_bytes()), QUOTED_REPLY)
        )
    })
}

/// Keep the child's last [`STDERR_LINES`] stderr lines (each cut at
/// [`STDERR_LINE_CHARS`]; bytes that are not UTF-8 replaced), in bounded memory whatever
/// the child writes.
fn keep_stderr_tail(stderr: impl Read, tail: &Mutex<VecDeque<String>>) {
    let mut reader = BufReader::new(stderr);
    // Whether the next piece continues a line already cut.
    let mut continuing = false;
    loop {
        let mut buf = Vec::new();
        match (&mut reader)
            .take(4 * STDERR_LINE_CHARS as u64)
            .read_until(b'\n', &mut buf)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let ended = buf.last() == Some(&b'\n');
        let was_continuing = std::mem::replace(&mut continuing, !ended);
        if was_continuing {
            continue; // the rest of a long line: dropped
        }
        let text = String::from_utf8_lossy(&buf);
        let text = text.trim_end_matches(['\n', '\r']);
        let line = match text.char_indices().nth(STDERR_LINE_CHARS) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None if !ended => format!("{text}…"),
            None => text.to_string(),
        };
        let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() == STDERR_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }
}

/// Parse one reply line to the request with id `id`: `{"id": id, "score": x}` (the `id`
/// optional), a bare number, or `{"id": id, "error": "..."}`. Non-finite and out-of-range
/// values come back as they were sent, for [`json::check_sent`] to name (the stream is
/// still in step): Python's `json.dumps` spellings `NaN`, `Infinity`, `-Infinity` anywhere
/// a value may stand ([`json::parse`]), and for a bare line also what Python's `print`
/// writes (`nan`, `inf`, `-inf`, any case).
fn parse_reply(line: &str, id: u64) -> Result<Sent, String> {
    let t = line.trim();
    let shown = || quote_excerpt(t, QUOTED_REPLY);
    match t
        .trim_start_matches(['-', '+'])
        .to_ascii_lowercase()
        .as_str()
    {
        "nan" => return Ok(Sent::NonFinite(f32::NAN)),
        "infinity" | "inf" => {
            return Ok(Sent::NonFinite(if t.starts_with('-') {
                f32::NEG_INFINITY
            } else {
                f32::INFINITY
            }))
        }
        _ => {}
    }
    if t.is_empty() {
        return Err("an empty line (expected a number or a JSON object)".into());
    }
    let value = json::parse(t).map_err(|e| {
        format!(
            "malformed reply {}: {e} (a reply is a number or a JSON object on one line; logs \
             go to stderr)",
            shown()
        )
    })?;
    match &value {
        serde_json::Value::Object(map) => {
            if let Some(got) = map.get("id") {
                if got.as_u64() != Some(id) {
                    return Err(format!(
                        "the reply {} carries \"id\": {}, but it answers the request with id \
                         {id}: the replies are out of step with the requests (a reply missing, \
                         doubled or out of order)",
                        shown(),
                        json::shown(got)
                    ));
                }
            }
            if let Some(err) = map.get("error") {
                let said = match err {
                    serde_json::Value::String(s) => quote_excerpt(s, QUOTED_REPLY),
                    other => json::shown(other),
                };
                return Err(format!("the command reported an error: {said}"));
            }
            match map.get("score") {
                Some(v) => json::sent(v).map_err(|m| format!("\"score\" is {m}")),
                None => Err(format!("malformed reply {}: no \"score\" field", shown())),
            }
        }
        serde_json::Value::Array(_)
        | serde_json::Value::Bool(_)
        | serde_json::Value::Null
        | serde_json::Value::String(_)
            if json::sent(&value).is_err() =>
        {
            Err(format!(
                "malformed reply {}: expected a number or an object",
                shown()
            ))
        }
        // A number, or a bare non-finite or huge literal.
        v => json::sent(v).map_err(|m| format!("malformed reply {}: {m}", shown())),
    }
}

impl Reward for CommandReward {
    fn name(&self) -> String {
        format!("command:{}", self.display)
    }

    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        let name = self.name();
        let error = |f: Failure| {
            if f.invalid {
                RewardError::Invalid {
                    reward: name.clone(),
                    message: f.message,
                }
            } else {
                RewardError::Failed {
                    reward: name.clone(),
                    message: f.message,
                }
            }
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let result = match &mut *state {
            State::Broken(first) => {
                return Err(error(Failure {
                    message: format!("unusable after an earlier failure: {}", first.message),
                    invalid: first.invalid,
                }))
            }
            State::Running(run) => self.score_running(run, pairs),
        };
        match result {
            Ok(scores) => {
                let checked = json::check_sent(&name, pairs.len(), scores);
                if let Err(e) = &checked {
                    // A non-finite or huge score is the child's answer: still in step.
                    tracing::debug!(error = %e, "command reward returned a bad score");
                }
                checked
            }
            Err(failure) => {
                if let State::Running(run) = &mut *state {
                    let _ = run.child.kill();
                    let _ = run.child.wait();
                }
                *state = State::Broken(failure.clone());
                Err(error(failure))
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
    use super::{parse_reply, Sent};

    fn score(line: &str) -> f64 {
        match parse_reply(line, 0).unwrap() {
            Sent::Number(x) => x,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn replies_parse() {
        assert_eq!(score("1.5"), 1.5);
        assert_eq!(score(" {\"score\": -2} \r"), -2.0);
        assert_eq!(score("{\"id\": 0, \"score\": 3}"), 3.0);
        assert!(matches!(parse_reply("NaN", 0).unwrap(), Sent::NonFinite(x) if x.is_nan()));
        assert_eq!(
            parse_reply("-Infinity", 0).unwrap(),
            Sent::NonFinite(f32::NEG_INFINITY)
        );
        assert_eq!(
            parse_reply("-inf", 0).unwrap(),
            Sent::NonFinite(f32::NEG_INFINITY)
        );
        // Huge is huge, not infinite.
        assert_eq!(parse_reply("1e300", 0).unwrap(), Sent::Number(1e300));
        assert_eq!(parse_reply("1e400", 0).unwrap(), Sent::Huge("1e400".into()));
        assert_eq!(
            parse_reply("{\"score\": -1e400}", 0).unwrap(),
            Sent::Huge("-1e400".into())
        );
        // What Python's json.dumps writes for non-finite floats.
        assert!(matches!(
            parse_reply("{\"score\": NaN}", 0).unwrap(),
            Sent::NonFinite(x) if x.is_nan()
        ));
        assert_eq!(
            parse_reply("{\"score\": -Infinity}", 0).unwrap(),
            Sent::NonFinite(f32::NEG_INFINITY)
        );
    }

    #[test]
    fn bad_replies_say_what_they_are_in_json_not_rust() {
        let err = |line: &str| parse_reply(line, 7).unwrap_err();
        assert_eq!(
            err("{\"scor\": 1}"),
            "malformed reply \"{\\\"scor\\\": 1}\": no \"score\" field"
        );
        assert!(
            err("hello").starts_with("malformed reply \"hello\": "),
            "{}",
            err("hello")
        );
        assert_eq!(
            err("{\"score\": \"1\"}"),
            "\"score\" is \"1\", not a number"
        );
        assert_eq!(err("{\"score\": null}"), "\"score\" is null, not a number");
        assert_eq!(
            err("{\"score\": [NaN]}"),
            "\"score\" is [NaN], not a number"
        );
        assert_eq!(
            err("{\"error\": \"boom\"}"),
            "the command reported an error: \"boom\""
        );
        assert_eq!(
            err("{\"error\": {\"code\": 5}}"),
            "the command reported an error: {\"code\":5}"
        );
        for line in ["[1]", "true", "null", "\"0.5\""] {
            assert!(
                err(line).contains("expected a number or an object"),
                "{line}: {}",
                err(line)
            );
        }
        assert!(err("").contains("empty line"), "{}", err(""));
        // A wrong id, or one that is not the request's integer.
        for (line, shown) in [
            ("{\"id\": 6, \"score\": 1}", "\"id\": 6,"),
            ("{\"id\": \"7\", \"score\": 1}", "\"id\": \"7\","),
            ("{\"id\": 7.5, \"score\": 1}", "\"id\": 7.5,"),
            ("{\"id\": 8, \"error\": \"x\"}", "\"id\": 8,"),
        ] {
            let e = err(line);
            assert!(
                e.contains(shown)
                    && e.contains("answers the request with id 7")
                    && e.contains("out of step"),
                "{line}: {e}"
            );
        }
        assert_eq!(
            parse_reply("{\"id\": 7, \"score\": 1}", 7).unwrap(),
            Sent::Number(1.0)
        );
        // A long reply is quoted in part.
        let long = format!("{{\"note\": \"{}\"}}", "x".repeat(5000));
        let e = err(&long);
        assert!(e.contains("bytes in all") && e.len() < 600, "{e}");
    }
}
