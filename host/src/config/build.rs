//! The schema walk: tree → validated [`Config`].
//!
//! Each value is range-checked as it is read; checks between values (colliding sockets,
//! duplicate backends, a TCP listener with an HTTP health check) run as soon as both are
//! known. The `*_KEYS` lists are the schema: any other key is refused with the list.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::tree::{Ctx, Field, Origin, Section, Table, place};
use super::{
    AccessLogTarget, AdminConfig, BackendConfig, Config, ConfigError, HashKey, HealthCheck,
    HealthKind, ListenerConfig, LoadReport, Managed, Passive, PluginRef, Protocol, ProxyProtocol,
    Retry, Timeouts,
};

const ROOT_KEYS: &[&str] = &["workers", "admin", "listener"];
const ADMIN_KEYS: &[&str] = &["listen", "token", "allow_remote", "hosts"];
const LISTENER_KEYS: &[&str] = &[
    "name",
    "listen",
    "protocol",
    "plugin",
    "plugin_options",
    "hash_key",
    "access_log",
    "proxy_protocol",
    "via",
    "timeouts",
    "retry",
    "health",
    "passive",
    "load_report",
    "backend",
    "managed",
];
const TIMEOUT_KEYS: &[&str] = &["connect", "request", "idle", "plugin", "plugin_budget"];
const RETRY_KEYS: &[&str] = &["attempts", "budget_percent"];
const HEALTH_KEYS: &[&str] = &[
    "path",
    "expect_status",
    "interval",
    "timeout",
    "rise",
    "fall",
];
const PASSIVE_KEYS: &[&str] = &[
    "consecutive_failures",
    "base_ejection",
    "max_ejection",
    "slow_start",
];
const LOAD_REPORT_KEYS: &[&str] = &["enabled", "path", "interval"];
const BACKEND_KEYS: &[&str] = &["address", "weight", "max_connections"];
const MANAGED_KEYS: &[&str] = &["command", "count", "base_port", "restart_backoff"];

/// "No maximum" for [`Field::int`].
const NO_MAX: i64 = u32::MAX as i64;

pub(super) fn config(root: &Table, cx: &Ctx) -> Result<Config, ConfigError> {
    let root = Section::new(cx, String::new(), Origin::Line(1), root, ROOT_KEYS)?;
    let workers: u16 = root.opt("workers", |f| f.int(0, 1024))?.unwrap_or(0);
    let mut sockets = Sockets::default();
    let admin = match root.section("admin", ADMIN_KEYS)? {
        Some(section) => Some(admin(&section, &mut sockets)?),
        None => None,
    };

    const NO_LISTENER: &str = "at least one [[listener]] is required";
    let field = root
        .get("listener")
        .ok_or_else(|| cx.err(root.at, "listener", NO_LISTENER))?;
    let sections = field.tables(LISTENER_KEYS, "[[listener]]")?;
    if sections.is_empty() {
        return Err(field.err(NO_LISTENER));
    }
    let mut names = Vec::new();
    let mut listeners = Vec::with_capacity(sections.len());
    for (index, section) in sections.iter().enumerate() {
        listeners.push(listener(section, index, cx, &mut sockets, &mut names)?);
    }

    let workers = match workers {
        0 => auto_workers(std::thread::available_parallelism().map_or(1, NonZeroUsize::get)),
        n => usize::from(n),
    };
    let source = cx.source().map(Path::to_path_buf);
    Ok(Config {
        workers,
        admin,
        listeners,
        source,
    })
}

/// `workers = 0`: one worker per CPU this process may use, less one, and at least one.
/// The CPU a proxied request costs is mostly the kernel's (TCP, loopback or NIC softirq,
/// wake-ups), and on the same CPUs run the control thread, and often clients or backends: a
/// worker on every CPU contends with all of that and is preempted mid-request (on 2 CPUs
/// shared with wrk and the backends, 2 workers served 5-15% fewer requests than 1, with
/// 1.5-2x the p99). A box that runs nothing else sets `workers` to its CPU count.
pub(super) fn auto_workers(cpus: usize) -> usize {
    cpus.saturating_sub(1).max(1)
}

/// Sockets this process (or its managed pools) will bind, with where each was configured:
/// a collision is refused here, with both places, rather than by `bind()` at start-up.
#[derive(Default)]
struct Sockets(Vec<(SocketAddr, String)>);

