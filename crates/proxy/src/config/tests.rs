use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::leaf::{parse_addr, parse_duration};
use super::*;

fn parse(lines: &[&str]) -> Result<Config, ConfigError> {
    parse_str(&lines.join("\n"), Path::new("lbwasm.toml"))
}

/// The error `lines` (line n of the file is `lines[n - 1]`) are refused with.
fn error(lines: &[&str]) -> String {
    match parse(lines) {
        Ok(config) => panic!("accepted: {config:#?}"),
        Err(e) => e.to_string(),
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test address")
}

/// Lines 1..=5: a valid listener with one backend, to extend.
const BASE: [&str; 5] = [
    "[[listener]]",
    "listen = \"127.0.0.1:8000\"",
    "plugin = \"round_robin\"",
    "[[listener.backend]]",
    "address = \"127.0.0.1:9101\"",
];

fn base_with(extra: &[&'static str]) -> Vec<&'static str> {
    BASE.iter().copied().chain(extra.iter().copied()).collect()
}

#[test]
fn every_example_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|ext| ext != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        let config = parse_str(&text, &path).unwrap_or_else(|e| panic!("{e}"));
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("name")
            .to_owned();
        if lbwasm_plugin_host::builtin::is_builtin(&stem) {
            assert_eq!(
                config.listeners[0].plugin,
                PluginRef::Builtin(stem.clone()),
                "{stem}"
            );
        }
        for listener in &config.listeners {
            assert!(
                listener.listen.ip().is_loopback(),
                "{stem}: {}",
                listener.listen
            );
        }
        seen.push(stem);
    }
    for name in lbwasm_plugin_host::builtin::names().chain(["tcp", "lbwasm"]) {
        assert!(
            seen.iter().any(|s| s == name),
            "examples/{name}.toml is missing"
        );
    }
}

#[test]
fn full_example_sets_every_section() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/lbwasm.toml");
    let text = std::fs::read_to_string(&path).expect("readable");
    let config = parse_str(&text, &path).expect("valid");
    let web = &config.listeners[0];
    assert!(config.admin.is_some());
    assert!(web.health.is_some() && web.load_report.is_some() && web.managed.is_some());
    assert!(!web.plugin_options.is_empty() && web.backends.len() == 2);
    let tcp = &config.listeners[1];
    assert_eq!(tcp.protocol, Protocol::Tcp);
    assert_eq!(tcp.health.as_ref().map(|h| &h.kind), Some(&HealthKind::Tcp));
    assert_eq!(tcp.load_report, None);
}

#[test]
fn automatic_workers_leave_a_cpu_to_the_rest_of_the_box() {
    let counts: Vec<usize> = (0..=4).chain([64]).map(build::auto_workers).collect();
    assert_eq!(counts, [1, 1, 1, 2, 3, 63]);
}

#[test]
fn defaults() {
    let config = parse(&BASE).expect("valid");
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    assert_eq!(config.workers, build::auto_workers(cpus));
    assert_eq!(config.admin, None);
    assert_eq!(config.source, Some(PathBuf::from("lbwasm.toml")));
    let l = &config.listeners[0];
    assert_eq!(l.name, "listener0");
    assert_eq!(l.protocol, Protocol::Http);
    assert_eq!(l.plugin, PluginRef::Builtin("round_robin".into()));
    assert!(l.plugin_options.is_empty());
    assert_eq!(l.hash_key, None);
    assert_eq!(l.access_log, None);
    assert_eq!(l.timeouts, Timeouts::default());
    assert_eq!(l.timeouts.connect, Duration::from_secs(2));
    assert_eq!(
        l.retry,
        Retry {
            attempts: 3,
            budget_percent: 20
        }
    );
    assert_eq!(l.health, None);
    assert_eq!(l.passive.consecutive_failures, 5);
    assert_eq!(l.passive.base_ejection, Duration::from_secs(10));
    assert_eq!(l.passive.max_ejection, Duration::from_secs(300));
    assert_eq!(l.passive.slow_start, Duration::ZERO);
    assert_eq!(
        l.load_report,
        Some(LoadReport {
            path: "/load".into(),
            interval: Duration::from_secs(1),
            always: false
        })
    );
    assert_eq!(
        l.backends,
        [BackendConfig {
            address: addr("127.0.0.1:9101"),
            weight: 1,
            max_connections: 0
        }]
    );
    assert_eq!(l.managed, None);
}

#[test]
fn values_are_converted() {
    let config = parse(&[
        "workers = 3",
        "[[listener]]",
        "listen = \"localhost:8000\"",
        "plugin = \"plugins/custom.wasm\"",
        "hash_key = \"header:X-User\"",
        "access_log = \"logs/access.log\"",
        "plugin_options = { b = 0.25, a = 5, c = true, d = \"x\", e = 1e3 }",
        "timeouts = { connect = \"250ms\", request = \"1m30s\", idle = \"1.5s\" }",
        "[listener.health]",
        "path = \"/heartbeat\"",
        "interval = \"500ms\"",
        "[[listener.backend]]",
        "address = \"[::1]:9101\"",
        "weight = 0x10",
        "max_connections = 1_000",
        "[listener.managed]",
        "command = [\"lbwasm\", \"backend\", \"--port\", \"{port}\"]",
        "count = 2",
        "base_port = 9201",
    ])
    .expect("valid");
    assert_eq!(config.workers, 3);
    let l = &config.listeners[0];
    assert_eq!(l.listen, addr("127.0.0.1:8000"));
    assert_eq!(l.plugin, PluginRef::File("plugins/custom.wasm".into()));
    assert_eq!(l.hash_key, Some(HashKey::Header("x-user".into())));
    assert_eq!(
        l.access_log,
        Some(AccessLogTarget::File("logs/access.log".into()))
    );
    let options: Vec<_> = l
        .plugin_options
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        options,
        [
            ("b", "0.25"),
            ("a", "5"),
            ("c", "true"),
            ("d", "x"),
            ("e", "1e3")
        ]
    );
    assert_eq!(l.timeouts.connect, Duration::from_millis(250));
    assert_eq!(l.timeouts.request, Duration::from_secs(90));
    assert_eq!(l.timeouts.idle, Duration::from_millis(1500));
    let health = l.health.as_ref().expect("health");
    assert_eq!(
        health.kind,
        HealthKind::Http {
            path: "/heartbeat".into(),
            expect_status: 200,
            http2: false,
        }
    );
    assert_eq!(
        health.timeout,
        Duration::from_millis(500),
        "default timeout capped at interval"
    );
    assert_eq!((health.rise, health.fall), (2, 3));
    assert_eq!(l.backends[0].address, addr("[::1]:9101"));
    assert_eq!(
        (l.backends[0].weight, l.backends[0].max_connections),
        (16, 1000)
    );
    let managed = l.managed.as_ref().expect("managed");
    let ports: Vec<u16> = managed.addresses().map(|a| a.port()).collect();
    assert_eq!(ports, [9201, 9202]);
    assert_eq!(
        managed.command_for(9202),
        ["lbwasm", "backend", "--port", "9202"]
    );
    assert_eq!(managed.restart_backoff, Duration::from_secs(1));
}

