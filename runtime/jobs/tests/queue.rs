//! The embedded queue in virtual time: order, retries with backoff, dead letters, timeouts,
//! cancel, user retries, TTL expiry, leases, blobs, and what a restart recovers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use wasp_jobs::{
    EmbeddedQueue, Failure, INLINE_MAX, JobError, JobOutput, JobPolicy, JobQueue, JobRequest,
    JobState, ListFilter, NewJob, Outcome, Payload, Priority,
};
use wasp_scaling::VirtualClock;

const LEASE: Duration = Duration::from_secs(60);

struct Fixture {
    dir: tempfile::TempDir,
    clock: VirtualClock,
    queue: EmbeddedQueue,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = VirtualClock::new("2026-11-23T12:00:00Z".parse().unwrap());
        let queue = EmbeddedQueue::open(dir.path(), Arc::new(clock.clone())).unwrap();
        Self { dir, clock, queue }
    }

    /// The same directory opened again, as after a crash (the old writer is gone).
    fn reopen(self) -> Self {
        let Self { dir, clock, queue } = self;
        queue.close();
        drop(queue);
        let queue = EmbeddedQueue::open(dir.path(), Arc::new(clock.clone())).unwrap();
        Self { dir, clock, queue }
    }

    async fn submit(&self, body: &str, policy: JobPolicy) -> String {
        let jobs = self
            .queue
            .submit(vec![new_job("e", body.as_bytes().to_vec(), policy)])
            .await
            .unwrap();
        jobs[0].id.clone()
    }
}

fn new_job(endpoint: &str, body: Vec<u8>, policy: JobPolicy) -> NewJob {
    NewJob {
        endpoint: endpoint.into(),
        request: JobRequest {
            method: "POST".into(),
            path: "/".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Payload::Inline(body),
        },
        policy,
        webhook: None,
    }
}

fn output(body: &[u8]) -> Outcome {
    Outcome::Completed(JobOutput {
        status: 200,
        headers: Vec::new(),
        body: Payload::Inline(body.to_vec()),
    })
}

fn failure(code: &str) -> Failure {
    Failure {
        code: code.into(),
        message: format!("{code} happened"),
    }
}

fn bodies(jobs: &[wasp_jobs::Job]) -> Vec<String> {
    jobs.iter()
        .map(|j| match &j.request.body {
            Payload::Inline(b) => String::from_utf8(b.clone()).unwrap(),
            Payload::Blob { file, .. } => file.clone(),
        })
        .collect()
}

#[tokio::test]
async fn a_job_runs_once_and_its_result_is_kept() {
    let f = Fixture::new();
    let id = f.submit("a", JobPolicy::default()).await;
    assert_eq!(f.queue.counts("e").in_queue, 1);
    let leased = f.queue.lease("e", 10, LEASE).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].state, JobState::InProgress);
    assert_eq!(leased[0].attempt(), 1);
    assert!(f.queue.lease("e", 10, LEASE).await.unwrap().is_empty());
    let done = f
        .queue
        .finish(&id, 1, output(b"ok"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.output.unwrap().body, Payload::Inline(b"ok".to_vec()));
    let counts = f.queue.counts("e");
    assert_eq!(
        (counts.in_queue, counts.in_progress, counts.completed),
        (0, 0, 1)
    );
    // A second finish of the same attempt changes nothing.
    assert!(
        f.queue
            .finish(&id, 1, output(b"again"))
            .await
            .unwrap()
            .is_none()
    );
    let stored = f.queue.get(&id).await.unwrap().unwrap();
    assert_eq!(
        stored.expires_ms,
        Some(stored.finished_ms.unwrap() + 86_400_000)
    );
}

#[tokio::test]
async fn high_priority_runs_first_and_low_priority_is_no_reason_to_scale() {
    let f = Fixture::new();
    let with = |priority| JobPolicy {
        priority,
        ..JobPolicy::default()
    };
    f.submit("low", with(Priority::Low)).await;
    f.submit("normal-1", with(Priority::Normal)).await;
    f.submit("high", with(Priority::High)).await;
    f.submit("normal-2", with(Priority::Normal)).await;
    let backlog = f.queue.backlog("e");
    assert_eq!((backlog.scaling, backlog.low), (3, 1));
    let leased = f.queue.lease("e", 10, LEASE).await.unwrap();
    assert_eq!(bodies(&leased), ["high", "normal-1", "normal-2", "low"]);
    assert_eq!(f.queue.backlog("e"), Default::default());
}

