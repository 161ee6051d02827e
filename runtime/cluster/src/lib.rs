//! Cluster mode of wasp on NATS JetStream (`wasp serve --cluster nats://...`).
//!
//! Several nodes share one endpoint registry: each endpoint record (spec with components
//! as digests, stopped state, webhook secret) is a key of the JetStream key-value bucket
//! `wasp_endpoints`, and each component's bytes an object of the object store
//! `wasp_components`, named by its digest. A node writes what changes on it (after its own
//! store has it) and applies what the others write, in the bucket's order: a deploy on any
//! node is served by all. Nodes send a heartbeat to the bucket `wasp_nodes`, whose entries
//! expire, so the nodes listed are those alive. One node at a time scales every version
//! for the whole cluster from the loads in those heartbeats, and places the workers on
//! nodes (see the `scaling` module).
//!
//! When a node joins, the bucket is the truth: its endpoints are applied, and endpoints
//! this node holds that the bucket does not are removed, unless the bucket is empty (the
//! first node of a new cluster), which then gets this node's endpoints.
#![deny(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use wasp_gateway::{AccessChange, Gateway, NodeInfo, StoredEndpoint};

mod jobs;
mod scaling;

pub use jobs::{JOB_BLOBS_BUCKET, JOBS_BUCKET, JOBS_STREAM, JetStreamQueue};
pub use scaling::{PLACEMENTS_BUCKET, SCALING_BUCKET};

/// The bucket of endpoint records.
pub const ENDPOINTS_BUCKET: &str = "wasp_endpoints";
/// The object store of components.
pub const COMPONENTS_BUCKET: &str = "wasp_components";
/// The bucket of node heartbeats.
pub const NODES_BUCKET: &str = "wasp_nodes";
/// The bucket of access records: tenants, API keys (hashed), registry logins.
pub const ACCESS_BUCKET: &str = "wasp_access";

/// How often a node sends its heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a node waits for the JetStream of a NATS cluster that is starting.
const JETSTREAM_READY: Duration = Duration::from_secs(30);
/// How long a heartbeat keeps a node listed.
pub(crate) const NODE_TTL: Duration = Duration::from_secs(10);

/// How to reach the cluster, and who this node is.
#[derive(Clone)]
pub struct ClusterConfig {
    /// NATS servers, comma-separated (`nats://10.0.0.1:4222,nats://10.0.0.2:4222`).
    pub servers: String,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// Where this node's API answers, for the others and for `wasp nodes`.
    pub url: String,
    /// NATS user and password, if the servers want them.
    pub user_password: Option<(String, String)>,
    /// NATS token, if the servers want one.
    pub token: Option<String>,
    /// NATS nkey seed (`SU...`), if the servers want an nkey login.
    pub nkey: Option<String>,
    /// NATS credentials file (a user JWT and its seed, as `nsc` writes them).
    pub creds: Option<PathBuf>,
    /// PEM file of the CA the NATS servers' certificates chain to (TLS).
    pub ca: Option<PathBuf>,
    /// Copies JetStream keeps of each bucket (the NATS cluster's size, up to 5).
    pub replicas: usize,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("servers", &self.servers)
            .field("node", &self.node)
            .field("url", &self.url)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The settings are wrong.
    #[error("{0}")]
    Config(String),
    /// No NATS server could be reached, or it refused the login.
    #[error("cannot connect to NATS at {servers}: {reason}")]
    Connect {
        /// The servers tried.
        servers: String,
        /// Why.
        reason: String,
    },
    /// The server has no JetStream.
    #[error(
        "the NATS server at {0} has no JetStream, which cluster mode needs: start it with \
         `nats-server -js` (or `jetstream {{}}` in its configuration)"
    )]
    NoJetStream(String),
    /// A bucket could not be made or opened.
    #[error("cannot set up JetStream bucket `{bucket}`: {reason}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// Why.
        reason: String,
    },
    /// The first sync of the registry failed.
    #[error("cannot read the cluster's endpoints: {0}")]
    Sync(String),
}

