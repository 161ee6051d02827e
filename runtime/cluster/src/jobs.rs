//! Jobs on JetStream: the [`JobQueue`] of a cluster, shared by every node.
//!
//! - A submit is one write: the job's record (request, policy, webhook) as a message of
//!   the stream `WASP_JOB_QUEUE`, on subject `wasp.jobs.<endpoint>.<priority>.<id>` (the
//!   endpoint as a short hash). The stream keeps a message until its job ends.
//! - A durable pull consumer per endpoint and priority (`wasp.jobs.<endpoint>.<priority>.*`)
//!   is shared by every node: a node whose runner has room fetches from it (`high`, then
//!   `normal`, then `low`).
//! - The first node that takes a job makes its record a key of the key-value bucket
//!   `wasp_jobs`, named by the job's id; from then on every change is a compare-and-set on
//!   the key's revision, so that of two nodes that race for a job one wins and the other
//!   sees it. A job's record is the key when there is one, else its message.
//! - A fetched message is the job's lease. The node holding it tells JetStream that it
//!   works on it (`+WPI`) every third of the lease while the attempt runs; a node that dies
//!   stops doing so, and after the lease (`AckWait`) the message goes to another node,
//!   which ends the lost attempt (`lease_expired`) and starts the next one.
//! - The end of an attempt is written to the record first, then the message is acked
//!   (`+ACK`), or given back with the retry delay (`-NAK`), or ended for good (`+TERM`, the
//!   dead letter; every attempt's error stays in the record), and an acked or ended
//!   message is removed. A message whose record is already final is acked unseen: each
//!   job has one result however often it ran. A job cancelled or purged while it waits
//!   has its message removed, and so has a job whose result expires (a message that could
//!   not be removed when its job ended).
//! - Bodies over [`INLINE_MAX`] go to the object store `wasp_job_blobs`.
//!
//! Every node follows the bucket and the stream (each with one ordered consumer), for the
//! counts, backlogs and listings that the API and the autoscaler read without a round
//! trip.

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
/// The stream of submitted jobs waiting for a worker.
pub const JOBS_STREAM: &str = "WASP_JOB_QUEUE";

