//! The embeddings benchmark, printed as figures and ratios from one run:
//!
//! 1. `/v1/embeddings` throughput and p50/p95/p99 at concurrency 1, 8 and 32, with dynamic
//!    batching on (max_batch 32) and off (max_batch 1);
//! 2. wasp against a Python sentence-transformers server (`scripts/st-server.py`) on the
//!    same machine, when `WASP_BENCH_PYTHON` names a Python that has sentence-transformers.
//!    The peer runs as its users would run it in production: dynamic batching with wasp's
//!    own settings (32 rows, 2 ms window, no wait while requests come one at a time),
//!    TCP_NODELAY, torch on every core. Its in-process `model.encode` at batch 1 and 32 is
//!    printed as the ceiling of any server around the model;
//! 3. the tokenizer processor's pre-processing (wasm) against the same tokenizer crate
//!    called natively;
//! 4. the encoder's efficiency against the machine's limit: the forward pass alone, in
//!    process, at batch 1, 32 and a mixed-length batch of 32, for the packed engine (the
//!    CPU default) and candle-transformers' model, as achieved GFLOP/s (real tokens, and
//!    real plus padded tokens) next to the measured FP32 peak of a gemm microbenchmark
//!    (plot: `target/bench/encoder.png`). `--encoder-only` runs just this part, and
//!    `--engine packed|candle` just one engine.
//!
//! `--load-only C` runs only the batched endpoint at concurrency C, for profiling.
//!
//! Run with `./x bench` (or `cargo bench -p wasp-tests --bench embeddings`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasp_core::{Limits, Mount};
use wasp_tests::guests::TEXT_EMBEDDINGS;
use wasp_tests::load::{self, Report, quantile};
use wasp_tests::{NoModels, TestServer, minilm_dir};
use wasp_wasm::{LogBuffer, ProcessorSettings, Request, Role, Runtime, RuntimeConfig};

const SENTENCE: &str = "A man is riding a white horse on an enclosed ground.";

fn spec(name: &str, max_batch: u32) -> String {
    format!(
        r#"name = "{name}"
[[versions]]
name = "v1"
backend = {{ kind = "candle", model = "all-MiniLM-L6-v2", task = "embeddings", device = "cpu" }}
[versions.batching]
max_batch = {max_batch}
max_batch_delay_ms = 2
[versions.limits]
max_queue = 1024
[versions.processor]
component = "{{COMPONENT}}"
mounts = [{{ host = {host:?}, guest = "/model" }}]
"#,
        host = minilm_dir().display().to_string()
    )
}

fn body(model: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "model": model, "input": SENTENCE }).to_string())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn line(label: &str, r: &Report) {
    println!(
        "{label:<28} {:>8.1} req/s  p50 {:>9}  p95 {:>9}  p99 {:>9}",
        r.rps,
        ms(r.p50),
        ms(r.p95),
        ms(r.p99)
    );
}

