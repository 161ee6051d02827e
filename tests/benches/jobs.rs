//! The jobs benchmark, printed as figures from one run:
//!
//! 1. durable submit: jobs acknowledged per second (each fsynced before its `202`) and
//!    p50/p99 acknowledgement latency at 1, 16 and 128 concurrent submitters, on an
//!    endpoint that is stopped so that only the queue is measured;
//! 2. end to end through the `hello` endpoint: jobs submitted by 32 clients and run by
//!    the server, jobs/s from the first submit to the last completion, against sync
//!    invokes of the same endpoint by 32 clients in the same run;
//! 3. a batch through the candle all-MiniLM-L6-v2 embeddings endpoint: lines/s against
//!    the same requests sent as sync requests at the same concurrency.
//!
//! The data directory is on the machine's disk (not tmpfs), so every commit syncs for
//! real. Run with `./x bench` (or `cargo bench -p wasp-tests --bench jobs`; `--quick`
//! for a short run with a 10,000-line batch instead of 100,000).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use wasp_tests::guests::{HELLO, TEXT_EMBEDDINGS};
use wasp_tests::load;
use wasp_tests::{TestClient, TestServer, minilm_spec, spec};

/// Waits until the endpoint has no job queued or running; the jobs completed.
async fn drained(c: &TestClient, name: &str) -> u64 {
    loop {
        let health = c.get(&format!("/endpoints/{name}/health")).await.json();
        let open = health["jobs"]["in_queue"].as_u64().unwrap()
            + health["jobs"]["in_progress"].as_u64().unwrap();
        if open == 0 {
            return health["jobs"]["completed"].as_u64().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn durable_submit(t: &TestServer, seconds: Duration) {
    println!("1. durable submit (fsync before 202), endpoint stopped");
    let c = &t.client;
    c.deploy_ok(HELLO, &spec("sink", "")).await;
    assert_eq!(c.post("/api/v1/endpoints/sink/stop", "").await.status, 200);
    let body = Bytes::from(json!({ "input": { "name": "bench" } }).to_string());
    let addr = t.server.local_addr();
    load::run(
        addr,
        "/endpoints/sink/run",
        body.clone(),
        16,
        Duration::from_millis(500),
    )
    .await;
    for clients in [1, 16, 128] {
        let r = load::run(addr, "/endpoints/sink/run", body.clone(), clients, seconds).await;
        load::print_line(&format!("{clients} submitters"), &r);
    }
    println!(
        "  goal at 128: >= 10,000 jobs/s, p99 < 10 ms (River on Postgres: ~46k/s on a large machine)"
    );
    assert_eq!(
        c.request("DELETE", "/api/v1/endpoints/sink", "")
            .await
            .status,
        204
    );
}

async fn end_to_end(t: &TestServer, seconds: Duration) {
    println!("2. end to end through `hello`, 32 clients; jobs.concurrency_per_worker = 256");
    let c = &t.client;
    // Jobs wait on commits more than on the processor: more of them in flight keeps the
    // instances busy (they are still at most `limits.max_instances` at once).
    c.deploy_ok(
        HELLO,
        &format!(
            "{}[jobs]\nconcurrency_per_worker = 256\n",
            spec("hello", "")
        ),
    )
    .await;
    let addr = t.server.local_addr();
    let invoke = Bytes::from(json!({ "name": "bench" }).to_string());
    load::run(
        addr,
        "/endpoints/hello/invoke",
        invoke.clone(),
        32,
        Duration::from_millis(500),
    )
    .await;
    let sync = load::run(addr, "/endpoints/hello/invoke", invoke, 32, seconds).await;
    load::print_line("sync invokes", &sync);
    let before = drained(c, "hello").await;
    let job = Bytes::from(json!({ "input": { "name": "bench" } }).to_string());
    let started = Instant::now();
    let submitted = load::run(addr, "/endpoints/hello/run", job, 32, seconds).await;
    let completed = drained(c, "hello").await - before;
    let elapsed = started.elapsed();
    let rate = completed as f64 / elapsed.as_secs_f64();
    println!(
        "  {:<34} {:>9.0} /s   ({completed} jobs, first submit to last completion {:.1} s; submits at {:.0} /s)",
        "jobs, submitted and run",
        rate,
        elapsed.as_secs_f64(),
        submitted.rps
    );
    println!(
        "  jobs / sync: {:.1}%   (goal >= 50%)",
        rate / sync.rps * 100.0
    );
}

async fn batch(t: &TestServer, lines: usize, concurrency: usize) {
    println!(
        "3. a {lines}-line batch through all-MiniLM-L6-v2 (batching 32), {concurrency} in flight"
    );
    let c = &t.client;
    let extra = "[versions.batching]\nmax_batch = 32\nmax_batch_delay_ms = 2";
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_spec("emb", extra))
        .await;
    let input: String = (0..lines)
        .map(|i| {
            json!({ "model": "emb", "input": format!("Sentence number {i} is about a white horse.") })
                .to_string()
                + "\n"
        })
        .collect();
    let addr = t.server.local_addr();
    let request = Bytes::from(
        json!({ "model": "emb", "input": "Sentence number 7 is about a white horse." }).to_string(),
    );
    load::run(
        addr,
        "/v1/embeddings",
        request.clone(),
        concurrency,
        Duration::from_secs(1),
    )
    .await;
    // The same number of sync requests at the same concurrency, timed to the last answer.
    let sync_seconds = Duration::from_secs_f64((lines as f64 / 400.0).clamp(5.0, 120.0));
    let sync = load::run(addr, "/v1/embeddings", request, concurrency, sync_seconds).await;
    load::print_line("sync requests", &sync);
    let started = Instant::now();
    let reply = c
        .post(
            &format!("/api/v1/batches?endpoint=emb&path=/v1/embeddings&concurrency={concurrency}"),
            input,
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let done = loop {
        let status = c.get(&format!("/api/v1/batches/{id}")).await.json();
        if status["status"] != "RUNNING" {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let elapsed = started.elapsed();
    assert_eq!(done["status"], "COMPLETED", "{done:#}");
    assert_eq!(done["failed"], 0, "{done:#}");
    let rate = lines as f64 / elapsed.as_secs_f64();
    println!(
        "  {:<34} {:>9.0} /s   ({lines} lines in {:.1} s, output checkpointed every second)",
        "batch lines",
        rate,
        elapsed.as_secs_f64()
    );
    println!("  batch / sync: {:.1}%", rate / sync.rps * 100.0);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let seconds = Duration::from_secs(if quick { 2 } else { 5 });
    let lines = if quick { 10_000 } else { 100_000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!(
            "wasp jobs benchmark ({} cores, data directory on disk)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        // On the machine's disk, beside the build, so that fsync is real.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
        std::fs::create_dir_all(&root).unwrap();
        let data = tempfile::tempdir_in(&root).unwrap();
        let t = TestServer::start_in(data.path()).await;
        durable_submit(&t, seconds).await;
        end_to_end(&t, seconds).await;
        if !std::env::args().any(|a| a == "--no-batch") {
            batch(&t, lines, 32).await;
        }
        t.stop().await;
    });
}
