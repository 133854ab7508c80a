//! What the model-running commands share: the flags that load an engine (one clap group),
//! the mapping from the engine's parameter names to flags, output-path checks, and the
//! wrapping of engine errors.

use crate::engine_error;
use crate::usage;
use clap::Args;
use std::path::{Path, PathBuf};
use tilt_engine::engine::DEFAULT_MAX_BATCH;
use tilt_engine::{
    EngineConfig, EngineError, RewardConfig, ScorerConfig, ScorerSpec, WeightedScorer,
};

/// The flags that say what the engine loads (shared by generate, eval and train-scorer).
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Policy GGUF file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Reward: minilm (relevance to the prompt), minilm:target=TEXT, head:PATH, command:CMD,
    /// http:URL, or a served reward model: vllm:URL, tei:URL (,endpoint=rerank), openrlhf:URL
    /// (options ,batch=B,concurrency=K,timeout=SECS,retries=R; vllm ,model=M,label=I; tei
    /// ,label=NAME).
    #[arg(long, default_value = "minilm")]
    pub reward: String,
    /// CPU threads (0: TILT_NUM_THREADS, RAYON_NUM_THREADS or the number of cores; capped at
    /// the cores). The output does not depend on it.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Feed prompts to the model as they are, without its chat template (which is then not
    /// even read).
    #[arg(long)]
    pub no_chat_template: bool,
    /// Most sequences stepped at once (prompts of a file run together up to it). The output
    /// does not depend on it.
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
    /// Draw candidates from a remote OpenAI-compatible engine instead of the local model:
    /// openai:URL[,model=NAME][,api-key-env=VAR][,max-concurrency=K][,timeout=SECS][,retries=R]
    /// [,echo-prefix=TEXT][,chat-template=FILE.gguf|default] (URL the API base, e.g.
    /// http://127.0.0.1:8000/v1; chat-template: tilt renders chats with that GGUF's template
    /// and sends them to /completions).
    #[arg(long, value_name = "SPEC")]
    pub engine: Option<String>,
}

impl EngineArgs {
    /// The engine these flags describe, with the prefix scorer files given, each named by
    /// its path (the first is the default).
    pub fn config(&self, scorers: &[PathBuf]) -> EngineConfig {
        EngineConfig {
            model: self.model.clone(),
            chat_template: !self.no_chat_template,
            rewards: vec![RewardConfig {
                name: self.reward.clone(),
                spec: self.reward.clone(),
            }],
            scorers: scorers
                .iter()
                .map(|p| ScorerConfig {
                    name: p.display().to_string(),
                    path: p.clone(),
                })
                .collect(),
            threads: self.threads,
            max_batch: self.max_batch,
            engine: self.engine.clone(),
        }
    }
}

/// A `--scorer` value: `FILE` or `FILE:weight=W` (W a finite number).
///
/// # Errors
/// A usage error naming `--scorer` for an empty file or a weight that is not a finite number.
pub fn parse_scorer_flag(value: &str) -> anyhow::Result<(PathBuf, Option<f64>)> {
    let (file, weight) = match value.rsplit_once(":weight=") {
        Some((file, w)) => {
            let weight: f64 = w.trim().parse().map_err(|_| {
                usage(format!(
                    "--scorer {value:?}: the weight {w:?} is not a number (give FILE:weight=W)"
                ))
            })?;
            if !weight.is_finite() {
                return Err(usage(format!(
                    "--scorer {value:?}: the weight {weight} is not finite"
                )));
            }
            (file, Some(weight))
        }
        None => (value, None),
    };
    if file.trim().is_empty() {
        return Err(usage(format!(
            "--scorer {value:?}: no file (give FILE or FILE:weight=W)"
        )));
    }
    Ok((PathBuf::from(file), weight))
}

/// What `--scorer` values say.
#[derive(Debug, Clone, PartialEq)]
pub struct ScorerFlags {
    /// The prefix scorer of the cd strategies: one file without a weight is that scorer;
    /// otherwise the weighted sum of the files (weight 1 where none is given), each named by
    /// its path.
    pub spec: Option<ScorerSpec>,
    /// The files, in order.
    pub files: Vec<PathBuf>,
    /// Whether any value gave an explicit weight.
    pub weighted: bool,
}