impl Sockets {
    /// Records `addr`; on a collision returns the place of the earlier claim instead.
    fn claim(&mut self, addr: SocketAddr, place: String) -> Result<(), String> {
        if addr.port() != 0
            && let Some((_, other)) = self.0.iter().find(|(a, _)| collide(*a, addr))
        {
            return Err(other.clone());
        }
        self.0.push((addr, place));
        Ok(())
    }
}

/// Whether binding both would fail (or, for a backend, reach the same socket): same port,
/// and the same IP or a wildcard of the same family.
fn collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && (a.ip() == b.ip()
            || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())))
}

fn admin(s: &Section<'_>, sockets: &mut Sockets) -> Result<AdminConfig, ConfigError> {
    let listen_field = s.require("listen")?;
    let listen = listen_field.addr()?;
    let token = s.opt("token", |f| f.name().map(str::to_owned))?;
    let allow_remote = s.opt("allow_remote", Field::bool)?.unwrap_or(false);
    if !listen.ip().is_loopback() {
        if !allow_remote {
            return Err(listen_field.err(format!(
                "{listen} is not a loopback address; the admin endpoint can change the pool, \
                 so it listens on 127.0.0.1 or [::1] unless allow_remote = true"
            )));
        }
        if token.is_none() {
            return Err(listen_field.err(
                "a remotely reachable admin endpoint needs a token \
                 (admin.token, --admin-token or LBWASM_ADMIN_TOKEN)",
            ));
        }
    }
    claim(sockets, listen, &listen_field)?;
    let hosts = match s.get("hosts") {
        Some(f) => f
            .items("an array of host names")?
            .iter()
            .map(admin_host)
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    Ok(AdminConfig {
        listen,
        token,
        allow_remote,
        hosts,
    })
}

/// A name for the admin endpoint as a browser writes it in `Host`: `name` or `name:port`
/// (`[v6]:port`), no scheme, path or space; stored lower case.
fn admin_host(f: &Field<'_>) -> Result<String, ConfigError> {
    let name = f.str()?;
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    if !valid {
        return Err(f.expected(
            "a host name as browsers send it in Host, e.g. \"lb.example\" or \"lb.example:9900\"",
        ));
    }
    Ok(name.to_ascii_lowercase())
}

fn claim(sockets: &mut Sockets, addr: SocketAddr, field: &Field<'_>) -> Result<(), ConfigError> {
    sockets
        .claim(addr, field.place())
        .map_err(|other| field.err(format!("{addr} is already used by {other}")))
}

fn listener(
    s: &Section<'_>,
    index: usize,
    cx: &Ctx,
    sockets: &mut Sockets,
    names: &mut Vec<(String, String)>,
) -> Result<ListenerConfig, ConfigError> {
    let listen_field = s.require("listen")?;
    let listen = listen_field.addr()?;
    claim(sockets, listen, &listen_field)?;

    let name_field = s.get("name");
    let name = match &name_field {
        Some(f) => listener_name(f)?,
        None => format!("listener{index}"),
    };
    if let Some((_, other)) = names.iter().find(|(n, _)| *n == name) {
        let message = format!("the name {name:?} is already used by {other}");
        return Err(name_field
            .as_ref()
            .map_or_else(|| s.err(&message), |f| f.err(&message)));
    }
    let name_place = name_field
        .as_ref()
        .map_or_else(|| place(&s.path, s.at), Field::place);
    names.push((name.clone(), name_place));

    let protocol = s.opt("protocol", protocol)?.unwrap_or_default();
    let plugin = plugin_ref(&s.require("plugin")?, cx)?;
    let plugin_options = match s.get("plugin_options") {
        Some(f) => plugin_options(&f)?,
        None => Vec::new(),
    };
    let hash_key = s.opt("hash_key", |f| hash_key(f, protocol))?;
    let access_log = s.opt("access_log", |f| access_log(f, cx))?;
    let proxy_protocol = s.opt("proxy_protocol", |f| proxy_protocol(f, protocol))?;
    let via = s
        .opt("via", |f| {
            let on = f.bool()?;
            if on && protocol == Protocol::Tcp {
                return Err(
                    f.err("only an http listener adds Via; a tcp listener relays bytes untouched")
                );
            }
            Ok(on)
        })?
        .unwrap_or(false);
    let timeouts = match s.section("timeouts", TIMEOUT_KEYS)? {
        Some(t) => timeouts(&t)?,
        None => Timeouts::default(),
    };
    let retry = match s.section("retry", RETRY_KEYS)? {
        Some(r) => retry(&r)?,
        None => Retry::default(),
    };
    let health = match s.section("health", HEALTH_KEYS)? {
        Some(h) => Some(health(&h, protocol)?),
        None => None,
    };
    let passive = match s.section("passive", PASSIVE_KEYS)? {
        Some(p) => passive(&p)?,
        None => Passive::default(),
    };
    let load_report = load_report(s.section("load_report", LOAD_REPORT_KEYS)?, protocol)?;

    let mut backends = Vec::new();
    let mut listed: Vec<(SocketAddr, String)> = Vec::new();
    if let Some(field) = s.get("backend") {
        for b in field.tables(BACKEND_KEYS, "[[listener.backend]]")? {
            let address_field = b.require("address")?;
            let address = address_field.addr()?;
            if address.port() == 0 || address.ip().is_unspecified() {
                return Err(address_field.expected("a backend address with an IP and a port"));
            }
            if let Some((_, other)) = listed.iter().find(|(a, _)| *a == address) {
                return Err(address_field.err(format!("{address} is listed twice (also {other})")));
            }
            if collide(listen, address) {
                return Err(address_field.err(format!(
                    "{address} is this listener's own address; requests would loop"
                )));
            }
            listed.push((address, address_field.place()));
            backends.push(BackendConfig {
                address,
                weight: b.opt("weight", |f| f.int(1, NO_MAX))?.unwrap_or(1),
                max_connections: b.opt("max_connections", |f| f.int(0, NO_MAX))?.unwrap_or(0),
            });
        }
    }
    let managed = match s.section("managed", MANAGED_KEYS)? {
        Some(m) => Some(managed(&m, &listed, sockets)?),
        None => None,
    };
    if backends.is_empty() && managed.is_none() {
        return Err(
            s.err("no backends: add [[listener.backend]] entries or a [listener.managed] pool")
        );
    }

    Ok(ListenerConfig {
        name,
        listen,
        protocol,
        plugin,
        plugin_options,
        hash_key,
        access_log,
        proxy_protocol,
        via,
        timeouts,
        retry,
        health,
        passive,
        load_report,
        backends,
        managed,
    })
}

fn listener_name(f: &Field<'_>) -> Result<String, ConfigError> {
    let name = f.name()?;
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        Ok(name.to_owned())
    } else {
        Err(f.expected("a name of ASCII letters, digits, '-', '_' and '.'"))
    }
}

