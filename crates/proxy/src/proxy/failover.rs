//! [`Attempts`]: one request's (HTTP) or connection's (TCP) way through the pool, shared by
//! both paths: the plugin's pick, the retry budget, the backends already tried, each
//! attempt's in-flight guard, what an outcome does to passive health (ejection), and the
//! retry metrics. The paths bring only what an attempt is (an exchange, a connect) and
//! errors that say themselves whether the request may go elsewhere ([`Retry`]), as
//! Pingora's `error.retry()` does, instead of flags combined at the call site.

use std::fmt::Display;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::Settings;
use super::local::{LocalListener, LocalView, NoBackend};
use super::sock::ConnectError;
use crate::pool::{Backend, InFlight};
use lbwasm_plugin_host::RequestInfo;

/// Whether a failed attempt may be repeated, decided by the error where it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Retry {
    /// Nothing came back and nothing of the body was used: on a pooled connection the
    /// backend closed it as the request went out, so the request goes again at once on a
    /// new connection to the same backend (once; otherwise it is [`Retry::Elsewhere`]).
    Fresh,
    /// The backend failed, and the request may go to another one.
    Elsewhere,
    /// The backend may have acted on the request (not idempotent and sent, or its body is
    /// gone): no other attempt.
    Never,
}

/// A failed attempt's error, which knows whether the request may be repeated.
pub(super) trait AttemptError: Display {
    /// Whether the request may go again. `replayable`: it is idempotent and has no body
    /// that streamed (it can be sent again as it is).
    fn retry(&self, replayable: bool) -> Retry;
}

/// A connect that failed or timed out reached no application.
impl AttemptError for ConnectError {
    fn retry(&self, _: bool) -> Retry {
        Retry::Elsewhere
    }
}

/// Why no (further) attempt is made.
pub(super) enum Exhausted {
    /// No backend for the first attempt: the proxy answers 503 (or refuses the
    /// connection) with this cause.
    NoBackend(NoBackend),
    /// Attempts, budget or eligible backends ran out after at least one attempt; the last
    /// failure is the answer.
    Failed,
}

/// One attempt: the backend picked, counted in its in-flight figure while the attempt
/// lasts.
pub(super) struct Attempt {
    /// The backend's in-flight count; its outcome feeds health.
    pub(super) guard: InFlight,
    /// 0 for the first attempt.
    number: u32,
}

impl Attempt {
    /// The backend the plugin picked.
    pub(super) fn backend(&self) -> &Arc<Backend> {
        self.guard.backend()
    }
}

/// Backend indices already tried (at most `retry.attempts` <= 10), without allocating.
#[derive(Default)]
struct Tried {
    list: [usize; 16],
    len: usize,
}

impl Tried {
    fn push(&mut self, index: usize) {
        if self.len < self.list.len() {
            self.list[self.len] = index;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[usize] {
        &self.list[..self.len]
    }
}

/// The attempts of one request or connection.
pub(super) struct Attempts<'a> {
    local: &'a LocalListener,
    view: Rc<LocalView>,
    /// `retry.attempts`, at least 1.
    max: u32,
    /// Consecutive failures that eject a backend (`passive.consecutive_failures`).
    passive: u32,
    /// When the request arrived: the first attempt's in-flight time counts from there.
    arrived: Instant,
    /// The request can be sent again as it is (see [`AttemptError::retry`]).
    replayable: bool,
    tried: Tried,
    made: u32,
    /// A failure said [`Retry::Never`].
    stopped: bool,
}

impl<'a> Attempts<'a> {
    /// The attempts of a request that arrived at `arrived`, over `view` with `settings`;
    /// `replayable`: it can be sent again as it is. A first attempt earns the listener's
    /// retry budget its share.
    pub(super) fn new(
        local: &'a LocalListener,
        view: Rc<LocalView>,
        settings: &Settings,
        arrived: Instant,
        replayable: bool,
    ) -> Self {
        local.budget.deposit(settings.retry.budget_percent);
        Attempts {
            local,
            view,
            max: settings.retry.attempts.max(1),
            passive: settings.passive.consecutive_failures,
            arrived,
            replayable,
            tried: Tried::default(),
            made: 0,
            stopped: false,
        }
    }

    /// The next attempt: a backend from the plugin (never one already tried), if the
    /// attempts, the retry budget and the last failure allow one. `info` is what the
    /// plugin sees; its `attempt` is set here.
    pub(super) fn next(&mut self, info: &mut RequestInfo) -> Result<Attempt, Exhausted> {
        if self.stopped || self.made >= self.max {
            return Err(Exhausted::Failed);
        }
        let shared = &self.local.shared;
        if self.made > 0 {
            if !self.local.budget.withdraw() {
                tracing::debug!(listener = %shared.name, "retry budget exhausted");
                return Err(Exhausted::Failed);
            }
            self.local.metrics.retry(shared.index);
        }
        info.attempt = self.made;
        let index = match self.local.choose(&self.view, info, self.tried.as_slice()) {
            Ok(i) => i,
            Err(why) if self.made == 0 => return Err(Exhausted::NoBackend(why)),
            Err(_) => return Err(Exhausted::Failed),
        };
        let Some(backend) = self.view.snapshot.backend(index) else {
            return Err(Exhausted::Failed);
        };
        self.tried.push(index);
        // The first attempt starts with the request (one clock read less).
        let guard = if self.made == 0 {
            InFlight::start_at(backend.clone(), self.arrived)
        } else {
            InFlight::start(backend.clone())
        };
        self.made += 1;
        Ok(Attempt {
            guard,
            number: self.made - 1,
        })
    }

    /// Whether the request can be sent again as it is.
    pub(super) fn replayable(&self) -> bool {
        self.replayable
    }

    /// How many backends were tried (the access log's `tries`).
    pub(super) fn tries(&self) -> usize {
        self.tried.as_slice().len()
    }

    /// The backend answered at `at`: `ok` unless it answered with a server error. Its
    /// failure streak ends, or grows, and may eject it.
    pub(super) fn answered(&self, attempt: &mut Attempt, ok: bool, at: Instant) {
        if attempt.guard.answered(ok, at, self.passive) {
            self.local.shared.eject(attempt.backend().clone());
        }
    }

    /// The attempt failed against its backend with `error`: counted against it (which may
    /// eject it), logged, and retried if the error allows.
    pub(super) fn failed(&mut self, attempt: Attempt, error: &dyn AttemptError) {
        let Attempt { mut guard, number } = attempt;
        if guard.finish(false, None, self.passive) {
            self.local.shared.eject(guard.backend().clone());
        }
        tracing::debug!(listener = %self.local.shared.name, backend = %guard.backend().addr,
            attempt = number, %error, "attempt failed");
        self.stopped |= error.retry(self.replayable) == Retry::Never;
    }

    /// A pooled connection to `backend` held bytes nobody asked for: a failure of the
    /// backend (it may be desynchronised), which may eject it.
    pub(super) fn unasked(&self, backend: &Arc<Backend>, bytes: usize) {
        tracing::warn!(listener = %self.local.shared.name, backend = %backend.addr, bytes,
            "backend sent bytes nobody asked for on an idle connection; closed it");
        if backend.failed_unasked(self.passive) {
            self.local.shared.eject(backend.clone());
        }
    }
}
