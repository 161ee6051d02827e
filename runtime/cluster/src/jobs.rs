//! Jobs on JetStream: the [`JobQueue`] of a cluster, shared by every node.
//!
//! - Each job's record (state, attempts, output) is a key of the key-value bucket
//!   `wasp_jobs`, named by the job's id; every change is a compare-and-set on the key's
//!   revision, so that of two nodes that race for a job one wins and the other sees it.
//! - Each job that waits for a worker is a message (its id) in the work-queue stream
//!   `WASP_JOBS`, on subject `wasp.jobs.<endpoint>.<priority>` (the endpoint as a short
//!   hash). A durable pull consumer per endpoint and priority is shared by every node: a
//!   node whose runner has room fetches from it (`high`, then `normal`, then `low`).
//! - A fetched message is the job's lease. The node holding it tells JetStream that it
//!   works on it (`+WPI`) every third of the lease while the attempt runs; a node that dies
//!   stops doing so, and after the lease (`AckWait`) the message goes to another node,
//!   which ends the lost attempt (`lease_expired`) and starts the next one.
//! - The end of an attempt is written to the record first, then the message is acked
//!   (`+ACK`), or given back with the retry delay (`-NAK`), or ended for good (`+TERM`, the
//!   dead letter; every attempt's error stays in the record). A message whose record is
//!   already final is acked unseen: each job has one result however often it ran.
//! - Bodies over [`INLINE_MAX`] go to the object store `wasp_job_blobs`.
//!
//! Every node follows the bucket with one watch, for the counts, backlogs and listings
//! that the API and the autoscaler read without a round trip.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, kv, object_store, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::Digest as _;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;
use wasp_jobs::{
    Backlog, BoxFuture, Counts, Delivery, Failure, INLINE_MAX, Job, JobError, JobQueue, JobState,
    ListFilter, NewJob, Outcome, Payload, Priority,
};

use crate::ClusterError;

/// The bucket of job records.
pub const JOBS_BUCKET: &str = "wasp_jobs";
/// The object store of large job bodies.
pub const JOB_BLOBS_BUCKET: &str = "wasp_job_blobs";
/// The work-queue stream of jobs waiting for a worker.
pub const JOBS_STREAM: &str = "WASP_JOBS";

/// How often a compare-and-set is tried again when another node changed the record.
const CAS_TRIES: usize = 16;
/// Longest wait for the next message of a fetch.
const FETCH_PATIENCE: Duration = Duration::from_secs(5);
/// How often unfinished jobs the watch has not spoken of for as long are read again.
const VERIFY_EVERY: Duration = Duration::from_secs(10);
/// Most jobs read again at a time.
const VERIFY_MAX: usize = 1_000;
/// How long a message whose record is not there yet is kept (a submit writes both at once).
const RECORD_WAIT_MS: u64 = 30_000;

/// The jobs of a cluster (see the module docs).
pub struct JetStreamQueue {
    shared: Arc<Shared>,
}

struct Shared {
    js: jetstream::Context,
    records: kv::Store,
    blobs: object_store::ObjectStore,
    stream: stream::Stream,
    lease: Duration,
    replicas: usize,
    /// This node's name, written on the attempts it runs.
    node: String,
    /// The cluster's nodes, by their heartbeats.
    members: crate::Members,
    consumers: tokio::sync::Mutex<HashMap<String, consumer::PullConsumer>>,
    /// Messages of the attempts that run on this node, by job id.
    held: Mutex<HashMap<String, Held>>,
    index: Mutex<Index>,
    signals: Mutex<HashMap<String, Arc<Notify>>>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Told of jobs that other nodes ended.
    ended: Mutex<Option<EndedSink>>,
}

/// Where jobs that other nodes ended are told.
type EndedSink = Arc<dyn Fn(Job) + Send + Sync>;

/// A message this node holds: the lease of one attempt.
struct Held {
    attempt: u32,
    message: jetstream::Message,
}

/// What this node knows of every job, from the bucket's watch and its own writes.
#[derive(Default)]
struct Index {
    jobs: HashMap<String, Summary>,
    lanes: HashMap<String, Lane>,
}

/// The little of a job that counts and listings need.
#[derive(Clone)]
struct Summary {
    endpoint: String,
    state: JobState,
    priority: Priority,
    not_before_ms: u64,
    expires_ms: Option<u64>,
    webhook_pending: bool,
    retries: u64,
    revision: u64,
    /// When this node learnt of this state (ms since the epoch).
    learned_ms: u64,
    /// The node of the running attempt.
    node: Option<String>,
}

/// One endpoint's jobs.
#[derive(Default)]
struct Lane {
    counts: Counts,
    queued: HashSet<String>,
    running: HashSet<String>,
}

