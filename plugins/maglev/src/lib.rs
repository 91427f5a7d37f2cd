//! Maglev hashing: a key indexes a prime-sized lookup table filled evenly with the backends.
//!
//! Each backend has a preference list, a permutation of the table's M slots given by
//! `offset = h1(address) mod M` and `skip = h2(address) mod (M − 1) + 1` (M prime, so every
//! skip visits every slot). Backends take turns claiming their next still-free preferred slot
//! until the table is full. Every backend therefore owns M/n entries give or take one, and
//! when one joins or leaves most entries keep their backend. A key is then one hash and one
//! array read. Source: D. E. Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4 (the population algorithm is their Pseudocode 1).
//!
//! * h1 and h2 are XXH3 with two fixed seeds; backends are identified by address.
//! * The table holds the eligible servers only and is rebuilt only when their set of
//!   (address, effective weight) changes — not on load reports or re-orderings. Backends are
//!   taken in address order, so the table does not depend on the pool's order.
//! * Weights, as the paper suggests, set the relative frequency of turns: a backend gets
//!   `effective_weight / g` turns per round (g = gcd of the weights, so equal weights of any
//!   size give exactly the paper's table) and ends up with that share of the entries.
//! * Retries (`attempt() = n > 0`) rehash the key with n as the seed; if that lands on the
//!   first attempt's backend, the next slot holding another backend is taken.
//! * M should exceed 100 × the number of backends for the paper's evenness; with more
//!   backends than slots some get no entry.
//!
//! # Options
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `table_size` | 65537 | M, a prime from 7 to 1000003 |
//! | `hash` | `xxh3` | key hash: `xxh3` or `fnv1a` |
//! | `key` | `auto` | `auto`, `header:NAME`, `cookie:NAME`, `path` or `client-ip` |

use lbwasm_plugin::hash::{HashFn, fnv1a, splitmix64, xxh3_seeded};
use lbwasm_plugin::select::gcd;
use lbwasm_plugin::{Host, KeySource, Options, Plugin, Pool};

/// Seeds of h1 (offset) and h2 (skip): any two distinct constants.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_0001;
const SKIP_SEED: u64 = 0x6d61_676c_6576_0002;

const EMPTY: u32 = u32::MAX;

/// A backend as the table knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Backend {
    address: String,
    weight: u32,
}

/// The Maglev algorithm.
pub struct Maglev {
    size: u64,
    hash: HashFn,
    key: KeySource,
    /// Eligible backends sorted by (address, weight); the table refers to them by position.
    backends: Vec<Backend>,
    /// M entries, each a position in `backends`.
    table: Vec<u32>,
    /// Per backend: its current pool index (re-read on every `set_servers`, cheap).
    index: Vec<u32>,
    /// Table builds so far (tests check what does not rebuild).
    builds: u64,
}

/// Trial division: M is at most ~10⁶, so at most ~500 divisions, once at start-up.
fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

