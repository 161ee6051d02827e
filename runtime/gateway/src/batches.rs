//! Batch jobs: a JSONL file for an endpoint, one request per line, run with a bounded
//! window of lines in flight through the same path as a sync invoke, and an output JSONL
//! with one line per input line, in input order.
//!
//! Durability: the output file is appended in line order only; every second (and at
//! pause, cancel and end) it is synced and a checkpoint is written to the store: the lines
//! written, their outcomes, the output's length and where the next input line starts. A
//! restart truncates the output to the checkpoint's length and goes on from its input
//! offset, so no output line is lost or written twice; lines that were in flight run again.
//!
//! Files: `DATA_DIR/batches/<id>/input.jsonl` and `output.jsonl`.

use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncSeekExt};
use tokio::sync::watch;
use wasp_wasm::Request;

use crate::api::data;
use crate::workers::now_ms;
use crate::{Error, Gateway};

/// How often the output is synced and the checkpoint written.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Where a batch is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BatchState {
    /// Lines are running.
    Running,
    /// Paused by the user: no new lines start; resume goes on.
    Paused,
    /// Every line has its output line.
    Completed,
    /// Cancelled by the user; the output holds the lines done before.
    Cancelled,
    /// Stopped by an error that is not a line's (its endpoint was removed, the disk failed).
    Failed,
}

impl BatchState {
    fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled | Self::Failed)
    }
}

/// A batch as the store keeps it: what it runs and its last checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BatchRecord {
    pub id: String,
    pub endpoint: String,
    /// The path below the invoke route each line is sent to.
    pub path: String,
    /// Lines in flight at most.
    pub concurrency: u32,
    pub state: BatchState,
    /// Lines in the input.
    pub total: u64,
    pub created_ms: u64,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// Output lines written (and synced), from the first.
    pub written: u64,
    /// Of those, the lines the endpoint answered with success.
    pub succeeded: u64,
    /// Of those, the lines that failed.
    pub failed: u64,
    /// Length of the output file at the checkpoint.
    pub output_len: u64,
    /// Offset in the input of the first line not written.
    pub input_offset: u64,
    /// Milliseconds spent running before this run (for the rate).
    pub run_ms: u64,
    #[serde(default)]
    pub error: Option<String>,
}

/// What the user asks of a running batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    Pause,
    Cancel,
}

/// A batch in this process.
pub(crate) struct Batch {
    record: Mutex<BatchRecord>,
    control: watch::Sender<Control>,
    /// Lines finished but not yet checkpointed, and when this run started.
    live: Mutex<(u64, u64, Instant)>,
}

impl Batch {
    /// Its record, with the lines finished since the checkpoint counted in.
    pub(crate) fn snapshot(&self) -> (BatchRecord, u64, u64, u64) {
        let record = self.lock().clone();
        let (ok, failed, since) = *self.live.lock().unwrap_or_else(|e| e.into_inner());
        let run_ms = if record.state == BatchState::Running {
            record.run_ms + since.elapsed().as_millis() as u64
        } else {
            record.run_ms
        };
        (record, ok, failed, run_ms)
    }

    /// The endpoint (server's name) that answers its lines.
    pub(crate) fn endpoint(&self) -> String {
        self.lock().endpoint.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BatchRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every batch of the server.
#[derive(Default)]
pub(crate) struct Batches {
    all: Mutex<HashMap<String, Arc<Batch>>>,
    /// Directories from which a batch may read its input by path.
    pub mounts: Mutex<Vec<PathBuf>>,
}

impl Batches {
    pub(crate) fn get(&self, id: &str) -> Option<Arc<Batch>> {
        self.all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    pub(crate) fn list(&self) -> Vec<Arc<Batch>> {
        let mut all: Vec<_> = self
            .all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| b.lock().id.cmp(&a.lock().id));
        all
    }
}

/// Why a batch submit was refused.
pub(crate) enum SubmitError {
    /// A line is not JSON (1-based line number, why).
    Line(u64, String),
    /// The input has no lines.
    Empty,
    /// The gateway refused (unknown endpoint, storage).
    Gateway(Error),
}

/// Checks a JSONL input: every line one JSON value. Returns the line count.
pub(crate) fn check_input(bytes: &[u8]) -> Result<u64, SubmitError> {
    let mut count = 0;
    for (i, line) in lines(bytes).enumerate() {
        let n = i as u64 + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            return Err(SubmitError::Line(
                n,
                "the line is empty; each line is one request".into(),
            ));
        }
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(line) {
            return Err(SubmitError::Line(n, format!("not JSON: {e}")));
        }
        count += 1;
    }
    if count == 0 {
        return Err(SubmitError::Empty);
    }
    Ok(count)
}

/// The lines of a JSONL text, without their `\n` (or `\r\n`); a final newline ends the
/// last line rather than starting an empty one.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let trimmed = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let empty = trimmed.is_empty();
    trimmed
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(move |_| !empty)
}

