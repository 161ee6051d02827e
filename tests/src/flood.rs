//! A CPU flood from one tenant and a neighbour's latency beside it (the fairness test and
//! benchmark).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::guests::{HELLO, HOSTILE};
use crate::{TestClient, TestServer, spec};

/// Latencies of `requests` requests to a trivial endpoint of tenant `quiet`, one at a time,
/// while `clients` clients of tenant `noisy` keep CPU-bound guest calls running (each
/// spins until its 1 s deadline). Makes both tenants and their endpoints on `t`.
pub async fn neighbour_under_flood(
    t: &TestServer,
    clients: usize,
    requests: usize,
) -> Vec<Duration> {
    let operator = &t.client;
    for name in ["noisy", "quiet"] {
        operator
            .post_json("/api/v1/tenants", &json!({ "name": name }))
            .await;
    }
    let key = |tenant: &'static str| async move {
        let made = operator
            .post_json(
                "/api/v1/keys",
                &json!({ "tenant": tenant, "role": "admin" }),
            )
            .await;
        made.json()["key"].as_str().unwrap().to_owned()
    };
    let noisy = operator.as_key(Some(&key("noisy").await));
    let quiet = operator.as_key(Some(&key("quiet").await));
    noisy
        .deploy_ok(
            HOSTILE,
            &spec(
                "spin",
                "[versions.limits]\ntimeout_ms = 1000\nmax_instances = 64\nmax_queue = 64",
            ),
        )
        .await;
    quiet.deploy_ok(HELLO, &spec("hello", "")).await;
    for _ in 0..20 {
        assert_eq!(
            quiet.invoke("hello", "", r#"{"name":"w"}"#).await.status,
            200
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..clients {
        let (noisy, stop): (TestClient, _) = (noisy.clone(), stop.clone());
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = noisy.invoke("spin", "/loop", "").await;
                assert_eq!(r.status, 504, "{}", r.text());
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let r = quiet.invoke("hello", "", r#"{"name":"n"}"#).await;
        latencies.push(started.elapsed());
        assert_eq!(r.status, 200, "{}", r.text());
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    latencies
}
