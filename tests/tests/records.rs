//! Request records against a real server on loopback: sampled requests and their answers
//! are saved without credentials, rotate, stay inside their tenant, and pin a version.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::json;
use wasp_tests::TestServer;
use wasp_tests::guests::HOSTILE;

/// Two versions that answer `/config` differently; v1 takes the traffic.
fn recorded(name: &str, records: &str) -> String {
    format!(
        "name = \"{name}\"\n{records}\n\
         [[versions]]\nname = \"v1\"\nweight = 100\n[versions.processor]\n\
         component = \"{{COMPONENT}}\"\nenv = {{ ANSWER = \"one\" }}\n\
         [[versions]]\nname = \"v2\"\nweight = 0\n[versions.processor]\n\
         component = \"{{COMPONENT}}\"\nenv = {{ ANSWER = \"two\" }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_requests_are_recorded_without_credentials_and_pinned_versions_answer() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HOSTILE, &recorded("rec", "[records]\nmax_body_bytes = 32"))
        .await;
    let config = c
        .request_with(
            "POST",
            "/endpoints/rec/invoke/config?x=1",
            &[("cookie", "session=secret"), ("x-trace", "t1")],
            "",
        )
        .await;
    assert_eq!(config.status, 200);
    assert_eq!(config.header("x-wasp-version"), Some("v1"));
    let long = "y".repeat(100);
    assert_eq!(c.invoke("rec", "/echo", long.clone()).await.status, 200);
    assert_eq!(c.invoke("rec", "/trap", "").await.status, 500);

    // A pinned version answers whatever its weight; an unknown one is named.
    let pinned = c
        .request_with(
            "POST",
            "/endpoints/rec/invoke/config",
            &[("x-wasp-version", "v2")],
            "",
        )
        .await;
    assert_eq!(pinned.header("x-wasp-version"), Some("v2"));
    assert!(pinned.text().contains("two"), "{}", pinned.text());
    let unknown = c
        .request_with(
            "POST",
            "/endpoints/rec/invoke/ok",
            &[("x-wasp-version", "v9")],
            "",
        )
        .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "version_not_found");

    let all = c.records("rec", 4).await;
    assert_eq!(all.len(), 4, "{all:#?}");
    let first = &all[0];
    assert_eq!(first["path"], "/config?x=1");
    assert_eq!(first["version"], "v1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["request_id"], config.header("x-request-id").unwrap());
    assert!(first["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(first["response_body"].as_str().unwrap().contains("one"));
    let names: Vec<&str> = first["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap())
        .collect();
    assert!(names.contains(&"x-trace"), "{names:?}");
    assert!(
        !names
            .iter()
            .any(|n| n.eq_ignore_ascii_case("cookie") || n.eq_ignore_ascii_case("authorization")),
        "{names:?}"
    );
    // Bodies are cut at the spec's size, and say so.
    let echo = &all[1];
    assert_eq!(echo["body"].as_str().unwrap().len(), 32);
    assert_eq!(echo["body_truncated"], true);
    assert_eq!(echo["response_body_truncated"], true);
    // Failures are recorded with the error the client got.
    assert_eq!(all[2]["status"], 500);
    assert!(
        all[2]["response_body"]
            .as_str()
            .unwrap()
            .contains("processor_trap")
    );
    assert_eq!(all[3]["version"], "v2");

    // Another tenant sees none of it.
    c.post_json("/api/v1/tenants", &json!({ "name": "bravo" }))
        .await;
    let key = c
        .post_json(
            "/api/v1/keys",
            &json!({ "tenant": "bravo", "role": "admin" }),
        )
        .await
        .json();
    let bravo = c.as_key(Some(key["key"].as_str().unwrap()));
    assert_eq!(bravo.get("/api/v1/endpoints/rec/records").await.status, 404);
    let files = c.get("/api/v1/endpoints/rec/records").await.json();
    let file = files["files"][0]["name"].as_str().unwrap().to_owned();
    assert_eq!(
        bravo
            .get(&format!("/api/v1/endpoints/rec/records/{file}"))
            .await
            .status,
        404
    );
    // A name that is not a records file is not read.
    assert_eq!(
        c.get("/api/v1/endpoints/rec/records/..%2F..%2Fwasp.redb")
            .await
            .status,
        404
    );

    // Sampling: 1% of 200 requests is far fewer than all of them.
    c.deploy_ok(HOSTILE, &recorded("few", "[records]\nsample_percent = 1"))
        .await;
    for _ in 0..200 {
        c.invoke("few", "/ok", "").await;
    }
    c.invoke("rec", "/ok", "").await;
    c.records("rec", 5).await;
    let few = c.records("few", 0).await;
    assert!(few.len() < 20, "{}", few.len());

    // Removing the endpoint removes its records.
    let dir = t.data_dir.join("records").join("rec");
    assert!(dir.is_dir());
    assert_eq!(
        c.request("DELETE", "/api/v1/endpoints/rec", "")
            .await
            .status,
        204
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dir.exists() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.stop().await;
}
