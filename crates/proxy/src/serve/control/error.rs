//! [`ControlError`]: why a control-plane operation was refused, in the control plane's own
//! terms. It knows no HTTP: the admin API maps each kind to a status.

/// A control-plane operation that was refused or failed. Each kind carries the one-line
/// reason shown to the operator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The request itself is wrong: a malformed address, a missing selection, values out of
    /// range, a configuration file that does not parse.
    #[error("{0}")]
    BadRequest(String),
    /// It names a listener or a backend that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Well-formed, but what it names cannot be used: a plugin that does not load or
    /// validate, an access log that does not open.
    #[error("{0}")]
    Rejected(String),
    /// Another change got there first (cluster mode: a replica wrote the same keys
    /// since this one last applied them); nothing was changed.
    #[error("{0}")]
    Conflict(String),
    /// Nothing can answer now: no healthy backend, or the plugin cannot pick.
    #[error("{0}")]
    Unavailable(String),
    /// The control plane itself failed (a background task died).
    #[error("{0}")]
    Internal(String),
}
