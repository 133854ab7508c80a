//! What the model-running commands (`generate`, `eval`, `train-scorer`, `reproduce`) share:
//! reading prompt files, checking output paths before any work, resolving the thread count,
//! loading the policy, the reward and a prefix scorer with the right exit codes, refusing
//! batches that do not fit in memory, and what every record of a run carries (tool version,
//! git commit, hashed files).

use crate::usage;
use anyhow::Context;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tilt_decode::cd::scorer::ScorerFile;
use tilt_decode::cd::PrefixScorer;
use tilt_decode::generate::{available_memory_bytes, check_batch_memory};
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

/// The tool's version, as recorded in manifests and scorer cards.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the binary was built from (build.rs), or `unknown`.
pub const GIT_COMMIT: &str = env!("TILT_GIT_COMMIT");

/// The thread count a run uses: `--threads`, or for 0 the default
/// (`TILT_NUM_THREADS`, `RAYON_NUM_THREADS`, the number of cores). Resolve it once, pass it
/// to [`load_policy`] and record the same number.
pub fn resolve_threads(flag: usize) -> usize {
    if flag == 0 {
        tilt_models::threads::num_threads()
    } else {
        flag
    }
}

/// Check, before any work, that a file can be written at `path` (given as `flag`): its
/// directory exists and takes a new file, and the path is not a directory. An existing file
/// is opened for appending (not truncated) to check it; a new one is created and removed.
///
/// # Errors
/// A usage error naming `flag` and the path.
pub fn check_writable(flag: &str, path: &Path) -> anyhow::Result<()> {
    let bad = |problem: String| usage(format!("{flag} {}: {problem}", path.display()));
    if path.as_os_str().is_empty() {
        return Err(usage(format!("{flag}: empty path")));
    }
    if path.is_dir() {
        return Err(bad("is a directory; give a file name".into()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(bad(format!(
            "directory {} does not exist (create it first)",
            dir.display()
        )));
    }
    if path.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| bad(format!("cannot be written: {e}")))?;
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| bad(format!("cannot be created: {e}")))?;
        std::fs::remove_file(path).map_err(|e| bad(format!("cannot be removed again: {e}")))?;
    }
    Ok(())
}

/// Refuse, before any work, a batch of `n` sequences of up to `max_new_tokens` new tokens
/// that would not fit in the memory available now (the prompt's cache is shared by the
/// batch: one copy, small beside the suffixes). `input` names the flag that sets `n`.
///
/// # Errors
/// A usage error naming `input` (see [`check_batch_memory`]).
pub fn check_memory(
    policy: &LlamaPolicy,
    input: &str,
    n: usize,
    max_new_tokens: usize,
) -> anyhow::Result<()> {
    let cfg = policy.model().config();
    // K and V, f32, per layer and KV head.
    let kv_bytes_per_token =
        2 * cfg.n_layers as u64 * cfg.n_kv_heads as u64 * cfg.head_dim as u64 * 4;
    if let Some(avail) = available_memory_bytes() {
        check_batch_memory(
            input,
            n,
            0,
            max_new_tokens,
            kv_bytes_per_token,
            policy.vocab_size(),
            avail,
        )
        .map_err(usage)?;
    }
    Ok(())
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

/// Load a prefix scorer file given as `--scorer` (`path` None: the flag is missing).
///
/// # Errors
/// A usage error for a missing flag or a missing, malformed or incomplete file.
pub fn load_scorer(path: Option<&Path>) -> anyhow::Result<ScorerFile> {
    let path = path.ok_or_else(|| {
        usage("--scorer: cd-token and cd-block need a prefix scorer file (train one with `tilt train-scorer`)")
    })?;
    ScorerFile::load(path).map_err(usage)
}

/// Check that a scorer reads hidden states of the policy's size.
///
/// # Errors
/// A usage error naming `--scorer`, its file and both sizes.
pub fn check_scorer_fits(scorer: &ScorerFile, policy: &LlamaPolicy) -> anyhow::Result<()> {
    if scorer.hidden_size() != policy.hidden_size() {
        return Err(usage(format!(
            "--scorer {}: reads hidden states of size {}, but policy {} has hidden size {}",
            scorer.path.display(),
            scorer.hidden_size(),
            policy.name(),
            policy.hidden_size()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_paths_are_checked_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        // A new file in an existing directory: fine, and nothing is left behind.
        let new = dir.path().join("plot.svg");
        check_writable("--plot", &new).unwrap();
        assert!(!new.exists());
        // An existing file: fine, and not truncated.
        let old = dir.path().join("m.json");
        std::fs::write(&old, "keep").unwrap();
        check_writable("--manifest", &old).unwrap();
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "keep");
        // A missing directory, a directory, an empty path: usage errors naming the flag.
        let missing = dir.path().join("no-such-dir").join("plot.svg");
        let e = check_writable("--plot", &missing).unwrap_err();
        assert!(e.downcast_ref::<crate::UsageError>().is_some());
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
        // A bare file name is in the working directory, which exists.
        assert!(check_writable("--plot", Path::new("tilt-check-writable-probe.svg")).is_ok());
    }

    #[test]
    fn zero_threads_resolve_to_the_default_once() {
        assert_eq!(resolve_threads(3), 3);
        assert_eq!(resolve_threads(0), tilt_models::threads::num_threads());
        assert!(resolve_threads(0) >= 1);
    }
}
