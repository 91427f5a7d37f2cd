//! Requests in progress on an HTTP/2 client connection, for its idle timeout: each holds an
//! [`ActivityGuard`] (with its response body) until it ends.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

/// Requests in progress on an HTTP/2 client connection, and when the last one ended: what
/// the idle timeout looks at.
pub(super) struct Activity {
    active: Cell<u32>,
    last: Cell<tokio::time::Instant>,
}

/// Marks its connection busy until dropped (with the response body).
pub(crate) struct ActivityGuard(Rc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.active.set(a.active.get().saturating_sub(1));
        a.last.set(tokio::time::Instant::now());
    }
}

impl Activity {
    /// Nothing in progress yet.
    pub(super) fn new() -> Self {
        Activity {
            active: Cell::new(0),
            last: Cell::new(tokio::time::Instant::now()),
        }
    }

    /// A request begins; it ends when the guard is dropped.
    pub(super) fn begin(self: &Rc<Self>) -> ActivityGuard {
        self.active.set(self.active.get() + 1);
        ActivityGuard(self.clone())
    }

    /// Resolves once nothing has been in progress for `idle`.
    pub(super) async fn expired(&self, idle: Duration) {
        loop {
            if self.active.get() > 0 {
                tokio::time::sleep(idle).await;
                continue;
            }
            let due = self.last.get() + idle;
            if due <= tokio::time::Instant::now() {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}
