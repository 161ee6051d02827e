//! What a job is: its request, its state, its attempts, its output, and the policy it runs
//! under.

use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where a job is in its life. The names are RunPod's, which users of async inference know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Waiting for a worker (or for its retry delay to pass).
    InQueue,
    /// Running.
    InProgress,
    /// Done; its output is kept until the result TTL passes.
    Completed,
    /// Failed for good: bad input, or every attempt failed (each attempt's error is kept).
    Failed,
    /// Cancelled by the user, or purged from the queue.
    Cancelled,
    /// Its last attempt ran past the execution timeout.
    TimedOut,
}

impl JobState {
    /// Every state, in the order listings show them.
    pub const ALL: [JobState; 6] = [
        Self::InQueue,
        Self::InProgress,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
    ];

    /// Whether the job will not change any more (unless the user retries it).
    pub fn is_final(self) -> bool {
        !matches!(self, Self::InQueue | Self::InProgress)
    }

    /// The state's name, as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InQueue => "IN_QUEUE",
            Self::InProgress => "IN_PROGRESS",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::TimedOut => "TIMED_OUT",
        }
    }

    /// The state of a name the API writes, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The order in which queued jobs of one endpoint run. A `low` job never makes the
/// endpoint scale up (or wake from zero): it runs on the workers that are there.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Before every other job.
    High,
    /// The default.
    #[default]
    Normal,
    /// After every other job, and never a reason to add workers.
    Low,
}

/// Bytes kept with a job: inline when small, else in a blob file beside the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// The bytes themselves (base64 in the record).
    Inline(#[serde(serialize_with = "ser_b64", deserialize_with = "de_b64")] Vec<u8>),
    /// A file in the blob directory, and its length.
    Blob {
        /// File name in the blob directory.
        file: String,
        /// Length in bytes.
        len: u64,
    },
}

impl Default for Payload {
    fn default() -> Self {
        Self::Inline(Vec::new())
    }
}

impl Payload {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Self::Inline(bytes) => bytes.len() as u64,
            Self::Blob { len, .. } => *len,
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn ser_b64<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn de_b64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(d)?;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(serde::de::Error::custom)
}

/// The request a job makes of its endpoint: what a sync invoke would have sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    /// HTTP method the processor sees.
    pub method: String,
    /// Path below the invoke route, with its query (`/` at least).
    pub path: String,
    /// Headers the processor sees.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Payload,
}

/// What the endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOutput {
    /// HTTP status of the answer.
    pub status: u16,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub body: Payload,
}

impl JobOutput {
    /// Its content type, if it declared one.
    pub fn content_type(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a job (or one attempt) failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// A short machine-readable code (`processor_error`, `timed_out`, `worker_failed`...).
    pub code: String,
    /// What happened, for people.
    pub message: String,
}

/// One run of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1 for the first.
    pub number: u32,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// When it ended; absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// The cluster node it ran on (absent outside cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// How a job runs: timeouts, attempts, retry delays and how long its result is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPolicy {
    /// Longest one attempt may run, in milliseconds.
    pub execution_timeout_ms: u64,
    /// Attempts before the job is dead-lettered (`FAILED` or `TIMED_OUT`).
    pub max_attempts: u32,
    /// Delay before the second attempt, in milliseconds; doubled for each further one.
    pub retry_delay_ms: u64,
    /// Longest delay between attempts, in milliseconds.
    pub retry_delay_max_ms: u64,
    /// How long a finished job (and its output) is kept, in seconds.
    pub result_ttl_s: u64,
    /// Its place in the queue.
    pub priority: Priority,
}

impl Default for JobPolicy {
    fn default() -> Self {
        Self {
            execution_timeout_ms: 600_000,
            max_attempts: 3,
            retry_delay_ms: 1_000,
            retry_delay_max_ms: 300_000,
            result_ttl_s: 86_400,
            priority: Priority::Normal,
        }
    }
}