impl Maglev {
    /// Fills the table by the paper's round-robin over preference lists.
    fn build(&mut self) {
        self.builds += 1;
        let m = self.size;
        let n = self.backends.len();
        if n == 0 {
            self.table = Vec::new();
            return;
        }
        let g = self
            .backends
            .iter()
            .fold(0, |g, b| gcd(g, b.weight as u64))
            .max(1);
        let turns: Vec<u64> = self.backends.iter().map(|b| b.weight as u64 / g).collect();
        let offset: Vec<u64> = self
            .backends
            .iter()
            .map(|b| xxh3_seeded(b.address.as_bytes(), OFFSET_SEED) % m)
            .collect();
        let skip: Vec<u64> = self
            .backends
            .iter()
            .map(|b| xxh3_seeded(b.address.as_bytes(), SKIP_SEED) % (m - 1) + 1)
            .collect();
        let mut next = vec![0u64; n];
        let mut table = vec![EMPTY; m as usize];
        let mut filled = 0u64;
        // Every preference list visits all M slots, so each turn finds a free one while
        // the table is not full: the loop ends after exactly M claims.
        'fill: loop {
            for b in 0..n {
                for _ in 0..turns[b] {
                    let mut slot = (offset[b] + next[b] * skip[b]) % m;
                    while table[slot as usize] != EMPTY {
                        next[b] += 1;
                        slot = (offset[b] + next[b] * skip[b]) % m;
                    }
                    table[slot as usize] = b as u32;
                    next[b] += 1;
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        self.table = table;
    }

    /// Key hash for attempt `attempt`; attempt 0 is the plain hash.
    fn key_hash(&self, key: &str, attempt: u32) -> u64 {
        match (self.hash, attempt) {
            (hash, 0) => hash.hash(key.as_bytes()),
            (HashFn::Xxh3, n) => xxh3_seeded(key.as_bytes(), n as u64),
            // FNV-1a has no seed: mix the attempt into the hash instead.
            (HashFn::Fnv1a, n) => splitmix64(fnv1a(key.as_bytes()) ^ splitmix64(n as u64)),
        }
    }

    /// The table entry (a backend position) for a key on a given attempt.
    fn entry(&self, key: &str, attempt: u32) -> Option<u32> {
        let m = self.table.len();
        let slot_of = |h: u64| (h % m as u64) as usize;
        let first = *self.table.get(slot_of(self.key_hash(key, 0)))?;
        if attempt == 0 {
            return Some(first);
        }
        let slot = slot_of(self.key_hash(key, attempt));
        // Walk on from the rehashed slot to the first entry that is not the first attempt's
        // backend; with a single backend there is none, and it is the answer again.
        (0..m)
            .map(|k| self.table[(slot + k) % m])
            .find(|&b| b != first)
            .or(Some(first))
    }
}

impl Plugin for Maglev {
    const DESCRIPTION: &'static str =
        "Maglev consistent hashing: an evenly filled lookup table (Google, NSDI 2016)";

    fn configure(o: &mut Options) -> Result<Self, String> {
        let size = o.number("table_size", 65_537u64, 7, 1_000_003)?;
        if !is_prime(size) {
            return Err(format!(
                "option `table_size`: {size} is not a prime (try 65537 or 655373)"
            ));
        }
        let hash = o.choice("hash", "xxh3", &HashFn::NAMES)?;
        let hash = HashFn::from_name(hash).unwrap_or(HashFn::Xxh3);
        let key = KeySource::parse(&o.string("key").unwrap_or_else(|| "auto".to_string()))?;
        Ok(Maglev {
            size,
            hash,
            key,
            backends: Vec::new(),
            table: Vec::new(),
            index: Vec::new(),
            builds: 0,
        })
    }

    fn set_servers(&mut self, pool: &Pool) {
        let mut current: Vec<(&str, u32, u32)> = pool
            .eligible()
            .iter()
            .map(|&i| {
                let s = pool.server(i);
                (s.address.as_str(), s.effective_weight(), i)
            })
            .collect();
        current.sort_unstable();
        let same = current.len() == self.backends.len()
            && current
                .iter()
                .zip(&self.backends)
                .all(|(c, b)| c.0 == b.address && c.1 == b.weight);
        if !same {
            self.backends = current
                .iter()
                .map(|c| Backend {
                    address: c.0.to_string(),
                    weight: c.1,
                })
                .collect();
            self.build();
        }
        self.index = current.iter().map(|c| c.2).collect();
    }

    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
        let eligible = pool.eligible();
        if eligible.is_empty() {
            return None;
        }
        let key = self.key.key(host);
        self.entry(&key, host.attempt())
            .and_then(|b| self.index.get(b as usize).copied())
            // Only without a table for this pool (no `set_servers` yet): still answer.
            .or_else(|| {
                eligible
                    .get((self.key_hash(&key, 0) % eligible.len() as u64) as usize)
                    .copied()
            })
    }
}

lbwasm_plugin::export_plugin!(Maglev);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::Server;
    use lbwasm_plugin::testing::MockHost;

    const KEYS: usize = 10_000;

    fn plugin(pairs: &[(&str, &str)]) -> Maglev {
        let mut o = Options::from_pairs(pairs);
        let p = Maglev::configure(&mut o).unwrap();
        o.finish().unwrap();
        p
    }

    fn servers(n: u32) -> Vec<Server> {
        (0..n)
            .map(|i| Server::new(i, format!("10.0.0.{}:8080", i + 1)))
            .collect()
    }