impl Index {
    fn lane(&mut self, endpoint: &str) -> &mut Lane {
        if !self.lanes.contains_key(endpoint) {
            self.lanes.insert(endpoint.to_owned(), Lane::default());
        }
        self.lanes
            .get_mut(endpoint)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// A job as of `revision`; `None` removes it. Older news than what is known is
    /// ignored. Returns whether the job is queued now, and whether this ended it.
    fn apply(&mut self, id: &str, job: Option<&Job>, revision: u64) -> (bool, bool) {
        let mut was_final = false;
        if let Some(old) = self.jobs.get(id) {
            if old.revision >= revision {
                return (false, false);
            }
            was_final = old.state.is_final();
            let old = old.clone();
            let lane = self.lane(&old.endpoint);
            lane.counts.add(old.state, -1);
            lane.counts.retried = lane.counts.retried.saturating_sub(old.retries);
            lane.queued.remove(id);
            lane.running.remove(id);
            self.jobs.remove(id);
        }
        let Some(job) = job else {
            return (false, false);
        };
        let summary = Summary {
            endpoint: job.endpoint.clone(),
            state: job.state,
            priority: job.policy.priority,
            not_before_ms: job.not_before_ms,
            expires_ms: job.expires_ms,
            webhook_pending: job.state.is_final()
                && job.webhook.as_ref().is_some_and(|w| !w.delivered),
            retries: (job.attempts.len() as u64).saturating_sub(1),
            revision,
            learned_ms: now_ms(),
            node: job.attempts.last().and_then(|a| a.node.clone()),
        };
        let lane = self.lane(&job.endpoint);
        lane.counts.add(job.state, 1);
        lane.counts.retried += summary.retries;
        let queued = job.state == JobState::InQueue;
        if queued {
            lane.queued.insert(id.to_owned());
        }
        if job.state == JobState::InProgress {
            lane.running.insert(id.to_owned());
        }
        self.jobs.insert(id.to_owned(), summary);
        (queued, job.state.is_final() && !was_final)
    }
}

/// The short name of an endpoint in subjects and consumer names.
fn lane_name(endpoint: &str) -> String {
    let digest = sha2::Sha256::digest(endpoint.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn priority_name(priority: Priority) -> &'static str {
    match priority {
        Priority::High => "high",
        Priority::Normal => "normal",
        Priority::Low => "low",
    }
}

fn subject(endpoint: &str, priority: Priority) -> String {
    format!(
        "wasp.jobs.{}.{}",
        lane_name(endpoint),
        priority_name(priority)
    )
}

fn now_ms() -> u64 {
    crate::now_ms()
}

/// What NATS answered, or did not: the cluster's store cannot be reached now.
fn nats_error(what: &str, e: impl std::fmt::Display) -> JobError {
    JobError::Unavailable(format!("{what}: {e}"))
}

fn encode(job: &Job) -> Result<Bytes, JobError> {
    serde_json::to_vec(job)
        .map(Bytes::from)
        .map_err(|e| JobError::Store(format!("encoding a job: {e}")))
}

fn decode(bytes: &[u8]) -> Result<Job, JobError> {
    serde_json::from_slice(bytes)
        .map_err(|e| JobError::Store(format!("a job record is corrupt: {e}")))
}

/// Blob names a record refers to.
fn blob_names(job: &Job) -> Vec<String> {
    let mut names = Vec::new();
    if let Payload::Blob { file, .. } = &job.request.body {
        names.push(file.clone());
    }
    if let Some(Payload::Blob { file, .. }) = job.output.as_ref().map(|o| &o.body) {
        names.push(file.clone());
    }
    names
}

impl JetStreamQueue {
    /// Opens (or makes) the bucket, the object store and the stream, loads what the bucket
    /// holds, and follows it. `lease` is how long a node that stopped answering keeps its
    /// jobs before another node takes them.
    pub async fn open(
        js: &jetstream::Context,
        node: &str,
        members: crate::Members,
        reconnected: Arc<Notify>,
        replicas: usize,
        lease: Duration,
    ) -> Result<Self, ClusterError> {
        let replicas = replicas.clamp(1, 5);
        let bucket_error = |bucket: &str, e: &dyn std::fmt::Display| ClusterError::Bucket {
            bucket: bucket.to_owned(),
            reason: e.to_string(),
        };
        let records = crate::key_value(
            js,
            kv::Config {
                bucket: JOBS_BUCKET.into(),
                description: "wasp job records".into(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        let blobs = match js.get_object_store(JOB_BLOBS_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: JOB_BLOBS_BUCKET.into(),
                    description: Some("wasp job inputs and outputs too large for a record".into()),
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| bucket_error(JOB_BLOBS_BUCKET, &e))?,
        };
        let stream = js
            .get_or_create_stream(stream::Config {
                name: JOBS_STREAM.into(),
                description: Some("wasp jobs waiting for a worker".into()),
                subjects: vec!["wasp.jobs.>".into()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| bucket_error(JOBS_STREAM, &e))?;
        let shared = Arc::new(Shared {
            js: js.clone(),
            records,
            blobs,
            stream,
            lease: lease.max(Duration::from_secs(1)),
            replicas,
            node: node.to_owned(),
            members,
            consumers: tokio::sync::Mutex::default(),
            held: Mutex::default(),
            index: Mutex::default(),
            signals: Mutex::default(),
            tasks: Mutex::default(),
            ended: Mutex::default(),
        });
        let watch = shared
            .load()
            .await
            .map_err(|e| bucket_error(JOBS_BUCKET, &e))?;
        // The first connection is no reconnection.
        let _ = futures_util::FutureExt::now_or_never(reconnected.notified());
        let follow = tokio::spawn(follow(Arc::downgrade(&shared), watch, reconnected));
        let progress = tokio::spawn(progress(Arc::downgrade(&shared)));
        shared
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([follow.abort_handle(), progress.abort_handle()]);
        Ok(Self { shared })
    }
}

impl Shared {
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn signal(&self, endpoint: &str) -> Arc<Notify> {
        self.signals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(endpoint.to_owned())
            .or_default()
            .clone()
    }

    /// A job this node wrote (at `revision`) or learnt of; whether this ended it.
    fn learn(&self, id: &str, job: Option<&Job>, revision: u64) -> bool {
        let (queued, ended) = self.index().apply(id, job, revision);
        if queued && let Some(job) = job {
            self.signal(&job.endpoint).notify_one();
        }
        ended
    }

    /// Reads every record into the index (and forgets the jobs that are no longer there);
    /// returns the watch that follows what comes after.
    async fn load(&self) -> Result<kv::Watch, String> {
        let state = self
            .records
            .status()
            .await
            .map_err(|e| e.to_string())?
            .info
            .state;
        let mut watch = self
            .records
            .watch_with_history(">")
            .await
            .map_err(|e| e.to_string())?;
        let mut seen = HashSet::new();
        if state.messages > 0 {
            loop {
                let entry = match tokio::time::timeout(FETCH_PATIENCE, watch.next()).await {
                    Ok(Some(entry)) => entry.map_err(|e| e.to_string())?,
                    Ok(None) => return Err("the watch of the job bucket ended".into()),
                    Err(_) => return Err("the job bucket stopped answering".into()),
                };
                self.learn_entry(&entry);
                seen.insert(entry.key.clone());
                if entry.delta == 0 || entry.seen_current {
                    break;
                }
            }
        }
        let mut index = self.index();
        let gone: Vec<String> = index
            .jobs
            .iter()
            .filter(|(id, s)| s.revision <= state.last_sequence && !seen.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            index.apply(&id, None, u64::MAX);
        }
        tracing::info!(jobs = index.jobs.len(), "loaded the cluster's jobs");
        Ok(watch)
    }

    /// Reads again the unfinished jobs the index has not heard of for a while (a watch
    /// can miss changes while the NATS servers fail over); at most `VERIFY_MAX` a time.
    async fn verify(&self) {
        let before = now_ms().saturating_sub(VERIFY_EVERY.as_millis() as u64);
        let stale: Vec<String> = self
            .index()
            .jobs
            .iter()
            .filter(|(_, s)| !s.state.is_final() && s.learned_ms < before)
            .map(|(id, _)| id.clone())
            .take(VERIFY_MAX)
            .collect();
        for id in stale {
            match self.records.entry(&id).await {
                Ok(Some(entry)) => self.learn_entry(&entry),
                Ok(None) => {
                    self.index().apply(&id, None, u64::MAX);
                }
                Err(e) => {
                    tracing::debug!("cannot check the job index: {e}");
                    return;
                }
            }
        }
        self.requeue_orphans().await;
    }

    /// Whether a running job has nobody to finish it: its node is gone, or is this node,
    /// which does not hold it (restarted, or its end could not be written).
    fn orphaned(&self, id: &str, s: &Summary, held: &HashMap<String, Held>) -> bool {
        match &s.node {
            Some(node) if *node == self.node => !held.contains_key(id),
            Some(node) => !crate::alive(&self.members, node),
            None => true,
        }
    }

    /// Queues again the running jobs that stayed orphaned for three leases: their message
    /// should have come back by then, and if NATS lost it (a server killed before it
    /// wrote it out) the job would wait for ever. One node does it: the job's own, else
    /// the first alive by name. A message too many is harmless: the job's record decides.
    async fn requeue_orphans(&self) {
        let now = now_ms();
        let before = now.saturating_sub((self.lease * 3).max(VERIFY_EVERY).as_millis() as u64);
        let first_alive = {
            let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            members
                .values()
                .filter(|n| now.saturating_sub(n.seen_at_ms) <= crate::NODE_TTL.as_millis() as u64)
                .map(|n| n.name.clone())
                .min()
        };
        let orphans: Vec<(String, String, Priority)> = {
            let held = self.held();
            let mut index = self.index();
            let ids: Vec<String> = index
                .lanes
                .values()
                .flat_map(|lane| lane.running.iter().cloned())
                .collect();
            let mut out = Vec::new();
            for id in ids {
                let Some(s) = index.jobs.get_mut(&id) else {
                    continue;
                };
                let mine = match &s.node {
                    Some(node) if *node == self.node => true,
                    _ => first_alive.as_deref() == Some(self.node.as_str()),
                };
                if s.learned_ms < before && mine && self.orphaned(&id, s, &held) {
                    s.learned_ms = now;
                    out.push((id, s.endpoint.clone(), s.priority));
                }
            }
            out
        };
        for (id, endpoint, priority) in orphans {
            tracing::warn!(job = %id, endpoint = %endpoint, "a running job's node is gone and its message did not come back: queued again");
            let published = async {
                self.js
                    .publish(subject(&endpoint, priority), Bytes::from(id.clone()))
                    .await?
                    .await
            }
            .await;
            if let Err(e) = published {
                tracing::warn!(job = %id, "cannot queue the job again: {e}");
            }
        }
    }

    fn learn_entry(&self, entry: &kv::Entry) {
        match entry.operation {
            kv::Operation::Put => match decode(&entry.value) {
                Ok(job) => {
                    // Cancelled on another node while it runs here: its message goes (the
                    // gateway stops the attempt when told below).
                    if job.state == JobState::Cancelled
                        && let Some(held) = self.held().remove(&job.id)
                    {
                        tokio::spawn(async move { ack(&held.message, AckKind::Term).await });
                    }
                    if self.learn(&entry.key, Some(&job), entry.revision) {
                        let sink = self.ended.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        if let Some(sink) = sink {
                            sink(job);
                        }
                    }
                }
                Err(e) => tracing::error!(job = %entry.key, "{e}; left alone"),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                self.learn(&entry.key, None, entry.revision);
            }
        }
    }

    /// The record of a job and its revision.
    async fn entry(&self, id: &str) -> Result<Option<(Job, u64)>, JobError> {
        if !wasp_jobs::is_id(id) {
            return Ok(None);
        }
        match self.records.entry(id).await {
            Ok(Some(entry)) if matches!(entry.operation, kv::Operation::Put) => {
                Ok(Some((decode(&entry.value)?, entry.revision)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(nats_error("reading a job", e)),
        }
    }

    /// Writes a changed record over `revision`; `None` when another write came first.
    async fn update(&self, job: &Job, revision: u64) -> Result<Option<u64>, JobError> {
        match self.records.update(&job.id, encode(job)?, revision).await {
            Ok(revision) => {
                self.learn(&job.id, Some(job), revision);
                Ok(Some(revision))
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(nats_error("writing a job", e)),
        }
    }

    /// Reads a job, changes it with `change` (which may refuse with an error, or leave it
    /// as it is with `None`), and writes it back, again while another node wrote first.
    async fn modify<T>(
        &self,
        id: &str,
        mut change: impl FnMut(&mut Job) -> Result<Option<T>, JobError>,
    ) -> Result<Option<(Job, T)>, JobError> {
        for _ in 0..CAS_TRIES {
            let Some((mut job, revision)) = self.entry(id).await? else {
                return Err(JobError::NotFound(id.to_owned()));
            };
            let Some(out) = change(&mut job)? else {
                return Ok(None);
            };
            if self.update(&job, revision).await?.is_some() {
                return Ok(Some((job, out)));
            }
        }
        Err(JobError::Store(format!(
            "job `{id}` kept changing under this node; try again"
        )))
    }

    /// Bytes to a blob named `name`, unless they are small enough to stay in the record.
    async fn stash(&self, name: String, bytes: Vec<u8>) -> Result<Payload, JobError> {
        if bytes.len() <= INLINE_MAX {
            return Ok(Payload::Inline(bytes));
        }
        let len = bytes.len() as u64;
        let mut reader = std::io::Cursor::new(bytes);
        self.blobs
            .put(name.as_str(), &mut reader)
            .await
            .map_err(|e| nats_error("writing a job body", e))?;
        Ok(Payload::Blob { file: name, len })
    }

    async fn unlink(&self, names: Vec<String>) {
        for name in names {
            if let Err(e) = self.blobs.delete(name.as_str()).await {
                tracing::debug!(blob = %name, "cannot remove a job body: {e}");
            }
        }
    }

    /// The shared consumer of an endpoint's jobs of one priority.
    async fn consumer(
        &self,
        endpoint: &str,
        priority: Priority,
    ) -> Result<consumer::PullConsumer, JobError> {
        let name = format!("jobs_{}_{}", lane_name(endpoint), priority_name(priority));
        let mut consumers = self.consumers.lock().await;
        if let Some(c) = consumers.get(&name) {
            return Ok(c.clone());
        }
        let made = self
            .stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    description: Some(format!(
                        "{} jobs of endpoint {endpoint}",
                        priority_name(priority)
                    )),
                    filter_subject: subject(endpoint, priority),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.lease,
                    // Attempts are counted in the record, where their errors are kept.
                    max_deliver: -1,
                    max_ack_pending: 100_000,
                    num_replicas: self.replicas,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| nats_error("opening the job consumer", e))?;
        consumers.insert(name, made.clone());
        Ok(made)
    }

    /// What a fetched message comes to: the job, when this node now runs an attempt of it.
    async fn claim(
        &self,
        message: jetstream::Message,
        endpoint: &str,
    ) -> Result<Option<Job>, JobError> {
        let id = String::from_utf8_lossy(&message.payload).into_owned();
        for _ in 0..CAS_TRIES {
            let now = now_ms();
            let Some((mut job, revision)) = self.entry(&id).await? else {
                let age_ms = message.info().map_or(u64::MAX, |info| {
                    let published = info.published.unix_timestamp_nanos() / 1_000_000;
                    (now as i128).saturating_sub(published).max(0) as u64
                });
                if age_ms < RECORD_WAIT_MS {
                    // Its submit is still writing the record.
                    nack(&message, Duration::from_millis(100)).await;
                } else {
                    ack(&message, AckKind::Ack).await;
                }
                return Ok(None);
            };
            if job.endpoint != endpoint || job.state.is_final() {
                ack(&message, AckKind::Ack).await;
                return Ok(None);
            }
            if job.state == JobState::InQueue && job.not_before_ms > now {
                nack(&message, Duration::from_millis(job.not_before_ms - now)).await;
                return Ok(None);
            }
            if job.state == JobState::InProgress {
                if let Some(held) = self.held().get_mut(&id) {
                    // Still running here: the lease was only renewed late.
                    held.message = message;
                    return Ok(None);
                }
                let failure = Failure {
                    code: "lease_expired".into(),
                    message: "the node running the attempt stopped answering before it finished"
                        .into(),
                };
                job.close_attempt(now, Some(failure.clone()));
                if !job.requeue_or_end(now, failure, JobState::Failed, false) {
                    if self.update(&job, revision).await?.is_some() {
                        ack(&message, AckKind::Term).await;
                        return Ok(None);
                    }
                    continue;
                }
            }
            let attempt = job.begin_attempt(now);
            if let Some(started) = job.attempts.last_mut() {
                started.node = Some(self.node.clone());
            }
            if self.update(&job, revision).await?.is_some() {
                self.held().insert(id, Held { attempt, message });
                return Ok(Some(job));
            }
        }
        nack(&message, Duration::from_millis(100)).await;
        Ok(None)
    }
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        tracing::debug!("cannot answer a job message: {e}");
    }
}

async fn nack(message: &jetstream::Message, delay: Duration) {
    ack(message, AckKind::Nak(Some(delay))).await;
}

/// Follows the bucket: other nodes' writes and removals. After a reconnection, or when
/// the watch fails, the whole bucket is read again; unfinished jobs not heard of for a
/// while are checked one by one.
async fn follow(shared: std::sync::Weak<Shared>, mut watch: kv::Watch, reconnected: Arc<Notify>) {
    let mut verify = tokio::time::interval(VERIFY_EVERY);
    loop {
        let reload = tokio::select! {
            entry = watch.next() => match entry {
                Some(Ok(entry)) => {
                    let Some(shared) = shared.upgrade() else { return };
                    shared.learn_entry(&entry);
                    false
                }
                Some(Err(e)) => {
                    tracing::warn!("job bucket watch: {e}; reading the bucket again");
                    true
                }
                None => true,
            },
            () = reconnected.notified() => true,
            _ = verify.tick() => {
                let Some(shared) = shared.upgrade() else { return };
                shared.verify().await;
                false
            }
        };
        if !reload {
            continue;
        }
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            match shared.load().await {
                Ok(again) => {
                    watch = again;
                    break;
                }
                Err(e) => tracing::warn!("cannot read the job bucket again: {e}"),
            }
        }
    }
}

/// Renews the lease of every attempt that runs on this node.
async fn progress(shared: std::sync::Weak<Shared>) {
    let every = match shared.upgrade() {
        Some(s) => s.lease / 3,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let messages: Vec<jetstream::Message> =
            shared.held().values().map(|h| h.message.clone()).collect();
        drop(shared);
        for message in messages {
            ack(&message, AckKind::Progress).await;
        }
    }
}

impl JobQueue for JetStreamQueue {
    fn submit(&self, jobs: Vec<NewJob>) -> BoxFuture<'_, Result<Vec<Job>, JobError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let now = now_ms();
            let mut records = Vec::with_capacity(jobs.len());
            for new in jobs {
                let id = wasp_jobs::new_id(now);
                let mut job = Job::queued(id, new, now);
                if let Payload::Inline(bytes) = std::mem::take(&mut job.request.body) {
                    job.request.body = shared.stash(format!("{}.in", job.id), bytes).await?;
                }
                records.push(job);
            }
            // The record and the message are written at once, and the submit is
            // acknowledged when JetStream has both.
            let writes = records.into_iter().map(|mut job| {
                let shared = shared.clone();
                async move {
                    let bytes = encode(&job)?;
                    let subject = subject(&job.endpoint, job.policy.priority);
                    let create = shared.records.create(&job.id, bytes);
                    let publish = async {
                        shared
                            .js
                            .publish(subject, Bytes::from(job.id.clone()))
                            .await?
                            .await
                    };
                    let (created, published) = tokio::join!(create, publish);
                    match (created, published) {
                        (Ok(revision), Ok(_)) => {
                            job.seq = revision;
                            shared.learn(&job.id, Some(&job), revision);
                            Ok(job)
                        }
                        (created, published) => {
                            let reason = match (created, published) {
                                (Err(e), _) => e.to_string(),
                                (_, Err(e)) => e.to_string(),
                                _ => String::new(),
                            };
                            // Not acknowledged: what was written goes (a message left
                            // behind finds no record and is dropped).
                            let _ = shared.records.purge(&job.id).await;
                            shared.unlink(blob_names(&job)).await;
                            Err(nats_error("submitting a job", reason))
                        }
                    }
                }
            });
            let results: Vec<Result<Job, JobError>> = futures_util::stream::iter(writes)
                .buffered(256)
                .collect()
                .await;
            results.into_iter().collect()
        })
    }

    fn lease(
        &self,
        endpoint: &str,
        max: usize,
        _grace: Duration,
    ) -> BoxFuture<'_, Result<Vec<Job>, JobError>> {
        let endpoint = endpoint.to_owned();
        let shared = self.shared.clone();
        Box::pin(async move {
            // The jobs claimed are held: they go to the runner even when a later step fails
            // (else they would stay held, their leases renewed, and never run).
            let mut leased = Vec::new();
            let failed = async {
                for priority in [Priority::High, Priority::Normal, Priority::Low] {
                    if leased.len() >= max {
                        break;
                    }
                    let consumer = shared.consumer(&endpoint, priority).await?;
                    let mut messages = consumer
                        .fetch()
                        .max_messages(max - leased.len())
                        .messages()
                        .await
                        .map_err(|e| nats_error("fetching jobs", e))?;
                    // A fetch whose answer was lost (its server went away) ends here.
                    while let Ok(Some(message)) =
                        tokio::time::timeout(FETCH_PATIENCE, messages.next()).await
                    {
                        let message = match message {
                            Ok(m) => m,
                            Err(e) => {
                                tracing::debug!("fetching jobs: {e}");
                                break;
                            }
                        };
                        if let Some(job) = shared.claim(message, &endpoint).await? {
                            leased.push(job);
                        }
                    }
                }
                Ok::<(), JobError>(())
            }
            .await;
            match failed {
                Err(e) if leased.is_empty() => Err(e),
                Err(e) => {
                    tracing::warn!(endpoint = %endpoint, "fetching jobs: {e}");
                    Ok(leased)
                }
                Ok(()) => Ok(leased),
            }
        })
    }

    fn finish(
        &self,
        id: &str,
        attempt: u32,
        outcome: Outcome,
    ) -> BoxFuture<'_, Result<Option<Job>, JobError>> {
        let id = id.to_owned();
        let shared = self.shared.clone();
        Box::pin(async move {
            let outcome = match outcome {
                Outcome::Completed(mut output) => {
                    if let Payload::Inline(bytes) = output.body {
                        output.body = shared.stash(format!("{id}.out.{attempt}"), bytes).await?;
                    }
                    Outcome::Completed(output)
                }
                other => other,
            };
            let held = {
                let mut held = shared.held();
                match held.get(&id) {
                    Some(h) if h.attempt == attempt => held.remove(&id).map(|h| h.message),
                    _ => None,
                }
            };
            let mut answer = AckKind::Ack;
            let changed = shared
                .modify(&id, |job| {
                    if job.state != JobState::InProgress || job.attempt() != attempt {
                        return Ok(None);
                    }
                    let now = now_ms();
                    answer = AckKind::Ack;
                    match outcome.clone() {
                        Outcome::Completed(output) => {
                            job.close_attempt(now, None);
                            job.output = Some(output);
                            job.end(now, JobState::Completed);
                        }
                        Outcome::Failed(failure) => {
                            job.close_attempt(now, Some(failure.clone()));
                            job.error = Some(failure);
                            job.end(now, JobState::Failed);
                            answer = AckKind::Term;
                        }
                        Outcome::Retry(failure) | Outcome::TimedOut(failure) => {
                            let last = if matches!(outcome, Outcome::TimedOut(_)) {
                                JobState::TimedOut
                            } else {
                                JobState::Failed
                            };
                            job.close_attempt(now, Some(failure.clone()));
                            answer = if job.requeue_or_end(now, failure, last, true) {
                                AckKind::Nak(Some(Duration::from_millis(
                                    job.not_before_ms.saturating_sub(now),
                                )))
                            } else {
                                AckKind::Term
                            };
                        }
                    }
                    Ok(Some(()))
                })
                .await;
            let changed = match changed {
                Ok(changed) => changed,
                Err(JobError::NotFound(_)) => None,
                Err(e) => return Err(e),
            };
            match changed {
                Some((job, ())) => {
                    if let Some(message) = held {
                        if matches!(answer, AckKind::Ack) {
                            if let Err(e) = message.double_ack().await {
                                // Redelivered later, and then acked: the record is final.
                                tracing::debug!(job = %id, "ack not confirmed: {e}");
                            }
                        } else {
                            ack(&message, answer).await;
                        }
                    }
                    Ok(Some(job))
                }
                None => {
                    // A stale attempt: its output goes; its message is acked only when the
                    // job ended (cancelled), else the attempt that holds the job has it.
                    if let Outcome::Completed(output) = outcome
                        && let Payload::Blob { file, .. } = output.body
                    {
                        shared.unlink(vec![file]).await;
                    }
                    if let Some(message) = held {
                        let ended = shared
                            .entry(&id)
                            .await
                            .ok()
                            .flatten()
                            .is_none_or(|(job, _)| job.state.is_final());
                        if ended {
                            ack(&message, AckKind::Ack).await;
                        }
                    }
                    Ok(None)
                }
            }
        })
    }

    fn cancel(&self, endpoint: &str, id: &str) -> BoxFuture<'_, Result<(Job, bool), JobError>> {
        let (endpoint, id) = (endpoint.to_owned(), id.to_owned());
        let shared = self.shared.clone();
        Box::pin(async move {
            let changed = shared
                .modify(&id, |job| {
                    if job.endpoint != endpoint {
                        return Err(JobError::NotFound(job.id.clone()));
                    }
                    let failure = Failure {
                        code: "cancelled".into(),
                        message: "cancelled by the user".into(),
                    };
                    let running = match job.state {
                        JobState::InQueue => false,
                        JobState::InProgress => {
                            job.close_attempt(now_ms(), Some(failure.clone()));
                            true
                        }
                        state => {
                            return Err(JobError::Conflict(format!(
                                "job `{}` is {state}; only a job IN_QUEUE or IN_PROGRESS can be \
                                 cancelled",
                                job.id
                            )));
                        }
                    };
                    job.error = Some(failure);
                    job.end(now_ms(), JobState::Cancelled);
                    Ok(Some(running))
                })
                .await?;
            let (job, running) = changed.ok_or_else(|| JobError::NotFound(id.clone()))?;
            if running && let Some(held) = shared.held().remove(&id) {
                tokio::spawn(async move { ack(&held.message, AckKind::Term).await });
            }
            Ok((job, running))
        })
    }

    fn retry(&self, endpoint: &str, id: &str) -> BoxFuture<'_, Result<Job, JobError>> {
        let (endpoint, id) = (endpoint.to_owned(), id.to_owned());
        let shared = self.shared.clone();
        Box::pin(async move {
            let mut before = None;
            let changed = shared
                .modify(&id, |job| {
                    if job.endpoint != endpoint {
                        return Err(JobError::NotFound(job.id.clone()));
                    }
                    if !matches!(
                        job.state,
                        JobState::Failed | JobState::TimedOut | JobState::Cancelled
                    ) {
                        return Err(JobError::Conflict(format!(
                            "job `{}` is {}; only a FAILED, TIMED_OUT or CANCELLED job can be \
                             retried",
                            job.id, job.state
                        )));
                    }
                    before = Some(job.clone());
                    job.requeue_by_user(now_ms());
                    Ok(Some(job.output.take()))
                })
                .await?;
            let (job, output) = changed.ok_or_else(|| JobError::NotFound(id.clone()))?;
            let published = async {
                shared
                    .js
                    .publish(
                        subject(&job.endpoint, job.policy.priority),
                        Bytes::from(id.clone()),
                    )
                    .await?
                    .await
            }
            .await;
            if let Err(e) = published {
                // Put back as it was: a queued record without a message would never run.
                if let Some(before) = before
                    && let Ok(Some((_, revision))) = shared.entry(&id).await
                {
                    let _ = shared.update(&before, revision).await;
                }
                return Err(nats_error("queueing the job again", e));
            }
            if let Some(Payload::Blob { file, .. }) = output.map(|o| o.body) {
                shared.unlink(vec![file]).await;
            }
            Ok(job)
        })
    }