async fn tokenizer_comparison(iterations: usize) {
    let texts: Vec<String> = [
        SENTENCE,
        "The quick brown fox jumps over the lazy dog.",
        "Übergrößenträger café naïve résumé — déjà vu.",
        "wasp runs WebAssembly processors in front of candle models!",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    // wasm: the processor's pre-process (tokenize, pad, build tensors, encode context).
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let component = runtime
        .load_component("bench-embeddings", &std::fs::read(TEXT_EMBEDDINGS).unwrap())
        .unwrap();
    let processor = runtime
        .processor(
            &component,
            Role::Transform,
            ProcessorSettings {
                endpoint: "bench".into(),
                version: "v1".into(),
                env: Default::default(),
                mounts: vec![Mount {
                    host: minilm_dir(),
                    guest: "/model".into(),
                }],
                allow_hosts: Vec::new(),
                limits: Limits::default(),
                logs: Arc::new(LogBuffer::new(16)),
                models: Arc::new(NoModels),
                group: "bench".into(),
                guest_nanos: Default::default(),
            },
        )
        .unwrap();
    processor.warm(1).await.unwrap();
    let request = || Request {
        method: "POST".into(),
        path: "/v1/embeddings".into(),
        headers: Vec::new(),
        body: serde_json::json!({ "model": "m", "input": texts })
            .to_string()
            .into_bytes(),
    };
    let mut wasm = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let started = Instant::now();
        processor.pre_process(request()).await.unwrap();
        if i >= iterations / 10 {
            wasm.push(started.elapsed());
        }
    }

    // native: the same tokenizer crate and settings, the same padding into i64 rows.
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(minilm_dir().join("tokenizer.json")).unwrap();
    tokenizer.with_truncation(None).unwrap();
    tokenizer.with_padding(None);
    let mut native = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let started = Instant::now();
        let body = serde_json::json!({ "model": "m", "input": texts }).to_string();
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut rows = Vec::new();
        for text in parsed["input"].as_array().unwrap() {
            let e = tokenizer.encode(text.as_str().unwrap(), true).unwrap();
            let ids: Vec<i64> = e.get_ids().iter().map(|&x| i64::from(x)).collect();
            let types: Vec<i64> = e.get_type_ids().iter().map(|&x| i64::from(x)).collect();
            rows.push((ids, types));
        }
        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(rows.len() * width * 3);
        for (ids, types) in rows {
            let pad = width - ids.len();
            flat.extend(ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
            flat.extend(std::iter::repeat_n(1i64, ids.len()).chain(std::iter::repeat_n(0, pad)));
            flat.extend(types.iter().copied().chain(std::iter::repeat_n(0, pad)));
        }
        std::hint::black_box(flat);
        if i >= iterations / 10 {
            native.push(started.elapsed());
        }
    }
    let (w, n) = (quantile(&mut wasm, 0.5), quantile(&mut native, 0.5));
    println!(
        "tokenizer (4 texts)   wasm p50 {:.1} µs   native p50 {:.1} µs   wasm / native = {:.2}x  (goal: <= 1.6x)",
        w.as_secs_f64() * 1e6,
        n.as_secs_f64() * 1e6,
        w.as_secs_f64() / n.as_secs_f64()
    );
}

