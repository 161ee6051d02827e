//! Durable jobs for wasp: async requests and the lines of batch jobs, acknowledged only once
//! they are on disk, leased to a runner, retried with backoff, dead-lettered, and kept until
//! their result TTL passes.
//!
//! [`JobQueue`] is the interface; its semantics are those of a NATS JetStream work-queue
//! stream with an explicit-ack pull consumer, so that the cluster mode runs jobs there
//! (`wasp_cluster::JetStreamQueue`, which keeps each job's record in a key-value bucket):
//!
//! | `JobQueue` | JetStream |
//! | --- | --- |
//! | [`JobQueue::submit`]: durable append, acknowledged after the sync | publish to `jobs.<endpoint>` and await the `PubAck` |
//! | [`JobQueue::lease`]: up to N ready jobs for a time | pull `fetch` with `AckWait` |
//! | [`JobQueue::finish`] with [`Outcome::Completed`] | result to a key-value bucket, then `+ACK` |
//! | [`Outcome::Retry`] / [`Outcome::TimedOut`] with attempts left | `-NAK` with the backoff delay |
//! | the last attempt failed | `+TERM` (dead letter), the attempts kept with the job |
//! | the attempt count | the message's delivery count |
//! | a lease that expires | redelivery after `AckWait` |
//!
//! [`EmbeddedQueue`] is the default engine: a redb database in the data directory, written
//! by one thread that commits every command waiting for it in one transaction (group
//! commit), so that many concurrent submits share one fsync.
#![deny(missing_docs)]

mod embedded;
mod id;
mod model;
mod queue;

pub use embedded::{EmbeddedQueue, INLINE_MAX};
pub use id::{is_id, new_id};
pub use model::{
    Attempt, Counts, Delivery, Failure, Job, JobOutput, JobPolicy, JobRequest, JobState, NewJob,
    Outcome, Payload, Priority, Webhook,
};
pub use queue::{Backlog, BoxFuture, JobQueue, ListFilter};

/// Errors of the job store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    /// No job with that id (for that endpoint).
    #[error("no job `{0}`")]
    NotFound(String),
    /// The job is not in a state that allows the operation (a cancel of a finished job, a
    /// retry of a running one).
    #[error("{0}")]
    Conflict(String),
    /// The data directory is full: nothing was written.
    #[error("{0}: the data directory is full; free space or grow its volume, then retry")]
    StorageFull(String),
    /// The store failed.
    #[error("job store: {0}")]
    Store(String),
    /// The store cannot be reached now (a cluster's NATS servers are away): nothing was
    /// done; a retry later may succeed.
    #[error("the job store cannot be reached now ({0}); retry shortly")]
    Unavailable(String),
    /// The store was closed.
    #[error("the job store is closed")]
    Closed,
}

impl JobError {
    pub(crate) fn io(what: &str, e: &std::io::Error) -> Self {
        if wasp_core::files::is_storage_full(e) {
            Self::StorageFull(what.to_owned())
        } else {
            Self::Store(format!("{what}: {}", wasp_core::files::describe_io(e)))
        }
    }

    pub(crate) fn db(what: &str, e: impl Into<redb::Error>) -> Self {
        match e.into() {
            redb::Error::Io(io) => Self::io(what, &io),
            other => Self::Store(format!("{what}: {other}")),
        }
    }
}
