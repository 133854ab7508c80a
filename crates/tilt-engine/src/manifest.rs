//! Run manifests: what ran, with what, where, and what it printed, so that anyone can
//! re-run it and check (Sandve et al., "Ten simple rules for reproducible computational
//! research", PLoS Comput. Biol. 2013).
//!
//! One [`Manifest`] type for every command that runs models (`generate`, `eval`,
//! `train-scorer`), written by one function ([`Manifest::new`] then [`Manifest::write`]):
//! the tool version and git commit, the engine's configuration and the typed [`Run`] (the
//! very request parameters or configs that ran, serde types of this crate, not a command
//! line), every file read (model, rewards, scorers, prompts) and written, with its sha256,
//! the host, wall times, and the canonical output itself: its JSON lines and their sha256.
//! Keeping the lines (not only a hash) is what lets [`compare_outputs`] say *exactly* what
//! differs after a re-run — which line, which field, the recorded and the new value.
//!
//! [`crate::run::replay`] re-runs a manifest of any of the three commands. The output is
//! deterministic by seed, so a faithful re-run gives the same bytes; wall times and the host
//! are recorded but never compared, and a file is matched to its counterpart by role and
//! name, so that the same files under another `$TILT_HOME` compare equal.

use crate::engine::{EngineConfig, HashedFile};
use crate::error::{EngineError, Result};
use crate::run::Run;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// The manifest format version written by this crate (version 1, written by tilt before
/// its engine library, recorded a command line and is refused with a clear error).
pub const MANIFEST_VERSION: u32 = 2;

/// The tool's version, as recorded in manifests.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the library was built from (`git rev-parse HEAD`, `-dirty` when the tree
/// had changes), or `unknown`.
pub const GIT_COMMIT: &str = env!("TILT_GIT_COMMIT");

/// The machine a run was made on (recorded, never compared).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// CPU model name (`/proc/cpuinfo`), or `unknown`.
    pub cpu_model: String,
    /// Logical CPUs available to the process.
    pub cpus: usize,
    /// Threads the run used.
    pub threads: usize,
    /// `std::env::consts::OS` / `ARCH`.
    pub os: String,
    /// Host name, or `unknown`.
    pub hostname: String,
}

impl HostInfo {
    /// Describe this machine, with the thread count the run uses.
    pub fn current(threads: usize) -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let hostname = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into());
        HostInfo {
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads,
            os: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
            hostname,
        }
    }
}

/// The recorded output of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedOutput {
    /// sha256 of the output bytes (every line with its `\n`).
    pub sha256: String,
    /// Number of bytes.
    pub bytes: usize,
    /// The output lines, without their `\n`.
    pub lines: Vec<String>,
}

impl RecordedOutput {
    /// Record output bytes (JSON lines, each ending in `\n`).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let text = String::from_utf8_lossy(bytes);
        RecordedOutput {
            sha256: sha256_hex(bytes),
            bytes: bytes.len(),
            lines: text.lines().map(str::to_string).collect(),
        }
    }

    /// The bytes the lines stand for (each line plus `\n`).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes);
        for l in &self.lines {
            out.extend_from_slice(l.as_bytes());
            out.push(b'\n');
        }
        out
    }
}

/// Everything needed to re-run a command and check its output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub manifest_version: u32,
    /// The tool's version.
    pub tool_version: String,
    /// The git commit it was built from.
    pub git_commit: String,
    /// What the engine loaded, as given (the default model as `null`, so that a re-run
    /// elsewhere finds it in its own `$TILT_HOME`).
    pub engine: EngineConfig,
    /// What ran.
    pub run: Run,
    /// Every file read, with its role and sha256 (the default model's resolved path
    /// included).
    pub inputs: Vec<HashedFile>,
    /// Every file written besides the output (a trained scorer), with its sha256.
    pub outputs: Vec<HashedFile>,
    /// Where it ran (never compared).
    pub host: HostInfo,
    /// Wall times in seconds by phase (never compared).
    pub wall_seconds: BTreeMap<String, f64>,
    /// The canonical output (JSON lines).
    pub output: RecordedOutput,
}

