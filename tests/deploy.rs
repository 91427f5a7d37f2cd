//! Deployment (issue 16): `lbwasm serve --check`, and the Kubernetes manifests in
//! deploy/kubernetes/.
//!
//! `--check` runs the real binary: a good configuration (built-in and `.wasm` plugins,
//! TLS) is accepted, a bad one refused with the same `file:line: key` error `serve` gives,
//! and a configuration whose ports are taken still checks (nothing is bound).
//!
//! No cluster is available here, so the manifests are checked as text: every YAML
//! document is parsed, and what must agree across files is compared — the Deployment's
//! ports and the ConfigMap's listen addresses, the probes and the admin endpoint, the
//! Services and the ports they target, the `dns://` backend and its headless Service, the
//! `--etcd` URL and the etcd StatefulSet, the Secrets and ConfigMaps volumes name, the
//! termination grace and lbwasm's drain. Last, the Deployment's own command line, with the
//! ConfigMap's file, goes through `lbwasm serve --check`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::process::{Reaped, lbwasm};
use common::tls::Pki;
use serde::Deserialize as _;
use serde_json::Value;

/// The manifests' folder.
const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes");

/// Where the Deployment mounts the ConfigMap's file (its `--config`).
const CONFIG_PATH: &str = "/etc/lbwasm/lbwasm.toml";

/// Secrets the manifests use but do not define: the README beside them says how to create
/// each, under this heading.
const USER_CREATED: &[&str] = &["lbwasm-admin-tls", "lbwasm-admin-token"];
const USER_CREATED_HEADING: &str = "## Secrets you create";

/// Longest a `--check` may take: it compiles a plugin or two, it serves nothing.
const CHECK_LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// `lbwasm serve --check`
// ---------------------------------------------------------------------------------------

/// Runs `cmd` to its end within [`CHECK_LIMIT`] (killed by its PID past it, or if the
/// test fails meanwhile); its output.
fn run(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lbwasm");
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let mut child = Reaped(child);
    let deadline = Instant::now() + CHECK_LIMIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "lbwasm ran past {CHECK_LIMIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout"),
        stderr: stderr.join().expect("stderr"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `lbwasm serve --check --config FILE` with `extra` flags.
fn check(config: &Path, extra: &[&str]) -> Output {
    let mut cmd = lbwasm();
    cmd.args(["serve", "--check", "--config"])
        .arg(config)
        .args(extra)
        .env_remove("LBWASM_ADMIN_TOKEN");
    run(cmd)
}

/// A path as a TOML string.
fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A listening socket the checked configurations name as their backend: a check contacts
/// no backend, and a connection to it (a health check, say) would show in [`untouched`].
fn unused_backend() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let addr = l.local_addr().expect("addr").to_string();
    (l, addr)
}

