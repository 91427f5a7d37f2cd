//! etcd, as the cluster uses it: read the prefix at one revision, watch it from the next,
//! write in transactions compared on revisions, store components in chunks, and keep a
//! replica's key alive under a lease.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
    WatchStream, Watcher,
};

use super::keys;
use super::state::{self, Entry, Mirror, Seed};
use crate::config::ClusterConfig;

/// How long one etcd call may take before the store counts as unavailable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Size of one stored chunk of a component: under etcd's default request limit (1.5 MiB).
const CHUNK: usize = 1 << 20;

/// An etcd failure, in words for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> Self {
        StoreError(format!("etcd: {e}"))
    }
}

/// The condition a transaction puts on one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key was last changed at this revision.
    At(i64),
}

/// What a transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Applied at this store revision.
    Done(i64),
    /// A compared key had changed: nothing was written.
    Conflict,
}

/// A write in a transaction.
pub enum Write {
    /// Set a key (relative) to a value.
    Put(String, Vec<u8>),
    /// Delete a key (relative).
    Delete(String),
}

/// One connection to the cluster's etcd, rooted at the cluster's prefix.
#[derive(Clone)]
pub struct Store {
    client: Client,
    prefix: String,
}

impl Store {
    /// Connects (bounded by [`CALL_TIMEOUT`]) and checks that etcd answers.
    pub async fn connect(c: &ClusterConfig) -> Result<Store, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            // Not more often than etcd allows (`--grpc-keepalive-min-time`, 5 s): faster
            // pings get the connection closed with ENHANCE_YOUR_CALM. A silent etcd is
            // noticed sooner by the lease keep-alives (`serve`'s session loop).
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &c.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if c.endpoints.iter().any(|e| e.starts_with("https://")) {
            let mut tls = TlsOptions::new().with_enabled_roots();
            if let Some(ca) = &c.ca {
                let pem = std::fs::read(ca)
                    .map_err(|e| StoreError(format!("cluster ca {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some((cert, key)) = &c.identity {
                let read = |p: &std::path::PathBuf| {
                    std::fs::read(p).map_err(|e| StoreError(format!("{}: {e}", p.display())))
                };
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        let connect = Client::connect(c.endpoints.clone(), Some(options));
        let client = tokio::time::timeout(CALL_TIMEOUT, connect)
            .await
            .map_err(|_| {
                StoreError(format!(
                    "etcd {}: no answer within {CALL_TIMEOUT:?}",
                    c.endpoints.join(",")
                ))
            })??;
        let mut store = Store {
            client,
            prefix: keys::prefix(&c.name),
        };
        // `connect` is lazy about some failures: one cheap read proves the endpoint answers.
        store.revision().await?;
        Ok(store)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The store's revision now.
    pub async fn revision(&mut self) -> Result<i64, StoreError> {
        let options = GetOptions::new().with_count_only();
        let r = self
            .client
            .get(self.full(keys::META), Some(options))
            .await?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// Every key under the prefix, at one revision.
    pub async fn load(&mut self) -> Result<Mirror, StoreError> {
        let r = self
            .client
            .get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let header = r.header();
        let mut mirror = Mirror {
            revision: header.map_or(0, |h| h.revision()),
            cluster_id: header.map_or(0, |h| h.cluster_id()),
            entries: Default::default(),
        };
        for kv in r.kvs() {
            if let Some(key) = kv.key().strip_prefix(self.prefix.as_bytes())
                && let Ok(key) = std::str::from_utf8(key)
            {
                mirror.entries.insert(
                    key.to_owned(),
                    Entry {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    },
                );
            }
        }
        Ok(mirror)
    }

    /// Watches the prefix from revision `from`.
    pub async fn watch(&mut self, from: i64) -> Result<(Watcher, WatchStream), StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        Ok(self
            .client
            .watch(self.prefix.clone(), Some(options))
            .await?)
    }

    /// Applies a watch response's events to `mirror`; true when a key of the shared
    /// configuration changed (not only replicas' own keys). `Err` when the watch can go no
    /// further (compacted past, cancelled): the caller reads everything again.
    pub fn apply(
        &self,
        mirror: &mut Mirror,
        resp: &etcd_client::WatchResponse,
    ) -> Result<bool, StoreError> {
        if resp.compact_revision() > 0 {
            return Err(StoreError(format!(
                "the watch fell behind a compaction (revision {} is gone)",
                resp.compact_revision()
            )));
        }
        if resp.canceled() {
            return Err(StoreError(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason()
            )));
        }
        let mut changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(key) = kv
                .key()
                .strip_prefix(self.prefix.as_bytes())
                .and_then(|k| std::str::from_utf8(k).ok())
            else {
                continue;
            };
            changed |= !matches!(keys::parse(key), keys::Key::Replica(_));
            match event.event_type() {
                EventType::Put => {
                    mirror.entries.insert(
                        key.to_owned(),
                        Entry {
                            value: kv.value().to_vec(),
                            mod_revision: kv.mod_revision(),
                        },
                    );
                }
                EventType::Delete => {
                    mirror.entries.remove(key);
                }
            }
        }
        if let Some(h) = resp.header() {
            mirror.revision = mirror.revision.max(h.revision());
        }
        Ok(changed)
    }

    /// Writes `writes` if every key of `expect` is as expected, in one transaction.
    pub async fn commit(
        &mut self,
        expect: &[(String, Expect)],
        writes: Vec<Write>,
    ) -> Result<Commit, StoreError> {
        let compares: Vec<Compare> = expect
            .iter()
            .map(|(k, e)| match e {
                Expect::Absent => Compare::create_revision(self.full(k), CompareOp::Equal, 0),
                Expect::At(rev) => Compare::mod_revision(self.full(k), CompareOp::Equal, *rev),
            })
            .collect();
        let ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|w| match w {
                Write::Put(k, v) => TxnOp::put(self.full(&k), v, None),
                Write::Delete(k) => TxnOp::delete(self.full(&k), None),
            })
            .collect();
        let r = self
            .client
            .txn(Txn::new().when(compares).and_then(ops))
            .await?;
        if !r.succeeded() {
            return Ok(Commit::Conflict);
        }
        Ok(Commit::Done(r.header().map_or(0, |h| h.revision())))
    }

    /// Stores a component's bytes in chunks unless `mirror` already has them. Written
    /// before the key that refers to it, so a replica that sees the reference has the
    /// bytes (the watch delivers in revision order).
    pub async fn put_blob(
        &mut self,
        mirror: &Mirror,
        digest: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        if mirror.blob(digest).is_some() {
            return Ok(());
        }
        for (n, chunk) in bytes.chunks(CHUNK).enumerate() {
            self.client
                .put(
                    self.full(&keys::blob_chunk(digest, n)),
                    chunk.to_vec(),
                    None,
                )
                .await?;
        }
        Ok(())
    }

    /// Writes the listeners of `specs` that `now` has no plugin for, with the meta key if
    /// the store has none: one transaction compared on absence, so of two replicas (or a
    /// replica and `lbwasm cluster seed`) seeding at once, one wins. Returns the
    /// listeners written, none when there was nothing to write or another writer won.
    pub async fn seed(
        &mut self,
        now: &Mirror,
        specs: Vec<Seed>,
        by: &str,
    ) -> Result<Vec<String>, StoreError> {
        let (mut expect, mut writes, mut seeded) = (Vec::new(), Vec::new(), Vec::new());
        for (name, spec, blob) in specs {
            let key = keys::plugin(&name);
            if now.entries.contains_key(&key) {
                continue;
            }
            if let Some((digest, bytes)) = blob {
                self.put_blob(now, &digest, &bytes).await?;
            }
            expect.push((key, Expect::Absent));
            writes.extend(
                state::listener_entries(&name, &spec)
                    .into_iter()
                    .map(|(k, v)| Write::Put(k, v)),
            );
            seeded.push(name);
        }
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        if !now.seeded() {
            expect.push((keys::META.to_owned(), Expect::Absent));
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let meta = serde_json::json!({"format": 1, "seeded_by": by, "at": at});
            writes.push(Write::Put(keys::META.to_owned(), state::json(&meta)));
        }
        writes.push(Write::Put(keys::CHANGED.into(), state::json(&by)));
        match self.commit(&expect, writes).await? {
            Commit::Done(_) => Ok(seeded),
            Commit::Conflict => Ok(Vec::new()),
        }
    }

    /// A new lease of `ttl`, kept alive by the returned keeper.
    pub async fn lease(
        &mut self,
        ttl: Duration,
    ) -> Result<(i64, LeaseKeeper, LeaseKeepAliveStream), StoreError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let id = self.client.lease_grant(secs, None).await?.id();
        let (keeper, stream) = self.client.lease_keep_alive(id).await?;
        Ok((id, keeper, stream))
    }

    /// Puts a key under a lease (a replica's own key).
    pub async fn put_leased(
        &mut self,
        key: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<(), StoreError> {
        self.client
            .put(
                self.full(key),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(())
    }

    /// Revokes a lease (a replica going away deletes its key at once).
    pub async fn revoke(&mut self, lease: i64) {
        let _ = self.client.lease_revoke(lease).await;
    }
}
