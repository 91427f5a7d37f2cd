//! The backends one DNS source put in its pool, and how an answer changes them: new
//! addresses are added, changed SRV weights set, addresses gone drained and removed once
//! idle (or after a grace period). Only the source's own backends are ever touched: a
//! static, admin-added or cluster-managed member with the same address is left alone (and
//! the source does not take it over).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pool::{Backend, Pool};

/// What [`Members::apply`] changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Applied {
    pub added: Vec<SocketAddr>,
    pub leaving: Vec<SocketAddr>,
    /// Taken back while draining: the address came back.
    pub returned: Vec<SocketAddr>,
    /// In the answer, but another owner's member has the address.
    pub not_ours: Vec<SocketAddr>,
}

/// The backends a source added, and those of them on their way out.
#[derive(Default)]
pub(super) struct Members {
    owned: HashMap<SocketAddr, Arc<Backend>>,
    /// Draining since the answer lost them: removed when idle or at this deadline.
    leaving: HashMap<SocketAddr, Instant>,
}

impl Members {
    /// Makes the pool's share of this source what `found` (address → weight) says, each
    /// with `max_connections`; members no longer found start draining for at most `grace`.
    pub fn apply(
        &mut self,
        pool: &Pool,
        found: &BTreeMap<SocketAddr, u32>,
        max_connections: u32,
        grace: Duration,
    ) -> Applied {
        let mut applied = Applied::default();
        // Ours no more (removed through the admin API or a reload): forgotten; found again,
        // it is added again, as DNS says.
        self.owned
            .retain(|addr, b| pool.find(*addr).is_some_and(|m| m.id == b.id));
        self.leaving.retain(|addr, _| self.owned.contains_key(addr));
        pool.update(|changes| {
            for (&addr, &weight) in found {
                if let Some(b) = self.owned.get(&addr) {
                    if self.leaving.remove(&addr).is_some() {
                        changes.state(b, |st| st.draining = false);
                        applied.returned.push(addr);
                    }
                    changes.set_limits(b, weight, max_connections);
                }
            }
            for (&addr, b) in &self.owned {
                if !found.contains_key(&addr) && !self.leaving.contains_key(&addr) {
                    changes.state(b, |st| st.draining = true);
                    self.leaving.insert(addr, Instant::now() + grace);
                    applied.leaving.push(addr);
                }
            }
        });
        for (&addr, &weight) in found {
            if self.owned.contains_key(&addr) {
                continue;
            }
            let b = Backend::new(addr, weight, max_connections);
            if pool.add(b.clone()) {
                self.owned.insert(addr, b);
                applied.added.push(addr);
            } else {
                applied.not_ours.push(addr);
            }
        }
        applied
    }

    /// Sets every member still found to `max_connections` (and a `dns://` source's
    /// `weight`, when given) after a reload changed them.
    pub fn set_limits(&self, pool: &Pool, weight: Option<u32>, max_connections: u32) {
        pool.update(|changes| {
            for b in self.owned.values() {
                changes.set_limits(b, weight.unwrap_or_else(|| b.weight()), max_connections);
            }
        });
    }

    /// Every member starts leaving (the source was removed or the server stops).
    pub fn leave_all(&mut self, pool: &Pool, grace: Duration) {
        self.apply(pool, &BTreeMap::new(), 0, grace);
    }

    /// Removes the leaving members that have nothing in flight or whose grace is over.
    /// Returns the addresses removed.
    pub fn sweep(&mut self, pool: &Pool) -> Vec<SocketAddr> {
        let now = Instant::now();
        let done: Vec<SocketAddr> = self
            .leaving
            .iter()
            .filter(|(addr, deadline)| {
                now >= **deadline || self.owned.get(addr).is_none_or(|b| b.in_flight() == 0)
            })
            .map(|(addr, _)| *addr)
            .collect();
        for addr in &done {
            self.leaving.remove(addr);
            if let Some(b) = self.owned.remove(addr) {
                pool.remove(|m| m.id == b.id);
            }
        }
        done
    }

    /// Some member is draining.
    pub fn any_leaving(&self) -> bool {
        !self.leaving.is_empty()
    }

    /// The ids of every member, leaving ones included.
    pub fn ids(&self) -> Vec<u32> {
        self.owned.values().map(|b| b.id).collect()
    }

    /// Members in the pool that are not leaving.
    pub fn serving(&self) -> usize {
        self.owned.len() - self.leaving.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::InFlight;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn found(ports: &[(u16, u32)]) -> BTreeMap<SocketAddr, u32> {
        ports.iter().map(|&(p, w)| (addr(p), w)).collect()
    }

    fn addresses(pool: &Pool) -> Vec<SocketAddr> {
        let mut a: Vec<_> = pool.members().iter().map(|b| b.addr).collect();
        a.sort();
        a
    }

    #[test]
    fn follows_answers_and_leaves_other_members_alone() {
        let stat = Backend::new(addr(1), 1, 0);
        let pool = Pool::new("web", vec![stat.clone()], Duration::ZERO);
        let mut m = Members::default();
        let grace = Duration::from_secs(30);
        // The static backend's address in the answer is not taken over.
        let a = m.apply(&pool, &found(&[(1, 1), (2, 1), (3, 5)]), 0, grace);
        assert_eq!(a.added, vec![addr(2), addr(3)]);
        assert_eq!(a.not_ours, vec![addr(1)]);
        assert_eq!(pool.find(addr(3)).unwrap().weight(), 5);
        // An admin-added member.
        assert!(pool.add(Backend::new(addr(9), 1, 0)));
        // 3 goes: it drains (in flight), then goes once idle; 2 is re-weighted.
        let busy = InFlight::start(pool.find(addr(3)).unwrap());
        let a = m.apply(&pool, &found(&[(2, 4)]), 0, grace);
        assert_eq!(a.leaving, vec![addr(3)]);
        assert!(pool.find(addr(3)).unwrap().current_state().draining);
        assert_eq!(pool.find(addr(2)).unwrap().weight(), 4);
        assert!(m.sweep(&pool).is_empty(), "a request is in flight");
        drop(busy);
        assert_eq!(m.sweep(&pool), vec![addr(3)]);
        assert_eq!(addresses(&pool), vec![addr(1), addr(2), addr(9)]);
        // Everything goes: only the source's own member leaves.
        m.leave_all(&pool, grace);
        m.sweep(&pool);
        assert_eq!(addresses(&pool), vec![addr(1), addr(9)]);
        assert!(!stat.current_state().draining);
    }

    #[test]
    fn a_returning_address_is_taken_back_and_grace_ends_a_drain() {
        let pool = Pool::new("web", Vec::new(), Duration::ZERO);
        let mut m = Members::default();
        m.apply(&pool, &found(&[(2, 1)]), 0, Duration::from_secs(30));
        let _busy = InFlight::start(pool.find(addr(2)).unwrap());
        m.apply(&pool, &found(&[]), 0, Duration::from_secs(30));
        let a = m.apply(&pool, &found(&[(2, 1)]), 0, Duration::from_secs(30));
        assert_eq!(a.returned, vec![addr(2)]);
        assert!(!pool.find(addr(2)).unwrap().current_state().draining);
        // Gone again with no grace: removed although a request is in flight.
        m.apply(&pool, &found(&[]), 0, Duration::ZERO);
        assert_eq!(m.sweep(&pool), vec![addr(2)]);
        assert!(pool.members().is_empty());
    }
}