/// What a bucket entry of `wasp_endpoints` holds.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    /// The node that wrote it.
    origin: String,
    /// The record.
    record: StoredEndpoint,
}

/// A change this node made, to be written to the cluster in order.
enum Change {
    Written(Box<StoredEndpoint>),
    Removed(String),
    Access(AccessChange),
}

/// This node's part of the cluster: what [`Gateway::join`] is given.
struct Node {
    name: String,
    changes: mpsc::UnboundedSender<Change>,
    nodes: Members,
}

/// The nodes heard from, by name, with their last heartbeat; shared by the registry and
/// the job queue (which runs again the jobs of nodes that stopped sending).
pub(crate) type Members = Arc<Mutex<BTreeMap<String, NodeInfo>>>;

/// Whether a node's last heartbeat is recent enough for it to count as alive.
pub(crate) fn alive(members: &Members, name: &str) -> bool {
    let now = now_ms();
    members
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .is_some_and(|n| now.saturating_sub(n.seen_at_ms) <= NODE_TTL.as_millis() as u64)
}

impl wasp_gateway::Cluster for Node {
    fn written(&self, record: StoredEndpoint) {
        let _ = self.changes.send(Change::Written(Box::new(record)));
    }

    fn removed(&self, name: &str) {
        let _ = self.changes.send(Change::Removed(name.to_owned()));
    }

    fn access_changed(&self, change: AccessChange) {
        let _ = self.changes.send(Change::Access(change));
    }

    fn node(&self) -> String {
        self.name.clone()
    }

