//! How tilt prints a result: one JSON object by default, or a table for people. The CLI
//! prints every command's result through this crate, and the server checks each response
//! with [`check_no_nan`] before it is sent.
//!
//! # Numbers in the JSON output
//! JSON has numbers but no infinity and no NaN. tilt's convention, the same for every
//! command:
//!
//! - **Every numeric field is always a JSON number or `null`** (never a string such as
//!   `"inf"`), so a consumer reads each field with one type.
//! - **`null` means "no finite number here"**: the value is `+∞` (β at KL = 0, a
//!   divergence between pmfs whose supports make it infinite, λ of the tilt at the
//!   largest KL), or the field does not apply to this run (the rate `t` of the identity
//!   transform), or, for the few fields documented so, a finite value beyond the largest
//!   double. The doc of each field that can be `null` says which, and where a finite
//!   companion field carries the same information (`lambda = 0` for `beta = null`).
//! - **NaN is never printed.** A value that could not be computed is an error: [`emit`]
//!   refuses to print a result holding a NaN, naming the field ([`OutputError::Value`]),
//!   rather than let it pass as `null` (which is what `serde_json` would write).
//!
//! Why `null` and not strings: a field that is sometimes `0.5` and sometimes `"inf"`
//! breaks every typed reader (serde, pandas' dtype, `jq` arithmetic); `null` is JSON's own
//! "no value", is what serde writes for a non-finite `f64`, and every JSON library reads
//! it. Why not a huge number such as `1.8e308`: it would be a wrong finite value. In
//! `--format table`, where the type of a field is not at stake, `+∞` is shown as `inf`.
//!
//! Long row lists (`theory frontier` with 10⁶ points) are streamed with [`Report`]: each
//! row is written as it is computed, so memory does not grow with the output.

use serde::ser::{self, Serialize};
use serde_json::Value;
use std::io::Write;

/// Output format of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Format {
    /// One JSON object (or one per line for streaming commands).
    #[default]
    Json,
    /// Aligned text for people.
    Table,
}

/// Print one result (a typed `Serialize` value or a `serde_json::Value`) in `format` on
/// stdout.
///
/// # Errors
/// The value holds a NaN (named by its path, e.g. `rows[3].kl`; nothing is printed), or
/// stdout fails.
pub fn emit<T: Serialize + ?Sized>(value: &T, format: Format) -> Result<(), OutputError> {
    emit_to(&mut std::io::stdout().lock(), value, format)
}

/// Write one result in `format` to `out`, and flush it. Nothing is written when the value
/// holds a NaN.
///
/// # Errors
/// As [`emit`].
pub fn emit_to<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    value: &T,
    format: Format,
) -> Result<(), OutputError> {
    match format {
        Format::Json => {
            check_no_nan(value)?;
            writeln!(out, "{}", serde_json::to_string(value)?)?;
        }
        Format::Table => write!(out, "{}", render_tree(&tree_of(value)?))?,
    }
    out.flush()?;
    Ok(())
}

/// Render a JSON object as text: scalars as `key  value` lines, nested objects indented,
/// arrays of objects as column-aligned tables (a `strategy`, `name`, `n` or `length`
/// column first), arrays of numbers inline as numbers (`[0.52, 0.61]`, also inside rows).
pub fn render_table(value: &Value) -> String {
    render_tree(&Tree::from(value))
}

/// Numbers for people: 10 significant digits, no trailing noise; `inf` for +∞.
pub fn format_number(x: f64) -> String {
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 || (1e-4..1e9).contains(&x.abs()) {
        let t = format!("{x:.10}");
        let t = t.trim_end_matches('0').trim_end_matches('.');
        t.to_string()
    } else {
        format!("{x:.9e}")
    }
}