/// No connection arrived at `l` (non-blocking).
fn untouched(l: &TcpListener) -> bool {
    matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn check_accepts_a_good_configuration_and_loads_every_plugin() {
    let pki = Pki::new("deploy test CA");
    let leaf = pki.leaf("server", &["lbwasm.test", "127.0.0.1"], 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let (backend, addr) = unused_backend();
    // A plugin as a file, as `--plugin FILE.wasm` or `plugin = "x.wasm"` names one.
    let wasm = dir.path().join("rr.wasm");
    std::fs::copy(lbwasm_fixtures::wasm("round_robin"), &wasm).expect("copy plugin");
    let cert = toml_path(&leaf.cert);
    let key = toml_path(&leaf.key);
    let config = dir.path().join("lbwasm.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n[admin.tls]\ncert = {cert}\nkey = {key}\n\n\
             [[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nplugin = \"least_connections\"\n\
             [listener.tls]\ncert = {cert}\nkey = {key}\n\
             [listener.health]\npath = \"/heartbeat\"\ninterval = \"100ms\"\n\
             [[listener.backend]]\naddress = \"{addr}\"\n\n\
             [[listener]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\nplugin = \"rr.wasm\"\n\
             [[listener.backend]]\naddress = \"{addr}\"\n"
        ),
    )
    .expect("write config");

    let out = check(&config, &[]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}\n{stdout}\n{}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(stdout.trim(), "lbwasm: configuration OK (2 listeners)");
    assert!(untouched(&backend), "a check contacted a backend");

    // Flags are checked with the file, as `serve` takes them.
    let out = check(&config, &["--plugin", "maglev"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("configuration OK (2 listeners)"));
}

#[test]
fn check_refuses_what_serve_refuses_with_the_same_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_backend, addr) = unused_backend();
    let write = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).expect("write config");
        path
    };
    let listener = |extra: &str| {
        format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\nplugin = \"round_robin\"\n{extra}\
             [[listener.backend]]\naddress = \"{addr}\"\n"
        )
    };
    let cases = [
        // A misspelt key: file, line and key path.
        (
            write("key.toml", &listener("retries = 3\n")),
            "key.toml:4: listener[0].retries: unknown key".to_owned(),
        ),
        // A certificate that is not there: certificates are read by the check.
        (
            write(
                "cert.toml",
                &listener("[listener.tls]\ncert = \"no.pem\"\nkey = \"no.key\"\n"),
            ),
            "cert.toml:5: listener[0].tls.cert".to_owned(),
        ),
        // An option the plugin itself refuses: only loading the plugin finds it.
        (
            write(
                "option.toml",
                &listener("[listener.plugin_options]\nbogus = 1\n"),
            ),
            "bogus".to_owned(),
        ),
        // A plugin file that is not there.
        (
            write(
                "file.toml",
                &listener("").replace("round_robin", "missing.wasm"),
            ),
            "missing.wasm".to_owned(),
        ),
    ];
    for (config, expected) in &cases {
        let out = check(config, &[]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{config:?} accepted: {stderr}");
        assert!(
            stderr.contains(expected.as_str()),
            "{config:?}: {expected:?} not in {stderr}"
        );
        assert!(
            !text(&out.stdout).contains("configuration OK"),
            "{config:?}"
        );

        // `serve` itself says the same: the check is its start-up, not a second opinion.
        let mut cmd = lbwasm();
        cmd.args(["serve", "--config"]).arg(config);
        let served = run(cmd);
        assert!(!served.status.success(), "{config:?} served");
        assert!(
            text(&served.stderr).contains(expected.as_str()),
            "{config:?}: serve said {}",
            text(&served.stderr)
        );
    }
}

#[test]
fn check_binds_nothing_so_a_taken_port_still_checks() {
    // The listener's and the admin endpoint's ports, held here for the whole test.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_admin = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let admin_port = taken_admin.local_addr().expect("addr").port();
    let (backend, addr) = unused_backend();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("lbwasm.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n\
             [[listener]]\nlisten = \"127.0.0.1:{port}\"\nplugin = \"round_robin\"\n\
             [listener.health]\npath = \"/\"\ninterval = \"100ms\"\n\
             [[listener.backend]]\naddress = \"{addr}\"\n"
        ),
    )
    .expect("write config");

    let out = check(&config, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "lbwasm: configuration OK (1 listener)"
    );
    assert!(untouched(&backend), "a check contacted a backend");

    // The port really is taken: `serve` with the same file cannot start.
    let mut cmd = lbwasm();
    cmd.args(["serve", "--config"]).arg(&config);
    let served = run(cmd);
    let stderr = text(&served.stderr);
    assert!(!served.status.success(), "serve started: {stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    drop((taken, taken_admin));
}

// ---------------------------------------------------------------------------------------
// The manifests
// ---------------------------------------------------------------------------------------

/// One YAML document of a manifest file.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// Every document of every `.yaml` file under deploy/kubernetes/, in file order.
fn manifests() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(MANIFESTS)
        .expect("deploy/kubernetes/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read manifest");
        let file = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{file}: document {i} is not YAML: {e}"));
            // A document of comments only (before the first `---`) is nothing.
            if !value.is_null() {
                docs.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    docs
}

/// The one document of `kind` named `name`.
fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "{kind} {name}: expected exactly one");
    &found[0].value
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{pointer}: no string in {v}"))
}

fn arr<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{pointer}: no list"))
}

/// The only container of a workload's pod template.
fn container(workload: &Value) -> &Value {
    let containers = arr(workload, "/spec/template/spec/containers");
    assert_eq!(containers.len(), 1, "one container per pod");
    &containers[0]
}

