//! A consistent-hash ring: each [`Member`] owns points on a circle of `u64` positions, and a
//! key goes to the first point at or after its own position, so a joining member takes over
//! only the arcs in front of its points. Sources: Karger et al., "Consistent hashing and
//! random trees" (STOC 1997); the virtual-node layout of libketama (last.fm, 2007).
//!
//! The ring only walks: where points go (the layout) is the plugin's choice, with the ketama
//! layout here for the common case; which members may answer comes from [`Members`].

use std::fmt::Write as _;

use crate::members::{Member, Members};

/// Points beyond which a ring's virtual nodes are scaled down, so a huge weight cannot exhaust
/// the sandbox's memory (16 bytes a point: 16 MiB).
pub const MAX_POINTS: u64 = 1 << 20;

/// Points on the ring, sorted by position.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    /// (position, member position in [`Members::list`]), ascending.
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// A ring of these (position, member) points, in any order.
    pub fn new(mut points: Vec<(u64, u32)>) -> Self {
        points.sort_unstable();
        Ring { points }
    }

    /// The ketama layout: point `n` of a member is at `hash(address + "#" + n)`, with
    /// [`Ring::counts`] points per member.
    pub fn ketama(members: &[Member], vnodes: u32, hash: impl Fn(&[u8]) -> u64) -> Self {
        let counts = Self::counts(members, vnodes);
        let mut points = Vec::with_capacity(counts.iter().sum::<u64>() as usize);
        let mut name = String::new();
        for (m, (member, &count)) in (0u32..).zip(members.iter().zip(&counts)) {
            for n in 0..count {
                name.clear();
                let _ = write!(name, "{}#{n}", member.address);
                points.push((hash(name.as_bytes()), m));
            }
        }
        Self::new(points)
    }

    /// A ring of `slots` positions holding one point each: node `j` of member `m` goes to
    /// `place(m, j) % slots`, or the next free slot after it. Nodes are placed j by j (node j
    /// of every member before node j + 1 of any), so collisions are shared and a full ring
    /// drops the highest nodes of the heaviest members, not whole members.
    pub fn slots(
        members: &[Member],
        vnodes: u32,
        slots: u64,
        place: impl Fn(u32, u64) -> u64,
    ) -> Self {
        let counts = Self::counts(members, vnodes);
        let mut taken = vec![false; slots as usize];
        let mut points = Vec::new();
        for j in 0..counts.iter().copied().max().unwrap_or(0) {
            for m in (0u32..)
                .zip(&counts)
                .filter(|(_, c)| j < **c)
                .map(|(m, _)| m)
            {
                if points.len() as u64 == slots {
                    return Self::new(points);
                }
                let mut slot = place(m, j) % slots;
                while taken[slot as usize] {
                    slot = (slot + 1) % slots;
                }
                taken[slot as usize] = true;
                points.push((slot, m));
            }
        }
        Self::new(points)
    }

    /// Points per member, `weight × vnodes`, scaled down only if the total would exceed
    /// [`MAX_POINTS`] (every member keeps one).
    pub fn counts(members: &[Member], vnodes: u32) -> Vec<u64> {
        let wanted: Vec<u64> = members
            .iter()
            .map(|m| u64::from(m.weight) * u64::from(vnodes))
            .collect();
        let total: u64 = wanted.iter().sum();
        if total <= MAX_POINTS {
            return wanted;
        }
        wanted
            .iter()
            .map(|&p| (p * MAX_POINTS / total).max(1))
            .collect()
    }

    /// The points, sorted by position.
    pub fn points(&self) -> &[(u64, u32)] {
        &self.points
    }

    /// The pool index of the `skip`-th distinct healthy member clockwise from `position`
    /// (a retry skips the servers tried before, yet lands somewhere stable). With fewer
    /// healthy members on the ring than `skip + 1`, the walk keeps cycling through them.
    pub fn lookup(&self, position: u64, skip: usize, members: &Members) -> Option<u32> {
        let len = self.points.len();
        let start = self.points.partition_point(|&(p, _)| p < position);
        let mut seen: Vec<u32> = Vec::new();
        for k in 0..len {
            let (_, m) = self.points[(start + k) % len];
            let Some(index) = members.pool_index(m) else {
                continue;
            };
            if seen.contains(&m) {
                continue;
            }
            if seen.len() == skip {
                return Some(index);
            }
            seen.push(m);
        }
        members.pool_index(*seen.get(skip % seen.len().max(1))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Pool, Server};

    fn members(pool: &Pool) -> Members {
        let mut m = Members::default();
        m.update_all(pool);
        m
    }

    #[test]
    fn walks_clockwise_skipping_unhealthy_and_tried() {
        // Members sort as a, b, c (pool indices 0, 1, 2).
        let pool = Pool::new(vec![
            Server::new(0, "a"),
            Server::new(1, "b").down(),
            Server::new(2, "c"),
        ]);
        let m = members(&pool);
        let ring = Ring::new(vec![(30, 2), (10, 0), (20, 1)]);
        assert_eq!(ring.points(), [(10, 0), (20, 1), (30, 2)]);
        assert_eq!(ring.lookup(5, 0, &m), Some(0));
        assert_eq!(ring.lookup(15, 0, &m), Some(2), "b is down: on to c");
        assert_eq!(ring.lookup(31, 0, &m), Some(0), "wraps around");
        assert_eq!(
            ring.lookup(15, 1, &m),
            Some(0),
            "retry: the next distinct one"
        );
        assert_eq!(
            ring.lookup(15, 2, &m),
            Some(2),
            "cycles through the two healthy"
        );
        assert_eq!(Ring::default().lookup(1, 0, &m), None);
    }

    #[test]
    fn ketama_points_and_capped_counts() {
        let pool = Pool::new(vec![
            Server::new(0, "a").with_weight(3),
            Server::new(1, "b"),
        ]);
        let m = members(&pool);
        assert_eq!(Ring::counts(m.list(), 10), [30, 10]);
        assert_eq!(
            Ring::counts(m.list(), 1 << 19),
            [MAX_POINTS / 4 * 3, MAX_POINTS / 4]
        );
        let huge = Pool::new(vec![
            Server::new(0, "a").with_weight(3 << 20),
            Server::new(1, "b"),
        ]);
        assert_eq!(Ring::counts(members(&huge).list(), 1), [MAX_POINTS - 1, 1]);
        let ring = Ring::ketama(m.list(), 1, |b| b.len() as u64 * 100 + u64::from(b[0]));
        // "a#0", "a#1", "a#2", "b#0": three bytes each, so positions 300 + first byte.
        assert_eq!(ring.points(), [(397, 0), (397, 0), (397, 0), (398, 1)]);
    }

    #[test]
    fn slot_rings_probe_and_stop_when_full() {
        let pool = Pool::new(vec![
            Server::new(0, "a").with_weight(3),
            Server::new(1, "b"),
        ]);
        let m = members(&pool);
        // Every node wants slot 1: a gets 1 (j = 0), b 2, then a 3, a 4 (a's nodes 1 and 2).
        let ring = Ring::slots(m.list(), 1, 8, |_, _| 1);
        assert_eq!(ring.points(), [(1, 0), (2, 1), (3, 0), (4, 0)]);
        // Three slots: a's last node is left out, b keeps its one.
        let ring = Ring::slots(m.list(), 1, 3, |m, j| u64::from(m) + j);
        assert_eq!(ring.points(), [(0, 0), (1, 1), (2, 0)]);
    }
}
