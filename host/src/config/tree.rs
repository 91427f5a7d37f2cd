//! The configuration as a tree of values that remember where they came from (a line of the
//! file or a flag), and the typed accessors the schema walk reads it with.
//!
//! The file is parsed with `toml::de::DeTable`, which keeps the byte span of every key and
//! value; spans become line numbers here, once. Every accessor error goes through
//! [`Ctx::err`], so it names the file, line and key path, or the flag.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::ConfigError;

/// Where a value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Origin {
    /// 1-based line of the configuration file.
    Line(usize),
    /// A command-line flag (or its environment variable).
    Flag(&'static str),
}

/// A place for "see also" in messages: `listener[0].listen (line 3)` or `--listen`.
pub(super) fn place(path: &str, at: Origin) -> String {
    match at {
        Origin::Line(line) => format!("{path} (line {line})"),
        Origin::Flag(flag) => flag.to_owned(),
    }
}

/// What errors need to know about the source: the file, if any.
#[derive(Clone, Debug, Default)]
pub(super) struct Ctx {
    file: Option<PathBuf>,
}

impl Ctx {
    /// Values from `file` (and maybe flags).
    pub fn file(file: &Path) -> Self {
        Ctx {
            file: Some(file.to_path_buf()),
        }
    }

    /// Values from flags only.
    pub fn flags() -> Self {
        Ctx::default()
    }

    /// The configuration file, if any.
    pub fn source(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// An error about the value at `at`, whose key path is `key`.
    pub fn err(&self, at: Origin, key: &str, message: impl Into<String>) -> ConfigError {
        match at {
            Origin::Line(line) => ConfigError {
                file: self.file.clone(),
                line: Some(line),
                key: key.to_owned(),
                message: message.into(),
            },
            Origin::Flag(flag) => ConfigError {
                file: None,
                line: None,
                key: flag.to_owned(),
                message: message.into(),
            },
        }
    }
}

/// A TOML value.
#[derive(Clone, Debug)]
pub(super) enum Value {
    Str(String),
    Int(i64),
    /// An integer outside i64, kept as written for messages and plugin options.
    BigInt(String),
    /// Kept as written: floats only ever reach plugin options and messages.
    Float(String),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Table),
}

impl Value {
    /// The value for "got ..." in messages: scalars as written, containers by kind.
    fn describe(&self) -> String {
        match self {
            Value::Str(s) => format!("{s:?}"),
            Value::Int(i) => i.to_string(),
            Value::BigInt(s) | Value::Float(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Datetime(d) => format!("the date-time {d}"),
            Value::Array(_) => "an array".to_owned(),
            Value::Table(_) => "a table".to_owned(),
        }
    }
}

/// A value and where it came from (the line of the value, or of a table's header).
#[derive(Clone, Debug)]
pub(super) struct Node {
    pub value: Value,
    pub at: Origin,
}

impl Node {
    /// A string given by `flag`.
    pub fn flag_str(flag: &'static str, value: &str) -> Self {
        Node {
            value: Value::Str(value.to_owned()),
            at: Origin::Flag(flag),
        }
    }
}

/// A table's entries in file order (flags append).
#[derive(Clone, Debug, Default)]
pub(super) struct Table {
    pub entries: Vec<Entry>,
}

/// One `key = value`; `at` is the key's line, where unknown-key errors point.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub key: String,
    pub at: Origin,
    pub node: Node,
}

impl Table {
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries.iter().find(|e| e.key == key).map(|e| &e.node)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        self.entries
            .iter_mut()
            .find(|e| e.key == key)
            .map(|e| &mut e.node)
    }

    /// Replaces the value of `key` in place, or appends it.
    pub fn set(&mut self, key: &str, node: Node) {
        match self.entries.iter_mut().find(|e| e.key == key) {
            Some(entry) => {
                entry.at = node.at;
                entry.node = node;
            }
            None => self.entries.push(Entry {
                key: key.to_owned(),
                at: node.at,
                node,
            }),
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.entries.retain(|e| e.key != key);
    }

    /// The table under `key`, created (by `flag`) when absent; none when `key` holds
    /// something else, which the schema walk then reports against the file.
    pub fn table_mut(&mut self, key: &str, flag: &'static str) -> Option<&mut Table> {
        if self.get(key).is_none() {
            self.set(
                key,
                Node {
                    value: Value::Table(Table::default()),
                    at: Origin::Flag(flag),
                },
            );
        }
        match self.get_mut(key) {
            Some(Node {
                value: Value::Table(table),
                ..
            }) => Some(table),
            _ => None,
        }
    }
}

/// Parses a TOML document into a tree; syntax errors name the file and line.
pub(super) fn parse(text: &str, cx: &Ctx) -> Result<Table, ConfigError> {
    let lines = Lines::new(text);
    let doc = DeTable::parse(text).map_err(|e| {
        let line = e.span().map_or(1, |span| lines.line(span.start));
        cx.err(
            Origin::Line(line),
            "",
            format!("invalid TOML: {}", e.message()),
        )
    })?;
    Ok(convert_table(doc.get_ref(), &lines))
}

