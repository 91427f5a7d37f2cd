//! [`LocalExec`]: hyper's executor on a worker, for the tasks hyper spawns (an HTTP/2
//! client stream's service, a backend connection's driver, a request body's pipe).

use std::future::Future;

/// Spawns on this worker's `LocalSet`: the tasks stay on the thread (they may hold `Rc`s).
#[derive(Clone, Copy, Debug)]
pub(super) struct LocalExec;

impl<F: Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}