#[test]
fn plugin_files_are_relative_to_the_config_file() {
    let text = BASE.join("\n").replace("round_robin", "lb/my.wasm");
    let config = parse_str(&text, Path::new("/etc/lbwasm/lbwasm.toml")).expect("valid");
    assert_eq!(
        config.listeners[0].plugin,
        PluginRef::File("/etc/lbwasm/lb/my.wasm".into())
    );
    let text = BASE.join("\n").replace("round_robin", "/opt/my.wasm");
    let config = parse_str(&text, Path::new("/etc/lbwasm/lbwasm.toml")).expect("valid");
    assert_eq!(
        config.listeners[0].plugin,
        PluginRef::File("/opt/my.wasm".into())
    );
}

#[test]
fn tcp_listener_defaults() {
    let mut lines = BASE.to_vec();
    lines.insert(1, "protocol = \"tcp\"");
    lines.push("[listener.health]");
    let l = &parse(&lines).expect("valid").listeners[0];
    assert_eq!(l.protocol, Protocol::Tcp);
    assert_eq!(l.load_report, None);
    assert_eq!(l.health.as_ref().map(|h| &h.kind), Some(&HealthKind::Tcp));
    assert_eq!(l.proxy_protocol, None);
}

#[test]
fn the_proxy_protocol_is_for_tcp_listeners() {
    let mut lines = BASE.to_vec();
    lines.insert(1, "protocol = \"tcp\"");
    lines.insert(2, "proxy_protocol = \"v2\"");
    let l = &parse(&lines).expect("valid").listeners[0];
    assert_eq!(l.proxy_protocol, Some(ProxyProtocol::V2));
    lines[2] = "proxy_protocol = \"v3\"";
    assert_eq!(
        error(&lines),
        "lbwasm.toml:3: listener[0].proxy_protocol: expected \"v1\" or \"v2\", got \"v3\""
    );
    let mut lines = BASE.to_vec();
    lines.insert(1, "proxy_protocol = \"v1\"");
    assert_eq!(
        error(&lines),
        "lbwasm.toml:2: listener[0].proxy_protocol: only a tcp listener sends the PROXY \
         protocol; an http listener tells backends the client's address in X-Forwarded-For"
    );
}

