//! The control API and the data route, against a real server on loopback.

use wasp_tests::guests::{HELLO, HOSTILE};
use wasp_tests::{TestServer, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_invoke_list_status_remove() {
    let t = TestServer::start().await;
    let c = &t.client;
    let created = c.deploy(HELLO, &spec("hello", "")).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let body = created.json();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["url"], "/endpoints/hello/invoke");
    assert_eq!(
        body["versions"][0]["instances"]["idle"], 1,
        "min_workers = 1 instance is warm"
    );

    let reply = c.invoke("hello", "", r#"{"name":"wasp"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["greeting"], "hello, wasp!");
    assert_eq!(reply.header("x-wasp-version"), Some("v1"));
    assert_eq!(reply.header("content-type"), Some("application/json"));

    let list = c.get("/api/v1/endpoints").await.json();
    assert_eq!(list["endpoints"][0]["name"], "hello");
    assert_eq!(list["endpoints"][0]["status"], "ready");

    // Re-deploying with PUT replaces (200); POST of an existing name conflicts.
    let again = c
        .deploy(
            HELLO,
            &spec("hello", "[versions.processor.env]\nGREETING = \"hi\""),
        )
        .await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(
        c.invoke("hello", "", r#"{"name":"x"}"#).await.json()["greeting"],
        "hi, x!"
    );
    let digest = c.upload(HELLO).await;
    let conflict = c
        .post(
            "/api/v1/endpoints",
            spec("hello", "").replace("{COMPONENT}", &digest),
        )
        .await;
    assert_eq!(conflict.status, 409, "{}", conflict.text());

    let removed = c.request("DELETE", "/api/v1/endpoints/hello", "").await;
    assert_eq!(removed.status, 204);
    let gone = c.invoke("hello", "", r#"{"name":"x"}"#).await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["error"]["code"], "endpoint_not_found");
    assert_eq!(
        c.request("DELETE", "/api/v1/endpoints/hello", "")
            .await
            .status,
        404
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_get_clear_errors() {
    let t = TestServer::start().await;
    let c = &t.client;
    let digest = c.upload(HELLO).await;
    let post = |body: String| {
        let c = c.clone();
        async move { c.post("/api/v1/endpoints", body).await }
    };

    let malformed = post("name = \"x\"\n[[versions]\n".into()).await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.json()["error"]["code"], "invalid_spec");

    let typo = post(spec("x", "wieght = 100").replace("{COMPONENT}", &digest)).await;
    assert_eq!(typo.status, 400);
    assert!(
        typo.text().contains("unknown field `wieght`"),
        "{}",
        typo.text()
    );

    let long = "n".repeat(129);
    let too_long = post(spec(&long, "").replace("{COMPONENT}", &digest)).await;
    assert_eq!(too_long.status, 422);
    assert_eq!(too_long.json()["error"]["field"], "name");

    // A container the server's driver cannot run: the test server runs containers as
    // processes, which need a command (a server with no container driver refuses the kind
    // itself: runtime/cli/tests/containers_crash.rs).
    let container = post(
        spec(
            "x",
            "backend = { kind = \"container\", image = \"srv:1\", port = 8000 }",
        )
        .replace("{COMPONENT}", &digest),
    )
    .await;
    assert_eq!(container.status, 422, "{}", container.text());
    assert_eq!(
        container.json()["error"]["field"],
        "versions[0].backend.command"
    );
    assert!(
        container.text().contains("container engine"),
        "{}",
        container.text()
    );
    // A registered backend whose model is missing.
    let candle = post(
        spec(
            "x",
            "backend = { kind = \"candle\", model = \"m\", task = \"embeddings\" }",
        )
        .replace("{COMPONENT}", &digest),
    )
    .await;
    assert_eq!(candle.status, 422, "{}", candle.text());
    assert!(candle.text().contains("no model `m`"), "{}", candle.text());

    let path = post(spec("x", "").replace("{COMPONENT}", "hello.wasm")).await;
    assert_eq!(path.status, 422);
    assert_eq!(
        path.json()["error"]["field"],
        "versions[0].processor.component"
    );

    let unknown =
        post(spec("x", "").replace("{COMPONENT}", &format!("sha256:{}", "0".repeat(64)))).await;
    assert_eq!(unknown.status, 422);
    assert!(unknown.text().contains("upload it"), "{}", unknown.text());

    let not_wasm = c
        .request("PUT", "/api/v1/components", "definitely not wasm")
        .await
        .json();
    let bad_component =
        post(spec("x", "").replace("{COMPONENT}", not_wasm["digest"].as_str().unwrap())).await;
    assert_eq!(bad_component.status, 422);
    assert_eq!(bad_component.json()["error"]["code"], "invalid_component");

    let json_spec = c
        .request_with(
            "POST",
            "/api/v1/endpoints",
            &[("content-type", "application/json")],
            "{\"name\": 3}",
        )
        .await;
    assert_eq!(json_spec.status, 400);

    let url_mismatch = c
        .request(
            "PUT",
            "/api/v1/endpoints/other",
            spec("x", "").replace("{COMPONENT}", &digest),
        )
        .await;
    assert_eq!(url_mismatch.status, 422);
    assert_eq!(url_mismatch.json()["error"]["field"], "name");

    assert_eq!(c.get("/nope").await.status, 404);
    assert_eq!(
        c.request("PATCH", "/api/v1/endpoints", "").await.status,
        405
    );
    assert!(
        c.get("/api/v1/endpoints").await.json()["endpoints"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(
        HELLO,
        &spec("hello", "[versions.limits]\nmax_body_bytes = 64"),
    )
    .await;

    let malformed = c.invoke("hello", "", "{not json").await;
    assert_eq!(malformed.status, 400);
    assert!(
        malformed.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );

    let empty_name = c.invoke("hello", "", r#"{"name":""}"#).await;
    assert_eq!(empty_name.status, 422);
    assert_eq!(empty_name.json()["error"]["field"], "name");

    let big = c.invoke("hello", "", vec![b' '; 65]).await;
    assert_eq!(big.status, 413);
    assert_eq!(big.json()["error"]["field"], "limits.max_body_bytes");
    // Nothing was lost: the endpoint still answers.
    assert_eq!(c.invoke("hello", "", r#"{"name":"a"}"#).await.status, 200);

    // Names are UTF-8 and travel percent-encoded.
    c.deploy_ok(HELLO, &spec("grüße 👋", "")).await;
    let utf8 = c.invoke("grüße 👋", "", r#"{"name":"ü"}"#).await;
    assert_eq!(utf8.status, 200, "{}", utf8.text());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_is_split_by_weight() {
    let t = TestServer::start().await;
    let c = &t.client;
    let digest = c.upload(HELLO).await;
    let text = format!(
        r#"name = "split"
[[versions]]
name = "blue"
weight = 80
processor = {{ component = "{digest}", env = {{ GREETING = "blue" }} }}
[[versions]]
name = "green"
weight = 20
processor = {{ component = "{digest}", env = {{ GREETING = "green" }} }}
"#
    );
    assert_eq!(c.post("/api/v1/endpoints", text).await.status, 201);
    let mut green = 0;
    for _ in 0..400 {
        let reply = c.invoke("split", "", r#"{"name":"n"}"#).await;
        let version = reply.header("x-wasp-version").unwrap().to_owned();
        let greeting = reply.json()["greeting"].as_str().unwrap().to_owned();
        assert!(
            greeting.starts_with(&version),
            "{version} answered {greeting}"
        );
        if version == "green" {
            green += 1;
        }
    }
    // 20% of 400 = 80; 5 standard deviations is ±40.
    assert!((40..=120).contains(&green), "green got {green} of 400");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_start_keep_the_spec_and_url() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HELLO, &spec("pausable", "")).await;
    let stopped = c.post("/api/v1/endpoints/pausable/stop", "").await.json();
    assert_eq!(stopped["status"], "stopped");
    assert_eq!(
        stopped["versions"][0]["instances"]["idle"], 0,
        "a stopped endpoint holds no instances"
    );
    let refused = c.invoke("pausable", "", r#"{"name":"a"}"#).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"]["code"], "endpoint_stopped");
    let started = c.post("/api/v1/endpoints/pausable/start", "").await.json();
    assert_eq!(started["status"], "ready");
    assert_eq!(started["url"], "/endpoints/pausable/invoke");
    assert_eq!(
        c.invoke("pausable", "", r#"{"name":"a"}"#).await.status,
        200
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_logs() {
    let t = TestServer::start().await;
    let c = &t.client;
    assert_eq!(c.get("/healthz").await.status, 200);
    c.deploy_ok(HOSTILE, &spec("h", "")).await;
    assert_eq!(c.invoke("h", "/log", "quietly").await.status, 200);
    assert_eq!(c.invoke("h", "/nope", "").await.status, 404);

    let logs = c.get("/api/v1/endpoints/h/logs?limit=10").await.json();
    let record = &logs["logs"][0];
    assert_eq!(record["message"], "hostile says quietly");
    assert_eq!(record["level"], "warn");
    assert_eq!(record["version"], "v1");
    assert_eq!(c.get("/api/v1/endpoints/h/logs?limit=x").await.status, 400);

    let metrics = c.get("/metrics").await.text();
    for needle in [
        r#"wasp_requests_total{endpoint="h",version="v1",code="200"} 1"#,
        r#"wasp_requests_total{endpoint="h",version="v1",code="404"} 1"#,
        r#"wasp_processor_failures_total{endpoint="h",version="v1",kind="processor_error"} 1"#,
        r#"wasp_processor_instances{endpoint="h",version="v1",state="idle"} 1"#,
        "wasp_request_duration_seconds_bucket",
        "wasp_component_compiles_total 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processor_sees_the_request_and_shapes_the_response() {
    let t = TestServer::start().await;
    let c = &t.client;
    // A name that starts like the route's own `invoke` segment.
    c.deploy_ok(HOSTILE, &spec("invoker", "")).await;
    let bearer = format!("Bearer {}", wasp_tests::operator_key(&t.data_dir));
    let seen = c
        .request_with(
            "PUT",
            "/endpoints/invoker/invoke/request?x=1&y=2",
            &[("authorization", bearer.as_str()), ("x-trace", "t1")],
            "",
        )
        .await
        .json();
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["path"], "/request?x=1&y=2");
    let headers: Vec<&str> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert!(headers.contains(&"x-trace"), "{headers:?}");
    assert!(
        !headers.contains(&"authorization"),
        "credentials must not reach processors"
    );

    let teapot = c.invoke("invoker", "/status", "").await;
    assert_eq!(teapot.status, 418);
    assert_eq!(teapot.header("x-custom"), Some("yes"));
    assert_eq!(teapot.text(), "teapot");

    let bad = c.invoke("invoker", "/bad-header", "").await;
    assert_eq!(bad.status, 502);
    assert_eq!(bad.json()["error"]["code"], "invalid_processor_response");

    // Statuses HTTP has no room for are a 502 that says why, never passed on.
    for status in ["600", "999", "99", "0"] {
        let bad = c.invoke("invoker", "/bad-status", status).await;
        assert_eq!(bad.status, 502, "status {status}");
        let error = &bad.json()["error"];
        assert_eq!(error["code"], "invalid_processor_response");
        assert!(
            error["message"].as_str().unwrap().contains(status),
            "{error}"
        );
    }
    assert_eq!(c.invoke("invoker", "/bad-status", "599").await.status, 599);
    // A header flood is a 502 on a connection that stays usable, not a dropped one.
    let flood = c.invoke("invoker", "/headers", "100000").await;
    assert_eq!(flood.status, 502);
    assert!(
        flood.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("100001 headers; the limit is 100"),
        "{}",
        flood.text()
    );
    assert_eq!(c.invoke("invoker", "/headers", "50").await.status, 200);
    assert_eq!(c.invoke("invoker", "/ok", "").await.status, 200);
    // A request with too many headers is refused with 431 before it reaches anything.
    let many: Vec<(String, String)> = (0..200).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let reply = c
        .try_request_with("POST", "/endpoints/invoker/invoke/ok", &many, "")
        .await;
    assert!(
        reply.as_ref().is_ok_and(|r| r.status == 431),
        "{:?}",
        reply.map(|r| r.status)
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_at_ui_compressed_and_kept_to_its_origin() {
    let t = TestServer::start().await;
    let c = t.client.as_key(None);
    let moved = c.get("/ui").await;
    assert_eq!(moved.status, 308);
    assert_eq!(moved.header("location"), Some("/ui/"));
    let page = c
        .request_with("GET", "/ui/", &[("accept-encoding", "gzip, br")], "")
        .await;
    if !wasp_console::BUILT {
        // A checkout that never ran `./x build`: a clear answer, no page.
        assert_eq!(page.status, 404);
        assert_eq!(page.json()["error"]["code"], "console_not_built");
        return;
    }
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(page.header("content-encoding"), Some("gzip"));
    assert_eq!(page.header("cache-control"), Some("no-cache"));
    let policy = page.header("content-security-policy").unwrap();
    assert!(policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"));
    let index = wasp_console::asset("").unwrap();
    assert_eq!(page.body.as_ref(), index.gzip.unwrap());
    // Without gzip, the plain page; every asset it names is there, cached for good.
    let plain = c.get("/ui/").await;
    assert_eq!(plain.header("content-encoding"), None);
    let html = plain.text();
    let script = html
        .split('"')
        .find(|s| s.starts_with("app-") && s.ends_with(".js"))
        .unwrap();
    let js = c.get(&format!("/ui/{script}")).await;
    assert_eq!(js.status, 200);
    assert_eq!(
        js.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(
        js.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    let missing = c.get("/ui/../../Cargo.toml").await;
    assert_eq!(missing.status, 404);
    let missing = c.get("/ui/nothing.js").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "not_found");
    t.stop().await;
}
