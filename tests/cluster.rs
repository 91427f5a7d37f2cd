//! Cluster mode end to end: three `lbwasm serve` replicas sharing one configuration through
//! a real etcd on 127.0.0.1 (started, killed, stopped and wiped by the tests, by PID).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use common::backends::demo_backends;
use common::etcd::{self, Etcd};
use common::http::{HttpClient, client, get, send, try_send};
use common::process::{Serving, lbwasm, serving};
use common::{EVENTUALLY, bounded, eventually, until};

/// Starts replica `name` of cluster `cluster`, its file naming `backends`.
async fn replica(
    dir: &Path,
    etcd_url: &str,
    cluster: &str,
    name: &str,
    backends: &[SocketAddr],
) -> Serving {
    replica_with(dir, etcd_url, cluster, name, backends, "").await
}

/// [`replica`] with more keys in its `[[listener]]` table.
async fn replica_with(
    dir: &Path,
    etcd_url: &str,
    cluster: &str,
    name: &str,
    backends: &[SocketAddr],
    listener_keys: &str,
) -> Serving {
    let mut text = format!(
        "workers = 1\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [cluster]\nname = \"{cluster}\"\netcd = [\"{etcd_url}\"]\nreplica = \"{name}\"\n\
         state_file = \"{}\"\nlease_ttl = \"2s\"\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nplugin = \"round_robin\"\n{listener_keys}",
        dir.join(format!("{name}.json")).display()
    );
    for b in backends {
        text.push_str(&format!("[[listener.backend]]\naddress = \"{b}\"\n"));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("config");
    let mut cmd = lbwasm();
    cmd.args(["serve", "--config"]).arg(&path);
    cmd.stderr(Stdio::null());
    serving(cmd, 1, true).await
}

async fn admin_json(
    http: &HttpClient,
    r: &Serving,
    method: Method,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let admin = r.admin.expect("admin");
    let headers = [("content-type", "application/json")];
    let body = if method == Method::GET {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let reply = send(http, method, admin, path, &headers, body).await;
    let value = serde_json::from_slice(&reply.body).unwrap_or(Value::String(reply.text()));
    (reply.status, value)
}

/// The first listener's backends: address → draining.
async fn members(http: &HttpClient, r: &Serving) -> Vec<(String, bool)> {
    let (_, v) = admin_json(http, r, Method::GET, "/backends", Value::Null).await;
    let mut out: Vec<(String, bool)> = v["listeners"][0]["backends"]
        .as_array()
        .map(|bs| {
            bs.iter()
                .map(|b| {
                    (
                        b["address"].as_str().unwrap_or("").to_owned(),
                        b["draining"] == true,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

async fn has(http: &HttpClient, r: &Serving, addr: SocketAddr) -> bool {
    members(http, r)
        .await
        .iter()
        .any(|(a, _)| *a == addr.to_string())
}

async fn metrics(http: &HttpClient, r: &Serving) -> String {
    get(http, r.admin.expect("admin"), "/metrics").await.text()
}

/// `lbwasm_cluster_connected` as the replica reports it.
async fn connected(http: &HttpClient, r: &Serving) -> Option<bool> {
    let text = metrics(http, r).await;
    let line = text
        .lines()
        .find(|l| l.starts_with("lbwasm_cluster_connected{"))?;
    Some(line.ends_with(" 1"))
}

/// `GET /pick` for `n` keys: the backend each would go to.
async fn picks(http: &HttpClient, r: &Serving, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let (status, v) = admin_json(
            http,
            r,
            Method::GET,
            &format!("/pick?key=user-{k}"),
            Value::Null,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        out.push(v["backend"].as_str().unwrap_or("").to_owned());
    }
    out
}

/// `lbwasm cluster status`: its output and whether every replica is up to date.
async fn status(etcd_url: &str, cluster: &str) -> (String, bool) {
    let (url, name) = (etcd_url.to_owned(), cluster.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        lbwasm()
            .args(["cluster", "status", "--etcd", &url, "--cluster", &name])
            .output()
    })
    .await
    .expect("join")
    .expect("run lbwasm cluster status");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (text, out.status.success())
}

/// An admin `POST` that must succeed; its answer.
async fn post_ok(http: &HttpClient, r: &Serving, path: &str, body: Value) -> Value {
    let (status, v) = admin_json(http, r, Method::POST, path, body).await;
    assert_eq!(status, StatusCode::OK, "POST {path}: {v}");
    v
}

/// A selection body naming one backend.
fn pick_of(addr: SocketAddr) -> Value {
    json!({"addresses": [addr.to_string()]})
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_on_backends_plugins_and_refuse_conflicting_edits() {
    let Some(bin) = etcd::require("cluster convergence") else {
        return;
    };
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut etcd = Etcd::start(&bin, &dir.path().join("etcd")).await;
        let url = etcd.url();
        let bs = demo_backends(4).await;
        let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr()).collect();
        let http = client();
        let mut rs = Vec::new();
        // C's file hashes another header: the cluster's setting (seeded by A) wins.
        for (name, key) in [("a", "x-user"), ("b", "x-user"), ("c", "x-other")] {
            let keys = format!("hash_key = \"header:{key}\"\n");
            rs.push(replica_with(dir.path(), &url, "conv", name, &addrs[..2], &keys).await);
        }
        for r in &rs {
            eventually("every replica has the seeded pool", || async {
                members(&http, r).await.len() == 2
            })
            .await;
        }

        // An add on A reaches B and C through etcd; measured over 20 trials.
        let mut took = Vec::new();
        for trial in 0..20 {
            let started = Instant::now();
            let (s, v) = admin_json(
                &http,
                &rs[0],
                Method::POST,
                "/backends/add",
                pick_of(addrs[3]),
            )
            .await;
            assert_eq!(s, StatusCode::OK, "trial {trial}: {v}");
            assert!(
                has(&http, &rs[0], addrs[3]).await,
                "the writer applied its own write before answering"
            );
            loop {
                if has(&http, &rs[1], addrs[3]).await && has(&http, &rs[2], addrs[3]).await {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "trial {trial}: not propagated"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            took.push(started.elapsed());
            post_ok(&http, &rs[1], "/backends/remove", pick_of(addrs[3])).await;
            for r in &rs {
                eventually("the removal reached every replica", || async {
                    !has(&http, r, addrs[3]).await
                })
                .await;
            }
        }
        took.sort();
        eprintln!(
            "cluster propagation (add on A until B and C list it, 20 trials): p50 {:?}, p95 {:?}",
            percentile(&took, 0.5),
            percentile(&took, 0.95)
        );

        // Plugin swaps on B: every replica runs it, and /pick agrees on 1,000 keys.
        post_ok(&http, &rs[0], "/backends/add", pick_of(addrs[2])).await;
        for plugin in ["maglev", "consistent_hash"] {
            post_ok(&http, &rs[1], "/plugin", json!({"plugin": plugin})).await;
            for r in &rs {
                eventually("every replica runs the plugin and pool", || async {
                    let (_, v) = admin_json(&http, r, Method::GET, "/backends", Value::Null).await;
                    v["listeners"][0]["plugin"] == plugin && members(&http, r).await.len() == 3
                })
                .await;
            }
            let first = picks(&http, &rs[0], 1000).await;
            assert!(
                first.iter().collect::<std::collections::HashSet<_>>().len() == 3,
                "{plugin} uses all three backends"
            );
            for r in &rs[1..] {
                assert_eq!(
                    picks(&http, r, 1000).await,
                    first,
                    "{plugin}: replicas disagree"
                );
            }
        }
        // Requests hashed on the shared key land on the same backend through any replica.
        let mut backends_used = std::collections::HashSet::new();
        for k in 0..30 {
            let user = format!("user-{k}");
            let headers = [("x-user", user.as_str()), ("x-other", "same-for-all")];
            let mut seen = Vec::new();
            for r in &rs {
                let reply =
                    send(&http, Method::GET, r.listen[0], "/", &headers, Bytes::new()).await;
                assert_eq!(reply.status, StatusCode::OK);
                seen.push(reply.served_by());
            }
            assert!(seen.iter().all(|b| *b == seen[0]), "key {user}: {seen:?}");
            backends_used.insert(seen[0].clone());
        }
        assert!(
            backends_used.len() > 1,
            "every replica hashes x-user (varies), not x-other (constant)"
        );
        let (text, same) = status(&url, "conv").await;
        assert!(same, "{text}");
        assert!(
            text.contains("consistent_hash") && text.matches("up to date").count() == 3,
            "{text}"
        );

        // An uploaded component: its bytes go through etcd; every replica runs that digest.
        let wasm = dir.path().join("rr.wasm");
        let out = lbwasm()
            .args(["plugins", "export", "round_robin", "-o"])
            .arg(&wasm)
            .output()
            .expect("export");
        assert!(out.status.success());
        let bytes = std::fs::read(&wasm).expect("wasm");
        let headers = [("content-type", "application/wasm")];
        let reply = send(
            &http,
            Method::POST,
            rs[1].admin.unwrap(),
            "/plugin/upload?listener=web",
            &headers,
            bytes.into(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let last = until("every replica runs the uploaded digest", EVENTUALLY, || {
            let u = url.clone();
            async move {
                let (text, same) = status(&u, "conv").await;
                (same && text.contains("sha256:")).then_some(text)
            }
        })
        .await;
        assert_eq!(
            last.matches("sha256:").count(),
            4,
            "the store's plugin and three replicas': {last}"
        );

        // Two conflicting edits at once (etcd paused so both are in flight): one wins, the
        // other is a 409, and no replica diverges.
        etcd.signal(libc::SIGSTOP);
        let body = pick_of(addrs[2]);
        let drain = admin_json(&http, &rs[0], Method::POST, "/backends/drain", body.clone());
        let remove = admin_json(&http, &rs[2], Method::POST, "/backends/remove", body);
        let resume = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            etcd.signal(libc::SIGCONT);
        };
        let ((ds, dv), (rs_, rv), ()) = tokio::join!(drain, remove, resume);
        let mut statuses = [ds, rs_];
        statuses.sort();
        assert_eq!(
            statuses,
            [StatusCode::OK, StatusCode::CONFLICT],
            "drain {dv}, remove {rv}"
        );
        let loser = if ds == StatusCode::CONFLICT { &dv } else { &rv };
        assert!(loser.to_string().contains("another replica"), "{loser}");
        let removed = rs_ == StatusCode::OK;
        for r in &rs {
            eventually("every replica applied the winner", || async {
                let m = members(&http, r).await;
                let entry = m.iter().find(|(a, _)| *a == addrs[2].to_string());
                if removed {
                    entry.is_none()
                } else {
                    entry.is_some_and(|(_, d)| *d)
                }
            })
            .await;
        }
        // The refused write is counted on the replica that made it, and only there.
        let mut conflicts = 0;
        for r in &rs {
            let text = metrics(&http, r).await;
            let line = text
                .lines()
                .find(|l| l.starts_with("lbwasm_cluster_conflicts_total{"))
                .expect("conflicts counter");
            conflicts += line
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .expect("count");
        }
        assert_eq!(conflicts, 1, "one refused write in the cluster");
        drop(rs);
        etcd.kill();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_keep_serving_through_etcd_and_replica_failures() {
    let Some(bin) = etcd::require("cluster failures") else {
        return;
    };
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut etcd = Etcd::start(&bin, &dir.path().join("etcd")).await;
        let url = etcd.url();
        let bs = demo_backends(4).await;
        let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr()).collect();
        let http = client();
        let mut rs = Vec::new();
        for name in ["a", "b", "c"] {
            rs.push(replica(dir.path(), &url, "fail", name, &addrs[..2]).await);
        }
        post_ok(&http, &rs[0], "/backends/add", pick_of(addrs[2])).await;
        for r in &rs {
            eventually("the runtime add reached every replica", || async {
                has(&http, r, addrs[2]).await
            })
            .await;
            eventually("every replica sees three replicas", || async {
                let (_, v) = admin_json(&http, r, Method::GET, "/backends", Value::Null).await;
                v["cluster"]["replicas"]
                    .as_array()
                    .is_some_and(|a| a.len() == 3)
            })
            .await;
        }

        // etcd killed: 1,000 requests through the replicas, none failing; writes are 503s.
        etcd.kill();
        for r in &rs {
            eventually("the replica notices etcd is gone", || async {
                connected(&http, r).await == Some(false)
            })
            .await;
        }
        let mut failed = 0;
        for i in 0..1000 {
            let r = &rs[i % 3];
            match try_send(&http, Method::GET, r.listen[0], "/", &[], Bytes::new()).await {
                Ok(reply) if reply.status == StatusCode::OK => {}
                _ => failed += 1,
            }
        }
        assert_eq!(failed, 0, "requests failed while etcd was down");
        let (s, v) = admin_json(
            &http,
            &rs[1],
            Method::POST,
            "/backends/add",
            pick_of(addrs[3]),
        )
        .await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert!(v.to_string().contains("cluster store unavailable"), "{v}");

        // etcd back: every replica resyncs by itself, and writes work again.
        etcd.restart().await;
        for r in &rs {
            eventually("the replica reconnects", || async {
                connected(&http, r).await == Some(true)
            })
            .await;
        }
        post_ok(&http, &rs[1], "/backends/add", pick_of(addrs[3])).await;
        eventually("the add after the restart reaches C", || async {
            has(&http, &rs[2], addrs[3]).await
        })
        .await;

        // SIGSTOP B, change and compact, SIGCONT: B resyncs.
        common::process::signal(&rs[1].child, libc::SIGSTOP);
        post_ok(&http, &rs[0], "/backends/drain", pick_of(addrs[3])).await;
        post_ok(&http, &rs[0], "/backends/remove", pick_of(addrs[0])).await;
        etcd.compact(&http).await;
        common::process::signal(&rs[1].child, libc::SIGCONT);
        eventually(
            "the stopped replica caught up after the compaction",
            || async {
                let m = members(&http, &rs[1]).await;
                !m.iter().any(|(a, _)| *a == addrs[0].to_string())
                    && m.iter().any(|(a, d)| *a == addrs[3].to_string() && *d)
            },
        )
        .await;

        // SIGKILL C: its key goes when its lease (2 s) runs out.
        let c = rs.pop().expect("c");
        drop(c);
        eventually("the killed replica's key expired", || async {
            let (_, v) = admin_json(&http, &rs[0], Method::GET, "/backends", Value::Null).await;
            let names: Vec<&str> = v["cluster"]["replicas"]
                .as_array()
                .map(|a| a.iter().filter_map(|r| r["replica"].as_str()).collect())
                .unwrap_or_default();
            names.len() == 2 && !names.contains(&"c")
        })
        .await;

        // etcd wiped (a new, empty member on the same address): the replicas notice and
        // write back what they last applied; nothing half-applied is ever served.
        let expected = members(&http, &rs[0]).await;
        etcd.kill();
        std::fs::remove_dir_all(&etcd.dir).expect("wipe");
        etcd.restart().await;
        let last = until(
            "the wiped store got the configuration back",
            EVENTUALLY,
            || {
                let u = url.clone();
                async move {
                    let (text, same) = status(&u, "fail").await;
                    (same && text.contains("3 backends (1 draining)")).then_some(text)
                }
            },
        )
        .await;
        for r in &rs {
            assert_eq!(members(&http, r).await, expected, "{last}");
        }

        // A replica that starts while etcd is down serves the cluster's pool from the
        // snapshot it saved, not its file's two backends.
        etcd.kill();
        let c = replica(dir.path(), &url, "fail", "c", &addrs[..2]).await;
        assert_eq!(
            members(&http, &c).await,
            expected,
            "started from its snapshot"
        );
        let reply = get(&http, c.listen[0], "/").await;
        assert_eq!(reply.status, StatusCode::OK);
        drop(c);
        drop(rs);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_seed_writes_a_file_once_and_replicas_follow_the_store() {
    let Some(bin) = etcd::require("cluster seed") else {
        return;
    };
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let etcd = Etcd::start(&bin, &dir.path().join("etcd")).await;
        let url = etcd.url();
        let bs = demo_backends(3).await;
        let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr()).collect();
        let file = dir.path().join("seed.toml");
        std::fs::write(
            &file,
            format!(
                "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nplugin = \"maglev\"\n\
                 [listener.plugin_options]\ntable_size = 251\n\
                 [[listener.backend]]\naddress = \"{}\"\nweight = 2\n",
                addrs[0]
            ),
        )
        .expect("config");
        let seed = |file: std::path::PathBuf, url: String| {
            tokio::task::spawn_blocking(move || {
                lbwasm()
                    .args(["cluster", "seed", "--config"])
                    .arg(&file)
                    .args(["--etcd", &url, "--cluster", "seeded"])
                    .output()
                    .expect("run lbwasm cluster seed")
            })
        };
        let out = seed(file.clone(), url.clone()).await.expect("join");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("seeded cluster \"seeded\": web"),
            "{text}"
        );
        let out = seed(file.clone(), url.clone()).await.expect("join");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("already in the store, left as they are: web"),
            "{text}"
        );
        let (text, _) = status(&url, "seeded").await;
        assert!(
            text.contains("listener web: plugin maglev, 1 backends"),
            "{text}"
        );

        // A replica whose file names other backends and another plugin runs the store's.
        let r = replica(dir.path(), &url, "seeded", "r1", &addrs[1..]).await;
        let http = client();
        assert_eq!(members(&http, &r).await, [(addrs[0].to_string(), false)]);
        let (_, v) = admin_json(&http, &r, Method::GET, "/backends", Value::Null).await;
        assert_eq!(v["listeners"][0]["plugin"], "maglev", "{v}");
        assert_eq!(v["listeners"][0]["backends"][0]["weight"], 2, "{v}");
        let out = tokio::task::spawn_blocking(|| {
            lbwasm()
                .args([
                    "cluster",
                    "status",
                    "--etcd",
                    "http://127.0.0.1:1",
                    "--cluster",
                    "x",
                ])
                .output()
        })
        .await
        .expect("join")
        .expect("run");
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("etcd"),
            "{out:?}"
        );
        drop(r);
        drop(etcd);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_reach_etcd_over_mutual_tls() {
    let Some(bin) = etcd::require("cluster over TLS") else {
        return;
    };
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = common::tls::Pki::new("etcd test CA");
        let server = pki.leaf("etcd", &["127.0.0.1"], 1);
        let client_leaf = pki.leaf("lbwasm", &["lbwasm"], 2);
        let etcd = Etcd::start_tls(&bin, &dir.path().join("etcd"), &server.cert, &server.key, &pki.ca_pem).await;
        let url = etcd.url();
        assert!(url.starts_with("https://"));
        let bs = demo_backends(2).await;
        let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr()).collect();
        let tls_keys = |with_client: bool| {
            let mut keys = format!("ca = \"{}\"\n", pki.ca_pem.display());
            if with_client {
                keys += &format!("cert = \"{}\"\nkey = \"{}\"\n", client_leaf.cert.display(), client_leaf.key.display());
            }
            keys
        };
        // The [cluster] table takes the TLS keys; `replica_with` writes them after its own.
        let cluster_file = |name: &str, with_client: bool| {
            let path = dir.path().join(format!("{name}.toml"));
            let text = format!(
                "workers = 1\n[admin]\nlisten = \"127.0.0.1:0\"\n[cluster]\nname = \"tls\"\netcd = [\"{url}\"]\n\
                 replica = \"{name}\"\nstate_file = \"{}\"\n{}\
                 [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nplugin = \"round_robin\"\n\
                 [[listener.backend]]\naddress = \"{}\"\n",
                dir.path().join(format!("{name}.json")).display(),
                tls_keys(with_client),
                addrs[0]
            );
            std::fs::write(&path, text).expect("config");
            path
        };
        let start = |path: std::path::PathBuf| async move {
            let mut cmd = lbwasm();
            cmd.args(["serve", "--config"]).arg(&path);
            cmd.stderr(Stdio::null());
            serving(cmd, 1, true).await
        };
        let http = client();
        let good = start(cluster_file("good", true)).await;
        eventually("the replica connects over mutual TLS", || async { connected(&http, &good).await == Some(true) }).await;
        post_ok(&http, &good, "/backends/add", pick_of(addrs[1])).await;
        let path = cluster_file("status", true);
        let out = tokio::task::spawn_blocking(move || lbwasm().args(["cluster", "status", "--config"]).arg(&path).output())
            .await
            .expect("join")
            .expect("run");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("listener web: plugin round_robin, 2 backends"), "{text}");

        // Without a client certificate etcd refuses it: it serves its file, reports the
        // store unavailable, and refuses writes with a 503.
        let bad = start(cluster_file("bad", false)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(connected(&http, &bad).await, Some(false));
        assert_eq!(members(&http, &bad).await, [(addrs[0].to_string(), false)]);
        let (s, v) = admin_json(&http, &bad, Method::POST, "/backends/drain", pick_of(addrs[0])).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        drop((good, bad, etcd));
    })
    .await;
}