/// A container's ports by name.
fn named_ports(c: &Value) -> BTreeMap<String, u16> {
    arr(c, "/ports")
        .iter()
        .map(|p| {
            (
                str_at(p, "/name").to_owned(),
                port_number(&p["containerPort"]),
            )
        })
        .collect()
}

fn port_number(v: &Value) -> u16 {
    v.as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .unwrap_or_else(|| panic!("not a port number: {v}"))
}

/// A Service's `targetPort` or a probe's `port` (a number, or a name of `c`'s ports) as a
/// number.
fn resolve_port(c: &Value, port: &Value) -> u16 {
    match port.as_str() {
        Some(name) => *named_ports(c)
            .get(name)
            .unwrap_or_else(|| panic!("no container port named {name}")),
        None => port_number(port),
    }
}

/// The port of `HOST:PORT` (or of a URL ending so).
fn port_of(addr: &str) -> u16 {
    let (_, port) = addr.trim_end_matches('/').rsplit_once(':').expect("a port");
    port.parse().expect("a port number")
}

/// The ConfigMap's `lbwasm.toml`: its text and its parsed form.
fn lbwasm_toml(docs: &[Doc]) -> (String, toml::Table) {
    let cm = find(docs, "ConfigMap", "lbwasm-config");
    let text = str_at(cm, "/data/lbwasm.toml").to_owned();
    let table = text.parse::<toml::Table>().expect("lbwasm.toml is TOML");
    (text, table)
}

fn toml_str<'a>(t: &'a toml::Table, path: &[&str]) -> &'a str {
    let mut v = t.get(path[0]);
    for key in &path[1..] {
        v = v.and_then(|v| v.get(key));
    }
    v.and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("lbwasm.toml: no {}", path.join(".")))
}

fn listeners(t: &toml::Table) -> &[toml::Value] {
    t["listener"].as_array().expect("[[listener]]")
}

/// The value following `flag` in `args`.
fn flag_value<'a>(args: &'a [Value], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a.as_str() == Some(flag))
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1].as_str().expect("a string argument")
}

/// Whether `selector` (a `matchLabels` map) selects pods labelled `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("selector labels");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_labels(workload: &Value) -> &Value {
    &workload["spec"]["template"]["metadata"]["labels"]
}

#[test]
fn every_document_is_a_named_resource() {
    let docs = manifests();
    let mut seen = BTreeSet::new();
    for d in &docs {
        for key in ["/apiVersion", "/kind", "/metadata/name"] {
            let v = d.value.pointer(key).and_then(Value::as_str);
            assert!(
                v.is_some_and(|v| !v.is_empty()),
                "{}: a {} without {key}",
                d.file,
                d.kind()
            );
        }
        assert!(
            seen.insert((d.kind().to_owned(), d.name().to_owned())),
            "{}: {} {} twice",
            d.file,
            d.kind(),
            d.name()
        );
    }
    let expected: BTreeSet<(String, String)> = [
        ("ConfigMap", "lbwasm-config"),
        ("Deployment", "lbwasm"),
        ("Service", "lbwasm"),
        ("PodDisruptionBudget", "lbwasm"),
        ("Service", "web"),
        ("Deployment", "web"),
        ("Service", "etcd"),
        ("StatefulSet", "etcd"),
        ("PodDisruptionBudget", "etcd"),
        ("NetworkPolicy", "etcd"),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), n.to_string()))
    .collect();
    assert_eq!(seen, expected);
    assert_eq!(docs.len(), 10);
}

#[test]
fn the_containers_ports_are_the_configs_listen_ports() {
    let docs = manifests();
    let (_, toml) = lbwasm_toml(&docs);
    let c = container(find(&docs, "Deployment", "lbwasm"));
    let ports = named_ports(c);

    let listen: Vec<u16> = listeners(&toml)
        .iter()
        .map(|l| port_of(l["listen"].as_str().expect("listen")))
        .collect();
    let admin = port_of(toml_str(&toml, &["admin", "listen"]));
    assert_eq!(listen, [8080]);
    assert_eq!(admin, 9900);
    let mut expected: BTreeSet<u16> = listen.iter().copied().collect();
    expected.insert(admin);
    let declared: BTreeSet<u16> = ports.values().copied().collect();
    assert_eq!(declared, expected, "containerPorts vs lbwasm.toml");
    assert_eq!(ports["http"], listen[0]);
    assert_eq!(ports["admin"], admin);
}

