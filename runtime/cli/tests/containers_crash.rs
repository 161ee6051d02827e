//! Container workers against `kill -9` of the real binary: the process driver's containers
//! outlive a killed server (they lead their own process groups), and the next start on the
//! same data directory stops them before it starts the endpoint's new ones. A graceful
//! stop of the server stops its containers too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Serve;
use wasp_tests::guests::HOSTILE;

/// The pids the process driver has on record in `data`.
fn recorded(data: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir(data.join("containers"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".json")?.parse().ok()
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Whether `pid` runs (a zombie waiting for its reaper does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat[stat.rfind(')')? + 2..].chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// `wasp serve` with container backends as local processes.
fn start(data: &Path) -> Serve {
    Serve::try_start(data, &["--process-containers"]).unwrap()
}

/// [`until`], printing the server's log if it times out.
fn until_or(log: &str, what: &str, check: impl FnMut() -> bool) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| until(what, check)));
    if let Err(e) = result {
        eprintln!("the server's log:\n{log}");
        std::panic::resume_unwind(e);
    }
}

fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_kill_9_leaves_no_orphaned_container() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path());
    let spec = "name = \"web\"\n[[versions]]\nname = \"v1\"\n[versions.backend]\n\
        kind = \"container\"\nimage = \"python\"\nport = 8000\n\
        command = \"exec python3 -m http.server $PORT --bind 127.0.0.1\"\n\
        readiness = { path = \"/\" }\n[versions.processor]\ncomponent = \"{COMPONENT}\"\n";
    server.client().deploy_ok(HOSTILE, spec).await;
    let first = recorded(data.path());
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(alive(first[0]));

    server.kill9();
    // Nothing stopped it: it is an orphan now.
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(first[0]), "the container died with the server");

    let server = start(data.path());
    until("the orphan to be stopped", || !alive(first[0]));
    // The endpoint came back with a container of its own.
    let status = server.client().get("/api/v1/endpoints/web").await.json();
    assert_eq!(status["status"], "ready", "{status}");
    let second = recorded(data.path());
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first);
    assert!(alive(second[0]));

    // A graceful stop of the server stops its container (SIGTERM).
    assert!(server.terminate().success());
    until("the container to stop with the server", || {
        !alive(second[0])
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_are_offered_only_when_the_operator_says_how_to_run_them() {
    let data = tempfile::tempdir().unwrap();
    let server = Serve::start(data.path());
    let spec = "name = \"web\"\n[[versions]]\nname = \"v1\"\n[versions.backend]\n\
        kind = \"container\"\nimage = \"python\"\nport = 8000\ncommand = \"true\"\n\
        [versions.processor]\ncomponent = \"{COMPONENT}\"\n";
    let reply = server.client().deploy(HOSTILE, spec).await;
    let text = reply.text();
    assert_eq!(reply.status, 422, "{text}");
    assert_eq!(
        reply.json()["error"]["field"],
        "versions[0].backend.kind",
        "{text}"
    );
    assert!(text.contains("--container-engine"), "{text}");
    // Nothing ran.
    assert!(recorded_or_none(data.path()).is_empty());
}

fn recorded_or_none(data: &Path) -> Vec<u32> {
    if data.join("containers").is_dir() {
        recorded(data)
    } else {
        Vec::new()
    }
}

/// The containers of this engine labelled with `endpoint`.
fn engine_containers(socket: &str, endpoint: &str) -> Vec<String> {
    let filters = format!("{{\"label\":[\"wasp.endpoint={endpoint}\"]}}");
    let out = std::process::Command::new("curl")
        .args(["-s", "-G", "--unix-socket", socket])
        .arg("http://engine/v1.41/containers/json")
        .args(["--data-urlencode", "all=true", "--data-urlencode"])
        .arg(format!("filters={filters}"))
        .output()
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["Id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_engine_a_restart_after_kill_9_removes_the_orphan() {
    let Some(socket) = wasp_tests::test_engine("the engine's kill -9 test") else {
        return;
    };
    // The container: wasp itself, the simplest HTTP server at hand, as a minimal image.
    let image = wasp_tests::image_from_binary(
        common::WASP,
        "localhost/wasp-as-container:test",
        &["serve", "--listen", "0.0.0.0:8080", "--data-dir", "/data"],
    );
    let data = tempfile::tempdir().unwrap();
    let engine = format!("unix://{socket}");
    let start = || {
        Serve::try_start_with_env(
            data.path(),
            &["--container-engine", &engine],
            &[("WASP_LOG", "info")],
        )
        .unwrap()
    };
    let server = start();
    let endpoint = format!("orphan-{}", std::process::id());
    let spec = format!(
        "name = \"{endpoint}\"\n[[versions]]\nname = \"v1\"\n[versions.backend]\n\
         kind = \"container\"\nimage = \"{image}\"\nport = 8080\npull = \"never\"\n\
         readiness = {{ path = \"/healthz\" }}\n\
         [versions.processor]\ncomponent = \"{{COMPONENT}}\"\n"
    );
    server.client().deploy_ok(HOSTILE, &spec).await;
    let first = engine_containers(&socket, &endpoint);
    assert_eq!(first.len(), 1, "{first:?}");

    server.kill9();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        engine_containers(&socket, &endpoint),
        first,
        "the container went with the server"
    );

    let server = start();
    let second = engine_containers(&socket, &endpoint);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first, "the orphan is still there");
    // SIGTERM; the server is kept (not waited for) so that its log can be read.
    let pid = server.pid();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    until("the server to exit", || !alive(pid));
    let log = server.stderr();
    until_or(&log, "the container to go with the server", || {
        engine_containers(&socket, &endpoint).is_empty()
    });
}
