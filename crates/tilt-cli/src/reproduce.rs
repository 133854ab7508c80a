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

/// Parse recorded `generate` arguments (`args[0]` = `generate`) as the command line they
/// came from.
///
/// # Errors
/// clap's error when they do not parse.
pub fn parse_generate_args(args: &[String]) -> Result<GenerateArgs, clap::Error> {
    let argv = std::iter::once("tilt".to_string()).chain(args.iter().cloned());
    let Recorded {
        command: RecordedCommand::Generate(gen),
    } = Recorded::try_parse_from(argv)?;
    Ok(gen)
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
    let mut gen = parse_generate_args(&manifest.args).map_err(|e| {
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
        "git_commit": crate::runtime::GIT_COMMIT,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(args: &[&str]) -> GenerateArgs {
        let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse_generate_args(&owned).unwrap()
    }

    #[test]
    fn resolved_args_parse_back_to_the_same_run_even_for_a_dash_prompt() {
        let model = Path::new("/models/-odd name.gguf");
        let cases: [&[&str]; 6] = [
            &[
                "generate",
                "--prompt=-x --n 3",
                "--strategy",
                "bon",
                "--n",
                "3",
            ],
            &[
                "generate",
                "--prompt=--help",
                "--strategy",
                "cd-token",
                "--scorer",
                "s.st",
            ],
            &[
                "generate",
                "--prompts=-p.jsonl",
                "--strategy",
                "cd-block",
                "--scorer=-s.st",
                "--block-k",
                "3",
            ],
            &[
                "generate",
                "--prompt",
                "hi",
                "--strategy",
                "soft-bon",
                "--lambda",
                "0.25",
            ],
            &[
                "generate",
                "--prompt",
                "hi",
                "--strategy",
                "rewind",
                "--threshold=-0.5",
                "--top-p",
                "0.9",
                "--no-chat-template",
            ],
            &["generate", "--prompt", "hi"],
        ];
        for argv in cases {
            let first = parse(argv);
            let resolved = first.resolved_args(model);
            assert_eq!(resolved[0], "generate");
            let again = parse_generate_args(&resolved)
                .unwrap_or_else(|e| panic!("{argv:?} → {resolved:?} does not parse: {e}"));
            // The same run: the same prompt, configuration and strategy, and the same
            // record again (a fixed point).
            assert_eq!(again.prompt, first.prompt, "{argv:?}");
            assert_eq!(again.prompts, first.prompts);
            assert_eq!(again.scorer, first.scorer);
            assert_eq!(again.no_chat_template, first.no_chat_template);
            assert_eq!(again.config().unwrap(), first.config().unwrap(), "{argv:?}");
            assert_eq!(again.cd_strategy(), first.cd_strategy());
            assert_eq!(again.model.as_deref(), Some(model));
            assert_eq!(again.resolved_args(model), resolved);
            // Every value is written `--flag=VALUE`, so none is read as a flag.
            assert!(resolved[1..]
                .iter()
                .all(|a| a == "--no-chat-template" || (a.starts_with("--") && a.contains('='))));
        }
        // The defaults are written out: cd-token's top-k, N, the model.
        let cd = parse(cases[1]).resolved_args(model);
        assert!(cd.contains(&"--top-k=10".to_string()), "{cd:?}");
        assert!(cd.contains(&"--prompt=--help".to_string()));
        assert!(!cd.iter().any(|a| a.starts_with("--n=")), "cd takes no --n");
        let plain = parse(cases[5]).resolved_args(model);
        for want in [
            "--n=4",
            "--temperature=1",
            "--seed=0",
            "--max-new-tokens=64",
        ] {
            assert!(plain.contains(&want.to_string()), "{want} in {plain:?}");
        }
        assert!(plain.contains(&format!("--model={}", model.display())));
        // What the old form recorded does not parse: clap reads `-x` as a flag.
        let old: Vec<String> = ["generate", "--prompt", "-x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(parse_generate_args(&old).is_err());
    }
}