#[test]
fn the_probes_ask_the_admin_endpoint_for_healthz_over_https() {
    let docs = manifests();
    let (_, toml) = lbwasm_toml(&docs);
    let admin = port_of(toml_str(&toml, &["admin", "listen"]));
    // HTTPS because the admin endpoint is off loopback, where lbwasm requires TLS.
    assert_eq!(toml["admin"]["allow_remote"].as_bool(), Some(true));
    assert!(toml["admin"].get("tls").is_some(), "[admin.tls]");

    let c = container(find(&docs, "Deployment", "lbwasm"));
    let mut probes = 0;
    for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let Some(probe) = c.get(kind) else { continue };
        probes += 1;
        let get = &probe["httpGet"];
        assert_eq!(str_at(get, "/path"), "/healthz", "{kind}");
        assert_eq!(str_at(get, "/scheme"), "HTTPS", "{kind}");
        assert_eq!(resolve_port(c, &get["port"]), admin, "{kind}");
    }
    assert!(c.get("readinessProbe").is_some() && c.get("livenessProbe").is_some());
    assert_eq!(probes, 3);
}

#[test]
fn the_service_sends_to_the_listener() {
    let docs = manifests();
    let (_, toml) = lbwasm_toml(&docs);
    let deployment = find(&docs, "Deployment", "lbwasm");
    let c = container(deployment);
    let svc = find(&docs, "Service", "lbwasm");
    assert!(selects(&svc["spec"]["selector"], pod_labels(deployment)));
    let ports = arr(svc, "/spec/ports");
    assert_eq!(ports.len(), 1);
    let listen = port_of(listeners(&toml)[0]["listen"].as_str().expect("listen"));
    assert_eq!(resolve_port(c, &ports[0]["targetPort"]), listen);
}

#[test]
fn the_backends_headless_service_is_the_dns_address() {
    let docs = manifests();
    let (_, toml) = lbwasm_toml(&docs);
    let backends = listeners(&toml)[0]["backend"].as_array().expect("backends");
    assert_eq!(backends.len(), 1);
    let address = backends[0]["address"].as_str().expect("address");
    let rest = address.strip_prefix("dns://").expect("a dns:// backend");
    let (name, port) = rest.rsplit_once(':').expect("NAME:PORT");
    let port: u16 = port.parse().expect("port");
    // SERVICE.NAMESPACE.svc.cluster.local; the manifests name no namespace: `default`.
    let labels: Vec<&str> = name.split('.').collect();
    assert_eq!(
        labels[1..],
        ["default", "svc", "cluster", "local"],
        "{name}"
    );
    for d in &docs {
        assert!(
            d.value["metadata"].get("namespace").is_none(),
            "{}: a namespace",
            d.file
        );
    }

    let svc = find(&docs, "Service", labels[0]);
    assert_eq!(str_at(svc, "/spec/clusterIP"), "None", "headless");
    let svc_ports = arr(svc, "/spec/ports");
    let svc_port = svc_ports
        .iter()
        .find(|p| port_number(&p["port"]) == port)
        .unwrap_or_else(|| panic!("{} has no port {port}", labels[0]));

    // The pods it selects listen there: `lbwasm backend --port` and the containerPort.
    let web = find(&docs, "Deployment", labels[0]);
    assert!(selects(&svc["spec"]["selector"], pod_labels(web)));
    let c = container(web);
    let target = resolve_port(c, &svc_port["targetPort"]);
    let args = arr(c, "/args");
    assert_eq!(args[0].as_str(), Some("backend"));
    assert_eq!(flag_value(args, "--port").parse::<u16>(), Ok(target));
    assert_eq!(flag_value(args, "--host"), "0.0.0.0");

    // Every flag given is one `lbwasm backend` has.
    let out = run({
        let mut cmd = lbwasm();
        cmd.args(["backend", "--help"]);
        cmd
    });
    assert!(out.status.success());
    let help = text(&out.stdout);
    let flags: Vec<&str> = args
        .iter()
        .filter_map(Value::as_str)
        .filter(|a| a.starts_with("--"))
        .collect();
    assert_eq!(flags, ["--host", "--port", "--id"]);
    for flag in flags {
        assert!(
            help.contains(&format!("{flag} <")),
            "lbwasm backend has no {flag}"
        );
    }
}

