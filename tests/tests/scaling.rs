//! Serverless scaling end to end, on a real server: workers follow the load, down to zero
//! and back, with processor instances scaled together with them; a candle embeddings
//! endpoint over the real all-MiniLM-L6-v2 weights does the same.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasp_tests::guests::{HELLO, HOSTILE, TEXT_EMBEDDINGS};
use wasp_tests::{TestClient, TestServer, minilm_dir, minilm_spec, spec};

/// Scaling that reacts within seconds, for tests.
const FAST: &str = "stable_window_s = 1\npanic_window_s = 1\nscale_down_delay_s = 0\n\
                    scale_up_cooldown_s = 0\nscale_down_cooldown_s = 0";

/// Polls the endpoint's detail until `done` holds for its first version, or panics after
/// `within`.
async fn wait_for(
    c: &TestClient,
    name: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let detail = c.get(&format!("/api/v1/endpoints/{name}")).await.json();
        if done(&detail["versions"][0]) {
            return detail;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: not {what} within {within:?}: {detail:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn scaled_to_zero(v: &Value) -> bool {
    v["status"] == "scaledToZero"
        && v["desired_workers"] == 0
        && v["workers"].as_array().is_some_and(Vec::is_empty)
        && v["instances"]["idle"] == 0
        && v["instances"]["busy"] == 0
}

/// Deploys `hello` as `name` with up to two workers and none at rest, and waits until the
/// worker the deploy started (to prove the version can run) has gone.
async fn deploy_scaled_to_zero(c: &TestClient, name: &str) {
    let scaling = format!("[versions.scaling]\nmin_workers = 0\nmax_workers = 2\n{FAST}");
    c.deploy_ok(HELLO, &spec(name, &scaling)).await;
    wait_for(
        c,
        name,
        Duration::from_secs(15),
        "scaled to zero",
        scaled_to_zero,
    )
    .await;
}

fn metric(text: &str, name: &str, endpoint: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(&format!("endpoint=\"{endpoint}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_endpoint_scales_to_zero_and_a_request_wakes_it() {
    let t = TestServer::start().await;
    let c = &t.client;
    deploy_scaled_to_zero(c, "sleepy").await;
    let listed = c.get("/api/v1/endpoints").await.json();
    assert_eq!(listed["endpoints"][0]["status"], "ready", "{listed:#}");

    let reply = c.invoke("sleepy", "", r#"{"name":"zero"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.text().contains("zero"));
    let metrics = c.get("/metrics").await.text();
    assert_eq!(
        metric(&metrics, "wasp_cold_starts_total", "sleepy"),
        1.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("wasp_cold_start_seconds_count{endpoint=\"sleepy\",version=\"v1\"} 1")
    );

    // Idle again: back to zero workers and zero instances.
    wait_for(
        c,
        "sleepy",
        Duration::from_secs(15),
        "scaled to zero again",
        scaled_to_zero,
    )
    .await;
    let events = c.get("/api/v1/endpoints/sleepy/events").await.json();
    let triggers: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["trigger"].as_str().unwrap())
        .collect();
    assert_eq!(
        triggers,
        ["target_tracking", "wake", "target_tracking"],
        "{events:#}"
    );
    let wake = &events["events"][1];
    assert_eq!(
        (wake["from"].as_u64(), wake["to"].as_u64()),
        (Some(0), Some(1))
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_workers_one_never_scales_to_zero() {
    let t = TestServer::start().await;
    let c = &t.client;
    let scaling = format!("[versions.scaling]\nmin_workers = 1\nmax_workers = 2\n{FAST}");
    c.deploy_ok(HELLO, &spec("awake", &scaling)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let detail = c.get("/api/v1/endpoints/awake").await.json();
    let v = &detail["versions"][0];
    assert_eq!(v["status"], "ready", "{detail:#}");
    assert_eq!(v["desired_workers"], 1);
    assert_eq!(v["workers"][0]["state"], "ready");
    assert_eq!(v["instances"]["idle"], 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_step_raises_workers_and_every_request_succeeds() {
    let t = TestServer::start().await;
    let c = t.client.clone();
    let scaling = format!(
        "[versions.limits]\nmax_instances = 64\n[versions.scaling]\nmin_workers = 1\n\
         max_workers = 4\ntarget_concurrency = 2\ninstances_per_worker = 2\n{FAST}"
    );
    c.deploy_ok(HOSTILE, &spec("step", &scaling)).await;
    // Sixteen clients, each with a 100 ms request in flight at all times, for 4 s.
    let until = Instant::now() + Duration::from_secs(4);
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, Vec::new());
                while Instant::now() < until {
                    let reply = c.invoke("step", "/sleep", "100").await;
                    if reply.status == 200 {
                        ok += 1;
                    } else {
                        failed.push(reply.text());
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let most = {
        let mut most = 0;
        while Instant::now() < until {
            let detail = c.get("/api/v1/endpoints/step").await.json();
            let ready = detail["versions"][0]["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["state"] == "ready")
                .count();
            most = most.max(ready);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        most
    };
    let mut total = 0;
    for client in clients {
        let (ok, failed) = client.await.unwrap();
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        total += ok;
    }
    assert!(total > 100, "only {total} requests");
    // 16 in flight need 8 workers at a target of 2 each; +200% a minute caps the step.
    assert_eq!(most, 3, "the most ready workers during the step");
    let events = c.get("/api/v1/endpoints/step/events").await.json();
    let ups: Vec<(u64, u64)> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["to"].as_u64() > e["from"].as_u64())
        .map(|e| (e["from"].as_u64().unwrap(), e["to"].as_u64().unwrap()))
        .collect();
    assert_eq!(ups, [(1, 3)], "{events:#}");
    // The load gone, workers come off one at a time down to min_workers.
    let detail = wait_for(
        &c,
        "step",
        Duration::from_secs(20),
        "back at one worker",
        |v| v["desired_workers"] == 1 && v["workers"].as_array().is_some_and(|w| w.len() == 1),
    )
    .await;
    assert_eq!(detail["versions"][0]["status"], "ready");
    t.stop().await;
}

/// An embeddings endpoint over all-MiniLM-L6-v2 that may scale to zero.
fn minilm_at_zero(name: &str) -> String {
    minilm_spec(
        name,
        &format!("[versions.scaling]\nmin_workers = 0\nmax_workers = 1\n{FAST}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embeddings_endpoint_unloads_its_model_at_zero_and_reloads_it_on_demand() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_at_zero("mini")).await;
    let body = json!({ "model": "mini", "input": "a sentence to embed" }).to_string();
    let warm = c.post("/v1/embeddings", body.clone()).await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    let expected = warm.json()["data"][0]["embedding"].clone();
    wait_for(
        c,
        "mini",
        Duration::from_secs(20),
        "scaled to zero",
        scaled_to_zero,
    )
    .await;

    // The request waits while a worker loads the model, then gets the same vector.
    let cold = c.post("/v1/embeddings", body).await;
    assert_eq!(cold.status, 200, "{}", cold.text());
    assert_eq!(cold.json()["data"][0]["embedding"], expected);
    let detail = c.get("/api/v1/endpoints/mini").await.json();
    let worker = &detail["versions"][0]["workers"][0];
    assert_eq!(worker["state"], "ready", "{detail:#}");
    assert!(
        worker["model"]
            .as_str()
            .unwrap()
            .contains("all-MiniLM-L6-v2")
    );
    let metrics = c.get("/metrics").await.text();
    assert_eq!(metric(&metrics, "wasp_cold_starts_total", "mini"), 1.0);

    wait_for(
        c,
        "mini",
        Duration::from_secs(20),
        "scaled to zero again",
        scaled_to_zero,
    )
    .await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_start_on_wake_is_a_503_with_the_reason() {
    let t = TestServer::start().await;
    let c = &t.client;
    // The model from a directory of its own, which the test then takes away.
    let models = tempfile::tempdir().unwrap();
    let copy = models.path().join("minilm");
    std::fs::create_dir(&copy).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(minilm_dir().join(file), copy.join(file)).unwrap();
    }
    let spec = minilm_at_zero("fragile").replace(
        "model = \"all-MiniLM-L6-v2\"",
        &format!("model = {:?}", copy.display().to_string()),
    );
    c.deploy_ok(TEXT_EMBEDDINGS, &spec).await;
    wait_for(
        c,
        "fragile",
        Duration::from_secs(20),
        "scaled to zero",
        scaled_to_zero,
    )
    .await;
    std::fs::rename(&copy, models.path().join("gone")).unwrap();
    let body = json!({ "model": "fragile", "input": "hello" }).to_string();
    let reply = c.post("/v1/embeddings", body.clone()).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "worker_failed");
    assert!(reply.text().contains("minilm"), "{}", reply.text());
    assert_eq!(reply.header("retry-after"), Some("1"));
    let detail = c.get("/api/v1/endpoints/fragile").await.json();
    let worker = &detail["versions"][0]["workers"][0];
    assert_eq!(worker["state"], "failed", "{detail:#}");
    assert!(worker["reason"].as_str().is_some());
    // The model back, the next request starts a new worker and is served.
    std::fs::rename(models.path().join("gone"), &copy).unwrap();
    let reply = c.post("/v1/embeddings", body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_are_never_shared_and_an_over_ask_waits_with_its_reason() {
    let t = TestServer::start_with_gpus(wasp_gateway::Inventory::parse("fake:8").unwrap()).await;
    let c = &t.client;
    for (name, gpus) in [("two", 2), ("four", 4), ("more", 4)] {
        let scaling = format!("[versions.scaling]\ngpus_per_worker = {gpus}");
        c.deploy_ok(HELLO, &spec(name, &scaling)).await;
    }
    let worker = |detail: &Value| detail["versions"][0]["workers"][0].clone();
    let gpus = |w: &Value| -> Vec<u64> {
        w["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_u64().unwrap())
            .collect()
    };
    let two = worker(&c.get("/api/v1/endpoints/two").await.json());
    let four = worker(&c.get("/api/v1/endpoints/four").await.json());
    let more = worker(&c.get("/api/v1/endpoints/more").await.json());
    assert_eq!(
        (two["state"].as_str(), gpus(&two)),
        (Some("ready"), vec![0, 1])
    );
    assert_eq!(
        (four["state"].as_str(), gpus(&four)),
        (Some("ready"), vec![2, 3, 4, 5])
    );
    assert_eq!(more["state"], "pending", "{more:#}");
    assert!(gpus(&more).is_empty());
    assert_eq!(more["reason"], "needs 4 GPUs; 2 of 8 are free");
    let metrics = c.get("/metrics").await.text();
    assert!(metrics.contains("wasp_workers{endpoint=\"more\",version=\"v1\",state=\"pending\"} 1"));

    // GPUs freed by a removed endpoint go to the worker that waits for them.
    assert_eq!(
        c.request("DELETE", "/api/v1/endpoints/two", "")
            .await
            .status,
        204
    );
    let detail = wait_for(
        c,
        "more",
        Duration::from_secs(10),
        "ready on freed GPUs",
        |v| v["workers"][0]["state"] == "ready",
    )
    .await;
    let got = gpus(&worker(&detail));
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|g| ![2, 3, 4, 5].contains(g)), "{got:?}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_for_gpus_a_server_lacks_is_refused_at_deploy() {
    let t = TestServer::start().await;
    let c = &t.client;
    let reply = c
        .deploy(
            HELLO,
            &spec("gpu", "[versions.scaling]\ngpus_per_worker = 1"),
        )
        .await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(
        reply.json()["error"]["field"],
        "versions[0].scaling.gpus_per_worker"
    );
    assert!(reply.text().contains("no GPUs"));
    t.stop().await;
    let t = TestServer::start_with_gpus(wasp_gateway::Inventory::parse("fake:2").unwrap()).await;
    let reply = t
        .client
        .deploy(
            HELLO,
            &spec("gpu", "[versions.scaling]\ngpus_per_worker = 4"),
        )
        .await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert!(
        reply
            .text()
            .contains("asks for 4 GPUs per worker; this server has 2")
    );
    let reply = t
        .client
        .deploy(
            HELLO,
            &spec("gpu", "[versions.scaling]\ngpus_per_worker = 9"),
        )
        .await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(
        reply.json()["error"]["field"],
        "versions[0].scaling.gpus_per_worker"
    );
    t.stop().await;
}

/// An embeddings endpoint over all-MiniLM-L6-v2 with this processor configuration and
/// batching.
fn minilm_with(name: &str, max_tokens: u32, max_batch: u32) -> String {
    minilm_spec(
        name,
        &format!("[versions.batching]\nmax_batch = {max_batch}"),
    ) + &format!("env = {{ MAX_TOKENS = \"{max_tokens}\" }}\n")
}

/// Clients posting embeddings requests until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u32, Vec<String>)>>,
}

impl Load {
    fn start(c: &TestClient, name: &str, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|i| {
                let (c, stop, name) = (c.clone(), stop.clone(), name.to_owned());
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        let body = json!({ "model": name, "input": format!("sentence {i}") });
                        let reply = c.post("/v1/embeddings", body.to_string()).await;
                        if reply.status == 200 {
                            ok += 1;
                        } else {
                            failed.push(format!("{} {}", reply.status, reply.text()));
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the clients; asserts that none saw a failure; the requests served.
    async fn finish(self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for task in self.tasks {
            let (ok, failed) = task.await.unwrap();
            assert!(failed.is_empty(), "failed during the update: {failed:?}");
            total += ok;
        }
        total
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_under_load_lose_no_request_and_a_processor_change_keeps_the_model() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_with("live", 256, 32))
        .await;
    let before = c.get("/api/v1/endpoints/live").await.json();
    let worker = before["versions"][0]["workers"][0].clone();

    // A processor-only change (its configuration) under load.
    let load = Load::start(c, "live", 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_with("live", 8, 32))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(load.finish().await > 0);
    let after = c.get("/api/v1/endpoints/live").await.json();
    let kept = &after["versions"][0]["workers"][0];
    assert_eq!(
        (&kept["id"], &kept["since_ms"]),
        (&worker["id"], &worker["since_ms"]),
        "the model was loaded again: {after:#}"
    );
    assert!(kept["requests"].as_u64().unwrap() > worker["requests"].as_u64().unwrap());
    // The new processor configuration is in force.
    let long =
        json!({ "model": "live", "input": "one two three four five six seven eight nine ten" });
    let refused = c.post("/v1/embeddings", long.to_string()).await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert_eq!(refused.json()["error"]["field"], "input");

    // A model-side change (batching) under load: new workers, ready before the old go.
    let load = Load::start(c, "live", 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_with("live", 8, 4))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(load.finish().await > 0);
    let replaced = c.get("/api/v1/endpoints/live").await.json();
    let fresh = &replaced["versions"][0]["workers"][0];
    assert!(
        fresh["since_ms"].as_u64() > kept["since_ms"].as_u64(),
        "the model-side change kept the old worker: {replaced:#}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_side_update_starts_as_many_workers_as_were_running() {
    let t = TestServer::start().await;
    let c = &t.client;
    let spec = |max_batch: u32| {
        minilm_with("busy", 256, max_batch).replace(
            "[versions.processor]",
            &format!(
                "[versions.scaling]\nmin_workers = 1\nmax_workers = 2\n\
                 target_concurrency = 1\n{FAST}\n[versions.processor]"
            ),
        )
    };
    c.deploy_ok(TEXT_EMBEDDINGS, &spec(32)).await;
    let load = Load::start(c, "busy", 4);
    wait_for(
        c,
        "busy",
        Duration::from_secs(20),
        "at two ready workers",
        |v| {
            v["workers"]
                .as_array()
                .is_some_and(|w| w.iter().filter(|w| w["state"] == "ready").count() == 2)
        },
    )
    .await;
    // The batching changes: new workers, as many as ran, all ready when the deploy answers.
    let deployed = c.deploy_ok(TEXT_EMBEDDINGS, &spec(8)).await;
    let ready = deployed["versions"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .count();
    assert_eq!(ready, 2, "{deployed:#}");
    assert!(load.finish().await > 0);
    t.stop().await;
}

/// Workers alive (starting, ready or pending) and ready, old and new, whether old ones
/// were listed, and the GPUs every worker holds.
type Sample = (usize, usize, bool, Vec<u64>);

/// A [`Sample`] of an endpoint's detail during a rolling update.
fn rollout_sample(detail: &Value) -> Sample {
    let v = &detail["versions"][0];
    let all: Vec<&Value> = ["workers", "outgoing_workers"]
        .iter()
        .flat_map(|k| v[k].as_array().into_iter().flatten())
        .collect();
    let alive = all
        .iter()
        .filter(|w| matches!(w["state"].as_str(), Some("starting" | "ready" | "pending")))
        .count();
    let ready = all.iter().filter(|w| w["state"] == "ready").count();
    let gpus = all
        .iter()
        .flat_map(|w| w["gpus"].as_array().into_iter().flatten())
        .map(|g| g.as_u64().unwrap())
        .collect();
    (alive, ready, v["outgoing_workers"].is_array(), gpus)
}

/// Samples the endpoint's detail until told to stop.
fn watch(c: &TestClient, name: &str) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Vec<Sample>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (c, name, flag) = (c.clone(), name.to_owned(), stop.clone());
    let task = tokio::spawn(async move {
        let mut samples = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            let detail = c.get(&format!("/api/v1/endpoints/{name}")).await.json();
            samples.push(rollout_sample(&detail));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        samples
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_keeps_within_its_surge_and_loses_no_request() {
    let t = TestServer::start().await;
    let c = &t.client;
    let spec = |max_batch: u32| {
        minilm_with("rolled", 256, max_batch).replace(
            "[versions.processor]",
            "[versions.scaling]\nmin_workers = 3\nmax_workers = 3\n[versions.processor]",
        )
    };
    c.deploy_ok(TEXT_EMBEDDINGS, &spec(32)).await;
    let old: Vec<u64> = c.get("/api/v1/endpoints/rolled").await.json()["versions"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["since_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(old.len(), 3);
    let load = Load::start(c, "rolled", 4);
    let (stop, samples) = watch(c, "rolled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The batching changes: the default rollout (max_surge 2%, max_unavailable 0) adds
    // one worker at a time and drains an old one as each new one is ready.
    let deployed = c.deploy_ok(TEXT_EMBEDDINGS, &spec(8)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = samples.await.unwrap();
    assert!(load.finish().await > 0);
    assert!(
        samples.iter().any(|s| s.2),
        "no sample saw the update: {samples:?}"
    );
    for (alive, ready, _, _) in &samples {
        assert!(
            *alive <= 4,
            "more than one worker beyond three: {samples:?}"
        );
        assert!(*ready >= 3, "fewer than three ready workers: {samples:?}");
    }
    let workers = deployed["versions"][0]["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "{deployed:#}");
    assert!(
        workers.iter().all(|w| w["state"] == "ready"
            && w["since_ms"].as_u64().unwrap() > *old.iter().max().unwrap())
    );
    let events = c.get("/api/v1/endpoints/rolled/events").await.json();
    let reasons: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["trigger"] == "rollout")
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 2, "{events:#}");
    assert!(
        reasons[0].contains("at most 1 beyond and 0 unavailable"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("done"), "{reasons:?}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_unavailable_frees_gpus_for_an_update_that_a_surge_alone_cannot_make() {
    let t = TestServer::start_with_gpus(wasp_gateway::Inventory::parse("fake:4").unwrap()).await;
    let c = &t.client;
    let spec = |gpus: u32, rollout: &str| {
        spec(
            "packed",
            &format!(
                "[versions.scaling]\nmin_workers = 2\nmax_workers = 2\ngpus_per_worker = {gpus}\n\
                 cold_start_timeout_s = 2\n[versions.rollout]\n{rollout}"
            ),
        )
    };
    c.deploy_ok(HELLO, &spec(2, "")).await;
    // Every GPU is taken: the default surge has nowhere to start a new worker.
    let reply = c.deploy(HELLO, &spec(1, "")).await;
    assert_eq!(reply.status, 409, "{}", reply.text());
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "rollout_stalled");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("needs 1 GPUs; 0 of 4 are free"),
        "{message}"
    );
    assert!(message.contains("rollout.max_unavailable"), "{message}");
    // Rolled back: the old spec and its two workers serve on.
    let detail = c.get("/api/v1/endpoints/packed").await.json();
    assert_eq!(
        detail["spec"]["versions"][0]["scaling"]["gpus_per_worker"],
        2
    );
    assert_eq!(rollout_sample(&detail).1, 2, "{detail:#}");
    let reply = c.invoke("packed", "", r#"{"name":"gpu"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // One worker may be unavailable: it stops first and its GPUs go to the new ones.
    let (stop, samples) = watch(c, "packed");
    let deployed = c.deploy_ok(HELLO, &spec(1, "max_unavailable = 1")).await;
    stop.store(true, Ordering::Relaxed);
    let samples = samples.await.unwrap();
    for (_, ready, _, gpus) in &samples {
        let mut unique = gpus.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), gpus.len(), "a GPU held twice: {samples:?}");
        assert!(*ready >= 1, "{samples:?}");
    }
    let workers = deployed["versions"][0]["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{deployed:#}");
    assert!(
        workers
            .iter()
            .all(|w| w["state"] == "ready" && w["gpus"].as_array().unwrap().len() == 1)
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_whose_new_worker_fails_is_rolled_back() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(TEXT_EMBEDDINGS, &minilm_with("steady", 256, 32))
        .await;
    let load = Load::start(c, "steady", 2);
    let broken = minilm_with("steady", 256, 8).replace(
        "model = \"all-MiniLM-L6-v2\"",
        "model = \"/nonexistent/minilm\"",
    );
    let reply = c.deploy(TEXT_EMBEDDINGS, &broken).await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "rollout_failed");
    assert!(reply.text().contains("rolled back"), "{}", reply.text());
    assert!(load.finish().await > 0);
    let detail = c.get("/api/v1/endpoints/steady").await.json();
    assert_eq!(detail["spec"]["versions"][0]["batching"]["max_batch"], 32);
    assert_eq!(detail["status"], "ready", "{detail:#}");
    assert!(detail["versions"][0].get("outgoing_workers").is_none());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_past_the_cold_start_timeout_is_a_503_with_retry_after() {
    let t = TestServer::start_with_gpus(wasp_gateway::Inventory::parse("fake:2").unwrap()).await;
    let c = &t.client;
    c.deploy_ok(
        HELLO,
        &spec("holder", "[versions.scaling]\ngpus_per_worker = 2"),
    )
    .await;
    // Its worker can never get its GPUs while `holder` runs.
    c.deploy_ok(
        HELLO,
        &spec(
            "starved",
            "[versions.scaling]\nmin_workers = 0\ngpus_per_worker = 2\ncold_start_timeout_s = 1",
        ),
    )
    .await;
    let started = Instant::now();
    let reply = c.invoke("starved", "", r#"{"name":"late"}"#).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "cold_start_timeout");
    assert!(reply.text().contains("(1s"), "{}", reply.text());
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert!(started.elapsed() >= Duration::from_secs(1));
    // GPUs free, the next request wakes the version.
    assert_eq!(
        c.request("DELETE", "/api/v1/endpoints/holder", "")
            .await
            .status,
        204
    );
    let reply = c.invoke("starved", "", r#"{"name":"late"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_history_shows_requests_latency_errors_and_workers() {
    let t = TestServer::start().await;
    let c = &t.client;
    deploy_scaled_to_zero(c, "plotted").await;
    let listed = c.get("/api/v1/endpoints").await.json();
    assert_eq!(listed["endpoints"][0]["scaled_to_zero"], true, "{listed:#}");

    // A cold start, 20 answers and one refusal.
    for i in 0..20 {
        let reply = c
            .invoke("plotted", "", format!(r#"{{"name":"n{i}"}}"#))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let refused = c.invoke("plotted", "", r#"{"name":""}"#).await;
    assert_eq!(refused.status, 422, "{}", refused.text());

    // Once the interval closes, the history has them all.
    let deadline = Instant::now() + Duration::from_secs(15);
    let history = loop {
        let h = c
            .get("/api/v1/endpoints/plotted/metrics?window_s=60")
            .await
            .json();
        let v = &h["versions"][0];
        let step = h["step_s"].as_f64().unwrap();
        let served: f64 = v["requests_per_s"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_f64().unwrap() * step)
            .sum();
        if served.round() == 21.0 {
            break h;
        }
        assert!(Instant::now() < deadline, "not 21 requests yet: {h:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(history["interval_s"], 2);
    assert_eq!(history["step_s"], 2);
    let columns = history["t_ms"].as_array().unwrap().len();
    assert_eq!(columns, 30, "{history:#}");
    let v = &history["versions"][0];
    assert_eq!(v["version"], "v1");
    let sum = |key: &str| -> u64 {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum()
    };
    assert_eq!(sum("client_errors"), 1, "{v:#}");
    assert_eq!(sum("server_errors"), 0, "{v:#}");
    assert_eq!(sum("cold_starts"), 1, "{v:#}");
    for key in [
        "requests_per_s",
        "p50_ms",
        "p99_ms",
        "workers_ready",
        "waiting",
        "tokens_per_s",
    ] {
        assert_eq!(v[key].as_array().unwrap().len(), columns, "{key}");
    }
    let busy = (0..columns)
        .find(|i| v["p99_ms"][i].is_number())
        .expect("a column with latencies");
    let (p50, p99) = (
        v["p50_ms"][busy].as_f64().unwrap(),
        v["p99_ms"][busy].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99, "p50 {p50}, p99 {p99}");
    // Generation figures stay empty for a processor endpoint.
    assert!(
        v["ttft_p50_ms"]
            .as_array()
            .unwrap()
            .iter()
            .all(Value::is_null)
    );
    assert_eq!(history["jobs"]["queued"].as_array().unwrap().len(), columns);

    // The list shows the last minute.
    let listed = c.get("/api/v1/endpoints").await.json();
    let e = &listed["endpoints"][0];
    assert_eq!(e["recent"]["errors"], 1, "{e:#}");
    assert_eq!(e["recent"]["cold_starts"], 1, "{e:#}");
    assert!(e["recent"]["p99_ms"].as_f64().unwrap() >= p50, "{e:#}");
    assert!(
        e["recent"]["requests_per_s"].as_f64().unwrap() > 0.3,
        "{e:#}"
    );

    // Idle again, it scales to zero, and the plot's workers follow.
    wait_for(
        c,
        "plotted",
        Duration::from_secs(15),
        "scaled to zero",
        scaled_to_zero,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = c
            .get("/api/v1/endpoints/plotted/metrics?window_s=60")
            .await
            .json();
        let ready = h["versions"][0]["workers_ready"]
            .as_array()
            .unwrap()
            .clone();
        let peak = ready.iter().filter_map(Value::as_u64).max().unwrap();
        if peak >= 1 && ready.last() == Some(&json!(0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "workers did not follow: {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Bad spans are refused at the field.
    for (query, field) in [("window_s=5000", "window_s"), ("step_s=3", "step_s")] {
        let reply = c
            .get(&format!("/api/v1/endpoints/plotted/metrics?{query}"))
            .await;
        assert_eq!(reply.status, 400, "{}", reply.text());
        assert_eq!(reply.json()["error"]["field"], field);
    }
    let missing = c.get("/api/v1/endpoints/nowhere/metrics").await;
    assert_eq!(missing.status, 404);
    t.stop().await;
}
