//! The cluster benchmark: what one hop between nodes adds to a request. A real
//! `nats-server` with JetStream (`scripts/toolchain nats`) and two nodes in this process:
//! one with a (simulated) GPU that runs an endpoint needing one, one without, which
//! forwards that endpoint's requests to the first. The same requests, one client, sent
//! straight to the node that runs it and through the one that forwards, side by side.
//!
//! Run with `./x bench` (or `cargo bench -p wasp-tests --bench cluster`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use wasp_tests::guests::HELLO;
use wasp_tests::{NatsServer, TestClient, TestServer, time};

async fn node(nats: &NatsServer, name: &str, gpus: &str) -> TestServer {
    let gpus = wasp_gateway::Inventory::parse(gpus).unwrap();
    let t = TestServer::start_with_gpus(gpus).await;
    wasp_cluster::join(
        t.server.gateway().clone(),
        wasp_cluster::ClusterConfig {
            servers: nats.url.clone(),
            node: name.into(),
            url: t.server.url(),
            user_password: None,
            token: None,
            ca: None,
            replicas: 1,
        },
    )
    .await
    .unwrap();
    t
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
}