/// Byte offset → line number.
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Self {
        Lines(text.match_indices('\n').map(|(i, _)| i).collect())
    }

    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&newline| newline < offset) + 1
    }

    fn at<T>(&self, spanned: &Spanned<T>) -> Origin {
        Origin::Line(self.line(spanned.span().start))
    }
}

fn convert_table(table: &DeTable<'_>, lines: &Lines) -> Table {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    let entries = entries
        .into_iter()
        .map(|(key, value)| Entry {
            key: key.get_ref().to_string(),
            at: lines.at(key),
            node: convert(value, lines),
        })
        .collect();
    Table { entries }
}

fn convert(value: &Spanned<DeValue<'_>>, lines: &Lines) -> Node {
    let value_of = match value.get_ref() {
        DeValue::String(s) => Value::Str(s.to_string()),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Value::Int(n),
            Err(_) => Value::BigInt(i.to_string()),
        },
        DeValue::Float(f) => Value::Float(f.as_str().to_owned()),
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::Datetime(d.to_string()),
        DeValue::Array(items) => Value::Array(items.iter().map(|v| convert(v, lines)).collect()),
        DeValue::Table(table) => Value::Table(convert_table(table, lines)),
    };
    Node {
        value: value_of,
        at: lines.at(value),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// A table whose keys are known: reading one is `get`, and any other key was refused when
/// the section was opened.
pub(super) struct Section<'a> {
    cx: &'a Ctx,
    /// Key path, e.g. `listener[0].health`; empty for the root.
    pub path: String,
    /// The table's header line (or the flag that created it).
    pub at: Origin,
    table: &'a Table,
    keys: &'static [&'static str],
}

impl<'a> Section<'a> {
    /// Opens `table`, refusing its first key (in file order) that is not in `keys`.
    pub fn new(
        cx: &'a Ctx,
        path: String,
        at: Origin,
        table: &'a Table,
        keys: &'static [&'static str],
    ) -> Result<Self, ConfigError> {
        if let Some(entry) = table
            .entries
            .iter()
            .find(|e| !keys.contains(&e.key.as_str()))
        {
            return Err(cx.err(
                entry.at,
                &join(&path, &entry.key),
                format!("unknown key (expected one of: {})", keys.join(", ")),
            ));
        }
        Ok(Section {
            cx,
            path,
            at,
            table,
            keys,
        })
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &'static str) -> Option<Field<'a>> {
        // A key missing from the list would always read as absent; tests catch that.
        if cfg!(any(test, debug_assertions)) {
            assert!(
                self.keys.contains(&key),
                "{key} is not declared for {}",
                self.path
            );
        }
        self.table.get(key).map(|node| Field {
            cx: self.cx,
            path: join(&self.path, key),
            node,
        })
    }

    /// The value of `key`, which must be given.
    pub fn require(&self, key: &'static str) -> Result<Field<'a>, ConfigError> {
        self.get(key)
            .ok_or_else(|| self.err(format!("missing required key `{key}`")))
    }

    /// `parse` applied to the value of `key`, if given.
    pub fn opt<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&Field<'a>) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        self.get(key).map(|field| parse(&field)).transpose()
    }

    /// The sub-table `key` opened with `keys`, if given.
    pub fn section(
        &self,
        key: &'static str,
        keys: &'static [&'static str],
    ) -> Result<Option<Section<'a>>, ConfigError> {
        self.opt(key, |field| field.table(keys))
    }

    /// An error about the whole table, pointing at its header.
    pub fn err(&self, message: impl Into<String>) -> ConfigError {
        self.cx.err(self.at, &self.path, message)
    }
}

/// One value being read, with its key path.
pub(super) struct Field<'a> {
    cx: &'a Ctx,
    /// Key path, e.g. `listener[0].backend[1].weight`.
    pub path: String,
    pub node: &'a Node,
}

impl<'a> Field<'a> {
    /// An error about this value.
    pub fn err(&self, message: impl Into<String>) -> ConfigError {
        self.cx.err(self.node.at, &self.path, message)
    }

    /// "expected WHAT, got VALUE".
    pub fn expected(&self, what: &str) -> ConfigError {
        self.err(format!(
            "expected {what}, got {}",
            self.node.value.describe()
        ))
    }

    /// Where this value is, for messages about another one.
    pub fn place(&self) -> String {
        place(&self.path, self.node.at)
    }

