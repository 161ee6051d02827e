//! Rate limits, quotas, usage metering and the audit log against a real server on
//! loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use wasp_tests::guests::{HELLO, HOSTILE};
use wasp_tests::{Reply, TestClient, TestServer, spec};

/// A spec with endpoint-level TOML (`[rate_limit]`, say) before its one version.
fn spec_with(name: &str, endpoint: &str, version: &str) -> String {
    format!(
        "name = \"{name}\"\n{endpoint}\n[[versions]]\nname = \"v1\"\n{version}\n\
         [versions.processor]\ncomponent = \"{{COMPONENT}}\"\n"
    )
}

fn code(reply: &Reply) -> Value {
    serde_json::from_slice::<Value>(&reply.body)
        .map(|v| v["error"]["code"].clone())
        .unwrap_or(Value::Null)
}

async fn tenant_with_admin(operator: &TestClient, name: &str) -> (TestClient, String) {
    let made = operator
        .post_json("/api/v1/tenants", &json!({ "name": name }))
        .await;
    assert_eq!(made.status, 201, "{}", made.text());
    let key = operator
        .post_json("/api/v1/keys", &json!({ "tenant": name, "role": "admin" }))
        .await;
    assert_eq!(key.status, 201, "{}", key.text());
    let id = key.json()["id"].as_str().unwrap().to_owned();
    (
        operator.as_key(Some(key.json()["key"].as_str().unwrap())),
        id,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after_and_say_what_is_left() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.deploy_ok(
        HOSTILE,
        &spec_with(
            "limited",
            "[rate_limit]\nrequests_per_second = 1\nburst = 2",
            "",
        ),
    )
    .await;
    let first = c.invoke("limited", "/ok", "").await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(first.header("x-ratelimit-remaining-requests"), Some("1"));
    let second = c.invoke("limited", "/ok", "").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-ratelimit-remaining-requests"), Some("0"));
    let refused = c.invoke("limited", "/ok", "").await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(code(&refused), "rate_limited");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(
        refused.text().contains("endpoint `limited`"),
        "{}",
        refused.text()
    );
    let reset: f64 = refused
        .header("x-ratelimit-reset-requests")
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(reset > 0.0 && reset <= 1.0, "{reset}");
    // Jobs of the endpoint are counted too.
    let job = c
        .post_json(
            "/endpoints/limited/run",
            &json!({ "input": "x", "path": "/ok" }),
        )
        .await;
    assert_eq!(job.status, 429, "{}", job.text());
    // The bucket refills at the rate.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(c.invoke("limited", "/ok", "").await.status, 200);

    // A key's own limit covers every endpoint it calls.
    c.deploy_ok(HOSTILE, &spec("open", "")).await;
    let made = c
        .post_json(
            "/api/v1/keys",
            &json!({
                "role": "invoker",
                "rate_limit": { "requests_per_second": 0.5, "burst": 1 }
            }),
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.text());
    assert_eq!(made.json()["rate_limit"]["burst"], 1);
    let slow = c.as_key(Some(made.json()["key"].as_str().unwrap()));
    assert_eq!(slow.invoke("open", "/ok", "").await.status, 200);
    let refused = slow.invoke("open", "/ok", "").await;
    assert_eq!(refused.status, 429);
    assert!(refused.text().contains("API key"), "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("2"));
    // Other keys are not slowed by it.
    assert_eq!(c.invoke("open", "/ok", "").await.status, 200);
    let bad = c
        .post_json(
            "/api/v1/keys",
            &json!({ "role": "invoker", "rate_limit": { "requests_per_second": -1 } }),
        )
        .await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert_eq!(
        bad.json()["error"]["field"],
        "rate_limit.requests_per_second"
    );

    // At most one in flight: a second request while one sleeps is refused, not queued.
    c.deploy_ok(
        HOSTILE,
        &spec_with("narrow", "[rate_limit]\nmax_concurrent = 1", ""),
    )
    .await;
    let sleeper = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("narrow", "/sleep", "600").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let busy = c.invoke("narrow", "/ok", "").await;
    assert_eq!(busy.status, 429, "{}", busy.text());
    assert_eq!(code(&busy), "too_many_requests_in_flight");
    assert_eq!(sleeper.await.unwrap().status, 200);
    assert_eq!(c.invoke("narrow", "/ok", "").await.status, 200);

    // A bad limit is refused at deploy with the field named.
    let bad = c
        .deploy(HOSTILE, &spec_with("bad", "[rate_limit]\nburst = 3", ""))
        .await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert_eq!(bad.json()["error"]["field"], "rate_limit.burst");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_what_a_tenant_may_not_hold() {
    let t = TestServer::start().await;
    let operator = &t.client;
    let (acme, _) = tenant_with_admin(operator, "acme").await;
    let hostile = std::fs::read(HOSTILE).unwrap().len() as u64;
    let set = operator
        .request_with(
            "PUT",
            "/api/v1/tenants/acme/quota",
            &[("content-type", "application/json")],
            json!({
                "endpoints": 1,
                "instances": 40,
                "queued_jobs": 1,
                "stored_bytes": hostile + 10
            })
            .to_string(),
        )
        .await;
    assert_eq!(set.status, 200, "{}", set.text());
    assert_eq!(set.json()["quota"]["endpoints"], 1);
    // Only an operator sets quotas.
    let own = acme
        .request_with("PUT", "/api/v1/tenants/acme/quota", &[], "{}")
        .await;
    assert_eq!(own.status, 403);

    acme.deploy_ok(HOSTILE, &spec_with("first", "", "")).await;
    // Another endpoint is one too many.
    let second = acme.deploy(HOSTILE, &spec("second", "")).await;
    assert_eq!(second.status, 403, "{}", second.text());
    assert_eq!(code(&second), "quota_exceeded");
    assert_eq!(second.json()["error"]["field"], "quota.endpoints");
    // Replacing the one it has is fine, within the instance quota.
    let bigger = acme
        .deploy(
            HOSTILE,
            &spec_with("first", "", "[versions.limits]\nmax_instances = 64"),
        )
        .await;
    assert_eq!(bigger.status, 403, "{}", bigger.text());
    assert_eq!(bigger.json()["error"]["field"], "quota.instances");
    assert!(
        bigger.text().contains("allows 40 instances"),
        "{}",
        bigger.text()
    );
    acme.deploy_ok(
        HOSTILE,
        &spec_with("first", "", "[versions.limits]\nmax_instances = 40"),
    )
    .await;
    // What it holds is shown beside its quota.
    let tenants = operator.get("/api/v1/tenants").await.json();
    let info = tenants["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "acme")
        .unwrap()
        .clone();
    assert_eq!(info["holding"]["endpoints"], 1);
    assert_eq!(info["holding"]["instances"], 40);

    // Stored bytes: the hostile component (uploaded above) fits, another one does not;
    // the same bytes again write nothing and pass.
    let upload = acme
        .request("PUT", "/api/v1/components", std::fs::read(HELLO).unwrap())
        .await;
    assert_eq!(upload.status, 403, "{}", upload.text());
    assert_eq!(upload.json()["error"]["field"], "quota.stored_bytes");
    acme.upload(HOSTILE).await;

    // Queued jobs: a stopped endpoint keeps its jobs queued; one waits, the next is
    // refused until the queue drains.
    let stopped = acme.post("/api/v1/endpoints/first/stop", "").await;
    assert_eq!(stopped.status, 200, "{}", stopped.text());
    let submit = || async {
        acme.post_json(
            "/endpoints/first/run",
            &json!({ "input": "", "path": "/ok" }),
        )
        .await
    };
    let queued = submit().await;
    assert_eq!(queued.status, 202, "{}", queued.text());
    let refused = submit().await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.json()["error"]["field"], "quota.queued_jobs");
    assert!(refused.header("retry-after").is_some());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_metered_per_tenant_and_kept_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestServer::start_in(dir.path()).await;
    let operator = t.client.clone();
    let (acme, _) = tenant_with_admin(&operator, "acme").await;
    let (bravo, _) = tenant_with_admin(&operator, "bravo").await;
    let busy = "[versions.limits]\ntimeout_ms = 300";
    acme.deploy_ok(HOSTILE, &spec("e", busy)).await;
    bravo.deploy_ok(HOSTILE, &spec("e", busy)).await;
    for _ in 0..3 {
        assert_eq!(acme.invoke("e", "/ok", "").await.status, 200);
    }
    // A guest that spins until its deadline: about 0.3 s of guest time.
    assert_eq!(acme.invoke("e", "/loop", "").await.status, 504);
    assert_eq!(bravo.invoke("e", "/ok", "").await.status, 200);

    let own = acme.get("/api/v1/usage").await;
    assert_eq!(own.status, 200, "{}", own.text());
    let tenants = own.json()["tenants"].as_array().unwrap().clone();
    assert_eq!(tenants.len(), 1, "a tenant sees its own usage only");
    assert_eq!(tenants[0]["tenant"], "acme");
    assert_eq!(tenants[0]["requests"], 4);
    let guest = tenants[0]["guest_cpu_seconds"].as_f64().unwrap();
    assert!((0.2..5.0).contains(&guest), "{guest}");
    assert!(tenants[0]["stored_bytes"].as_u64().unwrap() > 0);
    // An operator sees any tenant.
    let other = operator.get("/api/v1/usage?tenant=bravo").await.json();
    assert_eq!(other["tenants"][0]["requests"], 1);
    assert!(other["tenants"][0]["guest_cpu_seconds"].as_f64().unwrap() < 0.2);
    let all = operator.get("/api/v1/usage").await.json();
    assert!(all["tenants"].as_array().unwrap().len() >= 3);
    let metrics = operator.get("/metrics").await.text();
    assert!(
        metrics.contains("wasp_tenant_requests_total{tenant=\"acme\"} 4"),
        "{metrics}"
    );
    assert!(metrics.contains("wasp_tenant_guest_cpu_seconds_total{tenant=\"acme\"}"));

    // Kept across a restart.
    t.stop().await;
    let t = TestServer::start_in(dir.path()).await;
    let again = t.client.get("/api/v1/usage?tenant=acme").await.json();
    assert_eq!(again["tenants"][0]["requests"], 4);
    assert!(again["tenants"][0]["guest_cpu_seconds"].as_f64().unwrap() >= guest);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_says_who_changed_what() {
    let t = TestServer::start().await;
    let operator = &t.client;
    let (acme, acme_key) = tenant_with_admin(operator, "acme").await;
    acme.deploy_ok(HELLO, &spec("e", "")).await;
    assert_eq!(acme.get("/api/v1/endpoints/e").await.status, 200);
    let removed = acme.request("DELETE", "/api/v1/endpoints/e", "").await;
    assert_eq!(removed.status, 204);
    let refused = acme.request("DELETE", "/api/v1/endpoints/e", "").await;
    assert_eq!(refused.status, 404);

    let all = operator.get("/api/v1/audit").await;
    assert_eq!(all.status, 200, "{}", all.text());
    let entries = all.json()["entries"].as_array().unwrap().clone();
    let seen: Vec<(String, String, String, u64)> = entries
        .iter()
        .map(|e| {
            (
                e["method"].as_str().unwrap().to_owned(),
                e["path"].as_str().unwrap().to_owned(),
                e["tenant"].as_str().unwrap().to_owned(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let has = |method: &str, path: &str, tenant: &str, status: u64| {
        seen.iter()
            .any(|s| s.0 == method && s.1 == path && s.2 == tenant && s.3 == status)
    };
    assert!(has("POST", "/api/v1/tenants", "default", 201), "{seen:?}");
    assert!(has("POST", "/api/v1/keys", "default", 201), "{seen:?}");
    assert!(has("PUT", "/api/v1/endpoints/e", "acme", 201), "{seen:?}");
    assert!(
        has("DELETE", "/api/v1/endpoints/e", "acme", 204),
        "{seen:?}"
    );
    assert!(
        has("DELETE", "/api/v1/endpoints/e", "acme", 404),
        "{seen:?}"
    );
    // Reads are not changes.
    assert!(!seen.iter().any(|s| s.0 == "GET"), "{seen:?}");
    let by_acme = entries.iter().find(|e| e["method"] == "DELETE").unwrap();
    assert_eq!(by_acme["key_id"], acme_key.as_str());
    assert_eq!(by_acme["role"], "admin");
    assert!(by_acme["at_ms"].as_u64().unwrap() > 0);
    assert_eq!(by_acme["request_id"].as_str().unwrap().len(), 32);

    // A tenant admin reads its own tenant's entries only; an invoker none.
    let own = acme.get("/api/v1/audit").await.json();
    let own = own["entries"].as_array().unwrap();
    assert!(!own.is_empty());
    assert!(own.iter().all(|e| e["tenant"] == "acme"), "{own:?}");
    let invoker = operator
        .post_json(
            "/api/v1/keys",
            &json!({ "tenant": "acme", "role": "invoker" }),
        )
        .await
        .json();
    let invoker = operator.as_key(Some(invoker["key"].as_str().unwrap()));
    assert_eq!(invoker.get("/api/v1/audit").await.status, 403);
    // Paged.
    let page = operator.get("/api/v1/audit?limit=2").await.json();
    assert_eq!(page["entries"].as_array().unwrap().len(), 2);
    let next = page["next"].as_u64().unwrap();
    let rest = operator
        .get(&format!("/api/v1/audit?after={next}"))
        .await
        .json();
    assert_eq!(
        rest["entries"][0]["seq"].as_u64().unwrap(),
        next + 1,
        "{rest}"
    );
    t.stop().await;
}
