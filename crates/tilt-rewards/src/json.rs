//! Reading scores that external rewards send as JSON.
//!
//! Two things a reward can send are not plain JSON numbers that fit an `f32`, and each must
//! be named for what it is, while the command and HTTP rewards go on (the stream is in
//! step: the reward *answered*):
//!
//! - JSON has no NaN or infinity, but Python's `json.dumps(float("nan"))` writes `NaN` (and
//!   `Infinity`, `-Infinity`), so a reward written in Python sends `{"score": NaN}` when its
//!   model misbehaves: a [`RewardError::NonFinite`](crate::RewardError::NonFinite) for that
//!   item.
//! - A finite number beyond `f32`'s range (`1e300`, or `1e400`, beyond even `f64`'s) is
//!   not infinite: it is a [`RewardError::OutOfRange`](crate::RewardError::OutOfRange)
//!   quoting the number.
//!
//! [`parse`] accepts the three literals wherever a JSON value may stand, and number
//! literals of any magnitude; [`sent`] turns a parsed value into a [`Sent`] score, and
//! [`check_sent`] checks a batch of them.

use crate::RewardError;

/// Private spellings the literals are rewritten to before serde_json sees the text: strings
/// no reward would send (they start with a NUL character).
const NAN: &str = "\u{0}NaN";
const INFINITY: &str = "\u{0}Infinity";
const NEG_INFINITY: &str = "\u{0}-Infinity";
/// Prefix of the private string a number literal beyond `f64`'s range is rewritten to
/// (followed by the literal as written).
const HUGE: &str = "\u{0}huge:";

/// One score as a reward sent it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Sent {
    /// A number (possibly beyond `f32`'s range).
    Number(f64),
    /// `NaN`, `Infinity` or `-Infinity`.
    NonFinite(f32),
    /// A number literal beyond `f64`'s range, as written (`1e400`).
    Huge(String),
}

/// Parse `text` as JSON, accepting `NaN`, `Infinity` and `-Infinity` as values and number
/// literals beyond `f64`'s range (which serde_json refuses).
///
/// # Errors
/// serde_json's error for text that is not JSON even so.
pub(crate) fn parse(text: &str) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::from_str(&rewrite(text))
}

/// The score a parsed JSON value stands for.
///
/// # Errors
/// A message saying what the value is instead (`null`, a string, an object, ...), in JSON.
pub(crate) fn sent(value: &serde_json::Value) -> Result<Sent, String> {
    match value {
        serde_json::Value::Number(n) => n
            .as_f64()
            .map(Sent::Number)
            .ok_or_else(|| format!("{n}, which is not representable")),
        serde_json::Value::String(s) if s == NAN => Ok(Sent::NonFinite(f32::NAN)),
        serde_json::Value::String(s) if s == INFINITY => Ok(Sent::NonFinite(f32::INFINITY)),
        serde_json::Value::String(s) if s == NEG_INFINITY => Ok(Sent::NonFinite(f32::NEG_INFINITY)),
        serde_json::Value::String(s) if s.starts_with(HUGE) => {
            Ok(Sent::Huge(s[HUGE.len()..].to_string()))
        }
        other => Err(format!("{}, not a number", shown(other))),
    }
}

/// A value as JSON, with the private spellings shown as the reward wrote them and long
/// values cut.
pub(crate) fn shown(value: &serde_json::Value) -> String {
    let mut text = value
        .to_string()
        .replace(&quoted(NAN), "NaN")
        .replace(&quoted(INFINITY), "Infinity")
        .replace(&quoted(NEG_INFINITY), "-Infinity");
    // `"\u0000huge:1e400"` back to `1e400`.
    let huge = &quoted(HUGE)[..quoted(HUGE).len() - 1];
    while let Some(at) = text.find(huge) {
        let start = at + huge.len();
        let Some(len) = text[start..].find('"') else {
            break;
        };
        let literal = text[start..start + len].to_string();
        text.replace_range(at..start + len + 1, &literal);
    }
    match text.char_indices().nth(200) {
        None => text,
        Some((cut, _)) => format!("{}… ({} bytes in all)", &text[..cut], text.len()),
    }
}

