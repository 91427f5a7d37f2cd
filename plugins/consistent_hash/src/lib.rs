//! Consistent hashing: a request key goes to the first server point clockwise on a hash ring.
//!
//! Every server owns `weight × vnodes` points on the ring; a key hashes to a position and
//! takes the first point at or after it. When a server joins it takes over only the arcs in
//! front of its own points, so only about 1/n of the keys move, and only to it; when one
//! leaves, only its keys move. Sources: Karger et al., "Consistent hashing and random trees"
//! (STOC 1997); the virtual-node layout of libketama (last.fm, 2007).
//!
//! Two ring layouts:
//!
//! * **modern** (`hash = xxh3 | fnv1a`), ketama style: point n of a server is
//!   `hash(address + "#" + n)` on a sorted ring of u64; a key is found by binary search.
//!   FNV-1a is followed by the SplitMix64 finaliser here: alone it hardly changes its high
//!   bits when only the last bytes differ (`…#17`, `…#18`), which is what orders a ring, so a
//!   server's points would bunch together (measured: 7110 of 10,000 keys on one of 3 servers).
//! * **classic** (`hash = classic`), the seed project's scheme: a ring of `slots` slots;
//!   virtual node j of server i sits at Φ(i, j) = i² + j² + 2j + 25 mod slots (linear probing
//!   to the next free slot on a collision, nodes placed j by j so collisions are shared), and a
//!   key k lands at H(k) = k² + 2k + 17 mod slots. Here k = fnv1a(key) mod 2³² and
//!   i = fnv1a(address) mod 2¹⁶ — a number fixed by the address, not the list position, so
//!   re-ordering the pool moves nothing. Both formulas are quadratic, so they reach only a
//!   fraction of the slots: kept for compatibility, expect a much less even spread. Virtual
//!   nodes that no longer fit in a full ring are left out.
//!
//! Servers are identified by address, so a restarted backend gets its keys back. The ring
//! holds every server, healthy or not, and is rebuilt only when the set of (address, weight)
//! changes — not on load reports, re-orderings or health changes. An unhealthy server is
//! skipped by walking on clockwise, which moves exactly its keys and nothing else. Weights are
//! the configured ones, not slow start: a warming server changing its point count on every
//! step would move keys back and forth. On a retry (`attempt() = n > 0`) the walk skips the
//! first n distinct eligible servers, so a retry goes elsewhere but still somewhere stable.
//!
//! # Options
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `hash` | `xxh3` | `xxh3`, `fnv1a` (modern ring) or `classic` |
//! | `vnodes` | 160 (modern), 9 (classic) | points per unit of weight, 1..=10000 (classic: ≤ `slots`) |
//! | `slots` | 512 | classic only: ring size, 8..=1048576 |
//! | `key` | `auto` | `auto`, `header:NAME`, `cookie:NAME`, `path` or `client-ip` |

use std::fmt::Write as _;

use lbwasm_plugin::hash::{HashFn, fnv1a, splitmix64};
use lbwasm_plugin::{Host, KeySource, Options, Plugin, Pool};

/// Ring points beyond which virtual nodes are scaled down, so a huge weight cannot exhaust
/// the sandbox's memory (16 bytes a point: 16 MiB).
const MAX_POINTS: u64 = 1 << 20;

/// Where points and keys go on the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Modern(HashFn),
    Classic { slots: u64 },
}

/// A server as the ring knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Member {
    address: String,
    weight: u32,
}

/// The consistent-hash algorithm.
pub struct ConsistentHash {
    layout: Layout,
    vnodes: u32,
    key: KeySource,
    /// Ring members sorted by (address, weight); the ring refers to them by position.
    members: Vec<Member>,
    /// (position, member) sorted by position.
    ring: Vec<(u64, u32)>,
    /// Per member: its pool index when eligible. Refreshed on every `set_servers` (cheap),
    /// unlike the ring.
    eligible: Vec<Option<u32>>,
    /// Ring builds so far (tests check that load reports do not rebuild).
    builds: u64,
}

/// A modern ring position; see the module doc for why FNV-1a gets a finaliser.
fn ring_hash(hash: HashFn, bytes: &[u8]) -> u64 {
    match hash {
        HashFn::Xxh3 => hash.hash(bytes),
        HashFn::Fnv1a => splitmix64(fnv1a(bytes)),
    }
}

