//! Processors in Python, JavaScript and C beside Rust: the same behaviour from the same
//! test vectors, hostile guests that fail only their own request, and scaffolds that
//! build and serve as they are. Components are built with the real toolchains
//! (`scripts/toolchain`) through `wasp processor build`, once per run (it skips a build
//! whose inputs have not changed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{WASP, ok};
use serde_json::Value;
use wasp_tests::TestServer;

use wasp_tests::process::root;

/// Installs the toolchains once for this test binary (a no-op when `./x test` did).
fn toolchains() -> PathBuf {
    static TOOLS: OnceLock<PathBuf> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let out = ok(Command::new(root().join("scripts/toolchain"))
                .arg("all")
                .output()
                .unwrap());
            PathBuf::from(out.trim())
        })
        .clone()
}

/// Builds the processor in `dir` (from the repository root) into target/polyglot.
fn build(dir: &str, extra: &[&str]) -> String {
    let tools = toolchains();
    let name = Path::new(dir).file_name().unwrap().to_str().unwrap();
    let out = root().join(format!("target/polyglot/{name}.wasm"));
    let printed = ok(Command::new(WASP)
        .args(["processor", "build"])
        .arg(root().join(dir))
        .arg("--out")
        .arg(&out)
        .args(extra)
        .env("WASP_TOOLCHAINS", &tools)
        .output()
        .unwrap());
    assert_eq!(printed.trim(), out.display().to_string());
    out.display().to_string()
}

