//! TLS (issue 15) through the real `lbwasm serve` binary: listener termination with
//! certificates chosen by SNI (and a default, or a refusal, for unknown names), ALPN h2 and
//! http/1.1, a minimum version, certificates reloaded on SIGHUP, `POST /reload` and a file
//! change (a bad one refused, the old one kept), start-up errors naming file:line: key, TLS
//! to backends (CA, server name, client certificates, HTTP/2 by ALPN), TLS terminated in
//! front of TCP backends, SNI-routed pass-through on a shared listen address, and the
//! handshake metrics. Certificates come from a test PKI (rcgen); what a server sent is
//! compared byte for byte with what was generated. Everything is on 127.0.0.1 port 0,
//! bounded, and every child is killed by its PID.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use bytes::Bytes;
use common::backends::{demo_backends, tcp_backends};
use common::config::{addrs, listener, weight_1, with_admin};
use common::http::{client, get, read_lenient, send};
use common::process::{Serving, lbwasm, serving, signal};
use common::proxy::id_of;
use common::tls::{
    H1Tls, H2Tls, Leaf, Pki, TLS12_ONLY, any_cert_client, connect, tls_backend, try_connect,
    write_atomically,
};
use common::{bounded, eventually};
use hyper::{Method, StatusCode, Version};
use rustls::ProtocolVersion;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// A path as a TOML string (quoted, escaped).
fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// `[listener.tls]` with `leaf` as its (default) certificate and `keys` (more `key = value`
/// lines of that table), then `more`: `[[listener.tls.certificate]]` tables.
fn tls_section(leaf: &Leaf, keys: &str, more: &str) -> String {
    format!(
        "[listener.tls]\ncert = {}\nkey = {}\n{keys}\n{more}",
        toml_path(&leaf.cert),
        toml_path(&leaf.key)
    )
}

/// One `[[listener.tls.certificate]]` table for `leaf`, with `names` when given.
fn certificate(leaf: &Leaf, names: Option<&[&str]>) -> String {
    let names = names
        .map(|n| format!("names = {n:?}\n"))
        .unwrap_or_default();
    format!(
        "[[listener.tls.certificate]]\ncert = {}\nkey = {}\n{names}",
        toml_path(&leaf.cert),
        toml_path(&leaf.key)
    )
}

/// A running `lbwasm serve --config`, with an admin endpoint; its standard error goes to a
/// file the test reads.
struct Proxy {
    serving: Serving,
    stderr: PathBuf,
}

impl Proxy {
    /// The first listener's address.
    fn addr(&self) -> SocketAddr {
        self.serving.listen[0]
    }

    fn admin(&self) -> SocketAddr {
        self.serving.admin.expect("admin endpoint")
    }

    /// What the child wrote to standard error so far.
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until what the child wrote to standard error after byte `from` contains
    /// `what`.
    async fn logs_after(&self, from: usize, what: &str) {
        eventually(
            &format!("stderr (after byte {from}) mentions {what:?}"),
            || {
                let text = self.stderr();
                let holds = text.get(from..).is_some_and(|t| t.contains(what));
                async move { holds }
            },
        )
        .await;
    }
}

