//! Readers of reference-distribution files and reward-sample files.
//!
//! - A **distribution file** lists outcomes with their reference probability and reward:
//!   CSV with a header naming the columns `prob` and `reward` (others are ignored), or
//!   JSON lines `{"prob": …, "reward": …}` (chosen by a `.jsonl`/`.json` extension or a
//!   leading `{`). [`read_dist_file`] returns the two columns; build the distribution with
//!   [`RewardDistribution::new`](crate::RewardDistribution::new) (or `new_normalized`).
//! - A **sample file** holds one reward per line; [`read_samples`] returns them, for
//!   [`RewardDistribution::from_samples`](crate::RewardDistribution::from_samples).
//!
//! Blank lines are skipped. Every number must be finite, and a probability ≥ 0. Every error
//! is a [`TiltError::InvalidFile`] naming the file, the line (1-based) when one line is at
//! fault, and what is wrong with it.

use crate::{Result, TiltError};
use rayon::prelude::*;
use std::path::Path;

fn bad(path: &Path, line: Option<usize>, problem: impl Into<String>) -> TiltError {
    TiltError::InvalidFile {
        path: path.display().to_string(),
        line,
        problem: problem.into(),
    }
}

/// The text of `path`.
///
/// # Errors
/// [`TiltError::InvalidFile`] (`cannot read: …`) when the file cannot be read as UTF-8 text.
pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| bad(path, None, format!("cannot read: {e}")))
}

/// Check one number of line `line` of `path`, the value of `field`: finite, and ≥ 0 when
/// it is a probability (`field == "prob"`).
///
/// # Errors
/// [`TiltError::InvalidFile`] naming the line and the field.
pub fn checked(path: &Path, line: usize, field: &str, x: f64) -> Result<f64> {
    if !x.is_finite() {
        return Err(bad(
            path,
            Some(line),
            format!("{field} is {x}, not a finite number"),
        ));
    }
    if field == "prob" && x < 0.0 {
        return Err(bad(path, Some(line), format!("prob {x} is negative")));
    }
    Ok(x)
}

/// Read a distribution file (CSV `prob,reward` or JSON lines, see the [module
/// documentation](self)): the probabilities and the rewards, in file order, at least one
/// outcome. The probabilities are not yet checked to sum to 1.
///
/// # Errors
/// [`TiltError::InvalidFile`]: unreadable, empty, no `prob`/`reward` columns, a row with
/// another number of fields than the header, a line that is not JSON or lacks a number
/// field, a number that is not finite, a negative probability, no outcomes.
pub fn read_dist_file(path: &Path) -> Result<(Vec<f64>, Vec<f64>)> {
    let text = read(path)?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let jsonl = ext == "jsonl" || ext == "json" || text.trim_start().starts_with('{');
    let (mut probs, mut rewards) = (Vec::new(), Vec::new());
    if jsonl {
        for (i, line) in text.lines().enumerate() {
            let ln = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| bad(path, Some(ln), format!("not JSON: {e}")))?;
            let field = |k: &str| -> Result<f64> {
                let x = v
                    .get(k)
                    .and_then(serde_json::Value::as_f64)
                    .ok_or_else(|| bad(path, Some(ln), format!("no number field \"{k}\"")))?;
                checked(path, ln, k, x)
            };
            probs.push(field("prob")?);
            rewards.push(field("reward")?);
        }
    } else {
        // The header is the first non-blank line (`header_line`, 1-based); the rows start
        // after it, at byte `body_start`.
        let mut offset = 0;
        let mut header_line = 0;
        let mut header_text = None;
        for raw in text.split_inclusive('\n') {
            header_line += 1;
            offset += raw.len();
            let line = raw.trim_end_matches('\n').trim_end_matches('\r');
            if !line.trim().is_empty() {
                header_text = Some(line);
                break;
            }
        }
        let body_start = offset;
        let header: Vec<String> = match header_text {
            Some(h) => h
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect(),
            None => return Err(bad(path, None, "empty file")),
        };
        let (pi, ri) = match (
            header.iter().position(|h| h == "prob"),
            header.iter().position(|h| h == "reward"),
        ) {
            (Some(p), Some(r)) => (p, r),
            _ => {
                return Err(bad(
                    path,
                    Some(1),
                    format!(
                        "expected a CSV header with columns prob,reward (got {:?})",
                        header.join(",")
                    ),
                ))
            }
        };
        // The rows after the header, parsed in parallel over spans of whole lines (each
        // span knows its first line number; the first bad row in file order is the one
        // reported, so the result does not depend on the thread count).
        let body_line = header_line + 1;
        let body = &text[body_start..];
        let spans = line_spans(body, 1 << 20);
        let newlines: Vec<usize> = spans
            .par_iter()
            .map(|s| s.bytes().filter(|&b| b == b'\n').count())
            .collect();
        let mut first_line = Vec::with_capacity(spans.len());
        let mut at = body_line;
        for n in &newlines {
            first_line.push(at);
            at += n;
        }
        let width = header.len();
        let parsed: Vec<Result<(Vec<f64>, Vec<f64>)>> = spans
            .par_iter()
            .zip(first_line)
            .map(|(span, first)| csv_rows(path, span, first, width, pi, ri))
            .collect();
        for part in parsed {
            let (p, r) = part?;
            probs.extend_from_slice(&p);
            rewards.extend_from_slice(&r);
        }
    }
    if probs.is_empty() {
        return Err(bad(path, None, "no outcomes"));
    }
    Ok((probs, rewards))
}