impl JobPolicy {
    /// The delay before attempt `next` (2 and up): `retry_delay_ms` doubled per attempt
    /// after the second, at most `retry_delay_max_ms`.
    pub fn retry_delay(&self, next: u32) -> Duration {
        let doublings = next.saturating_sub(2).min(32);
        let ms = self
            .retry_delay_ms
            .saturating_mul(1u64 << doublings)
            .min(self.retry_delay_max_ms);
        Duration::from_millis(ms)
    }
}

/// A webhook: where the job's status goes when it ends, and what came of each delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    /// The URL the status body is POSTed to.
    pub url: String,
    /// Each delivery attempt, oldest first.
    #[serde(default)]
    pub deliveries: Vec<Delivery>,
    /// Whether a delivery was answered 2xx.
    #[serde(default)]
    pub delivered: bool,
    /// Whether the tries ran out without a 2xx.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub given_up: bool,
    /// The node that sends it, in cluster mode: the one that ended the job, or the one
    /// that took the webhook over when that node was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
}

impl Webhook {
    /// Whether it still has to be sent: neither delivered nor given up.
    pub fn pending(&self) -> bool {
        !self.delivered && !self.given_up
    }
}

/// One delivery of a webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The receiver's HTTP status, if it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// What went wrong, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A job to submit.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The endpoint that runs it.
    pub endpoint: String,
    /// Its request.
    pub request: JobRequest,
    /// How it runs.
    pub policy: JobPolicy,
    /// Where its status goes when it ends.
    pub webhook: Option<String>,
}

/// A job, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Its id: 26 characters, time-ordered (a ULID).
    pub id: String,
    /// The endpoint that runs it.
    pub endpoint: String,
    /// Where it is.
    pub state: JobState,
    /// Submission order within the store.
    pub seq: u64,
    /// When it was acknowledged, in milliseconds since the Unix epoch.
    pub submitted_ms: u64,
    /// Not to run before this time (a retry's delay), in milliseconds since the epoch.
    #[serde(default)]
    pub not_before_ms: u64,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// When it and its output go (result TTL), once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// How it runs.
    pub policy: JobPolicy,
    /// Attempts allowed in all (a user's retry raises it by `policy.max_attempts`).
    pub attempts_allowed: u32,
    /// Its runs, oldest first.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// Its request.
    pub request: JobRequest,
    /// The endpoint's answer, once it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<JobOutput>,
    /// Why it failed, timed out or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// Its webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
}

impl Job {
    /// A job just submitted: queued, due now, with its policy's attempts.
    pub fn queued(id: String, new: NewJob, now: u64) -> Self {
        Self {
            id,
            endpoint: new.endpoint,
            state: JobState::InQueue,
            seq: 0,
            submitted_ms: now,
            not_before_ms: now,
            finished_ms: None,
            expires_ms: None,
            attempts_allowed: new.policy.max_attempts.max(1),
            policy: new.policy,
            attempts: Vec::new(),
            request: new.request,
            output: None,
            error: None,
            webhook: new.webhook.map(|url| Webhook {
                url,
                deliveries: Vec::new(),
                delivered: false,
                given_up: false,
                sender: None,
            }),
        }
    }

    /// The attempt that runs now (or ran last).
    pub fn attempt(&self) -> u32 {
        self.attempts.last().map_or(0, |a| a.number)
    }

    /// Milliseconds it waited in the queue before its first attempt (so far, if none).
    pub fn delay_ms(&self, now_ms: u64) -> u64 {
        let started = self.attempts.first().map_or(now_ms, |a| a.started_ms);
        started.saturating_sub(self.submitted_ms)
    }

    /// Starts its next attempt at `now`: `IN_PROGRESS`, numbered one more than the last.
    pub fn begin_attempt(&mut self, now: u64) -> u32 {
        let number = self.attempts.len() as u32 + 1;
        self.attempts.push(Attempt {
            number,
            started_ms: now,
            finished_ms: None,
            error: None,
            node: None,
        });
        self.state = JobState::InProgress;
        number
    }

