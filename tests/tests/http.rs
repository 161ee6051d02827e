//! The HTTP stack's shared concerns, on a real server: request ids, the OpenAPI document,
//! error shapes of unknown routes and methods, the request timeout, the header read
//! timeout and the connection limit.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasp_gateway::HttpLimits;
use wasp_tests::guests::{HELLO, HOSTILE};
use wasp_tests::{TestServer, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_travel_in_and_out() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HELLO, &spec("hello", "")).await;
    let reply = c.invoke("hello", "", r#"{"name":"id"}"#).await;
    let id = reply.header("x-request-id").unwrap().to_owned();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let again = c.invoke("hello", "", r#"{"name":"id"}"#).await;
    assert_ne!(again.header("x-request-id"), Some(id.as_str()));
    let mine = c
        .request_with(
            "GET",
            "/api/v1/endpoints",
            &[("x-request-id", "trace-42")],
            "",
        )
        .await;
    assert_eq!(mine.header("x-request-id"), Some("trace-42"));
    // Errors carry one too.
    let missing = c.get("/api/v1/endpoints/nope").await;
    assert!(missing.header("x-request-id").is_some());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_description_is_the_checked_in_one() {
    let t = TestServer::start().await;
    let reply = t.client.get("/api/v1/openapi.json").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let on_disk =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .unwrap();
    let served: serde_json::Value = reply.json();
    let checked_in: serde_json::Value = serde_json::from_str(&on_disk).unwrap();
    assert_eq!(served, checked_in);
    assert_eq!(served["openapi"], "3.1.0");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_in_the_error_shape() {
    let t = TestServer::start().await;
    let c = &t.client;
    let missing = c.get("/nope").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "route_not_found");
    let wrong = c.request("PATCH", "/api/v1/endpoints", "").await;
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.json()["error"]["code"], "method_not_allowed");
    let big = c
        .request("PUT", "/api/v1/endpoints/x", vec![b' '; 2 * 1024 * 1024])
        .await;
    assert_eq!(big.status, 413);
    assert_eq!(big.json()["error"]["code"], "body_too_large");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_server_timeout_is_answered_504() {
    let t = TestServer::start_with(HttpLimits {
        request_timeout: Duration::from_millis(1500),
        ..HttpLimits::default()
    })
    .await;
    let c = &t.client;
    // Compiling may itself outlast the timeout: the deploy then still completes.
    let deployed = c
        .deploy(
            HOSTILE,
            &spec("slow", "[versions.limits]\ntimeout_ms = 10000"),
        )
        .await;
    assert!([201, 504].contains(&deployed.status), "{}", deployed.text());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while c.get("/api/v1/endpoints/slow").await.status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the deploy never completed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = c.invoke("slow", "/loop", "").await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "request_timeout");
    // The server keeps serving.
    assert_eq!(c.invoke("slow", "/ok", "").await.status, 200);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_slow_to_send_headers_is_cut_off() {
    let t = TestServer::start_with(HttpLimits {
        header_read_timeout: Duration::from_millis(300),
        ..HttpLimits::default()
    })
    .await;
    let mut stream = TcpStream::connect(t.server.local_addr()).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .expect("the connection stayed open");
    assert!(read.is_err() || !String::from_utf8_lossy(&buf).contains("200 OK"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_for_a_free_one() {
    let t = TestServer::start_with(HttpLimits {
        max_connections: 1,
        ..HttpLimits::default()
    })
    .await;
    let addr = t.server.local_addr();
    let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut first = TcpStream::connect(addr).await.unwrap();
    first.write_all(request).await.unwrap();
    let mut buf = [0u8; 256];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // The first connection is kept alive: the second is not served while it is open...
    let mut second = TcpStream::connect(addr).await.unwrap();
    second.write_all(request).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), second.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond the connection limit");
    // ...and is, once it closes.
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .expect("not served after a connection closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    t.stop().await;
}
