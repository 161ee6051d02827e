//! The cluster benchmark: what one hop between nodes adds to a request. A real
//! `nats-server` with JetStream (`scripts/toolchain nats`) and two nodes in this process:
//! one with a (simulated) GPU that runs an endpoint needing one, one without, which
//! forwards that endpoint's requests to the first. The same requests, one client, sent
//! straight to the node that runs it and through the one that forwards, side by side.
//!
//! Then durable job submits (`POST /endpoints/sink/run` to a stopped endpoint, so that only
//! the queue is measured) at 1, 16 and 128 concurrent submitters: a node on the embedded
//! store (redb, fsync per group commit) against a node whose jobs are on JetStream, once
//! with the server's default sync (as NATS is run in production, where replicas carry the
//! durability) and once with `sync_interval: always` (every write on disk before its
//! acknowledgement, as the embedded store does on one machine).
//!
//! Run with `./x bench` (or `cargo bench -p wasp-tests --bench cluster`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use wasp_tests::guests::HELLO;
use wasp_tests::load::{self, Report};
use wasp_tests::{NatsServer, TestClient, TestServer, spec, time};

/// How a node of the bench joins `nats`.
fn config(nats: &NatsServer, name: &str, url: String) -> wasp_cluster::ClusterConfig {
    wasp_cluster::ClusterConfig {
        servers: nats.url.clone(),
        node: name.into(),
        url,
        user_password: None,
        token: None,
        nkey: None,
        creds: None,
        ca: None,
        replicas: 1,
    }
}

async fn node(nats: &NatsServer, name: &str, gpus: &str) -> TestServer {
    let gpus = wasp_gateway::Inventory::parse(gpus).unwrap();
    let t = TestServer::start_with_gpus(gpus).await;
    wasp_cluster::join(
        t.server.gateway().clone(),
        config(nats, name, t.server.url()),
    )
    .await
    .unwrap();
    t
}

/// A node whose jobs are on the JetStream of `nats`.
async fn jobs_node(nats: &NatsServer, name: &str) -> TestServer {
    let mut connection = wasp_cluster::connect(config(nats, name, String::new()))
        .await
        .unwrap();
    let jobs = connection.jobs(Duration::from_secs(30)).await.unwrap();
    let t = TestServer::start_configured(|config| {
        config.jobs = Some(wasp_gateway::SharedQueue(std::sync::Arc::new(jobs)));
    })
    .await;
    connection.set_url(t.server.url());
    connection.join(t.server.gateway().clone()).await.unwrap();
    t
}

/// Durable submits at 1, 16 and 128 submitters; the report at 128.
async fn submits(label: &str, t: &TestServer, seconds: Duration) -> Report {
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
    let mut last = None;
    for clients in [1, 16, 128] {
        let r = load::run(addr, "/endpoints/sink/run", body.clone(), clients, seconds).await;
        println!(
            "  {label:<28} {clients:>3} submitters {:>8.0} jobs/s   p50 {:>7.2} ms   p99 {:>7.2} ms",
            r.rps,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3
        );
        last = Some(r);
    }
    let submitted = c.get("/endpoints/sink/health").await.json();
    assert!(
        submitted["jobs"]["in_queue"].as_u64().unwrap() > 0,
        "{submitted:#}"
    );
    last.unwrap()
}

async fn hello(c: &TestClient) {
    let reply = c.invoke("big", "", r#"{"name":"bench"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let store = tempfile::tempdir().unwrap();
    let Some(nats) = NatsServer::start(store.path(), true) else {
        return;
    };
    let gpu = node(&nats, "gpu", "fake:1").await;
    let cpu = node(&nats, "cpu", "none").await;
    gpu.client
        .deploy_ok(
            HELLO,
            "name = \"big\"\n[[versions]]\nname = \"v1\"\n[versions.scaling]\n\
             gpus_per_worker = 1\n[versions.processor]\ncomponent = \"{COMPONENT}\"\n",
        )
        .await;
    // The forwarding node learns of the ready worker from the next heartbeat.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cpu.client.invoke("big", "", r#"{"name":"x"}"#).await.status != 200 {
        assert!(Instant::now() < deadline, "the cpu node never forwarded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let forwarded = cpu.client.invoke("big", "", r#"{"name":"x"}"#).await;
    assert_eq!(forwarded.header("x-wasp-node"), Some("gpu"));

    let iterations = 2000;
    // Warm both paths' connections first.
    time(200, || hello(&gpu.client)).await;
    time(200, || hello(&cpu.client)).await;
    let direct = time(iterations, || hello(&gpu.client)).await;
    let hop = time(iterations, || hello(&cpu.client)).await;
    let direct_again = time(iterations, || hello(&gpu.client)).await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "cluster (nats-server with JetStream, two nodes, one client, {iterations} requests each):"
    );
    println!(
        "  straight to the node that runs it: p50 {:.3} ms p99 {:.3} ms (again: {:.3} / {:.3})",
        ms(direct.p50),
        ms(direct.p99),
        ms(direct_again.p50),
        ms(direct_again.p99)
    );
    println!(
        "  through a node that forwards it:   p50 {:.3} ms p99 {:.3} ms",
        ms(hop.p50),
        ms(hop.p99)
    );
    let base = ms(direct.p50).min(ms(direct_again.p50));
    println!(
        "  one inter-node hop adds {:.3} ms at p50 (goal < 1 ms on loopback)",
        ms(hop.p50) - base
    );
    cpu.stop().await;
    gpu.stop().await;
    drop(nats);

    let seconds = Duration::from_secs(if std::env::args().any(|a| a == "--quick") {
        2
    } else {
        5
    });
    println!("durable job submits (acknowledged once stored), endpoint stopped:");
    let embedded = TestServer::start().await;
    let on_disk = submits("embedded store (redb)", &embedded, seconds).await;
    embedded.stop().await;
    let store = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(store.path(), true).unwrap();
    let node = jobs_node(&nats, "jobs").await;
    let jetstream = submits("JetStream (default sync)", &node, seconds).await;
    node.stop().await;
    drop(nats);
    let store = tempfile::tempdir().unwrap();
    let nats = NatsServer::start_syncing(store.path()).unwrap();
    let node = jobs_node(&nats, "jobs").await;
    let syncing = submits("JetStream (sync always)", &node, seconds).await;
    node.stop().await;
    drop(nats);
    println!(
        "  at 128 submitters JetStream reaches {:.0}% of the embedded store ({:.0}% syncing \
         every write); goal >= 50%",
        100.0 * jetstream.rps / on_disk.rps,
        100.0 * syncing.rps / on_disk.rps
    );
}
