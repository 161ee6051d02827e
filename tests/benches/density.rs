//! The density benchmark: many endpoints on one server. Deploys `--endpoints` (10,000 by
//! default) `hello` endpoints over 100 distinct components (the same processor with a
//! different custom section, so 100 digests and 100 compiles), every one deployed at zero
//! (`min_workers = 0`, `initial_workers = 0`). It reports the deploy rate at the start and
//! at the end, the server's resident memory per idle endpoint and per warm one, requests
//! spread over random endpoints (each one's first call a cold start with a cached compile,
//! then warm), and how long the server takes to start again with every endpoint stored.
//! Goals (issue 18): <= 64 KiB per idle endpoint, >= 500 deploys/s at 10,000, a start in
//! under 2 s, p99 under 1 ms warm and under 10 ms cold.
//!
//! Run with `./x bench` (or `cargo bench -p wasp-tests --bench density [-- --endpoints N]`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use wasp_tests::guests::HELLO;
use wasp_tests::load::{self, Report};
use wasp_tests::{TestClient, TestServer};

/// Distinct components the endpoints share.
const COMPONENTS: usize = 100;
/// Endpoints woken by the warm phase (each takes a slot of the test server's pool of 200).
const WOKEN: usize = 150;

/// The server's resident memory, in KiB (this process: the server runs in it).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `wasm` with a custom section holding `n`: the same code under another digest.
fn variant(wasm: &[u8], n: usize) -> Vec<u8> {
    let name = b"wasp-density";
    let payload = n.to_le_bytes();
    let mut section = vec![u8::try_from(name.len()).unwrap()];
    section.extend_from_slice(name);
    section.extend_from_slice(&payload);
    let mut out = wasm.to_vec();
    out.push(0); // a custom section
    out.push(u8::try_from(section.len()).unwrap()); // under 128: one LEB128 byte
    out.extend_from_slice(&section);
    out
}

fn spec(name: &str, digest: &str) -> String {
    format!(
        "name = \"{name}\"\n[[versions]]\nname = \"v1\"\n\
         [versions.scaling]\nmin_workers = 0\ninitial_workers = 0\n\
         [versions.processor]\ncomponent = \"{digest}\"\n"
    )
}

