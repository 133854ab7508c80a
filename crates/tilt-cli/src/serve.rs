//! `tilt serve`: the engine behind an OpenAI-compatible HTTP API (tilt-server), bound to
//! loopback by default. The flags become an engine configuration and a server
//! configuration; the server does the rest.

use crate::args::cli_error;
use crate::progress::CliProgress;
use crate::usage;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;
use tilt_engine::engine::DEFAULT_MAX_BATCH;
use tilt_engine::{Engine, EngineConfig, RemoteEngine, RewardConfig, ScorerConfig};
use tilt_server::ServerConfig;

/// Flags of `tilt serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default: expose it on purpose, behind --api-key-env).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Policy GGUF file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A reward requests may name, as NAME=SPEC or SPEC (named by itself); repeat for
    /// several; the first is the default [default: minilm].
    #[arg(long)]
    pub reward: Vec<String>,
    /// A prefix scorer requests may name, NAME=FILE; repeat for several; the first is the
    /// default of cd-token and cd-block.
    #[arg(long)]
    pub scorer: Vec<String>,
    /// Name of an environment variable holding the API key every /v1/ request must send as
    /// `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// Most sequences stepped together.
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
    /// Most requests accepted and not yet answered; beyond it, 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// A request's deadline in seconds; past it, 504.
    #[arg(long, default_value_t = 300)]
    pub request_timeout: u64,
    /// CPU threads of the model (0: the default; capped at the cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Do not load the model's chat template (chat requests then take one user message).
    #[arg(long)]
    pub no_chat_template: bool,
    /// Serve in front of a remote OpenAI-compatible engine: candidates come from it, rewards,
    /// selection and KL accounting from here (openai:URL[,model=NAME][,api-key-env=VAR]
    /// [,max-concurrency=K][,timeout=SECS][,retries=R]).
    #[arg(long, value_name = "SPEC", conflicts_with_all = ["model", "scorer"])]
    pub engine: Option<String>,
}

fn named(flag: &str, v: &str) -> anyhow::Result<(String, String)> {
    match v.split_once('=') {
        Some((n, rest)) if !n.is_empty() && !n.contains(':') && !rest.is_empty() => {
            Ok((n.to_string(), rest.to_string()))
        }
        _ if flag == "--scorer" => Err(usage(format!("{flag} {v:?}: give NAME=FILE"))),
        _ => Ok((v.to_string(), v.to_string())),
    }
}

/// Run `tilt serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let api_key = match &args.api_key_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(k) if !k.is_empty() => Some(k),
            _ => {
                return Err(usage(format!(
                    "--api-key-env {var}: the environment variable is not set or empty"
                )))
            }
        },
    };
    if args.max_queue == 0 {
        return Err(usage("--max-queue: 0 requests; use at least 1"));
    }
    if args.request_timeout == 0 {
        return Err(usage("--request-timeout: 0 seconds; use at least 1"));
    }
    let mut rewards = Vec::new();
    for r in if args.reward.is_empty() {
        vec!["minilm".to_string()]
    } else {
        args.reward.clone()
    } {
        let (name, spec) = named("--reward", &r)?;
        rewards.push(RewardConfig { name, spec });
    }
    let mut scorers = Vec::new();
    for s in &args.scorer {
        let (name, path) = named("--scorer", s)?;
        scorers.push(ScorerConfig {
            name,
            path: path.into(),
        });
    }
    let config = EngineConfig {
        model: args.model.clone(),
        chat_template: !args.no_chat_template,
        rewards,
        scorers,
        threads: args.threads,
        max_batch: args.max_batch,
        engine: args.engine.clone(),
    };
    let progress = CliProgress::new();
    let server = ServerConfig {
        max_queue: args.max_queue,
        request_timeout: Duration::from_secs(args.request_timeout),
        api_key,
        ..ServerConfig::default()
    };
    let addr = std::net::SocketAddr::new(args.host, args.port);
    if let Some(spec) = &args.engine {
        config.validate().map_err(|e| cli_error(e, &[]))?;
        let engine = RemoteEngine::connect(spec, &config.rewards, &progress)
            .map_err(|e| cli_error(e, &[("engine", "--engine")]))?;
        let (model, url) = (engine.info().model.clone(), engine.info().url.clone());
        return tilt_server::run_remote(engine, server, addr, |bound| {
            eprintln!("tilt: serving {model} from {url} on http://{bound} (OpenAI API under /v1)");
        })
        .map_err(|e| crate::failure(format!("serving on {addr}: {e}")));
    }
    let engine = Engine::load(&config, &progress).map_err(|e| cli_error(e, &[]))?;
    let model = tilt_server::model_id(&engine);
    tilt_server::run(engine, server, addr, |bound| {
        // The one line a script waits for.
        eprintln!("tilt: serving {model} on http://{bound} (OpenAI API under /v1)");
    })
    .map_err(|e| crate::failure(format!("serving on {addr}: {e}")))
}