/// A result with a long list of rows, written as it is computed: first the scalar fields,
/// then each list row by row, then the closing brace. JSON output is byte for byte what
/// [`emit`] would print for the whole object; a table shows the fields as `key  value`
/// and each list as aligned columns, whose widths are set by the first rows.
///
/// A failure while rows are being computed leaves the JSON object unterminated (no
/// consumer can take it for a complete result) and the error goes to stderr as usual.
pub struct Report<'a> {
    out: &'a mut dyn Write,
    format: Format,
    fields: usize,
}

/// Rows buffered to set the column widths of a streamed table.
const TABLE_HEAD_ROWS: usize = 64;

impl<'a> Report<'a> {
    /// Start a report on `out`.
    ///
    /// # Errors
    /// Writing fails.
    pub fn new(out: &'a mut dyn Write, format: Format) -> Result<Self, OutputError> {
        if format == Format::Json {
            write!(out, "{{")?;
        }
        Ok(Self {
            out,
            format,
            fields: 0,
        })
    }

    /// Write the fields of `value` (a struct or map) as fields of the report.
    ///
    /// # Errors
    /// `value` is not an object or holds a NaN; writing fails.
    pub fn fields<T: Serialize>(&mut self, value: &T) -> Result<(), OutputError> {
        let Tree::Map(entries) = tree_of(value)? else {
            return Err(OutputError::NotAnObject);
        };
        match self.format {
            Format::Json => {
                // The object's own text without its braces: the fields in the struct's
                // order, byte for byte as `emit` writes them.
                let text = serde_json::to_string(value)?;
                let inner = &text[1..text.len() - 1];
                if !inner.is_empty() {
                    if self.fields > 0 {
                        write!(self.out, ",")?;
                    }
                    self.fields += entries.len();
                    write!(self.out, "{inner}")?;
                }
            }
            Format::Table => {
                let mut s = String::new();
                render_into(&mut s, &Tree::Map(entries), "");
                write!(self.out, "{s}")?;
            }
        }
        self.out.flush()?;
        Ok(())
    }

    fn json_key(&mut self, key: &str) -> Result<(), OutputError> {
        if self.fields > 0 {
            write!(self.out, ",")?;
        }
        self.fields += 1;
        write!(self.out, "{}:", serde_json::to_string(key)?)?;
        Ok(())
    }

    /// Write the list `key`, one row at a time as `rows` yields them.
    ///
    /// # Errors
    /// The first error of `rows`, unchanged (what was written stays written), or an
    /// [`OutputError`] (a row holding a NaN, named `key[i].field`; writing fails).
    pub fn rows<T: Serialize, E: From<OutputError>>(
        &mut self,
        key: &str,
        rows: impl IntoIterator<Item = Result<T, E>>,
    ) -> Result<(), E> {
        let io = |e: std::io::Error| E::from(OutputError::Io(e));
        match self.format {
            Format::Json => {
                self.json_key(key)?;
                write!(self.out, "[").map_err(io)?;
                for (i, row) in rows.into_iter().enumerate() {
                    let row = row?;
                    check_no_nan(&row)
                        .map_err(|e| OutputError::Value(e.at(&format!("{key}[{i}]"))))?;
                    if i > 0 {
                        write!(self.out, ",").map_err(io)?;
                    }
                    serde_json::to_writer(&mut *self.out, &row).map_err(OutputError::Json)?;
                }
                write!(self.out, "]").map_err(io)?;
            }
            Format::Table => {
                writeln!(self.out, "{key}:").map_err(io)?;
                let mut table = StreamedTable::default();
                for row in rows {
                    let tree = tree_of(&row?).map_err(OutputError::Value)?;
                    table.push(&mut *self.out, tree, "  ")?;
                }
                table.finish(&mut *self.out, "  ")?;
            }
        }
        self.out.flush().map_err(io)?;
        Ok(())
    }

    /// Close the report.
    ///
    /// # Errors
    /// Writing fails.
    pub fn finish(self) -> Result<(), OutputError> {
        if self.format == Format::Json {
            writeln!(self.out, "}}")?;
        }
        self.out.flush()?;
        Ok(())
    }
}

