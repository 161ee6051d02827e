//! Text generation benchmark (`cargo bench -p wasp-tests --bench generation`): SmolLM2-135M
//! (the same Q4_1 GGUF file) served by wasp and by llama-cpp-python's OpenAI server, side
//! by side in one run, through the same streamed chat completions.
//!
//! - single stream: decode tokens/s (after the first token) and time to first token;
//! - 1, 4, 8 and 16 concurrent streams: aggregate tokens/s and TTFT p50/p95, with wasp's
//!   continuous batching on (`max_sequences = 16`) and off (`max_sequences = 1`), and
//!   llama.cpp as its server runs them (one sequence at a time).
//!
//! Both servers are release builds with two threads (the machine's cores); the peer runs
//! as its users run it: `python -m llama_cpp.server --n_threads 2` with the model's own
//! chat template. It comes from `scripts/toolchain llama` (llama.cpp built from source);
//! without it, wasp runs alone. A plot lands in `target/bench/generation.png`.
//!
//! First, the bare model in process: prefill and decode at batch 1 and 8 (`--model-only`
//! runs just that).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use plotters::prelude::*;
use serde_json::json;
use wasp_tests::process::{Process, free_port, release_wasp, root, start_wasp, wait_for};

/// Tokens asked of every answer.
const MAX_TOKENS: u64 = 64;
/// Requests each client sends in a concurrency step.
const PER_CLIENT: usize = 3;

/// wasp with two chat endpoints over the same model: batching on and off.
fn wasp_serve(dir: &Path) -> (Process, SocketAddr, String) {
    let wasp = release_wasp();
    let model = wasp_tests::smollm2_dir();
    let mut deploys = Vec::new();
    for (name, sequences) in [("batched", 16), ("serial", 1)] {
        let spec = dir.join(format!("{name}.toml"));
        std::fs::write(
            &spec,
            format!(
                "name = \"{name}\"\n[[versions]]\nname = \"v1\"\n\
                 backend = {{ kind = \"candle\", model = {model:?}, task = \"generate\", \
                 device = \"cpu\", max_sequences = {sequences} }}\n\
                 [versions.processor]\ncomponent = {:?}\n\
                 mounts = [{{ host = {model:?}, guest = \"/model\" }}]\n\
                 env = {{ CONTEXT_LENGTH = \"2048\" }}\n\
                 [versions.limits]\ntimeout_ms = 30000\n",
                wasp_tests::guests::CHAT,
                model = model.display().to_string(),
            ),
        )
        .unwrap();
        deploys.push(spec);
    }
    let mut command = Command::new(&wasp);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--mount-root")
        .arg(wasp_tests::models_dir());
    for spec in &deploys {
        command.arg("--deploy").arg(spec);
    }
    start_wasp(command, dir)
}

/// llama-cpp-python's OpenAI server on the same GGUF file, if it is installed.
fn llama_serve() -> Option<(Process, SocketAddr)> {
    let python = root().join("target/tools/llama/bin/python");
    if !python.exists() {
        eprintln!("llama-cpp-python is not installed (scripts/toolchain llama): wasp runs alone");
        return None;
    }
    let port = free_port();
    let child = Command::new(python)
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(wasp_tests::smollm2_dir().join("model.gguf"))
        .args([
            "--n_threads",
            "2",
            "--n_threads_batch",
            "2",
            "--n_ctx",
            "2048",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            // Its default ends a stream when another request comes; its users who serve
            // more than one client turn that off, and requests queue.
            "--interrupt_requests",
            "False",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let process = Process(child);
    wait_for(addr, Duration::from_secs(120));
    Some((process, addr))
}

/// One streamed answer: when its first token came, when its last did, and how many (and
/// whether the stream broke).
struct Answer {
    ttft: Duration,
    decode: Duration,
    tokens: u64,
    broken: bool,
}

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Streams one chat completion and times it.
async fn stream_one(http: &Http, addr: SocketAddr, key: &str, model: &str, prompt: &str) -> Answer {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": true,
    })
    .to_string();
    let request = hyper::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let started = Instant::now();
    let response = http.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut broken = false;
    let mut first = None;
    let mut last = started;
    let mut tokens = 0;
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            broken = true;
            break;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(json) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if json == "[DONE]" {
                continue;
            }
            let chunk: serde_json::Value = serde_json::from_str(json).unwrap();
            let content = chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("");
            if !content.is_empty() {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                tokens += 1;
            }
        }
    }
    let first = first.unwrap_or(last);
    Answer {
        ttft: first - started,
        decode: last - first,
        tokens,
        broken,
    }
}

