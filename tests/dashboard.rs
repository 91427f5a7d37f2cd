//! The dashboard in a real browser: headless Chromium, driven over the WebDriver protocol by
//! `chromedriver`, against a real server with three demo backends under load — all on
//! 127.0.0.1. The WebDriver client is the few commands below, JSON over HTTP with the hyper
//! client the other tests use: no extra dependency (a crate like `fantoccini` would bring
//! its own HTTP and TLS stacks to build for five calls).
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium chromium-driver`;
//! `CHROMIUM` / `CHROMEDRIVER` override the paths). Without them the test is skipped, or
//! fails when `CI` is set. With `LBWASM_DASHBOARD_SCREENSHOT=<file.png>` it also lets the
//! charts fill for a while and saves a screenshot of the page under load (that is how
//! `docs/dashboard.png` is made).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::backends::closed_port;
use common::config::{listener, weight_1};
use common::http::{HttpClient, Reply, client, send, try_send};
use common::{until, within};
use hyper::Method;
use lbwasm::backend::{BackendConfig, spawn};
use serde_json::{Value, json};

/// Only there to turn a hang into a failure (the screenshot run waits a minute more).
const LIMIT: Duration = Duration::from_secs(240);
const USER_HEADER: &str = "x-user-id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let Some(browser) = browser_binaries() else {
        return;
    };
    within(LIMIT, scenario(browser)).await;
}

struct Binaries {
    chromium: PathBuf,
    chromedriver: PathBuf,
}

/// The browser and its driver, or `None` (skip) when they are missing outside CI.
fn browser_binaries() -> Option<Binaries> {
    let find = |var: &str, default: &str| {
        let path = std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from);
        path.is_file().then_some(path)
    };
    match (
        find("CHROMIUM", "/usr/bin/chromium"),
        find("CHROMEDRIVER", "/usr/bin/chromedriver"),
    ) {
        (Some(chromium), Some(chromedriver)) => Some(Binaries {
            chromium,
            chromedriver,
        }),
        _ if std::env::var_os("CI").is_some() => {
            panic!("no chromium/chromedriver: install chromium chromium-driver (apt)")
        }
        _ => {
            eprintln!(
                "SKIPPED dashboard test: chromium or chromedriver not found \
                 (install chromium chromium-driver (apt), or set CHROMIUM / CHROMEDRIVER)"
            );
            None
        }
    }
}

async fn scenario(bin: Binaries) {
    lbwasm::install_builtins();
    let client = client();
    let http = &client;

    // Three backends of different speeds, a proxy balancing them round-robin.
    let mut backends = Vec::new();
    for (id, latency_ms) in [("b1", 2), ("b2", 6), ("b3", 12)] {
        let mut cfg = BackendConfig::new(0);
        cfg.id = Some(id.to_string());
        cfg.latency = Duration::from_millis(latency_ms);
        backends.push(spawn(cfg).await.expect("starting a backend"));
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    // The admin address is chosen here, so that a restarted proxy has the same one.
    let config_text = |admin: SocketAddr| {
        let keys = format!("hash_key = \"header:{USER_HEADER}\"");
        let web = listener(
            "web",
            "round_robin",
            &weight_1(addrs.iter().copied()),
            &keys,
            "",
        );
        format!("workers = 2\n[admin]\nlisten = \"{admin}\"\n\n{web}")
    };
    let config =
        lbwasm::config::parse_str(&config_text(closed_port()), Path::new("dashboard.toml"))
            .expect("config");
    let server = tokio::task::spawn_blocking(move || lbwasm::admin::start(config))
        .await
        .expect("start task")
        .expect("starting the proxy");
    let listen = server.listen_addrs()[0];
    let admin = server.admin_addr().expect("admin address");
    let id_of = |addr: &str| -> String {
        backends
            .iter()
            .find(|b| b.addr().to_string() == addr)
            .map(|b| b.id().to_string())
            .unwrap_or_else(|| panic!("{addr} is not one of the test backends"))
    };

    let load = Load::start(http, listen, 2);

    let browser = Browser::start(&bin).await;
    let page = &browser.session;
    page.goto(&format!("http://{admin}/")).await;

    // The three backends are listed, and the connection is live.
    let rows = until(
        "the page lists 3 backends",
        Duration::from_secs(20),
        || async move {
            let rows = table(page).await;
            (rows.len() == 3).then_some(rows)
        },
    )
    .await;
    let listed: BTreeSet<String> = rows.iter().map(|r| r.address.clone()).collect();
    let started: BTreeSet<String> = backends.iter().map(|b| b.addr().to_string()).collect();
    assert_eq!(listed, started);
    let conn = page.find("#conn").await.expect("#conn");
    let conn = conn.as_str();
    until(
        "the page says live",
        Duration::from_secs(10),
        || async move { (page.text(conn).await == "live").then_some(()) },
    )
    .await;

    // Live figures: requests/s are shown, and the cells move under load.
    until(
        "req/s figures under load",
        Duration::from_secs(15),
        || async move {
            let rows = table(page).await;
            rows.iter()
                .all(|r| r.rps.parse::<f64>().is_ok_and(|v| v > 0.0))
                .then_some(())
        },
    )
    .await;
    let first = table(page).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = table(page).await;
    let figures = |rows: &[Row]| -> Vec<(String, String, String)> {
        rows.iter()
            .map(|r| (r.address.clone(), r.in_flight.clone(), r.requests.clone()))
            .collect()
    };
    assert_ne!(
        figures(&first),
        figures(&second),
        "in-flight/requests cells never changed"
    );
    for (a, b) in first.iter().zip(&second) {
        assert_ne!(
            a.requests, b.requests,
            "requests of {} did not move",
            a.address
        );
    }

    // Round-robin spreads one user's requests...
    let before: BTreeSet<String> = user_requests(http, listen, "alice", 30)
        .await
        .into_iter()
        .collect();
    assert!(
        before.len() >= 2,
        "round_robin sent alice to {before:?} only"
    );

    if std::env::var_os("LBWASM_DASHBOARD_SCREENSHOT").is_some() {
        tokio::time::sleep(Duration::from_secs(40)).await;
    }

    // ...then the page switches the plugin to maglev (select, click) ...
    let select = page.find("#plugin-select").await.expect("plugin select");
    page.click(&select).await;
    let option = page
        .find("#plugin-select option[value=\"maglev\"]")
        .await
        .expect("maglev among the built-ins");
    page.click(&option).await;
    page.click(&page.find("#plugin-switch").await.expect("switch button"))
        .await;
    let notice = page.find("#notice").await.expect("#notice");
    let notice = notice.as_str();
    until(
        "the page confirms the switch",
        Duration::from_secs(20),
        || async move {
            let text = page.text(notice).await;
            text.contains("round_robin → maglev").then_some(())
        },
    )
    .await;
    let name = page.find("#plugin-name").await.expect("#plugin-name");
    let name = name.as_str();
    until(
        "the page shows maglev",
        Duration::from_secs(5),
        || async move { (page.text(name).await == "maglev").then_some(()) },
    )
    .await;
    // The description comes once per plugin (the stream's `facts` event), not per snapshot.
    let desc = page.find("#plugin-desc").await.expect("#plugin-desc");
    let desc = desc.as_str();
    until(
        "the page describes maglev",
        Duration::from_secs(5),
        || async move { page.text(desc).await.contains("Maglev").then_some(()) },
    )
    .await;

    // ... which the admin API reports, picks by, and the traffic follows.
    let report = get_json(http, admin, "/backends").await;
    assert_eq!(report["listeners"][0]["plugin"], "maglev");
    let pick = get_json(http, admin, "/pick?listener=web&key=alice").await;
    assert_eq!(pick["plugin"], "maglev");
    let alice_addr = pick["backend"].as_str().expect("pick backend").to_string();
    let alice_addr = alice_addr.as_str();
    let again = get_json(http, admin, "/pick?listener=web&key=alice").await;
    assert_eq!(again["backend"], alice_addr, "maglev picks are stable");
    let after: BTreeSet<String> = user_requests(http, listen, "alice", 30)
        .await
        .into_iter()
        .collect();
    assert_eq!(
        after,
        BTreeSet::from([id_of(alice_addr)]),
        "maglev keeps alice on one backend"
    );

    if let Some(path) = std::env::var_os("LBWASM_DASHBOARD_SCREENSHOT") {
        tokio::time::sleep(Duration::from_secs(25)).await;
        let png = page.screenshot().await;
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        std::fs::write(&path, png).expect("writing the screenshot");
        eprintln!("screenshot saved to {}", PathBuf::from(path).display());
    }

    // Removing alice's backend from the page takes it out of the pool.
    let remove = page
        .find(&format!(
            "tr[data-address=\"{alice_addr}\"] button[data-act=\"remove\"]"
        ))
        .await
        .expect("remove button");
    page.click(&remove).await; // arms
    page.click(&remove).await; // confirms
    until(
        "the removed backend leaves the pool",
        Duration::from_secs(10),
        || async move {
            let report = get_json(http, admin, "/backends").await;
            let gone = report["listeners"][0]["backends"]
                .as_array()
                .is_some_and(|list| {
                    list.len() == 2 && list.iter().all(|b| b["address"] != alice_addr)
                });
            gone.then_some(())
        },
    )
    .await;
    let removed_at = Instant::now();
    until(
        "the page drops the removed row",
        Duration::from_secs(10),
        || async move {
            let rows = table(page).await;
            (rows.len() == 2 && rows.iter().all(|r| r.address != alice_addr)).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let removed_id = id_of(alice_addr);
    let served_since = load.served_since(removed_at);
    let total: usize = served_since.values().sum();
    assert!(total > 10, "the clients kept going: {total} requests");
    assert!(
        !served_since.contains_key(&removed_id),
        "{removed_id} still served {served_since:?} after its removal"
    );
    let moved: BTreeSet<String> = user_requests(http, listen, "alice", 10)
        .await
        .into_iter()
        .collect();
    assert_eq!(moved.len(), 1);
    assert!(!moved.contains(&removed_id));

    // The plugin panel counts the calls.
    let calls = page
        .find("#plugin-stats dd[data-stat=\"calls\"]")
        .await
        .expect("calls");
    let calls: u64 = page
        .text(&calls)
        .await
        .replace(',', "")
        .parse()
        .expect("calls is a number");
    assert!(calls > 0);

    load.stop().await;

    // A hundred backends: the table keeps up (rows are updated in place, not rebuilt).
    // Bound together (so all different), then closed: connections are refused.
    let sockets: Vec<TcpListener> = (0..98)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    let more: Vec<String> = sockets
        .iter()
        .map(|s| s.local_addr().expect("address").to_string())
        .collect();
    drop(sockets);
    let add = json!({"listener": "web", "addresses": more});
    post_json(http, admin, "/backends/add", &add).await;
    until(
        "the page lists 100 backends",
        Duration::from_secs(15),
        || async move { (table(page).await.len() == 100).then_some(()) },
    )
    .await;
    // The same row elements carry on through later snapshots (keyed updates)...
    page.script("document.querySelectorAll('#backends tbody tr').forEach(tr => { tr.probe = 1; })")
        .await;
    let updated = page.find("#updated").await.expect("#updated");
    let updated = updated.as_str();
    let before = page.text(updated).await;
    until("two more snapshots", Duration::from_secs(10), || {
        let before = before.clone();
        async move { (page.text(updated).await != before).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let kept = page
        .script("return [...document.querySelectorAll('#backends tbody tr')].filter(tr => tr.probe === 1).length")
        .await;
    assert_eq!(kept, 100, "rows were rebuilt instead of updated");
    // ...and a render (table and both charts) is cheap: the best of ten, so that a busy
    // machine does not make it fail.
    let render_ms = page
        .script(
            "let best = Infinity;
             for (let i = 0; i < 10; i++) {
               const t = performance.now();
               render();
               best = Math.min(best, performance.now() - t);
             }
             return best;",
        )
        .await
        .as_f64()
        .expect("a duration");
    assert!(
        render_ms < 50.0,
        "a render of 100 backends took {render_ms:.1} ms"
    );

    // The balancer goes away: the page says so, and comes back by itself with it.
    server.shutdown(Duration::from_secs(2)).await;
    until(
        "the page shows it is reconnecting",
        Duration::from_secs(15),
        || async move { (page.text(conn).await == "reconnecting…").then_some(()) },
    )
    .await;
    let config = lbwasm::config::parse_str(&config_text(admin), Path::new("dashboard.toml"))
        .expect("config");
    let server = tokio::task::spawn_blocking(move || lbwasm::admin::start(config))
        .await
        .expect("start task")
        .expect("restarting the proxy on the same admin address");
    until(
        "the page is live again",
        Duration::from_secs(20),
        || async move {
            (page.text(conn).await == "live" && table(page).await.len() == 3).then_some(())
        },
    )
    .await;

    browser.quit().await;
    server.shutdown(Duration::from_secs(2)).await;
    for b in &backends {
        b.shutdown().await;
    }
}

/// An admin API call that must succeed; its JSON answer.
async fn admin_json(
    http: &HttpClient,
    method: Method,
    admin: SocketAddr,
    path: &str,
    body: Option<&Value>,
) -> Value {
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let headers = [("content-type", "application/json")];
    let r = send(http, method.clone(), admin, path, &headers, body).await;
    assert!(
        r.status.is_success(),
        "{method} {path}: {} {}",
        r.status,
        r.text()
    );
    serde_json::from_slice(&r.body).expect("admin JSON")
}

async fn post_json(http: &HttpClient, admin: SocketAddr, path: &str, body: &Value) -> Value {
    admin_json(http, Method::POST, admin, path, Some(body)).await
}

// ---- the page's table -----------------------------------------------------------------------

#[derive(Debug)]
struct Row {
    address: String,
    in_flight: String,
    requests: String,
    rps: String,
}

async fn table(page: &Session) -> Vec<Row> {
    let rows = page
        .script(
            "return [...document.querySelectorAll('#backends tbody tr')].map(tr => {
               const cell = c => tr.querySelector(`[data-col=${c}]`).textContent;
               return [tr.dataset.address, cell('in_flight'), cell('requests'), cell('rps')];
             });",
        )
        .await;
    rows.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            let s = |i: usize| r[i].as_str().expect("cell text").to_string();
            Row {
                address: s(0),
                in_flight: s(1),
                requests: s(2).replace(',', ""),
                rps: s(3),
            }
        })
        .collect()
}

// ---- load -----------------------------------------------------------------------------------

/// Client tasks sending requests in a loop, each remembering who served what when.
struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<Mutex<Vec<(Instant, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(http: &HttpClient, addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|c| {
                let (http, stop, served) = (http.clone(), stop.clone(), served.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let started = Instant::now();
                        match request(&http, addr, &format!("user-{c}-{}", i % 40)).await {
                            Some(by) => served.lock().unwrap().push((started, by)),
                            None => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            served,
            tasks,
        }
    }

    /// Requests started at or after `t`, by backend id.
    fn served_since(&self, t: Instant) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (at, by) in self.served.lock().unwrap().iter() {
            if *at >= t {
                *out.entry(by.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("client task");
        }
    }
}

/// One request through the proxy as `user`; the backend id that served it.
async fn request(http: &HttpClient, addr: SocketAddr, user: &str) -> Option<String> {
    let headers = [(USER_HEADER, user)];
    let r: Reply = try_send(http, Method::GET, addr, "/work", &headers, Bytes::new())
        .await
        .ok()?;
    let by = r.headers.get("x-served-by")?.to_str().ok()?.to_string();
    r.status.is_success().then_some(by)
}

async fn user_requests(http: &HttpClient, addr: SocketAddr, user: &str, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            request(http, addr, user)
                .await
                .expect("a request through the proxy"),
        );
    }
    out
}

async fn get_json(http: &HttpClient, admin: SocketAddr, path: &str) -> Value {
    admin_json(http, Method::GET, admin, path, None).await
}

// ---- the browser ----------------------------------------------------------------------------

/// chromedriver, the Chromium it starts, and the WebDriver session.
struct Browser {
    session: Session,
    _processes: Processes,
}

/// Kills chromedriver and every Chromium process by PID when dropped — also on a panic.
struct Processes {
    driver: Child,
    profile: tempfile::TempDir,
}

impl Drop for Processes {
    fn drop(&mut self) {
        // Chromium's processes first (they would be re-parented once the driver is gone):
        // the driver's descendants, and anything still using our private profile.
        let mut pids = descendants(self.driver.id());
        pids.extend(using_profile(self.profile.path()));
        for pid in pids {
            // SAFETY: kill(2) on a PID we just found; no memory is involved.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    async fn start(bin: &Binaries) -> Browser {
        let driver_addr = closed_port();
        let profile = tempfile::tempdir().expect("profile directory");
        let driver = Command::new(&bin.chromedriver)
            .arg(format!("--port={}", driver_addr.port()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let processes = Processes { driver, profile };
        let wd = WebDriver {
            http: client(),
            addr: driver_addr,
        };
        let driver = &wd;
        until(
            "chromedriver is ready",
            Duration::from_secs(20),
            || async move {
                let status = driver.call(Method::GET, "/status", None).await.ok()?;
                (status["ready"] == true).then_some(())
            },
        )
        .await;
        let args = [
            "--headless".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--disable-dev-shm-usage".to_string(),
            "--disable-background-networking".to_string(),
            "--disable-component-update".to_string(),
            "--disable-sync".to_string(),
            "--no-first-run".to_string(),
            "--window-size=1440,1000".to_string(),
            format!("--user-data-dir={}", processes.profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": bin.chromium, "args": args},
        }}});
        let created = wd
            .call(Method::POST, "/session", Some(caps))
            .await
            .unwrap_or_else(|e| panic!("creating a WebDriver session: {e}"));
        let id = created["sessionId"]
            .as_str()
            .expect("session id")
            .to_string();
        Browser {
            session: Session { wd, id },
            _processes: processes,
        }
    }

    /// Ends the session (Chromium exits); the guard kills whatever is left.
    async fn quit(self) {
        let _ = self
            .session
            .wd
            .call(
                Method::DELETE,
                &format!("/session/{}", self.session.id),
                None,
            )
            .await;
    }
}

/// The processes below `root`, from `/proc`.
fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = processes()
        .filter_map(|(pid, dir)| {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == p)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// Processes whose command line names `profile` (Chromium helpers that daemonised).
fn using_profile(profile: &Path) -> Vec<u32> {
    let needle = profile.to_string_lossy().into_owned();
    processes()
        .filter(|(_, dir)| {
            std::fs::read(dir.join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle.as_str()))
        })
        .map(|(pid, _)| pid)
        .collect()
}

fn processes() -> impl Iterator<Item = (u32, PathBuf)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
}

// ---- a WebDriver client: the handful of commands the test needs ----------------------------

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct WebDriver {
    http: HttpClient,
    addr: SocketAddr,
}

impl WebDriver {
    /// One command; its `value`, or the WebDriver error.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let headers = [("content-type", "application/json; charset=utf-8")];
        let r = try_send(&self.http, method.clone(), self.addr, path, &headers, body)
            .await
            .map_err(|e| e.to_string())?;
        let v: Value =
            serde_json::from_slice(&r.body).map_err(|e| format!("{method} {path}: {e}"))?;
        if r.status.is_success() {
            Ok(v["value"].clone())
        } else {
            Err(format!(
                "{method} {path}: {} {} {}",
                r.status, v["value"]["error"], v["value"]["message"]
            ))
        }
    }
}

struct Session {
    wd: WebDriver,
    id: String,
}

impl Session {
    async fn cmd(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.wd
            .call(method, &format!("/session/{}{path}", self.id), body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver: {e}"))
    }

    async fn goto(&self, url: &str) {
        self.cmd(Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// The first element matching `css`, if any.
    async fn find(&self, css: &str) -> Option<String> {
        let body = json!({"using": "css selector", "value": css});
        let path = format!("/session/{}/element", self.id);
        match self.wd.call(Method::POST, &path, Some(body)).await {
            Ok(v) => Some(v[ELEMENT].as_str()?.to_string()),
            Err(e) if e.contains("no such element") => None,
            Err(e) => panic!("WebDriver: {e}"),
        }
    }

    async fn click(&self, element: &str) {
        self.cmd(
            Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn text(&self, element: &str) -> String {
        let v = self
            .cmd(Method::GET, &format!("/element/{element}/text"), None)
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    async fn script(&self, js: &str) -> Value {
        self.cmd(
            Method::POST,
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
        .await
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd(Method::GET, "/screenshot", None).await;
        base64_decode(v.as_str().expect("screenshot data"))
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    let text: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("screenshot data is base64")
}
