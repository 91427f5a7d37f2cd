//! Selection helpers shared by the algorithms.

use crate::pool::Pool;

/// The eligible server with the smallest `score`; when several tie for it, the `rotation`-th
/// of them (mod their count), so equal servers take equal turns. Rotating over the tied
/// servers, not the scan's starting point, matters: with server 0 busy and 1 and 2 idle, a
/// rotating start would give server 1 two turns in three. A score that is not finite (an
/// unusable server, e.g. one at its connection limit) is never picked; `None` when nothing
/// is eligible.
pub fn min_by_score<F>(pool: &Pool, rotation: u64, score: F) -> Option<u32>
where
    F: Fn(u32) -> f64,
{
    least_by_key(pool, rotation, |i| Some(score(i)).filter(|s| s.is_finite()))
}

/// [`min_by_score`] for any ordered key, the path for per-request scans of large pools: one
/// pass finds the minimum and counts the ties; only a tie costs a second pass (stopping
/// early) to take the `rotation`-th of them. `key` returns `None` for a server that cannot be
/// used (e.g. full). Keys must be totally ordered (no NaN).
pub fn least_by_key<K, F>(pool: &Pool, rotation: u64, key: F) -> Option<u32>
where
    K: PartialOrd + Copy,
    F: Fn(u32) -> Option<K>,
{
    let mut best: Option<(K, u32)> = None;
    let mut ties = 0u64;
    for &i in pool.eligible() {
        let Some(k) = key(i) else { continue };
        let lower = match best {
            None => true,
            Some((b, _)) => {
                ties += u64::from(k == b);
                k < b
            }
        };
        if lower {
            best = Some((k, i));
            ties = 1;
        }
    }
    let (best, first) = best?;
    if ties == 1 {
        return Some(first);
    }
    let mut turn = rotation % ties;
    for &i in pool.eligible() {
        if key(i) == Some(best) {
            if turn == 0 {
                return Some(i);
            }
            turn -= 1;
        }
    }
    None
}

/// The eligible server with the least `key(index, in_flight)` among those under their
/// connection limit, ties taking turns as in [`least_by_key`]: the scan of the
/// least-connections family. `in_flight` is the host's column (0 past its end). When no
/// server has a limit, the check and the trip to each `Server` it costs are skipped.
pub fn least_with_room<K, F>(pool: &Pool, in_flight: &[u32], rotation: u64, key: F) -> Option<u32>
where
    K: PartialOrd + Copy,
    F: Fn(u32, u32) -> K,
{
    let load = |i: u32| in_flight.get(i as usize).copied().unwrap_or(0);
    if pool.has_limits() {
        least_by_key(pool, rotation, |i| {
            let n = load(i);
            pool.has_room(i, n).then(|| key(i, n))
        })
    } else {
        least_by_key(pool, rotation, |i| Some(key(i, load(i))))
    }
}

/// [`least_with_room`] keyed by the in-flight count itself: least connections. In the usual
/// case (every server eligible, none with a limit) the column is scanned as a slice, in
/// loops the compiler turns into SIMD (`simd128` on wasm): at 1,000 servers, mostly tied at
/// 0, a pick costs half what the general scan's branch per server did. Otherwise, and with
/// the same answer, it is [`least_with_room`].
pub fn least_in_flight(pool: &Pool, in_flight: &[u32], rotation: u64) -> Option<u32> {
    let n = pool.servers.len();
    match in_flight.get(..n) {
        Some(column) if !pool.has_limits() && pool.eligible().len() == n => {
            least_in_column(column, rotation)
        }
        _ => least_with_room(pool, in_flight, rotation, |_, n| n),
    }
}