    fn purge(&self, endpoint: &str) -> BoxFuture<'_, Result<u64, JobError>> {
        let endpoint = endpoint.to_owned();
        let shared = self.shared.clone();
        Box::pin(async move {
            let queued: Vec<String> = shared
                .index()
                .lanes
                .get(&endpoint)
                .map(|lane| lane.queued.iter().cloned().collect())
                .unwrap_or_default();
            let mut purged = 0;
            for id in queued {
                // Their messages are acked unseen when a node fetches them.
                let changed = shared
                    .modify(&id, |job| {
                        if job.state != JobState::InQueue {
                            return Ok(None);
                        }
                        job.error = Some(Failure {
                            code: "purged".into(),
                            message: "removed from the queue by a purge".into(),
                        });
                        job.end(now_ms(), JobState::Cancelled);
                        Ok(Some(()))
                    })
                    .await;
                match changed {
                    Ok(Some(_)) => purged += 1,
                    Ok(None) | Err(JobError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(purged)
        })
    }

    fn record_delivery(
        &self,
        id: &str,
        delivery: Delivery,
        delivered: bool,
        _last: bool,
    ) -> BoxFuture<'_, Result<(), JobError>> {
        let id = id.to_owned();
        let shared = self.shared.clone();
        Box::pin(async move {
            let changed = shared
                .modify(&id, |job| {
                    let Some(webhook) = job.webhook.as_mut() else {
                        return Ok(None);
                    };
                    webhook.deliveries.push(delivery.clone());
                    webhook.delivered |= delivered;
                    Ok(Some(()))
                })
                .await;
            match changed {
                Ok(_) | Err(JobError::NotFound(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    fn pending_webhooks(&self) -> BoxFuture<'_, Result<Vec<Job>, JobError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let ids: Vec<String> = shared
                .index()
                .jobs
                .iter()
                .filter(|(_, s)| s.webhook_pending)
                .map(|(id, _)| id.clone())
                .collect();
            let mut out = Vec::new();
            for id in ids {
                if let Some((job, _)) = shared.entry(&id).await? {
                    out.push(job);
                }
            }
            Ok(out)
        })
    }

    fn expire(&self) -> BoxFuture<'_, Result<u64, JobError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let now = now_ms();
            let due: Vec<String> = shared
                .index()
                .jobs
                .iter()
                .filter(|(_, s)| s.state.is_final() && s.expires_ms.is_some_and(|at| at <= now))
                .map(|(id, _)| id.clone())
                .take(10_000)
                .collect();
            let mut removed = 0;
            for id in due {
                let Some((job, revision)) = shared.entry(&id).await? else {
                    continue;
                };
                if job.expires_ms.is_none_or(|at| at > now) {
                    continue;
                }
                // Every node may expire; the first removal wins, the others see none.
                match shared
                    .records
                    .purge_expect_revision(&id, Some(revision))
                    .await
                {
                    Ok(()) => {
                        shared.unlink(blob_names(&job)).await;
                        removed += 1;
                    }
                    Err(e) => tracing::debug!(job = %id, "not expired here: {e}"),
                }
            }
            Ok(removed)
        })
    }

    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<Job>, JobError>> {
        let id = id.to_owned();
        let shared = self.shared.clone();
        Box::pin(async move { Ok(shared.entry(&id).await?.map(|(job, _)| job)) })
    }

    fn list(&self, filter: ListFilter) -> BoxFuture<'_, Result<Vec<Job>, JobError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let mut ids: Vec<String> = shared
                .index()
                .jobs
                .iter()
                .filter(|(_, s)| {
                    let tenant = s
                        .endpoint
                        .split_once('/')
                        .map_or(wasp_gateway::DEFAULT_TENANT, |(t, _)| t);
                    filter.endpoint.as_ref().is_none_or(|e| *e == s.endpoint)
                        && filter.tenant.as_ref().is_none_or(|t| t == tenant)
                        && filter.state.is_none_or(|state| state == s.state)
                })
                .map(|(id, _)| id.clone())
                .collect();
            // Ids sort by submission time: the newest first.
            ids.sort_unstable_by(|a, b| b.cmp(a));
            ids.truncate(filter.limit);
            let reads = ids.into_iter().map(|id| {
                let shared = shared.clone();
                async move { shared.entry(&id).await }
            });
            let jobs: Vec<Result<Option<(Job, u64)>, JobError>> = futures_util::stream::iter(reads)
                .buffered(32)
                .collect()
                .await;
            let mut out = Vec::new();
            for job in jobs {
                if let Some((job, _)) = job? {
                    out.push(job);
                }
            }
            Ok(out)
        })
    }

    fn read_payload(&self, payload: &Payload) -> BoxFuture<'_, Result<Vec<u8>, JobError>> {
        let payload = payload.clone();
        let shared = self.shared.clone();
        Box::pin(async move {
            match payload {
                Payload::Inline(bytes) => Ok(bytes),
                Payload::Blob { file, len } => {
                    let mut object = shared
                        .blobs
                        .get(file.as_str())
                        .await
                        .map_err(|e| nats_error("reading a job body", e))?;
                    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
                    object
                        .read_to_end(&mut bytes)
                        .await
                        .map_err(|e| nats_error("reading a job body", e))?;
                    if bytes.len() as u64 != len {
                        return Err(JobError::Store(format!(
                            "a job body is {} bytes, not the {len} written",
                            bytes.len()
                        )));
                    }
                    Ok(bytes)
                }
            }
        })
    }

    fn counts(&self, endpoint: &str) -> Counts {
        self.shared
            .index()
            .lanes
            .get(endpoint)
            .map(|lane| lane.counts)
            .unwrap_or_default()
    }

    fn backlog(&self, endpoint: &str) -> Backlog {
        let now = now_ms();
        // Locks in this order everywhere: held, then index.
        let held = self.shared.held();
        let index = self.shared.index();
        let Some(lane) = index.lanes.get(endpoint) else {
            return Backlog::default();
        };
        // Running jobs whose node is gone (or is this node, restarted) are due again once
        // their lease runs out: JetStream hands them out to the next fetch.
        let orphaned = lane.running.iter().filter(|id| {
            index
                .jobs
                .get(*id)
                .is_none_or(|s| self.shared.orphaned(id, s, &held))
        });
        let mut backlog = Backlog::default();
        for s in lane
            .queued
            .iter()
            .chain(orphaned)
            .filter_map(|id| index.jobs.get(id))
        {
            if s.state == JobState::InQueue && s.not_before_ms > now {
                continue;
            }
            if s.priority == Priority::Low {
                backlog.low += 1;
            } else {
                backlog.scaling += 1;
            }
        }
        backlog
    }

    fn ready_signal(&self, endpoint: &str) -> Arc<Notify> {
        self.shared.signal(endpoint)
    }

    fn on_ended_elsewhere(&self, sink: Box<dyn Fn(Job) + Send + Sync>) {
        *self.shared.ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::from(sink));
    }

    fn close(&self) {
        for task in self
            .shared
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}