/// `text` cut into spans of about `target` bytes, each ending just after a `\n` (the last
/// one at the end of `text`).
fn line_spans(text: &str, target: usize) -> Vec<&str> {
    let mut spans = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let cut = if rest.len() <= target {
            rest.len()
        } else {
            match rest.as_bytes()[target..].iter().position(|&b| b == b'\n') {
                Some(i) => target + i + 1,
                None => rest.len(),
            }
        };
        let (span, tail) = rest.split_at(cut);
        spans.push(span);
        rest = tail;
    }
    spans
}

/// The `prob` and `reward` cells (columns `pi`, `ri` of `width`) of the CSV rows in `span`,
/// whose first line is line `first` of the file; blank lines are skipped.
fn csv_rows(
    path: &Path,
    span: &str,
    first: usize,
    width: usize,
    pi: usize,
    ri: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut probs, mut rewards) = (Vec::new(), Vec::new());
    for (i, line) in span.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ln = first + i;
        let (mut p, mut r, mut count) = ("", "", 0);
        for (j, cell) in line.split(',').enumerate() {
            if j == pi {
                p = cell.trim();
            }
            if j == ri {
                r = cell.trim();
            }
            count += 1;
        }
        if count != width {
            return Err(bad(
                path,
                Some(ln),
                format!("{count} fields, the header has {width}"),
            ));
        }
        let num = |k: &str, s: &str| -> Result<f64> {
            let x = s
                .parse::<f64>()
                .map_err(|_| bad(path, Some(ln), format!("{k} {s:?} is not a number")))?;
            checked(path, ln, k, x)
        };
        probs.push(num("prob", p)?);
        rewards.push(num("reward", r)?);
    }
    Ok((probs, rewards))
}

