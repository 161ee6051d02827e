//! Embeddings end to end: the candle backend with real all-MiniLM-L6-v2 weights, the
//! tokenizer processor compiled to wasm, dynamic batching, and the OpenAI and KServe routes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};
use wasp_tests::guests::{HOSTILE, TEXT_EMBEDDINGS};
use wasp_tests::{TestServer, minilm_dir, minilm_spec, spec};

fn reference() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/minilm-reference.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_match_sentence_transformers() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_spec("minilm", ""))
        .await;
    let reference = reference();
    let sentences = reference["sentences"].clone();
    let reply = c
        .post(
            "/v1/embeddings",
            json!({ "model": "minilm", "input": sentences }).to_string(),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "minilm");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), sentences.as_array().unwrap().len());
    let mut worst: f64 = 1.0;
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(item["object"], "embedding");
        let got = floats(&item["embedding"]);
        assert_eq!(got.len(), 384);
        let want = floats(&reference["embeddings"][i]);
        let cos = cosine(&got, &want);
        worst = worst.min(cos);
        assert!(
            cos >= 0.999,
            "sentence {i} ({}): cosine {cos}",
            sentences[i]
        );
    }
    eprintln!(
        "worst cosine against sentence-transformers: 1 - {:.1e}",
        1.0 - worst
    );
    let usage = &body["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 15);
    assert_eq!(usage["prompt_tokens"], usage["total_tokens"]);

    // A single string, and the base64 encoding of the same vector.
    let one = c
        .post(
            "/v1/embeddings",
            json!({ "model": "minilm", "input": "hello" }).to_string(),
        )
        .await
        .json();
    let plain = floats(&one["data"][0]["embedding"]);
    let hello = reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .position(|s| s == "hello")
        .unwrap();
    assert!(cosine(&plain, &floats(&reference["embeddings"][hello])) >= 0.999);
    assert_eq!(one["usage"]["prompt_tokens"], 3, "[CLS] hello [SEP]");
    let b64 = c
        .post(
            "/v1/embeddings",
            json!({ "model": "minilm", "input": "hello", "encoding_format": "base64" }).to_string(),
        )
        .await
        .json();
    let text = b64["data"][0]["embedding"].as_str().unwrap();
    assert_eq!(text.len(), (384 * 4usize).div_ceil(3) * 4);
    t.stop().await;
}

