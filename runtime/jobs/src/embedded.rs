//! The embedded engine: jobs in a redb database in the data directory, large bodies in blob
//! files beside it, and one writer thread that group-commits.
//!
//! Layout (`DIR` is the jobs directory, `DATA_DIR/jobs`):
//!
//! | path / table | key -> value |
//! | --- | --- |
//! | `DIR/jobs.redb`, table `jobs` | job id -> JSON of [`Job`] |
//! | table `active` | id -> endpoint, for every job `IN_QUEUE` or `IN_PROGRESS` (what a start reloads) |
//! | table `expiry` | (expiry ms, id) -> (), for every finished job (what the TTL sweep reads) |
//! | table `counts` | endpoint -> JSON of [`Counts`] |
//! | table `meta` | `seq` -> the next submission number |
//! | table `webhooks` | id -> (), for every finished job whose webhook is not yet delivered or given up |
//! | `DIR/blobs/<id>.in`, `<id>.out.<attempt>` | bodies over [`INLINE_MAX`] bytes |
//!
//! Every change goes through the writer thread, which takes every command waiting for it,
//! applies them in one write transaction and commits once (redb syncs on commit): a
//! thousand concurrent submits cost one fsync, and a submit is answered only after its
//! commit. The queue order (priority, then submission) lives in memory, rebuilt from
//! `active` at every start; a job that was `IN_PROGRESS` when the server died gets its
//! attempt closed as `interrupted` and is queued again (or dead-lettered when that was
//! its last attempt). Blob files are written (and synced) before the commit that refers to
//! them; files no job refers to (a crash between the two) are removed at start.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::{Notify, oneshot};
use wasp_core::files;
use wasp_scaling::Clock;

use crate::queue::{Backlog, BoxFuture, JobQueue, ListFilter};
use crate::{
    Counts, Delivery, Failure, Job, JobError, JobState, NewJob, Outcome, Payload, Priority,
};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const ACTIVE: TableDefinition<&str, &str> = TableDefinition::new("active");
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
const COUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("counts");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const WEBHOOKS: TableDefinition<&str, ()> = TableDefinition::new("webhooks");

/// Largest body kept inline in a job's record; larger ones go to a blob file.
pub const INLINE_MAX: usize = 64 * 1024;
/// Most commands in one transaction.
const BATCH_MAX: usize = 4096;
/// Most finished jobs one TTL sweep removes.
const EXPIRE_MAX: usize = 10_000;
/// Jobs whose request body is at most this large are also kept decoded in memory while
/// they are queued or running, so that a lease and a finish need not decode them.
const CACHE_BODY_MAX: u64 = 16 * 1024;

/// The embedded job store (see the module docs).
pub struct EmbeddedQueue {
    shared: Arc<Shared>,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Shared {
    db: Database,
    /// The next submission number (assigned by the submitter, which encodes the record).
    next_seq: std::sync::atomic::AtomicU64,
    blobs: PathBuf,
    index: Mutex<Index>,
    signals: Mutex<HashMap<String, Arc<Notify>>>,
    clock: Arc<dyn Clock>,
}

/// The queue order of every endpoint, in memory.
#[derive(Default)]
struct Index {
    lanes: HashMap<String, Lane>,
    /// Decoded records of queued and running jobs with small bodies (a cache of the
    /// `jobs` table).
    records: HashMap<String, Job>,
}

impl Index {
    /// A queued or running job: from the cache, else the table.
    fn take(&mut self, t: &Tables<'_>, id: &str) -> Result<Option<Job>, JobError> {
        match self.records.remove(id) {
            Some(job) => Ok(Some(job)),
            None => t.load(id),
        }
    }

    /// Keeps a job that is queued or running decoded, when its body is small.
    fn keep(&mut self, job: &Job) {
        if !job.state.is_final() && job.request.body.len() <= CACHE_BODY_MAX {
            self.records.insert(job.id.clone(), job.clone());
        }
    }
}

/// One endpoint's jobs that are not finished.
#[derive(Default)]
struct Lane {
    /// Due jobs: priority, then submission order.
    ready: BTreeSet<(Priority, u64, String)>,
    /// `low` jobs among the ready ones.
    ready_low: u64,
    /// Jobs waiting out a retry delay: due time, submission order, id, priority.
    delayed: BTreeSet<(u64, u64, String, Priority)>,
    /// Running jobs: attempt and lease expiry (ms).
    leased: HashMap<String, (u32, u64)>,
    counts: Counts,
}

impl Lane {
    fn push_ready(&mut self, job: &Job) {
        if self
            .ready
            .insert((job.policy.priority, job.seq, job.id.clone()))
            && job.policy.priority == Priority::Low
        {
            self.ready_low += 1;
        }
    }

    fn push_delayed(&mut self, job: &Job) {
        self.delayed.insert((
            job.not_before_ms,
            job.seq,
            job.id.clone(),
            job.policy.priority,
        ));
    }

    fn pop_ready(&mut self) -> Option<String> {
        let (priority, _, id) = self.ready.pop_first()?;
        if priority == Priority::Low {
            self.ready_low -= 1;
        }
        Some(id)
    }

