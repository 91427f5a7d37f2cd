//! The test bench of the experiments: spawning demo backends, writing the proxy's
//! configuration (TOML text parsed by [`lbwasm_proxy::config::parse_str`], as a user's file would
//! be), starting and stopping the real proxy, and driving its admin endpoint (lookaside
//! picks, adding backends) and managed backend processes.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};

use super::PluginUnderTest;
use super::clients::{self, HttpClient, USER_KEY_HEADER};
use crate::backend::{self, BackendConfig, BackendHandle};

/// Attempts at starting the proxy.
const START_TRIES: u32 = 3;

/// A demo backend on an ephemeral port of 127.0.0.1 with id `id`, seeded.
pub fn backend(id: &str, seed: u64) -> BackendConfig {
    let mut cfg = BackendConfig::new(0);
    cfg.id = Some(id.to_string());
    cfg.seed = Some(seed);
    cfg
}

/// Starts every backend, in order.
pub async fn spawn_all(cfgs: Vec<BackendConfig>) -> anyhow::Result<Vec<BackendHandle>> {
    let mut out = Vec::with_capacity(cfgs.len());
    for cfg in cfgs {
        let id = cfg.id.clone().unwrap_or_default();
        let handle = backend::spawn(cfg)
            .await
            .with_context(|| format!("starting backend {id}"))?;
        tracing::debug!(id, addr = %handle.addr(), "simulated backend");
        out.push(handle);
    }
    Ok(out)
}

/// Stops every backend (like a kill: open connections are dropped).
pub async fn stop_all(backends: &[BackendHandle]) {
    for b in backends {
        b.shutdown().await;
    }
}

/// One `[[listener]]` of the proxy configuration.
#[derive(Clone, Debug)]
pub struct ListenerSpec {
    pub name: String,
    pub plugin: PluginUnderTest,
    pub backends: Vec<SocketAddr>,
    /// Hash on the [`USER_KEY_HEADER`] header.
    pub hash_on_user: bool,
    /// Options after the plugin's own (seed).
    pub options: Vec<(String, String)>,
    /// More TOML for this listener: `[listener.health]`, `[listener.managed]`, ...
    pub extra: String,
}

impl ListenerSpec {
    pub fn new(name: &str, plugin: &PluginUnderTest, backends: &[SocketAddr]) -> Self {
        ListenerSpec {
            name: name.to_string(),
            plugin: plugin.clone(),
            backends: backends.to_vec(),
            hash_on_user: true,
            options: Vec::new(),
            extra: String::new(),
        }
    }

    pub fn option(mut self, key: &str, value: &str) -> Self {
        self.options.push((key.to_string(), value.to_string()));
        self
    }

    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An option value as TOML: integers, floats and booleans bare, the rest quoted.
fn toml_value(v: &str) -> String {
    if v.parse::<i64>().is_ok() || v.parse::<f64>().is_ok() || v == "true" || v == "false" {
        v.to_string()
    } else {
        toml_str(v)
    }
}

/// The configuration text: an admin endpoint and the listeners, all on port 0.
pub fn config_text(listeners: &[ListenerSpec]) -> String {
    let mut t = String::from("[admin]\nlisten = \"127.0.0.1:0\"\n");
    for l in listeners {
        let _ = writeln!(t, "\n[[listener]]");
        let _ = writeln!(t, "name = {}", toml_str(&l.name));
        let _ = writeln!(t, "listen = \"127.0.0.1:0\"");
        let _ = writeln!(t, "plugin = {}", toml_str(&l.plugin.source));
        if l.hash_on_user {
            let _ = writeln!(t, "hash_key = \"header:{USER_KEY_HEADER}\"");
        }
        let options: Vec<&(String, String)> = l.plugin.options.iter().chain(&l.options).collect();
        if !options.is_empty() {
            let _ = writeln!(t, "[listener.plugin_options]");
            for (k, v) in options {
                let _ = writeln!(t, "{k} = {}", toml_value(v));
            }
        }
        t.push_str(&l.extra);
        for b in &l.backends {
            let _ = writeln!(t, "[[listener.backend]]\naddress = \"{b}\"");
        }
    }
    t
}

/// The running proxy.
pub struct Proxy {
    server: lbwasm_proxy::serve::Server,
    listeners: Vec<(String, SocketAddr)>,
    admin: SocketAddr,
}

impl Proxy {
    /// Parses the configuration of `listeners` and starts the proxy on it.
    pub async fn start(listeners: &[ListenerSpec]) -> anyhow::Result<Proxy> {
        let started = std::time::Instant::now();
        let text = config_text(listeners);
        let config = lbwasm_proxy::config::parse_str(&text, Path::new("simulate.toml"))
            .map_err(|e| anyhow::anyhow!("{e}\n--- configuration ---\n{text}"))?;
        // Loading plugins compiles wasm: keep it off the runtime's worker threads. Start-up
        // calls each plugin's `configure` under the runtime's call deadline (20 ms), which a
        // starved machine can miss: try again before giving up.
        let mut tries = 0;
        let server = loop {
            tries += 1;
            let config = config.clone();
            let started = tokio::task::spawn_blocking(move || lbwasm_admin::start(config))
                .await
                .context("proxy start-up task")?;
            match started {
                Ok(server) => break server,
                Err(error) if tries < START_TRIES => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "starting the proxy failed; retrying"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => return Err(error.context("starting the proxy")),
            }
        };
        let addrs = server.listen_addrs();
        ensure!(
            addrs.len() == listeners.len(),
            "the proxy has {} listeners, {} were configured",
            addrs.len(),
            listeners.len()
        );
        let admin = server
            .admin_addr()
            .context("the proxy has no admin endpoint")?;
        tracing::debug!(listeners = listeners.len(), elapsed = ?started.elapsed(), "proxy started");
        for (l, a) in listeners.iter().zip(&addrs) {
            tracing::debug!(listener = %l.name, addr = %a, "proxy listener");
        }
        Ok(Proxy {
            listeners: listeners
                .iter()
                .map(|l| l.name.clone())
                .zip(addrs)
                .collect(),
            server,
            admin,
        })
    }

