//! Durable jobs against `kill -9` of the real binary: thousands of jobs submitted by
//! concurrent clients, the server killed in the middle of processing, restarted; every
//! acknowledged job completes with its own output, and only jobs that were running at the
//! kill took a second attempt.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Serve;
use serde_json::{Value, json};
use wasp_tests::guests::HOSTILE;
use wasp_tests::spec;

const JOBS: usize = 5_000;
const CLIENTS: usize = 16;
const CONCURRENCY: u64 = 8;

fn completed(health: &Value) -> u64 {
    health["jobs"]["completed"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_job_completes_after_a_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let server = Serve::start(data.path());
    let c = server.client();
    let jobs = format!("[jobs]\nconcurrency_per_worker = {CONCURRENCY}\n");
    c.deploy_ok(HOSTILE, &format!("{}{jobs}", spec("durable", "")))
        .await;

    // Concurrent submitters; an id counts once its 202 came back.
    let stop = Arc::new(AtomicBool::new(false));
    let submitters: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in 0..JOBS.div_ceil(CLIENTS) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let input = format!("job-{client}-{n}");
                    let body = json!({ "input": input, "path": "/echo" });
                    let reply = c
                        .try_request_with(
                            "POST",
                            "/endpoints/durable/run",
                            &[("content-type", "application/json")],
                            body.to_string(),
                        )
                        .await;
                    match reply {
                        Ok(r) if r.status == 202 => {
                            acked.push((r.json()["id"].as_str().unwrap().to_owned(), input));
                        }
                        Ok(r) => panic!("submit refused: {} {}", r.status, r.text()),
                        // The server was killed under this request: not acknowledged.
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect();

    // Kill once a good part is done and much is still queued or running.
    let deadline = Instant::now() + Duration::from_secs(120);
    let at_kill = loop {
        let health = c.get("/endpoints/durable/health").await.json();
        if completed(&health) >= 1_500 {
            break health;
        }
        assert!(Instant::now() < deadline, "too slow: {health:#}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    let mut acked: HashMap<String, String> = HashMap::new();
    for s in submitters {
        acked.extend(s.await.unwrap());
    }
    let done_at_kill = completed(&at_kill);
    assert!(
        (done_at_kill as usize) < acked.len(),
        "the kill came after the work was done: {at_kill:#}"
    );

    // Restart: the queue picks up where it was.
    let server = Serve::start(data.path());
    let c = server.client();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let health = c.get("/endpoints/durable/health").await.json();
        let open = health["jobs"]["in_queue"].as_u64().unwrap()
            + health["jobs"]["in_progress"].as_u64().unwrap();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jobs left after restart: {health:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut retried = 0;
    for (id, input) in &acked {
        let status = c
            .get(&format!("/endpoints/durable/status/{id}"))
            .await
            .json();
        assert_eq!(status["status"], "COMPLETED", "{status:#}");
        // `/echo` answers the body: the input, JSON-encoded.
        assert_eq!(status["output"], format!("\"{input}\""), "{status:#}");
        let attempts = status["attempts"].as_array().unwrap();
        if attempts.len() > 1 {
            retried += 1;
            assert_eq!(attempts.len(), 2, "{status:#}");
            assert_eq!(attempts[0]["error"]["code"], "interrupted", "{status:#}");
        }
    }
    // Only jobs that were running at the kill ran twice: at most one runner's worth.
    assert!(retried <= CONCURRENCY, "{retried} jobs ran twice");
    eprintln!(
        "{} jobs acknowledged, {done_at_kill} completed at the kill, {retried} ran again after it",
        acked.len()
    );
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_killed_half_way_resumes_with_one_output_line_per_input_line() {
    const LINES: usize = 10_000;
    let data = tempfile::tempdir().unwrap();
    let server = Serve::start(data.path());
    let c = server.client();
    c.deploy_ok(wasp_tests::guests::HELLO, &spec("hello", ""))
        .await;
    let input: String = (1..=LINES)
        .map(|i| format!("{{\"name\":\"n{i}\"}}\n"))
        .collect();
    let reply = c
        .post("/api/v1/batches?endpoint=hello&concurrency=32", input)
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    let at_kill = loop {
        let status = c.get(&format!("/api/v1/batches/{id}")).await.json();
        if status["done"].as_u64().unwrap() >= (LINES / 2) as u64 {
            break status;
        }
        assert!(Instant::now() < deadline, "too slow: {status:#}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    server.kill9();
    assert!(
        at_kill["done"].as_u64().unwrap() < LINES as u64,
        "{at_kill:#}"
    );

    let server = Serve::start(data.path());
    let c = server.client();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let status = c.get(&format!("/api/v1/batches/{id}")).await.json();
        if status["status"] == "COMPLETED" {
            assert_eq!(status["done"], LINES, "{status:#}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not done after restart: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = c.get(&format!("/api/v1/batches/{id}/output")).await.text();
    let lines: Vec<Value> = output
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), LINES, "one output line per input line");
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        assert_eq!(line["line"], n);
        assert_eq!(
            line["output"]["greeting"],
            format!("hello, n{n}!"),
            "{line}"
        );
    }
    eprintln!(
        "killed at {} of {LINES} lines; resumed to {LINES} output lines in order",
        at_kill["done"]
    );
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_lets_a_running_job_finish() {
    let data = tempfile::tempdir().unwrap();
    let server = Serve::start(data.path());
    let c = server.client();
    c.deploy_ok(HOSTILE, &spec("slow", "")).await;
    let reply = c
        .post_json(
            "/endpoints/slow/run",
            &json!({ "input": 1500, "path": "/sleep" }),
        )
        .await;
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.get(&format!("/endpoints/slow/status/{id}")).await.json()["status"] != "IN_PROGRESS" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server.terminate().success());
    let server = Serve::start(data.path());
    let c = server.client();
    let status = c.get(&format!("/endpoints/slow/status/{id}")).await.json();
    assert_eq!(status["status"], "COMPLETED", "{status:#}");
    assert_eq!(
        status["attempts"].as_array().unwrap().len(),
        1,
        "{status:#}"
    );
    server.terminate();
}
