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