    /// Ends the running attempt at `now`, with the failure if it failed.
    pub fn close_attempt(&mut self, now: u64, error: Option<Failure>) {
        if let Some(attempt) = self.attempts.last_mut()
            && attempt.finished_ms.is_none()
        {
            attempt.finished_ms = Some(now);
            attempt.error = error;
        }
    }

    /// Ends the job in `state` at `now`: it and its output are kept for the result TTL.
    pub fn end(&mut self, now: u64, state: JobState) {
        self.state = state;
        self.finished_ms = Some(now);
        self.expires_ms = Some(now.saturating_add(self.policy.result_ttl_s.saturating_mul(1000)));
    }

    /// After a failed attempt: queued again while attempts remain (after the policy's
    /// retry delay when `delay`), and `true`; else ended in `last` with the failure.
    pub fn requeue_or_end(
        &mut self,
        now: u64,
        failure: Failure,
        last: JobState,
        delay: bool,
    ) -> bool {
        let made = self.attempts.len() as u32;
        if made < self.attempts_allowed {
            self.state = JobState::InQueue;
            self.not_before_ms = if delay {
                now.saturating_add(self.policy.retry_delay(made + 1).as_millis() as u64)
            } else {
                now
            };
            true
        } else {
            self.error = Some(failure);
            self.end(now, last);
            false
        }
    }

    /// Queued again by a user's retry, with `max_attempts` more attempts; its output, error
    /// and webhook delivery are forgotten.
    pub fn requeue_by_user(&mut self, now: u64) {
        self.state = JobState::InQueue;
        self.attempts_allowed = self.attempts.len() as u32 + self.policy.max_attempts;
        self.error = None;
        self.finished_ms = None;
        self.expires_ms = None;
        self.not_before_ms = now;
        if let Some(webhook) = self.webhook.as_mut() {
            // Told again when it ends again.
            webhook.delivered = false;
        }
    }

    /// Milliseconds its attempts ran.
    pub fn execution_ms(&self, now_ms: u64) -> u64 {
        self.attempts
            .iter()
            .map(|a| a.finished_ms.unwrap_or(now_ms).saturating_sub(a.started_ms))
            .sum()
    }
}

/// How an attempt ended, as the runner reports it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The endpoint answered.
    Completed(JobOutput),
    /// It failed in a way another attempt may not (a server busy, a worker that failed);
    /// retried after the policy's delay while attempts remain, else `FAILED`.
    Retry(Failure),
    /// It failed for good (the input is bad): `FAILED` now.
    Failed(Failure),
    /// It ran past its execution timeout: retried while attempts remain, else
    /// `TIMED_OUT`.
    TimedOut(Failure),
}

/// Jobs of one endpoint by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// `IN_QUEUE`.
    pub in_queue: u64,
    /// `IN_PROGRESS`.
    pub in_progress: u64,
    /// `COMPLETED`.
    pub completed: u64,
    /// `FAILED`.
    pub failed: u64,
    /// `CANCELLED`.
    pub cancelled: u64,
    /// `TIMED_OUT`.
    pub timed_out: u64,
    /// Attempts that were retries.
    pub retried: u64,
}

impl Counts {
    /// Counts `by` more (or, negative, fewer) jobs in `state`.
    pub fn add(&mut self, state: JobState, by: i64) {
        let slot = match state {
            JobState::InQueue => &mut self.in_queue,
            JobState::InProgress => &mut self.in_progress,
            JobState::Completed => &mut self.completed,
            JobState::Failed => &mut self.failed,
            JobState::Cancelled => &mut self.cancelled,
            JobState::TimedOut => &mut self.timed_out,
        };
        *slot = slot.saturating_add_signed(by);
    }
}
