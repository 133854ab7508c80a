//! `tilt score`: log p(response | prompt) of given responses under the local model or a
//! remote engine, one JSON line per response (nats).
//!
//! With the log-probabilities of a policy's own samples under the policy and under the
//! reference, the mean of the difference is a Monte-Carlo estimate of KL(π‖p): `score`
//! gives the reference side for any policy, its reference served here or elsewhere.

use crate::args::EngineArgs;
use crate::progress::CliProgress;
use crate::{engine_error, usage};
use serde::Serialize;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use tilt_engine::{Engine, Input, RemoteEngine};

/// Flags of `tilt score`.
#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// The prompt (a user message under the model's chat template, or raw text with
    /// --no-chat-template).
    #[arg(long, conflicts_with = "pairs")]
    pub prompt: Option<String>,
    /// A response to score after --prompt; repeat for several.
    #[arg(long, requires = "prompt")]
    pub response: Vec<String>,
    /// A JSON-lines file of {"prompt", "response"} objects (or generate's output lines, whose
    /// "text" is the response).
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Serialize)]
struct Line<'a> {
    index: usize,
    prompt: &'a str,
    response: &'a str,
    /// log p(response | prompt), nats.
    log_prob: f64,
    token_log_probs: Vec<f64>,
    tokens: usize,
    /// `local` or the remote engine's URL.
    engine: &'a str,
    units: &'static str,
}

fn read_pairs(path: &PathBuf) -> anyhow::Result<Vec<(String, String)>> {
    let f =
        std::fs::File::open(path).map_err(|e| usage(format!("--pairs {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line =
            line.map_err(|e| usage(format!("--pairs {} line {}: {e}", path.display(), i + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| usage(format!("--pairs {} line {}: {m}", path.display(), i + 1));
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("not JSON ({e})")))?;
        let prompt = v.get("prompt").and_then(|p| p.as_str());
        let response = v
            .get("response")
            .or_else(|| v.get("text"))
            .and_then(|p| p.as_str());
        match (prompt, response) {
            (Some(p), Some(r)) => out.push((p.to_string(), r.to_string())),
            _ => {
                return Err(bad(
                    "needs a string \"prompt\" and a string \"response\" (or \"text\")".into(),
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(usage(format!(
            "--pairs {}: no pairs in the file",
            path.display()
        )));
    }
    Ok(out)
}

/// Run `tilt score`.
pub fn run(args: ScoreArgs) -> anyhow::Result<()> {
    let pairs: Vec<(String, String)> = match (&args.prompt, &args.pairs) {
        (Some(p), None) if !args.response.is_empty() => args
            .response
            .iter()
            .map(|r| (p.clone(), r.clone()))
            .collect(),
        (None, Some(f)) => read_pairs(f)?,
        _ => {
            return Err(usage(
                "give --prompt TEXT with one or more --response TEXT, or --pairs FILE.jsonl",
            ))
        }
    };
    let flag = |p: &str| -> Option<String> {
        match p {
            "response" | "prompt" | "engine" => Some(format!("--{p}")),
            _ => None,
        }
    };
    let config = args.engine.config(&[]);
    config.validate().map_err(|e| engine_error(e, flag))?;
    let input_of = |p: &str| {
        if args.engine.no_chat_template {
            Input::Raw(p.to_string())
        } else {
            Input::Prompt(p.to_string())
        }
    };
    let progress = CliProgress::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match &config.engine {
        Some(spec) => {
            let engine = RemoteEngine::connect(spec, &config.rewards, &progress)
                .map_err(|e| engine_error(e, flag))?;
            let url = engine.info().url.clone();
            for (i, (p, r)) in pairs.iter().enumerate() {
                let lp = engine
                    .log_prob(&input_of(p), r)
                    .map_err(|e| engine_error(e, flag))?;
                let line = Line {
                    index: i,
                    prompt: p,
                    response: r,
                    log_prob: lp.total,
                    tokens: lp.token_log_probs.len(),
                    token_log_probs: lp.token_log_probs,
                    engine: &url,
                    units: "nats",
                };
                writeln!(out, "{}", serde_json::to_string(&line)?)?;
            }
        }
        None => {
            let engine = Engine::load(&config, &progress).map_err(|e| engine_error(e, flag))?;
            for (i, (p, r)) in pairs.iter().enumerate() {
                let lp = engine
                    .log_prob(&input_of(p), r)
                    .map_err(|e| engine_error(e, flag))?;
                let line = Line {
                    index: i,
                    prompt: p,
                    response: r,
                    log_prob: lp.total,
                    tokens: lp.tokens.len(),
                    token_log_probs: lp.token_log_probs,
                    engine: "local",
                    units: "nats",
                };
                writeln!(out, "{}", serde_json::to_string(&line)?)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