/// The `rotation`-th (mod their count) of the smallest entries of `column` (the eligible
/// servers' scores, or their in-flight counts), so that equal servers take equal turns;
/// `None` when it is empty. For per-request scans of a whole pool: one pass finds the
/// minimum and its ties, in 16 lanes, then a count by blocks stops at the block that holds
/// the answer. Scores must not be NaN.
///
/// LLVM applies a wasm target feature to the whole module, so every plugin built with the
/// SDK is a SIMD module: fine, as every engine that runs components has `simd128`.
#[cfg_attr(target_family = "wasm", target_feature(enable = "simd128"))]
pub fn least_in_column<T: Lane>(column: &[T], rotation: u64) -> Option<u32> {
    const BLOCK: usize = 64;
    let (least, ties) = least_and_ties(column)?;
    // No ties only when every score is NaN: no server, like the general scan.
    let mut turn = rotation.checked_rem(u64::from(ties))?;
    for (b, block) in column.chunks(BLOCK).enumerate() {
        let here = u64::from(count_equal(block, least));
        if turn < here {
            let (k, _) = (block.iter().enumerate())
                .filter(|&(_, &x)| x == least)
                .nth(turn as usize)?;
            return Some((b * BLOCK + k) as u32);
        }
        turn -= here;
    }
    None
}

/// A value [`least_in_column`] scans: counts and scores.
pub trait Lane: Copy + PartialOrd {
    /// Above or equal to every value (what a lane holds before it sees one).
    const TOP: Self;
}

impl Lane for u32 {
    const TOP: u32 = u32::MAX;
}

impl Lane for f64 {
    const TOP: f64 = f64::INFINITY;
}

/// Lanes of the column scans. Sixteen independent accumulators are four SIMD registers per
/// step for counts: wasm compilers neither unroll nor interleave a reduction, and Cranelift
/// puts an epoch check (and a spill of the accumulator) on every loop iteration, so each
/// step must do as much work as it can.
const LANES: usize = 16;

/// The smaller of two values (`b` on a tie), written as the select that vectorises.
#[inline]
fn lesser<T: Lane>(a: T, b: T) -> T {
    if a < b { a } else { b }
}

/// The minimum of `values` and how many entries equal it, in one pass: each lane keeps its
/// own minimum and count (a lower value restarts the count at 1).
#[inline]
fn least_and_ties<T: Lane>(values: &[T]) -> Option<(T, u32)> {
    if values.is_empty() {
        return None;
    }
    let mut least = [T::TOP; LANES];
    let mut ties = [0u32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for k in 0..LANES {
            let x = chunk[k];
            ties[k] = if x < least[k] {
                1
            } else {
                ties[k] + u32::from(x == least[k])
            };
            least[k] = lesser(x, least[k]);
        }
    }
    let rest = chunks.remainder();
    // Lanes that saw no value hold TOP with a count of 0, which adds nothing below.
    let min = least.iter().chain(rest).copied().fold(T::TOP, lesser);
    let lanes: u32 = (0..LANES)
        .filter(|&k| least[k] == min)
        .map(|k| ties[k])
        .sum();
    Some((min, lanes + count_equal(rest, min)))
}

/// How many entries of `values` equal `v`.
#[inline]
fn count_equal<T: Lane>(values: &[T], v: T) -> u32 {
    let mut lanes = [0u32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for k in 0..LANES {
            lanes[k] += u32::from(chunk[k] == v);
        }
    }
    let rest = chunks.remainder().iter().map(|&x| u32::from(x == v));
    lanes.iter().sum::<u32>() + rest.sum::<u32>()
}

/// `load / weight` as a key for [`least_by_key`], compared exactly without a division:
/// `a / b < c / d` exactly when `a·d < c·b`, and both products fit in a `u64` (a load up to
/// 2^32, a weight below it). A `u128` division per server, the obvious exact key, is a
/// library call in wasm: ~30 ns a server, 32 µs a pick at 1,000 servers.
#[derive(Clone, Copy, Debug)]
pub struct Ratio {
    load: u64,
    weight: u64,
}

impl Ratio {
    /// `load / weight`; a weight of 0 counts as 1.
    pub fn new(load: u32, weight: u32) -> Self {
        Self::wide(u64::from(load), weight)
    }

    /// `(in_flight + 1) / weight`, the key of weighted least connections: counting the
    /// request about to be sent lets weights decide at zero load.
    pub fn with_next(in_flight: u32, weight: u32) -> Self {
        Self::wide(u64::from(in_flight) + 1, weight)
    }

    fn wide(load: u64, weight: u32) -> Self {
        Ratio {
            load,
            weight: u64::from(weight.max(1)),
        }
    }

    fn cross(&self, other: &Ratio) -> (u64, u64) {
        (self.load * other.weight, other.load * self.weight)
    }
}

