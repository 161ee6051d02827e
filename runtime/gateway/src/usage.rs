//! Usage metering per tenant: the basis for billing a shared platform.
//!
//! Each tenant has one [`Meter`], shared by every version of its endpoints: requests
//! served (sync requests and job attempts alike), the time its guest code ran (summed by
//! the Wasm host around each poll of a guest call, so time spent waiting for a turn on the
//! cores, for an instance or for a model is not counted), the time its requests spent in
//! model backends, and the tokens its generation backends report. The counters are kept
//! across restarts: they are written to the store every few seconds (and at shutdown), so
//! a crash loses at most that much.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::store::{Records, Store};

/// One tenant's counters.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    /// Requests served (each job attempt counts as one).
    pub requests: AtomicU64,
    /// Time its guest code ran, in nanoseconds (shared with the Wasm host).
    pub guest_nanos: Arc<AtomicU64>,
    /// Time its requests spent in model backends, in nanoseconds.
    pub model_nanos: AtomicU64,
    /// Tokens its backends reported (`usage.total_tokens` in an output's metadata).
    pub tokens: AtomicU64,
}

impl Meter {
    /// Counts a backend call that took `took` and answered `output`.
    pub fn model_call(&self, took: Duration, output: Option<&wasp_core::ModelOutput>) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.model_nanos.fetch_add(nanos, Ordering::Relaxed);
        if let Some(tokens) = output.and_then(reported_tokens) {
            self.tokens.fetch_add(tokens, Ordering::Relaxed);
        }
    }

    fn counts(&self) -> Counts {
        Counts {
            requests: self.requests.load(Ordering::Relaxed),
            guest_nanos: self.guest_nanos.load(Ordering::Relaxed),
            model_nanos: self.model_nanos.load(Ordering::Relaxed),
            tokens: self.tokens.load(Ordering::Relaxed),
        }
    }

    fn add(&self, counts: &Counts) {
        self.requests.fetch_add(counts.requests, Ordering::Relaxed);
        self.guest_nanos
            .fetch_add(counts.guest_nanos, Ordering::Relaxed);
        self.model_nanos
            .fetch_add(counts.model_nanos, Ordering::Relaxed);
        self.tokens.fetch_add(counts.tokens, Ordering::Relaxed);
    }
}

/// The tokens an output's metadata reports: `{"usage": {"total_tokens": n}}`, as OpenAI
/// answers write it.
fn reported_tokens(output: &wasp_core::ModelOutput) -> Option<u64> {
    let metadata = output.metadata.as_deref()?;
    if !metadata.contains("total_tokens") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(metadata).ok()?;
    value.get("usage")?.get("total_tokens")?.as_u64()
}

/// The counters as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counts {
    pub requests: u64,
    pub guest_nanos: u64,
    pub model_nanos: u64,
    pub tokens: u64,
}

/// Every tenant's meter.
#[derive(Default)]
pub(crate) struct Usage {
    meters: RwLock<HashMap<String, Arc<Meter>>>,
}

impl Usage {
    /// Reads the counters the store kept.
    pub fn load(store: &Store) -> Result<Self, Error> {
        let usage = Self::default();
        for (tenant, bytes) in store.records(Records::Usage)? {
            match serde_json::from_slice::<Counts>(&bytes) {
                Ok(counts) => usage.meter(&tenant).add(&counts),
                Err(e) => {
                    tracing::error!(%tenant, "a usage record is corrupt ({e}); counting from 0")
                }
            }
        }
        Ok(usage)
    }

    /// The meter of `tenant`, made on first use.
    pub fn meter(&self, tenant: &str) -> Arc<Meter> {
        if let Some(meter) = self
            .meters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
        {
            return meter.clone();
        }
        self.meters
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.to_owned())
            .or_default()
            .clone()
    }

    /// Every tenant's counters, by tenant.
    pub fn snapshot(&self) -> BTreeMap<String, Counts> {
        self.meters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(tenant, meter)| (tenant.clone(), meter.counts()))
            .collect()
    }

    /// Writes every tenant's counters to the store.
    pub fn save(&self, store: &Store) -> Result<(), Error> {
        for (tenant, counts) in self.snapshot() {
            let bytes = serde_json::to_vec(&counts).map_err(|e| Error::Store(e.to_string()))?;
            store.put_record(Records::Usage, &tenant, &bytes)?;
        }
        Ok(())
    }

    /// Forgets a removed tenant's counters.
    pub fn forget(&self, store: &Store, tenant: &str) -> Result<(), Error> {
        self.meters
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(tenant);
        store.delete_record(Records::Usage, tenant)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn counters_survive_a_restart_and_tokens_come_from_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let usage = Usage::load(&store).unwrap();
        let acme = usage.meter("acme");
        acme.requests.fetch_add(3, Ordering::Relaxed);
        acme.guest_nanos.fetch_add(1_500, Ordering::Relaxed);
        let output = wasp_core::ModelOutput {
            tensors: Vec::new(),
            metadata: Some(r#"{"usage": {"prompt_tokens": 5, "total_tokens": 12}}"#.into()),
            index: 0,
            last: true,
        };
        acme.model_call(Duration::from_millis(2), Some(&output));
        acme.model_call(Duration::from_millis(1), None);
        usage.save(&store).unwrap();
        let again = Usage::load(&store).unwrap().snapshot();
        assert_eq!(
            again["acme"],
            Counts {
                requests: 3,
                guest_nanos: 1_500,
                model_nanos: 3_000_000,
                tokens: 12
            }
        );
        usage.forget(&store, "acme").unwrap();
        assert!(Usage::load(&store).unwrap().snapshot().is_empty());
    }
}