    /// Takes a queued job out of the queue, wherever it waits.
    fn unqueue(&mut self, job: &Job) {
        if self
            .ready
            .remove(&(job.policy.priority, job.seq, job.id.clone()))
        {
            if job.policy.priority == Priority::Low {
                self.ready_low -= 1;
            }
        } else {
            self.delayed.remove(&(
                job.not_before_ms,
                job.seq,
                job.id.clone(),
                job.policy.priority,
            ));
        }
    }

    /// Moves jobs whose retry delay has passed to the ready set; true if any moved.
    fn promote(&mut self, now_ms: u64) -> bool {
        let mut moved = false;
        while let Some(first) = self.delayed.first() {
            if first.0 > now_ms {
                break;
            }
            if let Some((_, seq, id, priority)) = self.delayed.pop_first() {
                if priority == Priority::Low {
                    self.ready_low += 1;
                }
                self.ready.insert((priority, seq, id));
                moved = true;
            }
        }
        moved
    }
}

impl Index {
    fn lane(&mut self, endpoint: &str) -> &mut Lane {
        if !self.lanes.contains_key(endpoint) {
            self.lanes.insert(endpoint.to_owned(), Lane::default());
        }
        // Just inserted if it was missing.
        self.lanes
            .get_mut(endpoint)
            .unwrap_or_else(|| unreachable!("lane inserted above"))
    }
}

/// The tables of one write transaction.
struct Tables<'t> {
    jobs: redb::Table<'t, &'static str, &'static [u8]>,
    active: redb::Table<'t, &'static str, &'static str>,
    expiry: redb::Table<'t, (u64, &'static str), ()>,
    counts: redb::Table<'t, &'static str, &'static [u8]>,
    meta: redb::Table<'t, &'static str, u64>,
    webhooks: redb::Table<'t, &'static str, ()>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, JobError> {
        let what = "opening the job tables";
        Ok(Self {
            jobs: txn.open_table(JOBS).map_err(|e| JobError::db(what, e))?,
            active: txn.open_table(ACTIVE).map_err(|e| JobError::db(what, e))?,
            expiry: txn.open_table(EXPIRY).map_err(|e| JobError::db(what, e))?,
            counts: txn.open_table(COUNTS).map_err(|e| JobError::db(what, e))?,
            meta: txn.open_table(META).map_err(|e| JobError::db(what, e))?,
            webhooks: txn
                .open_table(WEBHOOKS)
                .map_err(|e| JobError::db(what, e))?,
        })
    }

    fn load(&self, id: &str) -> Result<Option<Job>, JobError> {
        let what = "reading a job";
        match self.jobs.get(id).map_err(|e| JobError::db(what, e))? {
            Some(bytes) => decode(bytes.value()).map(Some),
            None => Ok(None),
        }
    }

    fn store(&mut self, job: &Job) -> Result<(), JobError> {
        let bytes = encode(job)?;
        self.jobs
            .insert(job.id.as_str(), bytes.as_slice())
            .map_err(|e| JobError::db("writing a job", e))?;
        Ok(())
    }
}

fn decode(bytes: &[u8]) -> Result<Job, JobError> {
    serde_json::from_slice(bytes).map_err(|e| JobError::Store(format!("a job record: {e}")))
}

fn encode(job: &Job) -> Result<Vec<u8>, JobError> {
    serde_json::to_vec(job).map_err(|e| JobError::Store(format!("encoding a job: {e}")))
}

type Reply<T> = oneshot::Sender<Result<T, JobError>>;

/// A change for the writer thread.
enum Command {
    /// Jobs with their records already encoded.
    Submit(Vec<(Job, Vec<u8>)>, Reply<Vec<Job>>),
    Lease {
        endpoint: String,
        max: usize,
        lease: Duration,
        reply: Reply<Vec<Job>>,
    },
    Finish {
        id: String,
        attempt: u32,
        outcome: Box<Outcome>,
        reply: Reply<Option<Job>>,
    },
    Cancel {
        endpoint: String,
        id: String,
        reply: Reply<(Job, bool)>,
    },
    Retry {
        endpoint: String,
        id: String,
        reply: Reply<Job>,
    },
    Purge {
        endpoint: String,
        reply: Reply<u64>,
    },
    Deliver {
        id: String,
        delivery: Delivery,
        delivered: bool,
        last: bool,
        reply: Reply<()>,
    },
    Expire(Reply<u64>),
}