fn quoted(private: &str) -> String {
    serde_json::Value::String(private.to_string()).to_string()
}

/// Check that a batch has one score per pair and that every score is a finite `f32`.
///
/// # Errors
/// [`RewardError::Failed`] on a wrong count; then, for the first bad score in index order,
/// [`RewardError::NonFinite`] or [`RewardError::OutOfRange`].
pub(crate) fn check_sent(
    reward: &str,
    expected: usize,
    scores: Vec<Sent>,
) -> Result<Vec<f32>, RewardError> {
    if scores.len() != expected {
        return Err(RewardError::Failed {
            reward: reward.to_string(),
            message: format!("returned {} scores for {expected} pairs", scores.len()),
        });
    }
    scores
        .into_iter()
        .enumerate()
        .map(|(index, s)| {
            let out_of_range = |value: String| RewardError::OutOfRange {
                reward: reward.to_string(),
                index,
                value,
            };
            match s {
                Sent::Number(x) => {
                    let y = x as f32;
                    if y.is_finite() {
                        Ok(y)
                    } else {
                        // The shortest digits that read back as `x`: `1e300`.
                        Err(out_of_range(format!("{x:e}")))
                    }
                }
                Sent::NonFinite(value) => Err(RewardError::NonFinite {
                    reward: reward.to_string(),
                    index,
                    value,
                }),
                Sent::Huge(text) => Err(out_of_range(text)),
            }
        })
        .collect()
}