/// Both CPU engines of the candle backend (the packed default and candle-transformers'
/// model), driven directly with the tokenizer crate and mean pooling, against the
/// sentence-transformers vectors: every path that can serve embeddings meets the bar.
#[test]
fn every_encoder_engine_matches_sentence_transformers() {
    use wasp_backend::Backend;
    use wasp_candle::{BertEmbedder, BertEngine, Device};
    use wasp_core::{ModelInput, Tensor};

    let reference = reference();
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(minilm_dir().join("tokenizer.json")).unwrap();
    tokenizer.with_truncation(None).unwrap();
    tokenizer.with_padding(None);
    let inputs: Vec<(ModelInput, usize)> = reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let e = tokenizer.encode(s.as_str().unwrap(), true).unwrap();
            let ids: Vec<i64> = e.get_ids().iter().map(|&x| i64::from(x)).collect();
            let shape = vec![1, ids.len() as u64];
            let input = ModelInput {
                tensors: vec![
                    Tensor::from_i64("input_ids", shape.clone(), &ids),
                    Tensor::from_i64("attention_mask", shape, &vec![1; ids.len()]),
                ],
                parameters: None,
            };
            (input, ids.len())
        })
        .collect();
    for engine in [BertEngine::Packed, BertEngine::Candle] {
        let model = BertEmbedder::load_engine(&minilm_dir(), Device::Cpu, engine).unwrap();
        let batch: Vec<ModelInput> = inputs.iter().map(|(i, _)| i.clone()).collect();
        let outputs = model.infer_batch(&batch).unwrap();
        let mut worst: f64 = 1.0;
        for (i, (output, (_, len))) in outputs.iter().zip(&inputs).enumerate() {
            let hidden = output.tensors[0].to_f32().unwrap();
            let mut pooled = vec![0f64; 384];
            for t in 0..*len {
                for (p, v) in pooled.iter_mut().zip(&hidden[t * 384..(t + 1) * 384]) {
                    *p += f64::from(*v) / *len as f64;
                }
            }
            let cos = cosine(&pooled, &floats(&reference["embeddings"][i]));
            assert!(cos >= 0.999, "{engine:?}, sentence {i}: cosine {cos}");
            worst = worst.min(cos);
        }
        eprintln!(
            "{engine:?}: worst cosine against sentence-transformers 1 - {:.1e}",
            1.0 - worst
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_refuse_bad_input_clearly() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(
        TEXT_EMBEDDINGS,
        &minilm_spec("minilm", "").replace(
            "guest = \"/model\" }]",
            "guest = \"/model\" }]\nenv = { MAX_TOKENS = \"8\" }",
        ),
    )
    .await;
    let post = |body: Value| {
        let c = c.clone();
        async move { c.post("/v1/embeddings", body.to_string()).await }
    };
    let long = post(json!({ "model": "minilm", "input": ["ok", "this sentence is far longer than eight tokens"] })).await;
    assert_eq!(long.status, 400, "{}", long.text());
    assert_eq!(long.json()["error"]["field"], "input[1]");
    assert!(long.text().contains("at most 8"), "{}", long.text());

    let empty = post(json!({ "model": "minilm", "input": [] })).await;
    assert_eq!(empty.json()["error"]["field"], "input");
    let number = post(json!({ "model": "minilm", "input": 3 })).await;
    assert_eq!(number.status, 400);
    let format = post(json!({ "model": "minilm", "input": "x", "encoding_format": "hex" })).await;
    assert_eq!(format.json()["error"]["field"], "encoding_format");
    let no_model = post(json!({ "input": "x" })).await;
    assert_eq!(no_model.status, 400);
    assert_eq!(no_model.json()["error"]["field"], "model");
    let unknown = post(json!({ "model": "nope", "input": "x" })).await;
    assert_eq!(unknown.status, 404);
    let garbage = c.post("/v1/embeddings", "{nope").await;
    assert_eq!(garbage.status, 400);

    // The endpoint is unharmed.
    assert_eq!(
        post(json!({ "model": "minilm", "input": "fine" }))
            .await
            .status,
        200
    );

    // With TRUNCATE=true the same input is cut to the limit, keeping its closing [SEP].
    c.deploy_ok(
        TEXT_EMBEDDINGS,
        &minilm_spec("cut", "").replace(
            "guest = \"/model\" }]",
            "guest = \"/model\" }]\nenv = { MAX_TOKENS = \"8\", TRUNCATE = \"true\" }",
        ),
    )
    .await;
    let cut =
        post(json!({ "model": "cut", "input": "this sentence is far longer than eight tokens" }))
            .await;
    assert_eq!(cut.status, 200, "{}", cut.text());
    assert_eq!(cut.json()["usage"]["prompt_tokens"], 8);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_forward_passes() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    c.deploy_ok(
        TEXT_EMBEDDINGS,
        &minilm_spec(
            "batched",
            "[versions.batching]\nmax_batch = 16\nmax_batch_delay_ms = 50",
        ),
    )
    .await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let body = json!({ "model": "batched", "input": format!("sentence number {i}") });
                c.post("/v1/embeddings", body.to_string()).await
            })
        })
        .collect();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let status = c.get("/api/v1/endpoints/batched").await.json();
    let worker = &status["versions"][0]["workers"][0];
    assert_eq!(worker["requests"], 16);
    let batches = worker["batches"].as_u64().unwrap();
    assert!(
        batches < 16,
        "16 concurrent requests ran in {batches} forward passes"
    );
    assert!(
        worker["model"]
            .as_str()
            .unwrap()
            .contains("all-MiniLM-L6-v2")
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_v2_and_the_inference_import_reach_the_backend() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_spec("minilm", ""))
        .await;
    let ready = c.get("/v2/models/minilm/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(c.get("/v2/models/nope/ready").await.status, 404);

    // [CLS] hello [SEP] as the tokenizer gives it.
    let infer = c
        .post(
            "/v2/models/minilm/infer",
            json!({ "id": "q1", "inputs": [
                { "name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [101, 7592, 102] },
                { "name": "attention_mask", "shape": [1, 3], "datatype": "INT64", "data": [1, 1, 1] }
            ]})
            .to_string(),
        )
        .await;
    assert_eq!(infer.status, 200, "{}", infer.text());
    let body = infer.json();
    assert_eq!(body["id"], "q1");
    assert_eq!(body["outputs"][0]["name"], "last_hidden_state");
    assert_eq!(body["outputs"][0]["shape"], json!([1, 3, 384]));
    assert_eq!(
        body["outputs"][0]["data"].as_array().unwrap().len(),
        3 * 384
    );

    let missing = c
        .post(
            "/v2/models/minilm/infer",
            json!({ "inputs": [{ "name": "ids", "shape": [1], "datatype": "INT64", "data": [1] }] }).to_string(),
        )
        .await;
    assert_eq!(missing.status, 400, "{}", missing.text());
    // The protocol's error shape on /v2 routes: one message, naming the field.
    let error = missing.json()["error"].as_str().unwrap().to_owned();
    assert!(error.contains("input_ids"), "{error}");

    // A processor calling the model through the `inference` import reaches the backend,
    // which names what the (empty) input lacks.
    c.deploy_ok(HOSTILE, &spec("caller", "")).await;
    let call = c.invoke("caller", "/infer", "minilm").await;
    assert_eq!(call.status, 400, "{}", call.text());
    assert!(call.text().contains("input_ids"), "{}", call.text());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candle_deploys_fail_clearly() {
    let t = TestServer::start().await;
    let c = &t.client;
    let missing = c
        .deploy(
            TEXT_EMBEDDINGS,
            &minilm_spec("m", "")
                .replace("model = \"all-MiniLM-L6-v2\"", "model = \"no-such-model\""),
        )
        .await;
    assert_eq!(missing.status, 422, "{}", missing.text());
    assert!(
        missing.text().contains("no model `no-such-model`"),
        "{}",
        missing.text()
    );
    let gpu = c
        .deploy(
            TEXT_EMBEDDINGS,
            &minilm_spec("m", "").replace("device = \"cpu\"", "device = \"cuda:0\""),
        )
        .await;
    assert_eq!(gpu.status, 422, "{}", gpu.text());
    if !wasp_candle::CUDA {
        assert!(gpu.text().contains("built without CUDA"), "{}", gpu.text());
    }
    let task = c
        .deploy(
            TEXT_EMBEDDINGS,
            &minilm_spec("m", "").replace("task = \"embeddings\"", "task = \"chat\""),
        )
        .await;
    assert_eq!(task.json()["error"]["field"], "versions[0].backend.task");
    t.stop().await;
}

/// The example spec `./x serve` deploys works as written (component and mount aside).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_spec_serves_embeddings() {
    let t = TestServer::start().await;
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/embeddings.toml"
    ))
    .unwrap()
    .replace("../target/processors/text_embeddings.wasm", "{COMPONENT}")
    .replace(
        "../data/models/all-MiniLM-L6-v2",
        &minilm_dir().display().to_string(),
    );
    let body = t.client.deploy_ok(TEXT_EMBEDDINGS, &text).await;
    assert_eq!(body["status"], "ready");
    assert_eq!(body["versions"][0]["backend"], "candle");
    let reply = t
        .client
        .post(
            "/v1/embeddings",
            json!({ "model": "minilm", "input": ["hello", "world"] }).to_string(),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["data"].as_array().unwrap().len(), 2);
    t.stop().await;
}

