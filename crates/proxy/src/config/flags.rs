//! The `lbwasm serve` flags, and how they are laid over the configuration file: each flag
//! sets a field of the file types, checked as the file's value would be, and errors name
//! the flag.

use std::path::PathBuf;

use super::file::{self, FileBackend, FileConfig, FileListener};
use super::leaf::{Leaf, Raw};
use super::value::{At, List, Origin, Table};
use super::{Config, ConfigError, Source, build};

/// Run the proxy, configured by a TOML file (`--config`), by flags, or by both.
///
/// With `--config`, the listener flags (`--listen`, `--backends`, `--plugin`,
/// `--plugin-opt`, `--protocol`, `--hash-key`, `--access-log`) override the file's first `[[listener]]`
/// (or create it when the file has none), `--admin`/`--admin-token` override `[admin]`,
/// `--admin-host` adds to `[admin] hosts`, `--no-load-poll` turns load polling off on every
/// listener, `--resolver` overrides `[discovery] resolver`, and `--workers` overrides
/// `workers`. `--backends` replaces the file's `[[listener.backend]]`
/// list; `--plugin` naming another plugin drops the file's `plugin_options` (they were meant
/// for the old one); `--plugin-opt` adds to or replaces single options.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ServeArgs {
    /// TOML configuration file (see examples/lbwasm.toml); other flags override its first
    /// [[listener]].
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check the configuration and exit (as `nginx -t`): the file and flags, certificates
    /// and every listener's plugin are loaded and checked; nothing is bound, started or
    /// contacted (backends, etcd, DNS). Exit 0 when `serve` would start with it.
    #[arg(long)]
    pub check: bool,
    /// Address to listen on, e.g. 127.0.0.1:8000.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Backend addresses, comma-separated; replaces the file's [[listener.backend]] list.
    #[arg(long, value_name = "ADDR,...", value_delimiter = ',')]
    pub backends: Vec<String>,
    /// Built-in plugin name (e.g. least_loaded) or path to a .wasm component
    /// (`lbwasm plugins export NAME` writes a built-in to NAME.wasm).
    #[arg(long, value_name = "NAME|FILE")]
    pub plugin: Option<String>,
    /// Plugin option, repeatable; adds to or replaces [listener.plugin_options].
    #[arg(long = "plugin-opt", value_name = "KEY=VALUE")]
    pub plugin_opt: Vec<String>,
    /// What the listener carries: http (default) or tcp.
    #[arg(long, value_name = "http|tcp")]
    pub protocol: Option<String>,
    /// What an http listener speaks to its backends: http1 (default), h2c (HTTP/2
    /// without TLS, as gRPC servers do) or h2 (HTTP/2 over TLS, ALPN).
    #[arg(long = "backend-protocol", value_name = "http1|h2c|h2")]
    pub backend_protocol: Option<String>,
    /// Admin endpoint address, on loopback (e.g. 127.0.0.1:9900).
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Bearer token the admin endpoint requires; ignored without an admin endpoint.
    #[arg(
        long,
        env = "LBWASM_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub admin_token: Option<String>,
    /// Another name browsers may reach the admin endpoint by (as in `Host`: NAME or
    /// NAME:PORT), repeatable; adds to [admin] hosts. Its own address and localhost:PORT are
    /// always accepted.
    #[arg(long = "admin-host", value_name = "NAME[:PORT]")]
    pub admin_host: Vec<String>,
    /// Never poll the backends' load endpoint, on any listener, whatever the plugin or the
    /// file's [listener.load_report] says.
    #[arg(long)]
    pub no_load_poll: bool,
    /// The DNS server that resolves dns:// and dns+srv:// backends (IP:PORT); overrides
    /// [discovery] resolver. Default: the system's (/etc/resolv.conf).
    #[arg(long, value_name = "ADDR")]
    pub resolver: Option<String>,
    /// Worker threads; 0 means one per CPU less one, at least 1 (the default).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// What hashing plugins hash: header:NAME, cookie:NAME, path or client-ip.
    #[arg(long, value_name = "SRC")]
    pub hash_key: Option<String>,
    /// Access log of the listener: a file (appended to, reopened on SIGHUP), or - for
    /// standard output.
    #[arg(long, value_name = "FILE|-")]
    pub access_log: Option<String>,
    /// Terminate TLS on the listener with this certificate chain (PEM, leaf first); with
    /// --tls-key. Sets [listener.tls] cert.
    #[arg(long = "tls-cert", value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// The private key (PEM) of --tls-cert. Sets [listener.tls] key.
    #[arg(long = "tls-key", value_name = "FILE")]
    pub tls_key: Option<String>,
    /// Speak TLS to the backends, trusting the system's roots (or --backend-ca).
    #[arg(long = "backend-tls")]
    pub backend_tls: bool,
    /// CA certificates (PEM) that backend certificates must chain to; implies
    /// --backend-tls.
    #[arg(long = "backend-ca", value_name = "FILE")]
    pub backend_ca: Option<String>,
    /// The name sent as SNI to backends and verified in their certificates (default:
    /// the backend's IP address); implies --backend-tls.
    #[arg(long = "backend-server-name", value_name = "NAME")]
    pub backend_server_name: Option<String>,
    /// Client certificate (PEM) presented to backends (mTLS), with --backend-key;
    /// implies --backend-tls.
    #[arg(long = "backend-cert", value_name = "FILE")]
    pub backend_cert: Option<String>,
    /// The private key (PEM) of --backend-cert.
    #[arg(long = "backend-key", value_name = "FILE")]
    pub backend_key: Option<String>,
    /// Accept any backend certificate. For testing only: logged loudly at start.
    #[arg(long = "backend-insecure-skip-verify")]
    pub backend_insecure_skip_verify: bool,
    /// Cluster mode: etcd endpoints (comma-separated, http:// or https://) holding the
    /// cluster's shared pools and plugins; sets [cluster] etcd (with --cluster).
    #[arg(long, value_name = "URL,...", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Cluster mode: the cluster's name (its keys live under /lbwasm/NAME/); sets
    /// [cluster] name.
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// This replica's name in the cluster (default: the host name); sets [cluster] replica.
    #[arg(long, value_name = "NAME")]
    pub replica: Option<String>,
    /// Where this replica saves the last applied cluster configuration, to start from
    /// when etcd is down; sets [cluster] state_file.
    #[arg(long = "cluster-state", value_name = "FILE")]
    pub cluster_state: Option<String>,
    /// Log filter in tracing's EnvFilter syntax, e.g. info or lbwasm=debug. Used by the
    /// binary; the TOML file has no counterpart.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