fn spec(name: &str, env: &Value) -> String {
    let env: Vec<String> = env
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    format!(
        "name = \"{name}\"\n[[versions]]\nname = \"v1\"\n[versions.processor]\ncomponent = \"{{COMPONENT}}\"\nenv = {{ {} }}\n[versions.limits]\nmemory_mib = 128\n",
        env.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_language_answers_the_conformance_vectors() {
    let vectors: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/conformance/pii-redact.json")).unwrap(),
    )
    .unwrap();
    let components = [
        ("rust", wasp_tests::guests::PII_REDACT.to_owned()),
        ("python", build("processors/pii-redact-py", &[])),
        ("js", build("processors/pii-redact-js", &[])),
        ("c", build("processors/pii-redact-c", &[])),
    ];
    let server = TestServer::start().await;
    let client = &server.client;
    for (lang, wasm) in &components {
        for (deployment, env) in vectors["deployments"].as_object().unwrap() {
            client
                .deploy_ok(wasm, &spec(&format!("pii-{lang}-{deployment}"), env))
                .await;
        }
    }
    let mut mismatches = Vec::new();
    let cases = vectors["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "the vectors are missing");
    for (lang, _) in &components {
        for case in cases {
            let endpoint = format!("pii-{lang}-{}", case["deployment"].as_str().unwrap());
            let body = match case.get("raw_body") {
                Some(raw) => raw.as_str().unwrap().as_bytes().to_vec(),
                None => serde_json::to_vec(&case["body"]).unwrap(),
            };
            let reply = client.invoke(&endpoint, "", body).await;
            let name = case["name"].as_str().unwrap();
            if u64::from(reply.status) != case["status"].as_u64().unwrap() {
                mismatches.push(format!(
                    "{lang}: {name}: status {} {}",
                    reply.status,
                    reply.text()
                ));
                continue;
            }
            let got = reply.json();
            if let Some(want) = case.get("response") {
                if &got != want {
                    mismatches.push(format!("{lang}: {name}:\n  got  {got}\n  want {want}"));
                }
            } else {
                let want = &case["error"];
                let error = &got["error"];
                if error["code"] != want["code"]
                    || error.get("field").unwrap_or(&Value::Null) != &want["field"]
                {
                    mismatches.push(format!("{lang}: {name}: {got} (want {want})"));
                }
                assert!(
                    !error["message"].as_str().unwrap_or("").is_empty(),
                    "{lang}: {name}: an error without a message"
                );
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_guests_in_every_language_fail_only_their_request() {
    let server = TestServer::start().await;
    let client = &server.client;
    for lang in ["py", "js", "c"] {
        let wasm = build(&format!("tests/guests/hostile-{lang}"), &[]);
        let name = format!("hostile-{lang}");
        client
            .deploy_ok(
                &wasm,
                &wasp_tests::spec(
                    &name,
                    "[versions.limits]\nmemory_mib = 96\ntimeout_ms = 1000\nmax_instances = 2",
                ),
            )
            .await;
        // Each failure is the request's own: the endpoint answers the next one.
        let failures: [(&str, u16, &[&str]); 3] = [
            // An exception is an `internal` error value in Python and JavaScript (the
            // instance lives on); C's abort() is a trap (the instance is dropped).
            ("/raise", 500, &["processor_error", "processor_trap"]),
            ("/loop", 504, &["processor_timeout"]),
            // Python and JavaScript see their allocator fail (MemoryError, "out of
            // memory"); C's malloc returns NULL and it aborts past the limit.
            (
                "/oom",
                500,
                &[
                    "processor_error",
                    "processor_out_of_memory",
                    "processor_trap",
                ],
            ),
        ];
        for (path, status, codes) in failures {
            let reply = client.invoke(&name, path, "{}").await;
            assert_eq!(reply.status, status, "{lang} {path}: {}", reply.text());
            let code = reply.json()["error"]["code"].as_str().unwrap().to_owned();
            assert!(codes.contains(&code.as_str()), "{lang} {path}: {code}");
            let next = client.invoke(&name, "/ok", "{}").await;
            assert_eq!(next.status, 200, "{lang} after {path}: {}", next.text());
            assert_eq!(next.text(), "ok");
        }
        let missing = client.invoke(&name, "/nope", "{}").await;
        assert_eq!(missing.status, 404, "{lang}: {}", missing.text());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scaffolds_build_and_serve_in_every_language() {
    let tools = toolchains();
    let work = tempfile::tempdir().unwrap();
    let server = TestServer::start().await;
    let client = &server.client;
    for lang in ["python", "js", "c"] {
        let name = format!("demo-{lang}");
        let dir = work.path().join(&name);
        ok(Command::new(WASP)
            .args(["processor", "new", &name, "--lang", lang, "--dir"])
            .arg(&dir)
            .output()
            .unwrap());
        // The scaffold carries its own contract and SDK: it builds with no repository.
        assert!(dir.join("wit/world.wit").exists());
        let build = || {
            ok(Command::new(WASP)
                .args(["processor", "build"])
                .arg(&dir)
                .env("WASP_TOOLCHAINS", &tools)
                .output()
                .unwrap())
        };
        let wasm = PathBuf::from(build().trim());
        assert_eq!(
            wasm,
            dir.join(format!("target/{}.wasm", name.replace('-', "_")))
        );
        let built = std::fs::metadata(&wasm).unwrap().modified().unwrap();
        // Nothing changed: no rebuild.
        assert_eq!(PathBuf::from(build().trim()), wasm);
        assert_eq!(std::fs::metadata(&wasm).unwrap().modified().unwrap(), built);

        client
            .deploy_ok(wasm.to_str().unwrap(), &wasp_tests::spec(&name, ""))
            .await;
        let reply = client.invoke(&name, "", r#"{"text":"héllo"}"#).await;
        assert_eq!(reply.status, 200, "{lang}: {}", reply.text());
        assert_eq!(
            reply.json(),
            serde_json::json!({ "processor": name, "length": 5 })
        );
        let bad = client.invoke(&name, "", "{}").await;
        assert_eq!(bad.status, 400, "{lang}: {}", bad.text());
        assert_eq!(bad.json()["error"]["field"], "text");
        // The processor logged through the host.
        let logs = client.get(&format!("/api/v1/endpoints/{name}/logs")).await;
        assert!(
            logs.text().contains("handling a request"),
            "{lang}: {}",
            logs.text()
        );
    }

    // A Python processor built for the `service` world only (no transform export) serves
    // as backend `none`.
    let service = build("processors/pii-redact-py", &["--world", "service"]);
    let service_copy = work.path().join("service.wasm");
    std::fs::copy(&service, &service_copy).unwrap();
    client
        .deploy_ok(
            service_copy.to_str().unwrap(),
            &wasp_tests::spec("pii-service", ""),
        )
        .await;
    let reply = client
        .invoke("pii-service", "", r#"{"text":"a@b.io"}"#)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["text"], "[EMAIL]");
    server.stop().await;
}

#[test]
fn build_says_what_is_missing() {
    let work = tempfile::tempdir().unwrap();
    let empty = Command::new(WASP)
        .args(["processor", "build"])
        .arg(work.path())
        .output()
        .unwrap();
    assert!(!empty.status.success());
    let message = String::from_utf8_lossy(&empty.stderr);
    assert!(message.contains("app.py, app.js or app.c"), "{message}");

    // A toolchain that is not there is named, with the command that installs it.
    std::fs::write(work.path().join("app.py"), "").unwrap();
    let missing = Command::new(WASP)
        .args(["processor", "build"])
        .arg(work.path())
        .env("WASP_TOOLCHAINS", work.path().join("none"))
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let message = String::from_utf8_lossy(&missing.stderr);
    assert!(message.contains("scripts/toolchain python"), "{message}");
}

/// The Python embeddings processor (a pure-Python WordPiece tokenizer rebuilt from the
/// model's tokenizer.json, mean pooling in Python) gives the Rust processor's answers on
/// the same candle MiniLM backend: the same token counts and the same vectors, for text
/// that exercises every step of BERT's tokenizer.
#[tokio::test(flavor = "multi_thread")]
async fn python_embeddings_match_the_rust_processor() {
    let python = build("processors/text-embeddings-py", &[]);
    let server = TestServer::start().await;
    let client = &server.client;
    let limits = "[versions.limits]\nmemory_mib = 256\ntimeout_ms = 20000";
    client
        .deploy_ok(
            wasp_tests::guests::TEXT_EMBEDDINGS,
            &wasp_tests::minilm_spec("rs", limits),
        )
        .await;
    client
        .deploy_ok(&python, &wasp_tests::minilm_spec("py", limits))
        .await;
    let inputs = serde_json::json!([
        "The quick brown fox jumps over the lazy dog.",
        "Crème brûlée, naïve café — ÜBER façade!",
        "東京は日本の首都です。北京也是首都",
        "unbelievably hyperparameterization antidisestablishmentarianism",
        "tabs\tand\nnewlines\r\nand\u{0}nul\u{200b}zero-width \u{a0}nbsp",
        "e-mail: ann@example.org, price $3.50 (approx.) #tag @user 50%",
        "a [MASK] token and [SEP] inside, [cls] lower-case",
        "emoji 🙂👍🏽 and symbols ™ © ∑ √",
        "ΣΊΣΥΦΟΣ ΟΔΟΣ Straße İstanbul",
        "x".repeat(120),
    ]);
    let body = |input: &Value, format: &str| {
        serde_json::json!({ "model": "m", "input": input, "encoding_format": format }).to_string()
    };
    let rs = client
        .post("/endpoints/rs/invoke", body(&inputs, "float"))
        .await;
    let py = client
        .post("/endpoints/py/invoke", body(&inputs, "float"))
        .await;
    assert_eq!(rs.status, 200, "{}", rs.text());
    assert_eq!(py.status, 200, "{}", py.text());
    let (rs, py) = (rs.json(), py.json());
    assert_eq!(py["usage"], rs["usage"], "token counts differ");
    assert_eq!(py["model"], "m");
    for (i, (a, b)) in rs["data"]
        .as_array()
        .unwrap()
        .iter()
        .zip(py["data"].as_array().unwrap())
        .enumerate()
    {
        let (a, b) = (
            a["embedding"].as_array().unwrap(),
            b["embedding"].as_array().unwrap(),
        );
        assert_eq!(a.len(), 384);
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "input {i}: vectors differ by up to {worst}");
    }
    // Each input alone gives the same token count (padding is not counted).
    for input in inputs.as_array().unwrap() {
        let rs = client
            .post("/endpoints/rs/invoke", body(input, "base64"))
            .await
            .json();
        let py = client
            .post("/endpoints/py/invoke", body(input, "base64"))
            .await
            .json();
        assert_eq!(py["usage"], rs["usage"], "{input}");
        assert!(py["data"][0]["embedding"].is_string());
    }
    // Errors name the field, as the Rust processor's do.
    for (request, field) in [
        (serde_json::json!({ "input": [] }), "input"),
        (serde_json::json!({ "input": ["a", ""] }), "input[1]"),
        (serde_json::json!({ "input": 5 }), "input"),
        (
            serde_json::json!({ "input": "a", "encoding_format": "hex" }),
            "encoding_format",
        ),
        (
            serde_json::json!({ "input": "a", "dimensions": 8 }),
            "dimensions",
        ),
        (serde_json::json!({ "input": "word ".repeat(300) }), "input"),
    ] {
        let rs = client
            .post("/endpoints/rs/invoke", request.to_string())
            .await;
        let py = client
            .post("/endpoints/py/invoke", request.to_string())
            .await;
        assert_eq!(
            (py.status, rs.status),
            (400, 400),
            "{request}: {}",
            py.text()
        );
        assert_eq!(py.json()["error"]["field"], field, "{request}");
        assert_eq!(rs.json()["error"]["field"], field, "{request}");
    }
    server.stop().await;
}
