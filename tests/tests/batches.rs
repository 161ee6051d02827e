//! Batch jobs end to end on a real server: a JSONL input in, one output line per input line
//! in order, progress, pause, resume, cancel, server-side inputs and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::Value;
use wasp_tests::guests::{HELLO, HOSTILE};
use wasp_tests::{TestClient, TestServer, spec};

fn input(lines: usize) -> String {
    (1..=lines)
        .map(|i| format!("{{\"name\":\"n{i}\"}}\n"))
        .collect()
}

async fn wait_state(c: &TestClient, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = c.get(&format!("/api/v1/batches/{id}")).await.json();
        if status["status"] == state {
            return status;
        }
        assert!(Instant::now() < deadline, "not {state}: {status:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks that the output has one line per input line, in order, each the greeting.
fn check_output(text: &str, lines: usize) {
    let out: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), lines);
    for (i, line) in out.iter().enumerate() {
        let n = i + 1;
        assert_eq!(line["line"], n, "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(
            line["output"]["greeting"],
            format!("hello, n{n}!"),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_writes_one_output_line_per_input_line_in_order() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HELLO, &spec("hello", "")).await;
    let reply = c
        .request_with(
            "POST",
            "/api/v1/batches?endpoint=hello&concurrency=16",
            &[("content-type", "application/jsonl")],
            input(500),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let done = wait_state(c, &id, "COMPLETED").await;
    assert_eq!(
        (done["total"].as_u64(), done["done"].as_u64()),
        (Some(500), Some(500))
    );
    assert_eq!(
        (done["succeeded"].as_u64(), done["failed"].as_u64()),
        (Some(500), Some(0))
    );
    assert!(done["rate_per_s"].as_f64().unwrap() > 0.0);
    let output = c.get(done["output_url"].as_str().unwrap()).await;
    assert_eq!(output.header("content-type"), Some("application/jsonl"));
    check_output(&output.text(), 500);
    let listed = c.get("/api/v1/batches").await.json();
    assert_eq!(listed["batches"][0]["id"], id.as_str());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_pauses_resumes_and_cancels_and_failed_lines_are_errors() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HOSTILE, &spec("slow", "")).await;
    // Each line sleeps 20 ms; every tenth is not a number, so it fails.
    let text: String = (1..=200)
        .map(|i| {
            if i % 10 == 0 {
                "\"x\"\n".to_owned()
            } else {
                "20\n".to_owned()
            }
        })
        .collect();
    let reply = c
        .request_with(
            "POST",
            "/api/v1/batches?endpoint=slow&path=/sleep&concurrency=4",
            &[],
            text,
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = c.post(&format!("/api/v1/batches/{id}/pause"), "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let paused = wait_state(c, &id, "PAUSED").await;
    let done = paused["done"].as_u64().unwrap();
    assert!(done > 0 && done < 200, "{paused:#}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still = c.get(&format!("/api/v1/batches/{id}")).await.json();
    assert_eq!(still["done"].as_u64(), Some(done), "lines ran while paused");
    assert_eq!(
        c.post(&format!("/api/v1/batches/{id}/pause"), "")
            .await
            .status,
        409
    );
    let reply = c.post(&format!("/api/v1/batches/{id}/resume"), "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let finished = wait_state(c, &id, "COMPLETED").await;
    assert_eq!(
        (finished["succeeded"].as_u64(), finished["failed"].as_u64()),
        (Some(180), Some(20))
    );
    let output = c.get(&format!("/api/v1/batches/{id}/output")).await.text();
    let lines: Vec<Value> = output
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 200);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["line"], i + 1);
        if (i + 1) % 10 == 0 {
            assert!(
                line["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("milliseconds"),
                "{line}"
            );
        } else {
            assert_eq!(line["output"], "slept", "{line}");
        }
    }
    assert_eq!(
        c.post(&format!("/api/v1/batches/{id}/cancel"), "")
            .await
            .status,
        409
    );

    // Cancel: the output keeps what was done, in order.
    let text: String = (1..=500).map(|_| "20\n").collect();
    let reply = c
        .request_with(
            "POST",
            "/api/v1/batches?endpoint=slow&path=/sleep&concurrency=2",
            &[],
            text,
        )
        .await;
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        c.post(&format!("/api/v1/batches/{id}/cancel"), "")
            .await
            .status,
        200
    );
    let cancelled = wait_state(c, &id, "CANCELLED").await;
    let done = cancelled["done"].as_u64().unwrap() as usize;
    assert!(done < 500);
    let output = c.get(&format!("/api/v1/batches/{id}/output")).await.text();
    assert_eq!(output.lines().count(), done);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_inputs_are_checked_line_by_line_and_by_path() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(HELLO, &spec("hello", "")).await;
    let cases: Vec<(&str, &str, u16, Option<&str>)> = vec![
        (
            "/api/v1/batches?endpoint=hello",
            "{\"name\":\"a\"}\n{\"name\":\n{\"name\":\"c\"}\n",
            400,
            Some("line 2"),
        ),
        (
            "/api/v1/batches?endpoint=hello",
            "{\"name\":\"a\"}\n\n{\"name\":\"c\"}\n",
            400,
            Some("line 2"),
        ),
        ("/api/v1/batches?endpoint=hello", "", 400, Some("body")),
        ("/api/v1/batches?endpoint=nope", "{}\n", 404, None),
        (
            "/api/v1/batches?endpoint=hello&concurrency=0",
            "{}\n",
            422,
            Some("concurrency"),
        ),
        (
            "/api/v1/batches?endpoint=hello&input_path=/etc/passwd",
            "",
            422,
            Some("input_path"),
        ),
        ("/api/v1/batches", "{}\n", 400, None),
    ];
    for (path, body, status, field) in cases {
        let reply = c.post(path, body.to_owned()).await;
        assert_eq!(reply.status, status, "{path} {body:?}: {}", reply.text());
        if let Some(field) = field {
            assert_eq!(reply.json()["error"]["field"], field, "{}", reply.text());
        }
    }
    assert!(
        c.get("/api/v1/batches").await.json()["batches"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(c.get("/api/v1/batches/batch_nope").await.status, 404);

    // A file under a --batch-mount directory (the test server mounts the temp directory).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, input(50)).unwrap();
    let reply = c
        .post(
            &format!(
                "/api/v1/batches?endpoint=hello&input_path={}",
                file.display()
            ),
            "",
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    wait_state(c, &id, "COMPLETED").await;
    check_output(
        &c.get(&format!("/api/v1/batches/{id}/output")).await.text(),
        50,
    );
    t.stop().await;
}