impl Gateway {
    fn batch_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("batches").join(id)
    }

    /// Stores a checked JSONL input as a new batch and starts it.
    pub(crate) async fn submit_batch(
        self: &Arc<Self>,
        endpoint: &str,
        path: String,
        concurrency: u32,
        input: Vec<u8>,
    ) -> Result<Arc<Batch>, SubmitError> {
        if self.endpoint(endpoint).is_none() {
            return Err(SubmitError::Gateway(Error::NotFound(endpoint.to_owned())));
        }
        let total = check_input(&input)?;
        let id = format!("batch_{}", wasp_jobs::new_id(now_ms()));
        let dir = self.batch_dir(&id);
        let record = BatchRecord {
            id: id.clone(),
            endpoint: endpoint.to_owned(),
            path,
            concurrency,
            state: BatchState::Running,
            total,
            created_ms: now_ms(),
            finished_ms: None,
            written: 0,
            succeeded: 0,
            failed: 0,
            output_len: 0,
            input_offset: 0,
            run_ms: 0,
            error: None,
        };
        let (this, rec) = (self.clone(), record.clone());
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io("creating the batch", Some(dir.clone()), e))?;
            wasp_core::files::write_atomic(&dir.join("input.jsonl"), &input)
                .map_err(|e| Error::io("writing the batch input", Some(dir.clone()), e))?;
            this.save_batch(&rec)
        })
        .await
        .map_err(|e| SubmitError::Gateway(Error::Store(format!("batch task failed: {e}"))))?
        .map_err(SubmitError::Gateway)?;
        Ok(self.start_batch(record))
    }

    fn save_batch(&self, record: &BatchRecord) -> Result<(), Error> {
        let bytes = serde_json::to_vec(record).map_err(|e| Error::Store(e.to_string()))?;
        self.store.put_batch(&record.id, &bytes)
    }

    /// Registers a batch and, unless it is paused or over, starts its runner.
    fn start_batch(self: &Arc<Self>, record: BatchRecord) -> Arc<Batch> {
        let state = record.state;
        let batch = Arc::new(Batch {
            control: watch::channel(match state {
                BatchState::Paused => Control::Pause,
                _ => Control::Run,
            })
            .0,
            record: Mutex::new(record.clone()),
            live: Mutex::new((0, 0, Instant::now())),
        });
        self.batches
            .all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.id.clone(), batch.clone());
        if state == BatchState::Running {
            tokio::spawn(run(Arc::downgrade(self), batch.clone()));
        }
        batch
    }

    /// Loads the stored batches at start; those that were running go on.
    pub(crate) fn resume_batches(self: &Arc<Self>) -> Result<(), Error> {
        for (id, bytes) in self.store.batches()? {
            match serde_json::from_slice::<BatchRecord>(&bytes) {
                Ok(record) => {
                    self.start_batch(record);
                }
                Err(e) => tracing::error!(batch = %id, "batch record is corrupt: {e}"),
            }
        }
        Ok(())
    }

    /// Pauses, resumes or cancels a batch; the new state.
    pub(crate) async fn control_batch(
        self: &Arc<Self>,
        id: &str,
        action: &str,
    ) -> Result<Option<BatchState>, String> {
        let Some(batch) = self.batches.get(id) else {
            return Ok(None);
        };
        let state = batch.lock().state;
        match (action, state) {
            (_, s) if s.is_final() => Err(format!(
                "batch `{id}` is {}; it can no longer be paused, resumed or cancelled",
                serde_json::to_value(s).map_or_else(
                    |_| String::new(),
                    |v| v.as_str().unwrap_or_default().to_owned()
                )
            )),
            ("pause", BatchState::Running) => {
                batch.control.send_replace(Control::Pause);
                Ok(Some(BatchState::Paused))
            }
            ("resume", BatchState::Paused) => {
                batch.control.send_replace(Control::Run);
                let record = {
                    let mut r = batch.lock();
                    r.state = BatchState::Running;
                    r.clone()
                };
                let this = self.clone();
                let _ = tokio::task::spawn_blocking(move || this.save_batch(&record)).await;
                *batch.live.lock().unwrap_or_else(|e| e.into_inner()) = (0, 0, Instant::now());
                tokio::spawn(run(Arc::downgrade(self), batch.clone()));
                Ok(Some(BatchState::Running))
            }
            ("cancel", BatchState::Running) => {
                batch.control.send_replace(Control::Cancel);
                Ok(Some(BatchState::Cancelled))
            }
            ("cancel", BatchState::Paused) => {
                let record = {
                    let mut r = batch.lock();
                    r.state = BatchState::Cancelled;
                    r.finished_ms = Some(now_ms());
                    r.clone()
                };
                let this = self.clone();
                let _ = tokio::task::spawn_blocking(move || this.save_batch(&record)).await;
                Ok(Some(BatchState::Cancelled))
            }
            (action, state) => Err(format!(
                "batch `{id}` is {}; `{action}` does not apply",
                if state == BatchState::Running {
                    "RUNNING"
                } else {
                    "PAUSED"
                }
            )),
        }
    }

    /// The output written so far.
    pub(crate) async fn batch_output(&self, id: &str) -> Result<Vec<u8>, Error> {
        let path = self.batch_dir(id).join("output.jsonl");
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(Error::io("reading the batch output", Some(path), e)),
        }
    }
}

