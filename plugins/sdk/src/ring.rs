//! A consistent-hash ring: each [`Member`] owns points on a circle of `u64` positions, and a
//! key goes to the first point at or after its own position, so a joining member takes over
//! only the arcs in front of its points. Sources: Karger et al., "Consistent hashing and
//! random trees" (STOC 1997); the virtual-node layout of libketama (last.fm, 2007).
//!
//! The ring only walks: where points go (the layout) is the plugin's choice, with the ketama
//! layout here for the common case; which members may answer comes from [`Members`].

use std::fmt::Write as _;

use crate::members::{Member, Members};
use crate::options::Options;

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

/// Maglev's smallest table, and the size a pool of up to 65 backends gets: 65,537 entries
/// (256 KiB), the size most implementations fix.
pub const MAGLEV_MIN: u64 = 65_537;

/// Maglev's largest table: 1,000,003 entries, 4 MB per plugin instance (one per worker).
/// Pools of 1,000 backends and more get this size.
pub const MAGLEV_MAX: u64 = 1_000_003;

/// The Maglev table size for `n` backends when none is configured: the first prime above
/// 1000·n, at least [`MAGLEV_MIN`] and at most [`MAGLEV_MAX`]. A pure function of `n`, so
/// every worker and every replica with the same pool has the same table.
///
/// Why 1000·n and not the paper's M > 100·n: measured on 1,000 backends (100,000 keys, one
/// removed), M = 65,537 moves 0.68% of the keys, 100,003 (100·n) still 0.68%, 655,373
/// 0.44% and 1,000,003 0.30% — the minimal share being 0.10%. Only a table well past 100·n
/// brings a removal's disruption down, and the table costs 4 bytes an entry.
pub fn maglev_table_size(n: usize) -> u64 {
    let want = (n as u64)
        .saturating_mul(1000)
        .clamp(MAGLEV_MIN, MAGLEV_MAX);
    (want..=MAGLEV_MAX)
        .find(|&m| is_prime(m))
        .unwrap_or(MAGLEV_MAX)
}

/// Maglev's `table_size` option: a prime from 7 to [`MAGLEV_MAX`], or `auto` (the default):
/// none, the size then follows the pool ([`maglev_resize`]).
pub fn maglev_size_option(o: &mut Options) -> Result<Option<u64>, String> {
    if o.string("table_size").is_none_or(|v| v == "auto") {
        return Ok(None);
    }
    let size = o.number("table_size", MAGLEV_MIN, 7, MAGLEV_MAX)?;
    if !is_prime(size) {
        return Err(format!(
            "option `table_size`: {size} is not a prime (try 65537 or 655373, or auto)"
        ));
    }
    Ok(Some(size))
}

/// The size of a Maglev table rebuilt for `n` backends: the configured one, or with `auto`
/// the current one grown to [`maglev_table_size`] — never shrunk, since any change of size
/// moves most keys.
pub fn maglev_resize(configured: Option<u64>, current: u64, n: usize) -> u64 {
    configured.unwrap_or_else(|| current.max(maglev_table_size(n)))
}

/// Trial division: table sizes are at most ~10⁶, so at most ~500 divisions.
pub fn is_prime(n: u64) -> bool {
    let mut divisors = (2..).take_while(|d| d * d <= n);
    n >= 2 && divisors.all(|d| !n.is_multiple_of(d))
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

    #[test]
    fn maglev_sizes_follow_the_pool_within_bounds() {
        assert!(is_prime(MAGLEV_MIN) && is_prime(MAGLEV_MAX) && is_prime(100_003));
        assert!(!is_prime(1) && !is_prime(65_535) && !is_prime(1_000_001));
        assert_eq!(maglev_table_size(0), MAGLEV_MIN);
        assert_eq!(maglev_table_size(3), MAGLEV_MIN);
        assert_eq!(maglev_table_size(65), MAGLEV_MIN);
        assert_eq!(maglev_table_size(100), 100_003);
        assert_eq!(maglev_table_size(1_000), MAGLEV_MAX);
        assert_eq!(maglev_table_size(20_000), MAGLEV_MAX);
        for n in [66, 300, 999] {
            let m = maglev_table_size(n);
            assert!(is_prime(m) && m > 1000 * n as u64, "{n}: {m}");
        }
    }
}