/// Starts `cmd` (an `lbwasm serve` command line) with its stderr in `dir/stderr.log`,
/// reading `listeners` listen addresses (and the admin address when `admin`); fails with
/// that stderr when it does not start.
async fn spawn(mut cmd: std::process::Command, dir: &Path, listeners: usize, admin: bool) -> Proxy {
    let stderr = dir.join("stderr.log");
    let file = std::fs::File::create(&stderr).expect("stderr file");
    cmd.stderr(Stdio::from(file));
    match tokio::spawn(serving(cmd, listeners, admin)).await {
        Ok(serving) => Proxy { serving, stderr },
        Err(e) => panic!(
            "lbwasm did not start: {e}\nstderr:\n{}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        ),
    }
}

/// Writes `listeners` (with 2 workers and an admin endpoint) to `dir/lbwasm.toml` and
/// starts `lbwasm serve --config` on it, which must print `n` listen addresses.
async fn serve_file(dir: &Path, listeners: &str, n: usize) -> Proxy {
    let path = dir.join("lbwasm.toml");
    std::fs::write(&path, with_admin(2, listeners, None)).expect("write config");
    let mut cmd = lbwasm();
    cmd.args(["serve", "--config"]).arg(&path);
    spawn(cmd, dir, n, true).await
}

/// `lbwasm serve --config` with one listener, `web` (round robin over `bs`), whose TLS is
/// `tls` (a [`tls_section`]).
async fn serve_web(pki: &Pki, bs: &[lbwasm::backend::BackendHandle], tls: &str) -> Proxy {
    let text = listener("web", "round_robin", &addrs(bs), "", tls);
    serve_file(pki.dir.path(), &text, 1).await
}

/// Runs `lbwasm serve --config` on `text` (written as-is to `dir/lbwasm.toml`), which must
/// fail; its standard error.
async fn refused(dir: &Path, text: &str) -> String {
    let path = dir.join("lbwasm.toml");
    std::fs::write(&path, text).expect("write config");
    let out = tokio::task::spawn_blocking(move || {
        lbwasm()
            .args(["serve", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
    })
    .await
    .expect("join")
    .expect("run lbwasm");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "lbwasm accepted the configuration: {:?}\nstderr:\n{stderr}\nconfig:\n{text}",
        out.status
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "something was bound: {out:?}"
    );
    stderr
}

/// The 1-based number of the first line of `text` that starts with `prefix` at or after
/// line `after` (1-based; 0 for anywhere).
fn line_of(text: &str, prefix: &str, after: usize) -> usize {
    text.lines()
        .enumerate()
        .skip(after)
        .find(|(_, l)| l.starts_with(prefix))
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in\n{text}"))
}

/// The sum of the samples of `metric` whose labels contain every one of `labels` in the
/// Prometheus text `metrics` (a counter is exported per label set, zeros included); None
/// when there is no such sample.
fn sample(metrics: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no value: {l:?}"))
        })
        .reduce(|a, b| a + b)
}

