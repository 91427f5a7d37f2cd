//! A real etcd on 127.0.0.1 for the cluster tests: started with a data directory of the
//! test's own, killed (and restarted) by its PID. Without an `etcd` binary the caller
//! skips — and fails under `CI`, where `.ci/run` installs Debian's `etcd-server`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::http::{HttpClient, send};
use super::process::Reaped;

/// The etcd binary, if installed (Debian's `etcd-server` puts it in /usr/bin).
pub fn binary() -> Option<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// `None` (the test says SKIPPED) when etcd is missing locally; under `CI` a panic.
pub fn require(test: &str) -> Option<PathBuf> {
    match binary() {
        Some(b) => Some(b),
        None if std::env::var_os("CI").is_some() => {
            panic!("{test}: etcd is not installed (.ci/run installs etcd-server)")
        }
        None => {
            eprintln!("SKIPPED {test}: no etcd binary (apt-get install etcd-server)");
            None
        }
    }
}

/// A free port on 127.0.0.1 (bound, read, released: etcd binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// A running etcd member.
pub struct Etcd {
    pub child: Option<Reaped>,
    pub client: SocketAddr,
    peer: SocketAddr,
    binary: PathBuf,
    pub dir: PathBuf,
    /// Serving certificate, key and the CA client certificates must chain to: the client
    /// port speaks TLS and requires a client certificate.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl Etcd {
    /// Starts a one-member etcd with its data under `dir` and waits until it is healthy.
    pub async fn start(binary: &Path, dir: &Path) -> Etcd {
        Self::launch(binary, dir, None).await
    }

    /// [`Etcd::start`] with mutual TLS on the client port: `cert`/`key` served, client
    /// certificates required, chaining to `ca`.
    pub async fn start_tls(binary: &Path, dir: &Path, cert: &Path, key: &Path, ca: &Path) -> Etcd {
        let tls = (cert.to_owned(), key.to_owned(), ca.to_owned());
        Self::launch(binary, dir, Some(tls)).await
    }

    async fn launch(binary: &Path, dir: &Path, tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Etcd {
        let mut etcd = Etcd {
            child: None,
            client: SocketAddr::from(([127, 0, 0, 1], free_port())),
            peer: SocketAddr::from(([127, 0, 0, 1], free_port())),
            binary: binary.to_owned(),
            dir: dir.to_owned(),
            tls,
        };
        etcd.restart().await;
        etcd
    }

    /// The endpoint for `--etcd`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    /// Starts it again (after [`Etcd::kill`]) on the same ports and data directory.
    pub async fn restart(&mut self) {
        let (c, p) = (self.client, self.peer);
        let url = self.url();
        let mut cmd = Command::new(&self.binary);
        if let Some((cert, key, ca)) = &self.tls {
            cmd.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
            cmd.arg("--trusted-ca-file")
                .arg(ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls=http://{p}"))
            .arg(format!("--initial-advertise-peer-urls=http://{p}"))
            .arg(format!("--initial-cluster=t=http://{p}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.child = Some(Reaped(child));
        if self.tls.is_some() {
            // Its HTTP health endpoint is behind the same TLS: wait for the port instead.
            super::until("etcd listens", Duration::from_secs(20), || async move {
                tokio::net::TcpStream::connect(c).await.ok().map(drop)
            })
            .await;
            return;
        }
        let http = super::http::client();
        super::until("etcd is healthy", Duration::from_secs(20), || {
            let http = http.clone();
            async move {
                let r = super::http::try_send(
                    &http,
                    hyper::Method::GET,
                    c,
                    "/health",
                    &[],
                    Default::default(),
                )
                .await
                .ok()?;
                r.text().contains("true").then_some(())
            }
        })
        .await;
    }

    /// SIGKILL, by PID.
    pub fn kill(&mut self) {
        drop(self.child.take());
    }

    /// Sends a signal (SIGSTOP, SIGCONT) to etcd.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            super::process::signal(c, sig);
        }
    }

    /// A call to etcd's JSON gateway (`/v3/...`).
    pub async fn call(&self, http: &HttpClient, path: &str, body: Value) -> Value {
        let headers = [("content-type", "application/json")];
        let r = send(
            http,
            hyper::Method::POST,
            self.client,
            path,
            &headers,
            body.to_string().into(),
        )
        .await;
        serde_json::from_slice(&r.body).unwrap_or(Value::Null)
    }

    /// The store's revision now.
    pub async fn revision(&self, http: &HttpClient) -> i64 {
        let r = self
            .call(http, "/v3/kv/range", json!({"key": "AA=="}))
            .await;
        r["header"]["revision"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("revision")
    }

    /// Compacts the history up to the current revision.
    pub async fn compact(&self, http: &HttpClient) {
        let rev = self.revision(http).await;
        self.call(
            http,
            "/v3/kv/compaction",
            json!({"revision": rev.to_string(), "physical": true}),
        )
        .await;
    }
}