#[test]
fn the_etcd_service_and_statefulset_serve_the_etcd_url() {
    let docs = manifests();
    let (_, toml) = lbwasm_toml(&docs);
    let args = arr(container(find(&docs, "Deployment", "lbwasm")), "/args");
    let url = flag_value(args, "--etcd");
    assert_eq!(url, "http://etcd:2379");
    let (host, port) = url
        .strip_prefix("http://")
        .and_then(|r| r.rsplit_once(':'))
        .expect("http://HOST:PORT");
    let port: u16 = port.parse().expect("port");
    // The file says the same (the flags override it, so that both must agree).
    let file_etcd: Vec<&str> = toml["cluster"]["etcd"]
        .as_array()
        .expect("[cluster] etcd")
        .iter()
        .filter_map(toml::Value::as_str)
        .collect();
    assert_eq!(file_etcd, [url]);
    assert_eq!(
        toml_str(&toml, &["cluster", "name"]),
        flag_value(args, "--cluster")
    );

    let svc = find(&docs, "Service", host);
    assert_eq!(str_at(svc, "/spec/clusterIP"), "None", "headless");
    let sts = find(&docs, "StatefulSet", host);
    assert_eq!(str_at(sts, "/spec/serviceName"), host);
    assert!(selects(&svc["spec"]["selector"], pod_labels(sts)));
    let c = container(sts);
    let by_port: BTreeMap<u16, u16> = arr(svc, "/spec/ports")
        .iter()
        .map(|p| (port_number(&p["port"]), resolve_port(c, &p["targetPort"])))
        .collect();
    let peer = 2380;
    assert_eq!(by_port, BTreeMap::from([(port, port), (peer, peer)]));

    // etcd listens where the Service sends, and its members find each other by their
    // stable names (NAME-i.SERVICE...) on the peer port.
    let etcd_args: BTreeMap<&str, &str> = arr(c, "/args")
        .iter()
        .filter_map(|a| a.as_str()?.split_once('='))
        .collect();
    assert_eq!(port_of(etcd_args["--listen-client-urls"]), port);
    assert_eq!(port_of(etcd_args["--listen-peer-urls"]), peer);
    let replicas = sts["spec"]["replicas"].as_u64().expect("replicas");
    assert_eq!(replicas, 3);
    let members: Vec<&str> = etcd_args["--initial-cluster"].split(',').collect();
    assert_eq!(members.len() as u64, replicas);
    for (i, member) in members.iter().enumerate() {
        let (name, url) = member.split_once('=').expect("NAME=URL");
        assert_eq!(name, format!("{host}-{i}"));
        assert!(
            url.starts_with(&format!("http://{host}-{i}.{host}.")),
            "{member}"
        );
        assert_eq!(port_of(url), peer);
    }
    assert_eq!(etcd_args["--name"], "$(POD_NAME)");
    let image = str_at(c, "/image");
    assert!(image.starts_with("quay.io/coreos/etcd:v3.5."), "{image}");
    // Probes on /health, and a volume per member.
    for kind in ["readinessProbe", "livenessProbe"] {
        assert!(str_at(c, &format!("/{kind}/httpGet/path")).starts_with("/health"));
    }
    assert_eq!(arr(sts, "/spec/volumeClaimTemplates").len(), 1);
}

/// Every ConfigMap and Secret a pod reads, by kind: from volumes (also projected ones)
/// and from the environment.
fn references(docs: &[Doc]) -> BTreeSet<(String, String)> {
    let mut refs = BTreeSet::new();
    let mut add = |kind: &str, v: &Value| {
        if let Some(name) = v.as_str() {
            refs.insert((kind.to_owned(), name.to_owned()));
        }
    };
    for d in docs {
        let spec = &d.value["spec"]["template"]["spec"];
        for vol in spec["volumes"].as_array().into_iter().flatten() {
            add("ConfigMap", &vol["configMap"]["name"]);
            add("Secret", &vol["secret"]["secretName"]);
            for s in vol["projected"]["sources"].as_array().into_iter().flatten() {
                add("ConfigMap", &s["configMap"]["name"]);
                add("Secret", &s["secret"]["name"]);
            }
        }
        for c in spec["containers"].as_array().into_iter().flatten() {
            for e in c["env"].as_array().into_iter().flatten() {
                add("ConfigMap", &e["valueFrom"]["configMapKeyRef"]["name"]);
                add("Secret", &e["valueFrom"]["secretKeyRef"]["name"]);
            }
            for e in c["envFrom"].as_array().into_iter().flatten() {
                add("ConfigMap", &e["configMapRef"]["name"]);
                add("Secret", &e["secretRef"]["name"]);
            }
        }
    }
    refs
}