#[test]
fn via_is_an_http_listeners_opt_in() {
    let mut lines = BASE.to_vec();
    assert!(!parse(&lines).expect("valid").listeners[0].via);
    lines.insert(1, "via = true");
    assert!(parse(&lines).expect("valid").listeners[0].via);
    lines[1] = "via = \"yes\"";
    assert!(error(&lines).starts_with("lbwasm.toml:2: listener[0].via: expected"));
    let mut lines = BASE.to_vec();
    lines.insert(1, "protocol = \"tcp\"");
    lines.insert(2, "via = true");
    assert_eq!(
        error(&lines),
        "lbwasm.toml:3: listener[0].via: only an http listener adds Via; a tcp listener \
         relays bytes untouched"
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let e = error(&["workers = 1", "[[listener]]", "listen = "]);
    assert!(e.starts_with("lbwasm.toml:3: invalid TOML: "), "{e}");
    let e = error(&["[admin]", "listen = \"127.0.0.1:9900\"", "[admin]"]);
    assert_eq!(e, "lbwasm.toml:3: invalid TOML: duplicate key");
}

#[test]
fn unknown_keys() {
    let e = error(&base_with(&["[listener.helth]", "path = \"/\""]));
    assert_eq!(
        e,
        "lbwasm.toml:6: listener[0].helth: unknown key (expected one of: name, listen, \
         protocol, backend_protocol, plugin, plugin_options, hash_key, access_log, proxy_protocol, via, \
         timeouts, retry, health, passive, load_report, backend, managed, tls, backend_tls, server_names)"
    );
    let mut lines = BASE.to_vec();
    lines.insert(0, "worker = 2");
    assert_eq!(
        error(&lines),
        "lbwasm.toml:1: worker: unknown key (expected one of: workers, admin, listener, discovery, cluster)"
    );
    assert_eq!(
        error(&base_with(&["wieght = 2"])),
        "lbwasm.toml:6: listener[0].backend[0].wieght: unknown key \
         (expected one of: address, weight, max_connections)"
    );
    assert_eq!(
        error(&base_with(&["[listener.timeouts]", "connect_ms = 100"])),
        "lbwasm.toml:7: listener[0].timeouts.connect_ms: unknown key \
         (expected one of: connect, request, idle, plugin, plugin_budget)"
    );
    // [[listener.backends]] (plural) is a typo for [[listener.backend]].
    let e = error(&base_with(&["[[listener.backends]]"]));
    assert!(
        e.starts_with("lbwasm.toml:6: listener[0].backends: unknown key"),
        "{e}"
    );
}

#[test]
fn out_of_range_and_wrong_types() {
    let lines = base_with(&[
        "[[listener.backend]]",
        "address = \"127.0.0.1:9102\"",
        "weight = 0",
    ]);
    assert_eq!(
        error(&lines),
        "lbwasm.toml:8: listener[0].backend[1].weight: expected an integer >= 1, got 0"
    );
    assert_eq!(
        error(&base_with(&["weight = \"3\""])),
        "lbwasm.toml:6: listener[0].backend[0].weight: expected an integer >= 1, got \"3\""
    );
    assert_eq!(
        error(&base_with(&["weight = 99999999999999999999"])),
        "lbwasm.toml:6: listener[0].backend[0].weight: expected an integer >= 1, \
         got 99999999999999999999"
    );
    assert_eq!(
        error(&base_with(&["[listener.retry]", "budget_percent = 101"])),
        "lbwasm.toml:7: listener[0].retry.budget_percent: expected an integer between 0 and \
         100, got 101"
    );
    assert_eq!(
        error(&base_with(&["[listener.health]", "rise = 0"])),
        "lbwasm.toml:7: listener[0].health.rise: expected an integer >= 1, got 0"
    );
    let mut lines = BASE.to_vec();
    lines[1] = "listen = \"127.0.0.1:99999\"";
    assert_eq!(
        error(&lines),
        "lbwasm.toml:2: listener[0].listen: invalid socket address \"127.0.0.1:99999\""
    );
    lines[1] = "listen = 8000";
    assert_eq!(
        error(&lines),
        "lbwasm.toml:2: listener[0].listen: expected a string, got 8000"
    );
    let mut lines = BASE.to_vec();
    lines.insert(1, "protocol = \"udp\"");
    assert_eq!(
        error(&lines),
        "lbwasm.toml:2: listener[0].protocol: expected \"http\" or \"tcp\", got \"udp\""
    );
    assert_eq!(
        error(&["[listener]", "listen = \"127.0.0.1:8000\""]),
        "lbwasm.toml:1: listener: expected an array of tables ([[listener]]), got a table"
    );
    assert_eq!(
        error(&base_with(&[
            "[listener.passive]",
            "slow_start = 2020-01-01"
        ])),
        "lbwasm.toml:7: listener[0].passive.slow_start: expected a duration such as \
         \"500ms\", \"2s\" or \"1m30s\", got the date-time 2020-01-01"
    );
}

#[test]
fn durations() {
    assert_eq!(
        error(&base_with(&["[listener.timeouts]", "connect = \"0s\""])),
        "lbwasm.toml:7: listener[0].timeouts.connect: expected a duration > 0, got \"0s\""
    );
    assert_eq!(
        error(&base_with(&["[listener.timeouts]", "idle = 500"])),
        "lbwasm.toml:7: listener[0].timeouts.idle: expected a duration such as \"500ms\", \
         \"2s\" or \"1m30s\", got 500"
    );
    assert_eq!(
        error(&base_with(&["[listener.timeouts]", "idle = \"500\""])),
        "lbwasm.toml:7: listener[0].timeouts.idle: invalid duration \"500\" (expected numbers \
         with a unit: us, ms, s, m, h)"
    );
    assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
    assert_eq!(parse_duration("1h 2m 3s"), Some(Duration::from_secs(3723)));
    assert_eq!(parse_duration("0.1s"), Some(Duration::from_millis(100)));
    assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
    for bad in [
        "",
        "s",
        "5",
        "-1s",
        "1x",
        "1.2.3s",
        "1s 2",
        "99999999999999999999h",
    ] {
        assert_eq!(parse_duration(bad), None, "{bad:?}");
    }
}

#[test]
fn addresses() {
    assert_eq!(parse_addr("localhost:80"), Some(addr("127.0.0.1:80")));
    assert_eq!(parse_addr("[::1]:80"), Some(addr("[::1]:80")));
    for bad in [
        "localhost",
        "localhost:x",
        "example.com:80",
        "127.0.0.1",
        "x:y",
    ] {
        assert_eq!(parse_addr(bad), None, "{bad:?}");
    }
}

#[test]
fn missing_pieces() {
    assert_eq!(
        error(&["workers = 1"]),
        "lbwasm.toml:1: listener: at least one [[listener]] is required"
    );
    assert_eq!(
        error(&["", "[[listener]]", "plugin = \"random\""]),
        "lbwasm.toml:2: listener[0]: missing required key `listen`"
    );
    assert_eq!(
        error(&BASE[..3]),
        "lbwasm.toml:1: listener[0]: no backends: add [[listener.backend]] entries or a \
         [listener.managed] pool"
    );
    let mut lines = BASE.to_vec();
    lines[2] = "plugin = \"least_load\"";
    let e = error(&lines);
    assert!(
        e.starts_with(
            "lbwasm.toml:3: listener[0].plugin: unknown built-in plugin \"least_load\" \
             (expected one of: round_robin, "
        ),
        "{e}"
    );
}

#[test]
fn collisions() {
    let two = |second_listen: &'static str, backend: &'static str| {
        base_with(&[
            "",
            "[[listener]]",
            second_listen,
            "plugin = \"random\"",
            "[[listener.backend]]",
            backend,
        ])
    };
    assert_eq!(
        error(&two(
            "listen = \"127.0.0.1:8000\"",
            "address = \"127.0.0.1:9101\""
        )),
        "lbwasm.toml:8: listener[1].listen: 127.0.0.1:8000 is already used by \
         listener[0].listen (line 2)"
    );
    assert_eq!(
        error(&two(
            "listen = \"0.0.0.0:8000\"",
            "address = \"127.0.0.1:9101\""
        )),
        "lbwasm.toml:8: listener[1].listen: 0.0.0.0:8000 is already used by \
         listener[0].listen (line 2)"
    );
    assert_eq!(
        error(&two(
            "listen = \"127.0.0.1:8001\"",
            "address = \"localhost:8001\""
        )),
        "lbwasm.toml:11: listener[1].backend[0].address: 127.0.0.1:8001 is this listener's \
         own address; requests would loop"
    );
    // Another listener as a backend is allowed (chaining).
    parse(&two(
        "listen = \"127.0.0.1:8001\"",
        "address = \"127.0.0.1:8000\"",
    ))
    .expect("valid");

    assert_eq!(
        error(&base_with(&[
            "[[listener.backend]]",
            "address = \"localhost:9101\""
        ])),
        "lbwasm.toml:7: listener[0].backend[1].address: 127.0.0.1:9101 is listed twice \
         (also listener[0].backend[0].address (line 5))"
    );
    let lines = base_with(&[
        "",
        "[[listener]]",
        "name = \"listener0\"",
        "listen = \"127.0.0.1:8001\"",
    ]);
    assert_eq!(
        error(&lines),
        "lbwasm.toml:8: listener[1].name: the name \"listener0\" is already used by \
         listener[0] (line 1)"
    );
    let lines = base_with(&[
        "[listener.managed]",
        "command = [\"lbwasm\", \"backend\", \"--port\", \"{port}\"]",
        "count = 3",
        "base_port = 9099",
    ]);
    assert_eq!(
        error(&lines),
        "lbwasm.toml:9: listener[0].managed.base_port: the managed pool's port 9101 is also \
         listener[0].backend[0].address (line 5)"
    );
}

#[test]
fn protocol_conflicts() {
    let tcp = |extra: &[&'static str]| {
        let mut lines = base_with(extra);
        lines.insert(1, "protocol = \"tcp\"");
        error(&lines)
    };
    assert_eq!(
        tcp(&["[listener.health]", "path = \"/heartbeat\""]),
        "lbwasm.toml:8: listener[0].health.path: a tcp listener's health check is a TCP \
         connect; remove `path`, or set protocol = \"http\""
    );
    assert_eq!(
        tcp(&["[listener.load_report]", "enabled = true"]),
        "lbwasm.toml:8: listener[0].load_report.enabled: load reports are polled over HTTP; \
         a tcp listener cannot use them"
    );
    let mut lines = BASE.to_vec();
    lines.insert(1, "protocol = \"tcp\"");
    lines.insert(2, "hash_key = \"cookie:session\"");
    assert_eq!(
        error(&lines),
        "lbwasm.toml:3: listener[0].hash_key: a tcp listener has no headers, cookies or \
         paths; it can hash on \"client-ip\" or \"sni\""
    );
}

#[test]
fn health_checks_speak_the_pools_protocol() {
    let h2c = |extra: &[&'static str]| {
        let mut lines = base_with(extra);
        lines.insert(1, "backend_protocol = \"h2c\"");
        parse(&lines)
    };
    let kind = |config: Config| config.listeners[0].health.clone().expect("health").kind;
    assert_eq!(
        kind(h2c(&["[listener.health]", "path = \"/healthz\""]).expect("valid")),
        HealthKind::Http {
            path: "/healthz".into(),
            expect_status: 200,
            http2: true,
        }
    );
    assert_eq!(
        kind(h2c(&["[listener.health]", "type = \"grpc\""]).expect("valid")),
        HealthKind::Grpc {
            service: String::new()
        }
    );
    assert_eq!(
        kind(
            h2c(&[
                "[listener.health]",
                "type = \"grpc\"",
                "grpc_service = \"echo.Echo\""
            ])
            .expect("valid")
        ),
        HealthKind::Grpc {
            service: "echo.Echo".into()
        }
    );
    assert_eq!(
        kind(
            parse(&base_with(&[
                "[listener.health]",
                "type = \"http\"",
                "path = \"/\""
            ]))
            .expect("valid")
        ),
        HealthKind::Http {
            path: "/".into(),
            expect_status: 200,
            http2: false,
        }
    );
    // No type and no path: a TCP connect, as before `type` existed, whatever the protocol.
    assert_eq!(
        kind(h2c(&["[listener.health]"]).expect("valid")),
        HealthKind::Tcp
    );
}

#[test]
fn health_check_type_errors() {
    let h2c = |extra: &[&'static str]| {
        let mut lines = base_with(extra);
        lines.insert(1, "backend_protocol = \"h2c\"");
        error(&lines)
    };
    assert_eq!(
        error(&base_with(&["[listener.health]", "type = \"grpc\""])),
        "lbwasm.toml:7: listener[0].health.type: gRPC runs over HTTP/2: a grpc check needs \
         backend_protocol = \"h2c\" or \"h2\""
    );
    assert_eq!(
        error(&base_with(&["[listener.health]", "type = \"tcp\""])),
        "lbwasm.toml:7: listener[0].health.type: expected \"http\" or \"grpc\", got \"tcp\""
    );
    assert_eq!(
        error(&base_with(&["[listener.health]", "type = 1"])),
        "lbwasm.toml:7: listener[0].health.type: expected a string, got 1"
    );
    assert_eq!(
        h2c(&["[listener.health]", "type = \"grpc\"", "path = \"/x\""]),
        "lbwasm.toml:9: listener[0].health.path: a grpc check calls \
         /grpc.health.v1.Health/Check; remove `path` (name the service with grpc_service)"
    );
    assert_eq!(
        h2c(&[
            "[listener.health]",
            "type = \"grpc\"",
            "expect_status = 200"
        ]),
        "lbwasm.toml:9: listener[0].health.expect_status: a grpc check wants grpc-status 0 \
         and SERVING; remove `expect_status`"
    );
    assert_eq!(
        h2c(&["[listener.health]", "path = \"/\"", "grpc_service = \"x\""]),
        "lbwasm.toml:9: listener[0].health.grpc_service: only a grpc check names a service; \
         add type = \"grpc\""
    );
    assert_eq!(
        error(&base_with(&["[listener.health]", "type = \"http\""])),
        "lbwasm.toml:7: listener[0].health.type: an http check needs `path` (e.g. path = \
         \"/health\"); without `type` and `path` the check is a TCP connect"
    );
    let mut lines = base_with(&["[listener.health]", "type = \"grpc\""]);
    lines.insert(1, "protocol = \"tcp\"");
    assert_eq!(
        error(&lines),
        "lbwasm.toml:8: listener[0].health.type: a tcp listener's health check is a TCP \
         connect; remove `type`, or set protocol = \"http\""
    );
    let e = error(&base_with(&["[listener.health]", "grpc_servcie = \"x\""]));
    assert!(
        e.starts_with(
            "lbwasm.toml:7: listener[0].health.grpc_servcie: unknown key (expected one of: \
             type, grpc_service, path,"
        ),
        "{e}"
    );
}

#[test]
fn cross_field_checks() {
    assert_eq!(
        error(&base_with(&["[listener.health]", "expect_status = 204"])),
        "lbwasm.toml:7: listener[0].health.expect_status: needs `path`: without a path the \
         check is a TCP connect"
    );
    assert_eq!(
        error(&base_with(&[
            "[listener.health]",
            "interval = \"1s\"",
            "timeout = \"2s\""
        ])),
        "lbwasm.toml:8: listener[0].health.timeout: 2s is longer than the interval (1s); a \
         check must end before the next one starts"
    );
    assert_eq!(
        error(&base_with(&[
            "[listener.passive]",
            "base_ejection = \"10m\""
        ])),
        "lbwasm.toml:7: listener[0].passive.base_ejection: max_ejection (300s) is shorter \
         than base_ejection (600s)"
    );
    assert_eq!(
        error(&base_with(&[
            "[listener.managed]",
            "command = [\"srv\"]",
            "base_port = 9200"
        ])),
        "lbwasm.toml:7: listener[0].managed.command: no argument contains \"{port}\": every \
         instance would bind the same port"
    );
    assert_eq!(
        error(&base_with(&[
            "[listener.managed]",
            "command = [\"{port}\"]",
            "count = 2",
            "base_port = 65535"
        ])),
        "lbwasm.toml:9: listener[0].managed.base_port: 2 instances from port 65535 go past 65535"
    );
    let mut lines = BASE.to_vec();
    lines.insert(1, "access_log = \" \"");
    assert_eq!(
        error(&lines),
        "lbwasm.toml:2: listener[0].access_log: expected a file path, or \"-\" for standard \
         output, got \" \""
    );
    lines[1] = "access_log = 1";
    assert!(
        error(&lines).starts_with("lbwasm.toml:2: listener[0].access_log: expected a string"),
        "{}",
        error(&lines)
    );
    let mut lines = BASE.to_vec();
    lines.insert(1, "hash_key = \"header:\"");
    assert_eq!(
        error(&lines),
        "lbwasm.toml:2: listener[0].hash_key: expected \"header:NAME\", \"cookie:NAME\", \
         \"path\", \"client-ip\" or \"sni\", got \"header:\""
    );
    assert_eq!(
        error(&base_with(&["plugin_options = { key = [1] }"])),
        "lbwasm.toml:6: listener[0].backend[0].plugin_options: unknown key (expected one of: \
         address, weight, max_connections)"
    );
    let mut lines = BASE.to_vec();
    lines.insert(3, "plugin_options = { key = [1] }");
    assert_eq!(
        error(&lines),
        "lbwasm.toml:4: listener[0].plugin_options.key: expected a string, number or \
         boolean, got an array"
    );
}

#[test]
fn admin_checks() {
    let admin = |extra: &[&'static str]| {
        let mut lines = vec!["[admin]"];
        lines.extend_from_slice(extra);
        lines.extend_from_slice(&BASE);
        parse(&lines)
    };
    let config = admin(&["listen = \"[::1]:9900\"", "token = \"s3cret\""]).expect("valid");
    let expected = AdminConfig {
        listen: addr("[::1]:9900"),
        token: Some("s3cret".into()),
        allow_remote: false,
        hosts: Vec::new(),
        tls: None,
    };
    assert_eq!(config.admin, Some(expected));
    assert_eq!(
        admin(&["listen = \"0.0.0.0:9900\""]).map_err(|e| e.to_string()),
        Err(
            "lbwasm.toml:2: admin.listen: 0.0.0.0:9900 is not a loopback address; the admin \
             endpoint can change the pool, so it listens on 127.0.0.1 or [::1] unless \
             allow_remote = true"
                .into()
        )
    );
    assert_eq!(
        admin(&["listen = \"0.0.0.0:9900\"", "allow_remote = true"]).map_err(|e| e.to_string()),
        Err(
            "lbwasm.toml:2: admin.listen: a remotely reachable admin endpoint needs a token \
             (admin.token, --admin-token or LBWASM_ADMIN_TOKEN)"
                .into()
        )
    );
    assert_eq!(
        admin(&[
            "listen = \"0.0.0.0:9900\"",
            "allow_remote = true",
            "token = \"t\"",
        ])
        .map_err(|e| e.to_string()),
        Err(
            "lbwasm.toml:2: admin.listen: a remotely reachable admin endpoint needs TLS \
             ([admin.tls] cert and key): its token and the pool's state would otherwise cross \
             the network in cleartext"
                .into()
        )
    );
    assert_eq!(
        admin(&["listen = \"127.0.0.1:8000\""]).map_err(|e| e.to_string()),
        Err(
            "lbwasm.toml:4: listener[0].listen: 127.0.0.1:8000 is already used by admin.listen \
             (line 2)"
                .into()
        )
    );
}

#[test]
fn error_fields() {
    let e = parse(&base_with(&["weight = 0"])).expect_err("invalid");
    assert_eq!(e.file.as_deref(), Some(Path::new("lbwasm.toml")));
    assert_eq!(e.line, Some(6));
    assert_eq!(e.key, "listener[0].backend[0].weight");
}

fn flags() -> ServeArgs {
    ServeArgs {
        listen: Some("127.0.0.1:8000".into()),
        backends: vec!["127.0.0.1:9101".into(), "localhost:9102".into()],
        plugin: Some("least_loaded".into()),
        ..ServeArgs::default()
    }
}

#[test]
fn flags_only() {
    let args = ServeArgs {
        plugin_opt: vec!["cpu_weight=0.7".into(), "predict=false".into()],
        admin: Some("127.0.0.1:9900".into()),
        admin_token: Some("t".into()),
        workers: Some(2),
        hash_key: Some("client-ip".into()),
        ..flags()
    };
    let config = args.load().expect("valid");
    assert_eq!(config.workers, 2);
    assert_eq!(config.source, None);
    assert_eq!(
        config.admin,
        Some(AdminConfig {
            listen: addr("127.0.0.1:9900"),
            token: Some("t".into()),
            allow_remote: false,
            hosts: Vec::new(),
            tls: None,
        })
    );
    let l = &config.listeners[0];
    assert_eq!(l.name, "listener0");
    assert_eq!(l.listen, addr("127.0.0.1:8000"));
    assert_eq!(l.plugin, PluginRef::Builtin("least_loaded".into()));
    assert_eq!(
        l.plugin_options,
        [
            ("cpu_weight".to_owned(), "0.7".to_owned()),
            ("predict".to_owned(), "false".to_owned())
        ]
    );
    assert_eq!(l.hash_key, Some(HashKey::ClientIp));
    let backends: Vec<_> = l.backends.iter().map(|b| (b.address, b.weight)).collect();
    assert_eq!(
        backends,
        [(addr("127.0.0.1:9101"), 1), (addr("127.0.0.1:9102"), 1)]
    );
    assert!(l.load_report.is_some());

    let tcp = ServeArgs {
        protocol: Some("tcp".into()),
        ..flags()
    }
    .load()
    .expect("valid");
    assert_eq!(tcp.listeners[0].protocol, Protocol::Tcp);
    assert_eq!(tcp.listeners[0].load_report, None);
    // Without an admin endpoint a token (e.g. from LBWASM_ADMIN_TOKEN) is ignored.
    let no_admin = ServeArgs {
        admin_token: Some("t".into()),
        ..flags()
    }
    .load()
    .expect("valid");
    assert_eq!(no_admin.admin, None);
}

#[test]
fn flag_errors() {
    let e = |args: ServeArgs| args.load().expect_err("invalid").to_string();
    assert_eq!(
        e(ServeArgs {
            backends: vec!["127.0.0.1:9101".into(), "x:y".into()],
            ..flags()
        }),
        "--backends: invalid socket address \"x:y\""
    );
    assert_eq!(
        e(ServeArgs {
            backends: vec!["127.0.0.1:9101".into(), "localhost:9101".into()],
            ..flags()
        }),
        "--backends: 127.0.0.1:9101 is listed twice (also --backends)"
    );
    assert_eq!(
        e(ServeArgs::default()),
        "--listen: required without --config FILE"
    );
    assert_eq!(
        e(ServeArgs {
            plugin: None,
            ..flags()
        }),
        "--plugin: required without --config FILE"
    );
    assert_eq!(
        e(ServeArgs {
            plugin_opt: vec!["seed".into()],
            ..flags()
        }),
        "--plugin-opt: expected KEY=VALUE, got \"seed\""
    );
    assert_eq!(
        e(ServeArgs {
            protocol: Some("udp".into()),
            ..flags()
        }),
        "--protocol: expected \"http\" or \"tcp\", got \"udp\""
    );
    assert_eq!(
        e(ServeArgs {
            workers: Some(5000),
            ..flags()
        }),
        "--workers: expected an integer between 0 and 1024, got 5000"
    );
    assert_eq!(
        e(ServeArgs {
            plugin: Some("nope".into()),
            ..flags()
        })
        .split(" (")
        .next(),
        Some("--plugin: unknown built-in plugin \"nope\"")
    );
    assert_eq!(
        e(ServeArgs {
            admin: Some("10.0.0.1:9900".into()),
            ..flags()
        })
        .split(';')
        .next(),
        Some("--admin: 10.0.0.1:9900 is not a loopback address")
    );
    let e = ServeArgs {
        config: Some("/nonexistent/lbwasm.toml".into()),
        ..flags()
    }
    .load()
    .expect_err("unreadable");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/lbwasm.toml: cannot read: "),
        "{e}"
    );
}

