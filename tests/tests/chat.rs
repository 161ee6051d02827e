//! Chat and text completions end to end: the real server, the chat processor compiled to
//! wasm, the candle generation backend with the real SmolLM2 weights, streamed and not,
//! checked by hand and with OpenAI's own Python client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasp_tests::guests::{CHAT, TEXT_EMBEDDINGS};
use wasp_tests::{TestServer, minilm_spec, smollm2_spec};

fn ask(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "smol",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

/// The `data:` events of a server-sent event stream, in order.
fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The content of a streamed chat answer, and its finish reason.
fn streamed_content(text: &str) -> (String, Option<String>, Option<Value>) {
    let events = events(text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let mut content = String::new();
    let mut finish = None;
    let mut usage = None;
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert!(chunk["id"].as_str().unwrap().starts_with("chatcmpl-"));
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        if let Some(text) = choice["delta"]["content"].as_str() {
            content.push_str(text);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_owned());
        }
    }
    (content, finish, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_and_answers_whole_with_the_real_model() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(CHAT, &smollm2_spec("smol", 8)).await;

    // Whole: one chat.completion with usage.
    let reply = c
        .post_json(
            "/v1/chat/completions",
            &ask("What is the capital of France?", json!({"max_tokens": 24})),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let whole = reply.json();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["model"], "smol");
    let answer = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    // The 135M model answers greedily in French ("L'Étoile, ..."), as llama.cpp does.
    assert!(answer.chars().count() > 10, "{answer}");
    let usage = &whole["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0 && completion <= 24);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );

    // Streamed with the same (greedy) settings: the same text, a chunk at a time, then
    // the usage chunk and [DONE].
    let reply = c
        .post_json(
            "/v1/chat/completions",
            &ask(
                "What is the capital of France?",
                json!({"max_tokens": 24, "stream": true, "stream_options": {"include_usage": true}}),
            ),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let text = reply.text();
    assert!(events(&text).len() > 5, "{text}");
    let (content, finish, usage) = streamed_content(&text);
    assert_eq!(content, answer);
    assert_eq!(
        finish.as_deref(),
        whole["choices"][0]["finish_reason"].as_str()
    );
    assert_eq!(usage.unwrap()["completion_tokens"], completion);

    // max_tokens cuts with finish_reason `length`.
    let reply = c
        .post_json(
            "/v1/chat/completions",
            &ask("Tell me a long story.", json!({"max_tokens": 5})),
        )
        .await
        .json();
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    assert_eq!(reply["usage"]["completion_tokens"], 5);

    // A stop sequence ends the answer where it would begin, and is not in it.
    let full = c
        .post_json(
            "/v1/chat/completions",
            &ask("List three colours.", json!({"max_tokens": 40})),
        )
        .await
        .json();
    let full = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let stop = "2.";
    let at = full
        .find(stop)
        .unwrap_or_else(|| panic!("no `{stop}` in {full:?}"));
    for stream in [false, true] {
        let reply = c
            .post_json(
                "/v1/chat/completions",
                &ask(
                    "List three colours.",
                    json!({"max_tokens": 40, "stop": [stop], "stream": stream}),
                ),
            )
            .await;
        let (content, finish) = if stream {
            let (content, finish, _) = streamed_content(&reply.text());
            (content, finish.unwrap())
        } else {
            let body = reply.json();
            (
                body["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                body["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        };
        assert_eq!(content, full[..at], "stream {stream}");
        assert_eq!(finish, "stop");
    }

    // Legacy completions.
    let reply = c
        .post_json(
            "/v1/completions",
            &json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["object"], "text_completion");
    assert!(!body["choices"][0]["text"].as_str().unwrap().is_empty());

    // /v1/models lists the endpoint.
    let models = c.get("/v1/models").await.json();
    assert_eq!(models["object"], "list");
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "smol")
    );

    // The generation metrics count what was generated.
    let metrics = c.get("/metrics").await.text();
    for name in [
        "wasp_generation_time_to_first_token_seconds_count",
        "wasp_generation_time_per_output_token_seconds_count",
        "wasp_generation_completion_tokens_total",
        "wasp_generation_prompt_tokens_total",
        "wasp_generation_running_sequences",
        "wasp_generation_kv_cache_capacity_bytes",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("endpoint=\"smol\""))
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
        if name.ends_with("_total") || name.ends_with("_count") || name.ends_with("capacity_bytes")
        {
            let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(value > 0.0, "{line}");
        }
    }
    // The tenant's usage counts the generated tokens (from the last chunk's `usage`).
    let tokens: f64 = metrics
        .lines()
        .find(|l| l.starts_with("wasp_tenant_tokens_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no wasp_tenant_tokens_total in\n{metrics}"));
    assert!(tokens > 0.0, "{tokens}");

    // The console's history has the generation figures once the interval closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = c
            .get("/api/v1/endpoints/smol/metrics?window_s=120")
            .await
            .json();
        let v = &h["versions"][0];
        let some = |key: &str| v[key].as_array().unwrap().iter().any(Value::is_number);
        let tokens: f64 = v["tokens_per_s"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_f64)
            .sum();
        let ttft = v["ttft_p50_ms"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_f64);
        if some("ttft_p50_ms") && some("tpot_p50_ms") && tokens > 0.0 {
            assert!(ttft.clone().all(|ms| ms > 0.0 && ms < 60_000.0), "{v:#}");
            break;
        }
        assert!(Instant::now() < deadline, "no generation figures: {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_their_field_in_openai_shape() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(CHAT, &smollm2_spec("smol", 4)).await;
    let long = "word ".repeat(700);
    let cases = [
        (ask(&long, json!({})), "messages"),
        (ask("hi", json!({"temperature": 3})), "temperature"),
        (ask("hi", json!({"top_p": 0})), "top_p"),
        (ask("hi", json!({"max_tokens": 0})), "max_tokens"),
        (ask("hi", json!({"max_tokens": 100000})), "max_tokens"),
        (ask("hi", json!({"n": 2})), "n"),
        (
            ask("hi", json!({"stop": ["a", "b", "c", "d", "e"]})),
            "stop",
        ),
        (ask("hi", json!({"stream": "yes"})), "stream"),
        (
            ask("hi", json!({"stream_options": {"include_usage": true}})),
            "stream_options",
        ),
        (ask("hi", json!({"seed": -1})), "seed"),
        (
            ask("hi", json!({"frequency_penalty": 1.5})),
            "frequency_penalty",
        ),
        (ask("hi", json!({"tools": []})), "tools"),
        (json!({"model": "smol", "messages": []}), "messages"),
        (
            json!({"model": "smol", "messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "smol", "messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
    ];
    for (body, field) in cases {
        let reply = c.post_json("/v1/chat/completions", &body).await;
        assert_eq!(reply.status, 400, "{field}: {}", reply.text());
        let error = &reply.json()["error"];
        assert_eq!(error["param"], field, "{}", reply.text());
        assert_eq!(error["type"], "invalid_request_error");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let reply = c
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "nope", "messages": []}),
        )
        .await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "not_found_error");
    // Not JSON.
    let reply = c.post("/v1/chat/completions", "{").await;
    assert_eq!(reply.status, 400);
    assert!(reply.json()["error"]["message"].is_string());
}

/// Reads a streamed answer on a raw connection until `bytes` have come, then drops the
/// connection.
async fn read_then_drop(
    addr: std::net::SocketAddr,
    key: &str,
    body: &Value,
    bytes: usize,
) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.len() < bytes {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l.contains("endpoint=\"smol\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_sequence() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(CHAT, &smollm2_spec("smol", 4)).await;
    let long = ask(
        "Write a very long essay about the history of bread.",
        json!({"max_tokens": 400, "stream": true, "temperature": 0.8, "seed": 1}),
    );
    let head = read_then_drop(t.server.local_addr(), c.key().unwrap(), &long, 600).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("chat.completion.chunk"), "{head}");
    // The sequence leaves the batch at once, long before its 400 tokens.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = c.get("/metrics").await.text();
        let running = gauge(&metrics, "wasp_generation_running_sequences");
        let kv = gauge(&metrics, "wasp_generation_kv_cache_bytes");
        if running == 0.0 && kv == 0.0 {
            let generated = gauge(&metrics, "wasp_generation_completion_tokens_total");
            assert!(generated < 400.0, "{generated}");
            break;
        }
        assert!(Instant::now() < deadline, "running {running}, kv {kv}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_streams_are_each_correct() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(CHAT, &smollm2_spec("smol", 8)).await;
    let questions = [
        "What is the capital of France?",
        "List three colours.",
        "What is 2 + 2?",
        "Name a fruit.",
        "Say hello.",
        "What colour is the sky?",
        "Name an animal.",
        "What is water made of?",
    ];
    // Each alone first: the reference answers.
    let mut alone = Vec::new();
    for q in questions {
        let body = c
            .post_json("/v1/chat/completions", &ask(q, json!({"max_tokens": 20})))
            .await
            .json();
        alone.push(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // All eight at once, streamed: each gets its own answer, whole.
    let tasks: Vec<_> = questions
        .iter()
        .map(|q| {
            let c = c.clone();
            let body = ask(q, json!({"max_tokens": 20, "stream": true}));
            tokio::spawn(async move { c.post_json("/v1/chat/completions", &body).await })
        })
        .collect();
    for (task, expected) in tasks.into_iter().zip(&alone) {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        let (content, _, _) = streamed_content(&reply.text());
        assert_eq!(&content, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_streams_chat_and_embeds() {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/clients/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `scripts/toolchain clients` (./x test does)",
        python.display()
    );
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(CHAT, &smollm2_spec("smol", 4)).await;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_spec("minilm", ""))
        .await;
    let script = r#"
import json, sys
from openai import OpenAI, BadRequestError
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2])
stream = client.chat.completions.create(
    model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True})
parts, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage.completion_tokens
    for choice in chunk.choices:
        if choice.delta.content:
            parts.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
whole = client.chat.completions.create(
    model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=24, temperature=0)
emb = client.embeddings.create(model="minilm", input=["hello", "world"])
try:
    client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "x"}], temperature=5)
    error = None
except BadRequestError as e:
    error = e.body.get("param") if isinstance(e.body, dict) else str(e.body)
print(json.dumps({"streamed": "".join(parts), "usage": usage, "finish": finish,
    "whole": whole.choices[0].message.content, "dims": [len(d.embedding) for d in emb.data],
    "error_param": error}))
"#;
    let base = format!("http://{}", t.server.local_addr());
    let key = c.key().unwrap().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", script, &base, &key])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        result["streamed"].as_str().unwrap().chars().count() > 10,
        "{result}"
    );
    assert_eq!(result["streamed"], result["whole"]);
    assert!(result["usage"].as_u64().unwrap() > 0);
    assert!(result["finish"].is_string());
    assert_eq!(result["dims"], json!([384, 384]));
    assert_eq!(result["error_param"], "temperature");
}

