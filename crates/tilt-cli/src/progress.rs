//! How the CLI shows the engine's progress: an indicatif bar per task on a terminal, a log
//! line every few seconds otherwise (never ANSI codes into a file or a pipe); notes as
//! `tilt: …` lines on stderr.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a progress line is printed when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

struct Task {
    total: u64,
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Instant,
}

/// The CLI's [`tilt_engine::Progress`].
pub struct CliProgress {
    tty: bool,
    tasks: Mutex<HashMap<String, Task>>,
}

impl CliProgress {
    /// Bars when stderr is a terminal, lines otherwise.
    pub fn new() -> Self {
        CliProgress {
            tty: std::io::stderr().is_terminal(),
            tasks: Mutex::new(HashMap::new()),
        }
    }

    fn is_bytes(task: &str) -> bool {
        task.contains("==")
    }
}

impl tilt_engine::Progress for CliProgress {
    fn begin(&self, task: &str, total: u64) {
        let bar = self.tty.then(|| {
            let template = if Self::is_bytes(task) {
                "tilt: {prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
            } else {
                "tilt: {prefix} [{bar:30}] {pos}/{len} {elapsed} (eta {eta})"
            };
            let style = ProgressStyle::with_template(template)
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                .with_style(style)
                .with_prefix(task.to_string())
        });
        let now = Instant::now();
        if let Ok(mut t) = self.tasks.lock() {
            t.insert(
                task.to_string(),
                Task {
                    total,
                    bar,
                    started: now,
                    last_line: now,
                },
            );
        }
    }

    fn advance(&self, task: &str, done: u64) {
        let Ok(mut tasks) = self.tasks.lock() else {
            return;
        };
        let Some(t) = tasks.get_mut(task) else {
            return;
        };
        match &t.bar {
            Some(bar) => bar.set_position(done.min(t.total)),
            None if t.last_line.elapsed() >= LINE_EVERY => {
                t.last_line = Instant::now();
                let secs = t.started.elapsed().as_secs_f64();
                if Self::is_bytes(task) {
                    eprintln!(
                        "tilt: {task}: {:.1} of {:.1} MB downloaded",
                        done as f64 / 1e6,
                        t.total as f64 / 1e6
                    );
                } else {
                    eprintln!("tilt: {task}: {done}/{} done in {secs:.0} s", t.total);
                }
            }
            None => {}
        }
    }

    fn end(&self, task: &str) {
        if let Ok(mut tasks) = self.tasks.lock() {
            if let Some(Task { bar: Some(bar), .. }) = tasks.remove(task) {
                bar.finish_and_clear();
            }
        }
    }

    fn note(&self, message: &str) {
        let line = format!("tilt: {message}");
        let tasks = self.tasks.lock().ok();
        match tasks
            .as_ref()
            .and_then(|t| t.values().find_map(|t| t.bar.as_ref()))
        {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}