/// Read a file of reward samples, one finite number per line (blank lines skipped), at
/// least one.
///
/// # Errors
/// [`TiltError::InvalidFile`]: unreadable, a line that is not a finite number, no samples.
pub fn read_samples(path: &Path) -> Result<Vec<f64>> {
    let text = read(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let s = line.trim();
        if s.is_empty() {
            continue;
        }
        let x = s
            .parse::<f64>()
            .map_err(|_| bad(path, Some(i + 1), format!("{s:?} is not a number")))?;
        out.push(checked(path, i + 1, "reward", x)?);
    }
    if out.is_empty() {
        return Err(bad(path, None, "no reward samples"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::path::PathBuf;

    /// A file under the system's temporary directory, removed when dropped.
    struct Temp(PathBuf);

    impl Temp {
        fn new(name: &str, text: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "tilt-core-input-{}-{}",
                std::process::id(),
                name.replace('.', "-")
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            Temp(path)
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn message(r: Result<impl std::fmt::Debug>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(e.is_input_error());
        e.to_string()
    }

    #[test]
    fn good_files_parse() {
        let csv = Temp::new("d.csv", "Reward, Prob ,note\n\n1,0.25,a\n 2.5 ,0.75,b\n");
        assert_eq!(
            read_dist_file(&csv.0).unwrap(),
            (vec![0.25, 0.75], vec![1.0, 2.5])
        );
        let jsonl = Temp::new(
            "d.jsonl",
            "{\"prob\": 0.5, \"reward\": -1}\n\n{\"reward\": 3, \"prob\": 0.5}\n",
        );
        assert_eq!(
            read_dist_file(&jsonl.0).unwrap(),
            (vec![0.5, 0.5], vec![-1.0, 3.0])
        );
        // A leading `{` makes JSON lines whatever the extension.
        let txt = Temp::new("d.txt", "  {\"prob\": 1, \"reward\": 0}\n");
        assert_eq!(read_dist_file(&txt.0).unwrap(), (vec![1.0], vec![0.0]));
        let samples = Temp::new("s.txt", "0.5\n\n -2 \n1e3\n");
        assert_eq!(read_samples(&samples.0).unwrap(), vec![0.5, -2.0, 1000.0]);
    }

    #[test]
    fn a_large_csv_parses_in_spans_with_file_line_numbers() {
        // Well over one parsing span (1 MiB), with blank lines before the header and
        // between rows, CRLF endings and a third column: values in order, and a bad row
        // deep inside is named by its line in the file; of two bad rows, the first.
        let rows = 150_000;
        let mut text = String::from("\n\nreward,note,prob\r\n");
        let mut want = (Vec::new(), Vec::new());
        for i in 0..rows {
            let (p, r) = (1.0 / rows as f64, (i as f64 * 0.37).sin());
            text.push_str(&format!("{r:?}, x ,{p:?}\r\n"));
            if i % 1000 == 0 {
                text.push('\n');
            }
            want.0.push(p);
            want.1.push(r);
        }
        let good = Temp::new("big.csv", &text);
        assert!(text.len() > 3 << 20);
        assert_eq!(read_dist_file(&good.0).unwrap(), want);
        let lines: Vec<&str> = text.split('\n').collect();
        let bad_at = |n: usize, cell: &str| -> Vec<String> {
            lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    if i + 1 == n {
                        format!("{cell}, x ,0.1\r")
                    } else {
                        (*l).to_owned()
                    }
                })
                .collect()
        };
        let mut two = bad_at(120_001, "oops");
        two[140_000] = "1,2\r".into(); // a later, different fault
        let bad = Temp::new("bad_big.csv", &two.join("\n"));
        let name = bad.0.display().to_string();
        assert_eq!(
            message(read_dist_file(&bad.0)),
            format!("{name} line 120001: reward \"oops\" is not a number")
        );
    }

    #[test]
    fn a_bad_line_is_named_with_its_number() {
        let csv = Temp::new("bad.csv", "prob,reward\n0.5,1\n\n0.5,x\n");
        let name = csv.0.display().to_string();
        assert_eq!(
            message(read_dist_file(&csv.0)),
            format!("{name} line 4: reward \"x\" is not a number")
        );
        match read_dist_file(&csv.0).unwrap_err() {
            TiltError::InvalidFile { path, line, .. } => {
                assert_eq!((path, line), (name, Some(4)));
            }
            other => panic!("{other:?}"),
        }
        let short = Temp::new("short.csv", "prob,reward\n0.5\n");
        assert!(message(read_dist_file(&short.0)).ends_with(" line 2: 1 fields, the header has 2"));
        let negative = Temp::new("neg.csv", "prob,reward\n-0.5,1\n");
        assert!(message(read_dist_file(&negative.0)).ends_with(" line 2: prob -0.5 is negative"));
        let header = Temp::new("hdr.csv", "p,r\n0.5,1\n");
        assert!(message(read_dist_file(&header.0))
            .ends_with(" line 1: expected a CSV header with columns prob,reward (got \"p,r\")"));
        let json = Temp::new("bad.jsonl", "{\"prob\": 1, \"reward\": 0}\n{\"prob\": 1}\n");
        assert!(message(read_dist_file(&json.0)).ends_with(" line 2: no number field \"reward\""));
        let not_json = Temp::new("nj.jsonl", "\n[oops\n");
        assert!(message(read_dist_file(&not_json.0)).contains(" line 2: not JSON: "));
        let inf = Temp::new("inf.txt", "1\ninf\n");
        assert!(
            message(read_samples(&inf.0)).ends_with(" line 2: reward is inf, not a finite number")
        );
        let word = Temp::new("word.txt", "1\n\nabc\n");
        assert!(message(read_samples(&word.0)).ends_with(" line 3: \"abc\" is not a number"));
    }

    #[test]
    fn whole_file_problems_name_no_line() {
        let empty = Temp::new("empty.csv", "\n \n");
        let name = empty.0.display().to_string();
        assert_eq!(
            message(read_dist_file(&empty.0)),
            format!("{name}: empty file")
        );
        let header_only = Temp::new("h.csv", "prob,reward\n");
        assert!(message(read_dist_file(&header_only.0)).ends_with(": no outcomes"));
        let no_samples = Temp::new("none.txt", "\n");
        assert!(message(read_samples(&no_samples.0)).ends_with(": no reward samples"));
        let missing = std::env::temp_dir().join("tilt-core-input-missing/none.csv");
        assert!(message(read_dist_file(&missing)).contains("none.csv: cannot read: "));
    }
}