/// One HTTP/1.1 GET over a new TLS connection to `addr` as `name` (verified against
/// `pki`'s CA); the answer.
async fn https_get(pki: &Pki, addr: SocketAddr, name: &str, path: &str) -> common::http::Reply {
    let tls = connect(addr, pki.client(&["http/1.1"]), name).await;
    H1Tls::new(tls.stream, name).await.get(path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_the_certificate_and_unknown_names_get_the_default() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let a = pki.leaf("a", &["a.test"], 1001);
        let b = pki.leaf("b", &["b.test", "*.b.test"], 1002);
        let bs = demo_backends(1).await;
        let proxy = serve_web(&pki, &bs, &tls_section(&a, "", &certificate(&b, None))).await;
        let addr = proxy.addr();

        for (name, want, which) in [
            ("a.test", &a, "a"),
            ("b.test", &b, "b"),
            ("x.b.test", &b, "b (by its *.b.test subjectAltName)"),
        ] {
            let tls = connect(addr, pki.client(&[]), name).await;
            assert!(
                tls.leaf == want.der,
                "SNI {name}: expected certificate {which} (serial {})",
                want.serial
            );
        }

        // No SNI: the first certificate (verified here as a.test, SNI not sent).
        let mut no_sni = pki.client(&[]);
        no_sni.enable_sni = false;
        let tls = connect(addr, no_sni, "a.test").await;
        assert!(tls.leaf == a.der, "no SNI: expected the default (a.test)");

        // An unknown name: the default too (it does not verify as c.test: look, not verify).
        let tls = connect(addr, any_cert_client(&[]), "c.test").await;
        assert!(
            tls.leaf == a.der,
            "unknown SNI c.test: expected the default (a.test)"
        );

        // And the connection is proxied: a request over b.test's TLS reaches the backend.
        let tls = connect(addr, pki.client(&["http/1.1"]), "b.test").await;
        let r = H1Tls::new(tls.stream, "b.test").await.get("/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.served_by(), id_of(&bs[0]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_are_refused_when_configured() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let a = pki.leaf("a", &["a.test"], 1);
        let bs = demo_backends(1).await;
        let proxy = serve_web(&pki, &bs, &tls_section(&a, "unknown_name = \"refuse\"", "")).await;
        let addr = proxy.addr();

        let tls = connect(addr, pki.client(&[]), "a.test").await;
        assert!(tls.leaf == a.der, "a.test still gets its certificate");

        let err = try_connect(addr, any_cert_client(&[]), "c.test")
            .await
            .err()
            .expect("an unknown name must be refused");
        assert!(
            err.to_string().contains("UnrecognisedName"),
            "refused with alert unrecognized_name, got: {err}"
        );

        let mut no_sni = any_cert_client(&[]);
        no_sni.enable_sni = false;
        assert!(
            try_connect(addr, no_sni, "a.test").await.is_err(),
            "a client without SNI must be refused too"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_gets_http2_and_http1_keeps_alive() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let a = pki.leaf("a", &["a.test"], 1);
        let bs = demo_backends(1).await;
        let proxy = serve_web(&pki, &bs, &tls_section(&a, "", "")).await;
        let addr = proxy.addr();
        let id = id_of(&bs[0]);

        // ALPN h2 (offered first): an HTTP/2 server, two streams on the one connection.
        let tls = connect(addr, pki.client(&["h2", "http/1.1"]), "a.test").await;
        assert_eq!(tls.alpn.as_deref(), Some(b"h2".as_slice()), "ALPN");
        let mut h2 = H2Tls::new(tls.stream, "a.test").await;
        for path in ["/h2/1", "/h2/2"] {
            let r = h2.get(path).await;
            assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
            assert_eq!(r.version, Version::HTTP_2, "{path}");
            assert_eq!(r.served_by(), id, "{path}");
        }

        // ALPN http/1.1: HTTP/1.1, two requests on one connection (keep-alive).
        let tls = connect(addr, pki.client(&["http/1.1"]), "a.test").await;
        assert_eq!(tls.alpn.as_deref(), Some(b"http/1.1".as_slice()), "ALPN");
        let mut h1 = H1Tls::new(tls.stream, "a.test").await;
        for path in ["/h1/1", "/h1/2"] {
            let r = h1.get(path).await;
            assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
            assert_eq!(r.version, Version::HTTP_11, "{path}");
            assert_eq!(r.served_by(), id, "{path}");
        }

        // No ALPN at all: HTTP/1.1 too.
        let tls = connect(addr, pki.client(&[]), "a.test").await;
        assert_eq!(tls.alpn, None, "nothing negotiated without ALPN");
        let mut h1 = H1Tls::new(tls.stream, "a.test").await;
        for path in ["/plain/1", "/plain/2"] {
            let r = h1.get(path).await;
            assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
            assert_eq!(r.served_by(), id, "{path}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_flags_terminate_tls_on_the_listener() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let a = pki.leaf("a", &["a.test"], 7);
        let bs = demo_backends(1).await;
        let mut cmd = lbwasm();
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--plugin",
            "round_robin",
        ])
        .args(["--workers", "1", "--tls-cert"])
        .arg(&a.cert)
        .arg("--tls-key")
        .arg(&a.key)
        .args(["--backends", &bs[0].addr().to_string()]);
        let proxy = spawn(cmd, pki.dir.path(), 1, false).await;
        let tls = connect(proxy.addr(), pki.client(&["http/1.1"]), "a.test").await;
        assert!(tls.leaf == a.der, "the --tls-cert certificate is served");
        let r = H1Tls::new(tls.stream, "a.test").await.get("/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.served_by(), id_of(&bs[0]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_13_refuses_tls12_clients_and_the_default_accepts_them() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let a = pki.leaf("a", &["a.test"], 1);
        let bs = demo_backends(1).await;
        let text = format!(
            "{}{}",
            listener(
                "strict",
                "round_robin",
                &addrs(&bs),
                "",
                &tls_section(&a, "min_version = \"1.3\"", ""),
            ),
            listener(
                "default",
                "round_robin",
                &addrs(&bs),
                "",
                &tls_section(&a, "", ""),
            ),
        );
        let proxy = serve_file(pki.dir.path(), &text, 2).await;
        let (strict, default) = (proxy.serving.listen[0], proxy.serving.listen[1]);

        let tls12 = || pki.client_versions(&["http/1.1"], TLS12_ONLY);
        assert!(
            try_connect(strict, tls12(), "a.test").await.is_err(),
            "min_version 1.3 accepted a TLS 1.2-only client"
        );
        let tls = connect(strict, pki.client(&["http/1.1"]), "a.test").await;
        assert_eq!(tls.version, Some(ProtocolVersion::TLSv1_3));

        let tls = connect(default, tls12(), "a.test").await;
        assert_eq!(tls.version, Some(ProtocolVersion::TLSv1_2));
        let r = H1Tls::new(tls.stream, "a.test").await.get("/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    })
    .await;
}

/// Copies `from`'s files over `to`'s (key first, each file replaced at once).
fn install(from: &Leaf, to: &Leaf) {
    write_atomically(&to.key, &from.key_pem);
    write_atomically(&to.cert, &from.cert_pem);
}

/// Waits until a new handshake as `name` gets `want`.
async fn until_served(pki: &Pki, addr: SocketAddr, name: &str, want: &Leaf) {
    eventually(
        &format!("a new handshake gets serial {}", want.serial),
        || async move { connect(addr, any_cert_client(&[]), name).await.leaf == want.der },
    )
    .await;
    // And it verifies, as a client would.
    assert!(connect(addr, pki.client(&[]), name).await.leaf == want.der);
}

/// A new handshake as `name` gets `want`, now.
async fn served(addr: SocketAddr, name: &str, want: &Leaf, why: &str) {
    let tls = connect(addr, any_cert_client(&[]), name).await;
    assert!(
        tls.leaf == want.der,
        "{why}: expected serial {} to be served",
        want.serial
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_admin_reload_load_certificates_again_and_keep_open_connections() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let live = pki.leaf("a", &["a.test"], 1);
        let v2 = pki.leaf("a2", &["a.test"], 2);
        let v3 = pki.leaf("a3", &["a.test"], 3);
        let bs = demo_backends(1).await;
        // Files are looked at rarely: only the signal and the admin call reload here.
        let proxy = serve_web(
            &pki,
            &bs,
            &tls_section(&live, "check_interval = \"1h\"", ""),
        )
        .await;
        let addr = proxy.addr();

        let tls = connect(addr, pki.client(&["http/1.1"]), "a.test").await;
        assert!(tls.leaf == live.der, "serial 1 at start");
        let mut open = H1Tls::new(tls.stream, "a.test").await;
        assert_eq!(open.get("/before").await.status, StatusCode::OK);

        // A new certificate, then SIGHUP: new handshakes get it, the open connection works.
        install(&v2, &live);
        signal(&proxy.serving.child, libc::SIGHUP);
        until_served(&pki, addr, "a.test", &v2).await;
        let r = open.get("/after-sighup").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());

        // Garbage in the certificate file: refused, logged naming the file, serial 2 kept.
        let from = proxy.stderr().len();
        write_atomically(
            &live.cert,
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
        );
        signal(&proxy.serving.child, libc::SIGHUP);
        proxy.logs_after(from, "a.pem").await;
        served(addr, "a.test", &v2, "after a garbage certificate").await;

        // A certificate whose key does not match (serial 3's certificate, serial 2's key),
        // through the admin API: refused, the error in its answer, serial 2 kept.
        write_atomically(&live.key, &v2.key_pem);
        write_atomically(&live.cert, &v3.cert_pem);
        let c = client();
        let r = send(
            &c,
            Method::POST,
            proxy.admin(),
            "/reload",
            &[],
            Bytes::new(),
        )
        .await;
        assert_ne!(r.status, StatusCode::OK, "{}", r.text());
        assert!(r.text().contains("does not match"), "{}", r.text());
        assert!(r.text().contains("listener[0].tls.key"), "{}", r.text());
        served(
            addr,
            "a.test",
            &v2,
            "after a certificate its key does not match",
        )
        .await;

        let r = open.get("/after-refusals").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());

        // Serial 3 with its own key, through the admin API: now served.
        install(&v3, &live);
        let r = send(
            &c,
            Method::POST,
            proxy.admin(),
            "/reload",
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        until_served(&pki, addr, "a.test", &v3).await;
        let r = open.get("/after-admin-reload").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_certificate_files_are_reloaded_without_a_signal() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let live = pki.leaf("a", &["a.test"], 1);
        let v2 = pki.leaf("a2", &["a.test"], 2);
        let bs = demo_backends(1).await;
        let proxy = serve_web(
            &pki,
            &bs,
            &tls_section(&live, "check_interval = \"200ms\"", ""),
        )
        .await;
        let addr = proxy.addr();

        let tls = connect(addr, pki.client(&["http/1.1"]), "a.test").await;
        assert!(tls.leaf == live.der, "serial 1 at start");
        let mut open = H1Tls::new(tls.stream, "a.test").await;
        assert_eq!(open.get("/before").await.status, StatusCode::OK);

        install(&v2, &live);
        until_served(&pki, addr, "a.test", &v2).await;
        let r = open.get("/after-change").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());

        // A broken file on disk: refused and logged, serial 2 kept.
        let from = proxy.stderr().len();
        write_atomically(&live.cert, "this is not PEM\n");
        proxy.logs_after(from, "a.pem").await;
        served(addr, "a.test", &v2, "after a garbage certificate file").await;
        let r = open.get("/after-garbage").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_configurations_are_refused_naming_file_line_and_key() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let a = pki.leaf("a", &["a.test"], 1);
        let b = pki.leaf("b", &["b.test"], 2);
        let dir = pki.dir.path();
        let web = |sections: &str| {
            with_admin(
                1,
                &listener(
                    "web",
                    "round_robin",
                    &weight_1([common::backends::closed_port()]),
                    "",
                    sections,
                ),
                None,
            )
        };

        // A missing certificate file: its path, file:line: listener[0].tls.cert.
        let missing = dir.join("missing.pem");
        let text = web(&format!(
            "[listener.tls]\ncert = {}\nkey = {}\n",
            toml_path(&missing),
            toml_path(&a.key)
        ));
        let stderr = refused(dir, &text).await;
        let line = line_of(&text, "cert = ", line_of(&text, "[listener.tls]", 0));
        assert!(
            stderr.contains(&format!("lbwasm.toml:{line}: listener[0].tls.cert")),
            "{stderr}"
        );
        assert!(stderr.contains(&missing.display().to_string()), "{stderr}");

        // A key that is not the certificate's: file:line: listener[0].tls.key.
        let text = web(&format!(
            "[listener.tls]\ncert = {}\nkey = {}\n",
            toml_path(&a.cert),
            toml_path(&b.key)
        ));
        let stderr = refused(dir, &text).await;
        let line = line_of(&text, "key = ", line_of(&text, "[listener.tls]", 0));
        assert!(
            stderr.contains(&format!("lbwasm.toml:{line}: listener[0].tls.key")),
            "{stderr}"
        );
        assert!(stderr.contains("does not match"), "{stderr}");

        // A name listed that the certificate does not cover: the name.
        let text = web(&tls_section(
            &a,
            "",
            &certificate(&b, Some(&["b.test", "c.test"])),
        ));
        let stderr = refused(dir, &text).await;
        assert!(stderr.contains("c.test"), "{stderr}");
        assert!(
            stderr.contains("listener[0].tls.certificate[0].names"),
            "{stderr}"
        );

        // Garbage instead of a certificate: refused, naming the file.
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        let text = web(&format!(
            "[listener.tls]\ncert = {}\nkey = {}\n",
            toml_path(&garbage),
            toml_path(&a.key)
        ));
        let stderr = refused(dir, &text).await;
        assert!(stderr.contains("listener[0].tls.cert"), "{stderr}");
        assert!(stderr.contains("garbage.pem"), "{stderr}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_served_with_a_warning_naming_its_date() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let old = pki.leaf_with("old", &["old.test"], 9, |p| {
            p.not_before = rcgen::date_time_ymd(2019, 3, 4);
            p.not_after = rcgen::date_time_ymd(2020, 5, 6);
        });
        let bs = demo_backends(1).await;
        let proxy = serve_web(&pki, &bs, &tls_section(&old, "", "")).await;
        let tls = connect(proxy.addr(), any_cert_client(&[]), "old.test").await;
        assert!(
            tls.leaf == old.der,
            "the expired certificate is still served"
        );
        proxy.logs_after(0, "2020").await;
        let stderr = proxy.stderr();
        assert!(stderr.to_lowercase().contains("warn"), "{stderr}");
        assert!(stderr.contains("2020"), "notAfter not named: {stderr}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_verifies_backends_against_the_configured_ca() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let other = Pki::new("some other CA");
        let good_leaf = pki.leaf("good", &["127.0.0.1"], 11);
        let bad_leaf = other.leaf("bad", &["127.0.0.1"], 12);
        let good = tls_backend("good", pki.server(&good_leaf, &[], None)).await;
        let bad = tls_backend("bad", other.server(&bad_leaf, &[], None)).await;
        let backend_tls = format!("[listener.backend_tls]\nca = {}\n", toml_path(&pki.ca_pem));
        let text = format!(
            "{}{}",
            listener(
                "good",
                "round_robin",
                &weight_1([good.addr]),
                "",
                &backend_tls
            ),
            listener(
                "bad",
                "round_robin",
                &weight_1([bad.addr]),
                "",
                &backend_tls
            ),
        );
        let proxy = serve_file(pki.dir.path(), &text, 2).await;
        let c = client();

        let r = get(&c, proxy.serving.listen[0], "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.text(), "good");
        let seen = good.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(
            seen[0].sni, None,
            "an IP address is verified, not sent as SNI"
        );

        let r = get(&c, proxy.serving.listen[1], "/").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
        let body = r.text();
        assert_eq!(body.trim().lines().count(), 1, "one line: {body:?}");
        assert!(body.contains("certificate"), "{body:?}");
        assert!(body.contains("UnknownIssuer"), "{body:?}");
        assert!(
            bad.seen().is_empty(),
            "no request reached the untrusted backend"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_sends_and_verifies_the_configured_server_name() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let leaf = pki.leaf("api", &["api.internal"], 21);
        let api = tls_backend("api", pki.server(&leaf, &[], None)).await;
        let ca = toml_path(&pki.ca_pem);
        let text = format!(
            "{}{}",
            listener(
                "named",
                "round_robin",
                &weight_1([api.addr]),
                "",
                &format!("[listener.backend_tls]\nca = {ca}\nserver_name = \"api.internal\"\n"),
            ),
            listener(
                "by_ip",
                "round_robin",
                &weight_1([api.addr]),
                "",
                &format!("[listener.backend_tls]\nca = {ca}\n"),
            ),
        );
        let proxy = serve_file(pki.dir.path(), &text, 2).await;
        let c = client();

        let r = get(&c, proxy.serving.listen[0], "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.text(), "api");
        let seen = api.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].sni.as_deref(), Some("api.internal"), "SNI sent");

        // Without server_name the backend's IP is verified: its certificate has no IP SAN.
        let r = get(&c, proxy.serving.listen[1], "/").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
        assert!(r.text().contains("certificate"), "{}", r.text());
        assert_eq!(
            api.seen().len(),
            1,
            "no request went over an unverified connection"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_insecure_skip_verify_accepts_any_certificate_and_says_so() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let other = Pki::new("some other CA");
        let leaf = other.leaf("x", &["elsewhere.test"], 31);
        let x = tls_backend("x", other.server(&leaf, &[], None)).await;
        let text = listener(
            "web",
            "round_robin",
            &weight_1([x.addr]),
            "",
            &format!(
                "[listener.backend_tls]\nca = {}\ninsecure_skip_verify = true\n",
                toml_path(&pki.ca_pem)
            ),
        );
        let proxy = serve_file(pki.dir.path(), &text, 1).await;
        let r = get(&client(), proxy.addr(), "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.text(), "x");
        let stderr = proxy.stderr();
        assert!(
            stderr.to_lowercase().contains("insecure"),
            "insecure_skip_verify must be logged at start: {stderr}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_mtls_sends_the_client_certificate_from_the_file_and_the_flags() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let leaf = pki.leaf("strict", &["127.0.0.1"], 41);
        let me = pki.leaf("client", &["lbwasm-client.test"], 42);
        let strict = tls_backend("strict", pki.server(&leaf, &[], Some(&pki))).await;
        let ca = toml_path(&pki.ca_pem);
        let text = format!(
            "{}{}",
            listener(
                "with_cert",
                "round_robin",
                &weight_1([strict.addr]),
                "",
                &format!(
                    "[listener.backend_tls]\nca = {ca}\ncert = {}\nkey = {}\n",
                    toml_path(&me.cert),
                    toml_path(&me.key)
                ),
            ),
            listener(
                "without",
                "round_robin",
                &weight_1([strict.addr]),
                "",
                &format!("[listener.backend_tls]\nca = {ca}\n"),
            ),
        );
        let proxy = serve_file(pki.dir.path(), &text, 2).await;
        let c = client();

        let r = get(&c, proxy.serving.listen[0], "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.text(), "strict");
        let seen = strict.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].client_cert.as_ref() == Some(&me.der),
            "the backend saw the configured client certificate"
        );

        let r = get(&c, proxy.serving.listen[1], "/").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
        assert_eq!(
            strict.seen().len(),
            1,
            "no request without a client certificate"
        );

        // The same through the flags.
        let flags_dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = lbwasm();
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--plugin",
            "round_robin",
        ])
        .args(["--workers", "1", "--backends", &strict.addr.to_string()])
        .arg("--backend-ca")
        .arg(&pki.ca_pem)
        .arg("--backend-cert")
        .arg(&me.cert)
        .arg("--backend-key")
        .arg(&me.key);
        let flagged = spawn(cmd, flags_dir.path(), 1, false).await;
        let r = get(&c, flagged.addr(), "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.text(), "strict");
        let seen = strict.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[1].client_cert.as_ref() == Some(&me.der));

        // --backend-ca alone: no client certificate, refused by the backend.
        let mut cmd = lbwasm();
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--plugin",
            "round_robin",
        ])
        .args(["--workers", "1", "--backends", &strict.addr.to_string()])
        .arg("--backend-ca")
        .arg(&pki.ca_pem);
        let bare_dir = tempfile::tempdir().expect("tempdir");
        let bare = spawn(cmd, bare_dir.path(), 1, false).await;
        let r = get(&c, bare.addr(), "/").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
        assert_eq!(strict.seen().len(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_protocol_h2_speaks_http2_over_tls_negotiated_by_alpn() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let leaf = pki.leaf("h2", &["127.0.0.1"], 51);
        let h2 = tls_backend("h2", pki.server(&leaf, &["h2"], None)).await;
        let text = listener(
            "web",
            "round_robin",
            &weight_1([h2.addr]),
            "backend_protocol = \"h2\"",
            &format!("[listener.backend_tls]\nca = {}\n", toml_path(&pki.ca_pem)),
        );
        let proxy = serve_file(pki.dir.path(), &text, 1).await;
        let c = client();
        for i in 0..3 {
            let r = get(&c, proxy.addr(), &format!("/{i}")).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            assert_eq!(r.text(), "h2");
        }
        let seen = h2.seen();
        assert_eq!(seen.len(), 3, "{seen:?}");
        for s in &seen {
            assert_eq!(s.version, Version::HTTP_2, "{seen:?}");
            assert_eq!(s.alpn.as_deref(), Some(b"h2".as_slice()), "{seen:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listeners_terminate_tls_in_front_of_plain_tcp_backends() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let a = pki.leaf("a", &["a.test"], 61);
        let bs = tcp_backends(1).await;
        let text = listener(
            "raw",
            "round_robin",
            &addrs(&bs),
            "protocol = \"tcp\"",
            &tls_section(&a, "", ""),
        );
        let proxy = serve_file(pki.dir.path(), &text, 1).await;
        let tls = connect(proxy.addr(), pki.client(&[]), "a.test").await;
        assert!(tls.leaf == a.der, "the listener's certificate");
        let mut s = BufReader::new(tls.stream);
        let id = id_of(&bs[0]);
        s.get_mut().write_all(b"PING\n").await.expect("write");
        let mut line = String::new();
        s.read_line(&mut line).await.expect("read");
        assert_eq!(line, format!("PONG {id}\n"));
        s.get_mut().write_all(b"hello\n").await.expect("write");
        line.clear();
        s.read_line(&mut line).await.expect("read");
        assert_eq!(line, format!("{id} hello\n"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_routes_passthrough_connections_on_a_shared_listen_address() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let a_leaf = pki.leaf("a", &["a.test", "*.a.test"], 71);
        let b_leaf = pki.leaf("b", &["b.test"], 72);
        let a = tls_backend("a", pki.server(&a_leaf, &["http/1.1"], None)).await;
        let b = tls_backend("b", pki.server(&b_leaf, &["http/1.1"], None)).await;
        let text = format!(
            "{}{}",
            listener(
                "a",
                "round_robin",
                &weight_1([a.addr]),
                "protocol = \"tcp\"\nserver_names = [\"a.test\", \"*.a.test\"]",
                "",
            ),
            listener(
                "b",
                "round_robin",
                &weight_1([b.addr]),
                "protocol = \"tcp\"\nserver_names = [\"b.test\"]",
                "",
            ),
        );
        let proxy = serve_file(pki.dir.path(), &text, 2).await;
        let listen = &proxy.serving.listen;
        assert_eq!(listen[0], listen[1], "one socket for both listeners");
        let addr = listen[0];

        // Each name reaches its own backend, whose own certificate the client verifies.
        for (name, leaf, body) in [
            ("a.test", &a_leaf, "a"),
            ("x.a.test", &a_leaf, "a"),
            ("b.test", &b_leaf, "b"),
        ] {
            let tls = connect(addr, pki.client(&["http/1.1"]), name).await;
            assert!(
                tls.leaf == leaf.der,
                "{name}: the backend's own certificate"
            );
            let r = H1Tls::new(tls.stream, name).await.get("/").await;
            assert_eq!(r.status, StatusCode::OK, "{name}: {}", r.text());
            assert_eq!(r.text(), body, "{name}");
        }
        let sni = |b: &common::tls::TlsBackend| -> Vec<Option<String>> {
            b.seen().into_iter().map(|s| s.sni).collect()
        };
        assert_eq!(
            sni(&a),
            [Some("a.test".to_string()), Some("x.a.test".to_string())]
        );
        assert_eq!(sni(&b), [Some("b.test".to_string())]);

        // A name no listener has: the connection is closed.
        assert!(
            try_connect(addr, any_cert_client(&[]), "c.test")
                .await
                .is_err(),
            "c.test matched no listener and must be closed"
        );
        assert!(a.failures().is_empty() && b.failures().is_empty());
        assert_eq!(
            a.seen().len() + b.seen().len(),
            3,
            "c.test reached no backend"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_are_counted_in_metrics() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let a = pki.leaf("a", &["a.test"], 81);
        let bs = demo_backends(1).await;
        let proxy = serve_web(&pki, &bs, &tls_section(&a, "", "")).await;
        let addr = proxy.addr();

        // Plain HTTP to the TLS port: not a ClientHello, no HTTP answer.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .expect("write");
        let answer = read_lenient(&mut s).await;
        assert!(!answer.contains("HTTP/1.1 200"), "{answer:?}");

        // And one that works.
        let r = https_get(&pki, addr, "a.test", "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());

        let c = client();
        let admin = proxy.admin();
        eventually(
            "/metrics counts the failed and the completed handshake",
            || {
                let c = c.clone();
                async move {
                    let m = get(&c, admin, "/metrics").await.text();
                    let failed = sample(
                        &m,
                        "lbwasm_tls_handshake_failures_total",
                        &["listener=\"web\"", "reason=\""],
                    );
                    let done = sample(
                        &m,
                        "lbwasm_tls_handshakes_total",
                        &["listener=\"web\"", "version=\"", "alpn=\""],
                    );
                    failed.is_some_and(|v| v >= 1.0) && done.is_some_and(|v| v >= 1.0)
                }
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_serves_https_and_a_remote_one_requires_it() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let leaf = pki.leaf("admin", &["admin.test"], 91);
        let bs = demo_backends(1).await;
        let text = format!(
            "workers = 1\n[admin]\nlisten = \"127.0.0.1:0\"\n[admin.tls]\ncert = {}\nkey = {}\n{}",
            toml_path(&leaf.cert),
            toml_path(&leaf.key),
            listener("web", "round_robin", &addrs(&bs), "", "")
        );
        let path = pki.dir.path().join("lbwasm.toml");
        std::fs::write(&path, &text).expect("write config");
        let mut cmd = lbwasm();
        cmd.args(["serve", "--config"]).arg(&path);
        let proxy = spawn(cmd, pki.dir.path(), 1, true).await;
        let admin = proxy.admin();

        let tls = connect(admin, pki.client(&["http/1.1"]), "admin.test").await;
        assert!(tls.leaf == leaf.der, "the admin API serves its certificate");
        let mut h = H1Tls::new(tls.stream, &admin.to_string()).await;
        let r = h.get("/backends").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!(r.text().contains("\"listeners\""), "{}", r.text());

        // Cleartext to the HTTPS port gets no HTTP answer.
        let mut s = TcpStream::connect(admin).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let answer = read_lenient(&mut s).await;
        assert!(!answer.contains("HTTP/1.1 200"), "{answer:?}");

        // Reachable from elsewhere, with a token but without TLS: refused at start.
        let remote = format!(
            "[admin]\nlisten = \"0.0.0.0:0\"\nallow_remote = true\ntoken = \"t\"\n{}",
            listener("web", "round_robin", &addrs(&bs), "", "")
        );
        let stderr = refused(pki.dir.path(), &remote).await;
        assert!(
            stderr.contains("admin.listen") && stderr.contains("needs TLS"),
            "{stderr}"
        );
    })
    .await;
}

/// A client that opens a TLS connection and never finishes its handshake (silent, or
/// half a ClientHello) is cut off by the listener's idle timeout, not held forever, and
/// counted as a `closed` handshake failure; the listener keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_that_never_finish_are_cut_off() {
    bounded(async {
        let pki = Pki::new("lbwasm test CA");
        let a = pki.leaf("a", &["a.test"], 95);
        let bs = demo_backends(1).await;
        let sections = format!(
            "{}\n[listener.timeouts]\nidle = \"1s\"\n",
            tls_section(&a, "", "")
        );
        let proxy = serve_web(&pki, &bs, &sections).await;
        let addr = proxy.addr();
        let silent = TcpStream::connect(addr).await.expect("connect");
        let mut partial = TcpStream::connect(addr).await.expect("connect");
        // A handshake record announcing 512 bytes, and a ClientHello header, then nothing.
        partial
            .write_all(&[22, 3, 1, 2, 0, 1, 0, 1, 252])
            .await
            .expect("write");
        for (what, mut s) in [("silent", silent), ("half a ClientHello", partial)] {
            let mut buf = [0u8; 64];
            // Only a guard against a hang: the proxy closes it (EOF, or a reset).
            let read = tokio::time::timeout(std::time::Duration::from_secs(60), async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(
                read.is_ok(),
                "{what}: the proxy never closed the connection"
            );
        }
        let r = https_get(&pki, addr, "a.test", "/after").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let c = client();
        let admin = proxy.admin();
        eventually("both are counted as closed handshakes", || {
            let c = c.clone();
            async move {
                let m = get(&c, admin, "/metrics").await.text();
                let closed = sample(
                    &m,
                    "lbwasm_tls_handshake_failures_total",
                    &["listener=\"web\"", "reason=\"closed\""],
                );
                closed.is_some_and(|v| v >= 2.0)
            }
        })
        .await;
    })
    .await;
}
