//! The admin API against a web page, the `/load` poller, plugin paths and upload folders:
//! the real `lbwasm` binary over real sockets on 127.0.0.1 (port 0 everywhere). Requests
//! are written byte for byte, so each test controls exactly the `Host`, `Origin`,
//! `Sec-Fetch-Site` and `Content-Type` a browser would send. Every test is bounded by a
//! timeout, asserts outcomes (statuses, counts, messages), never durations, and kills its
//! children by PID.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use common::backends::{read_head, serve_each};
use common::http::{exchange_lenient, status_of};
use common::process::{lbwasm, serving, stop};
use common::{bounded, eventually};
use tokio::io::AsyncWriteExt as _;

/// One request written as given (`headers` verbatim, plus `Content-Length` when there is a
/// body, and `Connection: close`); the status, and the head (lower-cased), a blank line and
/// the body of the reply.
async fn call(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    let text = exchange_lenient(addr, &[head.as_bytes(), body].concat()).await;
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status_of(&text), text_head(&text) + "\n" + &body)
}

/// The head of a raw reply, lower-cased (to look for a header).
fn text_head(text: &str) -> String {
    text.split_once("\r\n\r\n")
        .map_or(text, |(h, _)| h)
        .to_ascii_lowercase()
}

/// A backend that answers every request with 200 and counts requests by path; `/load`
/// answers `load_status` (200 with figures, or 404).
struct TestBackend {
    addr: SocketAddr,
    paths: Arc<Mutex<HashMap<String, usize>>>,
}

