//! The HTTP stack's shared concerns, on a real server: request ids, the OpenAPI document,
//! error shapes of unknown routes and methods, the request timeout, the header read
//! timeout and the connection limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed() {
    let t = TestServer::start_with(HttpLimits {
        header_read_timeout: Duration::from_millis(600),
        idle_timeout: Duration::from_millis(250),
        ..HttpLimits::default()
    })
    .await;
    let addr = t.server.local_addr();
    // Connected, and never a byte: closed after the header read timeout (not the shorter
    // idle timeout, which starts after an answer).
    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf))
        .await
        .expect("a silent connection stayed open")
        .ok();
    assert!(buf.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(550));

    // Served once, then idle: closed after the idle timeout, not before.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 256];
    let n = idle.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    let answered = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
        .await
        .expect("an idle connection stayed open")
        .ok();
    let after = answered.elapsed();
    assert!(
        after >= Duration::from_millis(200) && after < Duration::from_millis(550),
        "{after:?}"
    );

    // A connection in use is not idle: a request longer than the idle timeout completes.
    t.client
        .deploy_ok(
            HOSTILE,
            &spec("slow", "[versions.limits]\ntimeout_ms = 5000"),
        )
        .await;
    let slow = t.client.invoke("slow", "/sleep", "1200").await;
    assert_eq!(slow.status, 200, "{}", slow.text());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection_or_request() {
    let t = TestServer::start_with(HttpLimits {
        max_connections_per_client: 2,
        max_requests_per_client: 1,
        ..HttpLimits::default()
    })
    .await;
    let addr = t.server.local_addr();
    let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        open.push(s);
    }
    // A third from the same address is closed at once, unanswered.
    let mut third = TcpStream::connect(addr).await.unwrap();
    let _ = third.write_all(request).await;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf))
        .await
        .expect("the third connection stayed open")
        .ok();
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    // Once they close, there is room again.
    drop(open);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = &t.client;
    c.deploy_ok(HOSTILE, &spec("slow", "")).await;
    // One request in flight per address: a second, on another connection, is refused.
    let sleeper = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("slow", "/sleep", "800").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = c.get("/healthz").await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(
        refused.json()["error"]["code"],
        "too_many_requests_from_client"
    );
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(sleeper.await.unwrap().status, 200);
    assert_eq!(c.get("/healthz").await.status, 200);
    t.stop().await;
}

/// A self-signed certificate for 127.0.0.1 and its key, as PEM files in `dir`.
fn certificate(dir: &std::path::Path) -> (wasp_gateway::TlsFiles, Vec<u8>) {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let files = wasp_gateway::TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, made.cert.pem()).unwrap();
    std::fs::write(&files.key, made.signing_key.serialize_pem()).unwrap();
    (files, made.cert.der().to_vec())
}

/// GETs `/healthz` over TLS, trusting only `trusted`; the status line and the DER of the
/// certificate the server presented.
async fn tls_get(addr: std::net::SocketAddr, trusted: &[u8]) -> std::io::Result<(String, Vec<u8>)> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(trusted.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.ok();
    let text = String::from_utf8_lossy(&out);
    Ok((text.lines().next().unwrap_or("").to_owned(), presented))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_certificate_and_picks_up_a_renewal() {
    let dir = tempfile::tempdir().unwrap();
    let (files, first) = certificate(dir.path());
    let t = TestServer::start_configured(|config| config.tls = Some(files)).await;
    let addr = t.server.local_addr();
    let (status, presented) = tls_get(addr, &first).await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(presented, first);
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut buf))
        .await
        .expect("a plain HTTP client was kept")
        .ok();
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));

    // Renewed on disk: served without a restart.
    std::thread::sleep(Duration::from_millis(20));
    let (_, second) = certificate(dir.path());
    assert_ne!(first, second);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        // Until the renewal is served, the old certificate fails the check.
        if let Ok((status, presented)) = tls_get(addr, &second).await {
            assert_eq!(presented, second);
            assert_eq!(status, "HTTP/1.1 200 OK");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewal was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    t.stop().await;
}