/// One line's outcome: its output line, whether it succeeded, and where the next input
/// line starts.
struct Done {
    line: u64,
    output: Vec<u8>,
    ok: bool,
    next_offset: u64,
}

/// Runs a batch from its checkpoint until it ends, pauses or is cancelled.
async fn run(gateway: Weak<Gateway>, batch: Arc<Batch>) {
    let result = run_inner(&gateway, &batch).await;
    if let Err(e) = result {
        tracing::error!(batch = %batch.lock().id, "batch failed: {e}");
        let record = {
            let mut r = batch.lock();
            r.state = BatchState::Failed;
            r.error = Some(e.clone());
            r.finished_ms = Some(now_ms());
            r.clone()
        };
        if let Some(g) = gateway.upgrade() {
            let _ = tokio::task::spawn_blocking(move || g.save_batch(&record)).await;
        }
    }
}

async fn run_inner(gateway: &Weak<Gateway>, batch: &Arc<Batch>) -> Result<(), String> {
    let start = batch.lock().clone();
    let dir = gateway
        .upgrade()
        .ok_or("the server stopped")?
        .batch_dir(&start.id);
    let mut input = tokio::fs::File::open(dir.join("input.jsonl"))
        .await
        .map_err(|e| format!("cannot open the input: {e}"))?;
    input
        .seek(SeekFrom::Start(start.input_offset))
        .await
        .map_err(|e| format!("cannot read the input: {e}"))?;
    let mut input = tokio::io::BufReader::new(input);
    let output_path = dir.join("output.jsonl");
    let output = {
        let path = output_path.clone();
        let len = start.output_len;
        tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)?;
            // What was written after the checkpoint goes: those lines run again.
            file.set_len(len)?;
            file.seek(SeekFrom::Start(len))?;
            Ok(file)
        })
        .await
        .map_err(|e| format!("output task failed: {e}"))?
        .map_err(|e| format!("cannot open the output: {e}"))?
    };
    let output = Arc::new(Mutex::new(std::io::BufWriter::new(output)));
    let mut control = batch.control.subscribe();
    let mut next_line = start.written + 1;
    let mut offset = start.input_offset;
    let mut eof = false;
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut running = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    let mut buf = Vec::new();
    loop {
        let wanted = *control.borrow_and_update();
        // Start lines while there is room.
        while wanted == Control::Run && !eof && running.len() < start.concurrency as usize {
            buf.clear();
            let read = input
                .read_until(b'\n', &mut buf)
                .await
                .map_err(|e| format!("cannot read the input: {e}"))?;
            if read == 0 {
                eof = true;
                break;
            }
            offset += read as u64;
            let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
            let line = line.strip_suffix(b"\r").unwrap_or(line).to_vec();
            let (g, n, next_offset, path) =
                (gateway.clone(), next_line, offset, start.path.clone());
            let endpoint = start.endpoint.clone();
            running.spawn(async move {
                let (output, ok) = run_line(&g, &endpoint, &path, n, line).await;
                Done {
                    line: n,
                    output,
                    ok,
                    next_offset,
                }
            });
            next_line += 1;
        }
        let over = running.is_empty() && (eof || wanted != Control::Run);
        if over {
            let state = match wanted {
                Control::Run => BatchState::Completed,
                Control::Pause => BatchState::Paused,
                Control::Cancel => BatchState::Cancelled,
            };
            checkpoint(gateway, batch, &output, Some(state)).await?;
            return Ok(());
        }
        tokio::select! {
            Some(done) = running.join_next() => {
                let done = done.map_err(|e| format!("a line's task failed: {e}"))?;
                pending.insert(done.line, done);
                let mut record = batch.lock();
                let mut w = output.lock().unwrap_or_else(|e| e.into_inner());
                let mut live = batch.live.lock().unwrap_or_else(|e| e.into_inner());
                while let Some(done) = pending.remove(&(record.written + 1 + live.0 + live.1)) {
                    w.write_all(&done.output).map_err(|e| format!("cannot write the output: {e}"))?;
                    w.write_all(b"\n").map_err(|e| format!("cannot write the output: {e}"))?;
                    if done.ok { live.0 += 1 } else { live.1 += 1 }
                    record.input_offset = done.next_offset;
                }
            }
            _ = control.changed() => {}
            _ = tick.tick() => checkpoint(gateway, batch, &output, None).await?,
        }
    }
}

