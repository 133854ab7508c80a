//! What the model-running commands (`generate`, `eval`, `train-scorer`, `reproduce`) share:
//! reading prompt files, loading the policy, the reward and a prefix scorer with the right
//! exit codes, and hashing files for manifests.

use crate::usage;
use anyhow::Context;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tilt_decode::manifest::HashedFile;
use tilt_models::llama::LlamaPolicy;
use tilt_models::Policy;
use tilt_rewards::{Reward, RewardSpec};

/// Read a prompts file: one JSON object with a non-empty string `prompt` per non-blank line.
///
/// # Errors
/// A usage error naming the file and line.
pub fn read_prompts(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("--prompts {}: {e}", path.display())))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| {
            usage(format!(
                "--prompts {} line {}: not JSON: {e}",
                path.display(),
                i + 1
            ))
        })?;
        match v.get("prompt").and_then(Value::as_str) {
            Some(p) if !p.trim().is_empty() => prompts.push(p.to_string()),
            _ => {
                return Err(usage(format!(
                    "--prompts {} line {}: expected {{\"prompt\": \"non-empty text\"}}",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    if prompts.is_empty() {
        return Err(usage(format!("--prompts {}: no prompts", path.display())));
    }
    Ok(prompts)
}

/// The policy file: `--model` or the default (fetched on first use).
pub fn policy_path(model: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match model {
        Some(p) => Ok(p.clone()),
        None => tilt_assets::default_policy_gguf().context("fetching the default policy model"),
    }
}

/// Load the policy, mapping bad files to usage errors.
pub fn load_policy(path: &Path, threads: usize) -> anyhow::Result<LlamaPolicy> {
    LlamaPolicy::load(path, threads).map_err(|e| match e {
        tilt_models::ModelError::BadFile { .. }
        | tilt_models::ModelError::UnsupportedArchitecture { .. } => usage(e),
        other => anyhow::Error::new(other),
    })
}

/// Build the reward from its spec.
pub fn load_reward(spec: &str) -> anyhow::Result<Box<dyn Reward>> {
    let spec = RewardSpec::parse(spec).map_err(usage)?;
    spec.build().context("loading the reward")
}

/// A file with its sha256 for a manifest.
pub fn hashed(role: &str, path: &Path) -> anyhow::Result<HashedFile> {
    let sha256 =
        tilt_assets::sha256_file(path).with_context(|| format!("hashing {}", path.display()))?;
    Ok(HashedFile {
        role: role.into(),
        path: path.to_path_buf(),
        sha256,
    })
}

/// Input errors (bad parameters, bad scorer files) exit 2; the rest exit 1.
pub fn cd_to_anyhow(e: tilt_decode::cd::CdError) -> anyhow::Error {
    match e {
        tilt_decode::cd::CdError::InvalidParameter { .. }
        | tilt_decode::cd::CdError::ScorerFile { .. }
        | tilt_decode::cd::CdError::Model(tilt_models::ModelError::InvalidInput(_)) => usage(e),
        other => anyhow::Error::new(other),
    }
}

/// For `tilt generate --strategy cd-token|cd-block`: the strategy and its scorer, checked
/// against the policy (usage errors for a missing, bad or mismatched scorer file and for
/// λ < 0, k = 0, K = 0, M = 0); `None` for the other strategies.
pub fn load_cd(
    args: &crate::generate::GenerateArgs,
    policy: &tilt_models::llama::LlamaPolicy,
) -> anyhow::Result<
    Option<(
        tilt_decode::cd::CdStrategy,
        tilt_decode::cd::scorer::ScorerFile,
    )>,
> {
    use tilt_decode::cd::{CdBlockParams, CdStrategy, CdTokenParams, PrefixScorer};
    let Some(strategy) = args.cd_strategy() else {
        return Ok(None);
    };
    match strategy {
        CdStrategy::CdToken { lambda, top_k } => CdTokenParams {
            lambda,
            top_k,
            max_new_tokens: args.max_new_tokens,
            seed: args.seed,
        }
        .validate(),
        CdStrategy::CdBlock { k, m } => CdBlockParams {
            k,
            m,
            max_new_tokens: args.max_new_tokens,
            seed: args.seed,
        }
        .validate(),
    }
    .map_err(usage)?;
    let path = args.scorer.as_ref().ok_or_else(|| {
        usage(format!(
            "--strategy {}: needs --scorer FILE (train one with `tilt train-scorer`)",
            strategy.name()
        ))
    })?;
    let scorer = tilt_decode::cd::scorer::ScorerFile::load(path).map_err(usage)?;
    if scorer.hidden_size() != policy.hidden_size() {
        return Err(usage(format!(
            "--scorer {}: reads hidden states of size {}, but policy {} has hidden size {}",
            path.display(),
            scorer.hidden_size(),
            policy.name(),
            policy.hidden_size()
        )));
    }
    Ok(Some((strategy, scorer)))
}
