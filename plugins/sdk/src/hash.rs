//! Hash functions for hash-based algorithms, and a counter-based random generator.
//!
//! `fnv1a` and `xxh3` come from well-known specifications (xxh3 from the `xxhash-rust`
//! crate); `splitmix64` turns a global sequence number into a well-mixed random number, so
//! a "random" plugin is reproducible and needs no per-instance generator state.

/// A selectable string hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashFn {
    /// 64-bit FNV-1a.
    Fnv1a,
    /// 64-bit XXH3.
    Xxh3,
}

impl HashFn {
    /// Names accepted by the `hash` options.
    pub const NAMES: [&'static str; 2] = ["xxh3", "fnv1a"];

    /// Parses a name from [`HashFn::NAMES`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "xxh3" => Some(HashFn::Xxh3),
            "fnv1a" => Some(HashFn::Fnv1a),
            _ => None,
        }
    }

    /// Hashes bytes.
    pub fn hash(self, bytes: &[u8]) -> u64 {
        match self {
            HashFn::Fnv1a => fnv1a(bytes),
            HashFn::Xxh3 => xxh3(bytes),
        }
    }

    /// A hash for positions that get compared (a ring, a sorted table), whose high bits must
    /// differ even when only the last bytes do (`…#17`, `…#18`): FNV-1a alone hardly changes
    /// them, so it gets the SplitMix64 finaliser (measured on a ring without it: 7110 of
    /// 10,000 keys on one of 3 servers); XXH3 is already well mixed.
    pub fn ordered(self, bytes: &[u8]) -> u64 {
        match self {
            HashFn::Fnv1a => splitmix64(fnv1a(bytes)),
            HashFn::Xxh3 => xxh3(bytes),
        }
    }

    /// Hash number `n` of the bytes: the plain [`HashFn::hash`] for 0, an independent one for
    /// every other `n` (a retry's second choice). XXH3 takes `n` as its seed; FNV-1a has no
    /// seed, so `n` is mixed into its hash instead.
    pub fn nth(self, bytes: &[u8], n: u64) -> u64 {
        match (self, n) {
            (hash, 0) => hash.hash(bytes),
            (HashFn::Xxh3, n) => xxh3_seeded(bytes, n),
            (HashFn::Fnv1a, n) => splitmix64(fnv1a(bytes) ^ splitmix64(n)),
        }
    }
}

/// 64-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// 64-bit XXH3.
pub fn xxh3(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// 64-bit XXH3 with a seed (a second, independent hash of the same bytes).
pub fn xxh3_seeded(bytes: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, seed)
}

/// SplitMix64 finaliser: a bijective mix of a 64-bit value (Steele, Lea & Flood, 2014).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform number in `0..bound` from 64 random bits (Lemire's multiply-shift; bias < 2^-32
/// for the bounds a balancer sees).
pub fn bounded(random: u64, bound: u64) -> u64 {
    ((random as u128 * bound as u128) >> 64) as u64
}

/// A small local generator (xorshift64*), for plugins that want randomness without a host call.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeds the generator (any seed, 0 included).
    pub fn new(seed: u64) -> Self {
        Rng(splitmix64(seed) | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        bounded(self.next_u64(), bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(xxh3(b""), 0x2d06800538d394c2);
    }

    #[test]
    fn nth_hash() {
        for h in [HashFn::Xxh3, HashFn::Fnv1a] {
            assert_eq!(h.nth(b"key", 0), h.hash(b"key"));
            assert_ne!(h.nth(b"key", 1), h.hash(b"key"));
            assert_ne!(h.nth(b"key", 1), h.nth(b"key", 2));
        }
        assert_eq!(HashFn::Xxh3.nth(b"key", 3), xxh3_seeded(b"key", 3));
        assert_eq!(HashFn::Xxh3.ordered(b"key"), xxh3(b"key"));
        assert_eq!(HashFn::Fnv1a.ordered(b"key"), splitmix64(fnv1a(b"key")));
        // FNV-1a's top byte barely moves with the last byte; the finalised one does.
        let top = |h: u64| h >> 56;
        assert_eq!(top(fnv1a(b"s#17")), top(fnv1a(b"s#18")));
        assert_ne!(
            top(HashFn::Fnv1a.ordered(b"s#17")),
            top(HashFn::Fnv1a.ordered(b"s#18"))
        );
    }

    #[test]
    fn bounded_is_in_range() {
        let mut r = Rng::new(7);
        for _ in 0..1000 {
            assert!(r.below(3) < 3);
        }
    }
}
