//! What the end-to-end tests share: a private copy of the binary, and servers that stop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;

/// The `tilt` binary copied under this test's own name, so that a rebuild while a test runs
/// never meets "text file busy".
pub fn binary(name: &'static str) -> &'static Path {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::copy(env!("CARGO_BIN_EXE_tilt"), &path).unwrap();
        path
    })
}

/// A server started under `timeout`, stopped when dropped.
pub struct Server(pub Child);

impl Drop for Server {
    /// The child is `timeout`, which passes SIGTERM on to the server (a SIGKILL would leave
    /// the server running without it): TERM, a bounded wait, then KILL.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `binary serve --port 0 ARGS…` under `timeout 600`; once it says where it serves,
/// return it, its base URL (`http://HOST:PORT`) and that line. Its log keeps being drained so
/// that it never blocks on a full pipe.
pub fn tilt_serve(binary: &Path, args: &[&str]) -> (Server, String, String) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new("timeout")
        .arg("600")
        .arg(binary)
        .args(["serve", "--port", "0"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start tilt serve");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let (url, line) = loop {
        let line = lines
            .next()
            .expect("tilt serve ended before it served")
            .unwrap();
        if let Some(rest) = line.split(" on http://").nth(1) {
            break (
                format!("http://{}", rest.split_whitespace().next().unwrap()),
                line,
            );
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (Server(child), url, line)
}

/// Run `binary ARGS…` to the end.
pub fn run(binary: &Path, args: &[&str]) -> std::process::Output {
    Command::new(binary)
        .args(args)
        .output()
        .expect("run the tilt binary")
}

/// Each stdout line of `out` as JSON.
pub fn lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each stdout line is JSON"))
        .collect()
}

/// The stderr of `out`, as text.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
