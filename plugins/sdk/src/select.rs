//! Selection helpers shared by the algorithms.

use crate::pool::Pool;

/// The eligible server with the smallest `score`, ties broken by rotating the starting point
/// with `rotation` (so equal servers share traffic instead of the first one taking it all).
/// `None` when nothing is eligible.
pub fn min_by_score<F>(pool: &Pool, rotation: u64, mut score: F) -> Option<u32>
where
    F: FnMut(u32) -> f64,
{
    let eligible = pool.eligible();
    let n = eligible.len();
    if n == 0 {
        return None;
    }
    let start = (rotation % n as u64) as usize;
    let mut best = eligible[start];
    let mut best_score = score(best);
    for k in 1..n {
        let i = eligible[(start + k) % n];
        let s = score(i);
        if s < best_score {
            best = i;
            best_score = s;
        }
    }
    Some(best)
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
        let pool = Pool::new(vec![Server::new(0, "a"), Server::new(1, "b").down(), Server::new(2, "c")]);
        let picks: Vec<u32> = (0..4).map(|r| min_by_score(&pool, r, |_| 1.0).unwrap()).collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
        assert_eq!(min_by_score(&pool, 0, |i| if i == 2 { 0.0 } else { 1.0 }), Some(2));
        assert_eq!(min_by_score(&Pool::new(vec![Server::new(0, "a").down()]), 0, |_| 0.0), None);
    }
}
