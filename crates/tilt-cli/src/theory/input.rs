//! Where a reference distribution comes from: `--probs/--rewards`, `--dist FILE`, or
//! `--samples FILE`, turned into one validated [`RewardDistribution`].
//!
//! The files are read by [`tilt_core::input`]. Every error names the flag, or the file and
//! line, and what was wrong with it, so the binary can print it as one line and exit 2.

use crate::usage;
use clap::Args;
use std::path::{Path, PathBuf};
use tilt_core::input::{read_dist_file, read_samples};
use tilt_core::{ErrorKind, RewardDistribution, TiltError};

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
        other => internal(other),
    }
}

/// A failure while running (exit code 1): the library's error as one line, no longer a
/// [`TiltError`] (which the binary's `main` would report as bad input).
pub fn internal(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
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

/// Turn an error of `tilt-core` into what the user should read, by whose fault it is
/// ([`TiltError::kind`]):
///
/// - bad input about a name that is a flag the user typed (`flags`: `n`, `kl`, `beta`, …)
///   is a usage error naming the flag (`--n`, `--kl`, …), exit code 2;
/// - bad input about anything else (a quantity the command derived, such as the KL of a
///   tilt given by `--beta`, or `sigma2`) is not the user's input: it, and every internal
///   failure (a solver that did not converge), is a failure while running, exit code 1,
///   with the library's names and no `--`.
///
/// So an error never blames a flag the user did not give.
pub fn flag_error(flags: Flags) -> impl Fn(TiltError) -> anyhow::Error {
    move |e| match e.kind() {
        ErrorKind::InvalidInput => {
            let name = match &e {
                TiltError::InvalidInput { input, .. } => input.as_str(),
                _ => "kl",
            };
            match (flags.flag(name), &e) {
                (Some(flag), TiltError::InvalidInput { problem, .. }) => {
                    usage(format!("{flag}: {problem}"))
                }
                (Some(flag), _) => usage(format!("{flag}: {e}")),
                (None, _) => internal(format!("internal error: {e}")),
            }
        }
        ErrorKind::Internal => internal(e),
    }
}

/// Check a `--plot` path before any work ([`tilt_plot::check_output`]: `.svg`, a directory
/// that exists, writable, not a directory).
///
/// # Errors
/// A usage error naming `--plot` and the path.
pub fn check_plot(path: &Path) -> anyhow::Result<()> {
    tilt_plot::check_output(path).map_err(plot_error)
}

/// A plot error for the user: a bad path is a usage error naming `--plot` (exit code 2);
/// a failure while drawing or writing is exit code 1.
pub fn plot_error(e: tilt_plot::PlotError) -> anyhow::Error {
    if e.is_input_error() {
        usage(format!("--plot {e}"))
    } else {
        internal(e)
    }
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
                let (probs, rewards) = read_dist_file(path).map_err(usage)?;
                let n = path.display().to_string();
                build(probs, rewards, self.normalize, &n, &n)
            }
            (None, None, None, Some(path)) => {
                let samples = read_samples(path).map_err(usage)?;
                let n = path.display().to_string();
                RewardDistribution::from_samples(&samples).map_err(|e| renamed(e, &n, &n))
            }
            _ => Err(usage(
                "no reference distribution: give --probs P --rewards R, --dist FILE, or --samples FILE",
            )),
        }
    }
}

/// Parse a count such as `--n 16`, `--n 1e15` or `--n 2.5e3`: an exact non-negative whole
/// number, in decimal or scientific notation, read digit by digit (never through a
/// float, which would round 18446744073709551617 to 2^64 and clamp it).
///
/// # Errors
/// `"… is not a non-negative whole number"`, or `"… exceeds the largest supported n,
/// 18446744073709551615"` for a whole number above `u64::MAX`.
pub fn parse_count(s: &str) -> Result<u64, String> {
    parse_count_at_most(s, u64::MAX, "n")
}

/// [`parse_count`] with a cap: a whole number above `max` is `"… exceeds the largest
/// supported {what}, {max}"`.
///
/// # Errors
/// As [`parse_count`].
pub fn parse_count_at_most(s: &str, max: u64, what: &str) -> Result<u64, String> {
    let not_whole = || format!("{s:?} is not a non-negative whole number");
    let too_large = || format!("{s:?} exceeds the largest supported {what}, {max}");
    let t = s.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => {
            let e = &t[i + 1..];
            let e = e.strip_prefix('+').unwrap_or(e);
            let digits = e.strip_prefix('-').unwrap_or(e);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(not_whole());
            }
            // Exponents beyond ±1000 saturate: a mantissa with a non-zero digit is then far
            // out of range either way.
            let value: i64 = e
                .parse()
                .unwrap_or(if e.starts_with('-') { -1000 } else { 1000 });
            (&t[..i], value.clamp(-1000, 1000))
        }
        None => (t, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part
            .bytes()
            .chain(frac_part.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(not_whole());
    }
    // The value is digits × 10^(exponent − len(frac)).
    let all_digits = format!("{int_part}{frac_part}");
    let digits = all_digits.trim_start_matches('0');
    let shift = exponent - frac_part.len() as i64;
    let (whole, dropped) = if shift >= 0 {
        if digits.is_empty() {
            return Ok(0);
        }
        if digits.len() as i64 + shift > 20 {
            return Err(too_large());
        }
        (format!("{digits}{}", "0".repeat(shift as usize)), "")
    } else {
        let cut = digits.len().saturating_sub((-shift) as usize);
        (digits[..cut].to_string(), &digits[cut..])
    };
    if dropped.bytes().any(|b| b != b'0') {
        return Err(not_whole());
    }
    if whole.is_empty() {
        return Ok(0);
    }
    match whole.parse::<u128>() {
        Ok(v) if v <= max as u128 => Ok(v as u64),
        _ => Err(too_large()),
    }
}

