//! Where a reference distribution comes from: `--probs/--rewards`, `--dist FILE`, or
//! `--samples FILE`, turned into one validated [`RewardDistribution`].
//!
//! Every error names the flag, or the file and line, and what was wrong with it, so the
//! binary can print it as one line and exit 2.

use crate::usage;
use clap::Args;
use std::path::{Path, PathBuf};
use tilt_core::{RewardDistribution, TiltError};

/// The reference distribution of a theory command.
#[derive(Debug, Clone, Args)]
pub struct DistributionArgs {
    /// Reference probabilities, comma separated (e.g. 0.2,0.3,0.5); with --rewards.
    #[arg(long, requires = "rewards", conflicts_with_all = ["dist", "samples"], allow_hyphen_values = true)]
    pub probs: Option<String>,
    /// Rewards of the same outcomes, comma separated (e.g. 0,1,2); with --probs.
    #[arg(long, requires = "probs", allow_hyphen_values = true)]
    pub rewards: Option<String>,
    /// A distribution file: CSV with header `prob,reward`, or JSON lines
    /// `{"prob": …, "reward": …}` (chosen by a `.jsonl`/`.json` extension or a leading `{`).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["samples", "rewards"])]
    pub dist: Option<PathBuf>,
    /// Reward samples, one per line: the reference is their empirical distribution.
    #[arg(long, value_name = "FILE", conflicts_with = "rewards")]
    pub samples: Option<PathBuf>,
    /// Rescale the probabilities to sum to 1 instead of rejecting a sum ≠ 1 (tolerance 1e-9).
    #[arg(long)]
    pub normalize: bool,
}

/// Parse a comma-separated list of numbers given to `flag` (e.g. `--probs`).
///
/// # Errors
/// A usage error (exit code 2) naming `flag` when the list is empty or an entry is not a
/// number.
pub fn parse_list(flag: &str, text: &str) -> anyhow::Result<Vec<f64>> {
    if text.trim().is_empty() {
        return Err(usage(format!("{flag}: empty list")));
    }
    text.split(',')
        .enumerate()
        .map(|(i, s)| {
            let s = s.trim();
            s.parse::<f64>()
                .map_err(|_| usage(format!("{flag}: entry {} {s:?} is not a number", i + 1)))
        })
        .collect()
}

/// Rename the library's input names to what the user typed.
fn renamed(e: TiltError, probs: &str, rewards: &str) -> anyhow::Error {
    match e {
        TiltError::InvalidInput { input, problem } => {
            let input = match input.as_str() {
                "probs" => probs.to_string(),
                "rewards" => rewards.to_string(),
                "samples" => rewards.to_string(),
                "probs/rewards" => format!("{probs}/{rewards}"),
                _ => input,
            };
            let problem = problem.replace("use normalisation", "use --normalize");
            usage(format!("{input}: {problem}"))
        }
        other => usage(other),
    }
}

fn build(
    probs: Vec<f64>,
    rewards: Vec<f64>,
    normalize: bool,
    pn: &str,
    rn: &str,
) -> anyhow::Result<RewardDistribution> {
    let d = if normalize {
        RewardDistribution::new_normalized(probs, rewards)
    } else {
        RewardDistribution::new(probs, rewards)
    };
    d.map_err(|e| renamed(e, pn, rn))
}

/// How the input names of `tilt-core`'s errors map to the flags of one command: pairs
/// `(library name, flag as typed)`, e.g. `("kl", "--kls")` where one flag lists several
/// budgets. Only names listed here are reported as flags.
#[derive(Debug, Clone, Copy)]
pub struct Flags(pub &'static [(&'static str, &'static str)]);

impl Flags {
    fn flag(self, input: &str) -> Option<&'static str> {
        self.0
            .iter()
            .find(|(name, _)| *name == input)
            .map(|(_, flag)| *flag)
    }
}

