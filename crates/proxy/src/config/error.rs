//! [`ConfigError`]: a refused configuration, pointing at the line or flag to fix; and the
//! [`Source`] that turns where a value came from into that line or flag.

use std::fmt;
use std::path::{Path, PathBuf};

use super::value::Origin;

/// Why the configuration was refused, and where to fix it.
///
/// Displayed as `FILE:LINE: KEY: MESSAGE` for a value in the file (`KEY` is a path such as
/// `listener[0].backend[1].weight`), `--FLAG: MESSAGE` for a flag, `FILE:LINE: MESSAGE` for
/// a TOML syntax error and `FILE: MESSAGE` when the file cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The configuration file; none when the value came from a flag.
    pub file: Option<PathBuf>,
    /// 1-based line in `file`; none when the value came from a flag or the file is unreadable.
    pub line: Option<usize>,
    /// Key path (`listener[0].health.rise`) or flag (`--backends`); empty for syntax errors.
    pub key: String,
    /// What is wrong, and what was expected.
    pub message: String,
}

impl ConfigError {
    /// An error about the value of `flag`.
    pub(super) fn flag(flag: &str, message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            line: None,
            key: flag.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, _) => {}
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The configuration file being read (none, the default: flags alone), which spans point
/// into.
#[derive(Default)]
pub(super) struct Source<'a> {
    pub file: Option<&'a Path>,
    pub text: &'a str,
}

impl<'a> Source<'a> {
    /// Values from `file`, whose contents are `text` (and maybe flags).
    pub fn file(file: &'a Path, text: &'a str) -> Self {
        Source {
            file: Some(file),
            text,
        }
    }

    /// An error about the value at `at`, whose key path is `key`.
    pub fn error(&self, at: &Origin, key: &str, message: impl Into<String>) -> ConfigError {
        match at {
            Origin::Span(span) => ConfigError {
                file: self.file.map(Path::to_path_buf),
                line: Some(self.line(span.start)),
                key: key.to_owned(),
                message: message.into(),
            },
            Origin::Flag(flag) => ConfigError::flag(flag, message),
        }
    }

    /// A place for "see also" in messages: `listener[0].listen (line 3)` or `--listen`.
    pub fn place(&self, at: &Origin, key: &str) -> String {
        match at {
            Origin::Span(span) => format!("{key} (line {})", self.line(span.start)),
            Origin::Flag(flag) => (*flag).to_owned(),
        }
    }

    /// The value at `at` as written in the file.
    pub fn written(&self, at: &Origin) -> Option<&'a str> {
        match at {
            Origin::Span(span) => self.text.get(span.clone()),
            Origin::Flag(_) => None,
        }
    }

    /// `path` as given at `at`: a relative path in the file is relative to its directory.
    pub fn resolve(&self, at: &Origin, path: &Path) -> PathBuf {
        match (at, self.file.and_then(Path::parent)) {
            (Origin::Span(_), Some(dir)) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }

    fn line(&self, offset: usize) -> usize {
        self.text
            .get(..offset)
            .map_or(0, |before| before.matches('\n').count())
            + 1
    }
}
