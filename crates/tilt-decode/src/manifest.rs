//! Run manifests: what ran, with what, where, and what it printed, so that anyone can
//! re-run it and check (Sandve et al., "Ten simple rules for reproducible computational
//! research", and arXiv 1412.5557's call to record every run).
//!
//! A [`Manifest`] records the tool version and git commit, the command's fully resolved
//! arguments (every default written out, so a later version with other defaults re-runs the
//! same thing), the seed, every model and reward file with its sha256, the input file's
//! sha256, the host (CPU model, threads, OS), wall times, and the output itself: its lines
//! and their sha256. Keeping the output lines (not only a hash) is what lets
//! [`compare_outputs`] say *exactly* what differs after a re-run — which line, which field,
//! the recorded and the new value — instead of only "the hashes differ".
//!
//! The output is deterministic by seed, so a faithful re-run gives the same bytes; wall
//! times and host are recorded but never compared.

use crate::DecodeError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The manifest format version written by this crate.
pub const MANIFEST_VERSION: u32 = 1;

/// A file that determines the run, with its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashedFile {
    /// What the file is (`policy`, `reward`, `prompts`, …).
    pub role: String,
    /// Its path when the run was made.
    pub path: PathBuf,
    /// Lowercase hex sha256 of its bytes.
    pub sha256: String,
}

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
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub manifest_version: u32,
    /// The tool's version (`CARGO_PKG_VERSION` of the binary).
    pub tool_version: String,
    /// `git rev-parse HEAD` at build time (with `-dirty` if the tree had changes), or
    /// `unknown`.
    pub git_commit: String,
    /// The subcommand (`generate`).
    pub command: String,
    /// Its fully resolved arguments, ready to parse again (no `--manifest`).
    pub args: Vec<String>,
    /// The resolved configuration as data (for people and tools; `args` is what re-runs).
    pub config: Value,
    /// The seed.
    pub seed: u64,
    /// Model, reward and input files with their sha256.
    pub files: Vec<HashedFile>,
    /// Where it ran.
    pub host: HostInfo,
    /// Wall times in seconds by phase (`load`, `generate`, `total`).
    pub wall_seconds: Value,
    /// What it printed.
    pub output: RecordedOutput,
}

impl Manifest {
    /// Write as pretty JSON.
    ///
    /// # Errors
    /// [`DecodeError::Io`] naming the path.
    pub fn write(&self, path: &Path) -> Result<(), DecodeError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| DecodeError::Manifest {
            path: path.display().to_string(),
            problem: e.to_string(),
        })?;
        std::fs::write(path, text + "\n").map_err(|source| DecodeError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Read and check a manifest.
    ///
    /// # Errors
    /// [`DecodeError::Io`] when unreadable; [`DecodeError::Manifest`] when it is not a
    /// manifest of a version this crate reads.
    pub fn read(path: &Path) -> Result<Self, DecodeError> {
        let text = std::fs::read_to_string(path).map_err(|source| DecodeError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| DecodeError::Manifest {
            path: path.display().to_string(),
            problem: format!("not a tilt manifest: {e}"),
        })?;
        if m.manifest_version != MANIFEST_VERSION {
            return Err(DecodeError::Manifest {
                path: path.display().to_string(),
                problem: format!(
                    "manifest version {} (this tilt reads version {MANIFEST_VERSION})",
                    m.manifest_version
                ),
            });
        }
        Ok(m)
    }
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
        // An extra line: the whole line differs (recorded: absent).
        assert_eq!(
            (c.differences[1].line, c.differences[1].field.as_str()),
            (3, "")
        );
        assert_eq!(c.differences[1].expected, serde_json::Value::Null);
    }

    #[test]
    fn edited_manifest_is_inconsistent() {
        let mut rec = RecordedOutput::from_bytes(b"{\"a\":1}\n");
        rec.lines[0] = "{\"a\":5}".into();
        let c = compare_outputs(&rec, b"{\"a\":1}\n");
        assert!(!c.manifest_consistent && !c.identical);
        assert_eq!(c.differences[0].field, "a");
    }

    #[test]
    fn manifest_round_trips_and_bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest {
            manifest_version: MANIFEST_VERSION,
            tool_version: "0.1.0".into(),
            git_commit: "abc".into(),
            command: "generate".into(),
            args: vec!["--prompt".into(), "hi".into()],
            config: serde_json::json!({"n": 4}),
            seed: 3,
            files: vec![],
            host: HostInfo::current(2),
            wall_seconds: serde_json::json!({"total": 1.5}),
            output: RecordedOutput::from_bytes(b"{}\n"),
        };
        let p = dir.path().join("m.json");
        m.write(&p).unwrap();
        assert_eq!(Manifest::read(&p).unwrap(), m);
        std::fs::write(&p, "{").unwrap();
        assert!(Manifest::read(&p)
            .unwrap_err()
            .to_string()
            .contains("not a tilt manifest"));
        assert!(Manifest::read(&dir.path().join("none.json")).is_err());
    }
}
