//! Fair sharing of the cores among tenants: one tenant's flood of CPU-bound guest calls
//! does not starve another tenant's short requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use wasp_tests::TestServer;
use wasp_tests::flood::neighbour_under_flood;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_cpu_flood_does_not_starve_its_neighbour() {
    let t = TestServer::start().await;
    let mut latencies = neighbour_under_flood(&t, 48, 200).await;
    let p99 = wasp_tests::load::quantile(&mut latencies, 0.99);
    // The benchmark reports the figure (goal: 10 ms); this bound is generous for a shared
    // machine, and far under the 100 ms a neighbour waits here when every guest runs at
    // once (`cpu_turns = 1000`).
    assert!(p99 < Duration::from_millis(40), "neighbour p99 {p99:?}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_share_the_cores_by_weight() {
    use serde_json::json;
    let t = TestServer::start_configured(|config| config.runtime.cpu_turns = 1).await;
    let operator = &t.client;
    let mut clients = Vec::new();
    for (name, weight) in [("gold", 3), ("bronze", 1)] {
        operator
            .post_json("/api/v1/tenants", &json!({ "name": name }))
            .await;
        let set = operator
            .request_with(
                "PUT",
                &format!("/api/v1/tenants/{name}/quota"),
                &[],
                json!({ "cpu_weight": weight }).to_string(),
            )
            .await;
        assert_eq!(set.status, 200, "{}", set.text());
        let key = operator
            .post_json("/api/v1/keys", &json!({ "tenant": name, "role": "admin" }))
            .await
            .json();
        let client = operator.as_key(Some(key["key"].as_str().unwrap()));
        client
            .deploy_ok(
                wasp_tests::guests::HOSTILE,
                &wasp_tests::spec("spin", "[versions.limits]\ntimeout_ms = 2000"),
            )
            .await;
        clients.push((name, client));
    }
    // Four guests of each spin until their deadline, all at once: with one turn, what each
    // tenant's guests get of it follows the weights.
    let mut calls = Vec::new();
    for (_, client) in &clients {
        for _ in 0..4 {
            let client = client.clone();
            calls.push(tokio::spawn(async move {
                client.invoke("spin", "/loop", "").await.status
            }));
        }
    }
    for call in calls {
        assert_eq!(call.await.unwrap(), 504);
    }
    let usage = operator.get("/api/v1/usage").await.json();
    let seconds = |name: &str| {
        usage["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["tenant"] == name)
            .unwrap()["guest_cpu_seconds"]
            .as_f64()
            .unwrap()
    };
    let (gold, bronze) = (seconds("gold"), seconds("bronze"));
    eprintln!("guest CPU: gold (weight 3) {gold:.3} s, bronze (weight 1) {bronze:.3} s");
    // 3 to 1 exactly on an idle machine; a generous bound for a shared one.
    assert!(
        gold > 2.0 * bronze,
        "gold {gold:.3} s, bronze {bronze:.3} s"
    );
    assert!(bronze > 0.05, "bronze starved: {bronze:.3} s");
    t.stop().await;
}
