//! Multi-tenant hosting benchmark (`cargo bench -p wasp-tests --bench tenants`): a trivial
//! endpoint's latency, one request at a time, alone and while 48 clients of another tenant
//! keep CPU-bound guest calls running, with fair sharing of the cores (the default) and
//! without it (every guest runs at once, `cpu_turns = 1000`): the same server build, the
//! same machine, one run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use wasp_tests::TestServer;
use wasp_tests::flood::neighbour_under_flood;
use wasp_tests::load::quantile;

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn line(label: &str, latencies: &mut [Duration]) {
    println!(
        "  {label:<44} p50 {:>9}   p99 {:>9}",
        ms(quantile(latencies, 0.5)),
        ms(quantile(latencies, 0.99))
    );
}

async fn alone(requests: usize) -> Vec<Duration> {
    let t = TestServer::start().await;
    // No flood: zero noisy clients.
    let latencies = neighbour_under_flood(&t, 0, requests).await;
    t.stop().await;
    latencies
}

async fn flooded(turns: usize, requests: usize) -> Vec<Duration> {
    let t = TestServer::start_configured(|c| c.runtime.cpu_turns = turns).await;
    let latencies = neighbour_under_flood(&t, 48, requests).await;
    t.stop().await;
    latencies
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let requests = if quick { 300 } else { 2000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!(
            "wasp tenants benchmark ({} cores): a neighbour's trivial requests, {requests} one at a time",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        line("alone", &mut alone(requests).await);
        line(
            "48-call CPU flood, every guest at once",
            &mut flooded(1000, requests).await,
        );
        line(
            "48-call CPU flood, fair sharing (default)",
            &mut flooded(0, requests).await,
        );
        println!("  goal: p99 under the flood <= 10 ms (168 ms before fair sharing)");
    });
}
