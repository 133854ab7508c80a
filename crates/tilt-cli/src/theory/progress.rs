//! Progress of long theory runs on stderr: an indicatif bar when stderr is a terminal,
//! otherwise a plain line every [`LINE_EVERY`] once the run has lasted that long (no ANSI
//! codes in logs, and nothing at all for the runs that finish quickly).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a progress line is printed when stderr is not a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(5);

/// Progress over a known number of steps.
pub struct Progress {
    command: &'static str,
    unit: &'static str,
    phase: String,
    total: u64,
    done: u64,
    bar: Option<indicatif::ProgressBar>,
    start: Instant,
    last_line: Instant,
}

impl Progress {
    /// Progress of `command` (e.g. `theory frontier`) over `total` steps of `unit` (e.g.
    /// `points`).
    pub fn new(command: &'static str, total: u64, unit: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let style = indicatif::ProgressStyle::with_template(&format!(
                "tilt {command}: {{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit}, eta {{eta}}"
            ))
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            indicatif::ProgressBar::with_draw_target(
                Some(total),
                indicatif::ProgressDrawTarget::stderr(),
            )
            .with_style(style)
        });
        let now = Instant::now();
        Self {
            command,
            unit,
            phase: String::new(),
            total,
            done: 0,
            bar,
            start: now,
            last_line: now,
        }
    }

    /// Name what is being computed now (e.g. `tilt at each KL`), restarting the count.
    pub fn phase(&mut self, phase: &str, total: u64) {
        self.phase = phase.to_string();
        self.total = total;
        self.done = 0;
        if let Some(bar) = &self.bar {
            bar.set_message(phase.to_string());
            bar.set_length(total);
            bar.set_position(0);
        }
    }

    /// One more step done.
    pub fn inc(&mut self) {
        self.done += 1;
        match &self.bar {
            Some(bar) => bar.set_position(self.done),
            None if self.last_line.elapsed() >= LINE_EVERY => {
                self.last_line = Instant::now();
                let secs = self.start.elapsed().as_secs_f64();
                eprintln!(
                    "tilt {}: {}{}/{} {}, {secs:.0} s",
                    self.command,
                    if self.phase.is_empty() {
                        String::new()
                    } else {
                        format!("{}: ", self.phase)
                    },
                    self.done,
                    self.total,
                    self.unit
                );
            }
            None => {}
        }
    }

    /// Remove the bar (lines, if any, stay).
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
