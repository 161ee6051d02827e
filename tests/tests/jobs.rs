//! Async jobs end to end on a real server: submit, status, result, runsync, cancel, retry,
//! purge, health, listing, timeouts, retries and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasp_tests::guests::{HELLO, HOSTILE};
use wasp_tests::{TestClient, TestServer, spec};

/// Polls a job until it has ended; its status.
async fn wait_done(c: &TestClient, name: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = c
            .get(&format!("/endpoints/{name}/status/{id}"))
            .await
            .json();
        if !matches!(status["status"].as_str(), Some("IN_QUEUE" | "IN_PROGRESS")) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not end: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_through_the_endpoint_and_its_result_is_kept() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HELLO, &spec("hello", "")).await;
    let reply = c
        .post_json(
            "/endpoints/hello/run",
            &json!({ "input": { "name": "job" } }),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let submitted = reply.json();
    let id = submitted["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 26);
    assert!(matches!(
        submitted["status"].as_str(),
        Some("IN_QUEUE" | "IN_PROGRESS" | "COMPLETED")
    ));
    assert_eq!(
        reply.header("location"),
        Some(format!("/endpoints/hello/status/{id}").as_str())
    );
    let done = wait_done(c, "hello", &id).await;
    assert_eq!(done["status"], "COMPLETED", "{done:#}");
    assert!(done["output"].to_string().contains("job"), "{done:#}");
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(done["retries"], 0);
    let ttl = done["expires_at_ms"].as_u64().unwrap() - done["finished_at_ms"].as_u64().unwrap();
    assert_eq!(ttl, 86_400_000, "the default result TTL is 24 h");
    // The raw answer, as the processor gave it.
    let raw = c.get(done["output_url"].as_str().unwrap()).await;
    assert_eq!(raw.status, 200);
    assert!(raw.text().contains("job"));

    // runsync answers with the finished job.
    let reply = c
        .post_json(
            "/endpoints/hello/runsync",
            &json!({ "input": { "name": "sync" } }),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["status"], "COMPLETED");
    assert!(body["output"].to_string().contains("sync"));

    // Health and the listing see both.
    let health = c.get("/endpoints/hello/health").await.json();
    assert_eq!(health["jobs"]["completed"], 2, "{health:#}");
    assert_eq!(health["jobs"]["in_queue"], 0);
    assert!(health["workers"]["ready"].as_u64().unwrap() >= 1);
    let listed = c
        .get("/api/v1/jobs?endpoint=hello&status=COMPLETED")
        .await
        .json();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 2);
    assert_eq!(listed["jobs"][1]["id"], id.as_str(), "newest first");
    let metrics = c.get("/metrics").await.text();
    assert!(
        metrics.contains("wasp_jobs{endpoint=\"hello\",state=\"COMPLETED\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("wasp_job_backlog{endpoint=\"hello\"} 0"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_body_is_the_request_and_the_query_its_policy() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HOSTILE, &spec("raw", "")).await;
    let bytes: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    let reply = c
        .request_with(
            "POST",
            "/endpoints/raw/run?path=/echo&priority=high&result_ttl_s=60",
            &[("content-type", "application/octet-stream")],
            bytes.clone(),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let done = wait_done(c, "raw", &id).await;
    assert_eq!(done["status"], "COMPLETED", "{done:#}");
    assert_eq!(done["priority"], "high");
    let ttl = done["expires_at_ms"].as_u64().unwrap() - done["finished_at_ms"].as_u64().unwrap();
    assert_eq!(ttl, 60_000);
    // Not text: base64 in the status, the bytes at the result URL.
    assert!(done["output_base64"].is_string(), "{done:#}");
    let raw = c.get(&format!("/endpoints/raw/result/{id}")).await;
    assert_eq!(raw.header("content-type"), Some("application/octet-stream"));
    assert_eq!(raw.body.to_vec(), bytes);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_retries_and_dead_letters_keep_every_attempt() {
    let t = TestServer::start().await;
    let c = &t.client;
    let jobs = "[jobs]\nretry_delay_ms = 50\nmax_attempts = 2\n";
    c.deploy_ok(
        HOSTILE,
        &format!(
            "{}{jobs}",
            spec("flaky", "[versions.limits]\ntimeout_ms = 5000")
        ),
    )
    .await;
    // Runs past its execution timeout twice: TIMED_OUT.
    let reply = c
        .post_json(
            "/endpoints/flaky/run",
            &json!({ "input": 3000, "path": "/sleep", "policy": { "execution_timeout_s": 1 } }),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let slow = reply.json()["id"].as_str().unwrap().to_owned();
    // Traps twice: FAILED, each attempt's error kept.
    let reply = c
        .post_json(
            "/endpoints/flaky/run",
            &json!({ "input": null, "path": "/trap" }),
        )
        .await;
    let trap = reply.json()["id"].as_str().unwrap().to_owned();
    // Bad input: FAILED at once, one attempt.
    let reply = c
        .post_json(
            "/endpoints/flaky/run",
            &json!({ "input": "not a number", "path": "/sleep" }),
        )
        .await;
    let bad = reply.json()["id"].as_str().unwrap().to_owned();

    let done = wait_done(c, "flaky", &trap).await;
    assert_eq!(done["status"], "FAILED", "{done:#}");
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{done:#}");
    assert!(
        attempts
            .iter()
            .all(|a| a["error"]["code"] == "processor_trap"),
        "{done:#}"
    );
    assert_eq!(done["retries"], 1);

    let done = wait_done(c, "flaky", &bad).await;
    assert_eq!(done["status"], "FAILED", "{done:#}");
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1, "{done:#}");
    assert_eq!(done["error"]["code"], "processor_error", "{done:#}");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("field `body`")
    );

    let done = wait_done(c, "flaky", &slow).await;
    assert_eq!(done["status"], "TIMED_OUT", "{done:#}");
    assert_eq!(done["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(done["error"]["code"], "timed_out");

    // A user's retry gives it fresh attempts; retrying a finished job is refused.
    let reply = c.post(&format!("/endpoints/flaky/retry/{trap}"), "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["status"], "IN_QUEUE");
    let done = wait_done(c, "flaky", &trap).await;
    assert_eq!(done["attempts"].as_array().unwrap().len(), 4, "{done:#}");
    let health = c.get("/endpoints/flaky/health").await.json();
    assert_eq!(health["jobs"]["failed"], 2, "{health:#}");
    assert_eq!(health["jobs"]["timed_out"], 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_queued_and_running_jobs_and_purge_empties_the_queue() {
    let t = TestServer::start().await;
    let c = &t.client;
    let jobs = "[jobs]\nconcurrency_per_worker = 1\n";
    c.deploy_ok(
        HOSTILE,
        &format!(
            "{}{jobs}",
            spec("slow", "[versions.limits]\ntimeout_ms = 60000")
        ),
    )
    .await;
    let submit = |ms: u64| async move {
        let reply = c
            .post_json(
                "/endpoints/slow/run",
                &json!({ "input": ms, "path": "/sleep" }),
            )
            .await;
        assert_eq!(reply.status, 202, "{}", reply.text());
        reply.json()["id"].as_str().unwrap().to_owned()
    };
    let running = submit(30_000).await;
    let queued = submit(10).await;
    let purged: Vec<String> = vec![submit(10).await, submit(10).await];
    // One at a time: the first runs, the others wait.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c
        .get(&format!("/endpoints/slow/status/{running}"))
        .await
        .json()["status"]
        != "IN_PROGRESS"
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = c
        .post(&format!("/endpoints/slow/cancel/{queued}"), "")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["status"], "CANCELLED");
    let reply = c.post("/endpoints/slow/purge-queue", "").await;
    assert_eq!(reply.json()["removed"], 2, "{}", reply.text());
    for id in &purged {
        let status = c.get(&format!("/endpoints/slow/status/{id}")).await.json();
        assert_eq!(
            (status["status"].as_str(), status["error"]["code"].as_str()),
            (Some("CANCELLED"), Some("purged"))
        );
    }
    let started = Instant::now();
    let reply = c
        .post(&format!("/endpoints/slow/cancel/{running}"), "")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["status"], "CANCELLED");
    // The running attempt was stopped, and its slot is free: a new job runs at once.
    let next = submit(10).await;
    assert_eq!(wait_done(c, "slow", &next).await["status"], "COMPLETED");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A finished job cannot be cancelled; a completed one cannot be retried.
    let reply = c.post(&format!("/endpoints/slow/cancel/{next}"), "").await;
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert!(reply.text().contains("COMPLETED"));
    let reply = c.post(&format!("/endpoints/slow/retry/{next}"), "").await;
    assert_eq!(reply.status, 409, "{}", reply.text());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submits_get_clear_errors_and_store_nothing() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(
        HELLO,
        &spec("hello", "[versions.limits]\nmax_body_bytes = 1000"),
    )
    .await;
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        ("/endpoints/nope/run", json!({ "input": 1 }), 404, None),
        (
            "/endpoints/hello/run",
            json!({ "input": 1, "extra": 2 }),
            400,
            Some("extra"),
        ),
        (
            "/endpoints/hello/run",
            json!({ "input": 1, "webhook": "ftp://x/y" }),
            422,
            Some("webhook"),
        ),
        (
            "/endpoints/hello/run",
            json!({ "input": 1, "webhook": "not a url" }),
            422,
            Some("webhook"),
        ),
        (
            "/endpoints/hello/run",
            json!({ "input": 1, "policy": { "max_attempts": 0 } }),
            422,
            Some("policy.max_attempts"),
        ),
        (
            "/endpoints/hello/run",
            json!({ "input": 1, "policy": { "priority": "urgent" } }),
            400,
            None,
        ),
        (
            "/endpoints/hello/run",
            json!({ "input": "x".repeat(2000) }),
            413,
            Some("input"),
        ),
        (
            "/endpoints/hello/run",
            json!({ "input": 1, "path": "relative" }),
            422,
            Some("path"),
        ),
        (
            "/endpoints/hello/runsync?wait_s=900",
            json!({ "input": 1 }),
            422,
            Some("wait_s"),
        ),
    ];
    for (path, body, status, field) in cases {
        let reply = c.post_json(path, &body).await;
        assert_eq!(reply.status, status, "{path} {body}: {}", reply.text());
        let error = &reply.json()["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        if let Some(field) = field {
            assert_eq!(error["field"], field, "{body}: {}", reply.text());
        }
    }
    let reply = c
        .request_with(
            "POST",
            "/endpoints/hello/run",
            &[("content-type", "application/json")],
            "{not json",
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    let reply = c
        .get("/endpoints/hello/status/01ARZ3NDEKTSV4RRFFQ69G5FAV")
        .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "job_not_found");
    let reply = c.get("/endpoints/hello/status/../../etc").await;
    assert_eq!(reply.status, 404);
    let reply = c.get("/api/v1/jobs?status=DONE").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["field"], "status");
    // Nothing was stored.
    let health = c.get("/endpoints/hello/health").await.json();
    assert_eq!(health["jobs"]["in_queue"], 0);
    assert_eq!(health["jobs"]["completed"], 0);
    assert!(
        c.get("/api/v1/jobs").await.json()["jobs"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    t.stop().await;
}

/// A webhook receiver on loopback: it records each request and answers with the next
/// status from `answers` (200 once they run out); over TLS when given an acceptor.
struct Receiver {
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(hyper::HeaderMap, bytes::Bytes)>>>,
}

impl Receiver {
    async fn start(answers: Vec<u16>) -> Self {
        Self::start_with(answers, None).await
    }

    async fn start_with(answers: Vec<u16>, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}/hook", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let answers = std::sync::Arc::new(std::sync::Mutex::new(answers.into_iter()));
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (record, answers, tls) = (record.clone(), answers.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (record, answers) = (record.clone(), answers.clone());
                            async move {
                                let headers = req.headers().clone();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                record.lock().unwrap().push((headers, body));
                                let status = answers.lock().unwrap().next().unwrap_or(200);
                                let mut response = hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::new(),
                                ));
                                *response.status_mut() =
                                    hyper::StatusCode::from_u16(status).unwrap();
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        // A client that refuses the certificate ends the handshake.
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => {
                                http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                    .await
                            }
                            Err(_) => return,
                        },
                        None => {
                            http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                    };
                });
            }
        });
        Self { url, seen }
    }
}

