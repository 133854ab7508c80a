//! `tilt reproduce MANIFEST`: re-run a recorded `tilt generate` and say whether its output
//! is byte-identical, or exactly which line and field differ, and whether the model,
//! reward and prompt files still hash to what was recorded.
//!
//! Output: one JSON object on stdout (`identical`, both sha256s, `files`, `differences`);
//! a one-line verdict on stderr. Exit code 0 when identical, 1 when not, 2 when the
//! manifest itself is unreadable or not a `generate` manifest.

use crate::generate::{execute, GenerateArgs};
use crate::usage;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use tilt_decode::manifest::{compare_outputs, Manifest};

/// Flags of `tilt reproduce`.
#[derive(Debug, Clone, Args)]
pub struct ReproduceArgs {
    /// The manifest written by `tilt generate --manifest FILE`.
    pub manifest: PathBuf,
    /// Re-run with this many threads instead of the recorded count (the output must not
    /// change).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// The recorded arguments, parsed as the command line they came from.
#[derive(Debug, Parser)]
#[command(name = "tilt", no_binary_name = false)]
struct Recorded {
    #[command(subcommand)]
    command: RecordedCommand,
}

#[derive(Debug, Subcommand)]
enum RecordedCommand {
    Generate(GenerateArgs),
}

/// At most this many differences are printed (the count is always given).
const MAX_SHOWN: usize = 200;

/// Run `tilt reproduce`.
pub fn run(args: ReproduceArgs) -> anyhow::Result<()> {
    let manifest = Manifest::read(&args.manifest).map_err(usage)?;
    if manifest.command != "generate" {
        return Err(usage(format!(
            "{}: a manifest of `tilt {}`; reproduce re-runs `tilt generate` manifests",
            args.manifest.display(),
            manifest.command
        )));
    }
    let argv = std::iter::once("tilt".to_string()).chain(manifest.args.iter().cloned());
    let Recorded {
        command: RecordedCommand::Generate(mut gen),
    } = Recorded::try_parse_from(argv).map_err(|e| {
        usage(format!(
            "{}: recorded arguments do not parse: {}",
            args.manifest.display(),
            e.to_string().lines().next().unwrap_or_default()
        ))
    })?;
    gen.manifest = None;
    if let Some(t) = args.threads {
        gen.threads = t;
    }
    let mut output = Vec::new();
    let record = execute(&gen, &mut output)?;
    let cmp = compare_outputs(&manifest.output, &output);
    let files: Vec<serde_json::Value> = manifest
        .files
        .iter()
        .map(|f| {
            let now = record
                .files
                .iter()
                .find(|g| g.role == f.role && g.path == f.path);
            let now = now.or_else(|| record.files.iter().find(|g| g.role == f.role));
            json!({
                "role": f.role,
                "path": f.path,
                "recorded_sha256": f.sha256,
                "current_sha256": now.map(|g| g.sha256.clone()),
                "same": now.is_some_and(|g| g.sha256 == f.sha256),
            })
        })
        .collect();
    let files_same = files.iter().all(|f| f["same"] == json!(true));
    let shown: Vec<_> = cmp.differences.iter().take(MAX_SHOWN).collect();
    let report = json!({
        "manifest": args.manifest,
        "identical": cmp.identical,
        "expected_sha256": cmp.expected_sha256,
        "actual_sha256": cmp.actual_sha256,
        "manifest_consistent": cmp.manifest_consistent,
        "files_same": files_same,
        "files": files,
        "recorded_git_commit": manifest.git_commit,
        "git_commit": crate::generate::GIT_COMMIT,
        "threads": record.threads,
        "n_differences": cmp.differences.len(),
        "differences": shown,
    });
    crate::output::emit(&report, crate::output::Format::Json)?;
    if cmp.identical {
        eprintln!(
            "identical: {} output bytes, sha256 {}",
            manifest.output.bytes, cmp.actual_sha256
        );
        return Ok(());
    }
    let mut why = Vec::new();
    if !cmp.manifest_consistent {
        why.push("the manifest's recorded output does not match its own sha256 (edited?)".into());
    }
    if !files_same {
        why.push("input files changed since the run".to_string());
    }
    if let Some(d) = cmp.differences.first() {
        let field = if d.field.is_empty() {
            "whole line"
        } else {
            &d.field
        };
        why.push(format!(
            "first difference at line {} ({field}): recorded {} vs now {}",
            d.line, d.expected, d.actual
        ));
    }
    anyhow::bail!(
        "not reproduced: {} difference(s); {}",
        cmp.differences.len(),
        why.join("; ")
    )
}
