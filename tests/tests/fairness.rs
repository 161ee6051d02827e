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
