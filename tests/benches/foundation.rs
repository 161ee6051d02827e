//! The foundation benchmark, printed as figures and ratios from one run:
//!
//! 1. instantiation of a trivial processor: pooling allocator vs on-demand allocation;
//! 2. processor hop latency: a call on a warm pooled instance, and on a fresh instance;
//! 3. requests/s through the gateway with that processor vs a bare hyper server, both
//!    driven by the same keep-alive load generator on loopback.
//!
//! Run with `./x bench` (or `cargo bench -p wasp-tests --bench foundation`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use wasp_core::Limits;
use wasp_tests::guests::HELLO;
use wasp_tests::{NoModels, TestServer, load, spec, time};
use wasp_wasm::{LogBuffer, Processor, ProcessorSettings, Request, Role, Runtime, RuntimeConfig};

fn processor(pooling: bool) -> Processor {
    let runtime = Runtime::new(RuntimeConfig {
        pooling,
        max_total_instances: 100,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let wasm = std::fs::read(HELLO).unwrap();
    let component = runtime.load_component("bench", &wasm).unwrap();
    runtime
        .processor(
            &component,
            Role::Service,
            ProcessorSettings {
                endpoint: "bench".into(),
                version: "v1".into(),
                env: Default::default(),
                mounts: Vec::new(),
                allow_hosts: Vec::new(),
                limits: Limits::default(),
                logs: Arc::new(LogBuffer::new(16)),
                models: Arc::new(NoModels),
                group: "bench".into(),
                guest_nanos: Default::default(),
            },
        )
        .unwrap()
}

fn request() -> Request {
    Request {
        method: "POST".into(),
        path: "/".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: br#"{"name":"bench"}"#.to_vec(),
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

async fn bare_hyper() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        br#"{"greeting":"hello, bench!"}"#,
                    ))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A server with the trivial processor deployed as `bench`, four workers warm.
async fn gateway_server() -> TestServer {
    let server = TestServer::start().await;
    let scaling = "[versions.scaling]\nmin_workers = 4\nmax_workers = 4";
    server
        .client
        .deploy_ok(HELLO, &spec("bench", scaling))
        .await;
    server
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 500 } else { 5000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!(
            "wasp foundation benchmark ({} cores)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );

        if std::env::args().any(|a| a == "--profile-gateway") {
            // Ten seconds of gateway load for a profiler to look at.
            let server = gateway_server().await;
            let body = Bytes::from_static(br#"{"name":"bench"}"#);
            let addr = server.server.local_addr();
            let r = load::run(
                addr,
                "/endpoints/bench/invoke",
                body,
                32,
                Duration::from_secs(10),
            )
            .await;
            println!("gateway + processor {:.0} req/s", r.rps);
            return;
        }

        // 1. Instantiation.
        let pooled = processor(true);
        if std::env::args().any(|a| a == "--profile-instantiate") {
            // A long loop for a profiler to look at.
            for _ in 0..200_000 {
                pooled.instantiate_only().await.unwrap();
            }
            return;
        }
        let on_demand = processor(false);
        let pooled_inst = time(n, || async { pooled.instantiate_only().await.unwrap() }).await;
        let demand_inst = time(n, || async { on_demand.instantiate_only().await.unwrap() }).await;
        println!(
            "instantiate  pooled     p50 {:>10}  p99 {:>10}",
            us(pooled_inst.p50),
            us(pooled_inst.p99)
        );
        println!(
            "instantiate  on-demand  p50 {:>10}  p99 {:>10}",
            us(demand_inst.p50),
            us(demand_inst.p99)
        );
        println!(
            "instantiate  on-demand / pooled p50 = {:.2}x  (goal: pooled < 10 µs p50)",
            demand_inst.p50.as_secs_f64() / pooled_inst.p50.as_secs_f64()
        );

        // 2. Hop latency.
        pooled.warm(1).await.unwrap();
        let warm = time(n, || async {
            pooled.handle(request()).await.unwrap();
        })
        .await;
        let fresh = time(n, || async {
            pooled.handle_fresh(request()).await.unwrap();
        })
        .await;
        println!(
            "hop          warm       p50 {:>10}  p99 {:>10}",
            us(warm.p50),
            us(warm.p99)
        );
        println!(
            "hop          fresh      p50 {:>10}  p99 {:>10}  (goal: < 25 µs p50)",
            us(fresh.p50),
            us(fresh.p99)
        );

        // 3. Throughput through the gateway vs bare hyper.
        let server = gateway_server().await;
        let gateway = server.server.local_addr();
        let bare = bare_hyper().await;
        let secs = Duration::from_secs(if quick { 1 } else { 2 });
        let rounds = if quick { 1 } else { 7 };
        let connections = 32;
        let mut gw = Vec::new();
        let mut hy = Vec::new();
        let mut ratios = Vec::new();
        // Interleaved rounds, each compared with its own bare-hyper run, so drift on a
        // shared machine hits both alike; the median round is reported.
        for _ in 0..rounds {
            let body = Bytes::from_static(br#"{"name":"bench"}"#);
            let h = load::run(bare, "/", body.clone(), connections, secs)
                .await
                .rps;
            let g = load::run(gateway, "/endpoints/bench/invoke", body, connections, secs)
                .await
                .rps;
            hy.push(h);
            gw.push(g);
            ratios.push(g / h);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (gw, hy, ratio) = (median(&mut gw), median(&mut hy), median(&mut ratios));
        println!("throughput   bare hyper           {hy:>10.0} req/s  (median of {rounds} rounds)");
        println!("throughput   gateway + processor  {gw:>10.0} req/s");
        println!(
            "throughput   gateway / bare hyper = {:.1}%  (median of the rounds' ratios; goal: >= 55%)",
            ratio * 100.0
        );
        server.stop().await;
    });
}
