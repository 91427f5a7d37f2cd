//! [`RetryBudget`]: retries may add at most a percentage of the requests (linkerd / Finagle
//! retry budgets), so that retrying cannot multiply the load of a pool that is failing.
//!
//! A token bucket per worker and listener (no shared state): every first attempt deposits
//! `budget_percent / 100` of a token, every retry withdraws one. A small reserve refilled
//! each second (Finagle's `minRetriesPerSec`) lets a quiet proxy retry at all.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Tokens are counted in hundredths of a retry, so percentages add up exactly.
const RETRY: u32 = 100;
/// Retries always allowed per second (and worker), whatever the traffic.
const RESERVE: u32 = 10 * RETRY;
/// Most tokens saved up: a long healthy period buys a bounded burst of retries.
const CAP: u32 = 100 * RETRY;

/// One worker's retry budget for one listener.
pub(crate) struct RetryBudget {
    tokens: Cell<u32>,
    refilled: Cell<Instant>,
}

impl RetryBudget {
    /// Starts with the reserve.
    pub(crate) fn new() -> Self {
        RetryBudget {
            tokens: Cell::new(RESERVE),
            refilled: Cell::new(Instant::now()),
        }
    }

    /// A first attempt: earns `percent` % of a retry.
    pub(crate) fn deposit(&self, percent: u32) {
        self.tokens
            .set(self.tokens.get().saturating_add(percent).min(CAP));
    }

    /// A retry: true if the budget allows it (and spends it).
    pub(crate) fn withdraw(&self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.refilled.get()) >= Duration::from_secs(1) {
            self.refilled.set(now);
            self.tokens.set(self.tokens.get().max(RESERVE));
        }
        let t = self.tokens.get();
        if t >= RETRY {
            self.tokens.set(t - RETRY);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_the_share_of_requests() {
        let b = RetryBudget::new();
        let mut allowed = 0;
        while b.withdraw() {
            allowed += 1;
        }
        assert_eq!(allowed, 10, "the reserve");
        for _ in 0..50 {
            b.deposit(20);
        }
        let mut more = 0;
        while b.withdraw() {
            more += 1;
        }
        assert_eq!(more, 10, "20% of 50 requests");
    }
}