impl ServeArgs {
    /// Reads `--config` if given, lays the other flags over it, and validates the result.
    /// Errors name the file, line and key, or the flag.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let Some(path) = &self.config else {
            let mut file = FileConfig::default();
            self.overlay(&mut file)?;
            return build::config(&file, &Source::default());
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.clone()),
            line: None,
            key: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        let src = Source::file(path, &text);
        let mut file = file::parse(&src)?;
        self.overlay(&mut file)?;
        build::config(&file, &src)
    }

    /// Writes the cluster flags into the file's `[cluster]` table (creating it).
    fn overlay_cluster(&self, file: &mut FileConfig) -> Result<(), ConfigError> {
        if !self.etcd.is_empty()
            || self.cluster.is_some()
            || self.replica.is_some()
            || self.cluster_state.is_some()
        {
            let by = if self.etcd.is_empty() {
                "--cluster"
            } else {
                "--etcd"
            };
            let cluster = file.cluster.get_or_insert_with(|| created(by));
            let c = &mut cluster.value;
            set(&mut c.name, "--cluster", &self.cluster)?;
            set(&mut c.replica, "--replica", &self.replica)?;
            set(&mut c.state_file, "--cluster-state", &self.cluster_state)?;
            if !self.etcd.is_empty() {
                let items = (self.etcd.iter())
                    .map(|url| text_flag("--etcd", url.trim()))
                    .collect::<Result<_, _>>()?;
                c.etcd = Some(List {
                    items,
                    at: Origin::Flag("--etcd"),
                });
            }
        }
        Ok(())
    }

    /// The cluster settings alone (file and flags), for commands that need no listener
    /// (`lbwasm cluster status`).
    pub fn load_cluster(&self) -> Result<super::ClusterConfig, ConfigError> {
        let text = match &self.config {
            Some(path) => std::fs::read_to_string(path).map_err(|e| ConfigError {
                file: Some(path.clone()),
                line: None,
                key: String::new(),
                message: format!("cannot read: {e}"),
            })?,
            None => String::new(),
        };
        let src = match &self.config {
            Some(path) => Source::file(path, &text),
            None => Source::default(),
        };
        let mut file = if self.config.is_some() {
            file::parse(&src)?
        } else {
            FileConfig::default()
        };
        self.overlay_cluster(&mut file)?;
        build::cluster_only(&file, &src)?.ok_or_else(|| {
            ConfigError::flag(
                "--etcd",
                "required: the etcd endpoints and --cluster NAME (or a [cluster] table in --config)",
            )
        })
    }

    fn sets_listener(&self) -> bool {
        self.listen.is_some()
            || !self.backends.is_empty()
            || self.plugin.is_some()
            || !self.plugin_opt.is_empty()
            || self.protocol.is_some()
            || self.backend_protocol.is_some()
            || self.hash_key.is_some()
            || self.access_log.is_some()
            || self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.sets_backend_tls()
    }

    fn sets_backend_tls(&self) -> bool {
        self.backend_tls
            || self.backend_ca.is_some()
            || self.backend_server_name.is_some()
            || self.backend_cert.is_some()
            || self.backend_key.is_some()
            || self.backend_insecure_skip_verify
    }

    /// Writes the flags into the file's values.
    fn overlay(&self, file: &mut FileConfig) -> Result<(), ConfigError> {
        if let Some(workers) = self.workers {
            let n = i128::try_from(workers).unwrap_or(i128::MAX);
            file.workers = Some(flag("--workers", Raw::Int(n))?);
        }
        if self.resolver.is_some() {
            let discovery = file.discovery.get_or_insert_with(|| created("--resolver"));
            set(&mut discovery.value.resolver, "--resolver", &self.resolver)?;
        }
        if self.admin.is_some() {
            let admin = file.admin.get_or_insert_with(|| created("--admin"));
            set(&mut admin.value.listen, "--admin", &self.admin)?;
        }
        // Without an admin endpoint, its token and host names are ignored.
        if let Some(admin) = &mut file.admin {
            set(&mut admin.value.token, "--admin-token", &self.admin_token)?;
            for host in &self.admin_host {
                let hosts = admin.value.hosts.get_or_insert_with(|| List {
                    items: Vec::new(),
                    at: Origin::Flag("--admin-host"),
                });
                hosts.items.push(text_flag("--admin-host", host.trim())?);
            }
        }

        self.overlay_cluster(file)?;
        let listeners = match &mut file.listener {
            Some(list) if !list.items.is_empty() => list,
            // The file has no listener: the flags must define one (or building reports it).
            _ if self.config.is_some() && !self.sets_listener() => return Ok(()),
            slot => {
                self.require_listener_flags()?;
                slot.insert(List {
                    items: vec![created(LISTENER_FLAG)],
                    at: Origin::Flag(LISTENER_FLAG),
                })
            }
        };
        if let Some(first) = listeners.items.first_mut() {
            self.overlay_listener(&mut first.value)?;
        }
        if self.no_load_poll {
            // Every listener: the flag is a switch for the whole process.
            for listener in &mut listeners.items {
                let report = &mut listener.value.load_report;
                let report = report.get_or_insert_with(|| created("--no-load-poll"));
                report.value.enabled = Some(flag("--no-load-poll", Raw::Bool(false))?);
            }
        }
        Ok(())
    }

    fn require_listener_flags(&self) -> Result<(), ConfigError> {
        let why = match &self.config {
            Some(path) => format!("required: {} has no [[listener]]", path.display()),
            None => "required without --config FILE".to_owned(),
        };
        let missing = if self.listen.is_none() {
            "--listen"
        } else if self.backends.is_empty() {
            "--backends"
        } else if self.plugin.is_none() {
            "--plugin"
        } else {
            return Ok(());
        };
        Err(ConfigError::flag(missing, why))
    }

    fn overlay_listener(&self, listener: &mut FileListener) -> Result<(), ConfigError> {
        set(&mut listener.listen, "--listen", &self.listen)?;
        set(&mut listener.protocol, "--protocol", &self.protocol)?;
        set(
            &mut listener.backend_protocol,
            "--backend-protocol",
            &self.backend_protocol,
        )?;
        if let Some(plugin) = &self.plugin
            && listener
                .plugin
                .as_ref()
                .is_none_or(|old| old.value != *plugin)
        {
            // Options meant for another plugin go with it.
            listener.plugin_options = None;
        }
        set(&mut listener.plugin, "--plugin", &self.plugin)?;
        for option in &self.plugin_opt {
            let Some((key, value)) = option.split_once('=').filter(|(k, _)| !k.trim().is_empty())
            else {
                let message = format!("expected KEY=VALUE, got {option:?}");
                return Err(ConfigError::flag("--plugin-opt", message));
            };
            let options = listener
                .plugin_options
                .get_or_insert_with(|| created("--plugin-opt"));
            options
                .value
                .set(key.trim(), text_flag("--plugin-opt", value)?);
        }
        set(&mut listener.hash_key, "--hash-key", &self.hash_key)?;
        set(&mut listener.access_log, "--access-log", &self.access_log)?;
        if self.tls_cert.is_some() || self.tls_key.is_some() {
            let by = if self.tls_cert.is_some() {
                "--tls-cert"
            } else {
                "--tls-key"
            };
            let tls = listener.tls.get_or_insert_with(|| created(by));
            set(&mut tls.value.cert, "--tls-cert", &self.tls_cert)?;
            set(&mut tls.value.key, "--tls-key", &self.tls_key)?;
        }
        if self.sets_backend_tls() {
            let tls = listener
                .backend_tls
                .get_or_insert_with(|| created("--backend-tls"));
            let t = &mut tls.value;
            set(&mut t.ca, "--backend-ca", &self.backend_ca)?;
            set(
                &mut t.server_name,
                "--backend-server-name",
                &self.backend_server_name,
            )?;
            set(&mut t.cert, "--backend-cert", &self.backend_cert)?;
            set(&mut t.key, "--backend-key", &self.backend_key)?;
            if self.backend_insecure_skip_verify {
                t.insecure_skip_verify =
                    Some(flag("--backend-insecure-skip-verify", Raw::Bool(true))?);
            }
        }
        if !self.backends.is_empty() {
            let backend = |address: &String| -> Result<_, ConfigError> {
                let address = Some(text_flag("--backends", address.trim())?);
                let value = FileBackend {
                    address,
                    ..FileBackend::default()
                };
                Ok(Table {
                    value,
                    at: Origin::Flag("--backends"),
                })
            };
            let items = self
                .backends
                .iter()
                .map(backend)
                .collect::<Result<_, _>>()?;
            listener.backend = Some(List {
                items,
                at: Origin::Flag("--backends"),
            });
        }
        Ok(())
    }
}

/// A listener created by the flags is reported as `--listen`.
const LISTENER_FLAG: &str = "--listen";

/// The value `raw` of `flag`, checked as the file's value of that key would be.
fn flag<K: Leaf>(flag: &'static str, raw: Raw) -> Result<At<K>, ConfigError> {
    At::flag(flag, raw).map_err(|message| ConfigError::flag(flag, message))
}

/// Sets `field` to the value of `flag`, if given.
fn set<K: Leaf>(
    field: &mut Option<At<K>>,
    flag: &'static str,
    value: &Option<String>,
) -> Result<(), ConfigError> {
    if let Some(text) = value {
        *field = Some(text_flag(flag, text)?);
    }
    Ok(())
}

/// The text of `flag` as the value of a key.
fn text_flag<K: Leaf>(name: &'static str, text: &str) -> Result<At<K>, ConfigError> {
    flag(name, Raw::Str(text.to_owned()))
}

/// A table the flag `by` creates because the file has none.
fn created<T: Default>(by: &'static str) -> Table<T> {
    Table {
        value: T::default(),
        at: Origin::Flag(by),
    }
}