/// A config file on disk, for `--config`.
fn file(lines: &[&str]) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::io::Write::write_all(&mut file, lines.join("\n").as_bytes()).expect("write");
    file
}

const TWO_LISTENERS: [&str; 16] = [
    "workers = 4",
    "[[listener]]",
    "listen = \"127.0.0.1:8000\"",
    "plugin = \"least_loaded\"",
    "plugin_options = { cpu_weight = 0.5, alpha = 0.3 }",
    "[[listener.backend]]",
    "address = \"127.0.0.1:9101\"",
    "weight = 3",
    "[[listener]]",
    "name = \"second\"",
    "listen = \"127.0.0.1:8001\"",
    "plugin = \"maglev\"",
    "[[listener.backend]]",
    "address = \"127.0.0.1:9201\"",
    "[[listener.health]]",
    "",
];

#[test]
fn flags_override_the_first_listener() {
    let mut lines = TWO_LISTENERS.to_vec();
    lines[14] = "";
    let f = file(&lines);
    let args = ServeArgs {
        config: Some(f.path().to_path_buf()),
        listen: Some("127.0.0.1:8100".into()),
        backends: vec!["127.0.0.1:9102".into(), "127.0.0.1:9103".into()],
        plugin_opt: vec!["alpha=0.9".into(), "horizon=3".into()],
        workers: Some(0),
        ..ServeArgs::default()
    };
    let config = args.load().expect("valid");
    assert_eq!(config.source.as_deref(), Some(f.path()));
    assert!(config.workers >= 1);
    let first = &config.listeners[0];
    assert_eq!(first.listen, addr("127.0.0.1:8100"));
    assert_eq!(first.plugin, PluginRef::Builtin("least_loaded".into()));
    let options: Vec<_> = first
        .plugin_options
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        options,
        [("cpu_weight", "0.5"), ("alpha", "0.9"), ("horizon", "3")]
    );
    let backends: Vec<_> = first
        .backends
        .iter()
        .map(|b| (b.address, b.weight))
        .collect();
    assert_eq!(
        backends,
        [(addr("127.0.0.1:9102"), 1), (addr("127.0.0.1:9103"), 1)]
    );
    let second = &config.listeners[1];
    assert_eq!(
        (second.name.as_str(), second.listen),
        ("second", addr("127.0.0.1:8001"))
    );

    // Another plugin drops the options meant for the old one; tcp turns load reports off.
    let args = ServeArgs {
        config: Some(f.path().to_path_buf()),
        plugin: Some("round_robin".into()),
        protocol: Some("tcp".into()),
        ..ServeArgs::default()
    };
    let first = &args.load().expect("valid").listeners[0];
    assert_eq!(first.plugin, PluginRef::Builtin("round_robin".into()));
    assert!(first.plugin_options.is_empty());
    assert_eq!((first.protocol, &first.load_report), (Protocol::Tcp, &None));
    assert_eq!(
        first.backends[0].weight, 3,
        "the file's backends stay without --backends"
    );
}

