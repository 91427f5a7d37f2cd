//! The file format: one `#[derive(Deserialize)]` struct per TOML table, each field a key.
//!
//! These types say which keys exist and what kind of value each holds (the [`leaf`] kinds
//! check each value as it is read); every field is optional here, because a flag may fill
//! it, and `build.rs` decides what is required, what the defaults are, and what must agree
//! with what. Adding a key is adding a field (and, if it has one, its check in `build.rs`).
//! `serde_path_to_error` supplies the key path of a refused value; `toml` its span.
//!
//! [`leaf`]: super::leaf

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_path_to_error::{Path as KeyPath, Segment};

use super::leaf::{
    AdminHost, BackendAddr, Deadline, Int, ListenerName, MinVersion, NO_MAX, NonEmpty, OptionValue,
    Positive, Raw, ServerNamePattern, Text, UnknownName, UrlPath,
};
use super::value::{At, DATETIME_KEY, Item, List, Origin, Table};
use super::{
    AccessLogTarget, BackendProtocol, ConfigError, HashKey, Protocol, ProxyProtocol, Source,
};

/// The whole file.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub workers: Option<At<Int<u16, 0, 1024>>>,
    pub admin: Option<Table<FileAdmin>>,
    pub listener: Option<List<Table<FileListener>>>,
    pub discovery: Option<Table<FileDiscovery>>,
    pub cluster: Option<Table<super::cluster::FileCluster>>,
}

/// `[discovery]`: how DNS backends are resolved.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileDiscovery {
    pub resolver: Option<At<SocketAddr>>,
    pub min_ttl: Option<At<Positive>>,
    pub max_ttl: Option<At<Positive>>,
    pub timeout: Option<At<Positive>>,
}

/// `[admin]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAdmin {
    pub listen: Option<At<SocketAddr>>,
    pub token: Option<At<NonEmpty>>,
    pub allow_remote: Option<At<bool>>,
    pub hosts: Option<List<At<AdminHost>>>,
    pub tls: Option<Table<FileTls>>,
}

/// `[[listener]]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListener {
    pub name: Option<At<ListenerName>>,
    pub listen: Option<At<SocketAddr>>,
    pub protocol: Option<At<Protocol>>,
    pub backend_protocol: Option<At<BackendProtocol>>,
    pub plugin: Option<At<NonEmpty>>,
    pub plugin_options: Option<Table<PluginOptions>>,
    pub hash_key: Option<At<HashKey>>,
    pub access_log: Option<At<AccessLogTarget>>,
    pub proxy_protocol: Option<At<ProxyProtocol>>,
    pub via: Option<At<bool>>,
    pub timeouts: Option<Table<FileTimeouts>>,
    pub retry: Option<Table<FileRetry>>,
    pub health: Option<Table<FileHealth>>,
    pub passive: Option<Table<FilePassive>>,
    pub load_report: Option<Table<FileLoadReport>>,
    pub backend: Option<List<Table<FileBackend>>>,
    pub managed: Option<Table<FileManaged>>,
    pub tls: Option<Table<FileTls>>,
    pub backend_tls: Option<Table<FileBackendTls>>,
    pub server_names: Option<List<At<ServerNamePattern>>>,
}

/// `[listener.tls]`: termination, with a certificate in `cert`/`key` and/or more in
/// `[[listener.tls.certificate]]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    pub cert: Option<At<NonEmpty>>,
    pub key: Option<At<NonEmpty>>,
    pub min_version: Option<At<MinVersion>>,
    pub unknown_name: Option<At<UnknownName>>,
    pub session_tickets: Option<At<bool>>,
    pub check_interval: Option<At<Positive>>,
    pub certificate: Option<List<Table<FileCert>>>,
}

/// `[[listener.tls.certificate]]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCert {
    pub cert: Option<At<NonEmpty>>,
    pub key: Option<At<NonEmpty>>,
    pub names: Option<List<At<ServerNamePattern>>>,
}

/// `[listener.backend_tls]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileBackendTls {
    pub ca: Option<At<NonEmpty>>,
    pub server_name: Option<At<NonEmpty>>,
    pub cert: Option<At<NonEmpty>>,
    pub key: Option<At<NonEmpty>>,
    pub insecure_skip_verify: Option<At<bool>>,
}

/// `[listener.plugin_options]`: free-form, in file order (flags replace in place or append).
#[derive(Default)]
pub(super) struct PluginOptions(pub Vec<(String, At<OptionValue>)>);

impl PluginOptions {
    /// Replaces the value of `key` in place, or appends it.
    pub fn set(&mut self, key: &str, value: At<OptionValue>) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }
}

impl<'de> Deserialize<'de> for PluginOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // `toml` hands a table's keys over sorted; the values' spans give the file order back.
        let map = std::collections::BTreeMap::<String, At<OptionValue>>::deserialize(d)?;
        let mut options: Vec<_> = map.into_iter().collect();
        options.sort_by_key(|(_, value)| match &value.at {
            Origin::Span(span) => span.start,
            Origin::Flag(_) => usize::MAX,
        });
        Ok(PluginOptions(options))
    }
}

