//! KServe v2 (Open Inference Protocol) conformance with the official Triton clients
//! (PyPI `tritonclient[http,grpc]`, installed by `scripts/toolchain triton`) as real
//! clients, against a live server with the MiniLM endpoint (and, over gRPC, a SmolLM2
//! generation endpoint), over HTTP and gRPC: the checks are in
//! `tests/conformance/kserve.py` and `tests/conformance/kserve_grpc.py`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use wasp_tests::guests::{CHAT, TEXT_EMBEDDINGS};
use wasp_tests::{TestServer, minilm_spec, smollm2_spec};

/// Runs a conformance script with `args`, and reads the JSON report it prints.
async fn conformance(script: &str, args: Vec<String>) -> Value {
    let root = wasp_tests::process::root();
    let python = root.join("target/tools/triton/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `scripts/toolchain triton` (./x test does)",
        python.display()
    );
    let script = root.join("tests/conformance").join(script);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    println!("{report:#}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_triton_clients_find_a_conforming_server_over_http_and_grpc() {
    let mut t = TestServer::start().await;
    t.client
        .deploy_ok(TEXT_EMBEDDINGS, &minilm_spec("minilm", ""))
        .await;
    t.client.deploy_ok(CHAT, &smollm2_spec("smol", 2)).await;
    let grpc = t.serve_grpc().await;
    let address = t.server.local_addr().to_string();
    let key = t.client.key().unwrap().to_owned();

    let report = conformance("kserve.py", vec![address.clone(), key.clone()]).await;
    assert_eq!(
        report["metadata_inputs"],
        serde_json::json!(["attention_mask", "input_ids", "token_type_ids"])
    );
    assert_eq!(report["errors"].as_object().unwrap().len(), 8, "{report:#}");

    let report = conformance(
        "kserve_grpc.py",
        vec![address, grpc.to_string(), key, "smol".into()],
    )
    .await;
    assert_eq!(
        report["metadata_inputs"],
        serde_json::json!(["attention_mask", "input_ids", "token_type_ids"])
    );
    assert_eq!(report["errors"].as_object().unwrap().len(), 9, "{report:#}");
    let unserved = report["errors"]["not served"].as_str().unwrap();
    assert!(unserved.contains("ModelMetadata"), "{unserved}");
    // Text generation streamed on a decoupled stream, token by token.
    let generation = &report["generation"];
    assert!(generation["responses"].as_u64().unwrap() >= 4, "{report:#}");
    assert!(
        !generation["text"].as_str().unwrap().is_empty(),
        "{report:#}"
    );

    grpc_has_the_http_apis_keys_and_tenancy(&t, grpc).await;
    kserve_requests_are_recorded(&t, grpc).await;
    t.stop().await;
}

/// KServe requests are request records like any data route's: tensors as they came (a
/// binary body in base64), text as the processor saw it, and gRPC calls as their HTTP form.
async fn kserve_requests_are_recorded(t: &TestServer, grpc: std::net::SocketAddr) {
    use wasp_grpc::proto::ModelInferRequest;
    use wasp_grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
    use wasp_grpc::proto::model_infer_request::InferInputTensor;

    let c = &t.client;
    let spec = format!(
        "{}[records]\nmax_body_bytes = 65536\n",
        minilm_spec("rec", "")
    );
    c.deploy_ok(TEXT_EMBEDDINGS, &spec).await;
    let ids = serde_json::json!({"inputs": [{"name": "input_ids", "shape": [1, 3],
        "datatype": "INT64", "data": [101, 7592, 102]}]});
    let tensors = c.post_json("/v2/models/rec/infer", &ids).await;
    assert_eq!(tensors.status, 200, "{}", tensors.text());
    let text = serde_json::json!({"inputs": [{"name": "text", "shape": [1],
        "datatype": "BYTES", "data": ["hello"]}]});
    let embedded = c.post_json("/v2/models/rec/infer", &text).await;
    assert_eq!(embedded.status, 200, "{}", embedded.text());
    let empty = serde_json::json!({"inputs": [{"name": "text", "shape": [1],
        "datatype": "BYTES", "data": [""]}]});
    let refused = c.post_json("/v2/models/rec/infer", &empty).await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let ids: Vec<u8> = [101i64, 7592, 102]
        .iter()
        .flat_map(|i| i.to_le_bytes())
        .collect();
    let message = ModelInferRequest {
        model_name: "rec".into(),
        inputs: vec![InferInputTensor {
            name: "input_ids".into(),
            datatype: "INT64".into(),
            shape: vec![1, 3],
            ..Default::default()
        }],
        raw_input_contents: vec![ids.into()],
        ..Default::default()
    };
    let key = c.key().unwrap().to_owned();
    client.model_infer(call(message, &key, None)).await.unwrap();

    let records = c.records("rec", 4).await;
    let statuses: Vec<u64> = records
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![200, 200, 400, 200], "{records:#?}");
    for r in &records {
        assert_eq!(r["path"], "/v2/models/rec/infer", "{r:#}");
        assert!(
            !r["headers"]
                .to_string()
                .to_lowercase()
                .contains("authorization"),
            "{r:#}"
        );
    }
    assert!(records[0]["body"].as_str().unwrap().contains("input_ids"));
    assert!(
        records[1]["response_body"]
            .as_str()
            .unwrap()
            .contains("embeddings")
    );
    // The gRPC call, as the binary form it was sent in.
    assert!(records[3]["body_base64"].is_string(), "{:#}", records[3]);
    assert!(
        records[3]["response_body_base64"].is_string(),
        "{:#}",
        records[3]
    );
}