#[test]
fn errors_between_file_and_flags() {
    let f = file(&TWO_LISTENERS);
    let name = f.path().display().to_string();
    // The file's own mistakes still point at the file.
    let e = ServeArgs {
        config: Some(f.path().into()),
        ..ServeArgs::default()
    }
    .load()
    .expect_err("invalid");
    assert_eq!(
        e.to_string(),
        format!("{name}:15: listener[1].health: expected a table, got an array")
    );
    let mut lines = TWO_LISTENERS.to_vec();
    lines[14] = "";
    let f = file(&lines);
    let name = f.path().display().to_string();
    // A flag colliding with the file names both.
    let args = ServeArgs {
        config: Some(f.path().into()),
        listen: Some("127.0.0.1:8001".into()),
        ..ServeArgs::default()
    };
    assert_eq!(
        args.load().expect_err("collision").to_string(),
        format!("{name}:11: listener[1].listen: 127.0.0.1:8001 is already used by --listen")
    );
    let args = ServeArgs {
        config: Some(f.path().into()),
        hash_key: Some("query".into()),
        ..ServeArgs::default()
    };
    assert_eq!(
        args.load().expect_err("bad").to_string(),
        "--hash-key: expected \"header:NAME\", \"cookie:NAME\", \"path\", \"client-ip\" or \
         \"sni\", got \"query\""
    );
}