impl PartialEq for Ratio {
    fn eq(&self, other: &Ratio) -> bool {
        let (a, b) = self.cross(other);
        a == b
    }
}

impl PartialOrd for Ratio {
    fn partial_cmp(&self, other: &Ratio) -> Option<std::cmp::Ordering> {
        let (a, b) = self.cross(other);
        Some(a.cmp(&b))
    }
}

/// Picks among the eligible servers in proportion to `weight(i)` using `random` bits.
/// Servers with weight 0 are skipped; `None` when the total is 0.
pub fn weighted_pick<F>(pool: &Pool, random: u64, mut weight: F) -> Option<u32>
where
    F: FnMut(u32) -> f64,
{
    let weights: Vec<(u32, f64)> = pool
        .eligible()
        .iter()
        .map(|&i| (i, weight(i).max(0.0)))
        .filter(|(_, w)| w.is_finite() && *w > 0.0)
        .collect();
    let total: f64 = weights.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        return None;
    }
    let mut target = (random >> 11) as f64 / (1u64 << 53) as f64 * total;
    for &(i, w) in &weights {
        if target < w {
            return Some(i);
        }
        target -= w;
    }
    weights.last().map(|(i, _)| *i)
}

/// Greatest common divisor.
pub fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// `weights` divided by their greatest common divisor: weights 10:2:2 act as 5:1:1, so a
/// schedule built from them has the shortest period, and equal weights of any size act as 1.
pub fn reduced(weights: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let weights: Vec<u64> = weights.into_iter().collect();
    let divisor = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    weights.iter().map(|w| w / divisor).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Server;

    /// The column fast path gives exactly the general scan's answer, on columns that tie
    /// at the minimum a lot, a little and not at all, for every rotation.
    #[test]
    fn least_in_flight_matches_the_general_scan() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // Lanes of 16 and blocks of 64: sizes either side of both; values up to u32::MAX,
        // which an unused lane also holds.
        for n in [1usize, 3, 15, 16, 17, 63, 64, 65, 130, 1000] {
            let pool = Pool::new((0..n as u32).map(|i| Server::new(i, "x")).collect());
            for (spread, base) in [(1u64, 2), (3, 2), (40, 2), (3, u32::MAX - 2)] {
                let column: Vec<u32> = (0..n).map(|_| (next() % spread) as u32 + base).collect();
                for rotation in (0..200).chain([u64::MAX - 1, u64::MAX]) {
                    let general = least_with_room(&pool, &column, rotation, |_, n| n);
                    assert!(general.is_some());
                    assert_eq!(
                        least_in_flight(&pool, &column, rotation),
                        general,
                        "n {n} spread {spread} rotation {rotation}"
                    );
                    // The same as scores (least loaded's column), thirds so that they round.
                    let scores: Vec<f64> = column.iter().map(|&c| f64::from(c) / 3.0).collect();
                    assert_eq!(
                        least_in_column(&scores, rotation),
                        min_by_score(&pool, rotation, |i| scores[i as usize]),
                        "scores: n {n} spread {spread} rotation {rotation}"
                    );
                }
            }
        }
        // Scores that are all NaN give no server (and no division by zero in the guest).
        assert_eq!(least_in_column(&[f64::NAN, f64::NAN], 3), None);
        // A short column (servers past its end count 0) and an empty pool take the general path.
        let pool = Pool::new((0..4).map(|i| Server::new(i, "x")).collect());
        assert_eq!(least_in_flight(&pool, &[5, 5], 1), Some(3));
        assert_eq!(least_in_flight(&Pool::empty(), &[], 0), None);
    }

    /// Ratios order and tie exactly as the fractions do, at the extremes too.
    #[test]
    fn ratios_compare_as_fractions() {
        let exact = |r: (u64, u64)| (u128::from(r.0) << 64) / u128::from(r.1.max(1));
        let values = [0u32, 1, 2, 3, 7, 1000, u32::MAX - 1, u32::MAX];
        for &a in &values {
            for &b in &values {
                for &c in &values {
                    for &d in &values {
                        let (x, y) = (Ratio::with_next(a, b), Ratio::with_next(c, d));
                        let (ex, ey) = (u64::from(a) + 1, u64::from(c) + 1);
                        // The fixed-point key rounds; compare it only where it is exact.
                        let (fx, fy) = (exact((ex, u64::from(b))), exact((ey, u64::from(d))));
                        let truth = (ex * u64::from(d.max(1))).cmp(&(ey * u64::from(b.max(1))));
                        assert_eq!(x.partial_cmp(&y), Some(truth), "{a}+1/{b} vs {c}+1/{d}");
                        assert_eq!(x == y, truth.is_eq());
                        if fx != fy {
                            assert_eq!(fx.cmp(&fy), truth, "{a}+1/{b} vs {c}+1/{d}");
                        }
                    }
                }
            }
        }
        assert!(Ratio::new(1, 3) == Ratio::new(2, 6));
        assert!(Ratio::new(1, 0) == Ratio::new(1, 1));
        assert!(Ratio::new(2, 3) < Ratio::new(3, 4));
    }

    #[test]
    fn min_skips_unhealthy_and_rotates_ties() {
        let pool = Pool::new(vec![
            Server::new(0, "a"),
            Server::new(1, "b").down(),
            Server::new(2, "c"),
        ]);
        let picks: Vec<u32> = (0..4)
            .map(|r| min_by_score(&pool, r, |_| 1.0).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
        // Only the tied servers take turns: 0 is busier, 2 and 3 alternate.
        let pool = Pool::new((0..4).map(|i| Server::new(i, "x")).collect());
        let score = |i: u32| if i == 0 || i == 1 { 2.0 } else { 1.0 };
        let picks: Vec<u32> = (0..4)
            .map(|r| min_by_score(&pool, r, score).unwrap())
            .collect();
        assert_eq!(picks, vec![2, 3, 2, 3]);
        assert_eq!(min_by_score(&pool, 0, |_| f64::INFINITY), None);
        let picks: Vec<u32> = (0..4)
            .map(|r| least_by_key(&pool, r, |i| Some(score(i) as u32)).unwrap())
            .collect();
        assert_eq!(picks, vec![2, 3, 2, 3]);
        assert_eq!(least_by_key(&pool, 0, |i| (i == 1).then_some(5)), Some(1));
        assert_eq!(least_by_key::<u32, _>(&pool, 0, |_| None), None);
        assert_eq!(
            min_by_score(&pool, 0, |i| if i == 2 { 0.0 } else { 1.0 }),
            Some(2)
        );
        assert_eq!(
            min_by_score(&Pool::new(vec![Server::new(0, "a").down()]), 0, |_| 0.0),
            None
        );
        // Scores that are not finite are never picked; floats tie like integers.
        let score = |i: u32| [f64::NAN, f64::INFINITY, 0.5, 0.5][i as usize];
        let picks: Vec<u32> = (0..3)
            .map(|r| min_by_score(&pool, r, score).unwrap())
            .collect();
        assert_eq!(picks, vec![2, 3, 2]);
    }

    #[test]
    fn least_with_room_honours_limits() {
        let mut servers: Vec<Server> = (0..3).map(|i| Server::new(i, "x")).collect();
        let pool = Pool::new(servers.clone());
        let by_count = |_, n: u32| n;
        assert_eq!(least_with_room(&pool, &[3, 1, 2], 0, by_count), Some(1));
        // A short column counts the missing servers as idle.
        assert_eq!(least_with_room(&pool, &[3, 1], 0, by_count), Some(2));
        servers[1].max_connections = 1;
        servers[2].max_connections = 5;
        let limited = Pool::new(servers);
        assert_eq!(least_with_room(&limited, &[3, 1, 2], 0, by_count), Some(2));
        assert_eq!(least_with_room(&limited, &[3, 1, 5], 0, by_count), Some(0));
        let picks: Vec<u32> = (0..2)
            .map(|r| least_with_room(&limited, &[0, 0, 0], r, |i, _| i.min(1)))
            .map(Option::unwrap)
            .collect();
        assert_eq!(picks, [0, 0], "the key decides, not only in-flight");
    }

    #[test]
    fn weights_reduced_by_their_gcd() {
        assert_eq!(reduced([10, 2, 4]), [5, 1, 2]);
        assert_eq!(reduced([7, 7]), [1, 1]);
        assert_eq!(reduced([0, 0]), [0, 0]);
        assert!(reduced([]).is_empty());
    }
}
