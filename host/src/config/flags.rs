//! The `lbwasm serve` flags, and how they are laid over the configuration file.

use std::path::PathBuf;

use super::tree::{self, Ctx, Node, Origin, Table, Value};
use super::{Config, ConfigError, build};

/// Run the proxy, configured by a TOML file (`--config`), by flags, or by both.
///
/// With `--config`, the listener flags (`--listen`, `--backends`, `--plugin`,
/// `--plugin-opt`, `--protocol`, `--hash-key`, `--access-log`) override the file's first `[[listener]]`
/// (or create it when the file has none), `--admin`/`--admin-token` override `[admin]`,
/// `--admin-host` adds to `[admin] hosts`, `--no-load-poll` turns load polling off on every
/// listener, and `--workers` overrides `workers`. `--backends` replaces the file's `[[listener.backend]]`
/// list; `--plugin` naming another plugin drops the file's `plugin_options` (they were meant
/// for the old one); `--plugin-opt` adds to or replaces single options.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ServeArgs {
    /// TOML configuration file (see examples/lbwasm.toml); other flags override its first
    /// [[listener]].
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
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
    /// Log filter in tracing's EnvFilter syntax, e.g. info or lbwasm=debug. Used by the
    /// binary; the TOML file has no counterpart.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

impl ServeArgs {
    /// Reads `--config` if given, lays the other flags over it, and validates the result.
    /// Errors name the file, line and key, or the flag.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let (mut root, cx) = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    file: Some(path.clone()),
                    line: None,
                    key: String::new(),
                    message: format!("cannot read: {e}"),
                })?;
                let cx = Ctx::file(path);
                (tree::parse(&text, &cx)?, cx)
            }
            None => (Table::default(), Ctx::flags()),
        };
        self.overlay(&mut root)?;
        build::config(&root, &cx)
    }

    fn sets_listener(&self) -> bool {
        self.listen.is_some()
            || !self.backends.is_empty()
            || self.plugin.is_some()
            || !self.plugin_opt.is_empty()
            || self.protocol.is_some()
            || self.hash_key.is_some()
            || self.access_log.is_some()
    }

    /// Writes the flags into the tree, as values that remember their flag.
    fn overlay(&self, root: &mut Table) -> Result<(), ConfigError> {
        if let Some(workers) = self.workers {
            let value = Value::Int(i64::try_from(workers).unwrap_or(i64::MAX));
            root.set(
                "workers",
                Node {
                    value,
                    at: Origin::Flag("--workers"),
                },
            );
        }
        if let Some(listen) = &self.admin
            && let Some(admin) = root.table_mut("admin", "--admin")
        {
            admin.set("listen", Node::flag_str("--admin", listen));
        }
        if let Some(token) = &self.admin_token
            && let Some(Node {
                value: Value::Table(admin),
                ..
            }) = root.get_mut("admin")
        {
            admin.set("token", Node::flag_str("--admin-token", token));
        }
        if !self.admin_host.is_empty()
            && let Some(Node {
                value: Value::Table(admin),
                ..
            }) = root.get_mut("admin")
        {
            let mut hosts = match admin.get("hosts") {
                Some(Node {
                    value: Value::Array(items),
                    ..
                }) => items.clone(),
                // Not an array: the schema walk reports it against the file.
                Some(_) => return Ok(()),
                None => Vec::new(),
            };
            hosts.extend(
                self.admin_host
                    .iter()
                    .map(|h| Node::flag_str("--admin-host", h.trim())),
            );
            admin.set(
                "hosts",
                Node {
                    value: Value::Array(hosts),
                    at: Origin::Flag("--admin-host"),
                },
            );
        }

        match root.get("listener").map(|node| &node.value) {
            Some(Value::Array(items)) if !items.is_empty() => {}
            // Not an array: the schema walk reports it against the file.
            Some(value) if !matches!(value, Value::Array(_)) => return Ok(()),
            // No listener in the file (or no file): the flags must define one.
            _ => {
                if self.config.is_some() && !self.sets_listener() {
                    return Ok(()); // the schema walk reports the missing listener
                }
                self.require_listener_flags()?;
                let listener = Node {
                    value: Value::Table(Table::default()),
                    at: LISTENER_FLAG,
                };
                root.set(
                    "listener",
                    Node {
                        value: Value::Array(vec![listener]),
                        at: LISTENER_FLAG,
                    },
                );
            }
        }
        if let Some(Node {
            value: Value::Array(items),
            ..
        }) = root.get_mut("listener")
            && let Some(Node {
                value: Value::Table(first),
                ..
            }) = items.first_mut()
        {
            self.overlay_listener(first)?;
        }
        if self.no_load_poll
            && let Some(Node {
                value: Value::Array(items),
                ..
            }) = root.get_mut("listener")
        {
            // Every listener: the flag is a switch for the whole process.
            for item in items {
                if let Node {
                    value: Value::Table(listener),
                    ..
                } = item
                    && let Some(report) = listener.table_mut("load_report", "--no-load-poll")
                {
                    report.set(
                        "enabled",
                        Node {
                            value: Value::Bool(false),
                            at: Origin::Flag("--no-load-poll"),
                        },
                    );
                }
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
        Err(flag_error(missing, why))
    }

    fn overlay_listener(&self, listener: &mut Table) -> Result<(), ConfigError> {
        if let Some(listen) = &self.listen {
            listener.set("listen", Node::flag_str("--listen", listen));
        }
        if let Some(protocol) = &self.protocol {
            listener.set("protocol", Node::flag_str("--protocol", protocol));
        }
        if let Some(plugin) = &self.plugin {
            let same = matches!(listener.get("plugin"),
                Some(Node { value: Value::Str(old), .. }) if old == plugin);
            if !same {
                listener.remove("plugin_options");
            }
            listener.set("plugin", Node::flag_str("--plugin", plugin));
        }
        for option in &self.plugin_opt {
            let Some((key, value)) = option.split_once('=').filter(|(k, _)| !k.trim().is_empty())
            else {
                return Err(flag_error(
                    "--plugin-opt",
                    format!("expected KEY=VALUE, got {option:?}"),
                ));
            };
            if let Some(options) = listener.table_mut("plugin_options", "--plugin-opt") {
                options.set(key.trim(), Node::flag_str("--plugin-opt", value));
            }
        }
        if let Some(hash_key) = &self.hash_key {
            listener.set("hash_key", Node::flag_str("--hash-key", hash_key));
        }
        if let Some(path) = &self.access_log {
            listener.set("access_log", Node::flag_str("--access-log", path));
        }
        if !self.backends.is_empty() {
            let list = self
                .backends
                .iter()
                .map(|address| {
                    let mut backend = Table::default();
                    backend.set("address", Node::flag_str("--backends", address.trim()));
                    Node {
                        value: Value::Table(backend),
                        at: Origin::Flag("--backends"),
                    }
                })
                .collect();
            listener.set(
                "backend",
                Node {
                    value: Value::Array(list),
                    at: Origin::Flag("--backends"),
                },
            );
        }
        Ok(())
    }
}

/// A listener created by the flags is reported as `--listen`.
const LISTENER_FLAG: Origin = Origin::Flag("--listen");

fn flag_error(flag: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file: None,
        line: None,
        key: flag.to_owned(),
        message: message.into(),
    }
}