    fn nodes(&self) -> Vec<NodeInfo> {
        let now = now_ms();
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|n| now.saturating_sub(n.seen_at_ms) <= NODE_TTL.as_millis() as u64)
            .cloned()
            .collect()
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The bucket key of an endpoint: its name in hex (names hold `/` between tenant and
/// name, and bucket keys are kept to a plain alphabet).
fn key_of(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The bucket key of an access record: its table, a dot, its key in hex.
fn access_key(change: &AccessChange) -> String {
    format!("{}.{}", change.table, key_of(&change.key))
}

/// The table and record key an access bucket key stands for.
fn access_of(key: &str) -> Option<(String, String)> {
    let (table, hex) = key.split_once('.')?;
    Some((table.to_owned(), name_of(hex)))
}

/// The endpoint name a bucket key stands for.
fn name_of(key: &str) -> String {
    (0..key.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(key.get(i..i + 2)?, 16).ok())
        .map(char::from)
        .collect()
}

/// The buckets, shared by the node's tasks.
#[derive(Clone)]
struct Buckets {
    endpoints: kv::Store,
    access: kv::Store,
    components: object_store::ObjectStore,
    nodes: kv::Store,
    leases: kv::Store,
    placements: kv::Store,
}

/// The tenant of an endpoint by its qualified name.
fn tenant_of(name: &str) -> &str {
    name.split_once('/')
        .map_or(wasp_gateway::DEFAULT_TENANT, |(t, _)| t)
}

/// The component digests (hex) a record's versions name.
fn digests(record: &StoredEndpoint) -> Vec<String> {
    record
        .spec
        .versions
        .iter()
        .filter_map(|v| v.processor.as_ref())
        .filter_map(|p| match &p.component {
            wasp_core::ComponentRef::Digest(hex) => Some(hex.clone()),
            _ => None,
        })
        .collect()
}

/// Connects, checks JetStream, opens (or makes) the buckets, syncs the registry both ways,
/// and starts the node's tasks: its changes written in order, the others' applied, its
/// heartbeat sent. The node's jobs stay where the gateway keeps them: give it
/// [`Connection::jobs`] when it opens to share them (what `wasp serve --cluster` does).
pub async fn join(gateway: Arc<Gateway>, config: ClusterConfig) -> Result<(), ClusterError> {
    connect(config).await?.join(gateway).await
}

/// A node's connection to its cluster's NATS servers, JetStream checked, before it joins.
pub struct Connection {
    js: jetstream::Context,
    config: ClusterConfig,
    members: Members,
    /// Told when the client has connected again after losing its server.
    reconnected: Arc<tokio::sync::Notify>,
}

impl Connection {
    /// The cluster's job queue, shared by every node; `lease` is how long the jobs of a
    /// node that stopped answering wait before another node runs them.
    pub async fn jobs(&self, lease: Duration) -> Result<JetStreamQueue, ClusterError> {
        JetStreamQueue::open(
            &self.js,
            &self.config.node,
            self.members.clone(),
            self.reconnected.clone(),
            self.config.replicas,
            lease,
        )
        .await
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.config.node
    }

    /// Sets where this node's API answers (for the others and for `wasp nodes`).
    pub fn set_url(&mut self, url: String) {
        self.config.url = url;
    }

    /// Joins: see [`join`].
    pub async fn join(self, gateway: Arc<Gateway>) -> Result<(), ClusterError> {
        let Self {
            js,
            config,
            members,
            reconnected: _,
        } = self;
        let buckets = open_buckets(&js, config.replicas).await?;
        let (changes, queued) = mpsc::unbounded_channel();
        let node = Arc::new(Node {
            name: config.node.clone(),
            changes,
            nodes: members,
        });
        let revisions = Arc::new(Mutex::new(HashMap::new()));
        // Tenants and keys first: the endpoints are theirs.
        let access_from = sync_access(&gateway, &buckets, &revisions).await?;
        let from = sync(&gateway, &buckets, &revisions).await?;
        gateway.join(node.clone());
        tokio::spawn(write_changes(
            gateway.clone(),
            buckets.clone(),
            config.node.clone(),
            queued,
            revisions.clone(),
        ));
        tokio::spawn(apply_access_changes(
            gateway.clone(),
            buckets.access.clone(),
            access_from,
            revisions.clone(),
        ));
        tokio::spawn(apply_changes(
            gateway.clone(),
            buckets.clone(),
            from,
            revisions,
        ));
        tokio::spawn(scaling::follow(gateway.clone(), buckets.placements.clone()));
        tokio::spawn(scaling::lead(
            gateway.clone(),
            buckets.leases.clone(),
            buckets.placements.clone(),
            node.clone(),
        ));
        tokio::spawn(heartbeat(gateway, buckets, config, node));
        Ok(())
    }
}

/// Connects to the cluster's NATS servers and checks that they run JetStream.
pub async fn connect(config: ClusterConfig) -> Result<Connection, ClusterError> {
    if config.node.is_empty()
        || !config
            .node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        return Err(ClusterError::Config(format!(
            "--node-name `{}` must be letters, digits, `-` and `_`",
            config.node
        )));
    }
    let connect_error = |reason: String| ClusterError::Connect {
        servers: config.servers.clone(),
        reason,
    };
    let addresses = config
        .servers
        .split(',')
        .map(|s| s.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClusterError::Config(format!("--cluster `{}`: {e}", config.servers)))?;
    let reconnected = Arc::new(tokio::sync::Notify::new());
    let told = reconnected.clone();
    let mut options = async_nats::ConnectOptions::new()
        .event_callback(move |event| {
            let told = told.clone();
            async move {
                match event {
                    async_nats::Event::Connected => told.notify_one(),
                    async_nats::Event::Disconnected => tracing::warn!("lost the NATS server"),
                    _ => {}
                }
            }
        })
        .name(format!("wasp {}", config.node))
        .connection_timeout(Duration::from_secs(5));
    if let Some((user, password)) = &config.user_password {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(seed) = &config.nkey {
        options = options.nkey(seed.clone());
    }
    if let Some(creds) = &config.creds {
        options = options.credentials_file(creds).await.map_err(|e| {
            ClusterError::Config(format!("--cluster-creds `{}`: {e}", creds.display()))
        })?;
    }
    if let Some(ca) = &config.ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let client = options
        .connect(addresses)
        .await
        .map_err(|e| connect_error(e.to_string()))?;
    if !client.server_info().jetstream {
        return Err(ClusterError::NoJetStream(config.servers.clone()));
    }
    let js = jetstream::new(client);
    // A NATS cluster that has just started elects its JetStream leader first.
    let deadline = tokio::time::Instant::now() + JETSTREAM_READY;
    while let Err(e) = js.query_account().await {
        if tokio::time::Instant::now() >= deadline {
            return Err(connect_error(format!("JetStream is not ready: {e}")));
        }
        tracing::info!("waiting for JetStream to be ready: {e}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(Connection {
        js,
        config,
        members: Members::default(),
        reconnected,
    })
}

/// Opens key-value bucket `config.bucket`, making it as `config` says when there is none.
pub(crate) async fn key_value(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, ClusterError> {
    if let Ok(store) = js.get_key_value(config.bucket.as_str()).await {
        return Ok(store);
    }
    let bucket = config.bucket.clone();
    js.create_key_value(config)
        .await
        .map_err(|e| ClusterError::Bucket {
            bucket,
            reason: e.to_string(),
        })
}

async fn open_buckets(js: &jetstream::Context, replicas: usize) -> Result<Buckets, ClusterError> {
    let replicas = replicas.clamp(1, 5);
    // On file, every one: a NATS restart keeps them all.
    let config = |bucket: &str, description: &str| kv::Config {
        bucket: bucket.into(),
        description: description.into(),
        history: 5,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    let endpoints = key_value(js, config(ENDPOINTS_BUCKET, "wasp endpoint records")).await?;
    let access = key_value(
        js,
        config(ACCESS_BUCKET, "wasp tenants, API keys and registry logins"),
    )
    .await?;
    let nodes = key_value(
        js,
        kv::Config {
            history: 1,
            max_age: NODE_TTL,
            ..config(NODES_BUCKET, "wasp node heartbeats")
        },
    )
    .await?;
    let leases = key_value(
        js,
        kv::Config {
            history: 1,
            max_age: scaling::LEASE_TTL,
            ..config(SCALING_BUCKET, "wasp: which node scales the cluster")
        },
    )
    .await?;
    let placements = key_value(
        js,
        kv::Config {
            history: 1,
            ..config(PLACEMENTS_BUCKET, "wasp: where each version's workers go")
        },
    )
    .await?;
    let components = match js.get_object_store(COMPONENTS_BUCKET).await {
        Ok(store) => store,
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: COMPONENTS_BUCKET.into(),
                description: Some("wasp components, by SHA-256".into()),
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Bucket {
                bucket: COMPONENTS_BUCKET.into(),
                reason: e.to_string(),
            })?,
    };
    Ok(Buckets {
        endpoints,
        access,
        components,
        nodes,
        leases,
        placements,
    })
}

/// The first sync: the bucket's records applied here, and this node's records that the
/// bucket lacks removed (or, into an empty bucket, written). Returns the revision to
/// follow changes from.
async fn sync(
    gateway: &Arc<Gateway>,
    buckets: &Buckets,
    revisions: &Mutex<HashMap<String, u64>>,
) -> Result<u64, ClusterError> {
    let status = buckets
        .endpoints
        .status()
        .await
        .map_err(|e| ClusterError::Sync(e.to_string()))?;
    let last = status.info.state.last_sequence;
    let mut keys = buckets
        .endpoints
        .keys()
        .await
        .map_err(|e| ClusterError::Sync(e.to_string()))?;
    let mut present = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| ClusterError::Sync(e.to_string()))?;
        let Some(entry) = buckets
            .endpoints
            .entry(key.clone())
            .await
            .map_err(|e| ClusterError::Sync(e.to_string()))?
        else {
            continue;
        };
        if !matches!(entry.operation, kv::Operation::Put) {
            continue;
        }
        revisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, entry.revision);
        match serde_json::from_slice::<Entry>(&entry.value) {
            Ok(e) => present.push(e.record),
            Err(e) => {
                tracing::error!(key = %entry.key, "a cluster endpoint record is corrupt ({e}); left alone")
            }
        }
    }
    if present.is_empty() {
        // The first node of a new cluster: what it has becomes the cluster's.
        for record in gateway.records() {
            publish(gateway, buckets, "", &record)
                .await
                .map_err(ClusterError::Sync)?;
        }
        return Ok(last + 1);
    }
    let names: Vec<String> = present.iter().map(|r| r.spec.name.clone()).collect();
    for record in gateway.records() {
        if !names.contains(&record.spec.name) {
            tracing::warn!(endpoint = %record.spec.name, "not in the cluster's registry: removed here");
            if let Err(e) = gateway.remove_from_peer(&record.spec.name).await {
                tracing::error!(endpoint = %record.spec.name, "cannot remove: {e}");
            }
        }
    }
    for record in present {
        apply(gateway, buckets, record).await;
    }
    Ok(last + 1)
}

/// Writes (or removes) an access record in the bucket; the revision written.
async fn write_access(bucket: &kv::Store, change: &AccessChange) -> Result<u64, String> {
    let key = access_key(change);
    match &change.value {
        Some(value) => bucket
            .put(&key, Bytes::from(value.clone()))
            .await
            .map_err(|e| format!("writing {}: {e}", change.table)),
        None => bucket
            .delete(&key)
            .await
            .map(|()| 0)
            .map_err(|e| format!("removing from {}: {e}", change.table)),
    }
}

/// The first sync of access records, as a union with tombstones: the bucket's records are
/// applied here; this node's records the bucket has removed are removed here; the others
/// this node has are written to the bucket. Returns the revision to follow from.
async fn sync_access(
    gateway: &Arc<Gateway>,
    buckets: &Buckets,
    revisions: &Mutex<HashMap<String, u64>>,
) -> Result<u64, ClusterError> {
    let sync_error = |e: &dyn std::fmt::Display| ClusterError::Sync(format!("access records: {e}"));
    let bucket = &buckets.access;
    let last = bucket
        .status()
        .await
        .map_err(|e| sync_error(&e))?
        .info
        .state
        .last_sequence;
    let mut keys = bucket.keys().await.map_err(|e| sync_error(&e))?;
    let mut present = std::collections::HashSet::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| sync_error(&e))?;
        let Some(entry) = bucket
            .entry(key.clone())
            .await
            .map_err(|e| sync_error(&e))?
        else {
            continue;
        };
        let Some((table, record)) = access_of(&key) else {
            continue;
        };
        if !matches!(entry.operation, kv::Operation::Put) {
            continue;
        }
        present.insert(key.clone());
        revisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, entry.revision);
        let change = AccessChange {
            table,
            key: record,
            value: Some(entry.value.to_vec()),
        };
        if let Err(e) = gateway.apply_access_from_peer(&change) {
            tracing::error!("cannot apply the cluster's access record: {e}");
        }
    }
    let local = gateway.access_records().map_err(|e| sync_error(&e))?;
    for mut change in local {
        let key = access_key(&change);
        if present.contains(&key) {
            continue;
        }
        let removed = bucket
            .entry(key.clone())
            .await
            .map_err(|e| sync_error(&e))?
            .is_some_and(|e| !matches!(e.operation, kv::Operation::Put));
        if removed {
            // Revoked (or removed) while this node was away: not brought back.
            change.value = None;
            if let Err(e) = gateway.apply_access_from_peer(&change) {
                tracing::error!("cannot remove an access record the cluster removed: {e}");
            }
        } else {
            let revision = write_access(bucket, &change)
                .await
                .map_err(|e| sync_error(&e))?;
            revisions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, revision);
        }
    }
    Ok(last + 1)
}