/// `[listener.timeouts]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTimeouts {
    pub connect: Option<At<Positive>>,
    pub request: Option<At<Positive>>,
    pub idle: Option<At<Positive>>,
    pub plugin: Option<At<Deadline>>,
    pub plugin_budget: Option<At<Positive>>,
}

/// `[listener.retry]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRetry {
    pub attempts: Option<At<Int<u32, 1, 10>>>,
    pub budget_percent: Option<At<Int<u32, 0, 100>>>,
}

/// `[listener.health]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHealth {
    #[serde(rename = "type")]
    pub kind: Option<At<CheckType>>,
    pub grpc_service: Option<At<String>>,
    pub path: Option<At<UrlPath>>,
    pub expect_status: Option<At<Int<u16, 100, 599>>>,
    pub interval: Option<At<Positive>>,
    pub timeout: Option<At<Positive>>,
    pub rise: Option<At<Int<u32, 1, NO_MAX>>>,
    pub fall: Option<At<Int<u32, 1, NO_MAX>>>,
}

/// `type` of `[listener.health]`: what the check speaks. The TCP connect is not a type of
/// its own (it is what an http check without `path`, or any tcp listener's, does), so that
/// configurations written before `type` existed keep their meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CheckType {
    /// `GET path` (HTTP/1.1, or HTTP/2 when the pool speaks h2c).
    Http,
    /// `grpc.health.v1.Health/Check` over h2c.
    Grpc,
}

impl Text for CheckType {
    type Value = CheckType;
    const WHAT: &'static str = "\"http\" or \"grpc\"";
    fn parse(text: &str) -> Option<CheckType> {
        match text {
            "http" => Some(CheckType::Http),
            "grpc" => Some(CheckType::Grpc),
            _ => None,
        }
    }
}

/// `[listener.passive]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePassive {
    pub consecutive_failures: Option<At<Int<u32, 0, NO_MAX>>>,
    pub base_ejection: Option<At<Positive>>,
    pub max_ejection: Option<At<Positive>>,
    pub slow_start: Option<At<Duration>>,
}

/// `[listener.load_report]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLoadReport {
    pub enabled: Option<At<bool>>,
    pub path: Option<At<UrlPath>>,
    pub interval: Option<At<Positive>>,
}

/// `[[listener.backend]]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileBackend {
    pub address: Option<At<BackendAddr>>,
    pub weight: Option<At<Int<u32, 1, NO_MAX>>>,
    pub max_connections: Option<At<Int<u32, 0, NO_MAX>>>,
}

/// `[listener.managed]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileManaged {
    pub command: Option<List<At<String>>>,
    pub count: Option<At<Int<u32, 1, 1000>>>,
    pub base_port: Option<At<Int<u16, 1, 65535>>>,
    pub restart_backoff: Option<At<Positive>>,
}

impl Item for Table<FileListener> {
    const ARRAY: &'static str = "an array of tables ([[listener]])";
}

impl Item for Table<FileBackend> {
    const ARRAY: &'static str = "an array of tables ([[listener.backend]])";
}

impl Item for Table<FileCert> {
    const ARRAY: &'static str = "an array of tables ([[listener.tls.certificate]])";
}

impl Item for At<ServerNamePattern> {
    const ARRAY: &'static str = "an array of server names (\"a.example\", \"*.example\")";
}

impl Item for At<AdminHost> {
    const ARRAY: &'static str = "an array of host names";
}

impl Item for At<String> {
    const ARRAY: &'static str = "an array of strings (argv)";
}

/// Reads the file; a syntax error names its line, any other error its line and key path.
pub(super) fn parse(src: &Source<'_>) -> Result<FileConfig, ConfigError> {
    let at = |e: &toml::de::Error| Origin::Span(e.span().unwrap_or_default());
    let document = toml::de::Deserializer::parse(src.text)
        .map_err(|e| src.error(&at(&e), "", format!("invalid TOML: {}", e.message())))?;
    serde_path_to_error::deserialize(document).map_err(|e| {
        let (key, at) = (key_path(e.path()), at(e.inner()));
        let message = e.inner().message();
        let written = src.written(&at).unwrap_or_default();
        src.error(
            &at,
            &key,
            unknown_key(message, written).unwrap_or_else(|| message.to_owned()),
        )
    })
}

/// `listener[0].backend[1].weight`: the path without the fields `toml` wraps spanned values
/// and date-times in (`$__serde_spanned_private_value`, ...).
fn key_path(path: &KeyPath) -> String {
    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Map { key: name } if !name.starts_with("$__") => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
            }
            _ => {}
        }
    }
    key
}

/// serde's "unknown field `helth`, expected one of `name`, `listen`" in this module's words,
/// "unknown key (expected one of: name, listen)"; the key itself ends the key path. Any
/// other message (none, were serde to reword it) is kept as serde wrote it. `written` is
/// the refused text.
fn unknown_key(message: &str, written: &str) -> Option<String> {
    let (field, expected) = message
        .strip_prefix("unknown field `")?
        .split_once("`, expected ")?;
    if field == DATETIME_KEY {
        // A date-time where a table belongs: `toml` hands it over as a one-key table.
        return Some(Raw::Datetime(written.to_owned()).expected("a table"));
    }
    let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    Some(format!(
        "unknown key (expected one of: {})",
        names.join(", ")
    ))
}