#[test]
fn what_pods_read_exists_or_is_documented_as_yours_to_create() {
    let docs = manifests();
    let refs = references(&docs);
    let defined: BTreeSet<(String, String)> = docs
        .iter()
        .map(|d| (d.kind().to_owned(), d.name().to_owned()))
        .collect();
    let missing: Vec<&str> = refs
        .iter()
        .filter(|r| !defined.contains(*r))
        .map(|(kind, name)| {
            assert_eq!(
                kind, "Secret",
                "a ConfigMap {name} that no manifest defines"
            );
            name.as_str()
        })
        .collect();
    assert_eq!(missing, USER_CREATED);
    assert!(refs.contains(&("ConfigMap".into(), "lbwasm-config".into())));

    // The README says how to create each, under its heading.
    let readme = std::fs::read_to_string(Path::new(MANIFESTS).join("README.md")).expect("README");
    let section = readme
        .split_once(USER_CREATED_HEADING)
        .map(|(_, after)| after.split("\n## ").next().unwrap_or(""))
        .expect("the README's user-created section");
    for name in USER_CREATED {
        assert!(
            section.contains("kubectl create secret")
                && section.contains(&format!("`{name}`"))
                && section.contains(&format!(" {name} ")),
            "README: how to create {name}"
        );
    }

    // The mounted paths are the ones lbwasm.toml and --config name.
    let (_, toml) = lbwasm_toml(&docs);
    let deployment = find(&docs, "Deployment", "lbwasm");
    let files = mounted_files(deployment);
    assert!(files.contains(CONFIG_PATH), "{files:?}");
    assert_eq!(
        flag_value(arr(container(deployment), "/args"), "--config"),
        CONFIG_PATH
    );
    for key in ["cert", "key"] {
        let path = toml_str(&toml, &["admin", "tls", key]);
        assert!(files.contains(path), "{path} is not mounted: {files:?}");
    }
}

/// The files a workload's volumes put in its container: mountPath/item path, for the
/// ConfigMap and Secret items it names.
fn mounted_files(workload: &Value) -> BTreeSet<String> {
    let spec = &workload["spec"]["template"]["spec"];
    let mut files = BTreeSet::new();
    for m in arr(container(workload), "/volumeMounts") {
        let vol = arr(spec, "/volumes")
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("a volume for each mount");
        let base = str_at(m, "/mountPath");
        let sources: Vec<&Value> = match vol["projected"]["sources"].as_array() {
            Some(s) => s
                .iter()
                .flat_map(|s| [&s["configMap"], &s["secret"]])
                .collect(),
            None => vec![&vol["configMap"], &vol["secret"]],
        };
        for s in sources {
            for item in s["items"].as_array().into_iter().flatten() {
                files.insert(format!("{base}/{}", str_at(item, "/path")));
            }
        }
    }
    files
}

#[test]
fn the_grace_period_covers_the_prestop_sleep_and_the_drain() {
    let docs = manifests();
    let deployment = find(&docs, "Deployment", "lbwasm");
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let sleep = arr(container(deployment), "/lifecycle/preStop/exec/command");
    assert_eq!(sleep[0].as_str(), Some("sleep"));
    let sleep: u64 = sleep[1]
        .as_str()
        .expect("seconds")
        .parse()
        .expect("seconds");
    assert!(sleep >= 5, "endpoints need a few seconds to drop the pod");
    // The kubelet counts the preStop hook in the grace period; SIGTERM comes after it.
    let drain = lbwasm::serve::DRAIN_DEADLINE.as_secs();
    assert!(
        grace > sleep + drain,
        "grace {grace}s <= preStop {sleep}s + drain {drain}s"
    );
}