/// A self-signed certificate for `localhost` and `127.0.0.1`: a TLS acceptor that presents
/// it, and its PEM (the root a client must trust).
fn self_signed() -> (tokio_rustls::TlsAcceptor, String) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    (
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
        certified.cert.pem(),
    )
}

/// Checks that every request `receiver` saw is the signed status body of the finished
/// job `id`.
fn assert_signed(receiver: &Receiver, secret: &str, id: &str) {
    use hmac::{Hmac, Mac};
    let seen = receiver.seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    for (headers, body) in &seen {
        assert_eq!(headers["x-wasp-job-id"], id);
        let signature = headers["x-wasp-signature"].to_str().unwrap();
        let (t, v1) = signature
            .strip_prefix("t=")
            .and_then(|rest| rest.split_once(",v1="))
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(t.parse::<u64>().unwrap()) < 60);
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        let expected: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(v1, expected, "the signature does not verify");
        let sent: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            (sent["id"].as_str(), sent["status"].as_str()),
            (Some(id), Some("COMPLETED"))
        );
        assert!(sent["output"].to_string().contains("hook"));
    }
}

/// Submits a job with a webhook to `endpoint` and waits until its status passes `until`.
async fn hooked_job(
    c: &TestClient,
    endpoint: &str,
    url: &str,
    until: impl Fn(&Value) -> bool,
) -> (String, Value) {
    let reply = c
        .post_json(
            &format!("/endpoints/{endpoint}/run"),
            &json!({ "input": { "name": "hook" }, "webhook": url }),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = c
            .get(&format!("/endpoints/{endpoint}/status/{id}"))
            .await
            .json();
        if until(&status) {
            return (id, status);
        }
        assert!(Instant::now() < deadline, "not there yet: {status:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn webhook_secret(c: &TestClient, endpoint: &str) -> String {
    c.get(&format!("/api/v1/endpoints/{endpoint}/webhook-secret"))
        .await
        .json()["secret"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_is_signed_retried_and_its_outcome_kept() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HELLO, &spec("hooked", "")).await;
    let secret = webhook_secret(c, "hooked").await;
    assert!(secret.starts_with("whsec_") && secret.len() > 40);
    // Fails twice, then takes it.
    let receiver = Receiver::start(vec![500, 503]).await;
    let (id, status) = hooked_job(c, "hooked", &receiver.url, |s| {
        s["webhook"]["delivered"] == true
    })
    .await;
    let statuses: Vec<Value> = status["webhook"]["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(500), json!(503), json!(200)], "{status:#}");
    assert_eq!(receiver.seen.lock().unwrap().len(), 3);
    assert_signed(&receiver, &secret, &id);
    // A rotated secret signs what comes next; the old one no longer verifies.
    let rotated = c
        .post("/api/v1/endpoints/hooked/webhook-secret/rotate", "")
        .await
        .json();
    assert_ne!(rotated["secret"].as_str().unwrap(), secret);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_goes_to_a_receiver_whose_certificate_chains_to_a_trusted_root() {
    let (trusted, root) = self_signed();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, root).unwrap();
    let t = TestServer::start_configured(|config| config.webhook_ca = vec![ca]).await;
    let c = &t.client;
    c.deploy_ok(HELLO, &spec("hooked", "")).await;
    let secret = webhook_secret(c, "hooked").await;
    let receiver = Receiver::start_with(Vec::new(), Some(trusted)).await;
    assert!(receiver.url.starts_with("https://127.0.0.1:"));
    let (id, status) = hooked_job(c, "hooked", &receiver.url, |s| {
        s["webhook"]["delivered"] == true
    })
    .await;
    assert_eq!(
        status["webhook"]["deliveries"][0]["status"], 200,
        "{status:#}"
    );
    assert_signed(&receiver, &secret, &id);
    // A receiver whose certificate chains to no trusted root gets nothing: the try fails
    // with the reason kept, and is tried again later.
    let (stranger, _) = self_signed();
    let untrusted = Receiver::start_with(Vec::new(), Some(stranger)).await;
    let (_, status) = hooked_job(c, "hooked", &untrusted.url, |s| {
        s["webhook"]["deliveries"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
    })
    .await;
    let first = &status["webhook"]["deliveries"][0];
    assert!(first["status"].is_null(), "{status:#}");
    let error = first["error"].as_str().unwrap();
    assert!(error.contains("certificate"), "{error}");
    assert_eq!(status["webhook"]["delivered"], false);
    assert!(untrusted.seen.lock().unwrap().is_empty());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_wake_an_endpoint_at_zero_scale_it_and_let_it_go_back() {
    let t = TestServer::start().await;
    let c = &t.client;
    let scaling = "[versions.scaling]\nmin_workers = 0\nmax_workers = 4\ntarget_concurrency = 2\n\
                   stable_window_s = 1\npanic_window_s = 1\nscale_down_delay_s = 0\n\
                   scale_up_cooldown_s = 0\nscale_down_cooldown_s = 0";
    let jobs = "[jobs]\nconcurrency_per_worker = 2\n";
    c.deploy_ok(HOSTILE, &format!("{}{jobs}", spec("batchy", scaling)))
        .await;
    let workers = |c: &TestClient| {
        let c = c.clone();
        async move { c.get("/endpoints/batchy/health").await.json()["workers"].clone() }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while workers(c).await["ready"] != 0 {
        assert!(Instant::now() < deadline, "never scaled to zero");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Low-priority jobs are no reason to wake it.
    let mut low = Vec::new();
    for _ in 0..3 {
        let reply = c
            .post_json(
                "/endpoints/batchy/run",
                &json!({ "input": 10, "path": "/sleep", "policy": { "priority": "low" } }),
            )
            .await;
        low.push(reply.json()["id"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(workers(c).await["desired"], 0);
    let health = c.get("/endpoints/batchy/health").await.json();
    assert_eq!(health["jobs"]["in_queue"], 3, "{health:#}");

    // Normal jobs wake it, the backlog scales it past one worker, and everything runs.
    let mut ids = Vec::new();
    for _ in 0..24 {
        let reply = c
            .post_json(
                "/endpoints/batchy/run",
                &json!({ "input": 300, "path": "/sleep" }),
            )
            .await;
        ids.push(reply.json()["id"].as_str().unwrap().to_owned());
    }
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let health = c.get("/endpoints/batchy/health").await.json();
        most = most.max(health["workers"]["ready"].as_u64().unwrap());
        if health["jobs"]["completed"] == 27 {
            break;
        }
        assert!(Instant::now() < deadline, "jobs left: {health:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(most > 1, "the backlog never added a worker");
    for id in low.iter().chain(&ids) {
        assert_eq!(wait_done(c, "batchy", id).await["status"], "COMPLETED");
    }
    let events = c.get("/api/v1/endpoints/batchy/events").await.json();
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reason"].as_str().unwrap().contains("job is waiting")),
        "{events:#}"
    );
    // Drained: back to zero.
    let deadline = Instant::now() + Duration::from_secs(20);
    while workers(c).await["desired"] != 0 {
        assert!(Instant::now() < deadline, "never went back to zero");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_invoke_that_would_wait_spills_over_to_a_job_when_asked() {
    let t = TestServer::start().await;
    let c = &t.client;
    let scaling = "[versions.scaling]\nmin_workers = 0\nstable_window_s = 1\npanic_window_s = 1\n\
                   scale_down_delay_s = 0\nscale_down_cooldown_s = 0";
    c.deploy_ok(HELLO, &spec("cold", scaling)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.get("/endpoints/cold/health").await.json()["workers"]["ready"] != 0 {
        assert!(Instant::now() < deadline, "never scaled to zero");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Cold, and the client prefers an async answer: a job.
    let reply = c
        .request_with(
            "POST",
            "/endpoints/cold/invoke",
            &[("prefer", "wait=5, respond-async")],
            r#"{"name":"later"}"#,
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    assert_eq!(reply.header("preference-applied"), Some("respond-async"));
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        reply.header("location"),
        Some(format!("/endpoints/cold/status/{id}").as_str())
    );
    let done = wait_done(c, "cold", &id).await;
    assert_eq!(done["status"], "COMPLETED", "{done:#}");
    assert_eq!(done["output"]["greeting"], "hello, later!");
    // Warm now: the same request is answered at once.
    let reply = c
        .request_with(
            "POST",
            "/endpoints/cold/invoke",
            &[("prefer", "respond-async")],
            r#"{"name":"now"}"#,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // A congested endpoint that opted in spills without being asked: one instance, busy,
    // with a queue, at a mean latency that would pass the deadline.
    let jobs = "[jobs]\nspillover = true\n";
    let limits = "[versions.limits]\nmax_instances = 1\ntimeout_ms = 1000";
    c.deploy_ok(HOSTILE, &format!("{}{jobs}", spec("busy", limits)))
        .await;
    let reply = c.invoke("busy", "/sleep", "700").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let background = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("busy", "/sleep", "700").await.status })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = c.invoke("busy", "/sleep", "10").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_done(c, "busy", &id).await["output"], "slept");
    assert_eq!(background.await.unwrap(), 200);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_streams_its_status_output_and_end_as_server_sent_events() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HOSTILE, &spec("streamed", "")).await;
    let reply = c
        .post_json(
            "/endpoints/streamed/run",
            &json!({ "input": 300, "path": "/sleep" }),
        )
        .await;
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    // Opened while the job runs; the stream ends with the job.
    let reply = c.get(&format!("/endpoints/streamed/stream/{id}")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let text = reply.text();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events, ["status", "output", "done"], "{text}");
    assert!(text.contains("data: \"slept\""), "{text}");
    assert!(text.contains("\"status\":\"COMPLETED\""), "{text}");
    // A finished job's stream replays its end at once.
    let again = c
        .get(&format!("/endpoints/streamed/stream/{id}"))
        .await
        .text();
    assert!(again.contains("event: done"), "{again}");
    let missing = c
        .get("/endpoints/streamed/stream/01ARZ3NDEKTSV4RRFFQ69G5FAV")
        .await;
    assert_eq!(missing.status, 404);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_mib_job_is_kept_as_blobs_and_comes_back_whole() {
    let t = TestServer::start().await;
    let c = &t.client;
    let limits = "[versions.limits]\nmax_body_bytes = 110000000\nmax_response_bytes = 110000000\nmemory_mib = 512\ntimeout_ms = 60000";
    c.deploy_ok(HOSTILE, &spec("big", limits)).await;
    let size = 100 * 1024 * 1024;
    let input: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let reply = c
        .request_with(
            "POST",
            "/endpoints/big/run?path=/echo",
            &[("content-type", "application/octet-stream")],
            input.clone(),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let status = c.get(&format!("/endpoints/big/status/{id}")).await.json();
        if !matches!(status["status"].as_str(), Some("IN_QUEUE" | "IN_PROGRESS")) {
            break status;
        }
        assert!(Instant::now() < deadline, "{status:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done["status"], "COMPLETED", "{done:#}");
    // Too large to embed: only the URL.
    assert!(done.get("output").is_none() && done.get("output_base64").is_none());
    let raw = c.get(done["output_url"].as_str().unwrap()).await;
    assert_eq!(raw.body.len(), size);
    assert!(
        raw.body.as_ref() == input.as_slice(),
        "the output differs from the input"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_processor_answers_what_http_cannot_carry_fails_once_with_the_reason() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HOSTILE, &spec("odd", "")).await;
    let reply = c
        .post_json(
            "/endpoints/odd/run",
            &json!({ "input": 600, "path": "/bad-status" }),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let status = wait_done(c, "odd", &id).await;
    assert_eq!(status["status"], "FAILED", "{status:#}");
    assert_eq!(status["error"]["code"], "invalid_processor_response");
    assert!(
        status["error"]["message"].as_str().unwrap().contains("600"),
        "{status:#}"
    );
    // Not worth retrying: the same processor would answer the same.
    assert_eq!(status["attempts"].as_array().unwrap().len(), 1);
    t.stop().await;
}