impl Manifest {
    /// A manifest of `run` on an engine loaded from `engine`, with what it read and wrote.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: EngineConfig,
        run: Run,
        inputs: Vec<HashedFile>,
        outputs: Vec<HashedFile>,
        threads: usize,
        wall_seconds: BTreeMap<String, f64>,
        output: &[u8],
    ) -> Self {
        Manifest {
            manifest_version: MANIFEST_VERSION,
            tool_version: TOOL_VERSION.into(),
            git_commit: GIT_COMMIT.into(),
            engine,
            run,
            inputs,
            outputs,
            host: HostInfo::current(threads),
            wall_seconds,
            output: RecordedOutput::from_bytes(output),
        }
    }

    /// Write as pretty JSON.
    ///
    /// # Errors
    /// [`EngineError::Io`] naming the path.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| EngineError::Internal(format!("manifest: {e}")))?;
        std::fs::write(path, text + "\n").map_err(|e| EngineError::io(path.display(), e))
    }

    /// Read and check a manifest.
    ///
    /// # Errors
    /// [`EngineError::Io`] when unreadable; [`EngineError::BadFile`] when it is not a
    /// manifest of the version this crate reads.
    pub fn read(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(&shown, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::bad_file(&shown, format!("not a tilt manifest: {e}")))?;
        match value.get("manifest_version").and_then(Value::as_u64) {
            Some(v) if v == u64::from(MANIFEST_VERSION) => {}
            Some(v) => {
                return Err(EngineError::bad_file(
                    &shown,
                    format!(
                        "manifest version {v}; this tilt reads version {MANIFEST_VERSION} \
                         (re-run the command with this tilt to record a new manifest)"
                    ),
                ))
            }
            None => {
                return Err(EngineError::bad_file(
                    &shown,
                    "not a tilt manifest: no manifest_version",
                ))
            }
        }
        serde_json::from_value(value)
            .map_err(|e| EngineError::bad_file(&shown, format!("not a tilt manifest: {e}")))
    }
}

/// How a recorded file compares with the file a re-run read (or wrote).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCheck {
    /// Its role.
    pub role: String,
    /// The recorded path.
    pub path: std::path::PathBuf,
    /// The path the re-run used (None: it used no such file).
    pub current_path: Option<std::path::PathBuf>,
    /// The recorded sha256.
    pub recorded_sha256: String,
    /// The re-run's sha256 (None: no such file).
    pub current_sha256: Option<String>,
    /// Whether the two hashes agree.
    pub same: bool,
}

/// Match each recorded file with the current file of the same role and file name (the
/// default model under another `$TILT_HOME` has another directory but the same name), in
/// order, and compare their hashes. A current file matches at most one recorded file.
pub fn check_files(recorded: &[HashedFile], current: &[HashedFile]) -> Vec<FileCheck> {
    let mut used = vec![false; current.len()];
    recorded
        .iter()
        .map(|r| {
            let exact = current
                .iter()
                .enumerate()
                .position(|(i, c)| !used[i] && c.role == r.role && c.path == r.path);
            let by_name = || {
                current.iter().enumerate().position(|(i, c)| {
                    !used[i] && c.role == r.role && c.path.file_name() == r.path.file_name()
                })
            };
            let found = exact.or_else(by_name);
            if let Some(i) = found {
                used[i] = true;
            }
            let c = found.map(|i| &current[i]);
            FileCheck {
                role: r.role.clone(),
                path: r.path.clone(),
                current_path: c.map(|c| c.path.clone()),
                recorded_sha256: r.sha256.clone(),
                current_sha256: c.map(|c| c.sha256.clone()),
                same: c.is_some_and(|c| c.sha256 == r.sha256),
            }
        })
        .collect()
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One difference between a recorded and a re-run output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    /// 1-based line number of the output.
    pub line: usize,
    /// JSON path of the field inside the line (`candidates[2].reward`), or empty for the
    /// whole line.
    pub field: String,
    /// The recorded value (JSON), or null when absent.
    pub expected: Value,
    /// The re-run's value (JSON), or null when absent.
    pub actual: Value,
}

/// The verdict of comparing a recorded output with a re-run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The bytes are identical.
    pub identical: bool,
    /// sha256 recorded in the manifest.
    pub expected_sha256: String,
    /// sha256 of the re-run's bytes.
    pub actual_sha256: String,
    /// Whether the recorded lines hash to the recorded sha256 (false: the manifest was
    /// edited after the run).
    pub manifest_consistent: bool,
    /// Every difference, line by line and field by field (empty when identical).
    pub differences: Vec<Difference>,
}

