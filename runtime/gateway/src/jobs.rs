//! Running async jobs: one runner task per endpoint leases due jobs while the endpoint has
//! room (`jobs.concurrency_per_worker` per ready worker, one batch at zero workers to wake
//! it), and runs each through the same path as a sync invoke (processor, backend,
//! processor) under its execution timeout; the outcome goes back to the queue, which
//! retries, dead-letters or keeps the result.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use tokio::task::AbortHandle;
use wasp_jobs::{Failure, Job, JobOutput, JobQueue, Outcome, Payload};
use wasp_wasm::Request;

use crate::Gateway;
use crate::api::data;

/// A lease lasts a job's execution timeout and this much more.
const LEASE_GRACE: Duration = Duration::from_secs(60);
/// How often a runner looks at its queue without being told (retry delays that passed).
const POLL: Duration = Duration::from_millis(250);
/// How often finished jobs past their TTL are removed.
pub(crate) const EXPIRE_EVERY: Duration = Duration::from_secs(30);

/// The jobs running in this process and who waits for them.
pub(crate) struct Running {
    /// Tasks of running jobs, by id (a cancel aborts them).
    tasks: Mutex<HashMap<String, AbortHandle>>,
    /// Jobs that ended, for `runsync` and streams.
    pub ended: broadcast::Sender<Arc<Job>>,
    /// Runner tasks, by endpoint.
    runners: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl Running {
    pub(crate) fn new() -> Self {
        Self {
            tasks: Mutex::default(),
            ended: broadcast::channel(1024).0,
            runners: Mutex::default(),
        }
    }

    /// Stops the task running a job (after a cancel).
    pub(crate) fn abort(&self, id: &str) {
        if let Some(task) = self.lock_tasks().remove(id) {
            task.abort();
        }
    }

    /// Tells waiters that a job ended.
    pub(crate) fn announce(&self, job: Job) {
        let _ = self.ended.send(Arc::new(job));
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, AbortHandle>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the runner of `endpoint` unless it runs.
    pub(crate) fn ensure_runner(&self, gateway: &Arc<Gateway>, endpoint: &str) {
        let mut runners = self.runners.lock().unwrap_or_else(|e| e.into_inner());
        if runners.get(endpoint).is_some_and(|r| !r.is_finished()) {
            return;
        }
        let task = tokio::spawn(run_endpoint(Arc::downgrade(gateway), endpoint.to_owned()));
        runners.insert(endpoint.to_owned(), task);
    }

    /// Stops the runners (no job starts any more) and waits up to `within` for the jobs
    /// that run to finish.
    pub(crate) async fn drain(&self, within: Duration) {
        for (_, runner) in self
            .runners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            runner.abort();
        }
        let deadline = tokio::time::Instant::now() + within;
        while !self.lock_tasks().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every runner and job (shutdown); jobs still running stay leased and are
    /// queued again at the next start.
    pub(crate) fn stop_all(&self) {
        for (_, runner) in self
            .runners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            runner.abort();
        }
        for (_, task) in self.lock_tasks().drain() {
            task.abort();
        }
    }
}

/// The runner of one endpoint: leases while there is room, and sleeps until jobs are
/// ready or room frees up. It ends when the endpoint is removed.
async fn run_endpoint(gateway: Weak<Gateway>, name: String) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let signal = match gateway.upgrade() {
        Some(g) => g.jobs.ready_signal(&name),
        None => return,
    };
    loop {
        let Some(g) = gateway.upgrade() else {
            return;
        };
        let Some(deployment) = g.endpoint(&name) else {
            return;
        };
        let mut leased_any = false;
        if !deployment.stopped && deployment.error.is_none() {
            let ready: u32 = deployment
                .versions
                .iter()
                .map(|v| v.workers.ready_now())
                .sum();
            let per_worker = deployment.spec.jobs.concurrency_per_worker as usize;
            let room = (per_worker * ready.max(1) as usize)
                .saturating_sub(in_flight.load(Ordering::Relaxed));
            let backlog = g.jobs.backlog(&name);
            // At zero workers only jobs that may wake the endpoint are taken (a `low` one
            // waits for workers that something else started).
            let due = if ready == 0 {
                backlog.scaling
            } else {
                backlog.scaling + backlog.low
            };
            // In a cluster, a node that cannot start a worker (no free GPU), or where the
            // cluster's scaler placed none, leaves the jobs to the nodes that can.
            let due = if ready == 0
                && g.cluster.get().is_some()
                && (!deployment
                    .versions
                    .iter()
                    .any(|v| v.workers.could_start_here())
                    || g.placed_elsewhere(&deployment))
            {
                0
            } else {
                due
            };
            let take = room.min(usize::try_from(due).unwrap_or(usize::MAX));
            if take > 0 {
                match g.jobs.lease(&name, take, LEASE_GRACE).await {
                    Ok(jobs) => {
                        leased_any = !jobs.is_empty();
                        for job in jobs {
                            start(&g, job, &in_flight, &signal);
                        }
                    }
                    Err(e) => {
                        tracing::error!(endpoint = %name, "cannot lease jobs: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        drop(deployment);
        drop(g);
        if !leased_any {
            let _ = tokio::time::timeout(POLL, signal.notified()).await;
        }
    }
}

/// Runs one leased job in its own task.
fn start(gateway: &Arc<Gateway>, job: Job, in_flight: &Arc<AtomicUsize>, signal: &Arc<Notify>) {
    in_flight.fetch_add(1, Ordering::Relaxed);
    let id = job.id.clone();
    let (g, in_flight, signal) = (gateway.clone(), in_flight.clone(), signal.clone());
    let mut tasks = gateway.running.lock_tasks();
    let task = tokio::spawn(async move {
        /// Frees the job's room however the task ends (an abort included).
        struct Slot(Arc<AtomicUsize>, Arc<Notify>);
        impl Drop for Slot {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
                self.1.notify_one();
            }
        }
        let _slot = Slot(in_flight, signal);
        let (id, attempt) = (job.id.clone(), job.attempt());
        let outcome = execute(&g, &job).await;
        match g.jobs.finish(&id, attempt, outcome).await {
            Ok(Some(job)) => {
                if job.state.is_final() {
                    g.job_ended(job);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(job = %id, "cannot record the job's outcome: {e}"),
        }
        g.running.lock_tasks().remove(&id);
    });
    tasks.insert(id, task.abort_handle());
}

/// One attempt of a job: what its endpoint answers, under the job's execution timeout.
async fn execute(gateway: &Gateway, job: &Job) -> Outcome {
    let Some(deployment) = gateway.endpoint(&job.endpoint) else {
        return Outcome::Failed(failure(
            "endpoint_not_found",
            format!("endpoint `{}` was removed", job.endpoint),
        ));
    };
    let Some(version) = deployment.pick(rand::random::<u32>() % 100).cloned() else {
        return Outcome::Retry(failure(
            "no_version",
            format!("endpoint `{}` has no version with traffic", job.endpoint),
        ));
    };
    drop(deployment);
    let body = match gateway.jobs.read_payload(&job.request.body).await {
        Ok(body) => body,
        Err(e) => return Outcome::Failed(failure("input_unreadable", e.to_string())),
    };
    let request = Request {
        method: job.request.method.clone(),
        path: job.request.path.clone(),
        headers: job.request.headers.clone(),
        body,
    };
    let timeout = Duration::from_millis(job.policy.execution_timeout_ms);
    match tokio::time::timeout(timeout, data::run(&version, request)).await {
        Err(_) => Outcome::TimedOut(failure(
            "timed_out",
            format!(
                "the attempt ran past the job's execution timeout ({} ms)",
                job.policy.execution_timeout_ms
            ),
        )),
        Ok(Ok(response))
            if let Err(e) =
                data::check_processor_response(&response, version.limits.max_response_bytes) =>
        {
            Outcome::Failed(failure(e.code, e.message))
        }
        Ok(Ok(response)) if response.status < 400 => Outcome::Completed(JobOutput {
            status: response.status,
            headers: response.headers,
            body: Payload::Inline(response.body),
        }),
        Ok(Ok(response)) => {
            let message = format!(
                "the processor answered {}: {}",
                response.status,
                snippet(&response.body)
            );
            if worth_retrying(response.status) {
                Outcome::Retry(failure("processor_error", message))
            } else {
                Outcome::Failed(failure("processor_error", message))
            }
        }
        Ok(Err(e)) => {
            let api = e.into_api();
            let f = failure(api.code, api.message);
            if worth_retrying(api.status) {
                Outcome::Retry(f)
            } else {
                Outcome::Failed(f)
            }
        }
    }
}

/// Whether a request answered with `status` may do better another time: a busy server, a
/// timeout or a failed worker may; a refusal of the input (another 4xx) will not.
pub(crate) fn worth_retrying(status: u16) -> bool {
    status >= 500 || matches!(status, 408 | 429)
}

fn failure(code: &str, message: impl Into<String>) -> Failure {
    Failure {
        code: code.to_owned(),
        message: message.into(),
    }
}

/// The start of a body, for an error message.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
    if body.len() > 512 {
        format!("{text}…")
    } else {
        text
    }
}

impl Gateway {
    /// A job ended: its webhook goes out, and waiters hear of it.
    pub(crate) fn job_ended(self: &Arc<Self>, job: Job) {
        let waited = self.running.ended.receiver_count() > 0;
        if job
            .webhook
            .as_ref()
            .is_some_and(wasp_jobs::Webhook::pending)
        {
            if waited {
                self.deliver_webhook(job.clone());
            } else {
                self.deliver_webhook(job);
                return;
            }
        }
        if waited {
            self.running.announce(job);
        }
    }

    /// Removes finished jobs past their TTL.
    pub(crate) async fn expire_jobs(&self) {
        match self.jobs.expire().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(jobs = n, "removed jobs past their result TTL"),
            Err(e) => tracing::warn!("cannot remove expired jobs: {e}"),
        }
    }
}

/// The queue as the gateway holds it.
pub(crate) type Queue = Arc<dyn JobQueue>;
