//! The processors in `processors/` and `examples/`, served with backend `none`.

use wasp_tests::guests::{ALL, HELLO_HTTP, PII_REDACT, TEXT_CHUNKER};
use wasp_tests::{TestServer, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pii_redact_redacts() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(PII_REDACT, &spec("redact", "")).await;
    let reply = c
        .invoke(
            "redact",
            "",
            r#"{"text":"mail ann@example.org, card 4111-1111-1111-1111"}"#,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["text"], "mail [EMAIL], card [CARD]");
    assert_eq!(body["findings"][0]["kind"], "email");
    assert_eq!(body["findings"][0]["start"], 5);

    let batch = c
        .invoke(
            "redact",
            "",
            r#"{"texts":["ip 10.0.0.1","none"],"kinds":["ipv4"]}"#,
        )
        .await
        .json();
    assert_eq!(batch["results"][0]["text"], "ip [IPV4]");
    assert_eq!(batch["results"][1]["findings"], serde_json::json!([]));

    let bad_kind = c
        .invoke("redact", "", r#"{"text":"x","kinds":["ssn"]}"#)
        .await;
    assert_eq!(bad_kind.status, 400);
    assert_eq!(bad_kind.json()["error"]["field"], "kinds");

    c.deploy_ok(
        PII_REDACT,
        &spec(
            "masked",
            "[versions.processor.env]\nREDACT_KINDS = \"email\"\nREDACT_MASK = \"<{KIND}>\"",
        ),
    )
    .await;
    let masked = c
        .invoke("masked", "", r#"{"text":"a@b.io 10.0.0.1"}"#)
        .await
        .json();
    assert_eq!(masked["text"], "<EMAIL> 10.0.0.1");

    let broken = c
        .deploy(
            PII_REDACT,
            &spec("broken", "[versions.processor.env]\nREDACT_KINDS = \"ssn\""),
        )
        .await;
    assert_eq!(broken.status, 422);
    assert!(
        broken.text().contains("REDACT_KINDS: unknown kind `ssn`"),
        "{}",
        broken.text()
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_chunker_chunks() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(
        TEXT_CHUNKER,
        &spec(
            "chunks",
            "[versions.processor.env]\nCHUNK_MAX_CHARS = \"40\"\nCHUNK_OVERLAP = \"0\"",
        ),
    )
    .await;
    let text = "First sentence is here. Second one follows it. Third closes.";
    let reply = c
        .invoke(
            "chunks",
            "",
            serde_json::json!({ "text": text }).to_string(),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let chunks = reply.json()["chunks"].as_array().unwrap().clone();
    assert_eq!(chunks[0]["text"], "First sentence is here.");
    assert_eq!(chunks[1]["text"], "Second one follows it. Third closes.");
    let overlap = c
        .invoke(
            "chunks",
            "",
            serde_json::json!({ "text": text, "max_chars": 10, "overlap": 10 }).to_string(),
        )
        .await;
    assert_eq!(overlap.status, 400);
    assert_eq!(overlap.json()["error"]["field"], "overlap");
    t.stop().await;
}

/// A component that is not a wasp processor (a plain `wasi:http/proxy` one, the isolation
/// benchmark's peer handler) is refused at deploy, saying what it lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_that_is_not_a_processor_is_refused_at_deploy() {
    let t = TestServer::start().await;
    let reply = t.client.deploy(HELLO_HTTP, &spec("http", "")).await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "invalid_component");
    assert!(reply.text().contains("wasi:http"), "{}", reply.text());
    t.stop().await;
}

/// Every guest built by build.rs is used by some test file.
#[test]
fn every_guest_has_a_test() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");
    let sources: String = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    for (name, _) in ALL {
        let used = sources.match_indices(name).count();
        // The `use` line plus at least one call.
        assert!(used >= 2, "guest {name} has no test in tests/tests/");
    }
}

/// The example specs parse, validate and deploy (with the test build of their component).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_specs_deploy() {
    use wasp_tests::guests::HELLO;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let t = TestServer::start().await;
    for (file, wasm, component) in [
        (
            "examples/hello/endpoint.toml",
            HELLO,
            "../../target/processors/hello.wasm",
        ),
        (
            "examples/pii-redact.toml",
            PII_REDACT,
            "../target/processors/pii_redact.wasm",
        ),
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        assert!(text.contains(component), "{file} names {component}");
        let body = t
            .client
            .deploy_ok(wasm, &text.replace(component, "{COMPONENT}"))
            .await;
        assert_eq!(body["status"], "ready", "{file}");
    }
    let hello = t.client.invoke("hello", "", r#"{"name":"wasp"}"#).await;
    assert_eq!(hello.json()["greeting"], "hello, wasp!");
    t.stop().await;
}
