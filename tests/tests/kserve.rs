//! KServe v2 (Open Inference Protocol) conformance with the official Triton clients
//! (PyPI `tritonclient`, installed by `scripts/toolchain triton`) as real clients, against
//! a live server with the MiniLM endpoint: the checks are in `tests/conformance/kserve.py`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use wasp_tests::guests::TEXT_EMBEDDINGS;
use wasp_tests::{TestServer, minilm_spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_triton_http_client_finds_a_conforming_server() {
    let root = wasp_tests::process::root();
    let python = root.join("target/tools/triton/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `scripts/toolchain triton` (./x test does)",
        python.display()
    );
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_spec("minilm", ""))
        .await;
    let address = t.server.local_addr().to_string();
    let key = c.key().unwrap().to_owned();
    let script = root.join("tests/conformance/kserve.py");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args([&address, &key])
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
    assert_eq!(
        report["metadata_inputs"],
        serde_json::json!(["attention_mask", "input_ids", "token_type_ids"])
    );
    assert_eq!(report["errors"].as_object().unwrap().len(), 8, "{report:#}");
    println!("{report:#}");
    t.stop().await;
}
