//! The scaling benchmark, printed as figures from one run, with a plot:
//!
//! 1. cold start from zero workers to the first response: a Wasm-only endpoint (the
//!    component compiled and cached, its instances gone) and the candle all-MiniLM-L6-v2
//!    endpoint (the model unloaded), each against the same request on a warm worker;
//! 2. a load step from 1 to 64 concurrent clients and back: how long until the workers
//!    the load asks for are ready, p99 before and during the step, and a PNG of clients,
//!    workers and p99 over time (`target/bench/scaling-load-step.png`).
//!
//! Run with `./x bench` (or `cargo bench -p wasp-tests --bench scaling`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use plotters::prelude::*;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use wasp_tests::guests::{HELLO, HOSTILE, TEXT_EMBEDDINGS};
use wasp_tests::{TestClient, TestServer, minilm_spec, spec};

/// Scaling that reacts within seconds, so that a cold start can be taken every few.
const FAST: &str = "stable_window_s = 1\npanic_window_s = 1\nscale_down_delay_s = 0\n\
                    scale_up_cooldown_s = 0\nscale_down_cooldown_s = 0";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

async fn detail(c: &TestClient, name: &str) -> Value {
    c.get(&format!("/api/v1/endpoints/{name}")).await.json()
}

async fn wait_scaled_to_zero(c: &TestClient, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = &detail(c, name).await["versions"][0];
        if v["status"] == "scaledToZero" && v["workers"].as_array().is_some_and(Vec::is_empty) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} did not scale to zero");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Cold and warm latencies of `send` on an endpoint that scales to zero between rounds.
async fn cold_starts<F, Fut>(c: &TestClient, name: &str, rounds: usize, send: F) -> (f64, f64)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        wait_scaled_to_zero(c, name).await;
        let started = Instant::now();
        assert_eq!(send().await, 200);
        cold.push(ms(started.elapsed()));
        let started = Instant::now();
        assert_eq!(send().await, 200);
        warm.push(ms(started.elapsed()));
    }
    (percentile(&mut cold, 0.5), percentile(&mut warm, 0.5))
}

fn minilm_at_zero(name: &str) -> String {
    minilm_spec(
        name,
        &format!("[versions.scaling]\nmin_workers = 0\n{FAST}"),
    )
}