impl TestBackend {
    async fn start(load_status: u16) -> TestBackend {
        let paths: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let seen = paths.clone();
        let addr = serve_each(move |mut s| {
            let seen = seen.clone();
            async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                *seen.lock().unwrap().entry(path.clone()).or_default() += 1;
                let (status, body) = if path == "/load" && load_status == 200 {
                    ("200 OK", r#"{"cpu_percent": 10, "memory_percent": 20}"#)
                } else if path == "/load" {
                    ("404 Not Found", "no such path")
                } else {
                    ("200 OK", "ok")
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            }
        })
        .await;
        TestBackend { addr, paths }
    }

    fn seen(&self, path: &str) -> usize {
        self.paths.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// The JSON body of a reply as [`call`] gives it (head, a blank line, body).
fn json_of(reply: &str) -> serde_json::Value {
    let body = reply.find("\n{").map_or("", |i| &reply[i + 1..]);
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

// ---------------------------------------------------------------------------------------
// The admin API and web pages
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_drive_or_read_the_admin_api() {
    bounded(async {
        let b1 = TestBackend::start(200).await;
        let b2 = TestBackend::start(200).await;
        let backends = b1.addr.to_string();
        let mut cmd = lbwasm();
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--plugin",
            "round_robin",
        ])
        .args([
            "--workers",
            "1",
            "--admin",
            "127.0.0.1:0",
            "--backends",
            &backends,
        ])
        .stderr(Stdio::null());
        let s = serving(cmd, 1, true).await;
        let admin = s.admin.expect("admin");
        let host = admin.to_string();
        let origin = format!("http://{admin}");
        let add = format!(r#"{{"addresses": ["{}"]}}"#, b2.addr);
        let add = add.as_bytes();

        // A cross-site `fetch(..., {mode: 'no-cors'})`: text/plain, a foreign Origin.
        let (status, reply) = call(
            admin,
            "POST",
            "/backends/add",
            &[
                ("Host", &host),
                ("Origin", "http://evil.example"),
                ("Content-Type", "text/plain;charset=UTF-8"),
                ("Sec-Fetch-Site", "cross-site"),
            ],
            add,
        )
        .await;
        assert_eq!(status, 403, "{reply}");
        assert!(json_of(&reply)["error"].is_string(), "{reply}");
        // Each protection on its own.
        for (what, headers, want) in [
            (
                "a foreign Origin",
                vec![
                    ("Origin", "http://evil.example"),
                    ("Content-Type", "application/json"),
                ],
                403,
            ),
            (
                "Origin: null (a sandboxed frame, a file: page)",
                vec![("Origin", "null"), ("Content-Type", "application/json")],
                403,
            ),
            (
                "Sec-Fetch-Site: cross-site",
                vec![
                    ("Sec-Fetch-Site", "cross-site"),
                    ("Content-Type", "application/json"),
                ],
                403,
            ),
            (
                "Sec-Fetch-Site: same-site",
                vec![
                    ("Sec-Fetch-Site", "same-site"),
                    ("Content-Type", "application/json"),
                ],
                403,
            ),
            ("text/plain", vec![("Content-Type", "text/plain")], 415),
            (
                "a form",
                vec![("Content-Type", "application/x-www-form-urlencoded")],
                415,
            ),
            (
                "a multipart form",
                vec![("Content-Type", "multipart/form-data; boundary=x")],
                415,
            ),
            ("no Content-Type", vec![], 415),
        ] {
            let mut h = vec![("Host", host.as_str())];
            h.extend(headers);
            let (status, reply) = call(admin, "POST", "/backends/add", &h, add).await;
            assert_eq!(status, want, "{what}: {reply}");
        }
        // Every POST refuses the types a form or a no-cors fetch can send.
        for (target, body) in [
            ("/reload", &b""[..]),
            ("/backends/remove", &br#"{"ids": [0]}"#[..]),
            ("/backends/drain", &br#"{"ids": [0]}"#[..]),
            ("/plugin", &br#"{"plugin": "random"}"#[..]),
            (
                "/plugin/upload?listener=listener0",
                &b"\0asm\x0d\0\x01\0"[..],
            ),
        ] {
            for ct in [
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
            ] {
                let h = [("Host", host.as_str()), ("Content-Type", ct)];
                let (status, reply) = call(admin, "POST", target, &h, body).await;
                assert_eq!(status, 415, "POST {target} as {ct}: {reply}");
            }
        }
        let h = [
            ("Host", host.as_str()),
            ("Content-Type", "application/json"),
        ];
        let (status, reply) = call(
            admin,
            "POST",
            "/plugin/upload?listener=listener0",
            &h,
            b"\0asm",
        )
        .await;
        assert_eq!(status, 415, "an upload is application/wasm: {reply}");

        // DNS rebinding: the page's own name in Host; reads and the event stream too.
        for target in [
            "/backends",
            "/rep",
            "/metrics",
            "/events",
            "/",
            "/pick?key=a",
        ] {
            for bad in ["evil.example", &format!("evil.example:{}", admin.port())] {
                let (status, reply) = call(admin, "GET", target, &[("Host", bad)], b"").await;
                assert_eq!(status, 403, "GET {target} with Host {bad}: {reply}");
                assert!(!reply.contains(&b1.addr.to_string()), "{reply}");
            }
        }
        let (status, reply) = call(admin, "GET", "/backends", &[], b"").await;
        assert_eq!(status, 403, "no Host: {reply}");
        let (status, reply) = call(
            admin,
            "GET",
            "http://evil.example/backends",
            &[("Host", &host)],
            b"",
        )
        .await;
        assert_eq!(status, 403, "an absolute target names the host: {reply}");
        // No CORS: a preflight gets no Access-Control-Allow-Origin.
        let (_, reply) = call(
            admin,
            "OPTIONS",
            "/backends/add",
            &[
                ("Host", &host),
                ("Origin", "http://evil.example"),
                ("Access-Control-Request-Method", "POST"),
            ],
            b"",
        )
        .await;
        assert!(!reply.contains("access-control-allow-origin"), "{reply}");

        // Nothing was added.
        let (status, reply) = call(admin, "GET", "/backends", &[("Host", &host)], b"").await;
        assert_eq!(status, 200, "{reply}");
        assert!(
            !reply.contains(&b2.addr.to_string()),
            "added by a web page: {reply}"
        );

        // The admin's own page and scripts still work: its own origin, as a browser sends it.
        for h in [host.clone(), format!("localhost:{}", admin.port())] {
            let (status, reply) = call(admin, "GET", "/backends", &[("Host", &h)], b"").await;
            assert_eq!(status, 200, "Host {h}: {reply}");
            let (status, _) = call(admin, "GET", "/", &[("Host", &h)], b"").await;
            assert_eq!(status, 200, "the page with Host {h}");
        }
        let (status, reply) = call(
            admin,
            "POST",
            "/backends/add",
            &[
                ("Host", &host),
                ("Origin", &origin),
                ("Sec-Fetch-Site", "same-origin"),
                ("Content-Type", "application/json"),
            ],
            add,
        )
        .await;
        assert_eq!(status, 200, "the dashboard's own call: {reply}");
        let (status, reply) = call(
            admin,
            "POST",
            "/reload",
            &[("Host", &host), ("Origin", &origin)],
            b"",
        )
        .await;
        assert_eq!(status, 200, "a body-less POST from its own page: {reply}");
        assert!(json_of(&reply)["changes"].is_array(), "{reply}");
        let (status, _) = call(admin, "GET", "/healthz", &[("Host", "anything")], b"").await;
        assert_eq!(
            status, 200,
            "liveness reveals nothing and stays open to probes"
        );
        drop(s.child);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_hosts_and_the_token_rules() {
    bounded(async {
        let b1 = TestBackend::start(200).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("lbwasm.toml");
        std::fs::write(
            &file,
            format!(
                "workers = 1\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n\
                 hosts = [\"admin.test\"]\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\
                 plugin = \"round_robin\"\n[[listener.backend]]\naddress = \"{}\"\n",
                b1.addr
            ),
        )
        .expect("write config");
        let mut cmd = lbwasm();
        cmd.arg("serve")
            .arg("--config")
            .arg(&file)
            .args(["--admin-host", "lb.internal:8443"])
            .stderr(Stdio::null());
        let s = serving(cmd, 1, true).await;
        let admin = s.admin.expect("admin");
        let port = admin.port();
        let auth = ("Authorization", "Bearer s3cret");

        // Names from [admin] hosts and --admin-host; a name without a port also with ours.
        let admin_test_port = format!("admin.test:{port}");
        for h in ["admin.test", admin_test_port.as_str(), "lb.internal:8443"] {
            let (status, reply) = call(admin, "GET", "/backends", &[("Host", h), auth], b"").await;
            assert_eq!(status, 200, "Host {h}: {reply}");
        }
        for h in ["lb.internal", "evil.example", "admin.test.evil.example"] {
            let (status, reply) = call(admin, "GET", "/backends", &[("Host", h), auth], b"").await;
            assert_eq!(status, 403, "Host {h}: {reply}");
        }
        let origin = format!("http://admin.test:{port}");
        let (status, reply) = call(
            admin,
            "POST",
            "/backends/drain",
            &[
                ("Host", &admin_test_port),
                ("Origin", &origin),
                ("Content-Type", "application/json"),
                auth,
            ],
            b"{\"ids\": [999]}",
        )
        .await;
        assert_eq!(status, 404, "allowed through to the call itself: {reply}");

        // With a token: everything but liveness and the page's own files needs it.
        let host = admin.to_string();
        for target in ["/backends", "/rep", "/metrics", "/pick?key=a", "/events"] {
            let (status, reply) = call(admin, "GET", target, &[("Host", &host)], b"").await;
            assert_eq!(status, 401, "GET {target}: {reply}");
        }
        let json = ("Content-Type", "application/json");
        for target in ["/reload", "/backends/add", "/plugin"] {
            let (status, reply) =
                call(admin, "POST", target, &[("Host", &host), json], b"{}").await;
            assert_eq!(status, 401, "POST {target}: {reply}");
        }
        for target in ["/healthz", "/", "/assets/app.js", "/assets/style.css"] {
            let (status, reply) = call(admin, "GET", target, &[("Host", &host)], b"").await;
            assert_eq!(status, 200, "GET {target} needs no token: {reply}");
        }
        let (status, reply) = call(
            admin,
            "GET",
            "/events?token=s3cret",
            &[("Host", &host)],
            b"",
        )
        .await;
        assert_eq!(status, 200, "the event stream takes ?token=: {reply}");
        drop(s.child);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// The /load poller
// ---------------------------------------------------------------------------------------

/// A listener section with fast active checks (the test's clock: every check is a request
/// to `/health`) and `extra` lines.
fn listener_section(plugin: &str, backend: SocketAddr, extra: &str) -> String {
    format!(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\nplugin = \"{plugin}\"\n{extra}\n\
         [listener.health]\npath = \"/health\"\ninterval = \"100ms\"\n\
         [[listener.backend]]\naddress = \"{backend}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_is_polled_only_when_the_plugin_or_the_config_asks() {
    bounded(async {
        let blind = TestBackend::start(200).await; // round_robin: never reads load
        let aware = TestBackend::start(200).await; // least_loaded: reads it
        let missing = TestBackend::start(404).await; // least_loaded, no /load
        let forced = TestBackend::start(200).await; // round_robin, enabled = true
        let off = TestBackend::start(200).await; // least_loaded, enabled = false
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("lbwasm.toml");
        let text = [
            listener_section("round_robin", blind.addr, ""),
            listener_section("least_loaded", aware.addr, ""),
            listener_section("least_loaded", missing.addr, ""),
            listener_section(
                "round_robin",
                forced.addr,
                "[listener.load_report]\nenabled = true\n",
            ),
            listener_section(
                "least_loaded",
                off.addr,
                "[listener.load_report]\nenabled = false\n",
            ),
        ]
        .concat();
        std::fs::write(&file, format!("workers = 1\n{text}")).expect("write config");
        let log = dir.path().join("stderr.log");
        let mut cmd = lbwasm();
        cmd.arg("serve")
            .arg("--config")
            .arg(&file)
            .stderr(std::fs::File::create(&log).expect("log file"));
        let s = serving(cmd, 5, false).await;

        // Several rounds of polling: the load-aware listener has had at least 4 reports.
        eventually("4 load reports from the least_loaded backend", || async {
            aware.seen("/load") >= 4 && forced.seen("/load") >= 4
        })
        .await;
        assert!(blind.seen("/health") > 10, "the checks run");
        assert_eq!(blind.seen("/load"), 0, "round_robin reads no load");
        assert_eq!(off.seen("/load"), 0, "enabled = false wins over the plugin");
        assert_eq!(
            missing.seen("/load"),
            1,
            "a backend that answered 404 is polled much less often"
        );
        drop(s.child);
        let log = std::fs::read_to_string(&log).expect("read log");
        let about_404: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&missing.addr.to_string()) && l.contains("404"))
            .collect();
        assert_eq!(about_404.len(), 1, "one log line for the 404: {log}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_no_load_poll_flag_turns_polling_off() {
    bounded(async {
        let b = TestBackend::start(200).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("lbwasm.toml");
        let text = listener_section(
            "least_loaded",
            b.addr,
            "[listener.load_report]\nenabled = true\n",
        );
        std::fs::write(&file, format!("workers = 1\n{text}")).expect("write config");
        let mut cmd = lbwasm();
        cmd.arg("serve")
            .arg("--config")
            .arg(&file)
            .arg("--no-load-poll")
            .stderr(Stdio::null());
        let s = serving(cmd, 1, false).await;
        eventually("30 health checks", || async { b.seen("/health") >= 30 }).await;
        assert_eq!(b.seen("/load"), 0, "--no-load-poll");
        drop(s.child);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Plugin paths
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_wasm_named_like_a_builtin_says_how_to_get_it() {
    bounded(async {
        let b = TestBackend::start(200).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let backends = b.addr.to_string();
        let serve_args = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--backends",
            &backends,
            "--plugin",
            "least_loaded.wasm",
        ];
        let out = lbwasm()
            .args(serve_args)
            .current_dir(dir.path())
            .output()
            .expect("run lbwasm");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("least_loaded.wasm"), "{stderr}");
        assert!(stderr.contains("--plugin least_loaded"), "{stderr}");
        assert!(
            stderr.contains("lbwasm plugins export least_loaded"),
            "{stderr}"
        );
        assert!(
            stderr.contains("cargo build --release --target wasm32-wasip2 -p least_loaded"),
            "{stderr}"
        );

        // A name that is no built-in: the plain error, no suggestion.
        let out = lbwasm()
            .args(&serve_args[..8])
            .arg("mine.wasm")
            .current_dir(dir.path())
            .output()
            .expect("run lbwasm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("mine.wasm"), "{stderr}");
        assert!(!stderr.contains("plugins export"), "{stderr}");

        // `plugins export` writes the component; then the usage line works as written.
        let out = lbwasm()
            .args(["plugins", "export", "least_loaded"])
            .current_dir(dir.path())
            .output()
            .expect("run lbwasm");
        assert!(out.status.success(), "{out:?}");
        let written = std::fs::read(dir.path().join("least_loaded.wasm")).expect("exported");
        lbwasm::install_builtins();
        assert_eq!(
            written,
            lbwasm::plugin::builtin::get("least_loaded").expect("built-in")
        );
        let out = lbwasm()
            .args(["plugins", "export", "maglev", "-o", "sub.wasm"])
            .current_dir(dir.path())
            .output()
            .expect("run lbwasm");
        assert!(out.status.success(), "{out:?}");
        assert!(
            std::fs::read(dir.path().join("sub.wasm"))
                .expect("exported")
                .starts_with(b"\0asm")
        );
        let out = lbwasm()
            .args(["plugins", "export", "no_such_plugin"])
            .current_dir(dir.path())
            .output()
            .expect("run lbwasm");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("round_robin"),
            "lists the built-ins: {stderr}"
        );

        let mut cmd = lbwasm();
        cmd.args(serve_args)
            .current_dir(dir.path())
            .stderr(Stdio::null());
        let s = serving(cmd, 1, false).await;
        let (status, reply) = call(s.listen[0], "GET", "/x", &[("Host", "x")], b"").await;
        assert_eq!(status, 200, "{reply}");
        drop(s.child);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Upload folders
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_folders_are_removed_at_exit() {
    bounded(async {
        let b = TestBackend::start(200).await;
        let backends = b.addr.to_string();
        lbwasm::install_builtins();
        let wasm = lbwasm::plugin::builtin::get("random").expect("built-in");
        for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let mut cmd = lbwasm();
            cmd.args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--plugin",
                "round_robin",
            ])
            .args([
                "--workers",
                "1",
                "--admin",
                "127.0.0.1:0",
                "--backends",
                &backends,
            ])
            .env("TMPDIR", tmp.path())
            .stderr(Stdio::null());
            let s = serving(cmd, 1, true).await;
            let admin = s.admin.expect("admin");
            let host = admin.to_string();
            let (status, reply) = call(
                admin,
                "POST",
                "/plugin/upload?listener=listener0&name=mine.wasm",
                &[("Host", &host), ("Content-Type", "application/wasm")],
                wasm,
            )
            .await;
            assert_eq!(status, 200, "{reply}");
            let folder = tmp.path().join(format!("lbwasm-uploads-{}", s.child.pid()));
            assert!(
                folder.is_dir(),
                "the upload is saved in {}",
                folder.display()
            );
            let status = stop(s.child, sig).await;
            assert!(status.success(), "{name}: {status:?}");
            assert!(
                !folder.exists(),
                "{} left behind after {name}",
                folder.display()
            );
            assert_eq!(
                std::fs::read_dir(tmp.path()).expect("tmp").count(),
                0,
                "nothing left in the temporary folder"
            );
        }
    })
    .await;
}
