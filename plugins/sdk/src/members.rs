//! The membership of a lookup table (a hash ring, a Maglev table): which servers, by address
//! and weight, the table was built for, and where each of them sits in the pool now.
//!
//! Such a table is costly to build and must not move keys needlessly, so it is rebuilt only
//! when the set of (address, weight) changes: not on load reports, re-orderings, or (for a
//! table that keeps unhealthy members) health changes. Members are sorted by address, so the
//! table does not depend on the pool's order, and a restarted backend gets its keys back.

use crate::{Pool, Server};

/// A server as a table knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// `host:port`, the identity to hash.
    pub address: String,
    /// The weight the table gives it.
    pub weight: u32,
}

/// The members of a table, and each one's pool index while it is eligible.
#[derive(Clone, Debug, Default)]
pub struct Members {
    /// Sorted by (address, weight); tables refer to members by position here.
    list: Vec<Member>,
    /// Per member: its pool index when healthy.
    index: Vec<Option<u32>>,
    /// Changes of the set so far.
    changes: u64,
}

impl Members {
    /// Every server, healthy or not, with its configured weight: for a table that keeps
    /// unhealthy members and skips them at lookup (a ring), so that a health change moves
    /// only that server's keys and a warming server does not move keys back and forth.
    /// Returns whether the table must be rebuilt.
    pub fn update_all(&mut self, pool: &Pool) -> bool {
        self.update(pool, 0..pool.servers.len() as u32, |s| s.weight)
    }

    /// The eligible servers with their effective weights (slow start applied): for a table
    /// built from the servers that can take requests (Maglev). Returns whether the table
    /// must be rebuilt.
    pub fn update_eligible(&mut self, pool: &Pool) -> bool {
        let eligible = pool.eligible().iter().copied();
        self.update(pool, eligible, Server::effective_weight)
    }

    /// Takes the pool's servers `indices` with `weight(server)`; returns whether the set of
    /// (address, weight) changed. Pool indices and health are refreshed either way (cheap).
    fn update(
        &mut self,
        pool: &Pool,
        indices: impl IntoIterator<Item = u32>,
        weight: impl Fn(&Server) -> u32,
    ) -> bool {
        let mut current: Vec<(&str, u32, u32)> = indices
            .into_iter()
            .map(|i| (pool.server(i).address.as_str(), weight(pool.server(i)), i))
            .collect();
        current.sort_unstable();
        let same = current.len() == self.list.len()
            && current
                .iter()
                .zip(&self.list)
                .all(|(c, m)| c.0 == m.address && c.1 == m.weight);
        if !same {
            self.changes += 1;
            self.list = current
                .iter()
                .map(|&(address, weight, _)| Member {
                    address: address.to_string(),
                    weight,
                })
                .collect();
        }
        self.index = current
            .iter()
            .map(|&(_, _, i)| pool.server(i).healthy.then_some(i))
            .collect();
        !same
    }

    /// The members, sorted by (address, weight).
    pub fn list(&self) -> &[Member] {
        &self.list
    }

    /// The pool index of member `member`, `None` while it is unhealthy.
    pub fn pool_index(&self, member: u32) -> Option<u32> {
        self.index.get(member as usize).copied().flatten()
    }

    /// How many times the set changed (each a table build): tests check what does not rebuild.
    pub fn changes(&self) -> u64 {
        self.changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers() -> Vec<Server> {
        vec![
            Server::new(0, "b:1"),
            Server::new(1, "a:1"),
            Server::new(2, "c:1"),
        ]
    }

    #[test]
    fn changes_only_with_addresses_and_weights() {
        let mut m = Members::default();
        let all = |m: &mut Members, s: Vec<Server>| m.update_all(&Pool::new(s));
        assert!(all(&mut m, servers()));
        let addresses: Vec<&str> = m.list().iter().map(|m| m.address.as_str()).collect();
        assert_eq!(addresses, ["a:1", "b:1", "c:1"]);
        assert_eq!(m.pool_index(0), Some(1));
        // Re-ordered, a load report, a server down: same set, indices and health refreshed.
        let mut s = servers();
        s.reverse();
        s[0].cpu_percent = Some(80.0);
        s[1] = s[1].clone().down();
        assert!(!all(&mut m, s));
        assert_eq!((m.pool_index(0), m.pool_index(1)), (None, Some(2)));
        assert_eq!(m.pool_index(9), None);
        let mut s = servers();
        s[2] = s[2].clone().with_weight(2);
        assert!(all(&mut m, s));
        assert!(all(&mut m, servers()[..2].to_vec()));
        assert_eq!(m.changes(), 3);
    }

    #[test]
    fn eligible_members_with_effective_weights() {
        let mut s = servers();
        s[0].warmup = 0.5;
        s[0] = s[0].clone().with_weight(4);
        s[2] = s[2].clone().down();
        let pool = Pool::new(s);
        let mut m = Members::default();
        assert!(m.update_eligible(&pool));
        let list: Vec<(&str, u32)> = m.list().iter().map(|m| (&*m.address, m.weight)).collect();
        assert_eq!(list, [("a:1", 1), ("b:1", 2)]);
    }
}