async fn python_baseline(wasp: std::net::SocketAddr, seconds: Duration) {
    let Some(python) = std::env::var_os("WASP_BENCH_PYTHON") else {
        println!(
            "python baseline skipped: set WASP_BENCH_PYTHON to a Python with sentence-transformers"
        );
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/st-server.py");
    let mut child = std::process::Command::new(&python)
        .arg(script)
        .arg(minilm_dir())
        .arg(port.to_string())
        .env("HF_HUB_OFFLINE", "1")
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = wasp_tests::TestClient::new(addr);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the Python server did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = client.post("/v1/embeddings", body("st")).await;
    println!(
        "python peer: scripts/st-server.py, dynamic batching max 32 rows / 2 ms (no wait while \
         requests come one at a time), TCP_NODELAY, torch threads = cores"
    );
    for c in [1, 8, 32] {
        let py = load::run(addr, "/v1/embeddings", body("st"), c, seconds).await;
        let ours = load::run(wasp, "/v1/embeddings", body("batched"), c, seconds).await;
        line(&format!("python c={c}"), &py);
        line(&format!("wasp (batched) c={c}"), &ours);
        println!(
            "  wasp / python at c={c}: throughput {:.2}x, p50 {:.2}x",
            ours.rps / py.rps,
            ours.p50.as_secs_f64() / py.p50.as_secs_f64()
        );
    }
    let _ = child.kill();
    let _ = child.wait();

    // The ceiling: `model.encode` in-process, no HTTP, no JSON, on the same sentence.
    let output = std::process::Command::new(&python)
        .arg(script)
        .arg(minilm_dir())
        .args(["--ceiling", "--seconds", &seconds.as_secs().to_string()])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let ceiling: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("ceiling: {}", String::from_utf8_lossy(&output.stderr)));
    println!(
        "python in-process encode (ceiling, {} torch threads): batch 1 {:.1} sentences/s, batch 32 {:.1} sentences/s",
        ceiling["threads"],
        ceiling["batch1"].as_f64().unwrap_or(0.0),
        ceiling["batch32"].as_f64().unwrap_or(0.0)
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let seconds = Duration::from_secs(if quick { 2 } else { 5 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!(
            "wasp embeddings benchmark: all-MiniLM-L6-v2 on CPU ({} cores), one sentence per request",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        if std::env::args().any(|a| a == "--encoder-only") {
            encoder_efficiency(quick);
            return;
        }
        if std::env::args().any(|a| a == "--tokenizer-only") {
            tokenizer_comparison(2000).await;
            return;
        }
        let t = TestServer::start().await;
        t.client.deploy_ok(TEXT_EMBEDDINGS, &spec("batched", 32)).await;
        t.client.deploy_ok(TEXT_EMBEDDINGS, &spec("unbatched", 1)).await;
        let addr = t.server.local_addr();
        for model in ["batched", "unbatched"] {
            load::run(addr, "/v1/embeddings", body(model), 4, Duration::from_millis(500)).await;
        }
        // `--load-only C`: the batched endpoint alone at concurrency C (to profile wasp's
        // path under `perf record`).
        let args: Vec<String> = std::env::args().collect();
        if let Some(c) = args
            .iter()
            .position(|a| a == "--load-only")
            .and_then(|i| args.get(i + 1))
            .and_then(|c| c.parse::<usize>().ok())
        {
            let on = load::run(addr, "/v1/embeddings", body("batched"), c, seconds).await;
            line(&format!("batching on  c={c}"), &on);
            t.stop().await;
            return;
        }
        for c in [1, 8, 32] {
            let off = load::run(addr, "/v1/embeddings", body("unbatched"), c, seconds).await;
            let on = load::run(addr, "/v1/embeddings", body("batched"), c, seconds).await;
            line(&format!("batching off c={c}"), &off);
            line(&format!("batching on  c={c}"), &on);
            println!(
                "  on / off at c={c}: throughput {:.2}x, p95 {:.2}x  (goal at c=32: >= 2.5x at <= 1.1x p95)",
                on.rps / off.rps,
                on.p95.as_secs_f64() / off.p95.as_secs_f64()
            );
        }
        python_baseline(addr, seconds).await;
        tokenizer_comparison(if quick { 200 } else { 2000 }).await;
        t.stop().await;
        encoder_efficiency(quick);
    });
}

/// The best GFLOP/s of an `n × n × n` f32 gemm on `threads` threads (1 or all).
fn gemm_peak(n: usize, threads: usize, rounds: usize) -> f64 {
    let a = vec![1.0f32; n * n];
    let b = vec![0.5f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let mut best = 0.0f64;
    for _ in 0..rounds {
        let started = Instant::now();
        wasp_candle::bert::matmul(n, n, n, &a, &b, &mut c, threads);
        let seconds = started.elapsed().as_secs_f64();
        best = best.max(2.0 * (n * n * n) as f64 / seconds / 1e9);
    }
    std::hint::black_box(&c);
    best
}

/// One batch for the encoder: every row one input, as the batcher hands them over.
fn encoder_inputs(rows: &[Vec<i64>]) -> Vec<wasp_core::ModelInput> {
    rows.iter()
        .map(|ids| {
            let shape = vec![1, ids.len() as u64];
            wasp_core::ModelInput {
                tensors: vec![
                    wasp_core::Tensor::from_i64("input_ids", shape.clone(), ids),
                    wasp_core::Tensor::from_i64("attention_mask", shape, &vec![1; ids.len()]),
                ],
                parameters: None,
            }
        })
        .collect()
}

struct EncoderFigure {
    engine: &'static str,
    batch: &'static str,
    real_gflops: f64,
    executed_gflops: f64,
    sequences_per_second: f64,
}

fn encoder_efficiency(quick: bool) {
    use wasp_backend::Backend;
    use wasp_candle::{BertEmbedder, BertEngine, Device};

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rounds = if quick { 5 } else { 20 };
    let peak_one = gemm_peak(1024, 1, rounds);
    let peak = gemm_peak(1024, threads, rounds);
    println!(
        "FP32 peak (gemm 1024^3, measured): {peak:.1} GFLOP/s on {threads} threads, {peak_one:.1} on one"
    );

    let mut tokenizer =
        tokenizers::Tokenizer::from_file(minilm_dir().join("tokenizer.json")).unwrap();
    tokenizer.with_truncation(None).unwrap();
    tokenizer.with_padding(None);
    let ids = |text: &str| -> Vec<i64> {
        let e = tokenizer.encode(text, true).unwrap();
        e.get_ids().iter().map(|&x| i64::from(x)).collect()
    };
    let sentence = ids(SENTENCE);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/minilm-reference.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mixed: Vec<Vec<i64>> = reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .cycle()
        .take(32)
        .map(|s| ids(s.as_str().unwrap()))
        .collect();
    let batches: [(&str, Vec<Vec<i64>>); 3] = [
        ("batch 1", vec![sentence.clone()]),
        ("batch 32", vec![sentence.clone(); 32]),
        ("mixed 32", mixed),
    ];
    let budget = Duration::from_millis(if quick { 600 } else { 3000 });
    let mut figures = Vec::new();
    // `--engine packed|candle` measures one engine alone (to profile it).
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--engine")
        .and_then(|i| args.get(i + 1));
    for (engine, kind) in [
        ("packed", BertEngine::Packed),
        ("candle", BertEngine::Candle),
    ] {
        if only.is_some_and(|o| o != engine) {
            continue;
        }
        let model = BertEmbedder::load_engine(&minilm_dir(), Device::Cpu, kind).unwrap();
        let macs = |len: usize| {
            // Per sequence: the linear layers per token, and attention over the sequence.
            (6 * (4 * 384 * 384 + 2 * 384 * 1536) * len + 6 * 2 * len * len * 384) as f64
        };
        for (label, rows) in &batches {
            let inputs = encoder_inputs(rows);
            let real: f64 = rows.iter().map(|r| 2.0 * macs(r.len())).sum();
            let width = rows.iter().map(Vec::len).max().unwrap_or(0);
            let executed = if engine == "candle" {
                rows.len() as f64 * 2.0 * macs(width)
            } else {
                real
            };
            model.infer_batch(&inputs).unwrap();
            let mut times = Vec::new();
            let started = Instant::now();
            while started.elapsed() < budget || times.len() < 5 {
                let t = Instant::now();
                std::hint::black_box(model.infer_batch(&inputs).unwrap());
                times.push(t.elapsed());
            }
            let median = quantile(&mut times, 0.5).as_secs_f64();
            let figure = EncoderFigure {
                engine,
                batch: label,
                real_gflops: real / median / 1e9,
                executed_gflops: executed / median / 1e9,
                sequences_per_second: rows.len() as f64 / median,
            };
            println!(
                "encoder {engine:<6} {label:<8} {:>7.1} sequences/s  {:>6.1} GFLOP/s real ({:>4.1}% of peak), {:>6.1} GFLOP/s with padding  (median {:.2} ms)",
                figure.sequences_per_second,
                figure.real_gflops,
                100.0 * figure.real_gflops / peak,
                figure.executed_gflops,
                median * 1e3
            );
            figures.push(figure);
        }
    }
    let path = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/bench/encoder.png"
    ));
    match encoder_plot(path, &figures, peak) {
        Ok(()) => println!("plot: {}", path.display()),
        Err(e) => println!("plot not written: {e}"),
    }
}

fn encoder_plot(
    path: &std::path::Path,
    figures: &[EncoderFigure],
    peak: f64,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    wasp_tests::prepare_plot(path)?;
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let labels: Vec<String> = figures
        .iter()
        .map(|f| format!("{} {}", f.engine, f.batch))
        .collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "MiniLM encoder on the CPU: GFLOP/s on real tokens (pale: with padding) vs FP32 peak",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..figures.len() as f64, 0.0..peak * 1.1)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(figures.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("GFLOP/s")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    // Pale: everything executed, padding included; solid: real tokens only.
    chart.draw_series(figures.iter().enumerate().map(|(i, f)| {
        let colour = if f.engine == "packed" { BLUE } else { RED };
        Rectangle::new(
            [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, f.executed_gflops)],
            colour.mix(0.25).filled(),
        )
    }))?;
    chart.draw_series(figures.iter().enumerate().map(|(i, f)| {
        let colour = if f.engine == "packed" { BLUE } else { RED };
        Rectangle::new(
            [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, f.real_gflops)],
            colour.filled(),
        )
    }))?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, peak), (figures.len() as f64, peak)],
            BLACK.stroke_width(2),
        ))?
        .label(format!("measured FP32 peak {peak:.0} GFLOP/s"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
