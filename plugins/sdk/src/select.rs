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
    let eligible = pool.eligible();
    let best = eligible
        .iter()
        .map(|&i| score(i))
        .fold(f64::INFINITY, f64::min);
    if !best.is_finite() {
        return None;
    }
    let tied = || eligible.iter().copied().filter(|&i| score(i) == best);
    let turn = rotation % tied().count() as u64;
    tied().nth(turn as usize)
}

/// [`min_by_score`] for integer keys, the fast path for per-request scans of large pools:
/// one pass finds the minimum and counts the ties, a second pass (stopping early) takes the
/// `rotation`-th tie. `key` returns `None` for a server that cannot be used (e.g. full).
pub fn least_by_key<K, F>(pool: &Pool, rotation: u64, key: F) -> Option<u32>
where
    K: Ord + Copy,
    F: Fn(u32) -> Option<K>,
{
    let mut best: Option<K> = None;
    let mut ties = 0u64;
    for &i in pool.eligible() {
        let Some(k) = key(i) else { continue };
        match best {
            Some(b) if k > b => {}
            Some(b) if k == b => ties += 1,
            _ => {
                best = Some(k);
                ties = 1;
            }
        }
    }
    let best = best?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Server;

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
    }
}
