//! Endpoints survive a restart, and a restart does not recompile components.

use wasp_tests::guests::HELLO;
use wasp_tests::{TestServer, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_survive_restart_without_recompiling() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestServer::start_in(dir.path()).await;
    let body = first.client.deploy_ok(HELLO, &spec("kept", "")).await;
    assert_eq!(body["versions"][0]["compiled_from_cache"], false);
    first.client.deploy_ok(HELLO, &spec("paused", "")).await;
    assert_eq!(
        first
            .client
            .post("/api/v1/endpoints/paused/stop", "")
            .await
            .status,
        200
    );
    first.stop().await;

    let second = TestServer::start_in(dir.path()).await;
    let c = &second.client;
    let reply = c.invoke("kept", "", r#"{"name":"again"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["greeting"], "hello, again!");
    let status = c.get("/api/v1/endpoints/kept").await.json();
    assert_eq!(status["status"], "ready");
    assert_eq!(status["versions"][0]["compiled_from_cache"], true);
    assert_eq!(
        c.get("/api/v1/endpoints/paused").await.json()["status"],
        "stopped"
    );
    let metrics = c.get("/metrics").await.text();
    assert!(
        metrics.contains("wasp_component_compiles_total 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wasp_component_cache_hits_total 2"),
        "{metrics}"
    );
    second.stop().await;
}