/// Parse `--scorer` values (see [`ScorerFlags`]).
///
/// # Errors
/// As [`parse_scorer_flag`]; a file given twice.
pub fn scorer_spec(values: &[String]) -> anyhow::Result<ScorerFlags> {
    let parsed = values
        .iter()
        .map(|v| parse_scorer_flag(v))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let files: Vec<PathBuf> = parsed.iter().map(|(f, _)| f.clone()).collect();
    for (i, f) in files.iter().enumerate() {
        if files[..i].contains(f) {
            return Err(usage(format!(
                "--scorer: {} is given twice; give each scorer once with its weight",
                f.display()
            )));
        }
    }
    let spec = match &parsed[..] {
        [] => None,
        [(f, None)] => Some(ScorerSpec::One(f.display().to_string())),
        _ => Some(ScorerSpec::Weighted(
            parsed
                .iter()
                .map(|(f, w)| WeightedScorer {
                    name: f.display().to_string(),
                    weight: w.unwrap_or(1.0),
                })
                .collect(),
        )),
    };
    Ok(ScorerFlags {
        spec,
        files,
        weighted: parsed.iter().any(|(_, w)| w.is_some()),
    })
}

#[cfg(test)]
mod scorer_flag_tests {
    use super::*;

    #[test]
    fn scorer_flags_give_one_scorer_or_a_weighted_sum() {
        assert_eq!(
            parse_scorer_flag("a/b.safetensors").unwrap(),
            (PathBuf::from("a/b.safetensors"), None)
        );
        assert_eq!(
            parse_scorer_flag("c:d.safetensors:weight=-0.25").unwrap(),
            (PathBuf::from("c:d.safetensors"), Some(-0.25))
        );
        for (bad, needle) in [
            ("x:weight=", "not a number"),
            ("x:weight=inf", "not finite"),
            (":weight=1", "no file"),
        ] {
            let e = parse_scorer_flag(bad).unwrap_err().to_string();
            assert!(e.contains("--scorer") && e.contains(needle), "{bad}: {e}");
        }
        let one = scorer_spec(&["s.st".into()]).unwrap();
        assert_eq!(one.spec, Some(ScorerSpec::One("s.st".into())));
        assert_eq!(one.files, [PathBuf::from("s.st")]);
        assert!(!one.weighted);
        let sum = scorer_spec(&["a:weight=2".into(), "b".into()]).unwrap();
        assert!(sum.weighted);
        assert_eq!(
            sum.spec,
            Some(ScorerSpec::Weighted(vec![
                WeightedScorer {
                    name: "a".into(),
                    weight: 2.0
                },
                WeightedScorer {
                    name: "b".into(),
                    weight: 1.0
                },
            ]))
        );
        assert_eq!(sum.files.len(), 2);
        // Two files without weights: their sum, no weight given.
        assert!(!scorer_spec(&["a".into(), "b".into()]).unwrap().weighted);
        // One file with an explicit weight is a weighted sum of one term.
        let w = scorer_spec(&["a:weight=0.5".into()]).unwrap();
        assert!(matches!(w.spec, Some(ScorerSpec::Weighted(t)) if t[0].weight == 0.5));
        assert_eq!(scorer_spec(&[]).unwrap().spec, None);
        assert!(scorer_spec(&["a".into(), "a:weight=2".into()]).is_err());
    }
}