#[test]
fn every_container_runs_locked_down_with_resources() {
    let docs = manifests();
    let workloads: Vec<&Doc> = docs
        .iter()
        .filter(|d| matches!(d.kind(), "Deployment" | "StatefulSet"))
        .collect();
    assert_eq!(workloads.len(), 3);
    for w in &workloads {
        let pod = &w.value["spec"]["template"]["spec"];
        let c = container(&w.value);
        let sc = &c["securityContext"];
        let what = format!("{} {}", w.kind(), w.name());
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
        assert!(
            arr(sc, "/capabilities/drop").iter().any(|d| d == "ALL"),
            "{what}"
        );
        assert!(
            sc["runAsNonRoot"] == true || pod["securityContext"]["runAsNonRoot"] == true,
            "{what}"
        );
        for r in ["requests/cpu", "requests/memory", "limits/memory"] {
            assert!(
                c.pointer(&format!("/resources/{r}")).is_some(),
                "{what}: {r}"
            );
        }
    }

    // With a read-only root, what lbwasm writes is on emptyDir volumes: the temporary
    // directory (cluster snapshot, uploads) and the plugin cache.
    let deployment = find(&docs, "Deployment", "lbwasm");
    let c = container(deployment);
    let empty_dirs: Vec<&str> = arr(c, "/volumeMounts")
        .iter()
        .filter(|m| {
            arr(deployment, "/spec/template/spec/volumes")
                .iter()
                .any(|v| v["name"] == m["name"] && v.get("emptyDir").is_some())
        })
        .map(|m| str_at(m, "/mountPath"))
        .collect();
    assert!(empty_dirs.contains(&"/tmp"), "{empty_dirs:?}");
    let cache = arr(c, "/env")
        .iter()
        .find(|e| e["name"] == "LBWASM_CACHE_DIR")
        .map(|e| str_at(e, "/value"))
        .expect("LBWASM_CACHE_DIR");
    assert!(
        empty_dirs
            .iter()
            .any(|d| cache.starts_with(&format!("{d}/"))),
        "{cache} is not under an emptyDir"
    );
}

#[test]
fn disruption_budgets_and_spread_keep_replicas_and_quorum() {
    let docs = manifests();
    let lb = find(&docs, "Deployment", "lbwasm");
    assert_eq!(lb["spec"]["replicas"], 3);
    let pdb = find(&docs, "PodDisruptionBudget", "lbwasm");
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    assert!(selects(
        &pdb["spec"]["selector"]["matchLabels"],
        pod_labels(lb)
    ));

    let etcd = find(&docs, "StatefulSet", "etcd");
    let members = etcd["spec"]["replicas"].as_u64().expect("replicas");
    let pdb = find(&docs, "PodDisruptionBudget", "etcd");
    assert!(selects(
        &pdb["spec"]["selector"]["matchLabels"],
        pod_labels(etcd)
    ));
    let unavailable = pdb["spec"]["maxUnavailable"]
        .as_u64()
        .expect("maxUnavailable");
    assert!(
        unavailable >= 1 && members - unavailable > members / 2,
        "a disruption must keep etcd's quorum"
    );

    // lbwasm replicas spread across nodes.
    let terms = arr(
        lb,
        "/spec/template/spec/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution",
    );
    assert_eq!(terms.len(), 1);
    let term = &terms[0]["podAffinityTerm"];
    assert_eq!(str_at(term, "/topologyKey"), "kubernetes.io/hostname");
    assert!(selects(
        &term["labelSelector"]["matchLabels"],
        pod_labels(lb)
    ));
}