    pub fn str(&self) -> Result<&'a str, ConfigError> {
        match &self.node.value {
            Value::Str(s) => Ok(s),
            _ => Err(self.expected("a string")),
        }
    }

    /// A string that is not empty.
    pub fn name(&self) -> Result<&'a str, ConfigError> {
        match self.str()? {
            "" => Err(self.expected("a non-empty string")),
            s => Ok(s),
        }
    }

    pub fn bool(&self) -> Result<bool, ConfigError> {
        match self.node.value {
            Value::Bool(b) => Ok(b),
            _ => Err(self.expected("true or false")),
        }
    }

    /// An integer in `min..=max` (a `max` of `u32::MAX` or more reads as "no maximum").
    pub fn int<T: TryFrom<i64>>(&self, min: i64, max: i64) -> Result<T, ConfigError> {
        let what = if max >= i64::from(u32::MAX) {
            format!("an integer >= {min}")
        } else {
            format!("an integer between {min} and {max}")
        };
        match self.node.value {
            Value::Int(n) if (min..=max).contains(&n) => {
                T::try_from(n).map_err(|_| self.expected(&what))
            }
            _ => Err(self.expected(&what)),
        }
    }

    /// A duration string such as `"500ms"`, `"2s"` or `"1m30s"`; zero allowed.
    pub fn duration(&self) -> Result<Duration, ConfigError> {
        const WHAT: &str = "a duration such as \"500ms\", \"2s\" or \"1m30s\"";
        let Value::Str(text) = &self.node.value else {
            return Err(self.expected(WHAT));
        };
        parse_duration(text).ok_or_else(|| {
            self.err(format!(
                "invalid duration {text:?} (expected numbers with a unit: us, ms, s, m, h)"
            ))
        })
    }

    /// A duration greater than zero.
    pub fn positive_duration(&self) -> Result<Duration, ConfigError> {
        match self.duration()? {
            Duration::ZERO => Err(self.expected("a duration > 0")),
            d => Ok(d),
        }
    }

    /// `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT`.
    pub fn addr(&self) -> Result<SocketAddr, ConfigError> {
        let text = self.str()?;
        parse_addr(text).ok_or_else(|| self.err(format!("invalid socket address {text:?}")))
    }

    /// A URL path: starts with `/`, no whitespace.
    pub fn url_path(&self) -> Result<String, ConfigError> {
        let text = self.str()?;
        if text.starts_with('/') && !text.contains(|c: char| c.is_whitespace() || c.is_control()) {
            Ok(text.to_owned())
        } else {
            Err(self.expected("a path starting with \"/\""))
        }
    }

    /// A sub-table opened with `keys`.
    pub fn table(&self, keys: &'static [&'static str]) -> Result<Section<'a>, ConfigError> {
        match &self.node.value {
            Value::Table(table) => {
                Section::new(self.cx, self.path.clone(), self.node.at, table, keys)
            }
            _ => Err(self.expected("a table")),
        }
    }

    /// A free-form table: its entries as fields.
    pub fn entries(&self) -> Result<Vec<(&'a str, Field<'a>)>, ConfigError> {
        let Value::Table(table) = &self.node.value else {
            return Err(self.expected("a table"));
        };
        Ok(table
            .entries
            .iter()
            .map(|e| {
                let path = join(&self.path, &e.key);
                (
                    e.key.as_str(),
                    Field {
                        cx: self.cx,
                        path,
                        node: &e.node,
                    },
                )
            })
            .collect())
    }

    /// An array of tables (`[[header]]`), each opened with `keys`.
    pub fn tables(
        &self,
        keys: &'static [&'static str],
        header: &str,
    ) -> Result<Vec<Section<'a>>, ConfigError> {
        let Value::Array(items) = &self.node.value else {
            return Err(self.expected(&format!("an array of tables ({header})")));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let field = Field {
                    cx: self.cx,
                    path: format!("{}[{i}]", self.path),
                    node,
                };
                field.table(keys)
            })
            .collect()
    }

    /// An array's items as fields.
    pub fn items(&self, what: &str) -> Result<Vec<Field<'a>>, ConfigError> {
        let Value::Array(items) = &self.node.value else {
            return Err(self.expected(what));
        };
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, node)| Field {
                cx: self.cx,
                path: format!("{}[{i}]", self.path),
                node,
            })
            .collect())
    }

    /// A scalar as the string a plugin option carries; containers are refused.
    pub fn option_text(&self) -> Result<String, ConfigError> {
        match &self.node.value {
            Value::Str(s) | Value::BigInt(s) | Value::Float(s) => Ok(s.clone()),
            Value::Int(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            _ => Err(self.expected("a string, number or boolean")),
        }
    }
}

/// Parses `"1m30s"`-style durations: one or more number+unit pairs (`us`, `ms`, `s`, `m`,
/// `h`), decimals allowed (`"1.5s"`), spaces between pairs allowed.
pub(super) fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let letters = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(letters);
        let nanos_per_unit: u64 = match unit {
            "us" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let part = if number.contains('.') {
            let value: f64 = number.parse().ok()?;
            // Duration: 1e-9 precision; the conversion rounds to the nearest nanosecond.
            Duration::try_from_secs_f64(value * nanos_per_unit as f64 / 1e9).ok()?
        } else {
            let value: u64 = number.parse().ok()?;
            Duration::from_nanos(value.checked_mul(nanos_per_unit)?)
        };
        total = total.checked_add(part)?;
        rest = tail.trim_start();
    }
    Some(total)
}

/// `IP:PORT`, `[IPv6]:PORT`, or `localhost:PORT` meaning 127.0.0.1 (no DNS lookups).
pub(super) fn parse_addr(text: &str) -> Option<SocketAddr> {
    match text.strip_prefix("localhost:") {
        Some(port) => Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port.parse().ok()?))),
        None => text.parse().ok(),
    }
}