/// A comma-separated list of counts given to `flag`, each at most `max` (`what` names a
/// count in errors, e.g. `length`).
///
/// # Errors
/// A usage error naming `flag` and the entry.
pub fn parse_count_list(flag: &str, text: &str, max: u64, what: &str) -> anyhow::Result<Vec<u64>> {
    if text.trim().is_empty() {
        return Err(usage(format!("{flag}: empty list")));
    }
    text.split(',')
        .enumerate()
        .map(|(i, s)| {
            parse_count_at_most(s.trim(), max, what)
                .map_err(|e| usage(format!("{flag}: entry {}: {e}", i + 1)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(e: anyhow::Error) -> String {
        e.to_string()
    }

    fn is_usage(e: &anyhow::Error) -> bool {
        e.downcast_ref::<crate::Exit>().is_some_and(|x| x.code == 2)
    }

    #[test]
    fn only_real_flags_are_named_as_flags() {
        const FLAGS: Flags = Flags(&[("n", "--n"), ("kl", "--kls")]);
        let f = flag_error(FLAGS);
        let e = f(TiltError::invalid("n", "must be at least 1"));
        assert!(is_usage(&e));
        assert_eq!(message(e), "--n: must be at least 1");
        assert_eq!(
            message(f(TiltError::invalid("kl", "too big"))),
            "--kls: too big"
        );
        // A derived quantity is not the user's input: an internal failure (exit 1), named
        // as the library names it, never as a flag.
        for name in ["sigma2", "epsilon", "x", "beta"] {
            let e = f(TiltError::invalid(name, "bad"));
            assert!(!is_usage(&e), "{name}");
            assert!(e.downcast_ref::<TiltError>().is_none(), "main would exit 2");
            let m = message(e);
            assert_eq!(m, format!("internal error: {name}: bad"));
            assert!(!m.contains("--"), "{m}");
        }
        let too_large = f(TiltError::KlBudgetTooLarge {
            requested: 2.0,
            max: 1.0,
        });
        assert!(is_usage(&too_large));
        assert!(message(too_large).starts_with("--kls: KL budget 2"));
        let none = flag_error(Flags(&[("n", "--n")]));
        let e = none(TiltError::KlBudgetTooLarge {
            requested: 2.0,
            max: 1.0,
        });
        assert!(!is_usage(&e));
        assert!(message(e).contains("KL budget 2"));
        // A solver that does not converge is a failure while running, not bad input.
        let e = f(TiltError::NoConvergence {
            what: "β".into(),
            detail: "no bracket".into(),
        });
        assert!(!is_usage(&e) && e.downcast_ref::<TiltError>().is_none());
    }

    #[test]
    fn plot_paths_are_checked_through_tilt_plot() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_plot(&dir.path().join("a.SVG")).is_ok());
        for (path, needle) in [
            (dir.path().join("a.png"), ".png is not supported"),
            (dir.path().join("missing").join("a.svg"), "does not exist"),
            (dir.path().to_path_buf(), "is a directory"),
        ] {
            let e = check_plot(&path).unwrap_err();
            assert!(is_usage(&e));
            let m = message(e);
            assert!(m.starts_with("--plot ") && m.contains(needle), "{m}");
        }
        let late = plot_error(tilt_plot::PlotError::Backend {
            path: "a.svg".into(),
            message: "disk full".into(),
        });
        assert!(!is_usage(&late), "a failure while writing is exit 1");
    }

    #[test]
    fn counts_are_exact_and_too_large_is_its_own_error() {
        assert_eq!(parse_count("16"), Ok(16));
        assert_eq!(parse_count("1e15"), Ok(1_000_000_000_000_000));
        assert_eq!(parse_count("2.5e3"), Ok(2500));
        assert_eq!(parse_count("+7"), Ok(7));
        assert_eq!(parse_count("0"), Ok(0));
        assert_eq!(parse_count("0e400"), Ok(0));
        assert_eq!(parse_count("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_count("1.8446744073709551615e19"), Ok(u64::MAX));
        for big in [
            "18446744073709551616",
            "1e20",
            "1e400",
            "99999999999999999999999",
        ] {
            let e = parse_count(big).unwrap_err();
            assert!(
                e.ends_with("exceeds the largest supported n, 18446744073709551615"),
                "{big}: {e}"
            );
        }
        for bad in [
            "2.5", "-1", "abc", "", "1e-3", "1e", "e5", ".", "1e1.5", "0x10", "inf", "1e-",
        ] {
            let e = parse_count(bad).unwrap_err();
            assert!(
                e.ends_with("is not a non-negative whole number"),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            parse_count_at_most("2e9", 1_000_000_000, "length").unwrap_err(),
            "\"2e9\" exceeds the largest supported length, 1000000000"
        );
        let e = parse_count_list("--lengths", "10,1e10", 1_000_000_000, "length").unwrap_err();
        assert!(is_usage(&e));
        assert!(message(e).starts_with("--lengths: entry 2: \"1e10\" exceeds"));
    }
}