fn protocol(f: &Field<'_>) -> Result<Protocol, ConfigError> {
    match f.str()? {
        "http" => Ok(Protocol::Http),
        "tcp" => Ok(Protocol::Tcp),
        _ => Err(f.expected("\"http\" or \"tcp\"")),
    }
}

/// `-` is standard output; anything else a file, relative to the config file's directory
/// when it came from one.
fn access_log(f: &Field<'_>, cx: &Ctx) -> Result<AccessLogTarget, ConfigError> {
    let text = f.str()?;
    if text == "-" {
        return Ok(AccessLogTarget::Stdout);
    }
    if text.trim().is_empty() {
        return Err(f.expected("a file path, or \"-\" for standard output"));
    }
    let path = PathBuf::from(text);
    let base = match f.node.at {
        Origin::Line(_) => cx.source().and_then(Path::parent),
        Origin::Flag(_) => None,
    };
    Ok(AccessLogTarget::File(match base {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path,
    }))
}

/// A `.wasm` name or a path is a file (relative to the config file when it came from one);
/// anything else must be a built-in.
fn plugin_ref(f: &Field<'_>, cx: &Ctx) -> Result<PluginRef, ConfigError> {
    let text = f.name()?;
    if text.ends_with(".wasm") || text.contains('/') {
        let path = PathBuf::from(text);
        let base = match f.node.at {
            Origin::Line(_) => cx.source().and_then(Path::parent),
            Origin::Flag(_) => None,
        };
        return Ok(PluginRef::File(match base {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path,
        }));
    }
    // The list comes from what build.rs embedded: one source of truth for the names.
    if crate::plugin::builtin::get(text).is_some() {
        Ok(PluginRef::Builtin(text.to_owned()))
    } else {
        Err(f.err(format!(
            "unknown built-in plugin {text:?} (expected one of: {}; or a path to a .wasm file)",
            crate::plugin::builtin::names()
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

fn plugin_options(f: &Field<'_>) -> Result<Vec<(String, String)>, ConfigError> {
    f.entries()?
        .into_iter()
        .map(|(key, value)| {
            if key.is_empty() {
                return Err(value.err("empty option name"));
            }
            Ok((key.to_owned(), value.option_text()?))
        })
        .collect()
}

fn hash_key(f: &Field<'_>, protocol: Protocol) -> Result<HashKey, ConfigError> {
    let text = f.str()?;
    let key = match text {
        "path" => HashKey::Path,
        "client-ip" => HashKey::ClientIp,
        _ => {
            if let Some(name) = text.strip_prefix("header:")
                && is_token(name)
            {
                HashKey::Header(name.to_ascii_lowercase())
            } else if let Some(name) = text.strip_prefix("cookie:")
                && is_token(name)
            {
                HashKey::Cookie(name.to_owned())
            } else {
                return Err(
                    f.expected("\"header:NAME\", \"cookie:NAME\", \"path\" or \"client-ip\"")
                );
            }
        }
    };
    if protocol == Protocol::Tcp && key != HashKey::ClientIp {
        return Err(f.err(
            "a tcp listener has no headers, cookies or paths; it can only hash on \"client-ip\"",
        ));
    }
    Ok(key)
}

fn proxy_protocol(f: &Field<'_>, protocol: Protocol) -> Result<ProxyProtocol, ConfigError> {
    let version = match f.str()? {
        "v1" => ProxyProtocol::V1,
        "v2" => ProxyProtocol::V2,
        _ => return Err(f.expected("\"v1\" or \"v2\"")),
    };
    if protocol != Protocol::Tcp {
        return Err(f.err(
            "only a tcp listener sends the PROXY protocol; an http listener tells backends \
             the client's address in X-Forwarded-For",
        ));
    }
    Ok(version)
}

/// An HTTP token (RFC 9110 `tchar`s): what header and cookie names are made of.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

fn timeouts(t: &Section<'_>) -> Result<Timeouts, ConfigError> {
    let d = Timeouts::default();
    Ok(Timeouts {
        connect: t
            .opt("connect", Field::positive_duration)?
            .unwrap_or(d.connect),
        request: t
            .opt("request", Field::positive_duration)?
            .unwrap_or(d.request),
        idle: t.opt("idle", Field::positive_duration)?.unwrap_or(d.idle),
        plugin: t.opt("plugin", plugin_deadline)?.unwrap_or(d.plugin),
        plugin_budget: t
            .opt("plugin_budget", Field::positive_duration)?
            .unwrap_or(d.plugin_budget),
    })
}

/// The plugin deadline: 1 ms (the epoch tick is 2 ms, so shorter would not be honoured) to
/// 1 s (a worker waits for its plugin: longer would stall every request of the worker).
fn plugin_deadline(f: &Field<'_>) -> Result<Duration, ConfigError> {
    let d = f.duration()?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(1) {
        return Err(f.expected("a duration from \"1ms\" to \"1s\""));
    }
    Ok(d)
}

fn retry(r: &Section<'_>) -> Result<Retry, ConfigError> {
    let d = Retry::default();
    Ok(Retry {
        attempts: r.opt("attempts", |f| f.int(1, 10))?.unwrap_or(d.attempts),
        budget_percent: r
            .opt("budget_percent", |f| f.int(0, 100))?
            .unwrap_or(d.budget_percent),
    })
}

fn health(h: &Section<'_>, protocol: Protocol) -> Result<HealthCheck, ConfigError> {
    let expect_status = h.get("expect_status");
    let kind = match (h.get("path"), protocol) {
        (Some(path), Protocol::Tcp) => {
            return Err(path.err(
                "a tcp listener's health check is a TCP connect; remove `path`, or set protocol = \"http\"",
            ));
        }
        (Some(path), Protocol::Http) => HealthKind::Http {
            path: path.url_path()?,
            expect_status: expect_status
                .map(|f| f.int(100, 599))
                .transpose()?
                .unwrap_or(200),
        },
        (None, _) => {
            if let Some(f) = expect_status {
                return Err(f.err("needs `path`: without a path the check is a TCP connect"));
            }
            HealthKind::Tcp
        }
    };
    let interval = h
        .opt("interval", Field::positive_duration)?
        .unwrap_or(Duration::from_secs(2));
    let timeout = match h.get("timeout") {
        Some(f) => {
            let timeout = f.positive_duration()?;
            if timeout > interval {
                return Err(f.err(format!(
                    "{timeout:?} is longer than the interval ({interval:?}); a check must end before the next one starts"
                )));
            }
            timeout
        }
        None => interval.min(Duration::from_secs(1)),
    };
    Ok(HealthCheck {
        kind,
        interval,
        timeout,
        rise: h.opt("rise", |f| f.int(1, NO_MAX))?.unwrap_or(2),
        fall: h.opt("fall", |f| f.int(1, NO_MAX))?.unwrap_or(3),
    })
}

fn passive(p: &Section<'_>) -> Result<Passive, ConfigError> {
    let d = Passive::default();
    let consecutive_failures = p
        .opt("consecutive_failures", |f| f.int(0, NO_MAX))?
        .unwrap_or(d.consecutive_failures);
    let base_field = p.get("base_ejection");
    let max_field = p.get("max_ejection");
    let base = base_field
        .as_ref()
        .map(Field::positive_duration)
        .transpose()?;
    let max = max_field
        .as_ref()
        .map(Field::positive_duration)
        .transpose()?;
    let (base, max) = (
        base.unwrap_or(d.base_ejection),
        max.unwrap_or(d.max_ejection),
    );
    if max < base {
        let message = format!("max_ejection ({max:?}) is shorter than base_ejection ({base:?})");
        return Err(match max_field.as_ref().or(base_field.as_ref()) {
            Some(f) => f.err(message),
            None => p.err(message),
        });
    }
    Ok(Passive {
        consecutive_failures,
        base_ejection: base,
        max_ejection: max,
        slow_start: p
            .opt("slow_start", Field::duration)?
            .unwrap_or(d.slow_start),
    })
}

/// Available to HTTP listeners (a TCP listener's backends speak no HTTP to poll): polled
/// when the plugin asks for load figures, always with `enabled = true`, never with `false`.
fn load_report(
    section: Option<Section<'_>>,
    protocol: Protocol,
) -> Result<Option<LoadReport>, ConfigError> {
    let d = LoadReport::default();
    let http = protocol == Protocol::Http;
    let Some(r) = section else {
        return Ok(http.then_some(d));
    };
    let enabled_field = r.get("enabled");
    let explicit = enabled_field.as_ref().map(Field::bool).transpose()?;
    let enabled = explicit.unwrap_or(http);
    let path = r.opt("path", Field::url_path)?.unwrap_or(d.path);
    let interval = r
        .opt("interval", Field::positive_duration)?
        .unwrap_or(d.interval);
    if enabled
        && !http
        && let Some(f) = enabled_field
    {
        return Err(f.err("load reports are polled over HTTP; a tcp listener cannot use them"));
    }
    Ok(enabled.then_some(LoadReport {
        path,
        interval,
        always: explicit == Some(true),
    }))
}

fn managed(
    m: &Section<'_>,
    listed: &[(SocketAddr, String)],
    sockets: &mut Sockets,
) -> Result<Managed, ConfigError> {
    let command_field = m.require("command")?;
    let command = command_field
        .items("an array of strings (argv)")?
        .iter()
        .map(|f| f.str().map(str::to_owned))
        .collect::<Result<Vec<_>, _>>()?;
    if command.first().is_none_or(String::is_empty) {
        return Err(
            command_field.expected("a non-empty argv such as [\"lbwasm\", \"backend\", ...]")
        );
    }
    if !command.iter().any(|arg| arg.contains("{port}")) {
        return Err(command_field
            .err("no argument contains \"{port}\": every instance would bind the same port"));
    }
    let count: u32 = m.opt("count", |f| f.int(1, 1000))?.unwrap_or(1);
    let base_field = m.require("base_port")?;
    let base_port: u16 = base_field.int(1, 65535)?;
    if u32::from(base_port) + count - 1 > u32::from(u16::MAX) {
        return Err(base_field.err(format!(
            "{count} instances from port {base_port} go past 65535"
        )));
    }
    let restart_backoff = m
        .opt("restart_backoff", Field::positive_duration)?
        .unwrap_or(Duration::from_secs(1));
    let pool = Managed {
        command,
        count,
        base_port,
        restart_backoff,
    };
    for addr in pool.addresses() {
        let port = addr.port();
        if let Some((_, other)) = listed.iter().find(|(a, _)| *a == addr) {
            return Err(base_field.err(format!("the managed pool's port {port} is also {other}")));
        }
        sockets.claim(addr, base_field.place()).map_err(|other| {
            base_field.err(format!(
                "the managed pool's port {port} is already used by {other}"
            ))
        })?;
    }
    Ok(pool)
}
