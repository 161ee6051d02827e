//! The `wasp` binary end to end: scaffold a processor, build it for wasm32-wasip2, serve,
//! and drive the server with every CLI command.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Serve, WASP, ok, wasp};

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
    let server = Serve::start(&data);
    let url = server.url.clone();
    let deployed = ok(wasp(
        &url,
        &[
            "deploy",
            "-o",
            "json",
            dir.join("endpoint.toml").to_str().unwrap(),
        ],
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
    let status = ok(wasp(&url, &["status", "-o", "json", "demo"]));
    assert!(
        status.contains("\"compiled_from_cache\": false"),
        "{status}"
    );
    // For people: a summary and a table of versions, no colour codes off a terminal.
    let status = ok(wasp(&url, &["status", "demo"]));
    assert!(status.contains("status:   ready"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("VERSION") && l.contains("INSTANCES")),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("v1") && l.contains("100%")),
        "{status}"
    );
    assert!(!status.contains('\x1b'), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("v1") && l.contains("1 ready / 1 wanted")),
        "{status}"
    );
    assert!(status.contains("v1 worker 1: ready since"), "{status}");
    let logs = ok(wasp(&url, &["logs", "demo"]));
    assert!(logs.contains("handling a request"), "{logs}");

    // The same processor allowed to scale to zero: status and events say so.
    let idle = dir.join("idle.toml");
    let idle_spec = std::fs::read_to_string(dir.join("endpoint.toml"))
        .unwrap()
        .replacen("name = \"demo\"", "name = \"idle\"", 1)
        + "\n[versions.scaling]\nmin_workers = 0\nstable_window_s = 1\npanic_window_s = 1\n\
           scale_down_delay_s = 0\nscale_down_cooldown_s = 0\n";
    std::fs::write(&idle, idle_spec).unwrap();
    ok(wasp(&url, &["deploy", idle.to_str().unwrap()]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        let status = ok(wasp(&url, &["status", "idle"]));
        if status.contains("scaled to zero") || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        status.contains("v1 is scaled to zero: the next request starts a worker"),
        "{status}"
    );
    assert!(status.contains("0 ready / 0 wanted"), "{status}");
    let events = ok(wasp(&url, &["events", "idle"]));
    assert!(
        events.contains("[v1] 1 -> 0 workers (target_tracking)"),
        "{events}"
    );
    let events: serde_json::Value =
        serde_json::from_str(&ok(wasp(&url, &["events", "-o", "json", "idle"]))).unwrap();
    assert_eq!(events["events"][0]["to"], 0);
    ok(wasp(&url, &["rm", "idle"]));

    assert!(ok(wasp(&url, &["stop", "-o", "json", "demo"])).contains("\"stopped\": true"));
    let listed = ok(wasp(&url, &["ls"]));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("demo") && l.contains("stopped")),
        "{listed}"
    );
    assert!(!wasp(&url, &["invoke", "demo", "-d", "{}"]).status.success());
    assert!(ok(wasp(&url, &["start", "-o", "json", "demo"])).contains("\"status\": \"ready\""));
    let logs: serde_json::Value =
        serde_json::from_str(&ok(wasp(&url, &["logs", "-o", "json", "demo"]))).unwrap();
    assert!(!logs["logs"].as_array().unwrap().is_empty());

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
    let server = Serve::start(data.path());
    assert!(ok(wasp(&server.url, &["ls"])).starts_with("NAME"));
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn completions_for_shells() {
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(Command::new(WASP)
            .args(["completions", shell])
            .output()
            .unwrap());
        assert!(
            script.contains("deploy") && script.contains("status"),
            "{shell}: {script}"
        );
    }
    let bad = Command::new(WASP)
        .args(["completions", "cmd"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn server_logs_as_text_without_colours_or_as_json() {
    let data = tempfile::tempdir().unwrap();
    let info = [("WASP_LOG", "info")];
    let server = Serve::try_start_with_env(&data.path().join("a"), &[], &info).unwrap();
    let text = server.stderr();
    assert!(text.contains("wasp is serving"), "{text}");
    assert!(!text.contains('\x1b'), "ANSI codes in a log file: {text}");
    assert_eq!(server.terminate().code(), Some(0));

    let json = ["--log-format", "json"];
    let server = Serve::try_start_with_env(&data.path().join("b"), &json, &info).unwrap();
    let text = server.stderr();
    assert!(text.contains("wasp is serving"), "{text}");
    for line in text.lines() {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(value["level"].is_string(), "{line}");
    }
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn serve_takes_its_http_limits_from_flags() {
    use std::io::{Read, Write};
    let data = tempfile::tempdir().unwrap();
    let server = Serve::try_start(data.path(), &["--header-read-timeout-s", "1"]).unwrap();
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    // The server closes the connection after one second, well before the read timeout.
    let _ = stream.read_to_end(&mut buf);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "the header read timeout of the flag was not applied"
    );
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn serve_names_guest_functions_for_perf_when_asked() {
    use wasp_tests::guests::PII_REDACT;
    let rt = tokio::runtime::Runtime::new().unwrap();
    for flag in [true, false] {
        let data = tempfile::tempdir().unwrap();
        let extra: &[&str] = if flag { &["--guest-perf-map"] } else { &[] };
        let server = Serve::try_start(data.path(), extra).unwrap();
        let map = std::path::PathBuf::from(format!("/tmp/perf-{}.map", server.pid()));
        rt.block_on(async {
            let c = server.client();
            c.deploy_ok(PII_REDACT, &wasp_tests::spec("redact", ""))
                .await;
            let reply = c
                .invoke("redact", "", r#"{"text":"ann@example.org"}"#)
                .await;
            assert_eq!(reply.status, 200, "{}", reply.text());
        });
        let text = std::fs::read_to_string(&map).unwrap_or_default();
        let _ = std::fs::remove_file(&map);
        assert_eq!(server.terminate().code(), Some(0));
        if flag {
            // perf's map format: start, size, name; the guest's own Rust functions named.
            assert!(
                text.lines()
                    .any(|l| l.split(' ').count() >= 3 && l.contains("pii_redact")),
                "no guest function in {}: {} lines",
                map.display(),
                text.lines().count()
            );
        } else {
            assert!(text.is_empty(), "a perf map was written without the flag");
        }
    }
}

#[test]
fn serve_overflows_queues_or_refuses_on_a_full_pool_by_its_flags() {
    use wasp_tests::guests::HELLO;
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Pre-warming never waits for a slot, so `queue` refuses the second deploy too.
    for (policy, second) in [("overflow", 201), ("queue", 503), ("fail", 503)] {
        let data = tempfile::tempdir().unwrap();
        let server = Serve::try_start(
            data.path(),
            &[
                "--max-instances",
                "1",
                "--pool-full",
                policy,
                "--slot-memory-mib",
                "512",
            ],
        )
        .unwrap();
        let c = server.client();
        rt.block_on(async {
            let metrics = c.get("/metrics").await.text();
            let slot = "wasp_instance_pool_slot_memory_bytes 536870912\n";
            assert!(metrics.contains(slot), "{metrics}");
            c.deploy_ok(HELLO, &wasp_tests::spec("one", "")).await;
            // (A call timeout of half a second bounds the queue's wait.)
            let limits = "[versions.limits]\ntimeout_ms = 500";
            let reply = c.deploy(HELLO, &wasp_tests::spec("two", limits)).await;
            assert_eq!(
                reply.status,
                second,
                "--pool-full {policy}: {}",
                reply.text()
            );
            if second == 503 {
                assert_eq!(reply.json()["error"]["code"], "server_full");
            }
        });
        assert_eq!(server.terminate().code(), Some(0));
    }
}

#[test]
fn jobs_and_batches_from_the_cli() {
    let data = tempfile::tempdir().unwrap();
    let server = Serve::start(data.path());
    let url = server.url.clone();
    let spec = data.path().join("hello.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"hello\"\n[[versions]]\nname = \"v1\"\n[versions.processor]\ncomponent = {:?}\n",
            wasp_tests::guests::HELLO
        ),
    )
    .unwrap();
    ok(wasp(&url, &["deploy", spec.to_str().unwrap()]));

    // A batch: progress on standard error, the output file one line per input line.
    let input = data.path().join("in.jsonl");
    let lines: String = (1..=300)
        .map(|i| format!("{{\"name\":\"n{i}\"}}\n"))
        .collect();
    std::fs::write(&input, lines).unwrap();
    let output = data.path().join("out.jsonl");
    let run = wasp(
        &url,
        &[
            "batch",
            "submit",
            "hello",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("300/300 lines (0 failed)"), "{stderr}");
    assert!(stderr.contains("COMPLETED"), "{stderr}");
    let written = std::fs::read_to_string(&output).unwrap();
    let out: Vec<serde_json::Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), 300);
    assert_eq!(out[299]["output"]["greeting"], "hello, n300!");
    let listed = ok(wasp(&url, &["batch", "ls"]));
    assert!(
        listed
            .lines()
            .any(|l| l.contains("hello") && l.contains("300/300")),
        "{listed}"
    );
    // A bad line is refused with its number.
    std::fs::write(&input, "{\"name\":\"a\"}\nnot json\n").unwrap();
    let refused = wasp(&url, &["batch", "submit", "hello", input.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("line 2"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Jobs: submitted, listed, shown, and a finished one refuses a cancel.
    let submitted = ok(wasp(
        &url,
        &[
            "jobs",
            "submit",
            "hello",
            "-d",
            r#"{"name":"cli"}"#,
            "--wait",
            "-o",
            "json",
        ],
    ));
    let submitted: serde_json::Value = serde_json::from_str(&submitted).unwrap();
    assert_eq!(submitted["status"], "COMPLETED", "{submitted:#}");
    let id = submitted["id"].as_str().unwrap().to_owned();
    let listed = ok(wasp(&url, &["jobs", "ls", "--endpoint", "hello"]));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("COMPLETED")),
        "{listed}"
    );
    let shown = ok(wasp(&url, &["jobs", "show", &id]));
    assert!(shown.contains("status:    COMPLETED"), "{shown}");
    assert!(shown.contains("attempt 1: ok"), "{shown}");
    assert!(shown.contains("hello, cli!"), "{shown}");
    let refused = wasp(&url, &["jobs", "cancel", &id]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("only a job IN_QUEUE or IN_PROGRESS")
    );
}

#[test]
fn tenants_keys_and_login_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials.toml");
    // The first start writes its operator key where this machine's CLI finds it.
    let server = Serve::try_start_with_env(
        &dir.path().join("data"),
        &[],
        &[
            ("WASP_LOG", "warn"),
            ("WASP_CREDENTIALS", credentials.to_str().unwrap()),
        ],
    )
    .unwrap();
    let plain = |args: &[&str], key: Option<&str>, stdin: &str| {
        let mut command = Command::new(WASP);
        command
            .arg("--server")
            .arg(&server.url)
            .args(args)
            .env("WASP_CREDENTIALS", &credentials)
            .env_remove("WASP_API_KEY");
        if let Some(key) = key {
            command.env("WASP_API_KEY", key);
        }
        common::with_stdin(&mut command, stdin)
    };
    let me = ok(plain(&["whoami"], None, ""));
    assert!(me.contains("role operator"), "{me}");

    ok(plain(&["tenant", "create", "acme"], None, ""));
    let listed = ok(plain(&["tenant", "ls"], None, ""));
    assert!(
        listed.contains("acme") && listed.contains("default"),
        "{listed}"
    );
    let made = plain(
        &["key", "create", "--tenant", "acme", "--role", "admin"],
        None,
        "",
    );
    let key = ok(made).trim().to_owned();
    assert!(key.starts_with("wasp_"), "{key}");
    let quota = ok(plain(
        &[
            "tenant",
            "quota",
            "acme",
            "--endpoints",
            "3",
            "--queued-jobs",
            "10",
        ],
        None,
        "",
    ));
    assert!(quota.contains("\"endpoints\":3"), "{quota}");
    let limited = ok(plain(
        &[
            "key",
            "create",
            "--tenant",
            "acme",
            "--rps",
            "5",
            "--max-concurrent",
            "2",
            "-o",
            "json",
        ],
        None,
        "",
    ));
    assert!(limited.contains("\"max_concurrent\": 2"), "{limited}");
    let usage = ok(plain(&["usage"], None, ""));
    assert!(
        usage.contains("GUEST_CPU_S") && usage.contains("acme"),
        "{usage}"
    );
    let audit = ok(plain(&["audit"], None, ""));
    assert!(
        audit.contains("POST   /api/v1/tenants -> 201")
            && audit.contains("PUT    /api/v1/tenants/acme/quota -> 200"),
        "{audit}"
    );

    // A bad key is refused with what to do, and `login` keeps nothing.
    let refused = plain(&["login"], Some("wasp_0_bad"), "");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{refused:?}"
    );
    // `login` takes the key from standard input, checks it, and keeps it.
    let login = ok(plain(&["login"], None, &format!("{key}\n")));
    assert!(login.contains("tenant acme (admin)"), "{login}");
    let me = ok(plain(&["whoami"], None, ""));
    assert!(me.contains("tenant acme, role admin"), "{me}");
    let keys = ok(plain(&["key", "ls"], None, ""));
    assert!(
        keys.contains("acme") && !keys.contains("operator"),
        "{keys}"
    );
    // Registry logins: the password from standard input, never printed back.
    let logged = ok(plain(
        &["registry", "login", "ghcr.io", "--username", "robot"],
        None,
        "tok3n-secret\n",
    ));
    assert!(
        logged.contains("logged in to `ghcr.io` as `robot`"),
        "{logged}"
    );
    let logins = ok(plain(&["registry", "ls"], None, ""));
    assert!(
        logins.contains("ghcr.io") && logins.contains("robot") && !logins.contains("tok3n"),
        "{logins}"
    );
    ok(plain(&["registry", "logout", "ghcr.io"], None, ""));
    assert!(!ok(plain(&["registry", "ls"], None, "")).contains("ghcr.io"));
    let empty = plain(&["registry", "login", "ghcr.io", "-u", "robot"], None, "");
    assert!(!empty.status.success());
    let forbidden = plain(&["tenant", "ls"], None, "");
    assert!(!forbidden.status.success());
    assert!(String::from_utf8_lossy(&forbidden.stderr).contains("403"));
    let id = key.split('_').nth(1).unwrap().to_owned();
    ok(plain(&["key", "revoke", &id], Some(&server.key), ""));
    let revoked = plain(&["whoami"], None, "");
    assert!(!revoked.status.success());
}

#[test]
fn records_are_saved_and_replayed_against_another_version() {
    let data = tempfile::tempdir().unwrap();
    let server = Serve::start(data.path());
    let url = server.url.clone();
    let spec = data.path().join("rec.toml");
    let version = |name: &str, weight: u32, answer: &str| {
        format!(
            "[[versions]]\nname = \"{name}\"\nweight = {weight}\n[versions.processor]\n\
             component = {:?}\nenv = {{ ANSWER = \"{answer}\" }}\n",
            wasp_tests::guests::HOSTILE
        )
    };
    std::fs::write(
        &spec,
        format!(
            "name = \"rec\"\n[records]\n{}{}{}",
            version("v1", 100, "one"),
            version("v2", 0, "one"),
            version("v3", 0, "three"),
        ),
    )
    .unwrap();
    ok(wasp(&url, &["deploy", spec.to_str().unwrap()]));
    for path in ["/ok", "/config", "/echo"] {
        ok(wasp(
            &url,
            &["invoke", "rec", "--path", path, "-d", "{\"n\": 1}"],
        ));
    }
    let saved = data.path().join("records.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = wasp(&url, &["records", "rec", "--save", saved.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        if std::fs::read_to_string(&saved).unwrap().lines().count() == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let listed = ok(wasp(&url, &["records", "rec"]));
    assert!(listed.contains(".jsonl"), "{listed}");
    // The same configuration answers as recorded.
    let same = ok(wasp(
        &url,
        &[
            "replay",
            "rec",
            "--version",
            "v2",
            "--records",
            saved.to_str().unwrap(),
        ],
    ));
    assert!(
        same.contains("replayed 3 to version v2: 3 as recorded, 0 differ"),
        "{same}"
    );
    // Another answers `/config` differently: named, and the exit status says so.
    let differs = wasp(
        &url,
        &[
            "replay",
            "rec",
            "--version",
            "v3",
            "--records",
            saved.to_str().unwrap(),
        ],
    );
    assert!(!differs.status.success());
    let out = String::from_utf8_lossy(&differs.stdout);
    assert!(
        out.contains("/config") && out.contains(r#"body differs at $[0][1]: "one" -> "three""#),
        "{out}"
    );
    assert!(out.contains("2 as recorded, 1 differ"), "{out}");
    let missing = wasp(
        &url,
        &[
            "replay",
            "rec",
            "--version",
            "v9",
            "--records",
            saved.to_str().unwrap(),
        ],
    );
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no version `v9`"));
}

#[test]
fn grpc_is_served_with_the_https_certificate_and_the_same_keys() {
    let python = wasp_tests::process::root().join("target/tools/triton/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `scripts/toolchain triton` (./x test does)",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "localhost");
    let server = Serve::try_start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--grpc-listen",
            "127.0.0.1:0",
        ],
    )
    .unwrap();
    let grpc = server.grpc.expect("no gRPC address printed");
    // Triton's own gRPC client over TLS, trusting the server's certificate: live, and the
    // server's metadata with the operator key; without a key, refused as over HTTP.
    let script = r#"
import sys
import tritonclient.grpc as grpc
from tritonclient.utils import InferenceServerException
url, ca, key = sys.argv[1:4]
client = grpc.InferenceServerClient(url=url, ssl=True, root_certificates=ca,
                                    channel_args=[("grpc.ssl_target_name_override", "localhost")])
assert client.is_server_live(headers={"authorization": f"Bearer {key}"})
print(client.get_server_metadata(headers={"authorization": f"Bearer {key}"}).name)
try:
    client.get_model_metadata("anything")
    print("no error")
except InferenceServerException as e:
    print(e.status(), e.message())
plain = grpc.InferenceServerClient(url=url)
try:
    plain.is_server_live()
    print("plain served")
except InferenceServerException as e:
    print("plain refused")
"#;
    let output = std::process::Command::new(python)
        .args([
            "-c",
            script,
            &grpc.to_string(),
            cert.to_str().unwrap(),
            &server.key,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "wasp", "{stdout}");
    assert!(
        lines[1].starts_with("StatusCode.UNAUTHENTICATED") && lines[1].contains("API key"),
        "{stdout}"
    );
    assert_eq!(lines[2], "plain refused", "{stdout}");
}

/// A self-signed certificate for `host` and its key, written as PEM files in `dir`.
fn self_signed(dir: &Path, host: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[test]
fn the_cli_speaks_https_to_a_server_with_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "127.0.0.1");
    let server = Serve::try_start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(server.url.starts_with("https://"), "{}", server.url);
    // Trusted through --ca-cert: the key goes over TLS.
    let me = ok(wasp(
        &server.url,
        &["--ca-cert", cert.to_str().unwrap(), "whoami"],
    ));
    assert!(me.contains("role operator"), "{me}");
    // Not trusted: refused, saying why.
    let refused = wasp(&server.url, &["whoami"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");
    // A flag pointing at no certificate is named.
    let bad = wasp(&server.url, &["--ca-cert", "/nonexistent.pem", "whoami"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--ca-cert"));
}
