//! Data-directory integrity, by fault injection on the real binary: corrupted and truncated
//! compiled components, flipped bits in component blobs, a truncated store, a full disk
//! (a tiny tmpfs), and `kill -9` during writes. After each, the server either serves
//! correctly or refuses to start with a clear message; it never crashes on a request, never
//! serves a component whose digest does not match, and leaves no temporaries behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Serve, WASP, ok, wasp};
use wasp_tests::guests::{HELLO, PII_REDACT};
use wasp_tests::{TestClient, spec};

/// Every file under `dir` (recursively).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Asserts that no temporary of an interrupted write is left in the data directory.
fn assert_no_temporaries(data: &Path) {
    let leftovers: Vec<PathBuf> = files_under(data)
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(".wasp-tmp-") || name.contains(".tmp")
        })
        .collect();
    assert!(leftovers.is_empty(), "temporaries left: {leftovers:?}");
}

/// The compiled-component files in the cache.
fn cached(data: &Path) -> Vec<PathBuf> {
    files_under(&data.join("cache"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect()
}

/// The byte range of the `.text` section of the ELF image inside a compiled component
/// (wasmtime's artefacts are ELF; wasp's header stands in front of it).
fn text_section(bytes: &[u8]) -> std::ops::Range<usize> {
    let base = bytes
        .windows(4)
        .position(|w| w == b"\x7fELF")
        .expect("no ELF image in the compiled component");
    let elf = &bytes[base..];
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(header(shstrndx) + 24);
    for i in 0..shnum {
        let h = header(i);
        let name_at = strtab + u32_at(h);
        let name = &elf[name_at..name_at + 6];
        if name == b".text\0" {
            let (offset, size) = (u64_at(h + 24), u64_at(h + 32));
            return base + offset..base + offset + size;
        }
    }
    panic!("no .text section");
}

async fn deploy(client: &TestClient, wasm: &str, name: &str) {
    client.deploy_ok(wasm, &spec(name, "")).await;
}

async fn greets(client: &TestClient, name: &str) {
    let reply = client.invoke(name, "", r#"{"name":"disk"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["greeting"], "hello, disk!");
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_compiled_component_is_recompiled_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let server = Serve::start(&data);
        let client = server.client();
        deploy(&client, HELLO, "hello").await;
        greets(&client, "hello").await;
        server.kill9();
    }
    // Two kinds of damage: the code section overwritten with int3 (what crashed the server
    // with SIGTRAP before), and a file cut short.
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 2] = [
        ("code section filled", |bytes| {
            let text = text_section(bytes);
            bytes[text].fill(0xcc);
        }),
        ("truncated", |bytes| bytes.truncate(bytes.len() / 2)),
    ];
    for (what, damage) in damages {
        let files = cached(&data);
        assert_eq!(files.len(), 1, "{files:?}");
        let mut bytes = std::fs::read(&files[0]).unwrap();
        damage(&mut bytes);
        std::fs::write(&files[0], &bytes).unwrap();

        let server = Serve::start(&data);
        let client = server.client();
        let status = client.get("/api/v1/endpoints/hello").await.json();
        assert_eq!(status["status"], "ready", "{what}: {status}");
        assert_eq!(
            status["versions"][0]["compiled_from_cache"], false,
            "{what}"
        );
        greets(&client, "hello").await;
        let metrics = client.get("/metrics").await.text();
        assert_eq!(
            metric(
                &metrics,
                "wasp_integrity_failures_total{file=\"compiled_component\"}"
            ),
            1.0,
            "{what}: {metrics}"
        );
        assert!(
            server.stderr().contains("failed its check"),
            "{what}: {}",
            server.stderr()
        );
        server.terminate();

        // The cache was written again, whole: the next start uses it.
        let server = Serve::start(&data);
        let client = server.client();
        let status = client.get("/api/v1/endpoints/hello").await.json();
        assert_eq!(status["versions"][0]["compiled_from_cache"], true, "{what}");
        greets(&client, "hello").await;
        server.terminate();
        assert_no_temporaries(&data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_whose_bytes_changed_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let digest;
    {
        let server = Serve::start(&data);
        let client = server.client();
        deploy(&client, HELLO, "hello").await;
        client.deploy_ok(PII_REDACT, &spec("redact", "")).await;
        digest = client.get("/api/v1/endpoints/hello").await.json()["versions"][0]["component"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_owned();
        server.terminate();
    }
    // Flip bits in the middle of the blob; its compiled form in the cache is intact, but a
    // component whose bytes do not match its digest is not used at all.
    let blob = data.join(format!("components/{digest}.wasm"));
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x41;
    bytes[middle + 7] ^= 0x10;
    std::fs::write(&blob, &bytes).unwrap();

    let server = Serve::start(&data);
    let client = server.client();
    let status = client.get("/api/v1/endpoints/hello").await.json();
    assert_eq!(status["status"], "notReady", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("corrupt") && error.contains("upload it again"),
        "{error}"
    );
    let reply = client.invoke("hello", "", "{}").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "endpoint_failed");
    // Downloading it is refused too; the other endpoint serves on.
    let reply = client
        .get(&format!("/api/v1/components/sha256:{digest}"))
        .await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    let reply = client
        .invoke("redact", "", r#"{"text":"mail a@b.org"}"#)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(!blob.exists(), "the corrupt blob is removed");
    let metrics = client.get("/metrics").await.text();
    assert_eq!(
        metric(
            &metrics,
            "wasp_integrity_failures_total{file=\"component\"}"
        ),
        1.0,
        "{metrics}"
    );

    // Uploading it again and redeploying mends it.
    deploy(&client, HELLO, "hello").await;
    greets(&client, "hello").await;
    server.terminate();
    assert_no_temporaries(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_stops_the_start_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let server = Serve::start(&data);
        let client = server.client();
        deploy(&client, HELLO, "hello").await;
        server.terminate();
    }
    let db = data.join("wasp.redb");
    let bytes = std::fs::read(&db).unwrap();
    std::fs::write(&db, &bytes[..bytes.len() / 3]).unwrap();

    let refused = Serve::try_start(&data, &[])
        .err()
        .expect("started on a truncated store");
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("is damaged") && refused.stderr.contains("wasp store check"),
        "{}",
        refused.stderr
    );
    let check = Command::new(WASP)
        .args(["store", "check", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(stderr.contains("restore a backup"), "{stderr}");

    // With the damaged file moved aside, the server starts empty and keeps the
    // components.
    std::fs::rename(&db, data.join("wasp.redb.damaged")).unwrap();
    let server = Serve::start(&data);
    let client = server.client();
    assert_eq!(
        client.get("/api/v1/endpoints").await.json()["endpoints"],
        serde_json::json!([])
    );
    deploy(&client, HELLO, "hello").await;
    greets(&client, "hello").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_check_and_a_backup_taken_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Serve::start(&data);
    let client = server.client();
    deploy(&client, HELLO, "hello").await;
    client.deploy_ok(PII_REDACT, &spec("redact", "")).await;
    // Stopped state is part of the store.
    assert_eq!(
        client
            .post("/api/v1/endpoints/redact/stop", "")
            .await
            .status,
        200
    );

    // Back up while requests are running.
    let load = {
        let client = client.clone();
        tokio::spawn(async move {
            for _ in 0..50 {
                greets(&client, "hello").await;
            }
        })
    };
    let backup = dir.path().join("backup");
    let url = server.url.clone();
    let path = backup.clone();
    let out = tokio::task::spawn_blocking(move || {
        ok(wasp(&url, &["store", "backup", path.to_str().unwrap()]))
    })
    .await
    .unwrap();
    assert!(out.contains("2 endpoints and 2 components"), "{out}");
    load.await.unwrap();
    let url = server.url.clone();
    let again = tokio::task::spawn_blocking(move || {
        wasp(&url, &["store", "backup", backup.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert!(
        !again.status.success(),
        "a backup must not overwrite a directory"
    );
    let operator_key = server.key.clone();
    server.terminate();

    // The backup is a data directory: checked, then served; the keys came along (hashed),
    // so the operator's key works there too.
    let backup = dir.path().join("backup");
    let check = ok(Command::new(WASP)
        .args(["store", "check", "--data-dir"])
        .arg(&backup)
        .output()
        .unwrap());
    assert!(check.contains("store: intact"), "{check}");
    assert!(check.contains("2 checked, 0 corrupt"), "{check}");
    let restored = Serve::start(&backup);
    assert!(
        !backup.join("operator.key").exists(),
        "a backup holds no key itself"
    );
    let client = TestClient::with_key(restored.addr, &operator_key);
    greets(&client, "hello").await;
    assert_eq!(
        client.get("/api/v1/endpoints/redact").await.json()["status"],
        "stopped"
    );

    // A check of a directory in use says so.
    let busy = Command::new(WASP)
        .args(["store", "check", "--data-dir"])
        .arg(&backup)
        .output()
        .unwrap();
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use by another wasp process"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
}

/// A tmpfs of `mib` MiB mounted on `dir` for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u32) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount -t tmpfs failed on {}",
            dir.display()
        );
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` with one file until it has no room left; returns it.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    loop {
        if let Err(e) = file.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(28), "{e}");
            break;
        }
    }
    // Byte by byte into the last partial block.
    while file.write_all(&[0]).is_ok() {}
    path
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_an_ordinary_error_that_loses_nothing() {
    if !is_root() {
        eprintln!(
            "NOT RUN: a_full_disk_is_an_ordinary_error_that_loses_nothing mounts a tmpfs, \
             which needs root; run the suite as root (CI does)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _tmpfs = Tmpfs::mount(&data, 24);
    let server = Serve::start(&data);
    let client = server.client();
    deploy(&client, HELLO, "hello").await;
    greets(&client, "hello").await;

    // An upload larger than the room left: 507, no path in the message, nothing left over.
    let big = vec![0x5au8; 40 * 1024 * 1024];
    let reply = client.request("PUT", "/api/v1/components", big).await;
    assert_eq!(reply.status, 507, "{}", reply.text());
    let error = reply.json()["error"].clone();
    assert_eq!(error["code"], "insufficient_storage");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("full"), "{message}");
    assert!(!message.contains(dir.path().to_str().unwrap()), "{message}");
    assert_no_temporaries(&data);

    // Now with the disk full to the last byte: uploads, deploys (compiled cache and store)
    // and backups fail cleanly; what is there keeps serving.
    let filler = fill(&data);
    let reply = client
        .request(
            "PUT",
            "/api/v1/components",
            std::fs::read(PII_REDACT).unwrap(),
        )
        .await;
    assert_eq!(reply.status, 507, "{}", reply.text());
    let mut refused_deploys = 0;
    for i in 0..3 {
        let reply = client.deploy(HELLO, &spec(&format!("more-{i}"), "")).await;
        match reply.status {
            507 => {
                refused_deploys += 1;
                assert_eq!(
                    reply.json()["error"]["code"],
                    "insufficient_storage",
                    "{}",
                    reply.text()
                );
            }
            200 | 201 => {}
            other => panic!("deploy on a full disk: {other} {}", reply.text()),
        }
    }
    assert!(refused_deploys > 0, "no deploy met the full disk");
    let reply = client.get("/api/v1/store/snapshot").await;
    assert!(
        reply.status == 507 || reply.status == 503,
        "{} {}",
        reply.status,
        reply.text()
    );
    greets(&client, "hello").await;
    assert_no_temporaries(&data);
    let listed = client.get("/api/v1/endpoints").await.json();
    let acknowledged: Vec<String> = listed["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();

    // Room again: the store reopens and takes writes.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = client.deploy(HELLO, &spec("after", "")).await;
        if reply.status == 200 || reply.status == 201 {
            break;
        }
        assert!(
            reply.status == 503 && Instant::now() < deadline,
            "{} {}",
            reply.status,
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    greets(&client, "after").await;
    server.kill9();

    let server = Serve::start(&data);
    let client = server.client();
    for name in acknowledged
        .iter()
        .map(String::as_str)
        .chain(["hello", "after"])
    {
        greets(&client, name).await;
    }
    server.terminate();
    assert_no_temporaries(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let hello = std::fs::read(HELLO).unwrap();
    let mut acknowledged_endpoints: Vec<String> = Vec::new();
    let mut acknowledged_blobs: Vec<(String, usize)> = Vec::new();
    for round in 0..4u64 {
        let server = Serve::start(&data);
        let client = server.client();
        // Everything acknowledged before is there, whole.
        for name in &acknowledged_endpoints {
            greets(&client, name).await;
        }
        for (digest, len) in &acknowledged_blobs {
            let reply = client.get(&format!("/api/v1/components/{digest}")).await;
            assert_eq!(reply.status, 200, "{digest}: {}", reply.text());
            assert_eq!(reply.body.len(), *len);
        }
        // Writers: large uploads and deploys, until the kill.
        let uploads = {
            let client = client.clone();
            tokio::spawn(async move {
                let mut done = Vec::new();
                for i in 0u64.. {
                    let mut blob = vec![0x5a; 3 * 1024 * 1024 + i as usize];
                    blob[..16].copy_from_slice(&[round.to_le_bytes(), i.to_le_bytes()].concat());
                    let len = blob.len();
                    let reply = match client
                        .try_request_with("PUT", "/api/v1/components", &[], blob)
                        .await
                    {
                        Ok(reply) if reply.status == 201 => reply,
                        _ => break,
                    };
                    done.push((reply.json()["digest"].as_str().unwrap().to_owned(), len));
                    if done.len() >= 64 {
                        break;
                    }
                }
                done
            })
        };
        let deploys = {
            let client = client.clone();
            let hello = hello.clone();
            tokio::spawn(async move {
                let mut done = Vec::new();
                for i in 0.. {
                    let name = format!("r{round}-{i}");
                    let reply = match client
                        .try_request_with("PUT", "/api/v1/components", &[], hello.clone())
                        .await
                    {
                        Ok(reply) if reply.status == 201 => reply,
                        _ => break,
                    };
                    let toml = spec(&name, "")
                        .replace("{COMPONENT}", reply.json()["digest"].as_str().unwrap());
                    let reply = client
                        .try_request_with(
                            "PUT",
                            &format!("/api/v1/endpoints/{name}"),
                            &[("content-type", "application/toml")],
                            toml,
                        )
                        .await;
                    if !matches!(reply, Ok(ref r) if r.status == 201) {
                        break;
                    }
                    done.push(name);
                    if done.len() >= 64 {
                        break;
                    }
                }
                done
            })
        };
        tokio::time::sleep(Duration::from_millis(400 + 230 * round)).await;
        server.kill9();
        // The client answers in flight when the server died are not acknowledgements; the
        // ones it did get are.
        acknowledged_blobs.extend(
            tokio::time::timeout(Duration::from_secs(10), uploads)
                .await
                .unwrap()
                .unwrap(),
        );
        acknowledged_endpoints.extend(
            tokio::time::timeout(Duration::from_secs(10), deploys)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    eprintln!(
        "acknowledged before the kills: {} endpoints, {} uploads",
        acknowledged_endpoints.len(),
        acknowledged_blobs.len()
    );
    assert!(!acknowledged_endpoints.is_empty() && !acknowledged_blobs.is_empty());
    let server = Serve::start(&data);
    let client = server.client();
    for name in &acknowledged_endpoints {
        greets(&client, name).await;
    }
    for (digest, len) in &acknowledged_blobs {
        let reply = client.get(&format!("/api/v1/components/{digest}")).await;
        assert_eq!(reply.status, 200, "{digest}");
        assert_eq!(reply.body.len(), *len);
    }
    server.terminate();
    assert_no_temporaries(&data);
    let _ = std::fs::remove_dir_all(dir.path());
}