#[test]
fn flags_fill_a_file_without_listeners() {
    let f = file(&["workers = 2", "[admin]", "listen = \"127.0.0.1:9900\""]);
    let args = ServeArgs {
        config: Some(f.path().into()),
        ..flags()
    };
    let config = args.load().expect("valid");
    assert_eq!(config.workers, 2);
    assert_eq!(config.listeners.len(), 1);
    let args = ServeArgs {
        config: Some(f.path().into()),
        ..ServeArgs::default()
    };
    assert_eq!(
        args.load().expect_err("no listener").to_string(),
        format!(
            "{}:1: listener: at least one [[listener]] is required",
            f.path().display()
        )
    );
    let args = ServeArgs {
        config: Some(f.path().into()),
        listen: Some("127.0.0.1:8000".into()),
        ..ServeArgs::default()
    };
    assert_eq!(
        args.load().expect_err("no backends").to_string(),
        format!(
            "--backends: required: {} has no [[listener]]",
            f.path().display()
        )
    );
}

#[test]
fn clap_definition() {
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }
    Cli::command().debug_assert();
    let cli = Cli::try_parse_from([
        "lbwasm",
        "--listen",
        "127.0.0.1:8000",
        "--backends",
        "127.0.0.1:9101,127.0.0.1:9102",
        "--backends",
        "127.0.0.1:9103",
        "--plugin",
        "random",
        "--plugin-opt",
        "seed=1",
        "--hash-key",
        "path",
    ])
    .expect("parses");
    assert_eq!(cli.serve.backends.len(), 3);
    assert_eq!(cli.serve.plugin_opt, ["seed=1"]);
    cli.serve.load().expect("valid");
}

#[test]
fn plugin_deadline_and_budget() {
    let l = &parse(&BASE).unwrap().listeners[0];
    assert_eq!(l.timeouts.plugin, Duration::from_millis(20));
    assert_eq!(l.timeouts.plugin_budget, Duration::from_millis(1));
    let c = parse(&base_with(&[
        "[listener.timeouts]",
        "plugin = \"150ms\"",
        "plugin_budget = \"500us\"",
    ]))
    .unwrap();
    let t = c.listeners[0].timeouts;
    assert_eq!(
        (t.plugin, t.plugin_budget),
        (Duration::from_millis(150), Duration::from_micros(500))
    );
    assert_eq!(
        error(&base_with(&["[listener.timeouts]", "plugin = \"2s\""])),
        "lbwasm.toml:7: listener[0].timeouts.plugin: expected a duration from \"1ms\" to \
         \"1s\", got \"2s\""
    );
}