const PROMPTS: [&str; 4] = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how bread is made, step by step.",
    "Describe the history of sailing ships at length.",
    "Write a long letter to a friend about a trip to the mountains.",
];

/// `clients` clients, each streaming `PER_CLIENT` answers one after another.
struct Step {
    tokens_per_s: f64,
    ttft_p50_ms: f64,
    ttft_p95_ms: f64,
    broken: usize,
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * q).round() as usize]
}

async fn step(http: &Http, addr: SocketAddr, key: &str, model: &str, clients: usize) -> Step {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (http, key, model) = (http.clone(), key.to_owned(), model.to_owned());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for r in 0..PER_CLIENT {
                    let prompt = PROMPTS[(c + r) % PROMPTS.len()];
                    answers.push(stream_one(&http, addr, &key, &model, prompt).await);
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.unwrap());
    }
    let wall = started.elapsed().as_secs_f64();
    let tokens: u64 = answers.iter().map(|a| a.tokens).sum();
    let mut ttft: Vec<f64> = answers.iter().map(|a| a.ttft.as_secs_f64() * 1e3).collect();
    Step {
        tokens_per_s: tokens as f64 / wall,
        ttft_p50_ms: quantile(&mut ttft, 0.5),
        ttft_p95_ms: quantile(&mut ttft, 0.95),
        broken: answers.iter().filter(|a| a.broken).count(),
    }
}

/// Single stream: decode tokens/s after the first token, and TTFT, over the prompts.
async fn single(http: &Http, addr: SocketAddr, key: &str, model: &str) -> (f64, f64) {
    let mut rates = Vec::new();
    let mut ttft = Vec::new();
    for prompt in PROMPTS {
        let a = stream_one(http, addr, key, model, prompt).await;
        if a.tokens > 1 {
            rates.push((a.tokens - 1) as f64 / a.decode.as_secs_f64());
        }
        ttft.push(a.ttft.as_secs_f64() * 1e3);
    }
    (quantile(&mut rates, 0.5), quantile(&mut ttft, 0.5))
}