/// A table whose column widths are set by its first [`TABLE_HEAD_ROWS`] rows, then written
/// row by row.
#[derive(Default)]
struct StreamedTable {
    head: Vec<Tree>,
    layout: Option<(Vec<String>, Vec<usize>, Vec<bool>)>,
}

impl StreamedTable {
    fn push(&mut self, out: &mut dyn Write, row: Tree, indent: &str) -> Result<(), OutputError> {
        match &self.layout {
            None => {
                self.head.push(row);
                if self.head.len() == TABLE_HEAD_ROWS {
                    self.flush_head(out, indent)?;
                }
            }
            Some((cols, widths, numeric)) => {
                let cells = row_cells(&row, cols);
                write!(out, "{}", table_line(&cells, widths, numeric, indent))?;
            }
        }
        Ok(())
    }

    fn flush_head(&mut self, out: &mut dyn Write, indent: &str) -> Result<(), OutputError> {
        let head = std::mem::take(&mut self.head);
        let (cols, rows, widths, numeric) = layout(&head);
        write!(
            out,
            "{}",
            table_line(&cols, &widths, &vec![false; cols.len()], indent)
        )?;
        for r in &rows {
            write!(out, "{}", table_line(r, &widths, &numeric, indent))?;
        }
        self.layout = Some((cols, widths, numeric));
        Ok(())
    }

    fn finish(mut self, out: &mut dyn Write, indent: &str) -> Result<(), OutputError> {
        if self.layout.is_none() && !self.head.is_empty() {
            self.flush_head(out, indent)?;
        }
        Ok(())
    }
}

/// A serialised value as the table renderer sees it: like JSON, but numbers keep `±∞`.
#[derive(Debug, Clone, PartialEq)]
enum Tree {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Tree>),
    Map(Vec<(String, Tree)>),
}

impl From<&Value> for Tree {
    fn from(v: &Value) -> Self {
        match v {
            Value::Null => Tree::Null,
            Value::Bool(b) => Tree::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => Tree::Int(i as i128),
                (_, Some(u), _) => Tree::Int(u as i128),
                (_, _, Some(f)) => Tree::Float(f),
                _ => Tree::Str(n.to_string()),
            },
            Value::String(s) => Tree::Str(s.clone()),
            Value::Array(a) => Tree::Seq(a.iter().map(Tree::from).collect()),
            Value::Object(m) => Tree::Map(m.iter().map(|(k, v)| (k.clone(), v.into())).collect()),
        }
    }
}

/// Why a result could not be printed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The value holds a NaN (or its `Serialize` failed); nothing of it was printed.
    #[error(transparent)]
    Value(#[from] ValueError),
    /// Writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// `serde_json` failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// [`Report::fields`] was given something other than a struct or map.
    #[error("internal error: report fields must be an object")]
    NotAnObject,
}

/// Refuse a value holding a NaN anywhere, naming where (`.rows[3].kl`).
///
/// # Errors
/// The first NaN met, with its path.
pub fn check_no_nan<T: Serialize + ?Sized>(value: &T) -> Result<(), ValueError> {
    value.serialize(Walker { build: false }).map(|_| ())
}

/// The [`Tree`] of a value; an error naming the field when a NaN is found.
fn tree_of<T: Serialize + ?Sized>(value: &T) -> Result<Tree, ValueError> {
    value.serialize(Walker { build: true })
}

/// A value that cannot be printed: a NaN at [`path`](Self::path), or serde's own message.
#[derive(Debug)]
pub struct ValueError {
    path: String,
    message: String,
}

impl ValueError {
    /// Where in the value: `.rows[3].kl` (empty for the value itself).
    pub fn path(&self) -> &str {
        &self.path
    }

    fn at(mut self, segment: &str) -> Self {
        self.path.insert_str(0, segment);
        self
    }
}

impl std::fmt::Display for ValueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "internal error: {}", self.message)
        } else {
            write!(
                f,
                "{}: internal error: {} (nothing printed)",
                self.path, self.message
            )
        }
    }
}

