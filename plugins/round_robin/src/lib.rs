//! Round robin: the n-th request goes to the (n mod k)-th eligible server.
//!
//! `n` is the host's shared sequence, not a per-instance counter, so the rotation is exact
//! over the whole proxy however many worker threads (and plugin instances) serve it.

use lbwasm_plugin::{Host, Options, Plugin, Pool};

/// The round-robin algorithm. Takes no options.
pub struct RoundRobin;

impl Plugin for RoundRobin {
    const DESCRIPTION: &'static str =
        "round robin over healthy servers, exact across worker threads";

    fn configure(_options: &mut Options) -> Result<Self, String> {
        Ok(RoundRobin)
    }

    fn choose(&mut self, pool: &Pool, host: &dyn Host) -> Option<u32> {
        let eligible = pool.eligible();
        if eligible.is_empty() {
            return None;
        }
        let n = host.sequence();
        Some(eligible[(n % eligible.len() as u64) as usize])
    }
}

lbwasm_plugin::export_plugin!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::{Server, testing::MockHost};

    #[test]
    fn rotates_over_healthy_servers() {
        let pool = Pool::new(vec![
            Server::new(0, "a"),
            Server::new(1, "b").down(),
            Server::new(2, "c"),
        ]);
        let host = MockHost::new(3);
        let mut rr = RoundRobin;
        let picks: Vec<u32> = (0..4).map(|_| rr.choose(&pool, &host).unwrap()).collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
        assert_eq!(
            rr.choose(&Pool::new(vec![Server::new(0, "a").down()]), &host),
            None
        );
    }

    #[test]
    fn refuses_options() {
        let mut o = Options::from_pairs(&[("x", "1")]);
        RoundRobin::configure(&mut o).unwrap();
        assert!(o.finish().unwrap_err().contains("`x`"));
    }
}
