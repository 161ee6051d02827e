//! Multi-tenant hosting benchmark (`cargo bench -p wasp-tests --bench tenants`): a trivial
//! endpoint's latency, one request at a time, alone and while 48 clients of another tenant
//! keep CPU-bound guest calls running, with fair sharing of the cores (the default) and
//! without it (every guest runs at once, `cpu_turns = 1000`): the same server build, the
//! same machine, one run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use wasp_tests::TestServer;
use wasp_tests::flood::neighbour_under_flood;
use wasp_tests::load::{ms, quantile};

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

/// p50 of `n` sequential invokes of `name` by `client`.
async fn p50_of(client: &wasp_tests::TestClient, name: &str, n: usize) -> Duration {
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let started = std::time::Instant::now();
        let reply = client.invoke(name, "/ok", "").await;
        latencies.push(started.elapsed());
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    quantile(&mut latencies, 0.5)
}

/// What an API key and rate limits add to a request: the same trivial endpoint invoked
/// one request at a time as a public endpoint without a key, with a key, and with a key
/// and rate limits on both (never refusing); rounds alternated, medians of each round's
/// p50.
async fn overheads(requests: usize, rounds: usize) {
    use serde_json::json;
    let t = TestServer::start().await;
    let c = &t.client;
    let hostile = wasp_tests::guests::HOSTILE;
    let spec = |name: &str, top: &str| {
        format!(
            "name = \"{name}\"\n{top}\n[[versions]]\nname = \"v1\"\n[versions.processor]\n\
             component = \"{{COMPONENT}}\"\n"
        )
    };
    c.deploy_ok(hostile, &spec("open", "public = true")).await;
    c.deploy_ok(hostile, &spec("keyed", "")).await;
    c.deploy_ok(
        hostile,
        &spec(
            "limited",
            "[rate_limit]\nrequests_per_second = 1000000\nburst = 1000000\nmax_concurrent = 1000",
        ),
    )
    .await;
    let key = |limit: Option<serde_json::Value>| {
        let c = c.clone();
        async move {
            let mut body = json!({ "role": "invoker" });
            if let Some(limit) = limit {
                body["rate_limit"] = limit;
            }
            let made = c.post_json("/api/v1/keys", &body).await.json();
            made["key"].as_str().unwrap().to_owned()
        }
    };
    let anonymous = c.as_key(None);
    let invoker = c.as_key(Some(&key(None).await));
    let limited = c.as_key(Some(
        &key(Some(json!({
            "requests_per_second": 1000000.0, "burst": 1000000, "max_concurrent": 1000
        })))
        .await,
    ));
    let mut samples: [Vec<Duration>; 3] = Default::default();
    for _ in 0..rounds {
        samples[0].push(p50_of(&anonymous, "open", requests).await);
        samples[1].push(p50_of(&invoker, "keyed", requests).await);
        samples[2].push(p50_of(&limited, "limited", requests).await);
    }
    let [open, keyed, capped] = samples.map(|mut s| quantile(&mut s, 0.5));
    // The same checks in-process, without HTTP: what they cost the server.
    let token = invoker.key().unwrap().to_owned();
    let limited_token = limited.key().unwrap().to_owned();
    let gateway = t.server.gateway();
    let per_call = |token: &str, name: &str, limits: bool| {
        let n = 200_000u32;
        let mut rounds = Vec::new();
        for _ in 0..5 {
            let started = std::time::Instant::now();
            for _ in 0..n {
                assert!(gateway.bench_access(token, name, limits));
            }
            rounds.push(started.elapsed() / n);
        }
        quantile(&mut rounds, 0.5)
    };
    let auth = per_call(&token, "keyed", false);
    let with_limits = per_call(&limited_token, "limited", true);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "  a trivial request, one at a time (medians of {rounds} rounds' p50 of {requests} requests):"
    );
    println!(
        "    public endpoint, no key              p50 {:>7.1} µs",
        us(open)
    );
    println!(
        "    with an API key                      p50 {:>7.1} µs   (+{:.1} µs: authentication; goal < 5 µs)",
        us(keyed),
        us(keyed) - us(open)
    );
    println!(
        "    with a key, key and endpoint limits  p50 {:>7.1} µs   (+{:.1} µs: the rate limiters)",
        us(capped),
        us(capped) - us(keyed)
    );
    println!(
        "  in-process, per request: key check {:.2} µs (goal < 5 µs); key check, both rate limiters and their headers {:.2} µs",
        us(auth),
        us(with_limits)
    );
    t.stop().await;
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
        overheads(if quick { 1000 } else { 5000 }, if quick { 3 } else { 7 }).await;
    });
}