impl std::error::Error for ValueError {}

impl ser::Error for ValueError {
    fn custom<M: std::fmt::Display>(msg: M) -> Self {
        ValueError {
            path: String::new(),
            message: msg.to_string(),
        }
    }
}

/// A serde serializer that walks a value once, refusing NaN (with the path to it) and, when
/// `build`, collecting it as a [`Tree`].
#[derive(Clone, Copy)]
struct Walker {
    build: bool,
}

type WalkResult = Result<Tree, ValueError>;

struct Compound {
    build: bool,
    items: Vec<Tree>,
    entries: Vec<(String, Tree)>,
    key: Option<String>,
    /// For a variant `{"name": …}`.
    variant: Option<&'static str>,
}

impl Compound {
    fn new(build: bool, variant: Option<&'static str>) -> Self {
        Self {
            build,
            items: Vec::new(),
            entries: Vec::new(),
            key: None,
            variant,
        }
    }

    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        let i = self.items.len();
        let t = value
            .serialize(Walker { build: self.build })
            .map_err(|e| e.at(&format!("[{i}]")))?;
        self.items.push(if self.build { t } else { Tree::Null });
        Ok(())
    }

    fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), ValueError> {
        let t = value
            .serialize(Walker { build: self.build })
            .map_err(|e| e.at(&format!(".{key}")))?;
        if self.build {
            self.entries.push((key.to_string(), t));
        }
        Ok(())
    }

    fn wrap(self, inner: Tree) -> Tree {
        match self.variant {
            Some(v) => Tree::Map(vec![(v.to_string(), inner)]),
            None => inner,
        }
    }

    fn end_seq(mut self) -> WalkResult {
        let items = std::mem::take(&mut self.items);
        Ok(self.wrap(Tree::Seq(items)))
    }

    fn end_map(mut self) -> WalkResult {
        let entries = std::mem::take(&mut self.entries);
        Ok(self.wrap(Tree::Map(entries)))
    }
}

macro_rules! leaf {
    ($name:ident, $t:ty, $conv:expr) => {
        fn $name(self, v: $t) -> WalkResult {
            Ok(if self.build { $conv(v) } else { Tree::Null })
        }
    };
}

impl ser::Serializer for Walker {
    type Ok = Tree;
    type Error = ValueError;
    type SerializeSeq = Compound;
    type SerializeTuple = Compound;
    type SerializeTupleStruct = Compound;
    type SerializeTupleVariant = Compound;
    type SerializeMap = Compound;
    type SerializeStruct = Compound;
    type SerializeStructVariant = Compound;

    leaf!(serialize_bool, bool, Tree::Bool);
    leaf!(serialize_i8, i8, |v| Tree::Int(v as i128));
    leaf!(serialize_i16, i16, |v| Tree::Int(v as i128));
    leaf!(serialize_i32, i32, |v| Tree::Int(v as i128));
    leaf!(serialize_i64, i64, |v| Tree::Int(v as i128));
    leaf!(serialize_u8, u8, |v| Tree::Int(v as i128));
    leaf!(serialize_u16, u16, |v| Tree::Int(v as i128));
    leaf!(serialize_u32, u32, |v| Tree::Int(v as i128));
    leaf!(serialize_u64, u64, |v| Tree::Int(v as i128));
    leaf!(serialize_char, char, |v: char| Tree::Str(v.to_string()));
    leaf!(serialize_str, &str, |v: &str| Tree::Str(v.to_string()));