/// Applies the access changes the bucket sees from revision `from` on.
async fn apply_access_changes(
    gateway: Arc<Gateway>,
    bucket: kv::Store,
    mut from: u64,
    revisions: Arc<Mutex<HashMap<String, u64>>>,
) {
    loop {
        let mut watch = match bucket.watch_all_from_revision(from).await {
            Ok(watch) => watch,
            Err(e) => {
                tracing::warn!("cannot follow the cluster's access records (retrying): {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else {
                break;
            };
            from = entry.revision + 1;
            if !newer(&revisions, &entry.key, entry.revision) {
                continue;
            }
            let Some((table, key)) = access_of(&entry.key) else {
                continue;
            };
            let value = matches!(entry.operation, kv::Operation::Put).then(|| entry.value.to_vec());
            if let Err(e) = gateway.apply_access_from_peer(&AccessChange { table, key, value }) {
                tracing::error!("cannot apply the cluster's access record: {e}");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `revision` of `key` is newer than any this node wrote or applied (and if so,
/// it is now the newest).
fn newer(revisions: &Mutex<HashMap<String, u64>>, key: &str, revision: u64) -> bool {
    let mut known = revisions.lock().unwrap_or_else(|e| e.into_inner());
    let at = known.entry(key.to_owned()).or_insert(0);
    let newer = revision > *at;
    *at = (*at).max(revision);
    newer
}

/// Writes a record's components (those the store lacks) and then the record.
async fn publish(
    gateway: &Arc<Gateway>,
    buckets: &Buckets,
    origin: &str,
    record: &StoredEndpoint,
) -> Result<u64, String> {
    let tenant = tenant_of(&record.spec.name);
    for hex in digests(record) {
        if buckets.components.info(&hex).await.is_ok() {
            continue;
        }
        let bytes = gateway
            .tenant_component(tenant, &hex)
            .await
            .map_err(|e| format!("component sha256:{hex}: {e}"))?;
        let mut reader = bytes.as_slice();
        buckets
            .components
            .put(hex.as_str(), &mut reader)
            .await
            .map_err(|e| format!("writing component sha256:{hex}: {e}"))?;
    }
    let entry = Entry {
        origin: origin.to_owned(),
        record: record.clone(),
    };
    let value = serde_json::to_vec(&entry).map_err(|e| e.to_string())?;
    buckets
        .endpoints
        .put(key_of(&record.spec.name), Bytes::from(value))
        .await
        .map_err(|e| format!("writing endpoint `{}`: {e}", record.spec.name))
}

/// Fetches a record's components this node lacks, then applies the record.
async fn apply(gateway: &Arc<Gateway>, buckets: &Buckets, record: StoredEndpoint) {
    let name = record.spec.name.clone();
    let tenant = tenant_of(&name).to_owned();
    for hex in digests(&record) {
        if gateway.has_component(&tenant, &hex).await.unwrap_or(false) {
            continue;
        }
        let fetched = async {
            let mut object = buckets
                .components
                .get(hex.as_str())
                .await
                .map_err(|e| e.to_string())?;
            let mut bytes = Vec::new();
            object
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| e.to_string())?;
            let got = gateway
                .upload_component(&tenant, bytes.into())
                .await
                .map_err(|e| e.to_string())?;
            if got == hex {
                Ok(())
            } else {
                Err(format!("its bytes are sha256:{got}"))
            }
        };
        if let Err(e) = fetched.await {
            tracing::error!(endpoint = %name, component = %hex, "cannot fetch the component from the cluster: {e}");
            return;
        }
    }
    if let Err(e) = gateway.apply_from_peer(record).await {
        tracing::error!(endpoint = %name, "cannot apply the cluster's record: {e}");
    }
}

/// Writes this node's changes to the cluster, in the order they were made.
async fn write_changes(
    gateway: Arc<Gateway>,
    buckets: Buckets,
    origin: String,
    mut queued: mpsc::UnboundedReceiver<Change>,
    revisions: Arc<Mutex<HashMap<String, u64>>>,
) {
    while let Some(change) = queued.recv().await {
        // A NATS outage delays the change, it does not lose it.
        let mut delay = Duration::from_millis(200);
        loop {
            let written = match &change {
                Change::Written(record) => publish(&gateway, &buckets, &origin, record)
                    .await
                    .map(|revision| (key_of(&record.spec.name), revision)),
                Change::Removed(name) => buckets
                    .endpoints
                    .delete(key_of(name))
                    .await
                    .map(|()| (key_of(name), 0))
                    .map_err(|e| e.to_string()),
                Change::Access(change) => write_access(&buckets.access, change)
                    .await
                    .map(|revision| (access_key(change), revision)),
            };
            match written {
                Ok((key, revision)) => {
                    let mut known = revisions.lock().unwrap_or_else(|e| e.into_inner());
                    let at = known.entry(key).or_insert(0);
                    *at = (*at).max(revision);
                    break;
                }
                Err(e) => {
                    tracing::warn!("cannot write a change to the cluster (retrying): {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Applies the changes the bucket sees from revision `from` on, following it again after
/// a lost connection. An entry no newer than what this node wrote or applied for its key
/// is skipped, so that the registry converges on the bucket's last word.
async fn apply_changes(
    gateway: Arc<Gateway>,
    buckets: Buckets,
    mut from: u64,
    revisions: Arc<Mutex<HashMap<String, u64>>>,
) {
    loop {
        let mut watch = match buckets.endpoints.watch_all_from_revision(from).await {
            Ok(watch) => watch,
            Err(e) => {
                tracing::warn!("cannot follow the cluster's endpoints (retrying): {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(entry) = watch.next().await {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!("the cluster's endpoint feed broke ({e}); following it again");
                    break;
                }
            };
            from = entry.revision + 1;
            if !newer(&revisions, &entry.key, entry.revision) {
                continue;
            }
            match entry.operation {
                kv::Operation::Put => match serde_json::from_slice::<Entry>(&entry.value) {
                    Ok(e) => apply(&gateway, &buckets, e.record).await,
                    Err(e) => {
                        tracing::error!(key = %entry.key, "a cluster endpoint record is corrupt ({e}); left alone")
                    }
                },
                kv::Operation::Delete | kv::Operation::Purge => {
                    let name = name_of(&entry.key);
                    if let Err(e) = gateway.remove_from_peer(&name).await {
                        tracing::error!(endpoint = %name, "cannot remove: {e}");
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends this node's heartbeat every [`HEARTBEAT`].
async fn heartbeat(
    gateway: Arc<Gateway>,
    buckets: Buckets,
    config: ClusterConfig,
    node: Arc<Node>,
) {
    tokio::spawn(follow_nodes(buckets.nodes.clone(), node.clone()));
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tick.tick().await;
        let info = gateway.node_info(&config.node, &config.url);
        // This node knows itself at once, whatever NATS does.
        node.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(info.name.clone(), info.clone());
        if let Ok(value) = serde_json::to_vec(&info)
            && let Err(e) = buckets.nodes.put(&config.node, value.into()).await
        {
            tracing::warn!("cannot send this node's heartbeat: {e}");
        }
    }
}

/// Keeps `node`'s view of the others from their heartbeats. Entries too old are left out
/// when the nodes are listed.
async fn follow_nodes(bucket: kv::Store, node: Arc<Node>) {
    follow_bucket(bucket, "the cluster's heartbeats", |entry| {
        if !matches!(entry.operation, kv::Operation::Put) {
            return;
        }
        if let Ok(other) = serde_json::from_slice::<NodeInfo>(&entry.value)
            && other.name != node.name
        {
            node.nodes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(other.name.clone(), other);
        }
    })
    .await
}

/// Follows `bucket` with one watch (the last entry of each key, then each change) into
/// `apply`, again after a lost connection; `what` names it in the log.
pub(crate) async fn follow_bucket(bucket: kv::Store, what: &str, mut apply: impl FnMut(kv::Entry)) {
    loop {
        match bucket.watch_with_history(">").await {
            Ok(mut watch) => {
                while let Some(Ok(entry)) = watch.next().await {
                    apply(entry);
                }
            }
            Err(e) => tracing::warn!("cannot follow {what} (retrying): {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_keys_are_hex_and_come_back() {
        let key = key_of("acme/embed-1");
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(name_of(&key), "acme/embed-1");
    }
}
