//! Sticky canary: a complete custom lbwasm plugin, small enough to read in five minutes.
//!
//! You are rolling out a new version on one server, the *canary*, and want a share of your
//! users on it, each user always on the same side so nobody flips between versions:
//!
//! * a request with the header `x-canary: always` goes to the canary (handy for testers);
//! * otherwise a stable hash of the user's key puts `percent`% of users on the canary;
//! * everyone else is spread round robin over the other healthy servers.
//!
//! If the canary is down or not in the pool, everybody goes to the others.
//!
//! ```toml
//! [listener.plugin_options]
//! canary = "10.0.0.9:8080"  # required: the canary's `host:port`, as in the pool
//! percent = "10"            # share of users on the canary, 0..=100 (default 10)
//! key = "header:x-user"     # what identifies a user (default); see `KeySource`
//! ```
//!
//! Build it with `cargo build --profile plugin --target wasm32-wasip2 -p sticky_canary`.

use lbwasm_plugin::{Host, KeySource, Options, Plugin, Pool, hash};

/// The plugin's state. One instance lives in each proxy worker thread.
pub struct StickyCanary {
    // From the options (`configure`).
    canary_address: String,
    percent: u64,
    key: KeySource,
    // Derived from the pool (`set_servers`), so that `choose` does no searching.
    /// Index of the canary in the pool, when it is there and healthy.
    canary: Option<u32>,
    /// Indices of the healthy servers other than the canary.
    others: Vec<u32>,
}

impl Plugin for StickyCanary {
    // Shown by `lbwasm plugins`.
    const DESCRIPTION: &'static str =
        "sticky canary: percent% of users (or `x-canary: always`) go to one server";

    // Called once, with the options from the config. Every option must be read here: the SDK
    // refuses the ones we never asked for, so a typo is an error at start-up.
    fn configure(options: &mut Options) -> Result<Self, String> {
        let canary_address = options
            .string("canary")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .ok_or("option `canary` is required: the `host:port` of the canary server")?;
        // The pool is not known yet, so whether the canary is in it is decided in `set_servers`.
        let percent = options.number("percent", 10u64, 0, 100)?;
        let key = KeySource::option(options, KeySource::Header("x-user".into()))?;
        Ok(StickyCanary {
            canary_address,
            percent,
            key,
            canary: None,
            others: Vec::new(),
        })
    }

    // Called whenever the pool changes (servers added or removed, health, weights). Indices
    // change with it, so find the canary again and rebuild the list of the others.
    fn set_servers(&mut self, pool: &Pool) {
        self.canary = pool
            .eligible() // healthy servers only: an unhealthy canary counts as absent
            .iter()
            .copied()
            .find(|&i| pool.server(i).address == self.canary_address);
        self.others = pool
            .eligible()
            .iter()
            .copied()
            .filter(|&i| Some(i) != self.canary)
            .collect();
    }

    // Called for every request. Each `host.*` call crosses into the proxy, so ask only for
    // what is needed, and as late as possible.
    fn choose(&mut self, _pool: &Pool, host: &dyn Host) -> Option<u32> {
        if let Some(canary) = self.canary {
            // Opt-in header: always the canary.
            let forced = host
                .header("x-canary")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("always"));
            // Sticky share: the same key always lands in the same bucket 0..100. Raising
            // `percent` from 10 to 20 keeps the first 10% of users on the canary and adds more.
            if forced || (self.percent > 0 && bucket(&self.key.key(host)) < self.percent) {
                return Some(canary);
            }
            // Nobody else is healthy: better the canary than a 503.
            if self.others.is_empty() {
                return Some(canary);
            }
        }
        // Round robin over the others. `host.sequence()` is a counter shared by every worker
        // thread, so the rotation is exact across the whole proxy.
        if self.others.is_empty() {
            return None; // nothing healthy at all: the proxy answers 503
        }
        let n = host.sequence();
        Some(self.others[(n % self.others.len() as u64) as usize])
    }
}

/// The user's bucket, 0..100, from a stable hash of their key (the same on every worker and
/// after a restart: XXH3 has no random seed).
fn bucket(key: &str) -> u64 {
    hash::bounded(hash::xxh3(key.as_bytes()), 100)
}

// Turns `StickyCanary` into a WebAssembly component (on wasm32 only; natively this line is
// empty, which is what lets the tests below run with a plain `cargo test`).
lbwasm_plugin::export_plugin!(StickyCanary);

#[cfg(test)]
mod tests {
    use super::*;
    use lbwasm_plugin::{Server, testing::MockHost};

