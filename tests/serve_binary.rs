//! The real `lbwasm serve` binary: bad configurations and flags refused before anything is
//! bound, SIGTERM, access logs reopened on SIGHUP, and a low open-files limit raised. Each
//! child runs on 127.0.0.1 with port 0, is bounded, and is killed by its PID.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::backends::{demo_backends, tcp_backends};
use common::config::{addrs, listener};
use common::http::{client, exchange, get, send};
use common::process::{Serving, lbwasm, serving, signal, stop};
use common::proxy::spread;
use common::{bounded, eventually};
use hyper::{Method, StatusCode};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// Runs `lbwasm serve ARGS`, which must fail; its stderr.
async fn refused(args: Vec<std::ffi::OsString>) -> String {
    let out = tokio::task::spawn_blocking(move || lbwasm().arg("serve").args(&args).output())
        .await
        .expect("join")
        .expect("run lbwasm");
    assert!(!out.status.success(), "lbwasm accepted {:?}", out);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_name_file_line_and_key_through_the_binary() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "[[listener]]\nlisten = \"127.0.0.1:0\"\nplugin = \"round_robin\"\n\n[[listener.backend]]\naddress = \"127.0.0.1:9\"\nweight = 0\n",
        )
        .expect("write");
        let stderr = refused(vec!["--config".into(), bad.into()]).await;
        assert!(stderr.contains("bad.toml:7: listener[0].backend[0].weight"), "{stderr}");

        // A plugin option the plugin refuses: named, and nothing is bound.
        let opts = dir.path().join("opts.toml");
        std::fs::write(
            &opts,
            "[[listener]]\nlisten = \"127.0.0.1:0\"\nplugin = \"round_robin\"\n[listener.plugin_options]\nbogus = 1\n[[listener.backend]]\naddress = \"127.0.0.1:9\"\n",
        )
        .expect("write");
        let stderr = refused(vec!["--config".into(), opts.into()]).await;
        assert!(stderr.contains("bogus"), "{stderr}");
        assert!(!stderr.contains("listening"), "{stderr}");

        // Flags: a log filter that is none, an access log that cannot be opened.
        let flags = |extra: &[&str]| -> Vec<std::ffi::OsString> {
            ["--listen", "127.0.0.1:0", "--plugin", "round_robin"]
                .iter()
                .chain(&["--backends", "127.0.0.1:9"])
                .chain(extra)
                .map(Into::into)
                .collect()
        };
        let stderr = refused(flags(&["--log-level", "lbwasm=loud"])).await;
        assert!(
            stderr.starts_with("lbwasm: error: --log-level: \"lbwasm=loud\" is not a log filter"),
            "{stderr}"
        );
        let missing = dir.path().join("no/such/dir/access.log");
        let missing = missing.to_str().expect("utf-8 path");
        let stderr = refused(flags(&["--access-log", missing])).await;
        assert!(
            stderr.contains(&format!("cannot open the access log {missing}: ")),
            "{stderr}"
        );
        assert!(!stderr.contains("listening"), "{stderr}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_and_exits_0_on_sigterm() {
    bounded(async {
        let bs = demo_backends(2).await;
        let list = format!("{},{}", bs[0].addr(), bs[1].addr());
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--plugin",
            "round_robin",
            "--workers",
            "1",
            "--backends",
            &list,
        ];
        let mut cmd = lbwasm();
        cmd.arg("serve").args(args);
        cmd.stderr(Stdio::null());
        let Serving {
            child,
            listen: addrs,
            ..
        } = serving(cmd, 1, false).await;
        let addr = addrs[0];
        let c = client();
        let seen = spread(&c, addr, 10).await;
        assert_eq!(seen.len(), 2, "{seen:?}");
        drop(c);
        let status = stop(child, libc::SIGTERM).await;
        assert!(status.success(), "{status:?}");
    })
    .await;
}

