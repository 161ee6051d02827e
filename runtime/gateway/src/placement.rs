//! Scaling a cluster's versions once for the whole cluster (cluster mode).
//!
//! Every node still reads its own meters, and sends the load of each version it serves
//! (averaged over the version's stable and panic windows) in its heartbeat. One node, the
//! leader (a lease in the cluster's key-value store; see the `wasp-cluster` crate), sums
//! those loads, decides with the version's own policy how many workers the cluster needs,
//! and places them on nodes: the workers already running stay where they are, new ones go
//! first to a node where a request waits, then to the node with fewest workers of the
//! version, then the busiest, then the one with most free GPUs; a node that cannot run the
//! version (no GPUs, a failed load) gets none, and a lost node's workers are placed again
//! because its heartbeat stops. Each node then follows its share of the placement.
//! `min_workers` and `max_workers` count the cluster's workers.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use wasp_scaling::{Autoscaler, Load, Policy};

use crate::NodeInfo;
use crate::workers::Placed;

/// How long the leader counts a node's workers as it placed them while the node's
/// heartbeats do not show that it followed the placement (it may have failed to start
/// them; then its own count is the truth).
const FOLLOW_PATIENCE_MS: u64 = 10_000;

/// What a node reports of one of its versions in its heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionLoad {
    /// The endpoint (qualified by its tenant).
    pub endpoint: String,
    /// The version.
    pub version: String,
    /// Requests in flight here, averaged over the version's stable window.
    pub stable: f64,
    /// The same over the panic window.
    pub panic: f64,
    /// Whether a request here waits for a worker.
    pub waiting: bool,
    /// Its workers here, starting, ready or waiting for GPUs.
    pub workers: u32,
    /// When the placement these workers follow was decided (0 before any): the leader
    /// knows from it whether the count shows its last placement yet.
    #[serde(default)]
    pub placed_at_ms: u64,
}

/// Where the cluster's workers of one version go: what the leader writes, and every node
/// follows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// The endpoint (qualified by its tenant).
    pub endpoint: String,
    /// The version.
    pub version: String,
    /// Workers the cluster wants.
    pub wanted: u32,
    /// Workers per node; a node not listed gets none.
    pub nodes: BTreeMap<String, u32>,
    /// Wanted workers that no node can take now (none has the free GPUs).
    pub unplaced: u32,
    /// The node that decided.
    pub leader: String,
    /// When, in milliseconds since the Unix epoch.
    pub decided_at_ms: u64,
    /// What decided the count (`target_tracking`, `panic`, `bounds`...).
    pub trigger: String,
    /// Why, for people.
    pub reason: String,
}

impl Placement {
    /// What it asks of node `node`.
    pub fn for_node(&self, node: &str) -> Placed {
        let workers = self.nodes.get(node).copied().unwrap_or(0);
        let mut reason = format!("{} wanted in the cluster ({})", self.wanted, self.reason);
        if self.unplaced > 0 {
            reason.push_str(&format!(
                "; {} not placed: no node has the GPUs free",
                self.unplaced
            ));
        }
        Placed {
            workers,
            leader: self.leader.clone(),
            reason,
            decided_at_ms: self.decided_at_ms,
        }
    }
}

/// The leader's memory between rounds: one autoscaler per version, fed the summed load.
#[derive(Default)]
pub struct Placer {
    versions: HashMap<(String, String), Tracked>,
}

impl Placer {
    /// Forgets what was last decided for a version (its write failed): the next round
    /// writes it again.
    pub fn forget(&mut self, endpoint: &str, version: &str) {
        if let Some(tracked) = self
            .versions
            .get_mut(&(endpoint.to_owned(), version.to_owned()))
        {
            tracked.last = None;
        }
    }
}

struct Tracked {
    scaler: Autoscaler,
    /// What was last decided, to write only what changes.
    last: Option<Placement>,
}

/// A node as one version's placement sees it.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub name: String,
    /// Its workers of the version.
    pub workers: u32,
    /// The version's load there (stable window).
    pub load: f64,
    /// Whether a request for the version waits there.
    pub waiting: bool,
    /// Its GPUs no worker owns.
    pub gpus_free: usize,
    /// Whether it can run the version at all.
    pub able: bool,
}