    /// Configures the plugin and gives it a pool: `canary` is server 1 of 4.
    fn setup(opts: &[(&str, &str)], canary_healthy: bool) -> (StickyCanary, Pool) {
        let mut options = Options::from_pairs(opts);
        let mut plugin = StickyCanary::configure(&mut options).unwrap();
        options.finish().unwrap();
        let canary = Server::new(1, "canary:80");
        let pool = Pool::new(vec![
            Server::new(0, "a:80"),
            if canary_healthy {
                canary
            } else {
                canary.down()
            },
            Server::new(2, "b:80"),
            Server::new(3, "c:80"),
        ]);
        plugin.set_servers(&pool);
        (plugin, pool)
    }

    /// Picks for one request from `user`.
    fn pick(plugin: &mut StickyCanary, pool: &Pool, host: &MockHost, user: &str) -> u32 {
        host.set_header("x-user", user);
        plugin.choose(pool, host).unwrap()
    }

    #[test]
    fn same_user_same_side() {
        let (mut p, pool) = setup(&[("canary", "canary:80"), ("percent", "50")], true);
        let host = MockHost::new(4);
        for u in 0..200 {
            let user = format!("user-{u}");
            let first = pick(&mut p, &pool, &host, &user) == 1;
            for _ in 0..5 {
                assert_eq!(
                    pick(&mut p, &pool, &host, &user) == 1,
                    first,
                    "{user} switched sides"
                );
            }
        }
        // With a single other server, "same side" is "same server".
        let pool = Pool::new(vec![Server::new(0, "a:80"), Server::new(1, "canary:80")]);
        p.set_servers(&pool);
        for u in 0..50 {
            let user = format!("user-{u}");
            let first = pick(&mut p, &pool, &host, &user);
            assert!((0..5).all(|_| pick(&mut p, &pool, &host, &user) == first));
        }
    }

    #[test]
    fn about_percent_of_users_on_canary() {
        for (percent, expected) in [("10", 1000), ("25", 2500), ("0", 0), ("100", 10_000)] {
            let (mut p, pool) = setup(&[("canary", "canary:80"), ("percent", percent)], true);
            let host = MockHost::new(4);
            let on_canary = (0..10_000)
                .filter(|u| pick(&mut p, &pool, &host, &format!("u{u}")) == 1)
                .count();
            assert!(
                on_canary.abs_diff(expected) <= 150,
                "percent={percent}: {on_canary} of 10000"
            );
        }
    }

    #[test]
    fn others_share_round_robin() {
        let (mut p, pool) = setup(&[("canary", "canary:80"), ("percent", "0")], true);
        let host = MockHost::new(4);
        let picks: Vec<u32> = (0..6)
            .map(|_| pick(&mut p, &pool, &host, "someone"))
            .collect();
        assert_eq!(picks, vec![0, 2, 3, 0, 2, 3]);
    }

    #[test]
    fn header_forces_canary() {
        let (mut p, pool) = setup(&[("canary", "canary:80"), ("percent", "0")], true);
        let host = MockHost::new(4);
        host.set_header("x-canary", "Always");
        assert!((0..100).all(|u| pick(&mut p, &pool, &host, &format!("u{u}")) == 1));
        host.set_header("x-canary", "never");
        assert!((0..100).all(|u| pick(&mut p, &pool, &host, &format!("u{u}")) != 1));
    }

    #[test]
    fn unhealthy_or_absent_canary_is_avoided() {
        let host = MockHost::new(4);
        host.set_header("x-canary", "always");
        let (mut p, pool) = setup(&[("canary", "canary:80"), ("percent", "100")], false);
        assert!((0..100).all(|u| pick(&mut p, &pool, &host, &format!("u{u}")) != 1));
        // Not in the pool: `canary:80` is then an ordinary server, in the rotation.
        let (mut p, pool) = setup(&[("canary", "elsewhere:80"), ("percent", "100")], true);
        let picks: Vec<u32> = (0..4)
            .map(|u| pick(&mut p, &pool, &host, &format!("u{u}")))
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 3]);
        // Everything else down: the canary alone serves; nothing healthy: none.
        let pool = Pool::new(vec![
            Server::new(0, "a:80").down(),
            Server::new(1, "canary:80"),
        ]);
        let (mut p, _) = setup(&[("canary", "canary:80"), ("percent", "0")], true);
        p.set_servers(&pool);
        assert_eq!(p.choose(&pool, &host), Some(1));
        let pool = Pool::new(vec![Server::new(0, "a:80").down()]);
        p.set_servers(&pool);
        assert_eq!(p.choose(&pool, &host), None);
    }

    #[test]
    fn options_are_checked() {
        let err = |opts: &[(&str, &str)]| {
            StickyCanary::configure(&mut Options::from_pairs(opts))
                .err()
                .unwrap()
        };
        assert!(err(&[]).contains("`canary`"));
        assert!(err(&[("canary", "x:1"), ("percent", "101")]).contains("`percent`"));
        assert!(err(&[("canary", "x:1"), ("key", "body")]).contains("`key`"));
    }
}