/// Turn an error of `tilt-core` about a parameter (`n`, `kl`, `beta`, …) into a usage error
/// naming the flag the user typed (`--n`, `--kl`, …), for the names that are flags of the
/// command (`flags`). Any other input (a derived quantity such as `sigma2` or `epsilon`)
/// keeps the library's name, without a `--`.
pub fn flag_error(flags: Flags) -> impl Fn(TiltError) -> anyhow::Error {
    move |e| match e {
        TiltError::InvalidInput { input, problem } => match flags.flag(&input) {
            Some(flag) => usage(format!("{flag}: {problem}")),
            None => usage(format!("{input}: {problem}")),
        },
        e @ TiltError::KlBudgetTooLarge { .. } => match flags.flag("kl") {
            Some(flag) => usage(format!("{flag}: {e}")),
            None => usage(e),
        },
        other => anyhow::Error::new(other),
    }
}

/// Check that a `--plot` path names an SVG file (extension `.svg`, any case).
///
/// # Errors
/// A usage error naming `--plot` otherwise.
pub fn check_svg_path(path: &Path) -> anyhow::Result<()> {
    let svg = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    if svg {
        Ok(())
    } else {
        Err(usage(format!(
            "--plot: {} must end in .svg",
            path.display()
        )))
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| usage(format!("{}: cannot read: {e}", path.display())))
}

/// Check one number from a file: finite, and ≥ 0 when it is a probability.
fn checked(path: &Path, line: usize, field: &str, x: f64) -> anyhow::Result<f64> {
    if !x.is_finite() {
        return Err(usage(format!(
            "{} line {line}: {field} is {x}, not a finite number",
            path.display()
        )));
    }
    if field == "prob" && x < 0.0 {
        return Err(usage(format!(
            "{} line {line}: prob {x} is negative",
            path.display()
        )));
    }
    Ok(x)
}

fn read_dist_file(path: &Path) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let text = read(path)?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let jsonl = ext == "jsonl" || ext == "json" || text.trim_start().starts_with('{');
    let (mut probs, mut rewards) = (Vec::new(), Vec::new());
    let name = path.display();
    if jsonl {
        for (i, line) in text.lines().enumerate() {
            let ln = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| usage(format!("{name} line {ln}: not JSON: {e}")))?;
            let field = |k: &str| -> anyhow::Result<f64> {
                let x = v
                    .get(k)
                    .and_then(serde_json::Value::as_f64)
                    .ok_or_else(|| usage(format!("{name} line {ln}: no number field \"{k}\"")))?;
                checked(path, ln, k, x)
            };
            probs.push(field("prob")?);
            rewards.push(field("reward")?);
        }
    } else {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let header: Vec<String> = match lines.next() {
            Some((_, h)) => h
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect(),
            None => return Err(usage(format!("{name}: empty file"))),
        };
        let (pi, ri) = match (
            header.iter().position(|h| h == "prob"),
            header.iter().position(|h| h == "reward"),
        ) {
            (Some(p), Some(r)) => (p, r),
            _ => {
                return Err(usage(format!(
                    "{name} line 1: expected a CSV header with columns prob,reward (got {:?})",
                    header.join(",")
                )))
            }
        };
        for (i, line) in lines {
            let ln = i + 1;
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            if cells.len() != header.len() {
                return Err(usage(format!(
                    "{name} line {ln}: {} fields, the header has {}",
                    cells.len(),
                    header.len()
                )));
            }
            let num = |k: &str, s: &str| -> anyhow::Result<f64> {
                let x = s
                    .parse::<f64>()
                    .map_err(|_| usage(format!("{name} line {ln}: {k} {s:?} is not a number")))?;
                checked(path, ln, k, x)
            };
            probs.push(num("prob", cells[pi])?);
            rewards.push(num("reward", cells[ri])?);
        }
    }
    if probs.is_empty() {
        return Err(usage(format!("{name}: no outcomes")));
    }
    Ok((probs, rewards))
}

fn read_samples(path: &Path) -> anyhow::Result<Vec<f64>> {
    let text = read(path)?;
    let name = path.display();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let s = line.trim();
        if s.is_empty() {
            continue;
        }
        let x = s
            .parse::<f64>()
            .map_err(|_| usage(format!("{name} line {}: {s:?} is not a number", i + 1)))?;
        out.push(checked(path, i + 1, "reward", x)?);
    }
    if out.is_empty() {
        return Err(usage(format!("{name}: no reward samples")));
    }
    Ok(out)
}