#[tokio::test]
async fn failed_attempts_are_retried_with_backoff_then_dead_lettered() {
    let f = Fixture::new();
    let policy = JobPolicy {
        max_attempts: 3,
        retry_delay_ms: 1_000,
        ..JobPolicy::default()
    };
    let id = f.submit("x", policy).await;
    let delays = [1_000, 2_000];
    for (attempt, delay) in (1..=2).zip(delays) {
        let leased = f.queue.lease("e", 1, LEASE).await.unwrap();
        assert_eq!(leased[0].attempt(), attempt);
        let job = f
            .queue
            .finish(
                &id,
                attempt,
                Outcome::Retry(failure(&format!("boom-{attempt}"))),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.state, JobState::InQueue);
        let failed_at = job.attempts.last().unwrap().finished_ms.unwrap();
        assert_eq!(job.not_before_ms, failed_at + delay);
        // Not before its delay has passed.
        f.clock.advance(Duration::from_millis(delay - 1));
        assert!(
            f.queue.lease("e", 1, LEASE).await.unwrap().is_empty(),
            "attempt {attempt}"
        );
        assert_eq!(f.queue.backlog("e").scaling, 0);
        f.clock.advance(Duration::from_millis(1));
        assert_eq!(f.queue.backlog("e").scaling, 1);
    }
    f.queue.lease("e", 1, LEASE).await.unwrap();
    let job = f
        .queue
        .finish(&id, 3, Outcome::Retry(failure("boom-3")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.error.as_ref().unwrap().code, "boom-3");
    let errors: Vec<&str> = job
        .attempts
        .iter()
        .map(|a| a.error.as_ref().unwrap().code.as_str())
        .collect();
    assert_eq!(errors, ["boom-1", "boom-2", "boom-3"]);
    assert_eq!(f.queue.counts("e").failed, 1);
    assert_eq!(f.queue.counts("e").retried, 2);
}

#[tokio::test]
async fn bad_input_fails_at_once_and_timeouts_end_timed_out() {
    let f = Fixture::new();
    let id = f.submit("bad", JobPolicy::default()).await;
    f.queue.lease("e", 1, LEASE).await.unwrap();
    let job = f
        .queue
        .finish(&id, 1, Outcome::Failed(failure("bad_request")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((job.state, job.attempts.len()), (JobState::Failed, 1));

    let policy = JobPolicy {
        max_attempts: 2,
        retry_delay_ms: 0,
        ..JobPolicy::default()
    };
    let id = f.submit("slow", policy).await;
    for attempt in 1..=2 {
        f.queue.lease("e", 1, LEASE).await.unwrap();
        let job = f
            .queue
            .finish(&id, attempt, Outcome::TimedOut(failure("timed_out")))
            .await
            .unwrap()
            .unwrap();
        let expected = if attempt == 1 {
            JobState::InQueue
        } else {
            JobState::TimedOut
        };
        assert_eq!(job.state, expected);
    }
    assert_eq!(f.queue.counts("e").timed_out, 1);
}

#[tokio::test]
async fn cancel_takes_queued_and_running_jobs_and_refuses_finished_ones() {
    let f = Fixture::new();
    let queued = f.submit("q", JobPolicy::default()).await;
    let running = f.submit("r", JobPolicy::default()).await;
    let (job, was_running) = f.queue.cancel("e", &queued).await.unwrap();
    assert_eq!((job.state, was_running), (JobState::Cancelled, false));
    let leased = f.queue.lease("e", 10, LEASE).await.unwrap();
    assert_eq!(bodies(&leased), ["r"]);
    let (job, was_running) = f.queue.cancel("e", &running).await.unwrap();
    assert_eq!((job.state, was_running), (JobState::Cancelled, true));
    // The cancelled attempt's late result is dropped.
    assert!(
        f.queue
            .finish(&running, 1, output(b"late"))
            .await
            .unwrap()
            .is_none()
    );
    match f.queue.cancel("e", &running).await {
        Err(JobError::Conflict(message)) => assert!(message.contains("CANCELLED"), "{message}"),
        other => panic!("{other:?}"),
    }
    // Another endpoint's job is not found through this one.
    assert!(matches!(
        f.queue.cancel("other", &queued).await,
        Err(JobError::NotFound(_))
    ));
    assert_eq!(f.queue.counts("e").cancelled, 2);
}

#[tokio::test]
async fn a_user_retry_queues_a_failed_job_with_fresh_attempts() {
    let f = Fixture::new();
    let policy = JobPolicy {
        max_attempts: 1,
        ..JobPolicy::default()
    };
    let id = f.submit("x", policy).await;
    f.queue.lease("e", 1, LEASE).await.unwrap();
    assert!(matches!(
        f.queue.retry("e", &id).await,
        Err(JobError::Conflict(m)) if m.contains("IN_PROGRESS")
    ));
    f.queue
        .finish(&id, 1, Outcome::Retry(failure("boom")))
        .await
        .unwrap();
    let job = f.queue.retry("e", &id).await.unwrap();
    assert_eq!((job.state, job.attempts_allowed), (JobState::InQueue, 2));
    let leased = f.queue.lease("e", 1, LEASE).await.unwrap();
    assert_eq!(leased[0].attempt(), 2);
    let done = f
        .queue
        .finish(&id, 2, output(b"ok"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Completed);
    let counts = f.queue.counts("e");
    assert_eq!((counts.failed, counts.completed), (0, 1));
}

#[tokio::test]
async fn finished_jobs_go_when_their_ttl_passes_with_their_blobs() {
    let f = Fixture::new();
    let policy = JobPolicy {
        result_ttl_s: 60,
        ..JobPolicy::default()
    };
    let big = vec![b'x'; INLINE_MAX + 1];
    let jobs = f
        .queue
        .submit(vec![new_job("e", big.clone(), policy)])
        .await
        .unwrap();
    let id = jobs[0].id.clone();
    assert!(matches!(jobs[0].request.body, Payload::Blob { .. }));
    let leased = f.queue.lease("e", 1, LEASE).await.unwrap();
    assert_eq!(
        f.queue.read_payload(&leased[0].request.body).await.unwrap(),
        big
    );
    let done = f.queue.finish(&id, 1, output(&big)).await.unwrap().unwrap();
    let out = done.output.unwrap().body;
    assert!(matches!(out, Payload::Blob { .. }));
    assert_eq!(f.queue.read_payload(&out).await.unwrap(), big);
    let blobs = f.dir.path().join("blobs");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 2);

    f.clock.advance(Duration::from_secs(59));
    assert_eq!(f.queue.expire().await.unwrap(), 0);
    f.clock.advance(Duration::from_secs(1));
    assert_eq!(f.queue.expire().await.unwrap(), 1);
    assert!(f.queue.get(&id).await.unwrap().is_none());
    assert_eq!(f.queue.counts("e").completed, 0);
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 0);
}

#[tokio::test]
async fn an_expired_lease_is_redelivered_and_the_old_attempt_fenced() {
    let f = Fixture::new();
    let policy = JobPolicy {
        execution_timeout_ms: 10_000,
        ..JobPolicy::default()
    };
    let id = f.submit("x", policy).await;
    f.queue.lease("e", 1, Duration::from_secs(5)).await.unwrap();
    f.clock.advance(Duration::from_secs(14));
    assert!(f.queue.lease("e", 1, LEASE).await.unwrap().is_empty());
    f.clock.advance(Duration::from_secs(1));
    let leased = f.queue.lease("e", 1, LEASE).await.unwrap();
    assert_eq!(leased[0].attempt(), 2);
    assert_eq!(
        leased[0].attempts[0].error.as_ref().unwrap().code,
        "lease_expired"
    );
    assert!(
        f.queue
            .finish(&id, 1, output(b"stale"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        f.queue
            .finish(&id, 2, output(b"ok"))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn a_restart_queues_interrupted_jobs_again_and_keeps_the_rest() {
    let f = Fixture::new();
    let done = f.submit("done", JobPolicy::default()).await;
    let running = f.submit("running", JobPolicy::default()).await;
    let queued = f.submit("queued", JobPolicy::default()).await;
    let leased = f.queue.lease("e", 2, LEASE).await.unwrap();
    assert_eq!(bodies(&leased), ["done", "running"]);
    f.queue.finish(&done, 1, output(b"ok")).await.unwrap();
    // An orphan blob, as a crash between writing it and committing leaves.
    std::fs::write(f.dir.path().join("blobs/01ORPHAN.in"), b"x").unwrap();

    let f = f.reopen();
    let counts = f.queue.counts("e");
    assert_eq!(
        (counts.in_queue, counts.in_progress, counts.completed),
        (2, 0, 1)
    );
    let job = f.queue.get(&running).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::InQueue);
    assert_eq!(job.attempts[0].error.as_ref().unwrap().code, "interrupted");
    let leased = f.queue.lease("e", 10, LEASE).await.unwrap();
    // Submission order is kept across the restart.
    assert_eq!(bodies(&leased), ["running", "queued"]);
    assert_eq!(leased[0].attempt(), 2);
    assert_eq!(leased[1].attempt(), 1);
    assert_eq!(leased[1].id, queued);
    assert_eq!(
        std::fs::read_dir(f.dir.path().join("blobs"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn purge_cancels_the_queue_and_leaves_running_jobs() {
    let f = Fixture::new();
    for i in 0..5 {
        f.submit(&format!("{i}"), JobPolicy::default()).await;
    }
    let running = f.queue.lease("e", 2, LEASE).await.unwrap();
    assert_eq!(f.queue.purge("e").await.unwrap(), 3);
    let counts = f.queue.counts("e");
    assert_eq!(
        (counts.in_queue, counts.in_progress, counts.cancelled),
        (0, 2, 3)
    );
    assert!(
        f.queue
            .finish(&running[0].id, 1, output(b"ok"))
            .await
            .unwrap()
            .is_some()
    );
    let purged = f
        .queue
        .list(ListFilter {
            tenant: None,
            state: Some(JobState::Cancelled),
            limit: 10,
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(purged.len(), 3);
    assert_eq!(purged[0].error.as_ref().unwrap().code, "purged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_share_commits_and_all_land() {
    let f = Arc::new(Fixture::new());
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let f = f.clone();
            tokio::spawn(async move {
                for j in 0..20 {
                    f.submit(&format!("{i}-{j}"), JobPolicy::default()).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(f.queue.counts("e").in_queue, 1280);
    let leased = f.queue.lease("e", 2000, LEASE).await.unwrap();
    assert_eq!(leased.len(), 1280);
    let mut seqs: Vec<u64> = leased.iter().map(|j| j.seq).collect();
    seqs.dedup();
    assert_eq!(seqs.len(), 1280);
}