#[test]
fn admin_hosts_and_load_poll_switches() {
    let mut lines = vec![
        "[admin]",
        "listen = \"127.0.0.1:9900\"",
        "hosts = [\"LB.example\", \"lb.example:8443\"]",
    ];
    lines.extend_from_slice(&BASE);
    let admin = parse(&lines).expect("valid").admin.expect("admin");
    assert_eq!(admin.hosts, ["lb.example", "lb.example:8443"]);
    lines[2] = "hosts = [\"http://lb.example/\"]";
    assert!(error(&lines).starts_with("lbwasm.toml:3: admin.hosts[0]: expected a host name"));
    let text = lines
        .join("\n")
        .replace("hosts = [\"http://lb.example/\"]", "");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("lbwasm.toml");
    std::fs::write(&file, text).expect("write");
    let args = ServeArgs {
        config: Some(file),
        admin_host: vec!["lb.internal".into()],
        no_load_poll: true,
        ..ServeArgs::default()
    };
    let config = args.load().expect("valid");
    assert_eq!(config.admin.expect("admin").hosts, ["lb.internal"]);
    assert_eq!(config.listeners[0].load_report, None, "--no-load-poll");

    // Absent: polled if the plugin asks; true: always; false: never.
    let default = parse(&BASE).expect("valid").listeners[0]
        .load_report
        .clone();
    assert!(default.is_some_and(|r| !r.always));
    let on = parse(&base_with(&["[listener.load_report]", "enabled = true"])).expect("valid");
    assert!(
        on.listeners[0]
            .load_report
            .as_ref()
            .is_some_and(|r| r.always)
    );
    let off = parse(&base_with(&["[listener.load_report]", "enabled = false"])).expect("valid");
    assert_eq!(off.listeners[0].load_report, None);
}

#[test]
fn errors_point_at_the_value_itself() {
    // An item of a multi-line array: its own line, not the array's.
    let mut lines = vec![
        "[admin]",
        "listen = \"127.0.0.1:9900\"",
        "hosts = [",
        "  \"lb.example\",",
        "  \"http://lb.example/\",",
        "]",
    ];
    lines.extend_from_slice(&BASE);
    assert!(
        error(&lines).starts_with("lbwasm.toml:5: admin.hosts[1]: expected a host name"),
        "{}",
        error(&lines)
    );
    // A date-time where a table belongs.
    let mut lines = BASE.to_vec();
    lines.insert(1, "health = 2020-01-01");
    assert_eq!(
        error(&lines),
        "lbwasm.toml:2: listener[0].health: expected a table, got the date-time 2020-01-01"
    );
    // A float plugin option reaches the plugin as written, less digit separators.
    let mut lines = BASE.to_vec();
    lines.insert(1, "plugin_options = { a = 1_000.5, b = 1e3 }");
    let options = parse(&lines)
        .expect("valid")
        .listeners
        .remove(0)
        .plugin_options;
    assert_eq!(
        options,
        [
            ("a".to_owned(), "1000.5".to_owned()),
            ("b".to_owned(), "1e3".to_owned())
        ]
    );
}

#[test]
fn dns_backends() {
    let config = parse(&[
        "[discovery]",
        "resolver = \"127.0.0.1:5353\"",
        "max_ttl = \"30s\"",
        "[[listener]]",
        "listen = \"127.0.0.1:8000\"",
        "plugin = \"round_robin\"",
        "[[listener.backend]]",
        "address = \"dns://Web.Default.svc.cluster.local:8080\"",
        "weight = 2",
        "max_connections = 10",
        "[[listener.backend]]",
        "address = \"dns+srv://_http._tcp.web.example.\"",
        "[[listener.backend]]",
        "address = \"127.0.0.1:9101\"",
    ])
    .expect("valid");
    assert_eq!(
        config.discovery,
        DiscoveryConfig {
            resolver: Some(addr("127.0.0.1:5353")),
            max_ttl: Duration::from_secs(30),
            ..DiscoveryConfig::default()
        }
    );
    let l = &config.listeners[0];
    assert_eq!(l.backends.len(), 1, "the static one");
    assert_eq!(
        l.discovery,
        [
            DnsSource {
                query: DnsQuery::Host {
                    name: "web.default.svc.cluster.local".into(),
                    port: 8080
                },
                weight: 2,
                max_connections: 10,
            },
            DnsSource {
                query: DnsQuery::Srv {
                    name: "_http._tcp.web.example.".into()
                },
                weight: 1,
                max_connections: 0,
            }
        ]
    );
    assert_eq!(
        l.discovery[1].query.to_string(),
        "dns+srv://_http._tcp.web.example."
    );
    // DNS backends alone make a pool; the defaults of [discovery].
    let only_dns = parse(&[
        "[[listener]]",
        "listen = \"127.0.0.1:8000\"",
        "plugin = \"round_robin\"",
        "[[listener.backend]]",
        "address = \"dns://web:80\"",
    ])
    .expect("valid");
    assert!(only_dns.listeners[0].backends.is_empty());
    assert_eq!(only_dns.discovery, DiscoveryConfig::default());
    assert_eq!(
        DiscoveryConfig::default(),
        DiscoveryConfig {
            resolver: None,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(60),
            timeout: Duration::from_secs(2),
        }
    );
    // From the command line, beside a static backend; --resolver over the file's.
    let args = ServeArgs {
        backends: vec!["127.0.0.1:9000".into(), "dns://web:8080".into()],
        resolver: Some("127.0.0.1:53".into()),
        ..flags()
    };
    let config = args.load().expect("valid");
    assert_eq!(config.discovery.resolver, Some(addr("127.0.0.1:53")));
    assert_eq!(config.listeners[0].backends.len(), 1);
    assert_eq!(
        config.listeners[0].discovery[0].query,
        DnsQuery::Host {
            name: "web".into(),
            port: 8080
        }
    );
}

