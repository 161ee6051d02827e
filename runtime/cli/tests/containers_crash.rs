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
    let server = Serve::start(data.path());
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

    let server = Serve::start(data.path());
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