    /// The address each of `KEYS` keys maps to.
    fn map(p: &mut Maglev, pool: &Pool, attempt: u32) -> Vec<Option<String>> {
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

    fn count(mapping: &[Option<String>], address: &str) -> usize {
        mapping
            .iter()
            .filter(|m| m.as_deref() == Some(address))
            .count()
    }

    #[test]
    fn same_key_same_server_even_after_reordering() {
        let mut p = plugin(&[]);
        let first = map(&mut p, &Pool::new(servers(3)), 0);
        assert_eq!(first, map(&mut p, &Pool::new(servers(3)), 0));
        let mut reversed = servers(3);
        reversed.reverse();
        assert_eq!(first, map(&mut p, &Pool::new(reversed), 0));
        assert_eq!(p.builds, 1);
    }

    #[test]
    fn keys_and_entries_are_even() {
        for hash in ["xxh3", "fnv1a"] {
            let mut p = plugin(&[("hash", hash)]);
            let pool = Pool::new(servers(3));
            let mapping = map(&mut p, &pool, 0);
            let even = KEYS as f64 / 3.0;
            for s in &pool.servers {
                let c = count(&mapping, &s.address) as f64;
                assert!((c - even).abs() <= 0.05 * even, "{hash} {}: {c}", s.address);
            }
            let even = p.size as f64 / 3.0;
            for b in 0..3 {
                let c = p.table.iter().filter(|&&e| e == b).count() as f64;
                assert!((c - even).abs() <= 0.01 * even, "table: {c}");
            }
        }
    }

    #[test]
    fn a_joining_server_moves_few_keys() {
        let mut p = plugin(&[]);
        let before = map(&mut p, &Pool::new(servers(3)), 0);
        let after = map(&mut p, &Pool::new(servers(4)), 0);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert!(moved * 100 <= KEYS * 30, "{moved} moved");
    }

    #[test]
    fn weights_set_the_share_of_entries() {
        let mut p = plugin(&[]);
        let mut s = servers(2);
        s[1] = s[1].clone().with_weight(3);
        p.set_servers(&Pool::new(s));
        let second = p.table.iter().filter(|&&e| e == 1).count() as f64;
        assert!((second / p.size as f64 - 0.75).abs() < 0.01, "{second}");
    }

    #[test]
    fn skips_unhealthy_and_none_when_all_down() {
        let mut p = plugin(&[]);
        let mut s = servers(3);
        s[1] = s[1].clone().down();
        let mapping = map(&mut p, &Pool::new(s), 0);
        assert_eq!(count(&mapping, "10.0.0.2:8080"), 0);
        assert!(mapping.iter().all(Option::is_some));
        let all_down: Vec<Server> = servers(3).into_iter().map(Server::down).collect();
        assert!(
            map(&mut p, &Pool::new(all_down), 0)
                .iter()
                .all(Option::is_none)
        );
        assert!(p.table.is_empty());
    }

    #[test]
    fn retries_go_elsewhere() {
        let mut p = plugin(&[]);
        let pool = Pool::new(servers(3));
        let first = map(&mut p, &pool, 0);
        for attempt in 1..3 {
            let retry = map(&mut p, &pool, attempt);
            assert!(
                first.iter().zip(&retry).all(|(a, b)| a != b),
                "attempt {attempt}"
            );
        }
        let one = Pool::new(servers(1));
        assert!(
            map(&mut p, &one, 1)
                .iter()
                .all(|a| a.as_deref() == Some("10.0.0.1:8080"))
        );
    }

    #[test]
    fn rebuilds_only_when_the_eligible_set_changes() {
        let mut p = plugin(&[("table_size", "251")]);
        let mut s = servers(3);
        p.set_servers(&Pool::new(s.clone()));
        s[0].cpu_percent = Some(80.0);
        s[0].load_sample = 1;
        p.set_servers(&Pool::new(s.clone()));
        assert_eq!(p.builds, 1);
        s[0].warmup = 0.5;
        s[0] = s[0].clone().with_weight(4);
        p.set_servers(&Pool::new(s.clone()));
        assert_eq!(p.builds, 2);
        s[2] = s[2].clone().down();
        p.set_servers(&Pool::new(s));
        assert_eq!(p.builds, 3);
    }

    #[test]
    fn refuses_invalid_options() {
        assert!(is_prime(7) && is_prime(65_537) && is_prime(1_000_003) && !is_prime(65_535));
        for (key, value) in [
            ("table_size", "65536"),
            ("table_size", "5"),
            ("table_size", "1000033"),
            ("hash", "classic"),
            ("key", "body"),
        ] {
            let e = Maglev::configure(&mut Options::from_pairs(&[(key, value)]))
                .err()
                .unwrap();
            assert!(e.contains(&format!("`{key}`")), "{key}={value}: {e}");
        }
    }
}
