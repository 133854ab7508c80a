//! Reading scores from JSON that may hold Python's non-finite literals.
//!
//! JSON has no NaN or infinity, but Python's `json.dumps(float("nan"))` writes `NaN` (and
//! `Infinity`, `-Infinity`), so a reward written in Python sends `{"score": NaN}` when its
//! model misbehaves. That is the reward's *answer*, not a broken stream: it must become a
//! [`RewardError::NonFinite`](crate::RewardError::NonFinite) for that item, while the
//! command and HTTP rewards go on. [`parse`] accepts those three literals wherever a JSON
//! value may stand; [`score`] turns a parsed value into an `f32` (non-finite included, for
//! [`check_scores`](crate::check_scores) to name).

/// Private spellings the literals are rewritten to before serde_json sees the text: strings
/// no reward would send (they start with a NUL character).
const NAN: &str = "\u{0}NaN";
const INFINITY: &str = "\u{0}Infinity";
const NEG_INFINITY: &str = "\u{0}-Infinity";

/// Parse `text` as JSON, accepting `NaN`, `Infinity` and `-Infinity` as values.
///
/// # Errors
/// serde_json's error for text that is not JSON even with those literals.
pub(crate) fn parse(text: &str) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::from_str(&rewrite_non_finite(text))
}

/// The score a parsed JSON value stands for: a number (as `f32`: beyond f32's range
/// becomes ±∞) or one of the non-finite literals.
///
/// # Errors
/// A message saying what the value is instead (`null`, a string, an object, ...).
pub(crate) fn score(value: &serde_json::Value) -> Result<f32, String> {
    match value {
        serde_json::Value::Number(n) => n
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| format!("{n} is not representable")),
        serde_json::Value::String(s) if s == NAN => Ok(f32::NAN),
        serde_json::Value::String(s) if s == INFINITY => Ok(f32::INFINITY),
        serde_json::Value::String(s) if s == NEG_INFINITY => Ok(f32::NEG_INFINITY),
        other => Err(format!("{other}, not a number")),
    }
}

/// Replace the non-finite literals outside strings by the private strings above. Outside
/// a string, JSON has no letters but those of `true`, `false` and `null`, so any `NaN` or
/// `Infinity` there is one of these literals (or invalid anyway).
fn rewrite_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("NaN") && !text.contains("Infinity") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else {
            let literal = [
                ("-Infinity", NEG_INFINITY),
                ("Infinity", INFINITY),
                ("NaN", NAN),
            ]
            .into_iter()
            .find(|(lit, _)| rest.starts_with(lit));
            if let Some((lit, private)) = literal {
                out.push_str(&serde_json::Value::String(private.to_string()).to_string());
                rest = &rest[lit.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(text: &str) -> Vec<f32> {
        parse(text).unwrap()["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| score(v).unwrap())
            .collect()
    }

    #[test]
    fn python_non_finite_literals_become_non_finite_scores() {
        let s = scores(r#"{"scores": [1.5, NaN, Infinity, -Infinity, -2]}"#);
        assert_eq!(s[0], 1.5);
        assert!(s[1].is_nan());
        assert_eq!(s[2..], [f32::INFINITY, f32::NEG_INFINITY, -2.0]);
        assert!(score(&parse("NaN").unwrap()).unwrap().is_nan());
        assert_eq!(score(&parse("1e300").unwrap()).unwrap(), f32::INFINITY);
    }

    #[test]
    fn literals_inside_strings_are_left_alone() {
        let v = parse(r#"{"note": "NaN \" Infinity", "score": 1}"#).unwrap();
        assert_eq!(v["note"], "NaN \" Infinity");
        assert_eq!(score(&v["score"]).unwrap(), 1.0);
        // A string that says NaN is a string, not a score.
        let e = score(&parse(r#""NaN""#).unwrap()).unwrap_err();
        assert!(e.contains("not a number"), "{e}");
    }

    #[test]
    fn other_non_json_is_still_an_error() {
        assert!(parse("{\"score\": nan}").is_err());
        assert!(parse("{\"score\": NaNa}").is_err());
        assert!(parse("score: high").is_err());
        let e = score(&serde_json::Value::Null).unwrap_err();
        assert_eq!(e, "null, not a number");
    }
}