fn plot(path: &Path, series: &[(String, Vec<(usize, f64)>)]) -> anyhow::Result<()> {
    wasp_tests::prepare_plot(path)?;
    let area = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    area.fill(&WHITE)?;
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&area)
        .caption(
            "SmolLM2-135M Q4_1, 2 cores: aggregate decode throughput",
            ("sans-serif", 22),
        )
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..17.0, 0.0..top * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("concurrent streams")
        .y_desc("tokens / s")
        .draw()?;
    for (i, (label, points)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|(x, y)| (*x as f64, *y)),
                colour.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart.draw_series(
            points
                .iter()
                .map(|(x, y)| Circle::new((*x as f64, *y), 4, colour.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    area.present()?;
    Ok(())
}

/// The bare model in process, no server: a 48-token prefill, and decode steps of 1 and 8
/// sequences (each with 48 tokens cached). `--model-only` runs just this, and
/// `--prefill-only` just the prefill (to profile it).
fn bare_model() {
    use wasp_candle::llama::{Llama, Step};
    let model = Llama::open(
        &wasp_tests::smollm2_dir().join("model.gguf"),
        &wasp_candle::Device::Cpu,
    )
    .unwrap();
    let prompt: Vec<u32> = (0..48u32).map(|i| 100 + i * 37).collect();
    let budget = Duration::from_secs(3);
    // Prefill: one sequence's 48 prompt tokens in one pass.
    let mut times = Vec::new();
    let started = Instant::now();
    while started.elapsed() < budget || times.len() < 3 {
        let mut cache = model.new_cache();
        let t = Instant::now();
        let mut steps = [Step {
            tokens: &prompt,
            cache: &mut cache,
            logits: true,
        }];
        std::hint::black_box(model.forward(&mut steps).unwrap());
        times.push(t.elapsed());
    }
    times.sort();
    let prefill = times[times.len() / 2].as_secs_f64();
    println!(
        "bare model: prefill of 48 tokens {:.1} ms ({:.0} tokens/s)",
        prefill * 1e3,
        48.0 / prefill
    );
    if std::env::args().any(|a| a == "--prefill-only") {
        return;
    }
    let mut rates = Vec::new();
    for batch in [1usize, 8] {
        let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
        for cache in &mut caches {
            let mut steps = [Step {
                tokens: &prompt,
                cache,
                logits: false,
            }];
            model.forward(&mut steps).unwrap();
        }
        let token = [200u32];
        let mut count = 0usize;
        let started = Instant::now();
        while started.elapsed() < budget || count < 8 {
            let mut steps: Vec<Step<'_>> = caches
                .iter_mut()
                .map(|cache| Step {
                    tokens: &token,
                    cache,
                    logits: true,
                })
                .collect();
            std::hint::black_box(model.forward(&mut steps).unwrap());
            count += 1;
        }
        let rate = (count * batch) as f64 / started.elapsed().as_secs_f64();
        println!("bare model: decode at batch {batch}: {rate:.1} tokens/s");
        rates.push(rate);
    }
    println!(
        "bare model: batch 8 / batch 1 decode: {:.2}x",
        rates[1] / rates[0]
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    bare_model();
    if std::env::args().any(|a| a == "--model-only" || a == "--prefill-only") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_wasp, wasp_addr, key) = wasp_serve(dir.path());
    let peer = llama_serve();
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    runtime.block_on(async {
        // Warm both: the first answer loads and compiles what is lazy.
        stream_one(&http, wasp_addr, &key, "batched", "Hi").await;
        stream_one(&http, wasp_addr, &key, "serial", "Hi").await;
        if let Some((_, addr)) = &peer {
            stream_one(&http, *addr, "none", "smollm2", "Hi").await;
        }
        let mut targets = vec![
            ("wasp, continuous batching".to_owned(), wasp_addr, "batched"),
            ("wasp, one sequence at a time".to_owned(), wasp_addr, "serial"),
        ];
        if let Some((_, addr)) = &peer {
            targets.push(("llama-cpp-python server".to_owned(), *addr, "smollm2"));
        }
        println!("single stream ({MAX_TOKENS} tokens asked, greedy):");
        let mut singles = Vec::new();
        for (label, addr, model) in &targets {
            let (rate, ttft) = single(&http, *addr, &key, model).await;
            println!("  {label:<32} decode {rate:6.1} tokens/s   TTFT p50 {ttft:7.1} ms");
            singles.push(rate);
        }
        if singles.len() == 3 {
            println!(
                "  wasp / llama.cpp single-stream decode: {:.2}x",
                singles[0] / singles[2]
            );
        }
        println!("concurrent streams ({PER_CLIENT} answers per client):");
        let mut series = Vec::new();
        for (label, addr, model) in &targets {
            let mut points = Vec::new();
            for clients in [1usize, 4, 8, 16] {
                let s = step(&http, *addr, &key, model, clients).await;
                println!(
                    "  {label:<32} {clients:>2} streams: {:7.1} tokens/s   TTFT p50 {:7.1} ms  p95 {:7.1} ms{}",
                    s.tokens_per_s,
                    s.ttft_p50_ms,
                    s.ttft_p95_ms,
                    if s.broken > 0 {
                        format!("   ({} streams broke)", s.broken)
                    } else {
                        String::new()
                    }
                );
                points.push((clients, s.tokens_per_s));
            }
            series.push((label.clone(), points));
        }
        let at = |i: usize, clients: usize| {
            series[i]
                .1
                .iter()
                .find(|(c, _)| *c == clients)
                .map_or(0.0, |(_, v)| *v)
        };
        println!(
            "  wasp batched: 8 streams / 1 stream aggregate: {:.2}x",
            at(0, 8) / at(0, 1)
        );
        let path = root().join("target/bench/generation.png");
        match plot(&path, &series) {
            Ok(()) => println!("plot: {}", path.display()),
            Err(e) => eprintln!("no plot: {e}"),
        }
    });
}
