//! The audit log: every change to the control plane (a `POST`, `PUT`, `PATCH` or `DELETE`
//! under `/api/v1/`), who made it, when, and how it ended, durable before the answer goes
//! out. The newest [`KEEP`] entries are kept.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::store::{Records, Store};
use crate::tenants::Caller;

/// How many entries are kept; older ones are dropped as new ones come.
pub(crate) const KEEP: u64 = 100_000;

/// One change.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Its place in the log, from 1.
    pub seq: u64,
    /// When it was answered, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The tenant it acted in.
    pub tenant: String,
    /// The key that made it.
    pub key_id: String,
    /// That key's role.
    pub role: String,
    /// `POST`, `PUT`, `PATCH` or `DELETE`.
    pub method: String,
    /// The route's path (without any `/t/{tenant}` prefix).
    pub path: String,
    /// The answer's status.
    pub status: u16,
    /// The request's id (`x-request-id`).
    pub request_id: String,
}

/// Whether a request changes the control plane.
pub(crate) fn audited(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    path.starts_with("/api/v1/")
        && matches!(
            *method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        )
}

/// Appends entries to the store.
pub(crate) struct AuditLog {
    next: Mutex<u64>,
}

impl AuditLog {
    /// Finds where the log ends.
    pub fn open(store: &Store) -> Result<Self, Error> {
        let last = store
            .last_key(Records::Audit)?
            .and_then(|k| k.parse::<u64>().ok())
            .unwrap_or(0);
        Ok(Self {
            next: Mutex::new(last + 1),
        })
    }

    /// Writes one entry (durable when this returns).
    pub fn append(
        &self,
        store: &Store,
        caller: &Caller,
        method: &str,
        path: &str,
        status: u16,
        request_id: &str,
    ) -> Result<(), Error> {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let entry = AuditEntry {
            seq: *next,
            at_ms: crate::workers::now_ms(),
            tenant: caller.tenant.clone(),
            key_id: caller.key_id.clone().unwrap_or_default(),
            role: caller.role.map(|r| r.as_str()).unwrap_or("").to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            status,
            request_id: request_id.to_owned(),
        };
        let bytes = serde_json::to_vec(&entry).map_err(|e| Error::Store(e.to_string()))?;
        store.put_records(Records::Audit, &[(key(entry.seq), bytes)], Some(KEEP))?;
        *next += 1;
        Ok(())
    }

    /// Up to `limit` entries after `after`, of `tenant` only when given.
    pub fn read(
        &self,
        store: &Store,
        after: u64,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<Vec<AuditEntry>, Error> {
        let mut out = Vec::new();
        let mut from = key(after);
        loop {
            let chunk = store.records_after(Records::Audit, &from, 512)?;
            let Some((last, _)) = chunk.last() else {
                return Ok(out);
            };
            from = last.clone();
            for (_, bytes) in chunk {
                let Ok(entry) = serde_json::from_slice::<AuditEntry>(&bytes) else {
                    continue;
                };
                if tenant.is_none_or(|t| entry.tenant == t) {
                    out.push(entry);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
    }
}

/// The store's key of entry `seq`: zero-padded, so that keys sort as numbers.
fn key(seq: u64) -> String {
    format!("{seq:020}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::tenants::Role;

    #[test]
    fn entries_are_kept_in_order_across_restarts_and_read_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = AuditLog::open(&store).unwrap();
        let caller = |t: &str| Caller {
            tenant: t.into(),
            role: Some(Role::Admin),
            key_id: Some("k".into()),
            rate_limit: None,
        };
        for i in 0..12 {
            let t = if i % 3 == 0 { "acme" } else { "default" };
            log.append(&store, &caller(t), "PUT", "/api/v1/endpoints/e", 200, "r")
                .unwrap();
        }
        let again = AuditLog::open(&store).unwrap();
        again
            .append(
                &store,
                &caller("acme"),
                "DELETE",
                "/api/v1/endpoints/e",
                204,
                "r",
            )
            .unwrap();
        let all = again.read(&store, 0, 100, None).unwrap();
        assert_eq!(all.len(), 13);
        assert!(all.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        let acme = again.read(&store, 0, 100, Some("acme")).unwrap();
        assert_eq!(
            acme.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 4, 7, 10, 13]
        );
        assert_eq!(again.read(&store, 4, 2, Some("acme")).unwrap()[0].seq, 7);
        assert!(audited(&axum::http::Method::PUT, "/api/v1/endpoints/e"));
        assert!(!audited(&axum::http::Method::GET, "/api/v1/endpoints"));
        assert!(!audited(&axum::http::Method::POST, "/endpoints/e/run"));
    }
}
