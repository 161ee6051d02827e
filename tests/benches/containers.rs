//! The container benchmark, printed as figures from one run: the same all-MiniLM-L6-v2
//! embeddings through the candle backend and through a container (the KServe v2 model
//! server of tests/src/bin/model-server.rs, run by the process driver), side by side:
//!
//! 1. cold start from zero workers to the first response (the container started, its
//!    model loaded, its readiness probe passed; the candle worker loads the same weights),
//!    as a local process and, where a Podman service runs (`scripts/toolchain engine`), as
//!    an image (the model server's binary and libraries, nothing else) started by the
//!    engine;
//! 2. warm request latency at concurrency 1, and what the container hop adds at p50.
//!
//! Run with `./x bench` (or `cargo bench -p wasp-tests --bench containers`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::json;
use wasp_tests::guests::TEXT_EMBEDDINGS;
use wasp_tests::{TestClient, TestServer, minilm_spec, model_server_spec, time};

const MODEL_SERVER: &str = env!("CARGO_BIN_EXE_model-server");

/// Scaling that reacts within a second, so that a cold start can be taken every few.
const AT_ZERO: &str = "[versions.scaling]\nmin_workers = 0\nstable_window_s = 1\n\
    panic_window_s = 1\nscale_down_delay_s = 0\nscale_up_cooldown_s = 0\n\
    scale_down_cooldown_s = 0";

async fn embed(c: &TestClient, model: &str) {
    let reply = c
        .post(
            "/v1/embeddings",
            json!({ "model": model, "input": "A sentence of ordinary length, to embed." })
                .to_string(),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

async fn scaled_to_zero(c: &TestClient, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = &c.get(&format!("/api/v1/endpoints/{name}")).await.json()["versions"][0];
        if v["status"] == "scaledToZero" && v["workers"].as_array().is_some_and(Vec::is_empty) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} did not scale to zero");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Median cold start of `name` over `rounds`, in milliseconds.
async fn cold_start(c: &TestClient, name: &str, rounds: usize) -> f64 {
    let mut samples = Vec::new();
    for _ in 0..rounds {
        scaled_to_zero(c, name).await;
        // Let a stopping container finish before the next one starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        embed(c, name).await;
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_spec("native", AT_ZERO))
        .await;
    c.deploy_ok(
        TEXT_EMBEDDINGS,
        &model_server_spec(
            MODEL_SERVER,
            "boxed",
            "",
            "readiness = { path = \"/v2/health/ready\", period_ms = 10 }",
            AT_ZERO,
        ),
    )
    .await;

    println!(
        "container backend (process driver, KServe v2 model server) against candle, same MiniLM:"
    );
    let rounds = 5;
    let native_cold = cold_start(c, "native", rounds).await;
    let boxed_cold = cold_start(c, "boxed", rounds).await;
    println!(
        "  cold start to first response, median of {rounds}: candle {native_cold:.0} ms, \
         container {boxed_cold:.0} ms ({:+.0} ms)",
        boxed_cold - native_cold
    );

    if let Some(socket) = wasp_tests::test_engine("the engine's cold start") {
        let image = wasp_tests::model_server_image(MODEL_SERVER);
        let engined = TestServer::start_with_engine(&socket).await;
        let e = &engined.client;
        let spec = wasp_tests::model_image_spec(
            "imaged",
            &image,
            "pull = \"never\"\ngrace_period_s = 5\n\
             readiness = { path = \"/v2/health/ready\", period_ms = 10 }",
            AT_ZERO,
        );
        e.deploy_ok(TEXT_EMBEDDINGS, &spec).await;
        let imaged_cold = cold_start(e, "imaged", rounds).await;
        println!(
            "  the same model server as an image started by Podman (runc): {imaged_cold:.0} ms \
             ({:+.0} ms on the process)",
            imaged_cold - boxed_cold
        );
        engined.stop().await;
    }

    // Warm: keep a worker of each while timing.
    for name in ["native", "boxed"] {
        embed(c, name).await;
    }
    let iterations = 400;
    let native = time(iterations, || embed(c, "native")).await;
    let boxed = time(iterations, || embed(c, "boxed")).await;
    let native_again = time(iterations, || embed(c, "native")).await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  warm, one client, {iterations} requests: candle p50 {:.2} ms p99 {:.2} ms \
         (again: {:.2} / {:.2}); container p50 {:.2} ms p99 {:.2} ms",
        ms(native.p50),
        ms(native.p99),
        ms(native_again.p50),
        ms(native_again.p99),
        ms(boxed.p50),
        ms(boxed.p99)
    );
    let base = ms(native.p50).min(ms(native_again.p50));
    println!(
        "  the container hop adds {:.2} ms at p50 ({:.2}x candle)",
        ms(boxed.p50) - base,
        ms(boxed.p50) / base
    );
    t.stop().await;
}
