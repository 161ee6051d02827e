//! Hostile guests fail only their own request; sandbox grants are what the spec says.

use std::time::{Duration, Instant};

use wasp_tests::guests::{HELLO, HOSTILE};
use wasp_tests::{TestServer, spec};

async fn assert_still_serving(c: &wasp_tests::TestClient) {
    assert_eq!(c.invoke("hostile", "/ok", "").await.text(), "ok");
    assert_eq!(
        c.invoke("hello", "", r#"{"name":"still here"}"#)
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guests_fail_only_their_own_request() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HELLO, &spec("hello", "")).await;
    c.deploy_ok(
        HOSTILE,
        &spec(
            "hostile",
            "[versions.limits]\ntimeout_ms = 300\nmemory_mib = 48",
        ),
    )
    .await;
    assert_still_serving(c).await;

    let trap = c.invoke("hostile", "/trap", "").await;
    assert_eq!(trap.status, 500);
    assert_eq!(trap.json()["error"]["code"], "processor_trap");
    assert_still_serving(c).await;

    let started = Instant::now();
    let spin = c.invoke("hostile", "/loop", "").await;
    assert_eq!(spin.status, 504);
    assert_eq!(spin.json()["error"]["code"], "processor_timeout");
    assert!(
        spin.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("300 ms")
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_still_serving(c).await;

    let stack = c.invoke("hostile", "/stack", "").await;
    assert_eq!(stack.status, 500);
    assert_eq!(stack.json()["error"]["code"], "processor_stack_overflow");
    assert_still_serving(c).await;

    let hog = c.invoke("hostile", "/alloc", "").await;
    assert_eq!(hog.status, 500);
    assert_eq!(
        hog.json()["error"]["code"],
        "processor_out_of_memory",
        "{}",
        hog.text()
    );
    assert!(hog.text().contains("48 MiB"));
    assert_still_serving(c).await;

    let status = c.get("/api/v1/endpoints/hostile").await.json();
    assert_eq!(status["versions"][0]["instances"]["lost"], 4);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_guest_does_not_stall_other_endpoints() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    c.deploy_ok(HELLO, &spec("hello", "")).await;
    c.deploy_ok(
        HOSTILE,
        &spec("hostile", "[versions.limits]\ntimeout_ms = 10000"),
    )
    .await;
    let spinner = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("hostile", "/loop", "").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Two loops at once would hold both worker threads if guests did not yield.
    let spinner2 = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("hostile", "/loop", "").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..10 {
        assert_eq!(c.invoke("hello", "", r#"{"name":"n"}"#).await.status, 200);
    }
    // Served while both guests still spin, not after their deadline freed the threads.
    assert!(
        !spinner.is_finished() && !spinner2.is_finished(),
        "hello was served only after the loops ended"
    );
    assert_eq!(spinner.await.unwrap().status, 504);
    assert_eq!(spinner2.await.unwrap().status, 504);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_instances_and_queue_answer_429_with_retry_after() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    c.deploy_ok(
        HOSTILE,
        &spec(
            "hostile",
            "[versions.limits]\ntimeout_ms = 1000\nmax_instances = 1\nmax_queue = 0",
        ),
    )
    .await;
    let busy = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("hostile", "/loop", "").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = c.invoke("hostile", "/ok", "").await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.json()["error"]["code"], "busy");
    assert_eq!(busy.await.unwrap().status, 504);
    assert_eq!(c.invoke("hostile", "/ok", "").await.status, 200);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_failure_fails_the_deploy() {
    let t = TestServer::start().await;
    let reply = t
        .client
        .deploy(
            HOSTILE,
            &spec("bad", "[versions.processor.env]\nFAIL_INIT = \"1\""),
        )
        .await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert!(
        reply.text().contains("init refused by FAIL_INIT"),
        "{}",
        reply.text()
    );
    assert_eq!(t.client.get("/api/v1/endpoints/bad").await.status, 404);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_see_only_what_the_spec_grants() {
    let t = TestServer::start().await;
    let c = &t.client;
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("note.txt"), "mounted").unwrap();
    let extra = format!(
        "[versions.processor.env]\nMODE = \"strict\"\nA = \"1\"\n[[versions.processor.mounts]]\nhost = {:?}\nguest = \"/data\"",
        shared.path().display().to_string()
    );
    c.deploy_ok(HOSTILE, &spec("hostile", &extra)).await;

    let config = c.invoke("hostile", "/config", "").await.json();
    assert_eq!(config, serde_json::json!([["A", "1"], ["MODE", "strict"]]));
    let env = c.invoke("hostile", "/env", "").await.json();
    assert_eq!(
        env,
        serde_json::json!([["A", "1"], ["MODE", "strict"]]),
        "host environment leaked"
    );

    assert_eq!(
        c.invoke("hostile", "/fs", "/data/note.txt").await.text(),
        "mounted"
    );
    let outside = c.invoke("hostile", "/fs", "/etc/passwd").await;
    assert_eq!(outside.status, 404, "{}", outside.text());
    let escape = c.invoke("hostile", "/fs", "/data/../../etc/passwd").await;
    assert_eq!(escape.status, 404, "{}", escape.text());

    // No network unless allowed: a listener on loopback is unreachable...
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let denied = c.invoke("hostile", "/net", addr.clone()).await;
    assert_eq!(denied.status, 422, "{}", denied.text());
    // ...and reachable once the spec allows that address.
    let spec_allowed = format!(
        "name = \"net\"\n[[versions]]\nname = \"v1\"\n[versions.processor]\ncomponent = \"{{COMPONENT}}\"\nallow_hosts = [\"{addr}\"]\n"
    );
    c.deploy_ok(HOSTILE, &spec_allowed).await;
    let ok = c.invoke("net", "/net", addr).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_import_names_the_missing_model() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HOSTILE, &spec("hostile", "")).await;
    let missing = c.invoke("hostile", "/infer", "no-such-model").await;
    assert_eq!(missing.status, 404);
    assert!(
        missing.text().contains("model not found: `no-such-model`"),
        "{}",
        missing.text()
    );
    let no_backend = c.invoke("hostile", "/infer", "hostile").await;
    assert_eq!(no_backend.status, 422);
    assert!(
        no_backend.text().contains("has no model backend"),
        "{}",
        no_backend.text()
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_isolation_gives_every_call_a_fresh_instance() {
    let t = TestServer::start().await;
    let c = &t.client;
    let counts = |name: &'static str| async move {
        let mut seen = Vec::new();
        for _ in 0..5 {
            let reply = c.invoke(name, "/count", "").await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            seen.push(reply.text().parse::<u64>().unwrap());
        }
        seen
    };
    // Pooled (the default): one instance remembers every call.
    c.deploy_ok(
        HOSTILE,
        &spec("pooled", "[versions.limits]\nmax_instances = 1"),
    )
    .await;
    assert_eq!(counts("pooled").await, [1, 2, 3, 4, 5]);
    // Per-request: nothing one call leaves in memory reaches the next.
    c.deploy_ok(
        HOSTILE,
        &spec("fresh", "[versions.limits]\nisolation = \"per-request\""),
    )
    .await;
    assert_eq!(counts("fresh").await, [1, 1, 1, 1, 1]);
    // Pooled with a bound: an instance is replaced after three calls.
    c.deploy_ok(
        HOSTILE,
        &spec(
            "bounded",
            "[versions.limits]\nmax_instances = 1\nmax_requests_per_instance = 3",
        ),
    )
    .await;
    assert_eq!(counts("bounded").await, [1, 2, 3, 1, 2]);
    let status = c.get("/api/v1/endpoints/fresh").await.json();
    assert!(
        status["versions"][0]["instances"]["retired"]
            .as_u64()
            .unwrap()
            >= 5,
        "{status}"
    );
    // The bound is for pooled instances only.
    let bad = c
        .deploy(
            HOSTILE,
            &spec(
                "both",
                "[versions.limits]\nisolation = \"per-request\"\nmax_requests_per_instance = 3",
            ),
        )
        .await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert_eq!(
        bad.json()["error"]["field"],
        "versions[0].limits.max_requests_per_instance"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_versions_cap_is_a_502() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(
        HOSTILE,
        &spec("capped", "[versions.limits]\nmax_response_bytes = 1024"),
    )
    .await;
    assert_eq!(
        c.invoke("capped", "/echo", vec![7u8; 1024]).await.status,
        200
    );
    let over = c.invoke("capped", "/echo", vec![7u8; 1025]).await;
    assert_eq!(over.status, 502, "{}", over.text());
    assert_eq!(over.json()["error"]["code"], "invalid_processor_response");
    assert!(
        over.text().contains("limits.max_response_bytes"),
        "{}",
        over.text()
    );
    t.stop().await;
}
