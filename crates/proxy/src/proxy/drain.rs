//! [`Drain`]: a worker's live client connections, and the signal to wind them down on
//! shutdown (stop accepting, let in-flight requests finish until the deadline).

use std::cell::Cell;
use std::rc::Rc;

use tokio::sync::Notify;

/// A worker's connections, and the signal to wind them down.
#[derive(Default)]
pub(super) struct Drain {
    draining: Cell<bool>,
    started: Notify,
    pub(super) live: Cell<usize>,
    idle: Notify,
}

/// Counts one live client connection.
pub(super) struct Live(Rc<Drain>);

impl Drop for Live {
    fn drop(&mut self) {
        let d = &self.0;
        d.live.set(d.live.get() - 1);
        if d.live.get() == 0 {
            d.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// Starts the drain: accept loops stop, keep-alive connections close after their
    /// current request.
    pub(super) fn start(&self) {
        self.draining.set(true);
        self.started.notify_waiters();
    }

    /// Whether the worker is draining.
    pub(super) fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// Resolves once the worker is draining.
    pub(super) async fn started(&self) {
        loop {
            let notified = self.started.notified();
            if self.draining.get() {
                return;
            }
            notified.await;
        }
    }

    /// Counts a new client connection until the returned guard drops.
    pub(super) fn enter(self: &Rc<Self>) -> Live {
        self.live.set(self.live.get() + 1);
        Live(self.clone())
    }

    /// Resolves once no client connection is left.
    pub(super) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.live.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}