    fn serialize_f32(self, v: f32) -> WalkResult {
        self.serialize_f64(v as f64)
    }
    fn serialize_f64(self, v: f64) -> WalkResult {
        if v.is_nan() {
            return Err(ValueError {
                path: String::new(),
                message: "the value is NaN (it could not be computed)".into(),
            });
        }
        Ok(if self.build {
            Tree::Float(v)
        } else {
            Tree::Null
        })
    }
    fn serialize_bytes(self, v: &[u8]) -> WalkResult {
        Ok(if self.build {
            Tree::Seq(v.iter().map(|b| Tree::Int(*b as i128)).collect())
        } else {
            Tree::Null
        })
    }
    fn serialize_none(self) -> WalkResult {
        Ok(Tree::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> WalkResult {
        value.serialize(self)
    }
    fn serialize_unit(self) -> WalkResult {
        Ok(Tree::Null)
    }
    fn serialize_unit_struct(self, _: &'static str) -> WalkResult {
        Ok(Tree::Null)
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> WalkResult {
        Ok(Tree::Str(variant.to_string()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> WalkResult {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> WalkResult {
        let inner = value
            .serialize(self)
            .map_err(|e| e.at(&format!(".{variant}")))?;
        Ok(Tree::Map(vec![(variant.to_string(), inner)]))
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Compound, ValueError> {
        Ok(Compound::new(self.build, None))
    }
    fn serialize_tuple(self, _: usize) -> Result<Compound, ValueError> {
        Ok(Compound::new(self.build, None))
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Compound, ValueError> {
        Ok(Compound::new(self.build, None))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound, ValueError> {
        Ok(Compound::new(self.build, Some(variant)))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Compound, ValueError> {
        Ok(Compound::new(self.build, None))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Compound, ValueError> {
        Ok(Compound::new(self.build, None))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound, ValueError> {
        Ok(Compound::new(self.build, Some(variant)))
    }
}

impl ser::SerializeSeq for Compound {
    type Ok = Tree;
    type Error = ValueError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.element(value)
    }
    fn end(self) -> WalkResult {
        self.end_seq()
    }
}

impl ser::SerializeTuple for Compound {
    type Ok = Tree;
    type Error = ValueError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.element(value)
    }
    fn end(self) -> WalkResult {
        self.end_seq()
    }
}

impl ser::SerializeTupleStruct for Compound {
    type Ok = Tree;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.element(value)
    }
    fn end(self) -> WalkResult {
        self.end_seq()
    }
}

impl ser::SerializeTupleVariant for Compound {
    type Ok = Tree;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.element(value)
    }
    fn end(self) -> WalkResult {
        self.end_seq()
    }
}

impl ser::SerializeMap for Compound {
    type Ok = Tree;
    type Error = ValueError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), ValueError> {
        let k = match key.serialize(Walker { build: true })? {
            Tree::Str(s) => s,
            Tree::Int(i) => i.to_string(),
            other => format!("{other:?}"),
        };
        self.key = Some(k);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        let key = self.key.take().unwrap_or_default();
        self.field(&key, value)
    }
    fn end(self) -> WalkResult {
        self.end_map()
    }
}

impl ser::SerializeStruct for Compound {
    type Ok = Tree;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ValueError> {
        self.field(key, value)
    }
    fn end(self) -> WalkResult {
        self.end_map()
    }
}

impl ser::SerializeStructVariant for Compound {
    type Ok = Tree;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ValueError> {
        self.field(key, value)
    }
    fn end(self) -> WalkResult {
        self.end_map()
    }
}

fn render_tree(tree: &Tree) -> String {
    let mut s = String::new();
    render_into(&mut s, tree, "");
    s
}

fn scalar(v: &Tree) -> String {
    match v {
        Tree::Float(x) => format_number(*x),
        Tree::Int(i) => i.to_string(),
        Tree::Str(t) => t.clone(),
        Tree::Bool(b) => b.to_string(),
        Tree::Null => "-".into(),
        Tree::Seq(items) => format!(
            "[{}]",
            items.iter().map(scalar).collect::<Vec<_>>().join(", ")
        ),
        Tree::Map(entries) => entries
            .iter()
            .map(|(k, v)| format!("{k}={}", scalar(v)))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn is_rows(items: &[Tree]) -> bool {
    !items.is_empty() && items.iter().all(|t| matches!(t, Tree::Map(_)))
}

fn render_into(s: &mut String, value: &Tree, indent: &str) {
    match value {
        Tree::Map(entries) => {
            let width = entries
                .iter()
                .map(|(k, _)| k.chars().count())
                .max()
                .unwrap_or(0);
            for (k, v) in entries {
                match v {
                    Tree::Seq(items) if is_rows(items) => {
                        s.push_str(&format!("{indent}{k}:\n"));
                        render_rows(s, items, &format!("{indent}  "));
                    }
                    Tree::Map(inner) if !inner.is_empty() => {
                        s.push_str(&format!("{indent}{k}:\n"));
                        render_into(s, v, &format!("{indent}  "));
                    }
                    _ => s.push_str(&format!("{indent}{k:<width$}  {}\n", scalar(v))),
                }
            }
        }
        Tree::Seq(items) if is_rows(items) => render_rows(s, items, indent),
        other => s.push_str(&format!("{indent}{}\n", scalar(other))),
    }
}

/// Columns that identify a row, put first when present (in this order).
const LEADING_COLUMNS: [&str; 4] = ["strategy", "name", "n", "length"];

/// The columns of `rows` (first appearance order, identifying columns first), each row's
/// cells, the column widths, and which columns hold numbers (right-aligned).
fn layout(rows: &[Tree]) -> (Vec<String>, Vec<Vec<String>>, Vec<usize>, Vec<bool>) {
    let mut cols: Vec<String> = Vec::new();
    for r in rows {
        if let Tree::Map(entries) = r {
            for (k, _) in entries {
                if !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
    }
    let mut leading: Vec<String> = LEADING_COLUMNS
        .iter()
        .filter(|c| cols.iter().any(|k| k == *c))
        .map(|c| c.to_string())
        .collect();
    leading.extend(
        cols.into_iter()
            .filter(|c| !LEADING_COLUMNS.contains(&c.as_str())),
    );
    let cols = leading;
    let cells: Vec<Vec<String>> = rows.iter().map(|r| row_cells(r, &cols)).collect();
    let widths = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let numeric = cols
        .iter()
        .map(|c| {
            rows.iter().all(|r| match r {
                Tree::Map(e) => matches!(
                    e.iter().find(|(k, _)| k == c).map(|(_, v)| v),
                    None | Some(Tree::Int(_) | Tree::Float(_) | Tree::Null | Tree::Seq(_))
                ),
                _ => true,
            })
        })
        .collect();
    (cols, cells, widths, numeric)
}

fn row_cells(row: &Tree, cols: &[String]) -> Vec<String> {
    let Tree::Map(entries) = row else {
        return vec![scalar(row)];
    };
    cols.iter()
        .map(|c| match entries.iter().find(|(k, _)| k == c) {
            Some((_, v)) => scalar(v),
            None => "-".into(),
        })
        .collect()
}

fn table_line(cells: &[String], widths: &[usize], numeric: &[bool], indent: &str) -> String {
    let parts: Vec<String> = cells
        .iter()
        .zip(widths)
        .zip(numeric)
        .map(|((c, w), num)| {
            if *num {
                format!("{c:>w$}")
            } else {
                format!("{c:<w$}")
            }
        })
        .collect();
    format!("{indent}{}\n", parts.join("  ").trim_end())
}

fn render_rows(s: &mut String, items: &[Tree], indent: &str) {
    let (cols, rows, widths, numeric) = layout(items);
    s.push_str(&table_line(
        &cols,
        &widths,
        &vec![false; cols.len()],
        indent,
    ));
    for r in &rows {
        s.push_str(&table_line(r, &widths, &numeric, indent));
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
        // The identifying column `n` comes first.
        assert!(t.lines().any(|l| l.trim() == "n  kl"), "{t}");
        assert!(t.contains("0.1308"));
    }

    #[test]
    fn arrays_inside_rows_are_numbers_and_the_strategy_column_leads() {
        let t = render_table(&json!({"strategies": [
            {"kl": 0.1, "strategy": "bon:2", "win_rate_ci95": [0.52, 0.61]},
            {"kl": 0.3, "strategy": "sample", "win_rate_ci95": null},
        ]}));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].trim_start().starts_with("strategy"), "{t}");
        assert!(t.contains("[0.52, 0.61]"), "{t}");
        assert!(!t.contains("items"), "{t}");
        // Strings left-aligned, numbers right-aligned: "sample" starts the column.
        assert!(lines[3].trim_start().starts_with("sample"), "{t}");
    }

    #[test]
    fn nan_is_refused_with_its_path_and_infinity_is_null_or_inf() {
        #[derive(serde::Serialize)]
        struct Row {
            kl: f64,
        }
        #[derive(serde::Serialize)]
        struct R {
            beta: f64,
            rows: Vec<Row>,
        }
        let bad = R {
            beta: 1.0,
            rows: vec![Row { kl: 0.0 }, Row { kl: f64::NAN }],
        };
        let mut out = Vec::new();
        let e = emit_to(&mut out, &bad, Format::Json)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(".rows[1].kl: internal error"), "{e}");
        assert!(out.is_empty(), "nothing printed");
        assert!(emit_to(&mut out, &bad, Format::Table).is_err());
        let ok = R {
            beta: f64::INFINITY,
            rows: vec![],
        };
        emit_to(&mut out, &ok, Format::Json).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"beta\":null,\"rows\":[]}\n"
        );
        let mut t = Vec::new();
        emit_to(&mut t, &ok, Format::Table).unwrap();
        assert!(String::from_utf8(t).unwrap().contains("beta  inf"));
    }

    #[test]
    fn a_streamed_report_prints_what_emit_prints() {
        #[derive(serde::Serialize)]
        struct Head {
            units: &'static str,
            x: f64,
        }
        #[derive(serde::Serialize, Clone)]
        struct Row {
            n: u64,
            kl: f64,
        }
        let rows: Vec<Row> = (1..=100)
            .map(|n| Row {
                n,
                kl: 1.0 / n as f64,
            })
            .collect();
        let mut streamed = Vec::new();
        {
            let mut r = Report::new(&mut streamed, Format::Json).unwrap();
            r.fields(&Head {
                units: "nats",
                x: 0.5,
            })
            .unwrap();
            r.rows("bon", rows.iter().cloned().map(Ok::<_, OutputError>))
                .unwrap();
            r.finish().unwrap();
        }
        let whole = json!({"units": "nats", "x": 0.5, "bon": rows.iter().map(|r| json!({"n": r.n, "kl": r.kl})).collect::<Vec<_>>()});
        // The same bytes as emit of the whole object in the same field order.
        #[derive(serde::Serialize)]
        struct Whole<'a> {
            units: &'static str,
            x: f64,
            bon: &'a [Row],
        }
        let mut whole_text = Vec::new();
        emit_to(
            &mut whole_text,
            &Whole {
                units: "nats",
                x: 0.5,
                bon: &rows,
            },
            Format::Json,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(streamed.clone()).unwrap(),
            String::from_utf8(whole_text).unwrap()
        );
        // Both through the same parser (serde_json's default float parsing is not exactly
        // round-trip, so compare text parsed alike).
        let parsed: Value = serde_json::from_slice(&streamed).unwrap();
        let whole: Value = serde_json::from_str(&whole.to_string()).unwrap();
        assert_eq!(parsed, whole);
        assert!(streamed.ends_with(b"]}\n"), "one line, closed");
        let mut table = Vec::new();
        {
            let mut r = Report::new(&mut table, Format::Table).unwrap();
            r.fields(&Head {
                units: "nats",
                x: 0.5,
            })
            .unwrap();
            r.rows("bon", rows.iter().cloned().map(Ok::<_, OutputError>))
                .unwrap();
            r.finish().unwrap();
        }
        let text = String::from_utf8(table).unwrap();
        assert!(
            text.contains("units  nats") && text.contains("bon:"),
            "{text}"
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("  ")).count(),
            101,
            "{text}"
        );
    }
}