/// Deploys endpoints `range` (their components by index), 4 at a time; answers the
/// deploys per second.
async fn deploy(c: &TestClient, digests: &[String], range: std::ops::Range<usize>) -> f64 {
    let started = Instant::now();
    let count = range.len();
    let mut next = range.start;
    while next < range.end {
        let batch: Vec<_> = (next..range.end.min(next + 4))
            .map(|i| {
                let c = c.clone();
                let body = spec(&format!("e{i}"), &digests[i % COMPONENTS]);
                tokio::spawn(async move {
                    let reply = c
                        .request_with(
                            "PUT",
                            &format!("/api/v1/endpoints/e{i}"),
                            &[("content-type", "application/toml")],
                            body,
                        )
                        .await;
                    assert!(reply.status < 300, "e{i}: {}", reply.text());
                })
            })
            .collect();
        next += batch.len();
        for task in batch {
            task.await.unwrap();
        }
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// One request to each of `names`, in turn; the latencies.
async fn call_each(c: &TestClient, names: &[String]) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(names.len());
    for name in names {
        let started = Instant::now();
        let reply = c
            .post(&format!("/endpoints/{name}/invoke"), r#"{"name":"wasp"}"#)
            .await;
        latencies.push(started.elapsed());
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
    }
    latencies
}

fn line(label: &str, r: &Report) {
    println!(
        "  {label:<44} p50 {:>9}   p99 {:>9}",
        load::ms(r.p50),
        load::ms(r.p99)
    );
}

fn main() {
    let mut args = std::env::args().skip_while(|a| a != "--endpoints");
    let endpoints: usize = args.nth(1).map_or(10_000, |n| n.parse().unwrap());
    let edge = (endpoints / 20).clamp(1, 500);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!(
            "wasp density benchmark: {endpoints} hello endpoints over {COMPONENTS} components, \
             deployed at zero ({} cores)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let dir = tempfile::tempdir().unwrap();
        let t = TestServer::start_in(dir.path()).await;
        let c = t.client.clone();
        let wasm = std::fs::read(HELLO).unwrap();
        let files = tempfile::tempdir().unwrap();
        let mut digests = Vec::with_capacity(COMPONENTS);
        for n in 0..COMPONENTS {
            let path = files.path().join(format!("hello-{n}.wasm"));
            std::fs::write(&path, variant(&wasm, n)).unwrap();
            digests.push(c.upload(path.to_str().unwrap()).await);
        }
        // The first deploy of each component compiles it: out of the measured rates.
        let compiled = Instant::now();
        deploy(&c, &digests, 0..COMPONENTS).await;
        println!(
            "  {COMPONENTS} components compiled (the first endpoint of each) in {:.1} s",
            compiled.elapsed().as_secs_f64()
        );
        let before = rss_kib();
        // Deploys in steps of `edge`: the rate and the memory as the count grows.
        let mut steps: Vec<(usize, f64, f64)> = Vec::new();
        let mut at = COMPONENTS;
        while at < endpoints {
            let to = (at + edge).min(endpoints);
            let rate = deploy(&c, &digests, at..to).await;
            steps.push((to, rate, rss_kib() as f64 / 1024.0));
            at = to;
        }
        let first = steps.first().map_or(0.0, |s| s.1);
        let last = steps.last().map_or(0.0, |s| s.1);
        let idle = rss_kib();
        let per_idle = (idle.saturating_sub(before)) as f64 / (endpoints - COMPONENTS) as f64;
        println!(
            "  deploys/s: {first:.0} for endpoints {COMPONENTS}..{} and {last:.0} for the last \
             {} (goal >= 500 at {endpoints})",
            COMPONENTS + edge,
            endpoints - steps.iter().rev().nth(1).map_or(COMPONENTS, |s| s.0)
        );
        println!(
            "  resident memory: {:.1} MiB with every endpoint idle, {per_idle:.1} KiB per idle \
             endpoint (goal <= 64)",
            idle as f64 / 1024.0
        );

        // Requests over random endpoints: the first call of each wakes it.
        let mut picked: Vec<String> = Vec::with_capacity(WOKEN);
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        while picked.len() < WOKEN.min(endpoints) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let name = format!("e{}", seed % endpoints as u64);
            if !picked.contains(&name) {
                picked.push(name);
            }
        }
        let cold = call_each(&c, &picked).await;
        let woken = rss_kib();
        let warm: Vec<Duration> = {
            let mut all = Vec::new();
            for _ in 0..4 {
                all.extend(call_each(&c, &picked).await);
            }
            all
        };
        let elapsed = Duration::from_secs(1);
        line(
            &format!("cold (first call of {} endpoints)", picked.len()),
            &load::report(cold, elapsed),
        );
        line(
            &format!("warm (4 calls each, round robin over {})", picked.len()),
            &load::report(warm, elapsed),
        );
        println!(
            "  {:.1} KiB more per woken endpoint (one warm instance each)",
            woken.saturating_sub(idle) as f64 / picked.len() as f64
        );

        // Start again with every endpoint stored.
        t.stop().await;
        let started = Instant::now();
        let t = TestServer::start_in(dir.path()).await;
        let up = started.elapsed();
        let first_call = call_each(&t.client, &picked[..1]).await;
        println!(
            "  start with {endpoints} endpoints stored: {:.2} s to serve (goal < 2 s); first \
             call after it {}",
            up.as_secs_f64(),
            load::ms(first_call[0])
        );
        t.stop().await;
        let png =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/density.png");
        plot(&png, &steps).unwrap();
        println!("  plot: {}", png.display());
    });
}

/// Deploys per second (above) and the server's resident memory (below) as the count of
/// endpoints grows.
fn plot(path: &std::path::Path, steps: &[(usize, f64, f64)]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    wasp_tests::prepare_plot(path)?;
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(350);
    let most = steps.last().map_or(1, |s| s.0) as f64;
    let panels = [
        (
            &upper,
            "Deploys per second as endpoints are added",
            "deploys/s",
            BLUE,
            1,
        ),
        (
            &lower,
            "Server resident memory, every endpoint idle (at zero)",
            "MiB",
            RED,
            2,
        ),
    ];
    for (area, caption, unit, colour, which) in panels {
        let value = |s: &(usize, f64, f64)| if which == 1 { s.1 } else { s.2 };
        let top = steps.iter().map(value).fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..most, 0.0..top * 1.15)?;
        chart
            .configure_mesh()
            .x_desc("endpoints deployed")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .y_desc(unit)
            .draw()?;
        chart.draw_series(LineSeries::new(
            steps.iter().map(|s| (s.0 as f64, value(s))),
            colour.stroke_width(2),
        ))?;
    }
    root.present()?;
    Ok(())
}
