//! Prompt files: one reader for every command.
//!
//! A prompts file is JSON lines, one prompt per non-blank line, in one of three forms:
//!
//! ```text
//! "Name a fruit."                                        a user message
//! {"prompt": "Name a fruit."}                            the same
//! {"messages": [{"role": "system", "content": "…"},      a conversation
//!               {"role": "user", "content": "…"}]}
//! ```
//!
//! Other fields of an object are refused (a misspelt `"promt"` would otherwise be a silent
//! empty prompt). A line's index (its line number − 1) picks its random streams, so a
//! prompt's output does not move when another line is added before a blank line or after
//! it. A UTF-8 byte-order mark, bytes that are not UTF-8, and malformed lines are errors
//! naming the file and the line.

use crate::error::{EngineError, Result};
use crate::request::Input;
use std::path::Path;
use tilt_models::ChatMessage;

/// One line of a prompts file: its input, or why it could not be read.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptLine {
    /// A prompt.
    Ok {
        /// Its line number − 1 (it picks the random streams).
        index: u64,
        /// The prompt.
        input: Input,
    },
    /// A line that is not a prompt.
    Bad {
        /// Its line number − 1.
        index: u64,
        /// What is wrong, naming the file and the line.
        error: String,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectLine {
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
}

fn parse_line(line: &str) -> std::result::Result<Input, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let input = match value {
        serde_json::Value::String(s) => Input::Prompt(s),
        serde_json::Value::Object(_) => {
            let o: ObjectLine = serde_json::from_value(value).map_err(|e| {
                format!("expected {{\"prompt\": \"…\"}} or {{\"messages\": […]}}: {e}")
            })?;
            match (o.prompt, o.messages) {
                (Some(p), None) => Input::Prompt(p),
                (None, Some(m)) => Input::Messages(m),
                (Some(_), Some(_)) => {
                    return Err("give \"prompt\" or \"messages\", not both".into())
                }
                (None, None) => return Err("no \"prompt\" or \"messages\" field".into()),
            }
        }
        other => {
            return Err(format!(
            "expected {{\"prompt\": \"…\"}}, {{\"messages\": […]}} or a JSON string, got {other}"
        ))
        }
    };
    input.validate().map_err(|e| e.problem())?;
    Ok(input)
}

/// Read every line of a prompts file; a bad line is a [`PromptLine::Bad`], not an error.
///
/// # Errors
/// [`EngineError::BadFile`] naming the file when it cannot be read or holds no prompt line.
pub fn read_prompt_lines(path: &Path) -> Result<Vec<PromptLine>> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path)
        .map_err(|e| EngineError::bad_file(&shown, format!("cannot read: {e}")))?;
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let index = i as u64;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let bad = |problem: String| PromptLine::Bad {
            index,
            error: format!("{shown} line {}: {problem}", i + 1),
        };
        if i == 0 && raw.starts_with(&[0xEF, 0xBB, 0xBF]) {
            out.push(bad(
                "starts with a UTF-8 byte-order mark (U+FEFF); save the file as UTF-8 without it"
                    .into(),
            ));
            continue;
        }
        let line = match std::str::from_utf8(raw) {
            Ok(l) => l,
            Err(e) => {
                out.push(bad(format!(
                    "not valid UTF-8 (the byte at column {} is not part of a UTF-8 character)",
                    e.valid_up_to() + 1
                )));
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        out.push(match parse_line(line) {
            Ok(input) => PromptLine::Ok { index, input },
            Err(problem) => bad(problem),
        });
    }
    if out.is_empty() {
        return Err(EngineError::bad_file(&shown, "no prompts"));
    }
    Ok(out)
}

/// Read a prompts file whose every line must be a prompt (evaluation, training).
///
/// # Errors
/// As [`read_prompt_lines`]; [`EngineError::BadFile`] for the first bad line.
pub fn read_prompts(path: &Path) -> Result<Vec<Input>> {
    read_prompt_lines(path)?
        .into_iter()
        .map(|l| match l {
            PromptLine::Ok { input, .. } => Ok(input),
            PromptLine::Bad { error, .. } => Err(EngineError::bad_file("prompts", error)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[u8]) -> Vec<PromptLine> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.jsonl");
        std::fs::write(&p, text).unwrap();
        read_prompt_lines(&p).unwrap()
    }

    fn error(l: &PromptLine) -> &str {
        match l {
            PromptLine::Bad { error, .. } => error,
            PromptLine::Ok { .. } => panic!("{l:?} is not an error"),
        }
    }

    #[test]
    fn the_three_forms_and_their_indices() {
        let l = lines(
            b"\"a\"\n\n{\"prompt\": \"b\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"c\"}]}\n",
        );
        assert_eq!(
            l,
            vec![
                PromptLine::Ok {
                    index: 0,
                    input: Input::Prompt("a".into())
                },
                PromptLine::Ok {
                    index: 2,
                    input: Input::Prompt("b".into())
                },
                PromptLine::Ok {
                    index: 3,
                    input: Input::Messages(vec![ChatMessage::user("c")])
                },
            ]
        );
    }

    #[test]
    fn bad_lines_are_named_by_line_number() {
        let l = lines(b"\xEF\xBB\xBF{\"prompt\": \"a\"}\n{\"prompt\": \"b\xff\"}\n{\"promt\": \"c\"}\n{\"prompt\": \"  \"}\n7\n{\"prompt\": \"ok\"}\r\n");
        assert!(
            error(&l[0]).contains("line 1: starts with a UTF-8 byte-order mark"),
            "{:?}",
            l[0]
        );
        assert!(
            error(&l[1]).contains("line 2: not valid UTF-8"),
            "{:?}",
            l[1]
        );
        assert!(
            error(&l[2]).contains("line 3:") && error(&l[2]).contains("promt"),
            "{:?}",
            l[2]
        );
        assert!(error(&l[3]).contains("line 4: empty prompt"), "{:?}", l[3]);
        assert!(error(&l[4]).contains("line 5: expected"), "{:?}", l[4]);
        assert_eq!(
            l[5],
            PromptLine::Ok {
                index: 5,
                input: Input::Prompt("ok".into())
            }
        );
    }

    #[test]
    fn strict_reading_fails_on_the_first_bad_line_and_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.jsonl");
        std::fs::write(&p, "\"a\"\n{\"x\": 1}\n").unwrap();
        let e = read_prompts(&p).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        std::fs::write(&p, "\n\n").unwrap();
        assert!(read_prompt_lines(&p)
            .unwrap_err()
            .to_string()
            .contains("no prompts"));
        assert!(read_prompt_lines(&dir.path().join("none")).is_err());
    }
}