/// KServe v2 inference on a generation backend, with the generation settings as the
/// request's `parameters`: streamed as server-sent events over HTTP (`Accept:
/// text/event-stream`), one per chunk with the final one marked, as responses of one
/// `ModelStreamInfer` request over gRPC, and in one answer when not streamed, all with the
/// same greedy tokens.
/// The events of a KServe inference of `smol` with `body`, asked as server-sent events.
async fn kserve_events(c: &wasp_tests::TestClient, body: String) -> Vec<Value> {
    let headers = [
        ("content-type", "application/json"),
        ("accept", "text/event-stream"),
    ];
    let reply = c
        .request_with("POST", "/v2/models/smol/infer", &headers, body)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    events(&reply.text())
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// The responses of one `ModelStreamInfer` call that sends `message`, each checked to
/// carry no error.
async fn stream_infer(
    grpc: std::net::SocketAddr,
    key: &str,
    message: wasp_grpc::proto::ModelInferRequest,
) -> Vec<wasp_grpc::proto::ModelInferResponse> {
    use wasp_grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let mut call = tonic::Request::new(tokio_stream::iter(vec![message]));
    call.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let mut answers = client.model_stream_infer(call).await.unwrap().into_inner();
    let mut responses = Vec::new();
    while let Some(answer) = answers.message().await.unwrap() {
        assert!(answer.error_message.is_empty(), "{answer:?}");
        responses.push(answer.infer_response.unwrap());
    }
    responses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_streams_a_generation_backends_tokens_as_events_and_over_grpc() {
    use wasp_grpc::proto::ModelInferRequest;
    use wasp_grpc::proto::infer_parameter::ParameterChoice;
    use wasp_grpc::proto::model_infer_request::InferInputTensor;
    use wasp_grpc::proto::{InferParameter, InferTensorContents};

    let mut t = TestServer::start().await;
    t.client.deploy_ok(CHAT, &smollm2_spec("smol", 2)).await;
    let grpc = t.serve_grpc().await;
    let c = &t.client;
    let prompt = [1i64, 4093, 198, 19556, 2, 198, 1, 520, 9531, 198];
    let request = |stream: bool| {
        json!({
            "id": "k1",
            "inputs": [{"name": "input_ids", "shape": [prompt.len()], "datatype": "INT64",
                        "data": prompt}],
            "parameters": {"stream": stream, "max_tokens": 6, "temperature": 0,
                           "ignore_eos": true},
        })
        .to_string()
    };
    let chunks = kserve_events(c, request(true)).await;
    assert!(chunks.len() >= 2, "{chunks:#?}");
    let mut tokens = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk["id"], "k1");
        assert_eq!(chunk["outputs"][0]["name"], "token_ids");
        let last = i == chunks.len() - 1;
        assert_eq!(
            chunk["parameters"]["triton_final_response"], last,
            "{chunk:#}"
        );
        for id in chunk["outputs"][0]["data"].as_array().unwrap() {
            tokens.push(id.as_i64().unwrap());
        }
    }
    assert_eq!(tokens.len(), 6, "{chunks:#?}");
    assert_eq!(
        chunks.last().unwrap()["parameters"]["finish_reason"],
        "length"
    );

    // Not streamed: one answer with the same tokens.
    let whole = c
        .request_with(
            "POST",
            "/v2/models/smol/infer",
            &[("content-type", "application/json")],
            request(false),
        )
        .await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    let data: Vec<i64> = whole.json()["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(data, tokens);

    // gRPC: one request on a stream, a response per chunk.
    let parameter = |choice| InferParameter {
        parameter_choice: Some(choice),
    };
    let message = ModelInferRequest {
        model_name: "smol".into(),
        id: "g1".into(),
        inputs: vec![InferInputTensor {
            name: "input_ids".into(),
            datatype: "INT64".into(),
            shape: vec![prompt.len() as i64],
            contents: Some(InferTensorContents {
                int64_contents: prompt.to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        parameters: [
            ("stream", parameter(ParameterChoice::BoolParam(true))),
            ("max_tokens", parameter(ParameterChoice::Int64Param(6))),
            ("temperature", parameter(ParameterChoice::Int64Param(0))),
            ("ignore_eos", parameter(ParameterChoice::BoolParam(true))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        ..Default::default()
    };
    let mut streamed = Vec::new();
    let mut finals = Vec::new();
    for response in stream_infer(grpc, c.key().unwrap(), message).await {
        assert_eq!(response.id, "g1");
        for bytes in response.raw_output_contents[0].chunks(8) {
            streamed.push(i64::from_le_bytes(bytes.try_into().unwrap()));
        }
        finals.push(
            response.parameters["triton_final_response"].parameter_choice
                == Some(ParameterChoice::BoolParam(true)),
        );
    }
    assert_eq!(streamed, tokens);
    assert!(finals.len() >= 2, "{finals:?}");
    assert_eq!(finals.iter().filter(|f| **f).count(), 1);
    assert_eq!(finals.last(), Some(&true));
    t.stop().await;
}

/// A KServe client sends a generation endpoint text (a `BYTES` input `text_input`, as
/// Triton's LLM backends take it) and gets text (`text_output`): whole, as server-sent
/// events one per token, or on a `ModelStreamInfer` stream one response per token; the
/// same text as `/v1/completions` with the same settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_text_to_a_generation_endpoint_streams_text_per_token() {
    use wasp_grpc::proto::ModelInferRequest;
    use wasp_grpc::proto::infer_parameter::ParameterChoice;
    use wasp_grpc::proto::model_infer_request::InferInputTensor;
    use wasp_grpc::proto::{InferParameter, InferTensorContents};

    let mut t = TestServer::start().await;
    t.client.deploy_ok(CHAT, &smollm2_spec("smol", 2)).await;
    let grpc = t.serve_grpc().await;
    let c = &t.client;
    let prompt = "The capital of France is";
    let completion = c
        .post_json(
            "/v1/completions",
            &json!({"model": "smol", "prompt": prompt, "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(completion.status, 200, "{}", completion.text());
    let expected = completion.json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!expected.is_empty());
    let request = |parameters: Value| {
        json!({
            "id": "t1",
            "inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                        "data": [prompt]}],
            "parameters": parameters,
        })
        .to_string()
    };
    let settings = json!({"max_tokens": 8, "temperature": 0});
    let json_type = [("content-type", "application/json")];

    // Whole.
    let whole = c
        .request_with(
            "POST",
            "/v2/models/smol/infer",
            &json_type,
            request(settings.clone()),
        )
        .await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    let body = whole.json();
    assert_eq!(body["id"], "t1");
    assert_eq!(body["outputs"][0]["name"], "text_output", "{body:#}");
    assert_eq!(body["outputs"][0]["datatype"], "BYTES");
    assert_eq!(body["outputs"][0]["data"][0], expected.as_str(), "{body:#}");
    assert_eq!(body["parameters"]["finish_reason"], "length", "{body:#}");
    assert_eq!(body["parameters"]["completion_tokens"], 8, "{body:#}");

    // As events, one per token.
    let chunks = kserve_events(c, request(settings)).await;
    assert!(chunks.len() >= 4, "{chunks:#?}");
    let mut text = String::new();
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk["id"], "t1");
        assert_eq!(chunk["outputs"][0]["name"], "text_output", "{chunk:#}");
        let last = i == chunks.len() - 1;
        assert_eq!(
            chunk["parameters"]["triton_final_response"], last,
            "{chunk:#}"
        );
        text.push_str(chunk["outputs"][0]["data"][0].as_str().unwrap());
    }
    assert_eq!(text, expected);
    assert_eq!(
        chunks.last().unwrap()["parameters"]["finish_reason"],
        "length"
    );

    // Over gRPC, a response per token.
    let parameter = |choice| InferParameter {
        parameter_choice: Some(choice),
    };
    let message = ModelInferRequest {
        model_name: "smol".into(),
        id: "g1".into(),
        inputs: vec![InferInputTensor {
            name: "text_input".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            contents: Some(InferTensorContents {
                bytes_contents: vec![prompt.as_bytes().to_vec().into()],
                ..Default::default()
            }),
            ..Default::default()
        }],
        parameters: [
            ("max_tokens", parameter(ParameterChoice::Int64Param(8))),
            ("temperature", parameter(ParameterChoice::Int64Param(0))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        ..Default::default()
    };
    let mut streamed = String::new();
    let mut responses = 0;
    for response in stream_infer(grpc, c.key().unwrap(), message).await {
        assert_eq!(response.id, "g1");
        assert_eq!(response.outputs[0].name, "text_output");
        // A BYTES element: its length (4 bytes, little-endian), then its bytes.
        let raw = &response.raw_output_contents[0];
        let length = u32::from_le_bytes(raw[..4].try_into().unwrap()) as usize;
        streamed.push_str(std::str::from_utf8(&raw[4..4 + length]).unwrap());
        responses += 1;
    }
    assert_eq!(streamed, expected);
    assert!(responses >= 4, "{responses} responses");

    // Bad requests name what is at fault.
    let unknown = c
        .request_with(
            "POST",
            "/v2/models/smol/infer",
            &json_type,
            request(json!({"max_tokens": 8, "bogus": 1})),
        )
        .await;
    assert_eq!(unknown.status, 400, "{}", unknown.text());
    assert!(unknown.json()["error"].as_str().unwrap().contains("bogus"));
    let two = json!({
        "inputs": [
            {"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"]},
            {"name": "b", "shape": [1], "datatype": "BYTES", "data": ["y"]},
        ],
    });
    let ambiguous = c
        .request_with("POST", "/v2/models/smol/infer", &json_type, two.to_string())
        .await;
    assert_eq!(ambiguous.status, 400, "{}", ambiguous.text());
    assert!(
        ambiguous.json()["error"]
            .as_str()
            .unwrap()
            .contains("text_input"),
        "{}",
        ambiguous.text()
    );
    t.stop().await;
}
