//! `tilt reproduce MANIFEST`: re-run a recorded `generate`, `eval` or `train-scorer` and say
//! whether its output is byte-identical and its input (and output) files the same, or
//! exactly which line and field differ and which file changed.
//!
//! Output: one JSON object on stdout (`reproduced`, `identical`, both sha256s, `inputs`,
//! `outputs`, `differences`, `largest_relative_difference` when every difference is a
//! number), or a table; the verdict, with every changed file, on stderr.
//! Exit code 0 when reproduced, 1 when the output or any file differs, 2 when the manifest
//! itself is unreadable.

use crate::args::cli_error;
use crate::progress::CliProgress;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use tilt_engine::manifest::{Manifest, GIT_COMMIT};
use tilt_engine::run::replay;
use tilt_output::{emit, Format};

/// Flags of `tilt reproduce`.
#[derive(Debug, Clone, Args)]
pub struct ReproduceArgs {
    /// The manifest written by `generate --manifest`, `eval` or `train-scorer --manifest`.
    pub manifest: PathBuf,
    /// Re-run with this many threads instead of the recorded setting (the output must not
    /// change).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

/// At most this many differences are printed (the count is always given).
const MAX_SHOWN: usize = 200;

/// Run `tilt reproduce`.
pub fn run(args: ReproduceArgs) -> anyhow::Result<()> {
    let manifest = Manifest::read(&args.manifest).map_err(|e| cli_error(e, &[]))?;
    let progress = CliProgress::new();
    let r = replay(&manifest, args.threads, &progress).map_err(|e| cli_error(e, &[]))?;
    let cmp = &r.comparison;
    let shown: Vec<_> = cmp.differences.iter().take(MAX_SHOWN).collect();
    let report = json!({
        "manifest": args.manifest,
        "command": r.command,
        "reproduced": r.reproduced(),
        "identical": cmp.identical,
        "expected_sha256": cmp.expected_sha256,
        "actual_sha256": cmp.actual_sha256,
        "manifest_consistent": cmp.manifest_consistent,
        "inputs_same": r.inputs.iter().all(|f| f.same),
        "inputs": r.inputs,
        "outputs_same": r.outputs.iter().all(|f| f.same),
        "outputs": r.outputs,
        "recorded_git_commit": manifest.git_commit,
        "git_commit": GIT_COMMIT,
        "threads": r.threads,
        "n_differences": cmp.differences.len(),
        "largest_relative_difference": cmp.largest_relative_difference(),
        "differences": shown,
    });
    emit(&report, args.format)?;
    let mut why = Vec::new();
    for f in r.inputs.iter().filter(|f| !f.same) {
        why.push(match &f.current_sha256 {
            Some(now) => format!(
                "input {} {} changed (recorded sha256 {}, now {} at {})",
                f.role,
                f.path.display(),
                f.recorded_sha256,
                now,
                f.current_path.as_deref().unwrap_or(&f.path).display()
            ),
            None => format!(
                "input {} {} was not read by the re-run",
                f.role,
                f.path.display()
            ),
        });
    }
    for f in r.outputs.iter().filter(|f| !f.same) {
        why.push(format!(
            "output {} {}: recorded sha256 {}, the re-run's {}",
            f.role,
            f.path.display(),
            f.recorded_sha256,
            f.current_sha256.as_deref().unwrap_or("none")
        ));
    }
    if !cmp.manifest_consistent {
        why.push("the manifest's recorded output does not match its own sha256 (edited?)".into());
    }
    if let Some(d) = cmp.differences.first() {
        let field = if d.field.is_empty() {
            "whole line"
        } else {
            &d.field
        };
        let numeric = match cmp.largest_relative_difference() {
            Some(r) => format!(
                " (every difference is a number, the largest {r:.1e} relative: what rounding \
                 differences give, as a reward model's kernels do on another CPU)"
            ),
            None => String::new(),
        };
        why.push(format!(
            "{} output difference(s), the first at line {} ({field}): recorded {} vs now \
             {}{numeric}",
            cmp.differences.len(),
            d.line,
            d.expected,
            d.actual
        ));
    }
    if why.is_empty() {
        eprintln!(
            "tilt: reproduced: {} output bytes identical (sha256 {}), every file the same",
            manifest.output.bytes, cmp.actual_sha256
        );
        return Ok(());
    }
    let verdict = if cmp.identical {
        "output identical, but not reproduced"
    } else {
        "not reproduced"
    };
    Err(crate::failure(format!("{verdict}: {}", why.join("; "))))
}