#[test]
fn the_deployments_command_line_passes_serve_check() {
    let docs = manifests();
    let (text_toml, _) = lbwasm_toml(&docs);
    let deployment = find(&docs, "Deployment", "lbwasm");
    let c = container(deployment);

    // The ConfigMap's file, with the admin certificate's paths pointing at a test one.
    let pki = Pki::new("deploy test CA");
    let leaf = pki.leaf("admin", &["lbwasm-admin"], 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut file = text_toml.clone();
    for (path, real) in [
        ("/etc/lbwasm/admin-tls/tls.crt", &leaf.cert),
        ("/etc/lbwasm/admin-tls/tls.key", &leaf.key),
    ] {
        assert_eq!(file.matches(path).count(), 1, "{path} in lbwasm.toml");
        file = file.replace(path, &real.display().to_string());
    }
    let config = dir.path().join("lbwasm.toml");
    std::fs::write(&config, &file).expect("write config");

    // The container's arguments, with what Kubernetes substitutes: $(VAR) from the
    // container's environment (POD_NAME: the pod's name), the mounted file's path.
    let env: BTreeMap<&str, &Value> = arr(c, "/env")
        .iter()
        .map(|e| (str_at(e, "/name"), e))
        .collect();
    let mut substituted = 0;
    let args: Vec<String> = arr(c, "/args")
        .iter()
        .map(|a| {
            let a = a.as_str().expect("string argument");
            if a == CONFIG_PATH {
                return config.display().to_string();
            }
            match a.strip_prefix("$(").and_then(|v| v.strip_suffix(')')) {
                Some(var) => {
                    let e = env.get(var).unwrap_or_else(|| panic!("{a}: no env {var}"));
                    assert_eq!(str_at(e, "/valueFrom/fieldRef/fieldPath"), "metadata.name");
                    substituted += 1;
                    "lbwasm-5d8c7b9f4-x2x7q".to_owned()
                }
                None => a.to_owned(),
            }
        })
        .collect();
    assert_eq!(substituted, 1, "$(POD_NAME) in {args:?}");
    assert_eq!(args[0], "serve");
    // The token comes from a Secret as LBWASM_ADMIN_TOKEN: lbwasm reads that variable.
    assert_eq!(
        str_at(env["LBWASM_ADMIN_TOKEN"], "/valueFrom/secretKeyRef/name"),
        "lbwasm-admin-token"
    );

    let mut cmd = lbwasm();
    cmd.args(&args)
        .arg("--check")
        .env("LBWASM_ADMIN_TOKEN", "test-token")
        .env("LBWASM_CACHE_DIR", dir.path().join("cache"));
    let out = run(cmd);
    assert!(
        out.status.success(),
        "lbwasm {args:?} --check: {:?}\n{}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stdout).trim(),
        "lbwasm: configuration OK (1 listener)"
    );

    // Without the Secret's token the same command is refused: the check is not vacuous.
    let mut cmd = lbwasm();
    cmd.args(&args)
        .arg("--check")
        .env_remove("LBWASM_ADMIN_TOKEN")
        .env("LBWASM_CACHE_DIR", dir.path().join("cache"));
    let out = run(cmd);
    assert!(!out.status.success(), "accepted without a token");
    assert!(text(&out.stderr).contains("token"), "{}", text(&out.stderr));
}

#[test]
fn the_image_is_what_the_manifests_expect() {
    let dockerfile = std::fs::read_to_string(Path::new(MANIFESTS).join("../Dockerfile"))
        .expect("deploy/Dockerfile");
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    // The manifests give the subcommand as the container's first argument.
    assert!(lines.contains(&r#"ENTRYPOINT ["/usr/local/bin/lbwasm"]"#));
    // The builder's toolchain is the one rust-toolchain.toml pins, on the runtime's Debian.
    let toolchain = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../rust-toolchain.toml"
    ))
    .expect("rust-toolchain.toml");
    let channel = toolchain.parse::<toml::Table>().expect("TOML")["toolchain"]["channel"]
        .as_str()
        .expect("channel")
        .to_owned();
    let froms: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .copied()
        .collect();
    assert_eq!(
        froms,
        [
            format!("FROM rust:{channel}-bookworm AS build").as_str(),
            "FROM debian:bookworm-slim"
        ]
    );
    // The user the image runs as is the one the pods run as.
    let user = lines
        .iter()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    let docs = manifests();
    for name in ["lbwasm", "web"] {
        let deployment = find(&docs, "Deployment", name);
        let pod = &deployment["spec"]["template"]["spec"]["securityContext"];
        let uid = pod["runAsUser"].as_u64().expect("runAsUser");
        let gid = pod["runAsGroup"].as_u64().expect("runAsGroup");
        assert_eq!(user, format!("{uid}:{gid}"), "{name}");
        assert!(str_at(container(deployment), "/image").starts_with("lbwasm:"));
    }
}
