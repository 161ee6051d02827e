//! The queue interface: what the runners, the API and the batch runner need of a job store.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::{Counts, Delivery, Job, JobError, JobState, NewJob, Outcome, Payload};

/// A boxed future, for the object-safe trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Queued jobs of one endpoint that are due now, by whether they may scale it up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// `high` and `normal` jobs: a reason to add workers (or wake from zero).
    pub scaling: u64,
    /// `low` jobs: they wait for the workers that are there.
    pub low: u64,
}

/// Which jobs a listing shows.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this endpoint's.
    pub endpoint: Option<String>,
    /// Only jobs of this tenant's endpoints: those named `<tenant>/...`, or with no `/` in
    /// their name for the tenant `default`.
    pub tenant: Option<String>,
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Most jobs, the newest first.
    pub limit: usize,
}

/// A durable job queue (see the crate docs for its JetStream mapping).
pub trait JobQueue: Send + Sync + 'static {
    /// Writes the jobs durably and returns them as stored (ids assigned, large bodies
    /// moved to blobs). When it returns, a crash loses none of them.
    fn submit(&self, jobs: Vec<NewJob>) -> BoxFuture<'_, Result<Vec<Job>, JobError>>;

    /// Leases up to `max` due jobs of `endpoint` (`high` first, then `normal`, then `low`;
    /// in submission order within each); each is `IN_PROGRESS` with a new attempt, leased
    /// for its execution timeout and `grace` more. Leases that expired are redelivered
    /// first.
    fn lease(
        &self,
        endpoint: &str,
        max: usize,
        grace: Duration,
    ) -> BoxFuture<'_, Result<Vec<Job>, JobError>>;

    /// Ends attempt `attempt` of a job; `None` when that attempt no longer holds the job
    /// (cancelled, or its lease expired and another attempt runs), so its result is
    /// dropped.
    fn finish(
        &self,
        id: &str,
        attempt: u32,
        outcome: Outcome,
    ) -> BoxFuture<'_, Result<Option<Job>, JobError>>;

    /// Cancels a queued or running job; the flag says whether it was running (its runner
    /// should stop it).
    fn cancel(&self, endpoint: &str, id: &str) -> BoxFuture<'_, Result<(Job, bool), JobError>>;

    /// Queues a failed, timed-out or cancelled job again, with `max_attempts` more
    /// attempts.
    fn retry(&self, endpoint: &str, id: &str) -> BoxFuture<'_, Result<Job, JobError>>;

    /// Cancels every queued job of the endpoint (running ones go on); returns how many.
    fn purge(&self, endpoint: &str) -> BoxFuture<'_, Result<u64, JobError>>;

    /// Records a webhook delivery; once one is `delivered`, or this was the `last` try,
    /// the job's webhook is no longer pending.
    fn record_delivery(
        &self,
        id: &str,
        delivery: Delivery,
        delivered: bool,
        last: bool,
    ) -> BoxFuture<'_, Result<(), JobError>>;

    /// Finished jobs whose webhook is neither delivered nor given up (what a start
    /// resumes).
    fn pending_webhooks(&self) -> BoxFuture<'_, Result<Vec<Job>, JobError>>;

    /// Removes finished jobs whose result TTL has passed; returns how many.
    fn expire(&self) -> BoxFuture<'_, Result<u64, JobError>>;

    /// A job by id.
    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<Job>, JobError>>;

    /// Jobs, the newest first.
    fn list(&self, filter: ListFilter) -> BoxFuture<'_, Result<Vec<Job>, JobError>>;

    /// The bytes of a payload.
    fn read_payload(&self, payload: &Payload) -> BoxFuture<'_, Result<Vec<u8>, JobError>>;

    /// Jobs of an endpoint by state.
    fn counts(&self, endpoint: &str) -> Counts;

    /// Queued jobs of an endpoint that are due now.
    fn backlog(&self, endpoint: &str) -> Backlog;

    /// Notified when jobs of the endpoint become ready.
    fn ready_signal(&self, endpoint: &str) -> Arc<Notify>;

    /// Calls `sink` with each job that another process sharing the queue ended (the other
    /// nodes of a cluster), so that those waiting here for it hear of it. A queue that no
    /// other process shares (the embedded one) never calls it.
    fn on_ended_elsewhere(&self, sink: Box<dyn Fn(Job) + Send + Sync>) {
        let _ = sink;
    }

    /// Stops taking commands once those sent are done.
    fn close(&self);
}
