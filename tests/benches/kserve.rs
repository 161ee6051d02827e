//! The KServe v2 benchmark: the same request, eight sentences embedded by all-MiniLM-L6-v2
//! (the `text-embeddings` processor and the candle backend), over OpenAI's
//! `/v1/embeddings`, KServe v2 HTTP with JSON tensors, KServe v2 HTTP with binary tensors
//! and KServe v2 gRPC (text in, 8 x 384 floats out), in one run: req/s and p50/p99 at
//! concurrency 1 and 8, and the p50 ratios. The goal: binary and gRPC at or under 0.8x the
//! KServe JSON route's p50. Each client holds its own connection (HTTP/1.1 with
//! TCP_NODELAY, or an HTTP/2 channel) and sends its next request when the last is
//! answered.
//!
//! Run with `./x bench` (or `cargo bench -p wasp-tests --bench kserve`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use wasp_tests::guests::TEXT_EMBEDDINGS;
use wasp_tests::load::{self, Report};
use wasp_tests::{TestServer, minilm_spec};

const SENTENCES: [&str; 8] = [
    "A man is riding a white horse on an enclosed ground.",
    "A woman is playing the violin.",
    "Two children are playing in the snow.",
    "The stock market fell sharply on Monday.",
    "A cat sleeps on a warm windowsill.",
    "The new library opens next spring.",
    "Rain is expected over the weekend.",
    "She plays chess with her grandfather every evening.",
];

/// The texts as BYTES elements: a 4-byte little-endian length before each.
fn text_elements() -> Vec<u8> {
    let mut tail = Vec::new();
    for s in SENTENCES {
        tail.extend_from_slice(&(s.len() as u32).to_le_bytes());
        tail.extend_from_slice(s.as_bytes());
    }
    tail
}

/// The KServe binary request: a JSON header asking for binary output, then the texts as
/// BYTES elements.
fn binary_request() -> (Bytes, String) {
    let tail = text_elements();
    let header = json!({
        "inputs": [{ "name": "text", "shape": [SENTENCES.len()], "datatype": "BYTES",
                     "parameters": { "binary_data_size": tail.len() } }],
        "parameters": { "binary_data_output": true },
    })
    .to_string();
    let length = header.len().to_string();
    let mut body = header.into_bytes();
    body.extend_from_slice(&tail);
    (Bytes::from(body), length)
}

/// `clients` gRPC clients, each on its own channel, sending the texts to `ModelInfer` for
/// `duration`.
async fn grpc_run(addr: SocketAddr, key: &str, clients: usize, duration: Duration) -> Report {
    use wasp_grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
    use wasp_grpc::proto::model_infer_request::InferInputTensor;
    use wasp_grpc::proto::{ModelInferRequest, ModelInferResponse};

    let message = ModelInferRequest {
        model_name: "minilm".into(),
        inputs: vec![InferInputTensor {
            name: "text".into(),
            datatype: "BYTES".into(),
            shape: vec![SENTENCES.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(text_elements())],
        ..Default::default()
    };
    let authorization: tonic::metadata::MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
    load::drive(clients, duration, move |done| {
        let (message, authorization) = (message.clone(), authorization.clone());
        async move {
            let mut client = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            let mut latencies = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let mut request = tonic::Request::new(message.clone());
                request
                    .metadata_mut()
                    .insert("authorization", authorization.clone());
                let started = Instant::now();
                let answer: ModelInferResponse =
                    client.model_infer(request).await.unwrap().into_inner();
                assert_eq!(
                    answer.raw_output_contents[0].len(),
                    SENTENCES.len() * 384 * 4
                );
                latencies.push(started.elapsed());
            }
            latencies
        }
    })
    .await
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
            "wasp KServe v2 benchmark: 8 sentences -> 8 x 384 floats, all-MiniLM-L6-v2 on CPU ({} cores)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let mut t = TestServer::start().await;
        let grpc = t.serve_grpc().await;
        let key = t.client.key().unwrap().to_owned();
        t.client
            .deploy_ok(TEXT_EMBEDDINGS, &minilm_spec("minilm", ""))
            .await;
        let addr = t.server.local_addr();
        let openai = Bytes::from(json!({ "model": "minilm", "input": SENTENCES }).to_string());
        let kserve_json = Bytes::from(
            json!({ "inputs": [{ "name": "text", "shape": [SENTENCES.len()], "datatype": "BYTES",
                                 "data": SENTENCES }] })
            .to_string(),
        );
        let (kserve_binary, length) = binary_request();
        let binary_headers = [
            ("inference-header-content-length", length.as_str()),
            ("content-type", "application/octet-stream"),
        ];
        let path = "/v2/models/minilm/infer";
        // Warm up every route.
        load::run(addr, "/v1/embeddings", openai.clone(), 2, Duration::from_millis(500)).await;
        load::run(addr, path, kserve_json.clone(), 2, Duration::from_millis(500)).await;
        load::run_with(addr, path, &binary_headers, kserve_binary.clone(), 2, Duration::from_millis(500)).await;
        grpc_run(grpc, &key, 2, Duration::from_millis(500)).await;
        for c in [1, 8] {
            let o = load::run(addr, "/v1/embeddings", openai.clone(), c, seconds).await;
            let j = load::run(addr, path, kserve_json.clone(), c, seconds).await;
            let b = load::run_with(addr, path, &binary_headers, kserve_binary.clone(), c, seconds).await;
            let g = grpc_run(grpc, &key, c, seconds).await;
            load::print_line(&format!("/v1/embeddings (JSON) c={c}"), &o);
            load::print_line(&format!("KServe HTTP JSON c={c}"), &j);
            load::print_line(&format!("KServe HTTP binary c={c}"), &b);
            load::print_line(&format!("KServe gRPC c={c}"), &g);
            let p50 = |r: &Report| r.p50.as_secs_f64();
            println!(
                "  p50 at c={c}: KServe JSON / /v1/embeddings {:.2}x; binary / KServe JSON {:.2}x, \
                 gRPC / KServe JSON {:.2}x (goal <= 0.8x); binary / /v1/embeddings {:.2}x",
                p50(&j) / p50(&o),
                p50(&b) / p50(&j),
                p50(&g) / p50(&j),
                p50(&b) / p50(&o)
            );
        }
        t.stop().await;
    });
}
