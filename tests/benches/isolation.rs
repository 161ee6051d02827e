//! Per-request isolation benchmark (`cargo bench -p wasp-tests --bench isolation`): the
//! hello handler with a brand-new instance for every request, in wasp
//! (`limits.isolation = "per-request"`) and in `wasmtime serve` (which instantiates per
//! request by default), side by side in one run; wasp's pooled mode for reference.
//!
//! Both servers are the release binaries, each pinned to the same one core with
//! `taskset` (the load generator runs on the others), answering the same JSON with the
//! same logic: `examples/hello` as a wasp processor, `tests/guests/hello-http` as a
//! `wasi:http/proxy` component. The peer runs as its users would run it in production:
//! `wasmtime serve -S cli`, on demand, with its pooling allocator, and with the pooling
//! allocator tuned as wasp tunes its own (the best of the three counts).
//! wasmtime comes from PyPI (`scripts/fetch-wasmtime`); wasp is `target/release/wasp`
//! (`./x bench` builds it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use wasp_tests::load::{Report, authorize, run};
use wasp_tests::process::{Process, free_port, release_wasp, root, start_wasp, wait_for};

/// The core the servers share: the last one (counted before the load generator pins
/// itself to the others).
fn server_core() -> usize {
    static CORE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORE.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()) - 1)
}

/// How `wasmtime serve` allocates instances.
#[derive(Clone, Copy)]
enum Peer {
    /// Its default: on demand.
    OnDemand,
    /// `-O pooling-allocator`.
    Pooling,
    /// The pooling allocator tuned as wasp tunes its own (memory and tables kept resident,
    /// dirty pages found with `PAGEMAP_SCAN`).
    PoolingTuned,
}

impl Peer {
    fn label(self) -> &'static str {
        match self {
            Self::OnDemand => "wasmtime serve (per request)",
            Self::Pooling => "wasmtime serve (per request, pooling allocator)",
            Self::PoolingTuned => "wasmtime serve (per request, pooling, wasp's tuning)",
        }
    }
}

fn wasmtime_serve(wasmtime: &Path, peer: Peer) -> (Process, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new("taskset");
    command
        .args(["-c", &server_core().to_string()])
        .arg(wasmtime)
        .args(["serve", "-S", "cli", "--addr", &addr.to_string()]);
    match peer {
        Peer::OnDemand => {}
        Peer::Pooling => {
            command.args(["-O", "pooling-allocator"]);
        }
        Peer::PoolingTuned => {
            command.args([
                "-O",
                "pooling-allocator,pooling-memory-keep-resident=524288,\
                 pooling-table-keep-resident=16384,pooling-pagemap-scan=auto",
            ]);
        }
    }
    let child = command
        .arg(wasp_tests::guests::HELLO_HTTP)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let process = Process(child);
    wait_for(addr, Duration::from_secs(30));
    (process, addr)
}

fn wasp_serve(data: &Path, isolation: &str) -> (Process, SocketAddr) {
    let spec = data.join("hello.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"hello\"\n[[versions]]\nname = \"v1\"\n[versions.processor]\n\
             component = {:?}\n[versions.limits]\nisolation = \"{isolation}\"\n",
            wasp_tests::guests::HELLO
        ),
    )
    .unwrap();
    let mut command = Command::new("taskset");
    command
        .args(["-c", &server_core().to_string()])
        .arg(release_wasp())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.join("data"))
        .arg("--deploy")
        .arg(&spec);
    let (process, addr, key) = start_wasp(command, data);
    authorize(addr, &key);
    (process, addr)
}

async fn measure(addr: SocketAddr, path: &str, connections: usize, secs: u64) -> Report {
    let body = Bytes::from_static(br#"{"name":"bench"}"#);
    // Warm up (compiles, first instances, the connection pools).
    run(
        addr,
        path,
        body.clone(),
        connections,
        Duration::from_millis(500),
    )
    .await;
    run(addr, path, body, connections, Duration::from_secs(secs)).await
}

/// The report with the median throughput.
fn median(reports: &mut [Report]) -> Report {
    reports.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    reports[reports.len() / 2]
}

fn line(label: &str, r: &Report) {
    println!(
        "  {label:<52} {:>9.0} req/s   p50 {:>7.3} ms   p99 {:>7.3} ms",
        r.rps,
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = if quick { 2 } else { 5 };
    let connections = 16;
    let wasmtime = Command::new(root().join("scripts/fetch-wasmtime"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(wasmtime.status.success(), "scripts/fetch-wasmtime failed");
    let wasmtime = PathBuf::from(String::from_utf8(wasmtime.stdout).unwrap().trim());
    // The load generator keeps off the servers' core (threads made from now on inherit
    // the affinity).
    if server_core() > 0 {
        let others = format!("0-{}", server_core() - 1);
        let pinned = Command::new("taskset")
            .args(["-a", "-p", "-c", &others, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(pinned.success(), "taskset failed");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "wasp isolation benchmark: the hello handler, a new instance per request; servers on core {} of {}, {connections} connections, {secs} s each",
        server_core(),
        server_core() + 1
    );
    runtime.block_on(async {
        // Every setting once per round, rounds interleaved, medians reported: this
        // machine is shared, and its speed drifts.
        let rounds = if quick { 1 } else { 3 };
        let peers = [Peer::OnDemand, Peer::Pooling, Peer::PoolingTuned];
        let modes = ["per-request", "pooled"];
        let mut peer_reports: Vec<Vec<Report>> = vec![Vec::new(); peers.len()];
        let mut wasp_reports: Vec<Vec<Report>> = vec![Vec::new(); modes.len()];
        for _ in 0..rounds {
            for (i, peer) in peers.iter().enumerate() {
                let (_server, addr) = wasmtime_serve(&wasmtime, *peer);
                peer_reports[i].push(measure(addr, "/", connections, secs).await);
            }
            for (i, isolation) in modes.iter().enumerate() {
                let dir = tempfile::tempdir().unwrap();
                let (_server, addr) = wasp_serve(dir.path(), isolation);
                wasp_reports[i]
                    .push(measure(addr, "/endpoints/hello/invoke", connections, secs).await);
            }
        }
        let mut peer_best: f64 = 0.0;
        for (peer, reports) in peers.iter().zip(&mut peer_reports) {
            let report = median(reports);
            peer_best = peer_best.max(report.rps);
            line(peer.label(), &report);
        }
        let mut ours = 0.0;
        for (isolation, reports) in modes.iter().zip(&mut wasp_reports) {
            let report = median(reports);
            if *isolation == "per-request" {
                ours = report.rps;
            }
            line(&format!("wasp ({isolation})"), &report);
        }
        println!(
            "  wasp per-request / wasmtime serve per-request (its best setting): {:.2}x (medians of {rounds} rounds)",
            ours / peer_best
        );
    });
}