/// How often a compare-and-set is tried again when another node changed the record.
const CAS_TRIES: usize = 16;
/// Longest wait for the next message of a fetch.
const FETCH_PATIENCE: Duration = Duration::from_secs(5);
/// How often unfinished jobs the watch has not spoken of for as long are read again.
const VERIFY_EVERY: Duration = Duration::from_secs(10);
/// Most jobs read again at a time.
const VERIFY_MAX: usize = 1_000;

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
    /// When this node opened the queue (ms since the epoch).
    opened_ms: u64,
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
    /// The node that sends its webhook.
    webhook_sender: Option<String>,
    retries: u64,
    revision: u64,
    /// When this node learnt of this state (ms since the epoch).
    learned_ms: u64,
    /// The node of the running attempt.
    node: Option<String>,
    /// The stream sequence of its message, while the message is its record (`revision`
    /// 0: no node took it yet).
    queue_seq: Option<u64>,
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
                && job
                    .webhook
                    .as_ref()
                    .is_some_and(wasp_jobs::Webhook::pending),
            webhook_sender: job.webhook.as_ref().and_then(|w| w.sender.clone()),
            retries: (job.attempts.len() as u64).saturating_sub(1),
            revision,
            learned_ms: now_ms(),
            node: job.attempts.last().and_then(|a| a.node.clone()),
            queue_seq: None,
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

    /// Forgets the jobs that a reload did not see again, of those `read` covered.
    fn forget(&mut self, seen: &HashSet<String>, read: impl Fn(&Summary) -> bool) {
        let gone: Vec<String> = self
            .jobs
            .iter()
            .filter(|(id, s)| read(s) && !seen.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.apply(&id, None, u64::MAX);
        }
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

/// The subject of a job's message.
fn subject(endpoint: &str, priority: Priority, id: &str) -> String {
    format!(
        "wasp.jobs.{}.{}.{id}",
        lane_name(endpoint),
        priority_name(priority)
    )
}

/// The subjects of an endpoint's messages of one priority.
fn lane_subjects(endpoint: &str, priority: Priority) -> String {
    format!(
        "wasp.jobs.{}.{}.*",
        lane_name(endpoint),
        priority_name(priority)
    )
}

/// The job id a message's subject names.
fn subject_id(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or_default()
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
                description: Some("wasp jobs submitted and waiting for a worker".into()),
                subjects: vec!["wasp.jobs.>".into()],
                retention: stream::RetentionPolicy::Limits,
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
            opened_ms: now_ms(),
        });
        let watches = shared
            .load()
            .await
            .map_err(|e| bucket_error(JOBS_BUCKET, &e))?;
        // The first connection is no reconnection.
        let _ = futures_util::FutureExt::now_or_never(reconnected.notified());
        let follow = tokio::spawn(follow(Arc::downgrade(&shared), watches, reconnected));
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

    /// Learns of a job from its message at `seq`: what it was submitted as, until a node
    /// makes its record.
    fn learn_message(&self, job: &Job, seq: u64) {
        self.learn(&job.id, Some(job), 0);
        if let Some(s) = self.index().jobs.get_mut(&job.id)
            && s.revision == 0
        {
            s.queue_seq = Some(seq);
        }
    }

    /// Reads every record and every waiting job's message into the index (and forgets the
    /// jobs that are no longer there); returns the watches that follow what comes after.
    async fn load(&self) -> Result<Watches, String> {
        let records = self.load_records().await?;
        let queue = self.load_queue().await?;
        Ok(Watches { records, queue })
    }

    async fn load_records(&self) -> Result<kv::Watch, String> {
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
        index.forget(&seen, |s| {
            s.revision > 0 && s.revision <= state.last_sequence
        });
        tracing::info!(jobs = index.jobs.len(), "loaded the cluster's jobs");
        Ok(watch)
    }

    async fn load_queue(&self) -> Result<QueueWatch, String> {
        let state = self
            .stream
            .get_info()
            .await
            .map_err(|e| e.to_string())?
            .state;
        let mut watch = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: "wasp.jobs.>".into(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let mut seen = HashSet::new();
        if state.messages > 0 {
            loop {
                let message = match tokio::time::timeout(FETCH_PATIENCE, watch.next()).await {
                    Ok(Some(message)) => message.map_err(|e| e.to_string())?,
                    Ok(None) => return Err("the watch of the job queue ended".into()),
                    // The messages counted were removed (their jobs ended) before they
                    // came: caught up. The watch goes on from here either way.
                    Err(_) => break,
                };
                let (seq, pending) = message
                    .info()
                    .map(|info| (info.stream_sequence, info.pending))
                    .map_err(|e| e.to_string())?;
                if let Some(job) = self.learn_queued(&message, seq) {
                    seen.insert(job);
                }
                if pending == 0 || seq >= state.last_sequence {
                    break;
                }
            }
        }
        self.index().forget(&seen, |s| {
            s.revision == 0 && s.queue_seq.is_some_and(|seq| seq <= state.last_sequence)
        });
        Ok(watch)
    }

    /// Learns of a job from a message of the queue watch; returns its id.
    fn learn_queued(&self, message: &jetstream::Message, seq: u64) -> Option<String> {
        match decode(&message.payload) {
            Ok(job) if job.id == subject_id(&message.subject) => {
                self.learn_message(&job, seq);
                Some(job.id)
            }
            Ok(_) => {
                tracing::error!(subject = %message.subject, "a job message names another job; left alone");
                None
            }
            Err(e) => {
                tracing::error!(subject = %message.subject, "{e}; left alone");
                None
            }
        }
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
                    let queued = self
                        .index()
                        .jobs
                        .get(&id)
                        .filter(|s| s.revision == 0)
                        .and_then(|s| s.queue_seq);
                    // Not taken yet: its message is its record while it is there.
                    let waiting = match queued {
                        Some(seq) => self.stream.get_raw_message(seq).await.is_ok(),
                        None => false,
                    };
                    let mut index = self.index();
                    if waiting {
                        if let Some(s) = index.jobs.get_mut(&id) {
                            s.learned_ms = now_ms();
                        }
                    } else {
                        index.apply(&id, None, u64::MAX);
                    }
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
        let orphans: Vec<(String, String)> = {
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
                    out.push((id, s.endpoint.clone()));
                }
            }
            out
        };
        for (id, endpoint) in orphans {
            tracing::warn!(job = %id, endpoint = %endpoint, "a running job's node is gone and its message did not come back: queued again");
            let queued = match self.entry(&id).await {
                Ok(Some((job, _))) => self.enqueue(&job).await.map(|_| ()),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = queued {
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
                        let stream = self.stream.clone();
                        tokio::spawn(
                            async move { settle(&stream, &held.message, AckKind::Term).await },
                        );
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

    /// Puts a job's message on the queue; returns the message's sequence.
    async fn enqueue(&self, job: &Job) -> Result<u64, JobError> {
        let subject = subject(&job.endpoint, job.policy.priority, &job.id);
        let payload = encode(job)?;
        let published = async { self.js.publish(subject, payload).await?.await }
            .await
            .map_err(|e| nats_error("queueing a job", e))?;
        Ok(published.sequence)
    }

    /// Removes a job's messages from the queue (it ended while it waited).
    async fn dequeue(&self, job: &Job) {
        let subject = subject(&job.endpoint, job.policy.priority, &job.id);
        if let Err(e) = self.stream.purge().filter(subject).await {
            tracing::debug!(job = %job.id, "cannot remove the job's message: {e}");
        }
    }

    /// The record of a job and its revision: its key in the bucket, else (revision 0) its
    /// message, while no node took it.
    async fn entry(&self, id: &str) -> Result<Option<(Job, u64)>, JobError> {
        if !wasp_jobs::is_id(id) {
            return Ok(None);
        }
        if let Some(found) = self.record(id).await? {
            return Ok(Some(found));
        }
        let seq = self.index().jobs.get(id).and_then(|s| s.queue_seq);
        let message = match seq {
            Some(seq) => self.stream.get_raw_message(seq).await.ok(),
            // Submitted on another node a moment ago, before this node heard of it.
            None => self
                .stream
                .get_last_raw_message_by_subject(&format!("wasp.jobs.*.*.{id}"))
                .await
                .ok(),
        };
        let Some(message) = message else {
            // Taken (and its record made) since the first read, or gone.
            return self.record(id).await;
        };
        let job = decode(&message.payload)?;
        if job.id != id {
            return Ok(None);
        }
        Ok(Some((job, 0)))
    }

    /// A job's key in the bucket and its revision.
    async fn record(&self, id: &str) -> Result<Option<(Job, u64)>, JobError> {
        match self.records.entry(id).await {
            Ok(Some(entry)) if matches!(entry.operation, kv::Operation::Put) => {
                Ok(Some((decode(&entry.value)?, entry.revision)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(nats_error("reading a job", e)),
        }
    }

    /// Writes a changed record over `revision` (0: makes the key of a job known only by
    /// its message); `None` when another write came first. A job this write ends gets
    /// this node as the sender of its webhook.
    async fn update(&self, job: &mut Job, revision: u64) -> Result<Option<u64>, JobError> {
        if job.state.is_final()
            && let Some(webhook) = job.webhook.as_mut()
            && webhook.sender.is_none()
        {
            webhook.sender = Some(self.node.clone());
        }
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
            if self.update(&mut job, revision).await?.is_some() {
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
                    filter_subject: lane_subjects(endpoint, priority),
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
        let id = subject_id(&message.subject).to_owned();
        for _ in 0..CAS_TRIES {
            let now = now_ms();
            // The record, else (no node took it yet) the message itself.
            let found = match self.record(&id).await? {
                Some(found) => Some(found),
                None => match decode(&message.payload) {
                    Ok(job) if job.id == id => Some((job, 0)),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::error!(job = %id, "{e}; dropped");
                        None
                    }
                },
            };
            let Some((mut job, revision)) = found else {
                settle(&self.stream, &message, AckKind::Term).await;
                return Ok(None);
            };
            if job.endpoint != endpoint || job.state.is_final() {
                settle(&self.stream, &message, AckKind::Ack).await;
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
                    if self.update(&mut job, revision).await?.is_some() {
                        settle(&self.stream, &message, AckKind::Term).await;
                        return Ok(None);
                    }
                    continue;
                }
            }
            let attempt = job.begin_attempt(now);
            if let Some(started) = job.attempts.last_mut() {
                started.node = Some(self.node.clone());
            }
            if self.update(&mut job, revision).await?.is_some() {
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

/// Answers a message for good (`+ACK`, `+TERM`) and removes it from the stream: its job
/// ended, and its record says how.
async fn settle(stream: &stream::Stream, message: &jetstream::Message, kind: AckKind) {
    ack(message, kind).await;
    remove(stream, message).await;
}

async fn remove(stream: &stream::Stream, message: &jetstream::Message) {
    if let Ok(info) = message.info()
        && let Err(e) = stream.delete_message(info.stream_sequence).await
    {
        // Left behind: the job's record wins over it, and its expiry removes it.
        tracing::debug!("cannot remove a job message: {e}");
    }
}

async fn nack(message: &jetstream::Message, delay: Duration) {
    ack(message, AckKind::Nak(Some(delay))).await;
}

/// The watch of the queue: every job's message as it is submitted.
type QueueWatch = consumer::pull::Ordered;

/// What a node follows: the bucket of records and the queue of messages.
struct Watches {
    records: kv::Watch,
    queue: QueueWatch,
}

/// Follows the bucket (other nodes' writes and removals) and the queue (other nodes'
/// submits). After a reconnection, or when a watch fails, both are read again; unfinished
/// jobs not heard of for a while are checked one by one.
async fn follow(shared: std::sync::Weak<Shared>, mut watches: Watches, reconnected: Arc<Notify>) {
    let mut verify = tokio::time::interval(VERIFY_EVERY);
    loop {
        let reload = tokio::select! {
            entry = watches.records.next() => match entry {
                Some(Ok(entry)) => {
                    let Some(shared) = shared.upgrade() else { return };
                    shared.learn_entry(&entry);
                    false
                }
                Some(Err(e)) => {
                    tracing::warn!("job bucket watch: {e}; reading the jobs again");
                    true
                }
                None => true,
            },
            message = watches.queue.next() => match message {
                Some(Ok(message)) => {
                    let Some(shared) = shared.upgrade() else { return };
                    match message.info() {
                        Ok(info) => {
                            shared.learn_queued(&message, info.stream_sequence);
                        }
                        Err(e) => tracing::debug!("a job message without its info: {e}"),
                    }
                    false
                }
                Some(Err(e)) => {
                    tracing::warn!("job queue watch: {e}; reading the jobs again");
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
                    watches = again;
                    break;
                }
                Err(e) => tracing::warn!("cannot read the jobs again: {e}"),
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
            // One write: the message is the record until a node takes the job. The submit
            // is acknowledged when JetStream has it.
            let writes = records.into_iter().map(|mut job| {
                let shared = shared.clone();
                async move {
                    match shared.enqueue(&job).await {
                        Ok(seq) => {
                            job.seq = seq;
                            shared.learn_message(&job, seq);
                            Ok(job)
                        }
                        Err(e) => {
                            // Not acknowledged: what may have been written goes.
                            shared.dequeue(&job).await;
                            shared.unlink(blob_names(&job)).await;
                            Err(e)
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
                        match answer {
                            AckKind::Ack => {
                                if let Err(e) = message.double_ack().await {
                                    // Redelivered later, and then acked: the record is final.
                                    tracing::debug!(job = %id, "ack not confirmed: {e}");
                                }
                                remove(&shared.stream, &message).await;
                            }
                            AckKind::Term => settle(&shared.stream, &message, answer).await,
                            answer => ack(&message, answer).await,
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
                            settle(&shared.stream, &message, AckKind::Ack).await;
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
            if running {
                if let Some(held) = shared.held().remove(&id) {
                    let stream = shared.stream.clone();
                    tokio::spawn(
                        async move { settle(&stream, &held.message, AckKind::Term).await },
                    );
                }
            } else {
                shared.dequeue(&job).await;
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
            if let Err(e) = shared.enqueue(&job).await {
                // Put back as it was: a queued record without a message would never run.
                if let Some(mut before) = before
                    && let Ok(Some((_, revision))) = shared.entry(&id).await
                {
                    let _ = shared.update(&mut before, revision).await;
                }
                return Err(e);
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
                    Ok(Some((job, ()))) => {
                        shared.dequeue(&job).await;
                        purged += 1;
                    }
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
        last: bool,
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
                    webhook.given_up |= last && !webhook.delivered;
                    Ok(Some(()))
                })
                .await;
            match changed {
                Ok(_) | Err(JobError::NotFound(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    /// The webhooks this node sends: those it was sending when it stopped, and those of
    /// nodes that are gone (taken over with a compare-and-set, so that one node sends
    /// each). Nodes are judged gone only once this node has heard the heartbeats for a
    /// while.
    fn pending_webhooks(&self) -> BoxFuture<'_, Result<Vec<Job>, JobError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let now = now_ms();
            let settled =
                now.saturating_sub(shared.opened_ms) > 2 * crate::NODE_TTL.as_millis() as u64;
            let ids: Vec<String> = shared
                .index()
                .jobs
                .iter()
                .filter(|(_, s)| {
                    s.webhook_pending
                        && match &s.webhook_sender {
                            Some(node) if *node == shared.node => true,
                            Some(node) => settled && !crate::alive(&shared.members, node),
                            None => settled,
                        }
                })
                .map(|(id, _)| id.clone())
                .collect();
            let mut out = Vec::new();
            for id in ids {
                let Some((job, _)) = shared.entry(&id).await? else {
                    continue;
                };
                let Some(webhook) = job.webhook.as_ref().filter(|w| w.pending()) else {
                    continue;
                };
                if webhook.sender.as_deref() == Some(shared.node.as_str()) {
                    out.push(job);
                    continue;
                }
                let taken = shared
                    .modify(&id, |job| {
                        let Some(webhook) = job.webhook.as_mut().filter(|w| w.pending()) else {
                            return Ok(None);
                        };
                        let lost = webhook
                            .sender
                            .as_ref()
                            .is_none_or(|node| !crate::alive(&shared.members, node));
                        if !lost {
                            return Ok(None);
                        }
                        webhook.sender = Some(shared.node.clone());
                        Ok(Some(()))
                    })
                    .await;
                match taken {
                    Ok(Some((job, ()))) => {
                        tracing::info!(job = %id, "taking over the webhook of a lost node");
                        out.push(job);
                    }
                    Ok(None) | Err(JobError::NotFound(_)) => {}
                    Err(e) => return Err(e),
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
                        // A message its end could not remove would bring it back.
                        shared.dequeue(&job).await;
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