/// Replace, outside strings, the non-finite literals and number literals beyond `f64`'s
/// range by the private strings above. Outside a string, JSON has no letters but those of
/// `true`, `false` and `null` (and a number's exponent), so any `NaN` or `Infinity` there
/// is one of these literals (or invalid anyway).
fn rewrite(text: &str) -> std::borrow::Cow<'_, str> {
    let mut out: Option<String> = None;
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    let bytes = text.as_bytes();
    // Everything before `copied` is in `out` already (when `out` is `Some`).
    let mut copied = 0;
    let replace =
        |out: &mut Option<String>, copied: &mut usize, at: usize, len: usize, by: &str| {
            let o = out.get_or_insert_with(|| String::with_capacity(text.len() + 16));
            o.push_str(&text[*copied..at]);
            o.push_str(&serde_json::Value::String(by.to_string()).to_string());
            *copied = at + len;
        };
    while i < bytes.len() {
        let c = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        if !c.is_ascii() {
            // Not JSON outside a string; serde_json will say so. (Not a char boundary
            // either: skip byte by byte.)
            i += 1;
            continue;
        }
        let rest = &text[i..];
        if let Some((lit, private)) = [
            ("-Infinity", NEG_INFINITY),
            ("Infinity", INFINITY),
            ("NaN", NAN),
        ]
        .into_iter()
        .find(|(lit, _)| rest.starts_with(lit))
        {
            replace(&mut out, &mut copied, i, lit.len(), private);
            i += lit.len();
            continue;
        }
        if c == b'-' || c.is_ascii_digit() {
            let len = rest
                .bytes()
                .take_while(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
                .count();
            let literal = &rest[..len];
            // Rust reads any decimal literal, rounding beyond f64's range to ±∞.
            if literal.parse::<f64>().is_ok_and(f64::is_infinite) {
                replace(&mut out, &mut copied, i, len, &format!("{HUGE}{literal}"));
            }
            i += len.max(1);
            continue;
        }
        i += 1;
    }
    match out {
        None => std::borrow::Cow::Borrowed(text),
        Some(mut o) => {
            o.push_str(&text[copied..]);
            std::borrow::Cow::Owned(o)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(text: &str) -> Vec<Sent> {
        parse(text).unwrap()["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| sent(v).unwrap())
            .collect()
    }

    #[test]
    fn python_non_finite_literals_become_non_finite_scores() {
        let s = scores(r#"{"scores": [1.5, NaN, Infinity, -Infinity, -2]}"#);
        assert_eq!(s[0], Sent::Number(1.5));
        assert!(matches!(s[1], Sent::NonFinite(x) if x.is_nan()));
        assert_eq!(
            s[2..],
            [
                Sent::NonFinite(f32::INFINITY),
                Sent::NonFinite(f32::NEG_INFINITY),
                Sent::Number(-2.0)
            ]
        );
        assert!(matches!(sent(&parse("NaN").unwrap()).unwrap(), Sent::NonFinite(x) if x.is_nan()));
    }

    #[test]
    fn huge_numbers_are_out_of_range_and_quoted_not_infinite() {
        assert_eq!(sent(&parse("1e300").unwrap()).unwrap(), Sent::Number(1e300));
        // Beyond f64: serde_json alone would refuse the text.
        assert!(serde_json::from_str::<serde_json::Value>("[1e400]").is_err());
        let s = scores(r#"{"scores": [1e400, -2.5E+999, 3]}"#);
        assert_eq!(
            s,
            [
                Sent::Huge("1e400".into()),
                Sent::Huge("-2.5E+999".into()),
                Sent::Number(3.0)
            ]
        );
        let e = check_sent("r", 1, vec![Sent::Number(1e300)]).unwrap_err();
        assert!(
            matches!(&e, RewardError::OutOfRange { index: 0, value, .. } if value == "1e300"),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("1e300") && msg.contains("outside the range of f32"),
            "{msg}"
        );
        assert!(!msg.contains("inf") && !msg.contains("not finite"), "{msg}");
        let e =
            check_sent("r", 2, vec![Sent::Number(1.0), Sent::Huge("-1e400".into())]).unwrap_err();
        assert!(e.to_string().contains("score 1 is -1e400, outside"), "{e}");
        // f32's largest value is in range; the next representable f64 values that round
        // to it are too, those that round to infinity are not.
        assert_eq!(
            check_sent("r", 1, vec![Sent::Number(f64::from(f32::MAX))]).unwrap(),
            vec![f32::MAX]
        );
        assert!(check_sent("r", 1, vec![Sent::Number(3.5e38)]).is_err());
        // A real infinity stays a non-finite score.
        let e = check_sent("r", 1, vec![Sent::NonFinite(f32::INFINITY)]).unwrap_err();
        assert!(matches!(e, RewardError::NonFinite { index: 0, .. }), "{e}");
    }

    #[test]
    fn literals_inside_strings_are_left_alone() {
        let v = parse(r#"{"note": "NaN \" Infinity 1e400", "score": 1}"#).unwrap();
        assert_eq!(v["note"], "NaN \" Infinity 1e400");
        assert_eq!(sent(&v["score"]).unwrap(), Sent::Number(1.0));
        // A string that says NaN is a string, not a score.
        let e = sent(&parse(r#""NaN""#).unwrap()).unwrap_err();
        assert_eq!(e, "\"NaN\", not a number");
        // Ordinary numbers are left as serde_json reads them.
        assert_eq!(
            parse("[-0.5e-3, 12, 1E5]").unwrap(),
            serde_json::json!([-0.0005, 12, 100000.0])
        );
    }

    #[test]
    fn other_non_json_is_still_an_error() {
        assert!(parse("{\"score\": nan}").is_err());
        assert!(parse("{\"score\": NaNa}").is_err());
        assert!(parse("score: high").is_err());
        assert!(parse("1e400e").is_err());
        assert!(parse("--1").is_err());
        let e = sent(&serde_json::Value::Null).unwrap_err();
        assert_eq!(e, "null, not a number");
        let e = sent(&parse("[NaN, 1e400, \"x\"]").unwrap()).unwrap_err();
        assert_eq!(e, "[NaN,1e400,\"x\"], not a number");
        // Bytes that are not ASCII outside a string: an error, not a panic.
        assert!(parse("é1").is_err());
        assert!(parse("[1, é]").is_err());
    }
}