impl ConsistentHash {
    /// Ring position of a request key.
    fn position(&self, key: &str) -> u64 {
        match self.layout {
            Layout::Modern(hash) => ring_hash(hash, key.as_bytes()),
            Layout::Classic { slots } => {
                let k = (fnv1a(key.as_bytes()) & 0xffff_ffff) % slots;
                (k * k + 2 * k + 17) % slots
            }
        }
    }

    /// The `skip`-th distinct eligible server clockwise from `position`, as a pool index.
    fn lookup(&self, position: u64, skip: usize) -> Option<u32> {
        let len = self.ring.len();
        let start = self.ring.partition_point(|&(p, _)| p < position);
        let mut seen: Vec<u32> = Vec::new();
        for k in 0..len {
            let (_, m) = self.ring[(start + k) % len];
            let Some(index) = self.eligible.get(m as usize).copied().flatten() else {
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
        // Fewer distinct servers on the ring than `skip + 1`: keep cycling through them.
        let m = *seen.get(skip % seen.len().max(1))?;
        self.eligible.get(m as usize).copied().flatten()
    }

    fn build(&mut self) {
        self.builds += 1;
        self.ring = match self.layout {
            Layout::Modern(hash) => self.build_modern(hash),
            Layout::Classic { slots } => self.build_classic(slots),
        };
        self.ring.sort_unstable();
    }

    /// Points per member, scaled down only if the total would exceed [`MAX_POINTS`].
    fn points(&self) -> Vec<u64> {
        let wanted: Vec<u64> = self
            .members
            .iter()
            .map(|m| m.weight as u64 * self.vnodes as u64)
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

    fn build_modern(&self, hash: HashFn) -> Vec<(u64, u32)> {
        let points = self.points();
        let mut ring = Vec::with_capacity(points.iter().sum::<u64>() as usize);
        let mut name = String::new();
        for (m, (member, &count)) in self.members.iter().zip(&points).enumerate() {
            for n in 0..count {
                name.clear();
                let _ = write!(name, "{}#{n}", member.address);
                ring.push((ring_hash(hash, name.as_bytes()), m as u32));
            }
        }
        ring
    }

    fn build_classic(&self, slots: u64) -> Vec<(u64, u32)> {
        let points = self.points();
        let numbers: Vec<u64> = self
            .members
            .iter()
            .map(|m| fnv1a(m.address.as_bytes()) & 0xffff)
            .collect();
        let mut taken = vec![false; slots as usize];
        let mut ring = Vec::new();
        let rounds = points.iter().copied().max().unwrap_or(0);
        // Node j of every server before node j + 1 of any: a full ring then drops the highest
        // nodes of the heaviest servers, not whole servers.
        for j in 0..rounds {
            for (m, &i) in numbers.iter().enumerate() {
                if j >= points[m] {
                    continue;
                }
                if ring.len() as u64 == slots {
                    return ring;
                }
                let (i, j) = (i % slots, j % slots);
                let mut slot = (i * i + j * j + 2 * j + 25) % slots;
                while taken[slot as usize] {
                    slot = (slot + 1) % slots;
                }
                taken[slot as usize] = true;
                ring.push((slot, m as u32));
            }
        }
        ring
    }
}

impl Plugin for ConsistentHash {
    const DESCRIPTION: &'static str =
        "consistent hashing on a ring with virtual nodes (ketama, or the classic slot ring)";

    fn configure(o: &mut Options) -> Result<Self, String> {
        let layout = match o.choice("hash", "xxh3", &["xxh3", "fnv1a", "classic"])? {
            "classic" => Layout::Classic {
                slots: o.number("slots", 512, 8, 1 << 20)?,
            },
            name => Layout::Modern(HashFn::from_name(name).unwrap_or(HashFn::Xxh3)),
        };
        let vnodes = match layout {
            Layout::Modern(_) => o.number("vnodes", 160, 1, 10_000)?,
            Layout::Classic { slots } => {
                let max = slots.min(10_000) as u32;
                o.number("vnodes", 9, 1, max)?
            }
        };
        if matches!(layout, Layout::Modern(_)) && o.string("slots").is_some() {
            return Err("option `slots`: only used with `hash = classic`".to_string());
        }
        let key = KeySource::parse(&o.string("key").unwrap_or_else(|| "auto".to_string()))?;
        Ok(ConsistentHash {
            layout,
            vnodes,
            key,
            members: Vec::new(),
            ring: Vec::new(),
            eligible: Vec::new(),
            builds: 0,
        })
    }

    fn set_servers(&mut self, pool: &Pool) {
        let mut current: Vec<(&str, u32, u32, bool)> = pool
            .servers
            .iter()
            .zip(0u32..)
            .map(|(s, i)| (s.address.as_str(), s.weight, i, s.healthy))
            .collect();
        current.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let same = current.len() == self.members.len()
            && current
                .iter()
                .zip(&self.members)
                .all(|(c, m)| c.0 == m.address && c.1 == m.weight);
        if !same {
            self.members = current
                .iter()
                .map(|c| Member {
                    address: c.0.to_string(),
                    weight: c.1,
                })
                .collect();
            self.build();
        }
        self.eligible = current.iter().map(|c| c.3.then_some(c.2)).collect();
    }

    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
        let eligible = pool.eligible();
        if eligible.is_empty() {
            return None;
        }
        let position = self.position(&self.key.key(host));
        let skip = host.attempt() as usize % eligible.len();
        // The fallback only matters if the ring lost every point of the eligible servers (a
        // full classic ring): still answer, as the contract wants.
        self.lookup(position, skip).or_else(|| {
            eligible
                .get((position % eligible.len() as u64) as usize)
                .copied()
        })
    }
}

lbwasm_plugin::export_plugin!(ConsistentHash);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::Server;
    use lbwasm_plugin::testing::MockHost;

    const KEYS: usize = 10_000;

    fn plugin(pairs: &[(&str, &str)]) -> ConsistentHash {
        let mut o = Options::from_pairs(pairs);
        let p = ConsistentHash::configure(&mut o).unwrap();
        o.finish().unwrap();
        p
    }

    fn servers(n: u32) -> Vec<Server> {
        (0..n)
            .map(|i| Server::new(i, format!("10.0.0.{}:8080", i + 1)))
            .collect()
    }

    /// The address each of `KEYS` keys maps to (addresses, since indices change with the pool).
    fn map(p: &mut ConsistentHash, pool: &Pool, attempt: u32) -> Vec<Option<String>> {
        p.set_servers(pool);
        let host = MockHost::new(pool.servers.len());
        host.attempt.set(attempt);
        (0..KEYS)
            .map(|k| {
                *host.hash_key.borrow_mut() = Some(format!("user-{k}"));
                p.choose(pool, &host)
                    .map(|i| pool.server(i).address.clone())
            })
            .collect()
    }

    fn shares(mapping: &[Option<String>], pool: &Pool) -> Vec<usize> {
        let count = |a: &str| mapping.iter().filter(|m| m.as_deref() == Some(a)).count();
        pool.servers.iter().map(|s| count(&s.address)).collect()
    }

    #[test]
    fn same_key_same_server_even_after_reordering() {
        let mut p = plugin(&[]);
        let pool = Pool::new(servers(3));
        let first = map(&mut p, &pool, 0);
        assert_eq!(first, map(&mut p, &pool, 0));
        let mut reversed = servers(3);
        reversed.reverse();
        assert_eq!(first, map(&mut p, &Pool::new(reversed), 0));
    }

    #[test]
    fn xxh3_spreads_keys_evenly() {
        let mut p = plugin(&[]);
        let pool = Pool::new(servers(3));
        let counts = shares(&map(&mut p, &pool, 0), &pool);
        let even = KEYS as f64 / 3.0;
        for c in &counts {
            assert!((*c as f64 - even).abs() <= 0.15 * even, "{counts:?}");
        }
    }

    #[test]
    fn a_joining_server_takes_keys_only_for_itself() {
        for hash in ["xxh3", "fnv1a"] {
            let mut p = plugin(&[("hash", hash)]);
            let before = map(&mut p, &Pool::new(servers(3)), 0);
            let after = map(&mut p, &Pool::new(servers(4)), 0);
            let new = Some("10.0.0.4:8080".to_string());
            let moved: Vec<_> = before.iter().zip(&after).filter(|(b, a)| b != a).collect();
            assert!(
                moved.len() * 100 <= KEYS * 30,
                "{hash}: {} moved",
                moved.len()
            );
            assert!(moved.iter().all(|(_, a)| **a == new), "{hash}");
        }
    }

    #[test]
    fn weights_give_more_keys() {
        let mut p = plugin(&[]);
        let mut s = servers(2);
        s[1] = s[1].clone().with_weight(3);
        let pool = Pool::new(s);
        let counts = shares(&map(&mut p, &pool, 0), &pool);
        let ratio = counts[1] as f64 / counts[0] as f64;
        assert!((2.4..3.6).contains(&ratio), "{counts:?}");
    }

    #[test]
    fn unhealthy_server_loses_only_its_own_keys() {
        let mut p = plugin(&[]);
        let before = map(&mut p, &Pool::new(servers(3)), 0);
        let mut s = servers(3);
        s[1] = s[1].clone().down();
        let during = map(&mut p, &Pool::new(s), 0);
        let down = Some("10.0.0.2:8080".to_string());
        for (b, d) in before.iter().zip(&during) {
            assert!(d != &down);
            assert!(b == d || b == &down);
        }
        assert_eq!(before, map(&mut p, &Pool::new(servers(3)), 0));
        assert_eq!(p.builds, 1, "health changes must not rebuild the ring");
        let all_down: Vec<Server> = servers(3).into_iter().map(Server::down).collect();
        assert!(
            map(&mut p, &Pool::new(all_down), 0)
                .iter()
                .all(Option::is_none)
        );
    }

    #[test]
    fn retries_go_to_other_servers() {
        let mut p = plugin(&[]);
        let pool = Pool::new(servers(3));
        let [a0, a1, a2, a3] = [0, 1, 2, 3].map(|a| map(&mut p, &pool, a));
        for (((t0, t1), t2), t3) in a0.iter().zip(&a1).zip(&a2).zip(&a3) {
            assert!(t0 != t1 && t0 != t2 && t1 != t2);
            assert_eq!(t3, t0, "attempts cycle over the eligible servers");
        }
        let one = Pool::new(servers(1));
        assert_eq!(map(&mut p, &one, 2)[0].as_deref(), Some("10.0.0.1:8080"));
    }

    #[test]
    fn load_reports_do_not_rebuild_the_ring() {
        let mut p = plugin(&[]);
        let mut s = servers(3);
        p.set_servers(&Pool::new(s.clone()));
        s[0].cpu_percent = Some(50.0);
        s[0].load_sample = 1;
        p.set_servers(&Pool::new(s.clone()));
        assert_eq!(p.builds, 1);
        s[0] = s[0].clone().with_weight(2);
        p.set_servers(&Pool::new(s));
        assert_eq!(p.builds, 2);
    }

    #[test]
    fn classic_ring_follows_the_seed_formulas() {
        let mut p = plugin(&[("hash", "classic")]);
        let pool = Pool::new(servers(3));
        let first = map(&mut p, &pool, 0);
        assert_eq!(first, map(&mut p, &pool, 0));
        assert_eq!(p.ring.len(), 27);
        // The first node placed cannot collide, so it sits exactly at Φ(i, 0) = i² + 25.
        let i = fnv1a(b"10.0.0.1:8080") & 0xffff;
        let m = p
            .members
            .iter()
            .position(|m| m.address == "10.0.0.1:8080")
            .unwrap() as u32;
        assert!(p.ring.contains(&((i * i + 25) % 512, m)));
        assert_eq!(p.position("x"), {
            let k = (fnv1a(b"x") & 0xffff_ffff) % 512;
            (k * k + 2 * k + 17) % 512
        });
        assert!(first.iter().all(Option::is_some));
        let retried = map(&mut p, &pool, 1);
        assert!(first.iter().zip(&retried).all(|(a, b)| a != b));
    }

    #[test]
    fn refuses_invalid_options() {
        for pairs in [
            &[("hash", "md5")][..],
            &[("vnodes", "0")],
            &[("hash", "classic"), ("slots", "4")],
            &[("hash", "classic"), ("slots", "64"), ("vnodes", "65")],
            &[("slots", "512")],
            &[("key", "body")],
        ] {
            let e = ConsistentHash::configure(&mut Options::from_pairs(pairs))
                .err()
                .unwrap();
            let named = pairs.last().map(|(k, _)| format!("`{k}`")).unwrap();
            assert!(e.contains(&named), "{pairs:?}: {e}");
        }
    }
}