/// Places `wanted` workers: the running ones stay (those beyond `wanted` go from the nodes
/// with most, least loaded first), new ones go where a request waits, then to the nodes
/// with fewest, then the busiest, then those with most free GPUs. Returns the workers per
/// node and how many could not be placed.
pub(crate) fn place(
    wanted: u32,
    nodes: &[Candidate],
    gpus_per_worker: Option<u32>,
) -> (BTreeMap<String, u32>, u32) {
    let able: Vec<&Candidate> = nodes.iter().filter(|n| n.able).collect();
    let mut counts: BTreeMap<String, u32> =
        able.iter().map(|n| (n.name.clone(), n.workers)).collect();
    let count = |counts: &BTreeMap<String, u32>, n: &Candidate| -> u32 {
        counts.get(&n.name).copied().unwrap_or(0)
    };
    let total: u32 = counts.values().sum();
    if total >= wanted {
        for _ in wanted..total {
            let victim = able
                .iter()
                .filter(|n| count(&counts, n) > 0)
                .max_by(|a, b| {
                    count(&counts, a)
                        .cmp(&count(&counts, b))
                        .then(b.load.total_cmp(&a.load))
                        .then(a.name.cmp(&b.name))
                });
            if let Some(victim) = victim
                && let Some(c) = counts.get_mut(&victim.name)
            {
                *c -= 1;
            }
        }
    }
    let mut free: HashMap<&str, usize> = able
        .iter()
        .map(|n| (n.name.as_str(), n.gpus_free))
        .collect();
    let needs = gpus_per_worker.map_or(0, |g| g as usize);
    let mut unplaced = 0;
    for _ in total..wanted {
        let fits = |n: &&&Candidate| free.get(n.name.as_str()).copied().unwrap_or(0) >= needs;
        let pick = able.iter().filter(fits).min_by(|a, b| {
            b.waiting
                .cmp(&a.waiting)
                .then(count(&counts, a).cmp(&count(&counts, b)))
                .then(b.load.total_cmp(&a.load))
                .then(free[b.name.as_str()].cmp(&free[a.name.as_str()]))
                .then(a.name.cmp(&b.name))
        });
        match pick {
            Some(n) => {
                *counts.entry(n.name.clone()).or_default() += 1;
                if let Some(f) = free.get_mut(n.name.as_str()) {
                    *f -= needs;
                }
            }
            None => unplaced += 1,
        }
    }
    // Spread: a node with two or more workers more than another that can take one gives
    // it one, so that losing a node loses as few of the version's workers as can be.
    for _ in 0..wanted {
        let fullest = able.iter().max_by(|a, b| {
            count(&counts, a)
                .cmp(&count(&counts, b))
                .then(b.name.cmp(&a.name))
        });
        let emptiest = able
            .iter()
            .filter(|n| free.get(n.name.as_str()).copied().unwrap_or(0) >= needs)
            .min_by(|a, b| {
                count(&counts, a)
                    .cmp(&count(&counts, b))
                    .then(a.name.cmp(&b.name))
            });
        let (Some(from), Some(to)) = (fullest, emptiest) else {
            break;
        };
        if count(&counts, from) < count(&counts, to) + 2 {
            break;
        }
        if let Some(c) = counts.get_mut(&from.name) {
            *c -= 1;
        }
        *counts.entry(to.name.clone()).or_default() += 1;
        if let Some(f) = free.get_mut(to.name.as_str()) {
            *f -= needs;
        }
        if let Some(f) = free.get_mut(from.name.as_str()) {
            *f += needs;
        }
    }
    (counts, unplaced)
}

impl crate::Gateway {
    /// What this node reports of its versions in its heartbeat: those with workers, load
    /// or a waiting request (an idle version scaled to zero costs the heartbeat nothing).
    pub(crate) fn version_loads(&self) -> (Vec<VersionLoad>, Vec<String>) {
        let mut loads = Vec::new();
        let mut unable = Vec::new();
        for deployment in self.endpoints() {
            if deployment.stopped {
                continue;
            }
            if deployment.error.is_some() {
                unable.push(deployment.spec.name.clone());
                continue;
            }
            for v in &deployment.versions {
                let load = v.workers.load();
                let workers = v.workers.side().live;
                let waiting = v.workers.ready_now() == 0 && v.workers.meter.in_flight() > 0;
                if workers > 0 || load.stable > 0.0 || load.panic > 0.0 || waiting {
                    loads.push(VersionLoad {
                        endpoint: deployment.spec.name.clone(),
                        version: v.name.clone(),
                        stable: load.stable,
                        panic: load.panic,
                        waiting: waiting || load.waiting,
                        workers,
                        placed_at_ms: v.workers.followed_placement_ms(),
                    });
                }
            }
        }
        (loads, unable)
    }