/// The lines of `path` (none yet: empty).
fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_record_requests_and_connections_and_reopen_on_sighup() {
    bounded(async {
        let bs = demo_backends(2).await;
        let tcp = tcp_backends(2).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let (web_log, tcp_log) = (dir.path().join("access.log"), dir.path().join("tcp.log"));
        // Relative paths: next to the configuration file.
        let text = format!(
            "workers = 2\n{}{}",
            listener("web", "round_robin", &addrs(&bs), "access_log = \"access.log\"", ""),
            listener(
                "raw",
                "round_robin",
                &addrs(&tcp),
                "protocol = \"tcp\"\naccess_log = \"tcp.log\"",
                ""
            ),
        );
        let path = dir.path().join("lbwasm.toml");
        std::fs::write(&path, text).expect("write config");
        let mut cmd = lbwasm();
        cmd.args(["serve", "--config"]).arg(&path);
        cmd.stderr(Stdio::null());
        let Serving {
            child,
            listen: listening,
            ..
        } = serving(cmd, 2, false).await;
        let (web, raw) = (listening[0], listening[1]);
        let backends: Vec<String> = bs.iter().map(|b| b.addr().to_string()).collect();

        let c = client();
        let r = send(
            &c,
            Method::GET,
            web,
            "/a?x=1",
            &[("user-agent", "probe \"quoted\""), ("referer", "http://r/")],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let body_len = r.body.len();
        let refused = exchange(web, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
        let mut s = TcpStream::connect(raw).await.expect("connect");
        s.write_all(b"PING\n").await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut pong = String::new();
        s.read_to_string(&mut pong).await.expect("read");
        assert!(pong.starts_with("PONG "), "{pong:?}");

        // Lines are written within a second.
        eventually("two HTTP lines", || async { log_lines(&web_log).len() == 2 }).await;
        eventually("a TCP line", || async { log_lines(&tcp_log).len() == 1 }).await;
        let lines = log_lines(&web_log);
        let line = lines.iter().find(|l| l.contains("\"GET /a")).expect("GET line");
        assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
        let expected = format!(
            "+0000] \"GET /a?x=1 HTTP/1.1\" 200 {body_len} \"http://r/\" \"probe \\x22quoted\\x22\" \""
        );
        assert!(line.contains(&expected), "{line}\nlacks {expected}");
        let fields: Vec<&str> = line.rsplitn(3, ' ').collect();
        assert_eq!(fields[0], "1", "one attempt: {line}");
        assert!(fields[1].parse::<f64>().is_ok(), "seconds: {line}");
        assert!(
            backends.iter().any(|b| fields[2].ends_with(&format!("\"{b}\""))),
            "backend of {line}"
        );
        let bad = lines.iter().find(|l| !l.contains("\"GET /a")).expect("400 line");
        // No request line, referer, user agent or backend; no attempt.
        assert!(bad.contains("] \"-\" 400 "), "{bad}");
        assert!(bad.contains(" \"-\" \"-\" \"-\" ") && bad.ends_with(" 0"), "{bad}");
        let tcp_line = &log_lines(&tcp_log)[0];
        let tail: Vec<&str> = tcp_line.rsplitn(4, ' ').collect();
        assert!(tcp_line.contains("\"TCP\" 200 "), "{tcp_line}");
        assert_eq!((tail[0], tail[1]), ("5", "1"), "5 bytes from the client, 1 attempt: {tcp_line}");
        assert!(
            tcp.iter().any(|b| tail[3].ends_with(&format!("\"{}\"", b.addr()))),
            "{tcp_line}"
        );

        // logrotate: rename, then SIGHUP; later lines go to a new file of the old name.
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&web_log, &rotated).expect("rename");
        signal(&child, libc::SIGHUP);
        eventually("the log reopened", || async { web_log.exists() }).await;
        let r = get(&c, web, "/after").await;
        assert_eq!(r.status, StatusCode::OK);
        eventually("a line in the new file", || async {
            log_lines(&web_log).iter().any(|l| l.contains("\"GET /after HTTP/1.1\" 200 "))
        })
        .await;
        assert_eq!(log_lines(&rotated).len(), 2, "the rotated file is left alone");
        drop(c);
        let status = stop(child, libc::SIGTERM).await;
        assert!(status.success(), "{status:?}");
    })
    .await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_files_limit_is_raised_to_serve_hundreds_of_clients() {
    use std::os::unix::process::CommandExt as _;
    const CLIENTS: usize = 300;
    bounded(async {
        // This process holds the clients and the backends' side of it all.
        lbwasm::serve::raise_fd_limit();
        let bs = demo_backends(2).await;
        let list = format!("{},{}", bs[0].addr(), bs[1].addr());
        let mut cmd = lbwasm();
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--plugin",
            "round_robin",
        ])
        .args(["--workers", "1", "--backends", &list]);
        // SAFETY: pre_exec runs in the forked child; getrlimit and setrlimit are
        // async-signal-safe and touch only the struct passed by pointer.
        unsafe {
            cmd.pre_exec(|| {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                // 200 descriptors: not even 100 proxied connections, if left so.
                lim.rlim_cur = 200;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.stderr(Stdio::null());
        let Serving {
            child,
            listen: addrs,
            ..
        } = serving(cmd, 1, false).await;
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", child.pid())).expect("limits");
        let row: Vec<&str> = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("open files row")
            .split_whitespace()
            .collect();
        assert_eq!(
            row[3], row[4],
            "soft limit not raised to the hard one: {row:?}"
        );

        // Hundreds of clients at once, each with a request in flight.
        let mut conns = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            let mut s = TcpStream::connect(addrs[0]).await.expect("connect");
            s.write_all(b"GET /many HTTP/1.1\r\nHost: lb\r\n\r\n")
                .await
                .expect("write");
            conns.push(BufReader::new(s));
        }
        let mut ok = 0;
        for conn in &mut conns {
            let mut status = String::new();
            let read = tokio::time::timeout(Duration::from_secs(10), conn.read_line(&mut status));
            if matches!(read.await, Ok(Ok(_))) && status.starts_with("HTTP/1.1 200") {
                ok += 1;
            }
        }
        assert_eq!(ok, CLIENTS, "clients answered 200");
        drop(conns);
        assert!(stop(child, libc::SIGTERM).await.success());
    })
    .await;
}
