//! The same processor in four languages (`cargo bench -p wasp-tests --bench languages`):
//! the PII-redaction processor as Rust (`processors/pii-redact`), Python, JavaScript and C
//! (`processors/pii-redact-{py,js,c}`, built with `target/release/wasp processor build`,
//! which `./x bench` builds first). For each: component size, first compile, a load from
//! the compiled cache, a fresh instance (pooling allocator, the toolchains' pre-initialised
//! snapshots), a whole call on a fresh instance (instantiate, `init`, `handle`), a deploy
//! through the API whose component is in the compiled cache, and requests through the
//! gateway (the same body, 16 connections).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasp_core::Limits;
use wasp_tests::process::{release_wasp, root};
use wasp_tests::{NoModels, Summary, TestServer, load, spec, time};
use wasp_wasm::{LogBuffer, Processor, ProcessorSettings, Request, Role, Runtime, RuntimeConfig};

const BODY: &str = r#"{"text":"mail jane.doe@example.co.uk or call +44 20 7946 0958, card 4111 1111 1111 1111, host 192.168.1.20"}"#;

/// Builds a processor with the release `wasp` (after installing its toolchain).
fn build(dir: &str) -> PathBuf {
    let tools = Command::new(root().join("scripts/toolchain"))
        .arg("all")
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(tools.status.success(), "scripts/toolchain failed");
    let wasp = release_wasp();
    let name = Path::new(dir).file_name().unwrap().to_str().unwrap();
    let out = root().join(format!("target/polyglot/{name}.wasm"));
    let built = Command::new(wasp)
        .args(["processor", "build"])
        .arg(root().join(dir))
        .arg("--out")
        .arg(&out)
        .env(
            "WASP_TOOLCHAINS",
            String::from_utf8(tools.stdout).unwrap().trim(),
        )
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(built.status.success(), "building {dir} failed");
    out
}

fn settings() -> ProcessorSettings {
    ProcessorSettings {
        endpoint: "bench".into(),
        version: "v1".into(),
        env: Default::default(),
        mounts: Vec::new(),
        allow_hosts: Vec::new(),
        limits: Limits {
            memory_mib: 128,
            ..Limits::default()
        },
        logs: Arc::new(LogBuffer::new(16)),
        models: Arc::new(NoModels),
        group: "bench".into(),
        guest_nanos: Default::default(),
    }
}

fn runtime(cache: &Path) -> Runtime {
    Runtime::new(RuntimeConfig {
        max_total_instances: 100,
        cache_dir: Some(cache.to_path_buf()),
        ..RuntimeConfig::default()
    })
    .unwrap()
}

fn request() -> Request {
    Request {
        method: "POST".into(),
        path: "/".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: BODY.as_bytes().to_vec(),
    }
}

struct Row {
    lang: &'static str,
    size: u64,
    compile: Duration,
    cached: Duration,
    instantiate: Summary,
    fresh_call: Summary,
    deploy_cached: Duration,
    rps: f64,
    p50: Duration,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (iterations, secs) = if quick { (200, 2) } else { (2000, 5) };
    let components = [
        ("Rust", PathBuf::from(wasp_tests::guests::PII_REDACT)),
        ("Python", build("processors/pii-redact-py")),
        ("JavaScript", build("processors/pii-redact-js")),
        ("C", build("processors/pii-redact-c")),
    ];
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "wasp languages benchmark: the PII-redaction processor in four languages ({} cores, {iterations} instantiations, {secs} s of load at 16 connections)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let rows: Vec<Row> = tokio.block_on(async {
        let server = TestServer::start().await;
        let mut rows = Vec::new();
        for (lang, path) in &components {
            let wasm = std::fs::read(path).unwrap();
            let cache = tempfile::tempdir().unwrap();
            let started = Instant::now();
            let first = runtime(cache.path())
                .load_component("bench", &wasm)
                .unwrap();
            let compile = started.elapsed();
            assert!(!first.from_cache);
            // A new runtime, as after a restart: the compiled form comes from disk.
            let warm = runtime(cache.path());
            let started = Instant::now();
            let loaded = warm.load_component("bench", &wasm).unwrap();
            let cached = started.elapsed();
            assert!(loaded.from_cache);
            let processor: Processor = warm.processor(&loaded, Role::Service, settings()).unwrap();
            let instantiate = time(iterations, || async {
                processor.instantiate_only().await.unwrap();
            })
            .await;
            let fresh_call = time(iterations / 4, || async {
                let response = processor.handle_fresh(request()).await.unwrap();
                assert_eq!(response.status, 200);
            })
            .await;

            // Through the API: the first deploy compiles; after a delete, the same stored
            // component deploys again from the server's compiled cache (the spec names its
            // digest, as `wasp deploy` does once the component is uploaded).
            let name = format!("pii-{}", lang.to_lowercase());
            let digest = server.client.upload(path.to_str().unwrap()).await;
            let toml =
                spec(&name, "[versions.limits]\nmemory_mib = 128").replace("{COMPONENT}", &digest);
            let put = |toml: String| {
                let client = &server.client;
                let route = format!("/api/v1/endpoints/{name}");
                async move {
                    let reply = client
                        .request_with("PUT", &route, &[("content-type", "application/toml")], toml)
                        .await;
                    assert!(reply.status < 300, "{}", reply.text());
                }
            };
            put(toml.clone()).await;
            let gone = server
                .client
                .request("DELETE", &format!("/api/v1/endpoints/{name}"), "")
                .await;
            assert!(gone.status < 300, "{}", gone.text());
            let started = Instant::now();
            put(toml).await;
            let deploy_cached = started.elapsed();

            let addr = server.server.local_addr();
            let route = format!("/endpoints/{name}/invoke");
            let body = Bytes::from_static(BODY.as_bytes());
            load::run(addr, &route, body.clone(), 16, Duration::from_millis(500)).await;
            let report = load::run(addr, &route, body, 16, Duration::from_secs(secs)).await;
            assert!(report.rps > 0.0);
            rows.push(Row {
                lang,
                size: wasm.len() as u64,
                compile,
                cached,
                instantiate,
                fresh_call,
                deploy_cached,
                rps: report.rps,
                p50: report.p50,
            });
        }
        server.stop().await;
        rows
    });
    println!(
        "  {:<11} {:>9} {:>10} {:>9} {:>21} {:>21} {:>10} {:>9} {:>9}",
        "language",
        "size",
        "compile",
        "cached",
        "instantiate p50/p99",
        "fresh call p50/p99",
        "deploy",
        "req/s",
        "p50"
    );
    for r in &rows {
        println!(
            "  {:<11} {:>7.1} MB {:>10} {:>9} {:>21} {:>21} {:>10} {:>9.0} {:>9}",
            r.lang,
            r.size as f64 / 1e6,
            ms(r.compile),
            ms(r.cached),
            format!("{} / {}", us(r.instantiate.p50), us(r.instantiate.p99)),
            format!("{} / {}", us(r.fresh_call.p50), us(r.fresh_call.p99)),
            ms(r.deploy_cached),
            r.rps,
            ms(r.p50),
        );
    }
    let rust = &rows[0];
    for r in &rows[1..] {
        println!(
            "  {}: {:.2}x Rust's throughput, instantiate {:.1}x Rust's",
            r.lang,
            r.rps / rust.rps,
            r.instantiate.p50.as_secs_f64() / rust.instantiate.p50.as_secs_f64()
        );
    }
}