    /// One round of the cluster's scaler, on the leader: for every version of every
    /// running endpoint, the nodes' loads summed, a decision with the version's policy
    /// (queued jobs count as load, as on one node), and the workers placed over `nodes`
    /// (those alive). Returns the placements that changed since the last round.
    pub fn place_workers(
        &self,
        placer: &mut Placer,
        nodes: &[NodeInfo],
        leader: &str,
    ) -> Vec<Placement> {
        let now = self.clock.now();
        let mut changed = Vec::new();
        let mut current = HashSet::new();
        for deployment in self.endpoints() {
            if deployment.stopped {
                continue;
            }
            let name = &deployment.spec.name;
            let backlog = self.jobs.backlog(name).scaling;
            // From the spec: the leader may be a node that cannot run the endpoint itself.
            for (i, v) in deployment.spec.versions.iter().enumerate() {
                let key = (name.clone(), v.name.clone());
                current.insert(key.clone());
                let mut load = Load::default();
                let mut candidates = Vec::with_capacity(nodes.len());
                for node in nodes {
                    let report = node
                        .versions
                        .iter()
                        .find(|r| r.endpoint == *name && r.version == v.name);
                    if let Some(r) = report {
                        load.stable += r.stable;
                        load.panic += r.panic;
                        load.waiting |= r.waiting;
                    }
                    let reported = report.map_or(0, |r| r.workers);
                    // A node whose heartbeat does not show the last placement yet has what
                    // it was told (draining, or starting, at its next step).
                    let told = placer
                        .versions
                        .get(&key)
                        .and_then(|t| t.last.as_ref())
                        .filter(|last| {
                            report.is_none_or(|r| r.placed_at_ms < last.decided_at_ms)
                                && node.seen_at_ms
                                    < last.decided_at_ms.saturating_add(FOLLOW_PATIENCE_MS)
                        })
                        .map(|last| last.nodes.get(&node.name).copied().unwrap_or(0));
                    candidates.push(Candidate {
                        name: node.name.clone(),
                        workers: told.unwrap_or(reported),
                        load: report.map_or(0.0, |r| r.stable),
                        waiting: report.is_some_and(|r| r.waiting),
                        gpus_free: node.gpus_free,
                        able: !node.unable.contains(name),
                    });
                }
                let rolling = deployment
                    .versions
                    .iter()
                    .any(|d| d.name == v.name && d.workers.rolling());
                if rolling {
                    // A rolling update sets the workers until it is done.
                    continue;
                }
                let Ok(policy) = Policy::new(&v.scaling) else {
                    continue;
                };
                let tracked = placer.versions.entry(key).or_insert_with(|| {
                    let mut running: u32 = candidates.iter().map(|c| c.workers).sum();
                    let followed = nodes
                        .iter()
                        .flat_map(|n| &n.versions)
                        .any(|r| r.endpoint == *name && r.version == v.name && r.placed_at_ms > 0);
                    if !followed {
                        // A new version: every node started it at deploy, as one node
                        // would alone. The cluster starts from one node's count, not
                        // their sum, or the surplus would wait out `scale_down_delay_s`.
                        running = running.min(v.scaling.min_workers.max(1));
                    }
                    Tracked {
                        scaler: Autoscaler::new(policy.clone(), running, now),
                        last: None,
                    }
                });
                tracked.scaler.set_policy(policy);
                let weight = deployment.spec.weight(i);
                let share = crate::workers::backlog_share(backlog, weight);
                let decision = tracked.scaler.decide_load(load, share, now);
                let (placed, unplaced) = place(decision.to, &candidates, v.scaling.gpus_per_worker);
                let unchanged = tracked.last.as_ref().is_some_and(|last| {
                    last.wanted == decision.to && last.nodes == placed && last.unplaced == unplaced
                });
                if unchanged {
                    continue;
                }
                let placement = Placement {
                    endpoint: name.clone(),
                    version: v.name.clone(),
                    wanted: decision.to,
                    nodes: placed,
                    unplaced,
                    leader: leader.to_owned(),
                    decided_at_ms: crate::workers::now_ms(),
                    trigger: decision.trigger.to_string(),
                    reason: decision.reason,
                };
                tracked.last = Some(placement.clone());
                changed.push(placement);
            }
        }
        placer.versions.retain(|key, _| current.contains(key));
        changed
    }

