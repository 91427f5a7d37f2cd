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
//!   taken in address order, so the table does not depend on the pool's order (the SDK's
//!   `members` module keeps that set).
//! * Weights, as the paper suggests, set the relative frequency of turns: a backend gets
//!   `effective_weight / g` turns per round (g = gcd of the weights, so equal weights of any
//!   size give exactly the paper's table) and ends up with that share of the entries.
//! * Retries (`attempt() = n > 0`) rehash the key with n as the seed (`HashFn::nth`); if
//!   that lands on the first attempt's backend, the next slot holding another backend is taken.
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

use lbwasm_plugin::hash::{HashFn, xxh3_seeded};
use lbwasm_plugin::members::{Member, Members};
use lbwasm_plugin::select::reduced;
use lbwasm_plugin::{Host, KeySource, Options, Plugin, Pool};

/// Seeds of h1 (offset) and h2 (skip): any two distinct constants.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_0001;
const SKIP_SEED: u64 = 0x6d61_676c_6576_0002;

/// The Maglev algorithm.
pub struct Maglev {
    size: u64,
    hash: HashFn,
    key: KeySource,
    /// The eligible servers with their effective weights; the table refers to them by position.
    members: Members,
    /// M entries, each a member position; empty without members.
    table: Vec<u32>,
}

/// Trial division: M is at most ~10⁶, so at most ~500 divisions, once at start-up.
fn is_prime(n: u64) -> bool {
    let mut divisors = (2..).take_while(|d| d * d <= n);
    n >= 2 && divisors.all(|d| !n.is_multiple_of(d))
}

impl Maglev {
    /// Fills the table by the paper's round-robin over preference lists.
    fn build(&self) -> Vec<u32> {
        let (m, members) = (self.size, self.members.list());
        let turns = reduced(members.iter().map(|b| u64::from(b.weight)));
        let h = |b: &Member, seed, modulus| xxh3_seeded(b.address.as_bytes(), seed) % modulus;
        let offset: Vec<u64> = members.iter().map(|b| h(b, OFFSET_SEED, m)).collect();
        let skip: Vec<u64> = members.iter().map(|b| h(b, SKIP_SEED, m - 1) + 1).collect();
        let probe = |b: usize, n: u64| ((offset[b] + n * skip[b]) % m) as usize;
        let mut next = vec![0u64; members.len()];
        let mut table = vec![u32::MAX; if members.is_empty() { 0 } else { m as usize }];
        // Each backend takes `turns` claims per round. Every preference list visits all M
        // slots, so each claim finds a free one while the table is not full: M claims fill it.
        let round = (0..members.len()).flat_map(|b| std::iter::repeat_n(b, turns[b] as usize));
        for b in round.cycle().take(table.len()) {
            while table[probe(b, next[b])] != u32::MAX {
                next[b] += 1;
            }
            table[probe(b, next[b])] = b as u32;
            next[b] += 1;
        }
        table
    }

    /// The table entry (a member position) for a key on a given attempt; none without a
    /// table. A retry rehashes the key and walks on to the first entry that is not the first
    /// attempt's member (with a single member there is none, and it is the answer again).
    fn entry(&self, key: &str, attempt: u32) -> Option<u32> {
        let m = self.table.len() as u64;
        let hash = |n: u32| self.hash.nth(key.as_bytes(), n.into());
        let first = self.table[hash(0).checked_rem(m)? as usize];
        if attempt == 0 {
            return Some(first);
        }
        let start = hash(attempt) % m;
        let mut walk = (0..m).map(|k| self.table[((start + k) % m) as usize]);
        walk.find(|&b| b != first).or(Some(first))
    }
}

/// Why a table size is refused.
const NOT_PRIME: &str = "is not a prime (try 65537 or 655373)";

impl Plugin for Maglev {
    const DESCRIPTION: &'static str =
        "Maglev consistent hashing: an evenly filled lookup table (Google, NSDI 2016)";

    fn configure(o: &mut Options) -> Result<Self, String> {
        let size = o.number("table_size", 65_537u64, 7, 1_000_003)?;
        if !is_prime(size) {
            return Err(format!("option `table_size`: {size} {NOT_PRIME}"));
        }
        let hash = HashFn::from_name(o.choice("hash", "xxh3", &HashFn::NAMES)?);
        Ok(Maglev {
            size,
            hash: hash.unwrap_or(HashFn::Xxh3),
            key: KeySource::option(o, KeySource::Auto)?,
            members: Members::default(),
            table: Vec::new(),
        })
    }

    fn set_servers(&mut self, pool: &Pool) {
        if self.members.update_eligible(pool) {
            self.table = self.build();
        }
    }

    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
        // Nothing eligible: no members, no table, and the fallback finds none either.
        let key = self.key.key(host);
        let entry = self.entry(&key, host.attempt());
        let found = entry.and_then(|b| self.members.pool_index(b));
        // Only without a table for this pool (no `set_servers` yet): still answer.
        found.or_else(|| pool.eligible_by_hash(self.hash.hash(key.as_bytes())))
    }
}

lbwasm_plugin::export_plugin!(Maglev);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::Server;
    use lbwasm_plugin::testing::{self, MockHost};

    const KEYS: usize = 10_000;

    fn plugin(pairs: &[(&str, &str)]) -> Maglev {
        testing::configure(pairs)
    }

    fn servers(n: usize) -> Vec<Server> {
        testing::servers(&vec![1; n])
    }

    /// The address each of `KEYS` keys maps to.
    fn map(p: &mut Maglev, pool: &Pool, attempt: u32) -> Vec<Option<String>> {
        testing::key_map(p, pool, attempt, KEYS)
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
        assert_eq!(p.members.changes(), 1);
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
        assert_eq!(p.members.changes(), 1);
        s[0].warmup = 0.5;
        s[0] = s[0].clone().with_weight(4);
        p.set_servers(&Pool::new(s.clone()));
        assert_eq!(p.members.changes(), 2);
        s[2] = s[2].clone().down();
        p.set_servers(&Pool::new(s));
        assert_eq!(p.members.changes(), 3);
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

    /// Key → pool index for a fixed pool, pinned before the issue-13 refactor: the table
    /// population and the key hashing must never move a key. Pool: four servers, weights
    /// 1, 1, 3, 1, the second one down; digits are the picks for keys `user-0`…`user-15`.
    #[test]
    fn pinned_key_to_index_answers() {
        let mut s = servers(4);
        s[1] = s[1].clone().down();
        s[2] = s[2].clone().with_weight(3);
        let pool = Pool::new(s);
        for (pairs, attempt, want) in PINNED {
            let mut p = plugin(pairs);
            p.set_servers(&pool);
            let host = MockHost::new(4);
            host.attempt.set(*attempt);
            let got: String = (0..16)
                .map(|k| {
                    *host.hash_key.borrow_mut() = Some(format!("user-{k}"));
                    char::from(b'0' + p.choose(&pool, &host).unwrap() as u8)
                })
                .collect();
            assert_eq!(&got, want, "{pairs:?} attempt {attempt}");
        }
    }

    /// Options, retry attempt, and the picks for keys `user-0`…`user-15`.
    type Pinned = (&'static [(&'static str, &'static str)], u32, &'static str);

    const PINNED: &[Pinned] = &[
        (&[], 0, "3223023232222322"),
        (&[], 1, "2030232020333233"),
        (&[], 2, "0032200020033003"),
        (&[("hash", "fnv1a")], 0, "2220202222322203"),
        (&[("hash", "fnv1a")], 1, "3002320330233322"),
        (&[("table_size", "251")], 0, "0222222220200323"),
    ];
}