impl Command {
    fn fail(self, e: JobError) {
        match self {
            Self::Submit(_, r) | Self::Lease { reply: r, .. } => drop(r.send(Err(e))),
            Self::Finish { reply, .. } => drop(reply.send(Err(e))),
            Self::Cancel { reply, .. } => drop(reply.send(Err(e))),
            Self::Retry { reply, .. } => drop(reply.send(Err(e))),
            Self::Purge { reply, .. } | Self::Expire(reply) => drop(reply.send(Err(e))),
            Self::Deliver { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// A command applied in the transaction: its answer, sent once the commit is known.
type Done = Box<dyn FnOnce(Option<&JobError>) + Send>;

fn done<T: Send + 'static>(reply: Reply<T>, result: Result<T, JobError>) -> Done {
    Box::new(move |failed| {
        let _ = reply.send(match failed {
            Some(e) => Err(e.clone()),
            None => result,
        });
    })
}

/// What a batch changed besides the tables.
#[derive(Default)]
struct Effects {
    /// Endpoints whose counts changed.
    touched: HashSet<String>,
    /// Endpoints with newly ready jobs.
    ready: HashSet<String>,
    /// Blob files to remove once committed.
    unlink: Vec<String>,
}

impl EmbeddedQueue {
    /// Opens (or creates) the store in `dir`, recovers what a crash left, and starts the
    /// writer thread.
    pub fn open(dir: &Path, clock: Arc<dyn Clock>) -> Result<Self, JobError> {
        let blobs = dir.join("blobs");
        std::fs::create_dir_all(&blobs)
            .map_err(|e| JobError::io("creating the jobs directory", &e))?;
        files::sweep_temporaries(&blobs).map_err(|e| JobError::io("sweeping blobs", &e))?;
        let db = Database::create(dir.join("jobs.redb"))
            .map_err(|e| JobError::db("opening the job store", e))?;
        let shared = Arc::new(Shared {
            db,
            blobs,
            next_seq: std::sync::atomic::AtomicU64::new(0),
            index: Mutex::new(Index::default()),
            signals: Mutex::new(HashMap::new()),
            clock,
        });
        shared.recover()?;
        let (tx, rx) = mpsc::channel();
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("wasp-jobs-writer".into())
                .spawn(move || shared.run(rx))
                .map_err(|e| JobError::io("starting the job writer", &e))?
        };
        Ok(Self {
            shared,
            commands: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Stops the writer once the commands sent so far are committed.
    pub fn close(&self) {
        drop(
            self.commands
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        if let Some(writer) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = writer.join();
        }
    }

    async fn send<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, JobError> {
        let (reply, answer) = oneshot::channel();
        {
            let commands = self.commands.lock().unwrap_or_else(|e| e.into_inner());
            let sender = commands.as_ref().ok_or(JobError::Closed)?;
            sender.send(make(reply)).map_err(|_| JobError::Closed)?;
        }
        answer.await.map_err(|_| JobError::Closed)?
    }

    /// Keeps `bytes` inline, or writes them (synced) to the blob file `name`.
    async fn stash(&self, name: String, bytes: Vec<u8>) -> Result<Payload, JobError> {
        if bytes.len() <= INLINE_MAX {
            return Ok(Payload::Inline(bytes));
        }
        let path = self.shared.blobs.join(&name);
        let len = bytes.len() as u64;
        tokio::task::spawn_blocking(move || files::write_atomic(&path, &bytes))
            .await
            .map_err(|e| JobError::Store(format!("blob task failed: {e}")))?
            .map_err(|e| JobError::io("writing a job body", &e))?;
        Ok(Payload::Blob { file: name, len })
    }

    fn now_ms(&self) -> u64 {
        self.shared.now_ms()
    }
}

impl Drop for EmbeddedQueue {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.now().wall.as_millisecond()).unwrap_or(0)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn signal(&self, endpoint: &str) -> Arc<Notify> {
        self.signals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(endpoint.to_owned())
            .or_default()
            .clone()
    }

    /// Start-up: closes the attempts a crash interrupted and queues their jobs again (or
    /// dead-letters them when that was their last attempt), loads the queue order, and
    /// removes blob files no job refers to.
    fn recover(&self) -> Result<(), JobError> {
        let what = "recovering jobs";
        let now = self.now_ms();
        let txn = self.db.begin_write().map_err(|e| JobError::db(what, e))?;
        {
            let mut t = Tables::open(&txn)?;
            // Counts and the queue order are rebuilt by `load_index`; these two only
            // collect what `end` and `requeue_or_end` would change.
            let mut scratch = Index::default();
            let mut effects = Effects::default();
            let mut interrupted = Vec::new();
            for row in t.active.iter().map_err(|e| JobError::db(what, e))? {
                let (id, _) = row.map_err(|e| JobError::db(what, e))?;
                interrupted.push(id.value().to_owned());
            }
            let mut count = 0;
            for id in interrupted {
                let Some(mut job) = t.load(&id)? else {
                    t.active
                        .remove(id.as_str())
                        .map_err(|e| JobError::db(what, e))?;
                    continue;
                };
                if job.state != JobState::InProgress {
                    continue;
                }
                count += 1;
                let failure = Failure {
                    code: "interrupted".into(),
                    message: "the server stopped while this attempt ran".into(),
                };
                close_attempt(&mut job, now, Some(failure.clone()));
                // Queued again at once: the job did nothing wrong.
                requeue_or_end(
                    &mut t,
                    &mut scratch,
                    &mut effects,
                    &mut job,
                    now,
                    failure,
                    JobState::Failed,
                    false,
                )?;
                t.store(&job)?;
            }
            if count > 0 {
                tracing::warn!(
                    jobs = count,
                    "jobs were running when the server stopped; queued again"
                );
            }
        }
        txn.commit().map_err(|e| JobError::db(what, e))?;
        self.load_index()?;
        self.sweep_blobs()
    }

    /// Rebuilds the queue order and the counts from the tables.
    fn load_index(&self) -> Result<(), JobError> {
        let what = "loading the job queue";
        let now = self.now_ms();
        let txn = self.db.begin_read().map_err(|e| JobError::db(what, e))?;
        let open = |e| JobError::db(what, e);
        let jobs = txn.open_table(JOBS).map_err(open)?;
        let active = txn.open_table(ACTIVE).map_err(open)?;
        let counts = txn.open_table(COUNTS).map_err(open)?;
        let meta = txn.open_table(META).map_err(open)?;
        let next_seq = meta
            .get("seq")
            .map_err(|e| JobError::db(what, e))?
            .map_or(0, |v| v.value());
        self.next_seq
            .fetch_max(next_seq, std::sync::atomic::Ordering::Relaxed);
        let mut index = Index::default();
        for row in counts.iter().map_err(|e| JobError::db(what, e))? {
            let (endpoint, bytes) = row.map_err(|e| JobError::db(what, e))?;
            let mut c: Counts = serde_json::from_slice(bytes.value()).unwrap_or_default();
            // Recounted from the active jobs below.
            c.in_queue = 0;
            c.in_progress = 0;
            index.lane(endpoint.value()).counts = c;
        }
        for row in active.iter().map_err(|e| JobError::db(what, e))? {
            let (id, _) = row.map_err(|e| JobError::db(what, e))?;
            let Some(bytes) = jobs.get(id.value()).map_err(|e| JobError::db(what, e))? else {
                continue;
            };
            let job = decode(bytes.value())?;
            let lane = index.lane(&job.endpoint);
            if !job.state.is_final() {
                lane.counts.add(job.state, 1);
            }
            match job.state {
                JobState::InQueue if job.not_before_ms > now => lane.push_delayed(&job),
                JobState::InQueue => lane.push_ready(&job),
                JobState::InProgress => {
                    // Running in this process (after a failed write): its runner finishes
                    // it, or the lease runs out.
                    let until = now
                        .saturating_add(job.policy.execution_timeout_ms)
                        .saturating_add(60_000);
                    lane.leased.insert(job.id.clone(), (job.attempt(), until));
                }
                _ => {}
            }
        }
        *self.index() = index;
        Ok(())
    }

    /// Removes blob files that no job refers to.
    fn sweep_blobs(&self) -> Result<(), JobError> {
        let entries =
            std::fs::read_dir(&self.blobs).map_err(|e| JobError::io("listing blobs", &e))?;
        let txn = self
            .db
            .begin_read()
            .map_err(|e| JobError::db("listing blobs", e))?;
        let jobs = txn
            .open_table(JOBS)
            .map_err(|e| JobError::db("listing blobs", e))?;
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name.split('.').next().unwrap_or_default();
            let job = match jobs.get(id).map_err(|e| JobError::db("listing blobs", e))? {
                Some(bytes) => decode(bytes.value()).ok(),
                None => None,
            };
            let referenced = job.is_some_and(|job| blob_files(&job).contains(&name));
            if !referenced {
                let _ = std::fs::remove_file(entry.path());
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(files = removed, "removed job blobs no job refers to");
        }
        Ok(())
    }

    /// The writer thread: every command waiting goes into one transaction.
    fn run(self: Arc<Self>, commands: mpsc::Receiver<Command>) {
        while let Ok(first) = commands.recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH_MAX {
                match commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&self, batch: Vec<Command>) {
        let now = self.now_ms();
        let txn = match self.db.begin_write() {
            Ok(txn) => txn,
            Err(e) => {
                let e = JobError::db("writing jobs", e);
                for command in batch {
                    command.fail(e.clone());
                }
                return;
            }
        };
        let mut index = self.index();
        let mut effects = Effects::default();
        let mut answers: Vec<Done> = Vec::with_capacity(batch.len());
        let mut failure = None;
        let mut rest = batch.into_iter();
        match Tables::open(&txn) {
            Ok(mut t) => {
                for command in rest.by_ref() {
                    match apply(&mut t, &mut index, &mut effects, command, now) {
                        Ok(answer) => answers.push(answer),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                let next_seq = self.next_seq.load(std::sync::atomic::Ordering::Relaxed);
                if failure.is_none()
                    && let Err(e) = t.meta.insert("seq", next_seq)
                {
                    failure = Some(JobError::db("writing jobs", e));
                }
                if failure.is_none()
                    && let Err(e) = write_counts(&mut t, &index, &effects)
                {
                    failure = Some(e);
                }
            }
            Err(e) => failure = Some(e),
        }
        let failure = match failure {
            Some(e) => Some(e),
            None => txn
                .commit()
                .err()
                .map(|e| JobError::db("committing jobs", e)),
        };
        match failure {
            None => {
                drop(index);
                for name in effects.unlink {
                    let _ = std::fs::remove_file(self.blobs.join(name));
                }
                for answer in answers {
                    answer(None);
                }
                for endpoint in &effects.ready {
                    self.signal(endpoint).notify_one();
                }
            }
            Some(e) => {
                tracing::error!("job store write failed: {e}");
                // The transaction was dropped: the tables are as before, and so must the
                // queue order be.
                drop(index);
                if let Err(reload) = self.load_index() {
                    tracing::error!("cannot reload the job queue: {reload}");
                }
                for answer in answers {
                    answer(Some(&e));
                }
                for command in rest {
                    command.fail(e.clone());
                }
            }
        }
    }
}

/// Writes the counts of every endpoint the batch touched.
fn write_counts(t: &mut Tables<'_>, index: &Index, effects: &Effects) -> Result<(), JobError> {
    for endpoint in &effects.touched {
        if let Some(lane) = index.lanes.get(endpoint) {
            let bytes = serde_json::to_vec(&lane.counts)
                .map_err(|e| JobError::Store(format!("encoding counts: {e}")))?;
            t.counts
                .insert(endpoint.as_str(), bytes.as_slice())
                .map_err(|e| JobError::db("writing counts", e))?;
        }
    }
    Ok(())
}

/// The blob files a job refers to.
fn blob_files(job: &Job) -> Vec<String> {
    let mut names = Vec::new();
    if let Payload::Blob { file, .. } = &job.request.body {
        names.push(file.clone());
    }
    if let Some(Payload::Blob { file, .. }) = job.output.as_ref().map(|o| &o.body) {
        names.push(file.clone());
    }
    names
}

/// Ends the running attempt.
fn close_attempt(job: &mut Job, now: u64, error: Option<Failure>) {
    job.close_attempt(now, error);
}

/// A job ends in `state`: it leaves the active set and waits for its TTL.
fn end(
    t: &mut Tables<'_>,
    index: &mut Index,
    effects: &mut Effects,
    job: &mut Job,
    now: u64,
    state: JobState,
) -> Result<(), JobError> {
    let lane = index.lane(&job.endpoint);
    lane.counts.add(job.state, -1);
    lane.counts.add(state, 1);
    effects.touched.insert(job.endpoint.clone());
    job.end(now, state);
    let expires = job.expires_ms.unwrap_or(now);
    t.active
        .remove(job.id.as_str())
        .map_err(|e| JobError::db("ending a job", e))?;
    t.expiry
        .insert((expires, job.id.as_str()), ())
        .map_err(|e| JobError::db("ending a job", e))?;
    if job.webhook.is_some() {
        t.webhooks
            .insert(job.id.as_str(), ())
            .map_err(|e| JobError::db("ending a job", e))?;
    }
    Ok(())
}

/// After a failed attempt: queued again (after the retry delay, when `delay`) while
/// attempts remain, else ended in `last` with the failure.
#[allow(clippy::too_many_arguments)]
fn requeue_or_end(
    t: &mut Tables<'_>,
    index: &mut Index,
    effects: &mut Effects,
    job: &mut Job,
    now: u64,
    failure: Failure,
    last: JobState,
    delay: bool,
) -> Result<(), JobError> {
    let made = job.attempts.len() as u32;
    if made < job.attempts_allowed {
        let lane = index.lane(&job.endpoint);
        lane.counts.add(job.state, -1);
        lane.counts.add(JobState::InQueue, 1);
        effects.touched.insert(job.endpoint.clone());
        job.state = JobState::InQueue;
        job.not_before_ms = if delay {
            now.saturating_add(job.policy.retry_delay(made + 1).as_millis() as u64)
        } else {
            now
        };
        if job.not_before_ms > now {
            lane.push_delayed(job);
        } else {
            lane.push_ready(job);
            effects.ready.insert(job.endpoint.clone());
        }
        Ok(())
    } else {
        job.error = Some(failure);
        end(t, index, effects, job, now, last)
    }
}

/// Applies one command; an `Err` is a storage failure that aborts the whole batch, while
/// the command's own refusals are in its answer.
fn apply(
    t: &mut Tables<'_>,
    index: &mut Index,
    effects: &mut Effects,
    command: Command,
    now: u64,
) -> Result<Done, JobError> {
    Ok(match command {
        Command::Submit(jobs, reply) => {
            let mut stored = Vec::with_capacity(jobs.len());
            for (job, bytes) in jobs {
                t.jobs
                    .insert(job.id.as_str(), bytes.as_slice())
                    .map_err(|e| JobError::db("writing a job", e))?;
                t.active
                    .insert(job.id.as_str(), job.endpoint.as_str())
                    .map_err(|e| JobError::db("queueing a job", e))?;
                let lane = index.lane(&job.endpoint);
                lane.push_ready(&job);
                lane.counts.add(JobState::InQueue, 1);
                effects.touched.insert(job.endpoint.clone());
                effects.ready.insert(job.endpoint.clone());
                index.keep(&job);
                stored.push(job);
            }
            done(reply, Ok(stored))
        }
        Command::Lease {
            endpoint,
            max,
            lease,
            reply,
        } => {
            reclaim(t, index, effects, &endpoint, now)?;
            let lane = index.lane(&endpoint);
            lane.promote(now);
            let mut ids = Vec::new();
            while ids.len() < max {
                match lane.pop_ready() {
                    Some(id) => ids.push(id),
                    None => break,
                }
            }
            let mut leased = Vec::with_capacity(ids.len());
            for id in ids {
                let Some(mut job) = index.take(t, &id)? else {
                    continue;
                };
                let number = job.begin_attempt(now);
                t.store(&job)?;
                let lane = index.lane(&endpoint);
                let until = now
                    .saturating_add(job.policy.execution_timeout_ms)
                    .saturating_add(lease.as_millis() as u64);
                lane.leased.insert(id, (number, until));
                lane.counts.add(JobState::InQueue, -1);
                lane.counts.add(JobState::InProgress, 1);
                if number > 1 {
                    lane.counts.retried += 1;
                }
                effects.touched.insert(endpoint.clone());
                index.keep(&job);
                leased.push(job);
            }
            done(reply, Ok(leased))
        }
        Command::Finish {
            id,
            attempt,
            outcome,
            reply,
        } => {
            let job = index.take(t, &id)?;
            let holds = job.as_ref().is_some_and(|job| {
                job.state == JobState::InProgress
                    && job.attempt() == attempt
                    && index
                        .lanes
                        .get(&job.endpoint)
                        .and_then(|lane| lane.leased.get(&id))
                        .is_some_and(|(a, _)| *a == attempt)
            });
            if let Some(job) = job.as_ref().filter(|_| !holds) {
                index.keep(job);
            }
            let Some(mut job) = job.filter(|_| holds) else {
                // A stale attempt: its output (if it wrote a blob) goes.
                if let Outcome::Completed(output) = *outcome
                    && let Payload::Blob { file, .. } = output.body
                {
                    effects.unlink.push(file);
                }
                return Ok(done(reply, Ok(None)));
            };
            index.lane(&job.endpoint).leased.remove(&id);
            let timed_out = matches!(*outcome, Outcome::TimedOut(_));
            match *outcome {
                Outcome::Completed(output) => {
                    close_attempt(&mut job, now, None);
                    job.output = Some(output);
                    end(t, index, effects, &mut job, now, JobState::Completed)?;
                }
                Outcome::Failed(failure) => {
                    close_attempt(&mut job, now, Some(failure.clone()));
                    job.error = Some(failure);
                    end(t, index, effects, &mut job, now, JobState::Failed)?;
                }
                Outcome::Retry(failure) | Outcome::TimedOut(failure) => {
                    let last = if timed_out {
                        JobState::TimedOut
                    } else {
                        JobState::Failed
                    };
                    close_attempt(&mut job, now, Some(failure.clone()));
                    requeue_or_end(t, index, effects, &mut job, now, failure, last, true)?;
                }
            }
            t.store(&job)?;
            index.keep(&job);
            done(reply, Ok(Some(job)))
        }
        Command::Cancel {
            endpoint,
            id,
            reply,
        } => {
            index.records.remove(&id);
            let Some(mut job) = t.load(&id)?.filter(|j| j.endpoint == endpoint) else {
                return Ok(done(reply, Err(JobError::NotFound(id))));
            };
            let failure = Failure {
                code: "cancelled".into(),
                message: "cancelled by the user".into(),
            };
            let running = match job.state {
                JobState::InQueue => {
                    index.lane(&endpoint).unqueue(&job);
                    false
                }
                JobState::InProgress => {
                    index.lane(&endpoint).leased.remove(&id);
                    close_attempt(&mut job, now, Some(failure.clone()));
                    true
                }
                state => {
                    let e = JobError::Conflict(format!(
                        "job `{id}` is {state}; only a job IN_QUEUE or IN_PROGRESS can be \
                         cancelled"
                    ));
                    return Ok(done(reply, Err(e)));
                }
            };
            job.error = Some(failure);
            end(t, index, effects, &mut job, now, JobState::Cancelled)?;
            t.store(&job)?;
            done(reply, Ok((job, running)))
        }
        Command::Retry {
            endpoint,
            id,
            reply,
        } => {
            let Some(mut job) = t.load(&id)?.filter(|j| j.endpoint == endpoint) else {
                return Ok(done(reply, Err(JobError::NotFound(id))));
            };
            if !matches!(
                job.state,
                JobState::Failed | JobState::TimedOut | JobState::Cancelled
            ) {
                let e = JobError::Conflict(format!(
                    "job `{id}` is {}; only a FAILED, TIMED_OUT or CANCELLED job can be retried",
                    job.state
                ));
                return Ok(done(reply, Err(e)));
            }
            if let Some(expires) = job.expires_ms {
                t.expiry
                    .remove((expires, job.id.as_str()))
                    .map_err(|e| JobError::db("retrying a job", e))?;
            }
            t.active
                .insert(job.id.as_str(), job.endpoint.as_str())
                .map_err(|e| JobError::db("retrying a job", e))?;
            let lane = index.lane(&endpoint);
            lane.counts.add(job.state, -1);
            lane.counts.add(JobState::InQueue, 1);
            job.requeue_by_user(now);
            t.webhooks
                .remove(job.id.as_str())
                .map_err(|e| JobError::db("retrying a job", e))?;
            if let Some(Payload::Blob { file, .. }) = job.output.take().map(|o| o.body) {
                effects.unlink.push(file);
            }
            lane.push_ready(&job);
            effects.touched.insert(endpoint.clone());
            effects.ready.insert(endpoint);
            t.store(&job)?;
            index.keep(&job);
            done(reply, Ok(job))
        }
        Command::Purge { endpoint, reply } => {
            let lane = index.lane(&endpoint);
            let mut ids: Vec<String> = lane.ready.iter().map(|(_, _, id)| id.clone()).collect();
            ids.extend(lane.delayed.iter().map(|(_, _, id, _)| id.clone()));
            lane.ready.clear();
            lane.delayed.clear();
            lane.ready_low = 0;
            let mut purged = 0;
            for id in ids {
                let Some(mut job) = index.take(t, &id)? else {
                    continue;
                };
                job.error = Some(Failure {
                    code: "purged".into(),
                    message: "removed from the queue by a purge".into(),
                });
                end(t, index, effects, &mut job, now, JobState::Cancelled)?;
                t.store(&job)?;
                purged += 1;
            }
            done(reply, Ok(purged))
        }
        Command::Deliver {
            id,
            delivery,
            delivered,
            last,
            reply,
        } => {
            if let Some(mut job) = t.load(&id)?
                && let Some(webhook) = job.webhook.as_mut()
            {
                webhook.deliveries.push(delivery);
                webhook.delivered |= delivered;
                webhook.given_up |= last && !webhook.delivered;
                t.store(&job)?;
            }
            if delivered || last {
                t.webhooks
                    .remove(id.as_str())
                    .map_err(|e| JobError::db("recording a delivery", e))?;
            }
            done(reply, Ok(()))
        }
        Command::Expire(reply) => {
            let mut due = Vec::new();
            for row in t
                .expiry
                .range(..(now.saturating_add(1), ""))
                .map_err(|e| JobError::db("expiring jobs", e))?
            {
                let (key, _) = row.map_err(|e| JobError::db("expiring jobs", e))?;
                let (at, id) = key.value();
                due.push((at, id.to_owned()));
                if due.len() == EXPIRE_MAX {
                    break;
                }
            }
            let mut removed = 0;
            for (at, id) in due {
                t.expiry
                    .remove((at, id.as_str()))
                    .map_err(|e| JobError::db("expiring jobs", e))?;
                if let Some(job) = t.load(&id)? {
                    t.jobs
                        .remove(id.as_str())
                        .map_err(|e| JobError::db("expiring jobs", e))?;
                    t.webhooks
                        .remove(id.as_str())
                        .map_err(|e| JobError::db("expiring jobs", e))?;
                    index.lane(&job.endpoint).counts.add(job.state, -1);
                    effects.touched.insert(job.endpoint.clone());
                    effects.unlink.extend(blob_files(&job));
                    removed += 1;
                }
            }
            done(reply, Ok(removed))
        }
    })
}

/// Leases of the endpoint that expired: their attempts end as `lease_expired` and the jobs
/// are queued again (or dead-lettered).
fn reclaim(
    t: &mut Tables<'_>,
    index: &mut Index,
    effects: &mut Effects,
    endpoint: &str,
    now: u64,
) -> Result<(), JobError> {
    let expired: Vec<String> = index
        .lane(endpoint)
        .leased
        .iter()
        .filter(|(_, (_, until))| *until <= now)
        .map(|(id, _)| id.clone())
        .collect();
    for id in expired {
        index.lane(endpoint).leased.remove(&id);
        let Some(mut job) = index.take(t, &id)? else {
            continue;
        };
        let failure = Failure {
            code: "lease_expired".into(),
            message: "the attempt's lease expired before it finished".into(),
        };
        close_attempt(&mut job, now, Some(failure.clone()));
        requeue_or_end(
            t,
            index,
            effects,
            &mut job,
            now,
            failure,
            JobState::Failed,
            false,
        )?;
        t.store(&job)?;
        index.keep(&job);
    }
    Ok(())
}

impl JobQueue for EmbeddedQueue {
    fn submit(&self, jobs: Vec<NewJob>) -> BoxFuture<'_, Result<Vec<Job>, JobError>> {
        Box::pin(async move {
            let now = self.now_ms();
            let mut records = Vec::with_capacity(jobs.len());
            for new in jobs {
                let id = crate::new_id(now);
                let mut job = Job::queued(id, new, now);
                if let Payload::Inline(bytes) = std::mem::take(&mut job.request.body) {
                    job.request.body = self.stash(format!("{}.in", job.id), bytes).await?;
                }
                records.push(job);
            }
            let blobs: Vec<String> = records.iter().flat_map(blob_files).collect();
            // Numbered and encoded here, on the submitter's thread: the writer only writes.
            let mut encoded = Vec::with_capacity(records.len());
            for mut job in records {
                job.seq = self
                    .shared
                    .next_seq
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let bytes = encode(&job)?;
                encoded.push((job, bytes));
            }
            let stored = self.send(|reply| Command::Submit(encoded, reply)).await;
            if stored.is_err() {
                for name in blobs {
                    let _ = std::fs::remove_file(self.shared.blobs.join(name));
                }
            }
            stored
        })
    }

    fn lease(
        &self,
        endpoint: &str,
        max: usize,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Vec<Job>, JobError>> {
        let endpoint = endpoint.to_owned();
        Box::pin(async move {
            self.send(|reply| Command::Lease {
                endpoint,
                max,
                lease,
                reply,
            })
            .await
        })
    }

    fn finish(
        &self,
        id: &str,
        attempt: u32,
        outcome: Outcome,
    ) -> BoxFuture<'_, Result<Option<Job>, JobError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let outcome = match outcome {
                Outcome::Completed(mut output) => {
                    if let Payload::Inline(bytes) = output.body {
                        output.body = self.stash(format!("{id}.out.{attempt}"), bytes).await?;
                    }
                    Outcome::Completed(output)
                }
                other => other,
            };
            self.send(|reply| Command::Finish {
                id,
                attempt,
                outcome: Box::new(outcome),
                reply,
            })
            .await
        })
    }

    fn cancel(&self, endpoint: &str, id: &str) -> BoxFuture<'_, Result<(Job, bool), JobError>> {
        let (endpoint, id) = (endpoint.to_owned(), id.to_owned());
        Box::pin(async move {
            self.send(|reply| Command::Cancel {
                endpoint,
                id,
                reply,
            })
            .await
        })
    }

    fn retry(&self, endpoint: &str, id: &str) -> BoxFuture<'_, Result<Job, JobError>> {
        let (endpoint, id) = (endpoint.to_owned(), id.to_owned());
        Box::pin(async move {
            self.send(|reply| Command::Retry {
                endpoint,
                id,
                reply,
            })
            .await
        })
    }

    fn purge(&self, endpoint: &str) -> BoxFuture<'_, Result<u64, JobError>> {
        let endpoint = endpoint.to_owned();
        Box::pin(async move { self.send(|reply| Command::Purge { endpoint, reply }).await })
    }

