//! How every command prints: one JSON object on stdout by default, or a table for people.

use clap::ValueEnum;
use serde_json::Value;
use std::io::Write;

/// Output format of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    /// One JSON object (or one per line for streaming commands).
    #[default]
    Json,
    /// Aligned text for people.
    Table,
}

/// Print one result object in `format` on stdout.
pub fn emit(value: &Value, format: Format) -> anyhow::Result<()> {
    emit_to(&mut std::io::stdout().lock(), value, format)
}

/// Write one result object in `format` to `out`, and flush it.
pub fn emit_to(out: &mut dyn Write, value: &Value, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => writeln!(out, "{}", serde_json::to_string(value)?)?,
        Format::Table => write!(out, "{}", render_table(value))?,
    }
    out.flush()?;
    Ok(())
}

/// Render a JSON object as text: scalars as `key  value` lines, arrays of objects as
/// column-aligned tables, arrays of numbers inline.
pub fn render_table(value: &Value) -> String {
    let mut s = String::new();
    render_into(&mut s, value, "");
    s
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => format_number(x),
            _ => n.to_string(),
        },
        Value::String(t) => t.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Numbers for people: 10 significant digits, no trailing noise.
pub fn format_number(x: f64) -> String {
    if x == 0.0 || (1e-4..1e9).contains(&x.abs()) {
        let t = format!("{x:.10}");
        let t = t.trim_end_matches('0').trim_end_matches('.');
        t.to_string()
    } else {
        format!("{x:.9e}")
    }
}

fn render_into(s: &mut String, value: &Value, indent: &str) {
    match value {
        Value::Object(map) => {
            let width = map.keys().map(|k| k.chars().count()).max().unwrap_or(0);
            for (k, v) in map {
                match v {
                    Value::Array(items)
                        if items.iter().all(Value::is_object) && !items.is_empty() =>
                    {
                        s.push_str(&format!("{indent}{k}:\n"));
                        render_rows(s, items, &format!("{indent}  "));
                    }
                    Value::Object(_) => {
                        s.push_str(&format!("{indent}{k}:\n"));
                        render_into(s, v, &format!("{indent}  "));
                    }
                    Value::Array(items) => {
                        let cells: Vec<String> = items.iter().map(scalar).collect();
                        s.push_str(&format!("{indent}{k:<width$}  [{}]\n", cells.join(", ")));
                    }
                    _ => s.push_str(&format!("{indent}{k:<width$}  {}\n", scalar(v))),
                }
            }
        }
        Value::Array(items) => render_rows(s, items, indent),
        other => s.push_str(&format!("{indent}{}\n", scalar(other))),
    }
}

fn render_rows(s: &mut String, items: &[Value], indent: &str) {
    let mut cols: Vec<String> = Vec::new();
    for it in items {
        if let Value::Object(m) = it {
            for k in m.keys() {
                if !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|it| {
            cols.iter()
                .map(|c| match it.get(c) {
                    Some(Value::Array(a)) => format!("[{} items]", a.len()),
                    Some(Value::Object(_)) => "{…}".into(),
                    Some(v) => scalar(v),
                    None => "-".into(),
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([c.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        format!("{indent}{}\n", parts.join("  "))
    };
    s.push_str(&line(&cols));
    for r in &rows {
        s.push_str(&line(r));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_renders_scalars_and_rows() {
        let t = render_table(
            &json!({"kl": 0.5, "n": 4, "bon": [{"n": 1, "kl": 0.0}, {"n": 2, "kl": 0.1308}]}),
        );
        // Keys are padded to the longest key ("bon"), then two spaces.
        assert!(t.lines().any(|l| l == "kl   0.5"), "{t}");
        assert!(t.lines().any(|l| l == "n    4"), "{t}");
        assert!(t.lines().any(|l| l.trim() == "kl  n"), "{t}");
        assert!(t.contains("0.1308"));
    }
}