impl DistributionArgs {
    /// How the user gave the rewards: `--rewards`, or the `--dist`/`--samples` file.
    pub fn rewards_name(&self) -> String {
        match (&self.dist, &self.samples) {
            (Some(path), _) | (None, Some(path)) => path.display().to_string(),
            (None, None) => "--rewards".to_string(),
        }
    }

    /// The validated reference distribution.
    ///
    /// # Errors
    /// A usage error naming the flag or file (and line) and the problem.
    pub fn load(&self) -> anyhow::Result<RewardDistribution> {
        match (&self.probs, &self.rewards, &self.dist, &self.samples) {
            (Some(p), Some(r), None, None) => {
                let probs = parse_list("--probs", p)?;
                let rewards = parse_list("--rewards", r)?;
                build(probs, rewards, self.normalize, "--probs", "--rewards")
            }
            (None, None, Some(path), None) => {
                let (probs, rewards) = read_dist_file(path)?;
                let n = path.display().to_string();
                build(probs, rewards, self.normalize, &n, &n)
            }
            (None, None, None, Some(path)) => {
                let samples = read_samples(path)?;
                let n = path.display().to_string();
                RewardDistribution::from_samples(&samples).map_err(|e| renamed(e, &n, &n))
            }
            _ => Err(usage(
                "no reference distribution: give --probs P --rewards R, --dist FILE, or --samples FILE",
            )),
        }
    }
}

/// Parse a count such as `--n 16` or `--n 1e15` (an exact non-negative integer, possibly in
/// scientific notation).
pub fn parse_count(s: &str) -> Result<u64, String> {
    if let Ok(v) = s.trim().parse::<u64>() {
        return Ok(v);
    }
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x <= u64::MAX as f64 => {
            Ok(x as u64)
        }
        _ => Err(format!("{s:?} is not a non-negative whole number")),
    }
}

/// A number for JSON output: non-finite values (β = ∞ at KL = 0, an infinite divergence)
/// become the strings `"inf"`, `"-inf"` or `"nan"`, since JSON has no infinity.
pub fn json_number(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else if x == f64::INFINITY {
        serde_json::json!("inf")
    } else if x == f64::NEG_INFINITY {
        serde_json::json!("-inf")
    } else {
        serde_json::json!("nan")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(e: anyhow::Error) -> String {
        e.to_string()
    }

    #[test]
    fn only_real_flags_are_named_as_flags() {
        const FLAGS: Flags = Flags(&[("n", "--n"), ("kl", "--kls")]);
        let f = flag_error(FLAGS);
        assert_eq!(
            message(f(TiltError::invalid("n", "must be at least 1"))),
            "--n: must be at least 1"
        );
        assert_eq!(
            message(f(TiltError::invalid("kl", "too big"))),
            "--kls: too big"
        );
        for name in ["sigma2", "epsilon", "x"] {
            let m = message(f(TiltError::invalid(name, "bad")));
            assert_eq!(m, format!("{name}: bad"));
            assert!(!m.contains("--"), "{m}");
        }
        let too_large = f(TiltError::KlBudgetTooLarge {
            requested: 2.0,
            max: 1.0,
        });
        assert!(message(too_large).starts_with("--kls: KL budget 2"));
        let none = flag_error(Flags(&[("n", "--n")]));
        let m = message(none(TiltError::KlBudgetTooLarge {
            requested: 2.0,
            max: 1.0,
        }));
        assert!(m.starts_with("KL budget 2"), "{m}");
    }

    #[test]
    fn svg_extension_in_any_case() {
        assert!(check_svg_path(Path::new("a.svg")).is_ok());
        assert!(check_svg_path(Path::new("a.SVG")).is_ok());
        assert!(check_svg_path(Path::new("dir/a.Svg")).is_ok());
        assert!(check_svg_path(Path::new("a.png")).is_err());
        assert!(check_svg_path(Path::new("svg")).is_err());
    }
}
