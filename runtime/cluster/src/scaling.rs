//! The cluster's scaler: one node at a time, the holder of a lease in the key-value bucket
//! `wasp_scaling`, decides every version's workers for the whole cluster from the loads
//! in the nodes' heartbeats, and writes where they go to the bucket `wasp_placements`
//! (one key per version); every node follows its share (see `wasp_gateway`'s placement).
//! The lease is a key that expires unless its holder writes it again: when the leader is
//! lost, another node takes the lease within [`LEASE_TTL`] and carries on from the
//! placements as they stand.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use wasp_gateway::{Cluster, Gateway, Placement, Placer};

use crate::{Node, key_of, name_of};

/// The bucket of the scaler's lease.
pub const SCALING_BUCKET: &str = "wasp_scaling";
/// The bucket of placements: where each version's workers go.
pub const PLACEMENTS_BUCKET: &str = "wasp_placements";
/// How long the lease outlives its holder's last renewal.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often the leader decides (and renews its lease), and the others try to take it.
const ROUND: Duration = Duration::from_secs(2);
/// The lease's key.
const LEASE_KEY: &str = "leader";

/// The bucket key of a version's placement: endpoint and version in hex, a dot between.
fn placement_key(endpoint: &str, version: &str) -> String {
    format!("{}.{}", key_of(endpoint), key_of(version))
}

/// The endpoint and version a placement key stands for.
fn placement_of(key: &str) -> Option<(String, String)> {
    let (endpoint, version) = key.split_once('.')?;
    Some((name_of(endpoint), name_of(version)))
}

/// Holds (or tries to take) the scaler's lease; while it holds it, decides and writes
/// the placements every round, and removes those of versions no longer deployed.
pub(crate) async fn lead(
    gateway: Arc<Gateway>,
    leases: kv::Store,
    placements: kv::Store,
    node: Arc<Node>,
) {
    let me = node.name.clone();
    let mut held: Option<u64> = None;
    let mut placer = Placer::default();
    let mut round = tokio::time::interval(ROUND);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        round.tick().await;
        let was_leader = held.is_some();
        held = match held {
            Some(revision) => match leases.update(LEASE_KEY, me.clone().into(), revision).await {
                Ok(revision) => Some(revision),
                Err(e) => {
                    tracing::warn!("cannot renew the scaler's lease: {e}");
                    None
                }
            },
            None => take(&leases, &me).await,
        };
        match (was_leader, held.is_some()) {
            (false, true) => tracing::info!(node = %me, "this node scales the cluster now"),
            (true, false) => tracing::warn!(node = %me, "this node no longer scales the cluster"),
            _ => {}
        }
        if held.is_none() {
            // Whoever leads next starts from the placements as they stand.
            placer = Placer::default();
            continue;
        }
        let nodes = node.nodes();
        for placement in gateway.place_workers(&mut placer, &nodes, &me) {
            let key = placement_key(&placement.endpoint, &placement.version);
            let written = match serde_json::to_vec(&placement) {
                Ok(value) => placements.put(&key, value.into()).await.map(|_| ()),
                Err(e) => {
                    tracing::error!("cannot encode a placement: {e}");
                    continue;
                }
            };
            if let Err(e) = written {
                tracing::warn!(endpoint = %placement.endpoint, "cannot write a placement: {e}");
                // Written again next round.
                placer.forget(&placement.endpoint, &placement.version);
            }
        }
        for (endpoint, version) in gateway.stale_placements() {
            if let Err(e) = placements.delete(placement_key(&endpoint, &version)).await {
                tracing::warn!(%endpoint, "cannot remove a stale placement: {e}");
            }
        }
    }
}

/// Takes the lease when nobody holds it, or when this node holds it already (a renewal
/// that failed on a lost connection, or this node restarted): its revision, if so.
async fn take(leases: &kv::Store, me: &str) -> Option<u64> {
    if let Ok(revision) = leases.create(LEASE_KEY, me.to_owned().into()).await {
        return Some(revision);
    }
    match leases.entry(LEASE_KEY).await {
        Ok(Some(entry))
            if matches!(entry.operation, kv::Operation::Put) && entry.value == me.as_bytes() =>
        {
            leases
                .update(LEASE_KEY, me.to_owned().into(), entry.revision)
                .await
                .ok()
        }
        _ => None,
    }
}

/// Follows the placements (every one, then each change) into this node's gateway.
pub(crate) async fn follow(gateway: Arc<Gateway>, placements: kv::Store) {
    crate::follow_bucket(placements, "the placements", |entry| {
        match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<Placement>(&entry.value) {
                Ok(placement) => gateway.placed(placement),
                Err(e) => tracing::warn!(
                    key = %entry.key,
                    "ignoring a placement this node cannot read: {e}"
                ),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Some((endpoint, version)) = placement_of(&entry.key) {
                    gateway.unplaced(&endpoint, &version);
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_keys_name_their_endpoint_and_version() {
        let key = placement_key("acme/chat", "v1.2");
        assert_eq!(key.matches('.').count(), 1);
        assert_eq!(
            placement_of(&key),
            Some(("acme/chat".to_owned(), "v1.2".to_owned()))
        );
    }
}