    fn record_delivery(
        &self,
        id: &str,
        delivery: Delivery,
        delivered: bool,
        last: bool,
    ) -> BoxFuture<'_, Result<(), JobError>> {
        let id = id.to_owned();
        Box::pin(async move {
            self.send(|reply| Command::Deliver {
                id,
                delivery,
                delivered,
                last,
                reply,
            })
            .await
        })
    }

    fn pending_webhooks(&self) -> BoxFuture<'_, Result<Vec<Job>, JobError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let what = "listing webhooks";
                let txn = shared.db.begin_read().map_err(|e| JobError::db(what, e))?;
                let pending = txn
                    .open_table(WEBHOOKS)
                    .map_err(|e| JobError::db(what, e))?;
                let jobs = txn.open_table(JOBS).map_err(|e| JobError::db(what, e))?;
                let mut out = Vec::new();
                for row in pending.iter().map_err(|e| JobError::db(what, e))? {
                    let (id, _) = row.map_err(|e| JobError::db(what, e))?;
                    if let Some(bytes) = jobs.get(id.value()).map_err(|e| JobError::db(what, e))? {
                        out.push(decode(bytes.value())?);
                    }
                }
                Ok(out)
            })
            .await
            .map_err(|e| JobError::Store(format!("list task failed: {e}")))?
        })
    }

    fn expire(&self) -> BoxFuture<'_, Result<u64, JobError>> {
        Box::pin(async move { self.send(Command::Expire).await })
    }

    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<Job>, JobError>> {
        let id = id.to_owned();
        let shared = self.shared.clone();
        Box::pin(async move {
            if !crate::id::is_id(&id) {
                return Ok(None);
            }
            tokio::task::spawn_blocking(move || {
                let txn = shared
                    .db
                    .begin_read()
                    .map_err(|e| JobError::db("reading a job", e))?;
                let jobs = txn
                    .open_table(JOBS)
                    .map_err(|e| JobError::db("reading a job", e))?;
                match jobs
                    .get(id.as_str())
                    .map_err(|e| JobError::db("reading a job", e))?
                {
                    Some(bytes) => decode(bytes.value()).map(Some),
                    None => Ok(None),
                }
            })
            .await
            .map_err(|e| JobError::Store(format!("read task failed: {e}")))?
        })
    }

    fn list(&self, filter: ListFilter) -> BoxFuture<'_, Result<Vec<Job>, JobError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let what = "listing jobs";
                let txn = shared.db.begin_read().map_err(|e| JobError::db(what, e))?;
                let jobs = txn.open_table(JOBS).map_err(|e| JobError::db(what, e))?;
                let mut out = Vec::new();
                for row in jobs.iter().map_err(|e| JobError::db(what, e))?.rev() {
                    if out.len() >= filter.limit {
                        break;
                    }
                    let (_, bytes) = row.map_err(|e| JobError::db(what, e))?;
                    let job = decode(bytes.value())?;
                    let tenant = job.endpoint.split_once('/').map_or("default", |(t, _)| t);
                    if filter.endpoint.as_ref().is_some_and(|e| *e != job.endpoint)
                        || filter.tenant.as_ref().is_some_and(|t| t != tenant)
                        || filter.state.is_some_and(|s| s != job.state)
                    {
                        continue;
                    }
                    out.push(job);
                }
                Ok(out)
            })
            .await
            .map_err(|e| JobError::Store(format!("list task failed: {e}")))?
        })
    }

    fn read_payload(&self, payload: &Payload) -> BoxFuture<'_, Result<Vec<u8>, JobError>> {
        let payload = payload.clone();
        let blobs = self.shared.blobs.clone();
        Box::pin(async move {
            match payload {
                Payload::Inline(bytes) => Ok(bytes),
                Payload::Blob { file, len } => {
                    let bytes =
                        tokio::task::spawn_blocking(move || std::fs::read(blobs.join(file)))
                            .await
                            .map_err(|e| JobError::Store(format!("blob task failed: {e}")))?
                            .map_err(|e| JobError::io("reading a job body", &e))?;
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
        let now = self.now_ms();
        let mut index = self.shared.index();
        let Some(lane) = index.lanes.get_mut(endpoint) else {
            return Backlog::default();
        };
        lane.promote(now);
        let ready = lane.ready.len() as u64;
        Backlog {
            scaling: ready - lane.ready_low,
            low: lane.ready_low,
        }
    }

    fn ready_signal(&self, endpoint: &str) -> Arc<Notify> {
        self.shared.signal(endpoint)
    }

    fn close(&self) {
        EmbeddedQueue::close(self);
    }
}