impl Comparison {
    /// When every difference is between two finite numbers, the largest of
    /// |now − recorded| / max(|recorded|, f64::MIN_POSITIVE); None when some difference is
    /// anything else (a text, a missing field, a line) or there is none. A value near
    /// f32 or f64 rounding (1e-7, 1e-15) says the run took the same path and rounded
    /// differently: a reward model's kernels on another CPU do that.
    pub fn largest_relative_difference(&self) -> Option<f64> {
        let mut largest: Option<f64> = None;
        for d in &self.differences {
            let (Some(e), Some(a)) = (d.expected.as_f64(), d.actual.as_f64()) else {
                return None;
            };
            if !(e.is_finite() && a.is_finite()) {
                return None;
            }
            let r = (a - e).abs() / e.abs().max(f64::MIN_POSITIVE);
            largest = Some(largest.map_or(r, |l: f64| l.max(r)));
        }
        largest
    }
}

/// Compare a recorded output with the bytes of a re-run: byte identity, and where they
/// differ, every differing field of every line (lines parsed as JSON; a line that is not
/// JSON is compared as a string).
pub fn compare_outputs(recorded: &RecordedOutput, actual: &[u8]) -> Comparison {
    let actual_rec = RecordedOutput::from_bytes(actual);
    let manifest_consistent = sha256_hex(&recorded.to_bytes()) == recorded.sha256;
    let mut differences = Vec::new();
    let n = recorded.lines.len().max(actual_rec.lines.len());
    for i in 0..n {
        let parse = |l: Option<&String>| -> Value {
            match l {
                None => Value::Null,
                Some(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
            }
        };
        let (e, a) = (recorded.lines.get(i), actual_rec.lines.get(i));
        if e == a {
            continue;
        }
        let before = differences.len();
        diff_values(i + 1, "", &parse(e), &parse(a), &mut differences);
        if differences.len() == before {
            // Same JSON value, different bytes (formatting).
            differences.push(Difference {
                line: i + 1,
                field: String::new(),
                expected: e.map_or(Value::Null, |s| Value::String(s.clone())),
                actual: a.map_or(Value::Null, |s| Value::String(s.clone())),
            });
        }
    }
    Comparison {
        identical: recorded.sha256 == actual_rec.sha256 && differences.is_empty(),
        expected_sha256: recorded.sha256.clone(),
        actual_sha256: actual_rec.sha256,
        manifest_consistent,
        differences,
    }
}

fn diff_values(line: usize, path: &str, e: &Value, a: &Value, out: &mut Vec<Difference>) {
    match (e, a) {
        (Value::Object(me), Value::Object(ma)) => {
            let mut keys: Vec<&String> = me.keys().chain(ma.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_values(
                    line,
                    &p,
                    me.get(k).unwrap_or(&Value::Null),
                    ma.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(ve), Value::Array(va)) => {
            for i in 0..ve.len().max(va.len()) {
                diff_values(
                    line,
                    &format!("{path}[{i}]"),
                    ve.get(i).unwrap_or(&Value::Null),
                    va.get(i).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if e == a => {}
        _ => out.push(Difference {
            line,
            field: path.to_string(),
            expected: e.clone(),
            actual: a.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_bytes_are_identical() {
        let bytes = b"{\"a\":1,\"b\":[1,2]}\n{\"a\":2}\n";
        let rec = RecordedOutput::from_bytes(bytes);
        assert_eq!(rec.to_bytes(), bytes.to_vec());
        let c = compare_outputs(&rec, bytes);
        assert!(c.identical && c.manifest_consistent && c.differences.is_empty());
    }

    #[test]
    fn differences_name_line_and_field() {
        let rec = RecordedOutput::from_bytes(b"{\"a\":1,\"b\":[1,2]}\n{\"a\":2}\n");
        let c = compare_outputs(&rec, b"{\"a\":1,\"b\":[1,3]}\n{\"a\":2}\n{\"x\":0}\n");
        assert!(!c.identical);
        assert_eq!(c.differences.len(), 2, "{:?}", c.differences);
        assert_eq!(c.differences[0].line, 1);
        assert_eq!(c.differences[0].field, "b[1]");
        assert_eq!(c.differences[0].expected, serde_json::json!(2));
        assert_eq!(c.differences[0].actual, serde_json::json!(3));
        assert_eq!(
            (c.differences[1].line, c.differences[1].field.as_str()),
            (3, "")
        );
        assert_eq!(c.differences[1].expected, serde_json::Value::Null);
    }

    #[test]
    fn the_largest_relative_difference_is_given_only_when_every_difference_is_a_number() {
        let rec = RecordedOutput::from_bytes(b"{\"r\":0.5,\"s\":[2.0,4.0],\"t\":\"a\"}\n");
        // Two numbers off in their last digits.
        let c = compare_outputs(
            &rec,
            b"{\"r\":0.50000001,\"s\":[2.0,4.0000002],\"t\":\"a\"}\n",
        );
        assert_eq!(c.differences.len(), 2);
        let r = c.largest_relative_difference().unwrap();
        assert!((r - 5e-8).abs() < 1e-12, "{r}");
        // A changed text, a missing field or an extra line: no such figure.
        for other in [
            &b"{\"r\":0.50000001,\"s\":[2.0,4.0],\"t\":\"b\"}\n"[..],
            b"{\"r\":0.50000001,\"s\":[2.0],\"t\":\"a\"}\n",
            b"{\"r\":0.5,\"s\":[2.0,4.0],\"t\":\"a\"}\n{}\n",
        ] {
            let c = compare_outputs(&rec, other);
            assert!(!c.differences.is_empty());
            assert_eq!(c.largest_relative_difference(), None);
        }
        // Identical: no differences, no figure.
        let c = compare_outputs(&rec, b"{\"r\":0.5,\"s\":[2.0,4.0],\"t\":\"a\"}\n");
        assert_eq!(c.largest_relative_difference(), None);
    }

    #[test]
    fn edited_manifest_is_inconsistent() {
        let mut rec = RecordedOutput::from_bytes(b"{\"a\":1}\n");
        rec.lines[0] = "{\"a\":5}".into();
        let c = compare_outputs(&rec, b"{\"a\":1}\n");
        assert!(!c.manifest_consistent && !c.identical);
        assert_eq!(c.differences[0].field, "a");
    }

    fn file(role: &str, path: &str, sha: &str) -> HashedFile {
        HashedFile {
            role: role.into(),
            path: path.into(),
            sha256: sha.into(),
        }
    }

    #[test]
    fn files_match_by_role_and_name_wherever_they_live() {
        // The same MiniLM files under another home: every file pairs with its own twin,
        // never with another file of the same role.
        let recorded = [
            file("policy", "/a/m/model.gguf", "p"),
            file("reward:minilm", "/a/r/model.safetensors", "w"),
            file("reward:minilm", "/a/r/tokenizer.json", "t"),
        ];
        let current = [
            file("reward:minilm", "/b/r/tokenizer.json", "t"),
            file("reward:minilm", "/b/r/model.safetensors", "w"),
            file("policy", "/b/m/model.gguf", "p"),
        ];
        let checks = check_files(&recorded, &current);
        assert!(checks.iter().all(|c| c.same), "{checks:?}");
        assert_eq!(
            checks[2].current_path.as_deref(),
            Some(Path::new("/b/r/tokenizer.json"))
        );
        // An edited file, and one the re-run did not read.
        let current = [file("policy", "/b/m/model.gguf", "X")];
        let checks = check_files(&recorded, &current);
        assert!(!checks[0].same && checks[0].current_sha256.as_deref() == Some("X"));
        assert!(!checks[1].same && checks[1].current_sha256.is_none());
    }

    #[test]
    fn old_and_foreign_manifests_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        std::fs::write(&p, r#"{"manifest_version": 1, "command": "generate"}"#).unwrap();
        let e = Manifest::read(&p).unwrap_err().to_string();
        assert!(
            e.contains("manifest version 1") && e.contains("re-run"),
            "{e}"
        );
        std::fs::write(&p, "{").unwrap();
        assert!(Manifest::read(&p)
            .unwrap_err()
            .to_string()
            .contains("not a tilt manifest"));
        assert!(Manifest::read(&dir.path().join("none.json")).is_err());
    }
}