/// The little-endian f32s of a binary tensor.
fn f32s(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_v2_over_http_is_complete() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_spec("minilm", ""))
        .await;

    // Server health and metadata.
    assert_eq!(c.get("/v2/health/live").await.json()["live"], true);
    assert_eq!(c.get("/v2/health/ready").await.json()["ready"], true);
    let server = c.get("/v2").await.json();
    assert_eq!(server["name"], "wasp");
    assert!(
        server["extensions"]
            .to_string()
            .contains("binary_tensor_data")
    );

    // Model metadata from the backend; the versions form of every model route.
    let meta = c.get("/v2/models/minilm").await.json();
    assert_eq!(meta["name"], "minilm");
    assert_eq!(meta["versions"], json!(["v1"]));
    assert_eq!(meta["platform"], "wasp_candle");
    assert_eq!(
        meta["inputs"][0],
        json!({"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]})
    );
    assert_eq!(meta["inputs"][1]["optional"], true);
    assert_eq!(
        meta["outputs"][0],
        json!({"name": "last_hidden_state", "datatype": "FP32", "shape": [-1, -1, 384]})
    );
    assert_eq!(
        c.get("/v2/models/minilm/versions/v1").await.json()["versions"],
        json!(["v1"])
    );
    assert_eq!(
        c.get("/v2/models/minilm/versions/v1/ready").await.status,
        200
    );
    let nope = c.get("/v2/models/minilm/versions/v9/ready").await;
    assert_eq!(nope.status, 404);
    assert!(
        nope.json()["error"]
            .as_str()
            .unwrap()
            .contains("no version `v9`")
    );

    // Binary tensors in, binary output out: the same numbers as JSON.
    let header = json!({ "id": "b1", "inputs": [
        { "name": "input_ids", "shape": [1, 3], "datatype": "INT64", "parameters": {"binary_data_size": 24} },
    ], "outputs": [{ "name": "last_hidden_state", "parameters": {"binary_data": true} }] })
    .to_string();
    let mut body = header.clone().into_bytes();
    for id in [101i64, 7592, 102] {
        body.extend_from_slice(&id.to_le_bytes());
    }
    let length = header.len().to_string();
    let binary = c
        .request_with(
            "POST",
            "/v2/models/minilm/versions/v1/infer",
            &[
                ("inference-header-content-length", &length),
                ("content-type", "application/octet-stream"),
            ],
            body,
        )
        .await;
    assert_eq!(binary.status, 200, "{}", binary.text());
    let n: usize = binary
        .header("inference-header-content-length")
        .unwrap()
        .parse()
        .unwrap();
    let head: Value = serde_json::from_slice(&binary.body[..n]).unwrap();
    assert_eq!(head["id"], "b1");
    assert_eq!(
        head["outputs"][0]["parameters"]["binary_data_size"],
        3 * 384 * 4
    );
    let from_binary = f32s(&binary.body[n..]);
    let as_json = c
        .post(
            "/v2/models/minilm/infer",
            json!({ "inputs": [
                { "name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [101, 7592, 102] }
            ]})
            .to_string(),
        )
        .await
        .json();
    // The same f32s (JSON carries them as decimals; compare as f32).
    let as_f32 = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<_>>();
    let json_values = floats(&as_json["outputs"][0]["data"]);
    assert!(
        as_f32(&from_binary) == as_f32(&json_values),
        "binary and JSON outputs differ ({} and {} values)",
        from_binary.len(),
        json_values.len()
    );

    // Text through the processor gives the vectors of /v1/embeddings.
    let texts = ["The cat sat on the mat.", "KServe clients send tensors."];
    let via_kserve = c
        .post(
            "/v2/models/minilm/infer",
            json!({ "id": "t1", "inputs": [{ "name": "text", "shape": [2], "datatype": "BYTES", "data": texts }] })
                .to_string(),
        )
        .await;
    assert_eq!(via_kserve.status, 200, "{}", via_kserve.text());
    let via_kserve = via_kserve.json();
    assert_eq!(via_kserve["id"], "t1");
    assert_eq!(via_kserve["model_version"], "v1");
    assert_eq!(via_kserve["outputs"][0]["name"], "embeddings");
    assert_eq!(via_kserve["outputs"][0]["shape"], json!([2, 384]));
    let openai = c
        .post(
            "/v1/embeddings",
            json!({ "model": "minilm", "input": texts }).to_string(),
        )
        .await
        .json();
    let flat = floats(&via_kserve["outputs"][0]["data"]);
    for (i, row) in flat.chunks(384).enumerate() {
        let other = floats(&openai["data"][i]["embedding"]);
        assert!(cosine(row, &other) > 0.99999, "row {i}");
    }
    // The same text as binary BYTES, with the output in binary.
    let header = json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES",
        "parameters": {"binary_data_size": 4 + texts[0].len()} }],
        "parameters": {"binary_data_output": true} })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&(texts[0].len() as u32).to_le_bytes());
    body.extend_from_slice(texts[0].as_bytes());
    let length = header.len().to_string();
    let binary = c
        .request_with(
            "POST",
            "/v2/models/minilm/infer",
            &[("inference-header-content-length", &length)],
            body,
        )
        .await;
    assert_eq!(binary.status, 200, "{}", binary.text());
    let n: usize = binary
        .header("inference-header-content-length")
        .unwrap()
        .parse()
        .unwrap();
    assert!(cosine(&f32s(&binary.body[n..]), &flat[..384]) > 0.99999);

    // Protocol errors, each a message that names what is wrong.
    for (path, body, status, says) in [
        (
            "/v2/models/nope/infer",
            json!({"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]}),
            404,
            "nope",
        ),
        (
            "/v2/models/minilm/infer",
            json!({"inputs": [{"name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [1, 2]}]}),
            400,
            "inputs[0].data",
        ),
        (
            "/v2/models/minilm/infer",
            json!({"inputs": [{"name": "input_ids", "shape": [1], "datatype": "INT65", "data": [1]}]}),
            400,
            "INT65",
        ),
        (
            "/v2/models/minilm/infer",
            json!({"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [101]}], "outputs": [{"name": "pooled"}]}),
            400,
            "no output `pooled`",
        ),
        (
            "/v2/models/minilm/infer",
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [""]}]}),
            400,
            "empty",
        ),
    ] {
        let reply = c.post(path, body.to_string()).await;
        assert_eq!(reply.status, status, "{path}: {}", reply.text());
        let error = reply.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(error.contains(says), "{path}: {error}");
    }
    let unauthenticated = c.as_key(None).get("/v2/models/minilm").await;
    assert_eq!(unauthenticated.status, 401);
    assert!(unauthenticated.json()["error"].is_string());
    t.stop().await;
}