/// The flag that sets an engine parameter, for the parameters the model-running commands
/// expose (`n` → `--n`, `top_k` → `--top-k`, …); `renames` first lists those a command spells
/// otherwise (`rollouts_per_prompt` → `--rollouts`).
pub fn flag_of(param: &str, renames: &[(&str, &str)]) -> Option<String> {
    if let Some((_, f)) = renames.iter().find(|(p, _)| *p == param) {
        return Some(f.to_string());
    }
    const FLAGS: [&str; 24] = [
        "n",
        "choices",
        "seed",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "lambda",
        "threshold",
        "max_draws",
        "block_k",
        "block_m",
        "scorer",
        "reward",
        "model",
        "threads",
        "max_batch",
        "stop",
        "strategy",
        "strategies",
        "reference_samples",
        "samples_per_prompt",
        "learning_rate",
        "epochs",
    ];
    const MORE: [&str; 8] = [
        "frontier_weights",
        "weight_decay",
        "heldout_fraction",
        "mlp_hidden",
        "head",
        "out",
        "method",
        "q_rounds",
    ];
    FLAGS
        .iter()
        .chain(MORE.iter())
        .find(|&&p| p == param)
        .map(|p| format!("--{}", p.replace('_', "-")))
}

/// An engine error as the CLI reports it (exit code by kind, parameters as flags).
pub fn cli_error(e: EngineError, renames: &[(&str, &str)]) -> anyhow::Error {
    engine_error(e, |p| flag_of(p, renames))
}

/// Check, before any work, that a file can be written at `path` (given as `flag`), as
/// [`tilt_plot::check_writable`] does for every output file.
///
/// # Errors
/// A usage error naming `flag` and the path.
pub fn check_writable(flag: &str, path: &Path) -> anyhow::Result<()> {
    tilt_plot::check_writable(path).map_err(|e| usage(format!("{flag} {e}")))
}

/// Check a `--plot` path before any work, as every command does ([`tilt_plot::check_output`]:
/// an SVG file name in an existing folder, writable).
///
/// # Errors
/// A usage error naming `--plot`.
pub fn check_plot(path: &Path) -> anyhow::Result<()> {
    tilt_plot::check_output(path).map_err(|e| usage(format!("--plot {e}")))
}

/// Parse a seed: a whole number from 0 to 2^64 − 1.
pub fn parse_seed(s: &str) -> Result<u64, String> {
    s.trim().parse::<u64>().map_err(|_| {
        format!(
            "{s:?} is not a seed: give a whole number from 0 to {}",
            u64::MAX
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_paths_are_checked_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("plot.svg");
        check_writable("--plot", &new).unwrap();
        assert!(!new.exists());
        let old = dir.path().join("m.json");
        std::fs::write(&old, "keep").unwrap();
        check_writable("--manifest", &old).unwrap();
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "keep");
        let missing = dir.path().join("no-such-dir").join("plot.svg");
        let e = check_writable("--plot", &missing).unwrap_err();
        assert_eq!(e.downcast_ref::<crate::Exit>().map(|x| x.code), Some(2));
        let msg = e.to_string();
        assert!(
            msg.starts_with("--plot ")
                && msg.contains("no-such-dir")
                && msg.contains("does not exist"),
            "{msg}"
        );
        let e = check_writable("--manifest", dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--manifest ") && e.contains("is a directory"),
            "{e}"
        );
        assert!(check_writable("--out", Path::new("")).is_err());
        let e = check_plot(&dir.path().join("e.png"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(".svg"), "{e}");
        check_plot(&dir.path().join("e.SVG")).unwrap();
    }

    #[test]
    fn parameters_become_the_flags_that_set_them() {
        assert_eq!(flag_of("n", &[]).as_deref(), Some("--n"));
        assert_eq!(flag_of("block_k", &[]).as_deref(), Some("--block-k"));
        assert_eq!(
            flag_of("max_new_tokens", &[]).as_deref(),
            Some("--max-new-tokens")
        );
        assert_eq!(
            flag_of(
                "rollouts_per_prompt",
                &[("rollouts_per_prompt", "--rollouts")]
            )
            .as_deref(),
            Some("--rollouts")
        );
        assert_eq!(flag_of("q_rounds", &[]).as_deref(), Some("--q-rounds"));
        assert_eq!(flag_of("method", &[]).as_deref(), Some("--method"));
        assert_eq!(flag_of("messages", &[]), None);
        assert!(parse_seed("-1")
            .unwrap_err()
            .contains("whole number from 0"));
        assert_eq!(parse_seed("7"), Ok(7));
    }
}