/// One sample of the load step.
#[derive(Clone, Copy)]
struct Sample {
    t: f64,
    clients: usize,
    ready: u64,
    desired: u64,
    p99_ms: f64,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!(
            "wasp scaling benchmark ({} cores)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let server = TestServer::start().await;
        let c = server.client.clone();

        // 1. Cold starts.
        let rounds = if quick { 2 } else { 10 };
        let scaling = format!("[versions.scaling]\nmin_workers = 0\n{FAST}");
        c.deploy_ok(HELLO, &spec("wasm", &scaling)).await;
        let (cold, warm) = cold_starts(&c, "wasm", rounds, || async {
            c.invoke("wasm", "", r#"{"name":"cold"}"#).await.status
        })
        .await;
        println!(
            "cold start   wasm processor   p50 {cold:>8.2} ms  (warm {warm:.2} ms; goal < 5 ms)"
        );
        c.deploy_ok(TEXT_EMBEDDINGS, &minilm_at_zero("mini")).await;
        let body = json!({ "model": "mini", "input": "a sentence to embed" }).to_string();
        let (cold, warm) = cold_starts(&c, "mini", rounds.min(5), || async {
            c.post("/v1/embeddings", body.clone()).await.status
        })
        .await;
        println!(
            "cold start   MiniLM embeddings p50 {cold:>7.2} ms  (warm {warm:.2} ms; goal < 300 ms)"
        );
        println!(
            "             anchors: Knative ~800 ms pod cold start, RunPod FlashBoot 560 ms at best"
        );

        // 2. A load step: 1 client, 64, then 1 again; each keeps a 50 ms request in flight.
        let (before_s, step_s, after_s) = if quick { (2, 6, 4) } else { (5, 25, 25) };
        let policy = "min_workers = 1\nmax_workers = 16\ntarget_concurrency = 4\n\
                      instances_per_worker = 2\nstable_window_s = 10\npanic_window_s = 2\n\
                      max_scale_up_percent = 1500\nscale_down_delay_s = 5\n\
                      scale_up_cooldown_s = 0\nscale_down_cooldown_s = 0";
        c.deploy_ok(
            HOSTILE,
            &spec(
                "step",
                &format!("[versions.limits]\nmax_instances = 128\n[versions.scaling]\n{policy}"),
            ),
        )
        .await;
        println!("load step    policy: {}", policy.replace('\n', ", "));
        let clients = Arc::new(AtomicUsize::new(1));
        let latencies: Arc<Mutex<Vec<(Instant, f64)>>> = Arc::default();
        let failures = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let total_s = before_s + step_s + after_s;
        let end = start + Duration::from_secs(total_s);
        let mut tasks = Vec::new();
        for id in 0..64 {
            let (c, clients, latencies, failures) = (
                c.clone(),
                clients.clone(),
                latencies.clone(),
                failures.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    if id >= clients.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    let sent = Instant::now();
                    let reply = c.invoke("step", "/sleep", "50").await;
                    if reply.status != 200 {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    latencies
                        .lock()
                        .await
                        .push((Instant::now(), ms(sent.elapsed())));
                }
            }));
        }
        let mut samples = Vec::new();
        let mut reached = None;
        let step_at = start + Duration::from_secs(before_s);
        let back_at = step_at + Duration::from_secs(step_s);
        while Instant::now() < end {
            let now = Instant::now();
            let level = if now < step_at || now >= back_at {
                1
            } else {
                64
            };
            clients.store(level, Ordering::Relaxed);
            let d = detail(&c, "step").await;
            let v = &d["versions"][0];
            let ready = v["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["state"] == "ready")
                .count() as u64;
            let desired = v["desired_workers"].as_u64().unwrap_or(0);
            let mut recent: Vec<f64> = latencies
                .lock()
                .await
                .iter()
                .filter(|(at, _)| now.duration_since(*at) < Duration::from_secs(1))
                .map(|(_, l)| *l)
                .collect();
            let t = now.duration_since(start).as_secs_f64();
            if reached.is_none() && level == 64 && ready >= 16 {
                reached = Some(now.duration_since(step_at).as_secs_f64());
            }
            samples.push(Sample {
                t,
                clients: level,
                ready,
                desired,
                p99_ms: percentile(&mut recent, 0.99),
            });
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        for task in tasks {
            task.await.unwrap();
        }
        let all = latencies.lock().await.clone();
        let window = |from: Instant, to: Instant| {
            let mut v: Vec<f64> = all
                .iter()
                .filter(|(at, _)| *at >= from && *at < to)
                .map(|(_, l)| *l)
                .collect();
            (percentile(&mut v, 0.99), v.len())
        };
        let (p99_before, n_before) = window(start, step_at);
        let (p99_step, n_step) = window(step_at, back_at);
        let (p99_settled, _) = window(back_at - Duration::from_secs(step_s / 2), back_at);
        match reached {
            Some(s) => {
                println!("load step    16 workers ready {s:.1} s after the step to 64 clients")
            }
            None => println!("load step    16 workers not ready within the {step_s} s step"),
        }
        println!(
            "load step    p99 before {p99_before:.1} ms ({n_before} requests), during the step \
             {p99_step:.1} ms ({n_step}), its second half {p99_settled:.1} ms; failed {}",
            failures.load(Ordering::Relaxed)
        );
        let last = samples.last().copied();
        if let Some(s) = last {
            println!(
                "load step    {} s after the step back to 1 client: {} ready, {} wanted",
                after_s, s.ready, s.desired
            );
        }
        let png = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/bench/scaling-load-step.png");
        plot(&png, &samples, total_s as f64).unwrap();
        println!("load step    plot: {}", png.display());
        server.stop().await;
    });
}

/// Clients and workers over time above, p99 below.
fn plot(path: &std::path::Path, samples: &[Sample], seconds: f64) -> anyhow::Result<()> {
    wasp_tests::prepare_plot(path)?;
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(420);
    let most = samples
        .iter()
        .map(|s| s.clients.max(s.desired as usize))
        .max()
        .unwrap_or(1) as f64;
    let mut top = ChartBuilder::on(&upper)
        .caption("Load step: clients and workers", ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..seconds, 0.0..most * 1.1)?;
    top.configure_mesh()
        .x_desc("seconds")
        .y_desc("count")
        .draw()?;
    let series = [
        ("clients (requests in flight)", BLUE, 0),
        ("workers wanted", RED, 1),
        ("workers ready", GREEN, 2),
    ];
    for (label, colour, which) in series {
        top.draw_series(LineSeries::new(
            samples.iter().map(|s| {
                let y = match which {
                    0 => s.clients as f64,
                    1 => s.desired as f64,
                    _ => s.ready as f64,
                };
                (s.t, y)
            }),
            colour.stroke_width(2),
        ))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    top.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    let worst = samples.iter().map(|s| s.p99_ms).fold(1.0, f64::max);
    let mut bottom = ChartBuilder::on(&lower)
        .caption("p99 latency over the last second", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..seconds, 0.0..worst * 1.1)?;
    bottom
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms")
        .draw()?;
    bottom.draw_series(LineSeries::new(
        samples.iter().map(|s| (s.t, s.p99_ms)),
        MAGENTA.stroke_width(2),
    ))?;
    root.present()?;
    Ok(())
}
