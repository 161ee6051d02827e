//! The `wasp` binary end to end: scaffold a processor, build it for wasm32-wasip2, serve,
//! and drive the server with every CLI command.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

const WASP: &str = env!("CARGO_BIN_EXE_wasp");

fn wasp(server: &str, args: &[&str]) -> Output {
    Command::new(WASP)
        .arg("--server")
        .arg(server)
        .args(args)
        .output()
        .unwrap()
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(data: &Path) -> (Serve, String) {
    let mut child = Command::new(WASP)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("WASP_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("wasp listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_owned();
    (Serve(child), url)
}

#[test]
fn scaffold_build_deploy_and_drive_with_the_cli() {
    let work = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");

    // `wasp processor new` writes a crate that builds for wasm32-wasip2 as it is.
    let dir = work.path().join("demo");
    ok(Command::new(WASP)
        .args(["processor", "new", "demo", "--dir"])
        .arg(&dir)
        .output()
        .unwrap());
    let again = Command::new(WASP)
        .args(["processor", "new", "demo", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "scaffolding over a crate must refuse"
    );
    let build = Command::new(env!("CARGO"))
        .args(["build", "--release"])
        .current_dir(&dir)
        // Share compiled dependencies with the test guests.
        .env("CARGO_TARGET_DIR", root.join("target/guests"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .unwrap();
    ok(build);
    let wasm = root.join("target/guests/wasm32-wasip2/release/demo.wasm");
    assert!(wasm.exists());
    let spec = std::fs::read_to_string(dir.join("endpoint.toml"))
        .unwrap()
        .replace(
            "target/wasm32-wasip2/release/demo.wasm",
            &wasm.display().to_string(),
        );
    std::fs::write(dir.join("endpoint.toml"), spec).unwrap();

    let data = work.path().join("data");
    let (_server, url) = serve(&data);
    let deployed = ok(wasp(
        &url,
        &["deploy", dir.join("endpoint.toml").to_str().unwrap()],
    ));
    let deployed: serde_json::Value = serde_json::from_str(&deployed).unwrap();
    assert_eq!(deployed["status"], "ready");

    let answer = ok(wasp(&url, &["invoke", "demo", "-d", r#"{"text":"héllo"}"#]));
    let answer: serde_json::Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({ "processor": "demo", "length": 5 })
    );

    let bad = wasp(&url, &["invoke", "demo", "-d", "{"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("not valid JSON"));

    let list = ok(wasp(&url, &["ls"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("demo") && l.contains("ready")),
        "{list}"
    );
    let status = ok(wasp(&url, &["status", "demo"]));
    assert!(
        status.contains("\"compiled_from_cache\": false"),
        "{status}"
    );
    let logs = ok(wasp(&url, &["logs", "demo"]));
    assert!(logs.contains("handling a request"), "{logs}");

    assert!(ok(wasp(&url, &["stop", "demo"])).contains("\"stopped\": true"));
    assert!(!wasp(&url, &["invoke", "demo", "-d", "{}"]).status.success());
    assert!(ok(wasp(&url, &["start", "demo"])).contains("\"status\": \"ready\""));

    let typo = dir.join("typo.toml");
    std::fs::write(
        &typo,
        "name = \"t\"\nreplicas = 3\n[[versions]]\nname = \"v\"\n",
    )
    .unwrap();
    let refused = wasp(&url, &["deploy", typo.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown field `replicas`"));

    ok(wasp(&url, &["rm", "demo"]));
    let gone = wasp(&url, &["status", "demo"]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no endpoint named `demo`"));
}

#[test]
fn serve_shuts_down_cleanly_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let (mut server, url) = serve(data.path());
    assert!(ok(wasp(&url, &["ls"])).starts_with("NAME"));
    let pid = server.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = server.0.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}
