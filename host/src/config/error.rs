//! [`ConfigError`]: a refused configuration, pointing at the line or flag to fix.

use std::fmt;
use std::path::PathBuf;

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