    /// The address of listener `name`.
    pub fn addr(&self, name: &str) -> anyhow::Result<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .with_context(|| format!("no listener named {name}"))
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// `POST /backends/add`.
    pub async fn add_backends(
        &self,
        http: &HttpClient,
        listener: &str,
        addrs: &[SocketAddr],
    ) -> anyhow::Result<()> {
        let body = serde_json::json!({
            "listener": listener,
            "addresses": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        });
        let uri = format!("http://{}/backends/add", self.admin);
        let (status, text) = clients::post_json(http, &uri, &body).await?;
        ensure!(status.is_success(), "POST {uri}: {status}: {text}");
        Ok(())
    }

    /// Waits until `listener` has `n` healthy backends (per `GET /backends`), up to `limit`.
    pub async fn wait_pool_healthy(
        &self,
        http: &HttpClient,
        listener: &str,
        n: u64,
        limit: Duration,
    ) -> bool {
        let uri = format!("http://{}/backends", self.admin);
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Ok((status, text)) = clients::get_text(http, &uri).await
                && status.is_success()
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                && v["listeners"].as_array().is_some_and(|ls| {
                    ls.iter().any(|l| {
                        l["name"] == listener && l["healthy"].as_u64().is_some_and(|h| h >= n)
                    })
                })
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Stops the proxy (and its managed backends); the clients are done by then, so
    /// whatever is still open is closed after a short drain.
    pub async fn stop(self) {
        let started = std::time::Instant::now();
        self.server.shutdown(Duration::from_millis(500)).await;
        tracing::debug!(elapsed = ?started.elapsed(), "proxy stopped");
    }
}

/// `count` consecutive free ports on 127.0.0.1 (for a managed pool, whose ports are fixed
/// in its configuration). Free when probed; another process could take one before the
/// pool binds it, which start-up would then report.
pub fn free_consecutive_ports(count: u16, seed: u64) -> anyhow::Result<u16> {
    for attempt in 0..200u64 {
        let base = 20_000 + ((seed.wrapping_add(attempt.wrapping_mul(7919))) % 30_000) as u16;
        let ok = (0..count).all(|i| TcpListener::bind((Ipv4Addr::LOCALHOST, base + i)).is_ok());
        if ok {
            return Ok(base);
        }
    }
    bail!("found no {count} consecutive free ports")
}

/// Waits until `GET /heartbeat` on `addr` answers 200, up to `limit`.
pub async fn wait_healthy(http: &HttpClient, addr: SocketAddr, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if heartbeat(http, addr).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// One `GET /heartbeat`, bounded to 200 ms.
pub async fn heartbeat(http: &HttpClient, addr: SocketAddr) -> bool {
    let uri = format!("http://{addr}/heartbeat");
    matches!(
        tokio::time::timeout(Duration::from_millis(200), clients::get_text(http, &uri)).await,
        Ok(Ok((status, _))) if status.is_success()
    )
}

/// The PID of our child process whose command line has `--port <port>` (a managed backend).
#[cfg(target_os = "linux")]
pub fn managed_child_pid(port: u16) -> Option<i32> {
    let me = std::process::id().to_string();
    let port = port.to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid != Some(me.as_str()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args
            .windows(2)
            .any(|w| w[0] == b"--port" && w[1] == port.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

#[cfg(not(target_os = "linux"))]
pub fn managed_child_pid(_port: u16) -> Option<i32> {
    None
}

/// SIGKILLs a process.
#[cfg(unix)]
pub fn kill(pid: i32) -> anyhow::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    ensure!(
        rc == 0,
        "kill -9 {pid}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

#[cfg(not(unix))]
pub fn kill(pid: i32) -> anyhow::Result<()> {
    bail!("cannot kill process {pid} on this platform")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str(r#"C:\a "b""#), r#""C:\\a \"b\"""#);
        assert_eq!(toml_value("42"), "42");
        assert_eq!(toml_value("xxh3"), "\"xxh3\"");
    }

    #[test]
    fn config_text_parses() {
        let p = PluginUnderTest {
            label: "p2c_ewma".into(),
            source: "p2c_ewma".into(),
            options: vec![("seed".into(), "42".into())],
        };
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:9101".parse().unwrap(),
            "127.0.0.1:9102".parse().unwrap(),
        ];
        let a = ListenerSpec::new("a", &p, &addrs)
            .extra("[listener.health]\npath = \"/heartbeat\"\ninterval = \"100ms\"");
        let mut b = ListenerSpec::new("b", &p, &addrs[..1]);
        b.hash_on_user = false;
        let text = config_text(&[a, b]);
        let cfg = lbwasm_proxy::config::parse_str(&text, Path::new("x.toml")).unwrap();
        assert_eq!(cfg.listeners.len(), 2);
        assert_eq!(cfg.listeners[1].name, "b");
        assert_eq!(cfg.listeners[0].backends.len(), 2);
        assert!(cfg.listeners[0].health.is_some());
        assert_eq!(
            cfg.listeners[0].plugin_options,
            vec![("seed".to_string(), "42".to_string())]
        );
    }
}