#[test]
fn dns_backend_errors() {
    let with_address = |address: &'static str| {
        vec![
            "[[listener]]",
            "listen = \"127.0.0.1:8000\"",
            "plugin = \"round_robin\"",
            "[[listener.backend]]",
            address,
        ]
    };
    for (address, message) in [
        (
            "address = \"dns://web.example\"",
            "lbwasm.toml:5: listener[0].backend[0].address: expected dns://NAME:PORT (an A/AAAA record has no port: give one), got \"dns://web.example\"",
        ),
        (
            "address = \"dns://web.example:0\"",
            "lbwasm.toml:5: listener[0].backend[0].address: expected dns://NAME:PORT with a port from 1 to 65535, got \"dns://web.example:0\"",
        ),
        (
            "address = \"dns://:80\"",
            "lbwasm.toml:5: listener[0].backend[0].address: the DNS name is empty in \"dns://:80\"",
        ),
        (
            "address = \"dns+srv://\"",
            "lbwasm.toml:5: listener[0].backend[0].address: the DNS name is empty in \"dns+srv://\"",
        ),
        (
            "address = \"dns+srv://_http._tcp.web.example:80\"",
            "lbwasm.toml:5: listener[0].backend[0].address: a dns+srv:// URL takes no port (each SRV record gives its own), got \"dns+srv://_http._tcp.web.example:80\"",
        ),
        (
            "address = \"dns+srv://web.example\"",
            "lbwasm.toml:5: listener[0].backend[0].address: expected dns+srv://_service._proto.NAME (RFC 2782, e.g. dns+srv://_http._tcp.web.example), got \"dns+srv://web.example\"",
        ),
        (
            "address = \"dns://web..example:80\"",
            "lbwasm.toml:5: listener[0].backend[0].address: invalid DNS name \"web..example\" in \"dns://web..example:80\" (labels of letters, digits, '-' and '_')",
        ),
    ] {
        assert_eq!(error(&with_address(address)), message);
    }
    // An SRV record gives the weight.
    let mut lines = with_address("address = \"dns+srv://_http._tcp.web.example\"");
    lines.push("weight = 2");
    assert_eq!(
        error(&lines),
        "lbwasm.toml:6: listener[0].backend[0].weight: each SRV record gives its target's weight; weight is for dns:// and IP:PORT"
    );
    // Listed twice.
    let mut lines = with_address("address = \"dns://web:80\"");
    lines.extend(["[[listener.backend]]", "address = \"dns://web:80\""]);
    assert_eq!(
        error(&lines),
        "lbwasm.toml:6: listener[0].backend[1]: dns://web:80 is listed twice"
    );
    // [discovery].
    let mut lines = base_with(&[]);
    lines.splice(
        0..0,
        ["[discovery]", "min_ttl = \"10s\"", "max_ttl = \"5s\""],
    );
    assert_eq!(
        error(&lines),
        "lbwasm.toml:3: discovery.max_ttl: max_ttl (5s) is below min_ttl (10s)"
    );
    let mut lines = base_with(&[]);
    lines.splice(0..0, ["[discovery]", "timeout = \"0s\""]);
    assert_eq!(
        error(&lines),
        "lbwasm.toml:2: discovery.timeout: expected a duration > 0, got \"0s\""
    );
    let mut lines = base_with(&[]);
    lines.splice(0..0, ["[discovery]", "resolver = \"dns.example:53\""]);
    assert_eq!(
        error(&lines),
        "lbwasm.toml:2: discovery.resolver: invalid socket address \"dns.example:53\""
    );
    // On the command line: the flag is named.
    let e = |args: ServeArgs| args.load().expect_err("invalid").to_string();
    assert_eq!(
        e(ServeArgs {
            backends: vec!["dns://web".into()],
            ..flags()
        }),
        "--backends: expected dns://NAME:PORT (an A/AAAA record has no port: give one), got \"dns://web\""
    );
    assert_eq!(
        e(ServeArgs {
            resolver: Some("x".into()),
            ..flags()
        }),
        "--resolver: invalid socket address \"x\""
    );
}

#[test]
fn cluster_table_and_flags() {
    let c = parse(&base_with(&[
        "[cluster]",
        "name = \"prod\"",
        "etcd = [\"http://127.0.0.1:2379\", \"https://etcd.example:2379/\"]",
        "replica = \"lb-1\"",
        "lease_ttl = \"3s\"",
    ]))
    .expect("valid")
    .cluster
    .expect("cluster");
    assert_eq!(c.name, "prod");
    assert_eq!(
        c.endpoints,
        ["http://127.0.0.1:2379", "https://etcd.example:2379"]
    );
    assert_eq!(c.replica, "lb-1");
    assert_eq!(c.lease_ttl, Duration::from_secs(3));
    assert!(c.state_file.ends_with("lbwasm-cluster-prod-lb-1.json"));
    assert_eq!(parse(&BASE).expect("valid").cluster, None);

    let e = error(&base_with(&[
        "[cluster]",
        "name = \"prod\"",
        "etcd = [\"127.0.0.1:2379\"]",
    ]));
    assert!(e.starts_with("lbwasm.toml:8: cluster.etcd[0]"), "{e}");
    assert!(e.contains("http://127.0.0.1:2379"), "{e}");
    let e = error(&base_with(&[
        "[cluster]",
        "name = \"a/b\"",
        "etcd = [\"http://h:1\"]",
    ]));
    assert!(e.starts_with("lbwasm.toml:7: cluster.name"), "{e}");
    let e = error(&base_with(&["[cluster]", "etcd = [\"http://h:1\"]"]));
    assert!(e.contains("missing required key `name`"), "{e}");
    let e = error(&base_with(&["[cluster]", "name = \"x\""]));
    assert!(e.contains("missing required key `etcd`"), "{e}");
    let e = error(&base_with(&[
        "[cluster]",
        "name = \"x\"",
        "etcd = [\"http://h:1\"]",
        "cert = \"c.pem\"",
    ]));
    assert!(e.starts_with("lbwasm.toml:9: cluster.cert"), "{e}");
    let e = error(&base_with(&[
        "[cluster]",
        "name = \"x\"",
        "etcd = [\"http://h:1\"]",
        "leese_ttl = \"1s\"",
    ]));
    assert!(e.contains("unknown key"), "{e}");

    let args = ServeArgs {
        listen: Some("127.0.0.1:0".into()),
        backends: vec!["127.0.0.1:9".into()],
        plugin: Some("round_robin".into()),
        etcd: vec!["http://127.0.0.1:2379".into()],
        cluster: Some("c1".into()),
        replica: Some("r".into()),
        ..ServeArgs::default()
    };
    let c = args.load().expect("flags").cluster.expect("cluster");
    assert_eq!((c.name.as_str(), c.replica.as_str()), ("c1", "r"));
    assert_eq!(args.load_cluster().expect("cluster only"), c);
    let e = ServeArgs {
        etcd: vec!["ftp://h:1".into()],
        cluster: Some("c1".into()),
        ..ServeArgs::default()
    }
    .load_cluster()
    .unwrap_err()
    .to_string();
    assert!(e.contains("--etcd"), "{e}");
}

#[test]
fn cluster_tls_files_must_exist() {
    let e = error(&base_with(&[
        "[cluster]",
        "name = \"x\"",
        "etcd = [\"https://h:1\"]",
        "ca = \"no-such-ca.pem\"",
    ]));
    assert!(e.starts_with("lbwasm.toml:9: cluster.ca"), "{e}");
    assert!(e.contains("no-such-ca.pem"), "{e}");
}
