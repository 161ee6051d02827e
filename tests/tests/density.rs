//! Density: a server whose pool of instance slots (`wasp serve --max-instances`) is full
//! creates further instances on demand outside it (by default), held to the same limits;
//! with `--pool-full fail` it says so as a capacity error, `503 server_full` naming the
//! flag that raises it (never a processor fault, never 4xx), keeps serving what it holds,
//! reports its pool's occupancy, and takes new deploys again once slots are freed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use wasp_tests::guests::{HELLO, HOSTILE};
use wasp_tests::{Reply, TestClient, TestServer, spec};

/// The value of the gauge line `metric{kind="kind"}` in the server's metrics.
async fn gauge(c: &TestClient, metric: &str, kind: &str) -> u64 {
    value(c, &format!("{metric}{{kind=\"{kind}\"}}")).await
}

fn assert_full(reply: &Reply) {
    assert_eq!(reply.status, 503, "{}", reply.text());
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "server_full", "{error:#}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("--max-instances"), "{message}");
    assert!(message.contains("maximum concurrent limit"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_instance_pool_is_a_capacity_error_that_names_its_flag() {
    let t = TestServer::start_configured(|config| {
        config.runtime.max_total_instances = 3;
        config.runtime.pool_full = wasp_gateway::PoolFull::Fail;
    })
    .await;
    let c = &t.client;
    assert_eq!(
        gauge(c, "wasp_instance_pool_slots", "component_instances").await,
        3
    );
    assert_eq!(
        gauge(c, "wasp_instance_pool_slots_used", "component_instances").await,
        0
    );

    // Endpoints with a warm instance each, until the pool is full.
    let mut deployed = Vec::new();
    let refused = loop {
        let name = format!("e{}", deployed.len());
        let reply = c.deploy(HOSTILE, &spec(&name, "")).await;
        if reply.status == 503 {
            break reply;
        }
        assert!(
            reply.status == 201 || reply.status == 200,
            "{}",
            reply.text()
        );
        deployed.push(name);
        assert!(deployed.len() <= 3, "the pool of 3 never filled");
    };
    assert!(!deployed.is_empty());
    assert_full(&refused);
    let used = gauge(c, "wasp_instance_pool_slots_used", "component_instances").await;
    assert!((1..=3).contains(&used), "{used}");
    // The node's status says so too.
    let nodes = c.get("/api/v1/nodes").await.json();
    assert_eq!(nodes["nodes"][0]["instance_slots"], 3, "{nodes:#}");
    assert_eq!(nodes["nodes"][0]["instances"], used, "{nodes:#}");

    // What the server holds still serves.
    let first = &deployed[0];
    let answer = c.invoke(first, "/echo", "still here").await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    // A request that needs one more instance while the pool is full: 503, not a fault.
    let busy = {
        let c = c.clone();
        let first = first.clone();
        tokio::spawn(async move { c.invoke(&first, "/sleep", "1500").await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let overflow = c.invoke(first, "/echo", "one more").await;
    assert_full(&overflow);
    assert!(overflow.header("retry-after").is_some());
    assert_eq!(busy.await.unwrap().status, 200);

    // Freeing slots lets the refused deploy through.
    let removed = c
        .request("DELETE", &format!("/api/v1/endpoints/{first}"), "")
        .await;
    assert!(removed.status < 300, "{}", removed.text());
    let name = format!("e{}", deployed.len());
    c.deploy_ok(HOSTILE, &spec(&name, "")).await;
    t.stop().await;
}

/// The value of the metric line `metric` (with its labels, if any).
async fn value(c: &TestClient, metric: &str) -> u64 {
    let text = c.get("/metrics").await.text();
    let line = format!("{metric} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("no {line} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_overflows_to_instances_on_demand_under_the_same_limits() {
    let t = TestServer::start_configured(|config| config.runtime.max_total_instances = 2).await;
    let c = &t.client;
    let limits = "[versions.limits]\ntimeout_ms = 300\nmemory_mib = 48";
    // Five endpoints with a warm instance each on a pool of two slots: all deploy.
    for i in 0..5 {
        c.deploy_ok(HOSTILE, &spec(&format!("e{i}"), limits)).await;
    }
    assert_eq!(
        gauge(c, "wasp_instance_pool_slots_used", "component_instances").await,
        2
    );
    assert_eq!(value(c, "wasp_overflow_instances").await, 3);
    assert_eq!(value(c, "wasp_overflow_instances_created_total").await, 3);
    let nodes = c.get("/api/v1/nodes").await.json();
    assert_eq!(nodes["nodes"][0]["instances"], 5, "{nodes:#}");
    assert_eq!(nodes["nodes"][0]["instance_slots"], 2, "{nodes:#}");

    // Every one serves, those outside the pool too.
    for i in 0..5 {
        let name = format!("e{i}");
        let answer = c.invoke(&name, "/echo", name.clone()).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.text(), name);
    }
    // An instance outside the pool is held to its version's limits: its deadline (the
    // overflow engine's epochs tick too) and its memory cap.
    let spin = c.invoke("e4", "/loop", "").await;
    assert_eq!(spin.status, 504, "{}", spin.text());
    assert_eq!(spin.json()["error"]["code"], "processor_timeout");
    let hog = c.invoke("e3", "/alloc", "").await;
    assert_eq!(hog.status, 500, "{}", hog.text());
    assert_eq!(hog.json()["error"]["code"], "processor_out_of_memory");
    // Each replaced by a new one, still outside the full pool.
    for name in ["e3", "e4"] {
        assert_eq!(c.invoke(name, "/echo", "again").await.text(), "again");
    }
    assert_eq!(value(c, "wasp_overflow_instances").await, 3);
    assert_eq!(value(c, "wasp_overflow_instances_created_total").await, 5);

    // Dropping endpoints frees their instances, in the pool and outside it.
    for i in 0..5 {
        let removed = c
            .request("DELETE", &format!("/api/v1/endpoints/e{i}"), "")
            .await;
        assert!(removed.status < 300, "{}", removed.text());
    }
    assert_eq!(value(c, "wasp_overflow_instances").await, 0);
    assert_eq!(
        gauge(c, "wasp_instance_pool_slots_used", "component_instances").await,
        0
    );
    t.stop().await;
}

/// A version at zero from the start (`initial_workers = 0`).
fn at_zero(name: &str, env: &str) -> String {
    format!(
        "name = \"{name}\"\n[[versions]]\nname = \"v1\"\n\
         [versions.scaling]\nmin_workers = 0\ninitial_workers = 0\n\
         [versions.processor]\ncomponent = \"{{COMPONENT}}\"\nenv = {{ {env} }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_deployed_at_zero_hold_no_instance_until_called() {
    let t = TestServer::start_configured(|config| config.runtime.max_total_instances = 2).await;
    let c = &t.client;
    // Ten endpoints on a pool of two slots: each is proved at deploy (instantiated, its
    // `init` run), and none keeps an instance.
    for i in 0..10 {
        c.deploy_ok(HOSTILE, &at_zero(&format!("z{i}"), "")).await;
    }
    // One component's compiled code, shared by all ten.
    let metrics = c.get("/metrics").await.text();
    assert!(metrics.contains("wasp_components_loaded 1\n"), "{metrics}");
    assert_eq!(
        gauge(c, "wasp_instance_pool_slots_used", "component_instances").await,
        0
    );
    let status = c.get("/api/v1/endpoints/z7").await.json();
    let version = &status["versions"][0];
    assert_eq!(version["status"], "scaledToZero", "{status:#}");
    assert_eq!(version["desired_workers"], 0, "{status:#}");

    // A call wakes the one it is for.
    let answer = c.invoke("z3", "/echo", "awake").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "awake");
    assert_eq!(
        gauge(c, "wasp_instance_pool_slots_used", "component_instances").await,
        1
    );

    // The proof runs `init`: a processor that cannot start is refused at deploy.
    let refused = c
        .deploy(HOSTILE, &at_zero("broken", "FAIL_INIT = \"1\""))
        .await;
    assert_eq!(refused.status, 422, "{}", refused.text());
    assert!(refused.text().contains("FAIL_INIT"), "{}", refused.text());

    // At zero is only allowed where min_workers allows it.
    let spec = at_zero("bad", "").replace("min_workers = 0", "min_workers = 1");
    let invalid = c.deploy(HOSTILE, &spec).await;
    assert_eq!(invalid.status, 422, "{}", invalid.text());
    assert_eq!(
        invalid.json()["error"]["field"],
        "versions[0].scaling.initial_workers"
    );
    t.stop().await;
}

/// Whether `endpoint`'s first version has its component loaded, and from the cache.
async fn loaded(c: &TestClient, endpoint: &str) -> (bool, bool) {
    let status = c.get(&format!("/api/v1/endpoints/{endpoint}")).await.json();
    let version = &status["versions"][0];
    let flag = |name: &str| {
        version[name]
            .as_bool()
            .unwrap_or_else(|| panic!("no {name} in {status:#}"))
    };
    (flag("component_loaded"), flag("compiled_from_cache"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_compiled_components_load_with_their_first_instance() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestServer::start_in(dir.path()).await;
    for i in 0..20 {
        first
            .client
            .deploy_ok(HOSTILE, &at_zero(&format!("z{i}"), ""))
            .await;
    }
    for i in 0..5 {
        first
            .client
            .deploy_ok(HELLO, &at_zero(&format!("h{i}"), ""))
            .await;
    }
    first.stop().await;

    // Twenty-five endpoints over two components, all at zero: none loads its component
    // at start.
    let second = TestServer::start_in(dir.path()).await;
    let c = &second.client;
    assert_eq!(value(c, "wasp_components_loaded").await, 0);
    assert_eq!(loaded(c, "z0").await, (false, false));

    // The first call loads it, from the compiled cache, once for every endpoint using it.
    let answer = c.invoke("z3", "/echo", "woken").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "woken");
    assert_eq!(value(c, "wasp_components_loaded").await, 1);
    assert_eq!(loaded(c, "z3").await, (true, true));
    assert_eq!(c.invoke("z9", "/echo", "too").await.text(), "too");
    assert_eq!(value(c, "wasp_components_loaded").await, 1);
    let hello = c.invoke("h2", "", r#"{"name":"lazy"}"#).await;
    assert_eq!(hello.json()["greeting"], "hello, lazy!", "{}", hello.text());
    assert_eq!(value(c, "wasp_components_loaded").await, 2);
    assert_eq!(value(c, "wasp_component_compiles_total").await, 0);
    second.stop().await;
}

/// `--pool-full queue`: a request that finds every slot taken waits for one to be freed, up
/// to its call timeout, instead of overflowing or failing at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_queue_policy_a_request_waits_for_a_slot_up_to_its_timeout() {
    let t = TestServer::start_configured(|config| {
        config.runtime.max_total_instances = 1;
        config.runtime.pool_full = wasp_gateway::PoolFull::Queue;
    })
    .await;
    let c = &t.client;
    // `busy` drops its instance after each call; `patient` waits up to 5 s for a slot,
    // `hasty` 300 ms.
    let per_request = "[versions.limits]\nisolation = \"per-request\"\ntimeout_ms = 5000";
    let at_zero_with = |name: &str, limits: &str| format!("{}{limits}\n", at_zero(name, ""));
    c.deploy_ok(HOSTILE, &at_zero_with("busy", per_request))
        .await;
    c.deploy_ok(
        HOSTILE,
        &at_zero_with("patient", "[versions.limits]\ntimeout_ms = 5000"),
    )
    .await;
    c.deploy_ok(
        HOSTILE,
        &at_zero_with("hasty", "[versions.limits]\ntimeout_ms = 300"),
    )
    .await;

    // While `busy` holds the only slot for 1.5 s, `patient` waits and is then served.
    let sleeper = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("busy", "/sleep", "1500").await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let asked = std::time::Instant::now();
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("patient", "/echo", "served").await })
    };
    // It is seen waiting.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(value(c, "wasp_instance_pool_waiting").await, 1);
    let waited = waiter.await.unwrap();
    let wait = asked.elapsed();
    assert_eq!(value(c, "wasp_instance_pool_waiting").await, 0);
    assert_eq!(waited.status, 200, "{}", waited.text());
    assert_eq!(waited.text(), "served");
    let slept = sleeper.await.unwrap();
    assert_eq!(slept.status, 200, "{}", slept.text());
    // `busy` held the slot for at least 1.2 s more.
    assert!(
        wait.as_millis() >= 1000,
        "served after {wait:?}, before the slot was freed"
    );
    // Nothing was created outside the pool.
    assert_eq!(value(c, "wasp_overflow_instances_created_total").await, 0);

    // `patient` keeps its idle instance, and so the slot: `hasty` waits its 300 ms and is
    // told the server is full, with the flag to raise (its cold start is what failed:
    // `worker_failed`, with the capacity error).
    let refused = c.invoke("hasty", "/echo", "late").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("the server is full"), "{message}");
    assert!(message.contains("--max-instances"), "{message}");
    assert!(message.contains("no slot was freed"), "{message}");
    // Deleted, `patient` frees it, and `hasty` is served.
    let removed = c.request("DELETE", "/api/v1/endpoints/patient", "").await;
    assert!(removed.status < 300, "{}", removed.text());
    assert_eq!(c.invoke("hasty", "/echo", "now").await.text(), "now");
    t.stop().await;
}

/// A pool too large for 4 GiB memory slots gets smaller ones, so that its slots fit in the
/// address space; a version whose memory cap is larger than a slot runs its instances
/// outside the pool, with all of its cap, and one whose cap fits runs in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_sized_to_fit_and_larger_memory_caps_run_outside_the_pool() {
    let t =
        TestServer::start_configured(|config| config.runtime.max_total_instances = 16_000).await;
    let c = &t.client;
    assert_eq!(
        value(c, "wasp_instance_pool_slot_memory_bytes").await,
        512 << 20
    );
    assert_eq!(
        gauge(c, "wasp_instance_pool_slots", "memories").await,
        32_000
    );

    c.deploy_ok(
        HOSTILE,
        &spec("small", "[versions.limits]\nmemory_mib = 200"),
    )
    .await;
    c.deploy_ok(
        HOSTILE,
        &spec("large", "[versions.limits]\nmemory_mib = 700"),
    )
    .await;
    assert_eq!(
        gauge(c, "wasp_instance_pool_slots_used", "component_instances").await,
        1
    );
    assert_eq!(value(c, "wasp_overflow_instances").await, 1);

    // Past a slot's 512 MiB, up to its own 700 MiB, and no further.
    let held = c.invoke("large", "/hold", "600").await;
    assert_eq!(held.status, 200, "{}", held.text());
    assert!(held.text().starts_with("held 600 MiB"), "{}", held.text());
    let hog = c.invoke("large", "/alloc", "").await;
    assert_eq!(hog.status, 500, "{}", hog.text());
    assert_eq!(hog.json()["error"]["code"], "processor_out_of_memory");
    // The pooled one gets its own cap too.
    let held = c.invoke("small", "/hold", "150").await;
    assert_eq!(held.status, 200, "{}", held.text());
    let hog = c.invoke("small", "/alloc", "").await;
    assert_eq!(hog.json()["error"]["code"], "processor_out_of_memory");
    t.stop().await;
}