/// A gRPC call with `key` (and a tenant to act in).
fn call<T>(message: T, key: &str, tenant: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    if let Some(tenant) = tenant {
        request
            .metadata_mut()
            .insert("x-wasp-tenant", tenant.parse().unwrap());
    }
    request
}

/// gRPC calls are the HTTP API's requests: the same keys, roles and tenancy, and the
/// request id back as metadata.
async fn grpc_has_the_http_apis_keys_and_tenancy(t: &TestServer, grpc: std::net::SocketAddr) {
    use wasp_grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
    use wasp_grpc::proto::{ModelInferRequest, ModelMetadataRequest, ModelReadyRequest};

    let made = t
        .client
        .post_json("/api/v1/tenants", &serde_json::json!({ "name": "bravo" }))
        .await;
    assert_eq!(made.status, 201, "{}", made.text());
    let bravo = t.client.make_key("bravo", "admin").await;
    let operator = t.client.key().unwrap().to_owned();
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let metadata = |name: &str| ModelMetadataRequest {
        name: name.into(),
        version: String::new(),
    };

    let answer = client
        .model_metadata(call(metadata("minilm"), &operator, None))
        .await
        .unwrap();
    assert!(answer.metadata().get("x-request-id").is_some());
    assert_eq!(answer.into_inner().versions, vec!["v1"]);

    // Another tenant's key cannot tell the model exists, nor use it.
    let ready = client
        .model_ready(call(
            ModelReadyRequest {
                name: "minilm".into(),
                version: String::new(),
            },
            &bravo,
            None,
        ))
        .await
        .unwrap();
    assert!(!ready.into_inner().ready);
    let hidden = client
        .model_metadata(call(metadata("minilm"), &bravo, None))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), tonic::Code::NotFound, "{hidden:?}");
    let refused = client
        .model_infer(call(
            ModelInferRequest {
                model_name: "minilm".into(),
                ..Default::default()
            },
            &bravo,
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    // The operator acting in that tenant does not see it either.
    let elsewhere = client
        .model_metadata(call(metadata("minilm"), &operator, Some("bravo")))
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), tonic::Code::NotFound, "{elsewhere:?}");
    let forged = client
        .model_metadata(call(metadata("minilm"), "wasp_not-a-key", None))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), tonic::Code::Unauthenticated, "{forged:?}");
}