/// Syncs the output and writes the checkpoint (and a new state, when one is given).
async fn checkpoint(
    gateway: &Weak<Gateway>,
    batch: &Arc<Batch>,
    output: &Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
    state: Option<BatchState>,
) -> Result<(), String> {
    let g = gateway.upgrade().ok_or("the server stopped")?;
    let output = output.clone();
    let len = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut w = output.lock().unwrap_or_else(|e| e.into_inner());
        w.flush()?;
        let file = w.get_mut();
        file.sync_data()?;
        file.stream_position()
    })
    .await
    .map_err(|e| format!("output task failed: {e}"))?
    .map_err(|e| format!("cannot sync the output: {e}"))?;
    let record = {
        let mut r = batch.lock();
        let mut live = batch.live.lock().unwrap_or_else(|e| e.into_inner());
        r.written += live.0 + live.1;
        r.succeeded += live.0;
        r.failed += live.1;
        r.output_len = len;
        r.run_ms += live.2.elapsed().as_millis() as u64;
        *live = (0, 0, Instant::now());
        if let Some(state) = state {
            r.state = state;
            if state.is_final() {
                r.finished_ms = Some(now_ms());
            }
        }
        r.clone()
    };
    tokio::task::spawn_blocking(move || g.save_batch(&record))
        .await
        .map_err(|e| format!("checkpoint task failed: {e}"))?
        .map_err(|e| format!("cannot write the checkpoint: {e}"))
}

/// Runs one line; its output line and whether it succeeded. Transient failures (busy, a
/// worker that failed) are retried under the endpoint's job policy.
async fn run_line(
    gateway: &Weak<Gateway>,
    endpoint: &str,
    path: &str,
    n: u64,
    line: Vec<u8>,
) -> (Vec<u8>, bool) {
    let error = |code: &str, message: String| {
        let value = serde_json::json!({ "line": n, "error": { "code": code, "message": message } });
        (serde_json::to_vec(&value).unwrap_or_default(), false)
    };
    let mut attempt = 1;
    loop {
        let Some(g) = gateway.upgrade() else {
            return error("server_stopped", "the server stopped".into());
        };
        let Some(deployment) = g.endpoint(endpoint) else {
            return error(
                "endpoint_not_found",
                format!("endpoint `{endpoint}` was removed"),
            );
        };
        let Some(version) = deployment.pick(rand::random::<u32>() % 100).cloned() else {
            return error(
                "no_version",
                format!("endpoint `{endpoint}` has no version with traffic"),
            );
        };
        let policy = deployment.spec.jobs.clone();
        drop(deployment);
        drop(g);
        let request = Request {
            method: "POST".into(),
            path: path.to_owned(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: line.clone(),
        };
        let timeout = Duration::from_secs(policy.execution_timeout_s.into());
        let (code, message, transient) = match tokio::time::timeout(
            timeout,
            data::run(&version, request),
        )
        .await
        {
            Err(_) => (
                "timed_out".to_owned(),
                format!("the line ran past {} s", policy.execution_timeout_s),
                true,
            ),
            Ok(Ok(response)) if response.status < 400 => {
                let is_json = response.headers.iter().any(|(k, v)| {
                    k.eq_ignore_ascii_case("content-type")
                        && (v.starts_with("application/json") || v.contains("+json"))
                });
                let output = match (
                    is_json,
                    serde_json::from_slice::<serde_json::Value>(&response.body),
                ) {
                    (true, Ok(value)) => value,
                    _ => serde_json::Value::String(
                        String::from_utf8_lossy(&response.body).into_owned(),
                    ),
                };
                let value =
                    serde_json::json!({ "line": n, "status": response.status, "output": output });
                return (serde_json::to_vec(&value).unwrap_or_default(), true);
            }
            Ok(Ok(response)) => (
                "processor_error".to_owned(),
                format!(
                    "the processor answered {}: {}",
                    response.status,
                    String::from_utf8_lossy(&response.body[..response.body.len().min(512)])
                ),
                crate::jobs::worth_retrying(response.status),
            ),
            Ok(Err(e)) => {
                let api = e.into_api();
                let transient = crate::jobs::worth_retrying(api.status);
                (api.code.to_owned(), api.message, transient)
            }
        };
        if !transient || attempt >= policy.max_attempts {
            return error(&code, message);
        }
        let delay = policy
            .retry_delay_ms
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(policy.retry_delay_max_ms);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        attempt += 1;
    }
}