    /// A placement the cluster's scaler wrote (or wrote again): this node follows its
    /// share from the next autoscaler step.
    pub fn placed(&self, placement: Placement) {
        self.placements
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (placement.endpoint.clone(), placement.version.clone()),
                placement,
            );
    }

    /// A placement was removed: the version scales here on its own again.
    pub fn unplaced(&self, endpoint: &str, version: &str) {
        self.placements
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(endpoint.to_owned(), version.to_owned()));
    }

    /// The placements of versions no longer deployed (for the leader to remove).
    pub fn stale_placements(&self) -> Vec<(String, String)> {
        let placements = self.placements.read().unwrap_or_else(|e| e.into_inner());
        placements
            .keys()
            .filter(|(endpoint, version)| {
                self.endpoint(endpoint)
                    .is_none_or(|d| !d.spec.versions.iter().any(|v| v.name == *version))
            })
            .cloned()
            .collect()
    }

    /// What the cluster's scaler asks of this node for a version, once it has placed it.
    pub(crate) fn placed_here(&self, endpoint: &str, version: &str) -> Option<Placed> {
        let node = self.cluster.get()?.node();
        self.placements
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(endpoint.to_owned(), version.to_owned()))
            .map(|p| p.for_node(&node))
    }

    /// Whether the cluster's scaler has placed every version of `deployment` and none of
    /// their workers here: a node leaves the endpoint's jobs to the nodes placed some.
    pub(crate) fn placed_elsewhere(&self, deployment: &crate::Deployment) -> bool {
        deployment.versions.iter().all(|v| {
            self.placed_here(&deployment.spec.name, &v.name)
                .is_some_and(|p| p.workers == 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, workers: u32, gpus_free: usize) -> Candidate {
        Candidate {
            name: name.into(),
            workers,
            load: 0.0,
            waiting: false,
            gpus_free,
            able: true,
        }
    }

    fn counts(placed: &BTreeMap<String, u32>) -> Vec<u32> {
        placed.values().copied().collect()
    }

    #[test]
    fn new_workers_spread_over_the_nodes_and_running_ones_stay() {
        let nodes = [node("a", 1, 0), node("b", 0, 0), node("c", 0, 0)];
        let (placed, unplaced) = place(4, &nodes, None);
        assert_eq!((counts(&placed), unplaced), (vec![2, 1, 1], 0));
    }

    #[test]
    fn a_lost_nodes_workers_go_to_the_others() {
        // Node `c` held two; it is gone, so the two go to `a` and `b`.
        let nodes = [node("a", 1, 0), node("b", 1, 0)];
        let (placed, _) = place(4, &nodes, None);
        assert_eq!(counts(&placed), vec![2, 2]);
    }

    #[test]
    fn scaling_in_takes_from_the_node_with_most_and_least_load() {
        let mut nodes = [node("a", 2, 0), node("b", 2, 0), node("c", 1, 0)];
        nodes[0].load = 3.0;
        let (placed, _) = place(3, &nodes, None);
        assert_eq!(counts(&placed), vec![1, 1, 1]);
        let (placed, _) = place(4, &nodes, None);
        // `b` is as full as `a` but idler: it gives one up.
        assert_eq!(counts(&placed), vec![2, 1, 1]);
    }

    #[test]
    fn gpu_workers_go_only_where_gpus_are_free_and_the_rest_waits() {
        let mut nodes = [node("a", 0, 1), node("b", 0, 3), node("c", 0, 8)];
        nodes[2].able = false;
        let (placed, unplaced) = place(5, &nodes, Some(2));
        // `b` takes one (two GPUs of three); `a` has one GPU; `c` cannot run it.
        assert_eq!(placed.get("a"), Some(&0));
        assert_eq!(placed.get("b"), Some(&1));
        assert_eq!(placed.get("c"), None);
        assert_eq!(unplaced, 4);
    }

    #[test]
    fn workers_piled_on_one_node_are_spread() {
        let nodes = [node("a", 3, 0), node("b", 0, 0), node("c", 0, 0)];
        let (placed, _) = place(2, &nodes, None);
        assert_eq!(counts(&placed), vec![1, 1, 0]);
        let (placed, _) = place(3, &nodes, None);
        assert_eq!(counts(&placed), vec![1, 1, 1]);
        // Not where the GPUs are taken.
        let nodes = [node("a", 3, 0), node("b", 0, 0)];
        let (placed, _) = place(3, &nodes, Some(1));
        assert_eq!(counts(&placed), vec![3, 0]);
    }

    #[test]
    fn a_waiting_request_draws_the_new_worker_to_its_node() {
        let mut nodes = [node("a", 0, 0), node("b", 0, 0)];
        nodes[1].waiting = true;
        let (placed, _) = place(1, &nodes, None);
        assert_eq!(placed.get("b"), Some(&1));
        assert_eq!(placed.get("a"), Some(&0));
    }
}
