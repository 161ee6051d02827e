//! The container backend through the real server, with the `process` driver: a real KServe
//! v2 model server (tests/src/bin/model-server.rs, real all-MiniLM-L6-v2 weights) as each
//! worker's container. Readiness gating, liveness restarts, graceful exit under a rolling
//! update, and the errors of containers that exit or never become ready.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasp_tests::guests::{HOSTILE, TEXT_EMBEDDINGS};
use wasp_tests::{TestClient, TestServer, minilm_spec, model_server_spec};

const MODEL_SERVER: &str = env!("CARGO_BIN_EXE_model-server");

fn container_spec(name: &str, server_args: &str, backend: &str, extra: &str) -> String {
    model_server_spec(MODEL_SERVER, name, server_args, backend, extra)
}

async fn embed(c: &TestClient, model: &str, input: &Value) -> Vec<Vec<f64>> {
    let reply = c
        .post(
            "/v1/embeddings",
            json!({ "model": model, "input": input }).to_string(),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

/// The same embeddings, to rounding: 384 floats each, none off by 1e-5 or more.
fn assert_same_vectors(a: &[Vec<f64>], b: &[Vec<f64>]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), 384);
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "the vectors differ by {worst}");
    }
}

async fn logs(c: &TestClient, endpoint: &str) -> String {
    let body = c
        .get(&format!("/api/v1/endpoints/{endpoint}/logs?limit=1000"))
        .await
        .json();
    body["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"].as_str().unwrap_or_default().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

async fn until(what: &str, patience: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The container processes this server's process driver has on record.
fn recorded(t: &TestServer) -> usize {
    std::fs::read_dir(t.data_dir.join("containers"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "json")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_model_answers_what_the_candle_backend_answers() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_spec("native", ""))
        .await;
    let started = Instant::now();
    // Readiness gates the worker: the model server says ready only after 1.5 s.
    let body = c
        .deploy_ok(
            TEXT_EMBEDDINGS,
            &container_spec("boxed", "--ready-after-ms 1500", "", ""),
        )
        .await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "ready before the probe passed"
    );
    assert_eq!(body["versions"][0]["backend"], "container");
    let status = c.get("/api/v1/endpoints/boxed").await.json();
    assert_eq!(status["status"], "ready", "{status}");

    let input = json!([
        "The cat sat on the mat.",
        "WebAssembly components, café",
        "x"
    ]);
    let native = embed(c, "native", &input).await;
    let boxed = embed(c, "boxed", &input).await;
    assert_eq!(native.len(), 3);
    assert_same_vectors(&native, &boxed);
    // The container's output is in the endpoint's logs.
    assert!(
        logs(c, "boxed")
            .await
            .contains("model-server: listening on 127.0.0.1:")
    );

    // Deleting the endpoint stops its container: SIGTERM, a clean exit, no record left.
    assert_eq!(
        c.request("DELETE", "/api/v1/endpoints/boxed", "")
            .await
            .status,
        204
    );
    until("the container to go", Duration::from_secs(20), async || {
        recorded(&t) == 0
    })
    .await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_that_exit_or_never_get_ready_fail_with_their_last_lines() {
    let t = TestServer::start().await;
    let c = &t.client;
    let spec = |name: &str, command: &str, extra: &str| {
        format!(
            "name = \"{name}\"\n[[versions]]\nname = \"v1\"\n[versions.backend]\nkind = \
             \"container\"\nimage = \"x\"\nport = 8080\ncommand = {command:?}\n{extra}\n\
             [versions.processor]\ncomponent = \"{{COMPONENT}}\"\n"
        )
    };
    let reply = c
        .deploy(
            TEXT_EMBEDDINGS,
            &spec("quits", "echo starting; echo no GPU here >&2; exit 3", ""),
        )
        .await;
    let text = reply.text();
    assert!(reply.status >= 400, "{text}");
    assert!(text.contains("exit status 3"), "{text}");
    assert!(text.contains("no GPU here"), "{text}");

    let started = Instant::now();
    let reply = c
        .deploy(
            TEXT_EMBEDDINGS,
            &spec(
                "mute",
                "echo waiting forever; exec sleep 600",
                "start_timeout_s = 2",
            ),
        )
        .await;
    let text = reply.text();
    assert!(reply.status >= 400, "{text}");
    assert!(text.contains("not ready after 2 s"), "{text}");
    assert!(text.contains("waiting forever"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // The sleeper was stopped, not left behind.
    until("the sleeper to go", Duration::from_secs(20), async || {
        recorded(&t) == 0
    })
    .await;

    // Bad specs: each a 422 naming the field.
    for (extra, field) in [
        ("port = 70000", "versions[0].backend.port"),
        (
            "volume = \"/etc\"\nmount_path = \"/data\"",
            "versions[0].backend.volume",
        ),
        (
            "volume = \"/tmp/x/../../etc\"\nmount_path = \"/data\"",
            "versions[0].backend.volume",
        ),
        ("pull = \"sometimes\"", "versions[0].backend.pull"),
        (
            "readiness = { path = \"health\" }",
            "versions[0].backend.readiness.path",
        ),
    ] {
        let body = spec("bad", "true", "").replace("port = 8080\n", "") + "";
        let body = body.replace(
            "[versions.processor]",
            &format!(
                "{}\n[versions.processor]",
                if extra.starts_with("port") {
                    extra.to_owned()
                } else {
                    format!("port = 8080\n{extra}")
                }
            ),
        );
        let reply = c.deploy(TEXT_EMBEDDINGS, &body).await;
        assert_eq!(reply.status, 422, "{extra}: {}", reply.text());
        assert_eq!(reply.json()["error"]["field"], field, "{}", reply.text());
    }
    // The process driver has no image entrypoint to run.
    let no_command = spec("bare", "true", "").replace("command = \"true\"\n", "");
    let reply = c.deploy(TEXT_EMBEDDINGS, &no_command).await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(
        reply.json()["error"]["field"],
        "versions[0].backend.command"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_failing_its_liveness_probe_is_restarted() {
    let t = TestServer::start().await;
    let c = &t.client;
    let liveness =
        "liveness = { path = \"/v2/health/live\", period_ms = 200, failure_threshold = 2 }";
    c.deploy_ok(TEXT_EMBEDDINGS, &container_spec("sick", "", liveness, ""))
        .await;
    let input = json!(["before"]);
    embed(c, "sick", &input).await;
    // Where the container listens, from its own log line.
    let log = logs(c, "sick").await;
    let port: u16 = log
        .split("listening on 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {log}"));
    let sick = TestClient::new(([127, 0, 0, 1], port).into());
    assert_eq!(sick.post("/admin/sick", "").await.status, 200);
    until("a restart", Duration::from_secs(30), async || {
        logs(c, "sick")
            .await
            .contains("the container is ready again")
    })
    .await;
    let log = logs(c, "sick").await;
    assert!(
        log.contains("the liveness probe failed 2 times in a row"),
        "{log}"
    );
    // The worker left `ready` with the reason while its container restarted, and came back:
    // both are events.
    until(
        "the worker to be ready again",
        Duration::from_secs(10),
        async || {
            let events = c.get("/api/v1/endpoints/sick/events").await.text();
            events.contains("worker_recovered")
        },
    )
    .await;
    let events = c.get("/api/v1/endpoints/sick/events").await.text();
    assert!(events.contains("worker_restarting"), "{events}");
    assert!(events.contains("the liveness probe failed"), "{events}");
    // A new process: it answers again.
    embed(c, "sick", &json!(["after"])).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_under_load_fails_no_request() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    c.deploy_ok(TEXT_EMBEDDINGS, &container_spec("rolling", "", "", ""))
        .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (c, stop) = (c.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = c
                    .post(
                        "/v1/embeddings",
                        json!({"model": "rolling", "input": ["steady"]}).to_string(),
                    )
                    .await;
                if reply.status == 200 {
                    ok += 1;
                } else {
                    failed.push(format!("{} {}", reply.status, reply.text()));
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A new version of the container (another environment): new workers start, the old
    // one drains and gets SIGTERM.
    c.deploy_ok(
        TEXT_EMBEDDINGS,
        &container_spec("rolling", "", "env = { GENERATION = \"2\" }", ""),
    )
    .await;
    until(
        "the old container to stop",
        Duration::from_secs(30),
        async || logs(&c, "rolling").await.contains("model-server: stopped"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for l in load {
        let (o, f) = l.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 10, "only {ok} requests");
    let log = logs(&c, "rolling").await;
    assert!(
        log.contains("SIGTERM, finishing the requests in flight"),
        "{log}"
    );
    t.stop().await;
}

/// This engine's containers labelled with `endpoint`.
fn engine_containers(socket: &str, endpoint: &str) -> usize {
    let filters = format!("{{\"label\":[\"wasp.endpoint={endpoint}\"]}}");
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-G",
            "--unix-socket",
            socket,
            "http://engine/v1.41/containers/json",
        ])
        .args(["--data-urlencode", "all=true", "--data-urlencode"])
        .arg(format!("filters={filters}"))
        .output()
        .unwrap();
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_real_engine_an_image_answers_what_candle_answers() {
    let Some(socket) = wasp_tests::test_engine("the container-engine tests") else {
        return;
    };
    let image = wasp_tests::model_server_image(MODEL_SERVER);
    let t = TestServer::start_with_engine(&socket).await;
    let c = &t.client;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_spec("native", ""))
        .await;
    let spec = |name: &str, image: &str| {
        wasp_tests::model_image_spec(
            name,
            image,
            "pull = \"never\"\nmemory_mib = 1024\ngrace_period_s = 10",
            "",
        )
    };
    c.deploy_ok(TEXT_EMBEDDINGS, &spec("imaged", &image)).await;
    let input = json!(["The cat sat on the mat.", "naïve résumé"]);
    let native = embed(c, "native", &input).await;
    let imaged = embed(c, "imaged", &input).await;
    assert_same_vectors(&native, &imaged);
    assert!(
        logs(c, "imaged")
            .await
            .contains("listening on 0.0.0.0:8080")
    );
    assert_eq!(engine_containers(&socket, "imaged"), 1);

    // The same image without a processor: requests reach it as they are.
    let raw = spec("imaged-raw", &image);
    c.deploy_ok(
        TEXT_EMBEDDINGS,
        raw.split("[versions.processor]").next().unwrap(),
    )
    .await;
    let echoed = c
        .post("/endpoints/imaged-raw/invoke/echo?via=engine", "as is")
        .await;
    assert_eq!(echoed.status, 201, "{}", echoed.text());
    assert_eq!(echoed.json()["path"], "/echo?via=engine");
    assert_eq!(echoed.json()["body"], "as is");

    // An image the engine does not have, with pull = never: a clear error naming it.
    let reply = c
        .deploy(
            TEXT_EMBEDDINGS,
            &spec("missing", "localhost/no-such-image:1"),
        )
        .await;
    let text = reply.text();
    assert!(reply.status >= 400, "{text}");
    assert!(text.contains("localhost/no-such-image:1"), "{text}");

    // From the loopback registry: pushed there, absent from the engine, pulled at deploy.
    let registry = std::net::TcpStream::connect("127.0.0.1:5555").is_ok();
    // CI starts the registry with the engine (`scripts/toolchain engine`): there it must be.
    assert!(
        registry || std::env::var_os("CI").is_none(),
        "no registry listens on 127.0.0.1:5555, and CI must pull from one"
    );
    if registry {
        let remote = "127.0.0.1:5555/wasp-model-server:test";
        wasp_tests::podman(&["push", "--tls-verify=false", &image, remote]);
        let _ = std::process::Command::new("podman")
            .args(["rmi", "-f", remote])
            .output();
        let pulled_spec = spec("pulled", remote).replace("pull = \"never\"", "pull = \"missing\"");
        c.deploy_ok(TEXT_EMBEDDINGS, &pulled_spec).await;
        let pulled = embed(c, "pulled", &input).await;
        assert_eq!(pulled, imaged);
    } else {
        eprintln!(
            "SKIPPED pulling from a registry: none listens on 127.0.0.1:5555 \
             (`scripts/toolchain engine` starts one, as root)"
        );
    }

    // Deleting the endpoint removes its container from the engine.
    assert_eq!(
        c.request("DELETE", "/api/v1/endpoints/imaged", "")
            .await
            .status,
        204
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while engine_containers(&socket, "imaged") > 0 {
        assert!(
            Instant::now() < deadline,
            "the container is still in the engine"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_worker_sees_only_the_gpus_it_owns() {
    let gpus = wasp_gateway::Inventory::parse("fake:2").unwrap();
    let t = TestServer::start_with_gpus(gpus).await;
    let c = &t.client;
    let spec = "name = \"gpu\"\n[[versions]]\nname = \"v1\"\n[versions.backend]\n\
        kind = \"container\"\nimage = \"python\"\nport = 8000\n\
        command = \"echo gpus=$CUDA_VISIBLE_DEVICES; exec python3 -m http.server $PORT --bind 127.0.0.1\"\n\
        readiness = { path = \"/\" }\n[versions.scaling]\ngpus_per_worker = 1\n\
        [versions.processor]\ncomponent = \"{COMPONENT}\"\n";
    c.deploy_ok(HOSTILE, spec).await;
    until("its first line", Duration::from_secs(10), async || {
        logs(c, "gpu").await.contains("gpus=")
    })
    .await;
    let log = logs(c, "gpu").await;
    assert!(log.contains("gpus=0") || log.contains("gpus=1"), "{log}");
    assert!(!log.contains("gpus=0,1"), "{log}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_is_down_is_a_clear_error() {
    let t = TestServer::start_with_engine("unix:///nonexistent/engine.sock").await;
    let c = &t.client;
    let spec = "name = \"nowhere\"\n[[versions]]\nname = \"v1\"\n[versions.backend]\n\
        kind = \"container\"\nimage = \"python\"\nport = 8000\n\
        [versions.processor]\ncomponent = \"{COMPONENT}\"\n";
    let reply = c.deploy(HOSTILE, spec).await;
    let text = reply.text();
    assert_eq!(reply.status, 503, "{text}");
    assert!(
        text.contains("the container engine at unix:///nonexistent/engine.sock does not answer"),
        "{text}"
    );
    let status = c.get("/api/v1/endpoints/nowhere").await;
    assert!(
        status.status == 404 || status.text().contains("does not answer"),
        "{}",
        status.text()
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_through_a_container_as_through_any_backend() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(TEXT_EMBEDDINGS, &container_spec("boxed-jobs", "", "", ""))
        .await;
    let direct = embed(c, "boxed-jobs", &json!(["queued, not lost"])).await;
    let reply = c
        .post_json(
            "/endpoints/boxed-jobs/runsync",
            &json!({ "input": { "input": ["queued, not lost"] } }),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let job = reply.json();
    assert_eq!(job["status"], "COMPLETED", "{job:#}");
    let output = &job["output"]["data"][0]["embedding"];
    let vector: Vec<f64> = output
        .as_array()
        .unwrap_or_else(|| panic!("{job:#}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_same_vectors(&direct, &[vector]);
    t.stop().await;
}

/// Reads from a raw connection until `needle` shows, within `patience`.
async fn read_until(
    stream: &mut tokio::net::TcpStream,
    needle: &str,
    patience: Duration,
) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + patience;
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no `{needle}` within {patience:?}: {}",
                    String::from_utf8_lossy(&seen)
                )
            })
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_processor_requests_pass_through_to_the_container_as_they_are() {
    use tokio::io::AsyncWriteExt;
    let t = TestServer::start().await;
    let c = &t.client;
    let spec = container_spec("raw", "", "", "");
    let spec = spec.split("[versions.processor]").next().unwrap();
    let body = c.deploy_ok(TEXT_EMBEDDINGS, spec).await;
    assert_eq!(body["versions"][0]["backend"], "container");
    let status = c.get("/api/v1/endpoints/raw").await.json();
    assert_eq!(status["status"], "ready", "{status}");
    assert!(status["versions"][0].get("component").is_none(), "{status}");

    // Method, path with its query, headers and body reach the container as they came; the
    // gateway's credentials do not. Its status, headers and body come back as it sent them.
    let reply = c
        .request_with(
            "PUT",
            "/endpoints/raw/invoke/echo/a%20b?x=1&y=two",
            &[("x-custom", "yes"), ("content-type", "text/plain")],
            "hello, container",
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.header("x-model-server"), Some("echo"));
    let echoed = reply.json();
    assert_eq!(echoed["method"], "PUT");
    assert_eq!(echoed["path"], "/echo/a%20b?x=1&y=two");
    assert_eq!(echoed["headers"]["x-custom"], "yes");
    assert_eq!(echoed["headers"]["content-type"], "text/plain");
    assert!(echoed["headers"].get("authorization").is_none(), "{echoed}");
    assert_eq!(echoed["body"], "hello, container");

    // The container's own routes and errors, as they are: its KServe v2 inference, and its 404.
    let infer = c
        .post_json(
            "/endpoints/raw/invoke/v2/models/m/infer",
            &json!({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3],
                               "data": [101, 7592, 102]}]}),
        )
        .await;
    assert_eq!(infer.status, 200, "{}", infer.text());
    assert!(
        infer.json()["outputs"]
            .as_array()
            .is_some_and(|o| !o.is_empty())
    );
    let missing = c.get("/endpoints/raw/invoke/nowhere").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "no route /nowhere");

    // A streamed answer streams: the first event arrives while the second is 30 s away.
    let mut stream = tokio::net::TcpStream::connect(t.server.local_addr())
        .await
        .unwrap();
    let request = format!(
        "GET /endpoints/raw/invoke/stream?n=2&ms=30000 HTTP/1.1\r\nhost: x\r\n\
         authorization: Bearer {}\r\n\r\n",
        c.key().unwrap()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_until(&mut stream, "data: 0", Duration::from_secs(10)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    drop(stream);

    // A job through the same endpoint reaches the container at the job's path.
    let job = c
        .post_json(
            "/endpoints/raw/runsync",
            &json!({ "input": { "say": "queued" }, "path": "/echo/job" }),
        )
        .await;
    assert_eq!(job.status, 200, "{}", job.text());
    let job = job.json();
    assert_eq!(job["status"], "COMPLETED", "{job:#}");
    assert_eq!(job["output"]["path"], "/echo/job", "{job:#}");
    assert_eq!(job["output"]["method"], "POST", "{job:#}");
    assert_eq!(
        serde_json::from_str::<Value>(job["output"]["body"].as_str().unwrap()).unwrap(),
        json!({ "say": "queued" }),
        "{job:#}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_real_engine_private_images_need_the_tenants_own_login() {
    let Some(socket) = wasp_tests::test_engine("the private-registry test") else {
        return;
    };
    // CI starts this registry with the engine (`scripts/toolchain engine`).
    let up = std::net::TcpStream::connect("127.0.0.1:5556").is_ok();
    assert!(
        up || std::env::var_os("CI").is_none(),
        "no registry listens on 127.0.0.1:5556, and CI must pull from one"
    );
    if !up {
        eprintln!("SKIPPED the private-registry test: nothing listens on 127.0.0.1:5556");
        return;
    }
    let image = wasp_tests::model_server_image(MODEL_SERVER);
    let private = "127.0.0.1:5556/wasp/private-model:test";
    let creds = "wasp:wasp-registry-test";
    wasp_tests::podman(&[
        "push",
        "--tls-verify=false",
        "--creds",
        creds,
        &image,
        private,
    ]);
    let _ = std::process::Command::new("podman")
        .args(["rmi", "-f", private])
        .output();

    let t = TestServer::start_with_engine(&socket).await;
    let operator = &t.client;
    let mut admins = Vec::new();
    for name in ["acme", "bravo"] {
        operator
            .post_json("/api/v1/tenants", &json!({ "name": name }))
            .await;
        let made = operator
            .post_json("/api/v1/keys", &json!({ "tenant": name, "role": "admin" }))
            .await;
        admins.push(operator.as_key(made.json()["key"].as_str()));
    }
    let (acme, bravo) = (&admins[0], &admins[1]);
    // Pass-through endpoints: no processor, so no host mount for the tenants to be granted.
    let spec = |name: &str, pull: &str| {
        let full = wasp_tests::model_image_spec(
            name,
            private,
            &format!("pull = \"{pull}\"\ngrace_period_s = 5"),
            "",
        );
        full.split("[versions.processor]")
            .next()
            .unwrap()
            .to_owned()
    };
    let login =
        |user: &str, password: &str| json!({ "username": user, "password": password }).to_string();
    async fn put_login(c: &TestClient, body: String) {
        let set = c
            .request_with(
                "PUT",
                "/api/v1/registries/127.0.0.1:5556",
                &[("content-type", "application/json")],
                body,
            )
            .await;
        assert!(set.status == 201 || set.status == 200, "{}", set.text());
    }

    // Without a login the registry refuses, and the error says what to do.
    let refused = acme
        .deploy(TEXT_EMBEDDINGS, &spec("private", "missing"))
        .await;
    let text = refused.text();
    assert!(refused.status >= 400, "{text}");
    assert!(
        text.contains("PUT /api/v1/registries/127.0.0.1:5556"),
        "{text}"
    );
    // With the tenant's login it pulls and runs.
    put_login(acme, login("wasp", "wasp-registry-test")).await;
    acme.deploy_ok(TEXT_EMBEDDINGS, &spec("private", "missing"))
        .await;
    let echoed = acme.post("/endpoints/private/invoke/echo", "mine").await;
    assert_eq!(echoed.status, 201, "{}", echoed.text());

    // The engine now has the image, but another tenant gets no use of it: not by asking
    // the engine's copy (`pull = "never"`), not with a wrong login.
    let never = bravo
        .deploy(TEXT_EMBEDDINGS, &spec("borrowed", "never"))
        .await;
    let text = never.text();
    assert!(
        never.status >= 400,
        "bravo ran acme's private image: {text}"
    );
    assert!(
        text.contains("unauthorized") || text.contains("authentication required"),
        "{text}"
    );
    put_login(bravo, login("wasp", "wrong-password")).await;
    let wrong = bravo
        .deploy(TEXT_EMBEDDINGS, &spec("borrowed", "missing"))
        .await;
    assert!(wrong.status >= 400, "{}", wrong.text());
    assert_eq!(engine_containers(&socket, "bravo/borrowed"), 0);
    t.stop().await;
}
