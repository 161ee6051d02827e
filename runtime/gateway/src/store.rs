//! The embedded store: endpoint records in a redb database, component bytes as
//! content-addressed files, both under the data directory.
//!
//! redb is a pure-Rust, crash-safe (copy-on-write, checksummed pages, fsync on commit)
//! key-value store, so `wasp serve` needs nothing else installed; endpoint writes are rare
//! and small.
//!
//! Layout of the data directory:
//!
//! | path | what |
//! | --- | --- |
//! | `wasp.redb` | the database; table `endpoints`: endpoint name (`&str`, `tenant/name` outside the default tenant) -> JSON of [`StoredEndpoint`]; table `batches`: batch id -> JSON of its record and checkpoint; table `tenants`: name -> JSON of the tenant; table `api_keys`: key id -> JSON of the key (its hash, never the key); table `component_owners`: (digest, tenant) -> (); table `usage`: tenant -> JSON of its counters; table `audit`: 20-digit sequence number -> JSON of a control-plane change |
//! | `components/<sha256>.wasm` | uploaded components, named by the SHA-256 of their bytes |
//! | `cache/` | compiled components (owned by the wasm runtime) |
//!
//! Every file is written atomically and durably ([`wasp_core::files`]) and checked when read
//! back: a component whose bytes no longer match their digest is removed and reported,
//! never served. Temporaries of interrupted writes are swept at every start. The database
//! runs redb's integrity check at every start; a database that fails it stops the start
//! with what to do. After an I/O error (a full disk, say) redb refuses further work, so the
//! store reopens it at the next operation, which succeeds once the disk has room again.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata, StorageError,
    TableDefinition, TableHandle,
};
use serde::{Deserialize, Serialize};
use wasp_core::EndpointSpec;
use wasp_core::files;

use crate::Error;

const ENDPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("endpoints");
const BATCHES: TableDefinition<&str, &[u8]> = TableDefinition::new("batches");
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const API_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_keys");
const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage");
const AUDIT: TableDefinition<&str, &[u8]> = TableDefinition::new("audit");
const REGISTRY_LOGINS: TableDefinition<&str, &[u8]> = TableDefinition::new("registry_logins");
const COMPONENT_OWNERS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("component_owners");

/// The small record tables besides endpoints, by what they hold.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Records {
    /// Batch records.
    Batches,
    /// Tenants.
    Tenants,
    /// API keys (hashed).
    ApiKeys,
    /// Usage counters, by tenant.
    Usage,
    /// The audit log, by zero-padded sequence number.
    Audit,
    /// Image registry logins, by tenant and registry host.
    RegistryLogins,
}

impl Records {
    fn table(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Self::Batches => BATCHES,
            Self::Tenants => TENANTS,
            Self::ApiKeys => API_KEYS,
            Self::Usage => USAGE,
            Self::Audit => AUDIT,
            Self::RegistryLogins => REGISTRY_LOGINS,
        }
    }
}

/// The database's file name in the data directory.
pub const DB_FILE: &str = "wasp.redb";

/// What the store keeps of an endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEndpoint {
    /// The spec, with components as digests.
    pub spec: EndpointSpec,
    /// Whether the user stopped it.
    pub stopped: bool,
    /// The key its job webhooks are signed with (empty in records of older wasps).
    #[serde(default)]
    pub webhook_secret: String,
}

/// What [`Store::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// `true` when the database failed redb's integrity check and redb repaired it.
    pub repaired: bool,
    /// Endpoint records, all of which decode.
    pub endpoints: usize,
    /// Component files checked against their digests.
    pub components: usize,
    /// Components whose bytes did not match their digest (removed; upload them again).
    pub corrupt_components: Vec<String>,
    /// Temporaries of interrupted writes that were removed.
    pub swept: usize,
}

enum Db {
    Open(Database),
    /// An I/O error put the database out of use; reopened at the next operation.
    Failed,
    Closed,
}

/// The data directory's store.
pub struct Store {
    db: Mutex<Db>,
    db_path: PathBuf,
    components: PathBuf,
}

/// A redb error as the gateway's error; `what` names the operation for the client.
fn db_err(what: &str, e: impl Into<redb::Error>) -> Error {
    match e.into() {
        redb::Error::Io(io) => Error::io(what, None, io),
        redb::Error::PreviousIo => Error::StoreUnavailable(format!(
            "{what}: the store had an I/O error and is being reopened; retry shortly"
        )),
        other => Error::Store(format!("{what}: {other}")),
    }
}

/// Whether the database must be reopened after this error.
fn needs_reopen(e: &Error) -> bool {
    matches!(
        e,
        Error::StorageFull { .. } | Error::Io { .. } | Error::StoreUnavailable(_)
    )
}

/// Opens the database, runs redb's integrity check, and turns every failure (a panic in
/// the storage engine on a mangled file included) into a message that says what to do.
fn open_checked(path: &Path) -> Result<(Database, bool), Error> {
    let opened = std::panic::catch_unwind(|| -> Result<(Database, bool), DatabaseError> {
        let mut db = Database::create(path)?;
        let clean = db.check_integrity()?;
        Ok((db, !clean))
    });
    let advice = |problem: String| {
        Error::OpenStore(format!(
            "{problem}. Run `wasp store check --data-dir {dir}` to try a repair; if it cannot \
             repair the file, restore a backup made with `wasp store backup`, or move {file} \
             aside to start with an empty store (uploaded components and the compiled cache \
             are kept)",
            dir = path.parent().unwrap_or(Path::new(".")).display(),
            file = path.display(),
        ))
    };
    match opened {
        Ok(Ok(opened)) => Ok(opened),
        Ok(Err(DatabaseError::DatabaseAlreadyOpen)) => Err(Error::OpenStore(format!(
            "the store {} is in use by another wasp process; stop it, or give this one \
             another --data-dir",
            path.display()
        ))),
        Ok(Err(DatabaseError::UpgradeRequired(v))) => Err(Error::OpenStore(format!(
            "the store {} has redb file format {v}, which this wasp cannot read; open it with \
             the wasp that wrote it and make a backup (`wasp store backup`)",
            path.display()
        ))),
        Ok(Err(DatabaseError::Storage(StorageError::Io(e)))) => Err(Error::OpenStore(format!(
            "cannot open the store {}: {e}",
            path.display()
        ))),
        Ok(Err(e)) => Err(advice(format!(
            "the store {} is damaged: {e}",
            path.display()
        ))),
        Err(_) => Err(advice(format!(
            "the store {} is damaged: the storage engine could not read it",
            path.display()
        ))),
    }
}

/// The digests of the components stored in `dir`.
fn stored_digests(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let digest = name.strip_suffix(".wasm")?;
            (digest.len() == 64).then(|| digest.to_owned())
        })
        .collect()
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir`: runs the database's integrity
    /// check, then sweeps temporaries of interrupted writes (the database's lock makes this
    /// process the directory's only writer).
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        Self::open_inner(data_dir).map(|(store, _, _)| store)
    }

    /// Opens the store; also says whether the database was repaired and how many
    /// temporaries were swept.
    fn open_inner(data_dir: &Path) -> Result<(Self, bool, usize), Error> {
        let components = data_dir.join("components");
        std::fs::create_dir_all(&components).map_err(|e| {
            Error::OpenStore(format!("cannot create {}: {e}", components.display()))
        })?;
        let db_path = data_dir.join(DB_FILE);
        let (db, repaired) = open_checked(&db_path)?;
        if repaired {
            tracing::warn!(path = %db_path.display(), "the store failed its integrity check and was repaired");
        }
        let tx = db
            .begin_write()
            .map_err(|e| db_err("opening the store", e))?;
        tx.open_table(ENDPOINTS)
            .map_err(|e| db_err("opening the store", e))?;
        tx.open_table(BATCHES)
            .map_err(|e| db_err("opening the store", e))?;
        tx.open_table(TENANTS)
            .map_err(|e| db_err("opening the store", e))?;
        for table in [API_KEYS, USAGE, AUDIT, REGISTRY_LOGINS] {
            tx.open_table(table)
                .map_err(|e| db_err("opening the store", e))?;
        }
        let owners_new = !tx
            .list_tables()
            .map_err(|e| db_err("opening the store", e))?
            .any(|t| t.name() == COMPONENT_OWNERS.name());
        {
            let mut owners = tx
                .open_table(COMPONENT_OWNERS)
                .map_err(|e| db_err("opening the store", e))?;
            if owners_new {
                // Components uploaded before tenants belong to the default tenant.
                for digest in stored_digests(&components) {
                    owners
                        .insert((digest.as_str(), crate::tenants::DEFAULT), ())
                        .map_err(|e| db_err("opening the store", e))?;
                }
            }
        }
        tx.commit().map_err(|e| db_err("opening the store", e))?;
        let store = Self {
            db: Mutex::new(Db::Open(db)),
            db_path,
            components,
        };
        let swept = store.sweep(data_dir)?;
        Ok((store, repaired, swept))
    }

    fn sweep(&self, data_dir: &Path) -> Result<usize, Error> {
        let mut swept = 0;
        for dir in [data_dir, self.components.as_path()] {
            swept += files::sweep_temporaries(dir)
                .map_err(|e| Error::OpenStore(format!("cannot clean {}: {e}", dir.display())))?;
        }
        if swept > 0 {
            tracing::info!(swept, "removed temporaries of interrupted writes");
        }
        Ok(swept)
    }

    /// Checks a data directory that no server is using: the database's integrity (redb
    /// repairs what it can), every endpoint record, and every component against its digest
    /// (corrupt ones are removed). Fails with what to do when the database is beyond repair.
    pub fn check(data_dir: &Path) -> Result<CheckReport, Error> {
        let (store, repaired, swept) = Self::open_inner(data_dir)?;
        let endpoints = store.endpoints()?.len();
        let mut report = CheckReport {
            repaired,
            endpoints,
            components: 0,
            corrupt_components: Vec::new(),
            swept,
        };
        let entries = std::fs::read_dir(&store.components)
            .map_err(|e| Error::io("listing components", Some(store.components.clone()), e))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| Error::io("listing components", Some(store.components.clone()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(digest) = name.strip_suffix(".wasm") else {
                continue;
            };
            report.components += 1;
            match store.component(digest) {
                Ok(_) => {}
                Err(Error::CorruptComponent(d)) => report.corrupt_components.push(d),
                Err(e) => return Err(e),
            }
        }
        store.close();
        Ok(report)
    }

    /// Runs `f` on the database, reopening it first if an earlier I/O error put it out of
    /// use, and marking it for reopening when `f` fails with one.
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, Error>) -> Result<T, Error> {
        let mut guard = self.db.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*guard, Db::Failed) {
            // redb takes the file's lock again; the old handle is gone.
            match Database::create(&self.db_path) {
                Ok(db) => {
                    tracing::info!("the store was reopened after an I/O error");
                    *guard = Db::Open(db);
                }
                Err(e) => {
                    return Err(Error::StoreUnavailable(format!(
                        "the store cannot be reopened after an I/O error ({e}); retry when the \
                         data directory has room"
                    )));
                }
            }
        }
        let result = match &*guard {
            Db::Open(db) => f(db),
            Db::Failed | Db::Closed => return Err(Error::Store("the store is closed".into())),
        };
        if let Err(e) = &result
            && needs_reopen(e)
        {
            tracing::warn!("store operation failed, the store will be reopened: {e}");
            *guard = Db::Failed;
        }
        result
    }

    /// Writes an endpoint record (durable when this returns).
    pub fn put_endpoint(&self, endpoint: &StoredEndpoint) -> Result<(), Error> {
        const WHAT: &str = "saving the endpoint";
        let bytes = serde_json::to_vec(endpoint).map_err(|e| Error::Store(e.to_string()))?;
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| db_err(WHAT, e))?;
            tx.open_table(ENDPOINTS)
                .map_err(|e| db_err(WHAT, e))?
                .insert(endpoint.spec.name.as_str(), bytes.as_slice())
                .map_err(|e| db_err(WHAT, e))?;
            tx.commit().map_err(|e| db_err(WHAT, e))
        })
    }

    /// Removes an endpoint record; `false` if there was none.
    pub fn delete_endpoint(&self, name: &str) -> Result<bool, Error> {
        const WHAT: &str = "removing the endpoint";
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| db_err(WHAT, e))?;
            let existed = tx
                .open_table(ENDPOINTS)
                .map_err(|e| db_err(WHAT, e))?
                .remove(name)
                .map_err(|e| db_err(WHAT, e))?
                .is_some();
            tx.commit().map_err(|e| db_err(WHAT, e))?;
            Ok(existed)
        })
    }

    /// Every endpoint record.
    pub fn endpoints(&self) -> Result<Vec<StoredEndpoint>, Error> {
        const WHAT: &str = "reading endpoints";
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| db_err(WHAT, e))?;
            let table = tx.open_table(ENDPOINTS).map_err(|e| db_err(WHAT, e))?;
            let mut out = Vec::new();
            for row in table.iter().map_err(|e| db_err(WHAT, e))? {
                let (key, value) = row.map_err(|e| db_err(WHAT, e))?;
                let record = serde_json::from_slice(value.value()).map_err(|e| {
                    Error::Store(format!(
                        "endpoint record `{}` is corrupt ({e}); `wasp store check` reports \
                         every such record",
                        key.value()
                    ))
                })?;
                out.push(record);
            }
            Ok(out)
        })
    }

    /// Writes a record (durable when this returns).
    pub(crate) fn put_record(&self, table: Records, key: &str, record: &[u8]) -> Result<(), Error> {
        const WHAT: &str = "saving a record";
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| db_err(WHAT, e))?;
            tx.open_table(table.table())
                .map_err(|e| db_err(WHAT, e))?
                .insert(key, record)
                .map_err(|e| db_err(WHAT, e))?;
            tx.commit().map_err(|e| db_err(WHAT, e))
        })
    }

    /// Writes several records of one table in one transaction, and removes the oldest
    /// (lowest keys) beyond `keep` when given.
    pub(crate) fn put_records(
        &self,
        table: Records,
        records: &[(String, Vec<u8>)],
        keep: Option<u64>,
    ) -> Result<(), Error> {
        const WHAT: &str = "saving records";
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| db_err(WHAT, e))?;
            {
                let mut t = tx.open_table(table.table()).map_err(|e| db_err(WHAT, e))?;
                for (key, record) in records {
                    t.insert(key.as_str(), record.as_slice())
                        .map_err(|e| db_err(WHAT, e))?;
                }
                if let Some(keep) = keep {
                    let len = t.len().map_err(|e| db_err(WHAT, e))?;
                    for _ in keep..len {
                        t.pop_first().map_err(|e| db_err(WHAT, e))?;
                    }
                }
            }
            tx.commit().map_err(|e| db_err(WHAT, e))
        })
    }

    /// Up to `limit` records of a table with keys above `after`, in key order.
    pub(crate) fn records_after(
        &self,
        table: Records,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, Error> {
        const WHAT: &str = "reading records";
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| db_err(WHAT, e))?;
            let table = tx.open_table(table.table()).map_err(|e| db_err(WHAT, e))?;
            let mut out = Vec::new();
            let range = table
                .range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .map_err(|e| db_err(WHAT, e))?;
            for row in range.take(limit) {
                let (key, value) = row.map_err(|e| db_err(WHAT, e))?;
                out.push((key.value().to_owned(), value.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// The highest key of a table.
    pub(crate) fn last_key(&self, table: Records) -> Result<Option<String>, Error> {
        const WHAT: &str = "reading records";
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| db_err(WHAT, e))?;
            let table = tx.open_table(table.table()).map_err(|e| db_err(WHAT, e))?;
            Ok(table
                .last()
                .map_err(|e| db_err(WHAT, e))?
                .map(|(key, _)| key.value().to_owned()))
        })
    }

    /// Removes a record; `false` if there was none.
    pub(crate) fn delete_record(&self, table: Records, key: &str) -> Result<bool, Error> {
        const WHAT: &str = "removing a record";
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| db_err(WHAT, e))?;
            let existed = tx
                .open_table(table.table())
                .map_err(|e| db_err(WHAT, e))?
                .remove(key)
                .map_err(|e| db_err(WHAT, e))?
                .is_some();
            tx.commit().map_err(|e| db_err(WHAT, e))?;
            Ok(existed)
        })
    }

    /// Every record of a table, by key.
    pub(crate) fn records(&self, table: Records) -> Result<Vec<(String, Vec<u8>)>, Error> {
        const WHAT: &str = "reading records";
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| db_err(WHAT, e))?;
            let table = tx.open_table(table.table()).map_err(|e| db_err(WHAT, e))?;
            let mut out = Vec::new();
            for row in table.iter().map_err(|e| db_err(WHAT, e))? {
                let (key, value) = row.map_err(|e| db_err(WHAT, e))?;
                out.push((key.value().to_owned(), value.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// Writes a batch record (durable when this returns).
    pub fn put_batch(&self, id: &str, record: &[u8]) -> Result<(), Error> {
        self.put_record(Records::Batches, id, record)
    }

    /// Every batch record, by id.
    pub fn batches(&self) -> Result<Vec<(String, Vec<u8>)>, Error> {
        self.records(Records::Batches)
    }

    /// Records that `tenant` may use the component `digest` (it uploaded it).
    pub(crate) fn add_component_owner(&self, digest: &str, tenant: &str) -> Result<(), Error> {
        const WHAT: &str = "recording the component's owner";
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| db_err(WHAT, e))?;
            tx.open_table(COMPONENT_OWNERS)
                .map_err(|e| db_err(WHAT, e))?
                .insert((digest, tenant), ())
                .map_err(|e| db_err(WHAT, e))?;
            tx.commit().map_err(|e| db_err(WHAT, e))
        })
    }

    /// The bytes of the components `tenant` uploaded (each counted in full, also when
    /// another tenant uploaded the same bytes).
    pub(crate) fn owned_bytes(&self, tenant: &str) -> Result<u64, Error> {
        const WHAT: &str = "reading the component's owners";
        let digests = self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| db_err(WHAT, e))?;
            let table = tx
                .open_table(COMPONENT_OWNERS)
                .map_err(|e| db_err(WHAT, e))?;
            let mut digests = Vec::new();
            for row in table.iter().map_err(|e| db_err(WHAT, e))? {
                let (key, _) = row.map_err(|e| db_err(WHAT, e))?;
                let (digest, owner) = key.value();
                if owner == tenant {
                    digests.push(digest.to_owned());
                }
            }
            Ok(digests)
        })?;
        Ok(digests
            .iter()
            .filter_map(|d| std::fs::metadata(self.component_path(d)).ok())
            .map(|m| m.len())
            .sum())
    }

    /// Whether `tenant` uploaded the component `digest`.
    pub(crate) fn owns_component(&self, digest: &str, tenant: &str) -> Result<bool, Error> {
        const WHAT: &str = "reading the component's owners";
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| db_err(WHAT, e))?;
            let table = tx
                .open_table(COMPONENT_OWNERS)
                .map_err(|e| db_err(WHAT, e))?;
            Ok(table
                .get((digest, tenant))
                .map_err(|e| db_err(WHAT, e))?
                .is_some())
        })
    }

    /// A consistent copy of the database, as the bytes of a redb file: one read
    /// transaction's snapshot, taken while the store keeps serving. The copy is built in a
    /// temporary file in the data directory, which is removed before this returns.
    pub fn snapshot(&self) -> Result<Vec<u8>, Error> {
        const WHAT: &str = "backing up the store";
        let tmp = files::temp_path(&self.db_path);
        let result = self.with_db(|db| {
            let snapshot = db.begin_read().map_err(|e| db_err(WHAT, e))?;
            let copy = Database::create(&tmp).map_err(|e| db_err(WHAT, e))?;
            let tx = copy.begin_write().map_err(|e| db_err(WHAT, e))?;
            for table in [
                ENDPOINTS,
                BATCHES,
                TENANTS,
                API_KEYS,
                USAGE,
                AUDIT,
                REGISTRY_LOGINS,
            ] {
                let from = snapshot.open_table(table).map_err(|e| db_err(WHAT, e))?;
                let mut to = tx.open_table(table).map_err(|e| db_err(WHAT, e))?;
                for row in from.iter().map_err(|e| db_err(WHAT, e))? {
                    let (key, value) = row.map_err(|e| db_err(WHAT, e))?;
                    to.insert(key.value(), value.value())
                        .map_err(|e| db_err(WHAT, e))?;
                }
            }
            {
                let from = snapshot
                    .open_table(COMPONENT_OWNERS)
                    .map_err(|e| db_err(WHAT, e))?;
                let mut to = tx
                    .open_table(COMPONENT_OWNERS)
                    .map_err(|e| db_err(WHAT, e))?;
                for row in from.iter().map_err(|e| db_err(WHAT, e))? {
                    let (key, _) = row.map_err(|e| db_err(WHAT, e))?;
                    to.insert(key.value(), ()).map_err(|e| db_err(WHAT, e))?;
                }
            }
            tx.commit().map_err(|e| db_err(WHAT, e))?;
            drop(copy);
            std::fs::read(&tmp).map_err(|e| Error::io(WHAT, Some(tmp.clone()), e))
        });
        let _ = std::fs::remove_file(&tmp);
        result
    }

    /// Stores component bytes under their SHA-256 and returns the hex digest. A stored copy
    /// that no longer matches its digest is replaced.
    pub fn put_component(&self, bytes: &[u8]) -> Result<String, Error> {
        let digest = files::sha256_hex(bytes);
        let path = self.component_path(&digest);
        let intact = match self.component(&digest) {
            Ok(_) => true,
            Err(Error::UnknownComponent(_) | Error::CorruptComponent(_)) => false,
            Err(e) => return Err(e),
        };
        if !intact {
            files::write_atomic(&path, bytes)
                .map_err(|e| Error::io("storing the component", Some(path.clone()), e))?;
        }
        Ok(digest)
    }

    /// The bytes of a stored component, checked against their digest. A file whose bytes
    /// no longer match is removed, and reported as [`Error::CorruptComponent`].
    pub fn component(&self, digest: &str) -> Result<Vec<u8>, Error> {
        let valid = digest.len() == 64
            && digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(Error::UnknownComponent(digest.to_owned()));
        }
        let path = self.component_path(digest);
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::UnknownComponent(digest.to_owned()),
            _ => Error::io("reading the component", Some(path.clone()), e),
        })?;
        if files::sha256_hex(&bytes) != digest {
            tracing::warn!(
                path = %path.display(),
                "a stored component no longer matches its digest (torn write, bit rot or a bad \
                 copy); removing it: upload it again"
            );
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), "cannot remove it: {e}");
            }
            return Err(Error::CorruptComponent(digest.to_owned()));
        }
        Ok(bytes)
    }

    fn component_path(&self, digest: &str) -> PathBuf {
        self.components.join(format!("{digest}.wasm"))
    }

    /// Closes the database so another server may open the directory.
    pub fn close(&self) {
        *self.db.lock().unwrap_or_else(|e| e.into_inner()) = Db::Closed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn spec(name: &str) -> EndpointSpec {
        EndpointSpec::from_toml(&format!(
            "name = \"{name}\"\n[[versions]]\nname = \"v1\"\nprocessor = {{ component = \"a.wasm\" }}"
        ))
        .unwrap()
    }

    #[test]
    fn components_from_before_tenants_belong_to_the_default_tenant() {
        let dir = tempfile::tempdir().unwrap();
        // A data directory an older wasp wrote: a component, no owners table.
        std::fs::create_dir_all(dir.path().join("components")).unwrap();
        let digest = files::sha256_hex(b"old");
        std::fs::write(dir.path().join(format!("components/{digest}.wasm")), b"old").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(
            store
                .owns_component(&digest, crate::tenants::DEFAULT)
                .unwrap()
        );
        assert!(!store.owns_component(&digest, "acme").unwrap());
        // Uploaded later, by a tenant: that tenant's, not everyone's.
        let new = store.put_component(b"new").unwrap();
        store.add_component_owner(&new, "acme").unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(store.owns_component(&new, "acme").unwrap());
        assert!(!store.owns_component(&new, crate::tenants::DEFAULT).unwrap());
    }

    #[test]
    fn endpoints_and_components_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec("é");
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .put_endpoint(&StoredEndpoint {
                    spec: spec.clone(),
                    stopped: true,
                    webhook_secret: String::new(),
                })
                .unwrap();
            let digest = store.put_component(b"abc").unwrap();
            assert_eq!(digest, ABC);
            store.close();
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.endpoints().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].spec, spec);
        assert!(all[0].stopped);
        assert_eq!(store.component(ABC).unwrap(), b"abc");
        assert!(matches!(
            store.component("00"),
            Err(Error::UnknownComponent(_))
        ));
        assert!(matches!(
            store.component("../wasp.redb"),
            Err(Error::UnknownComponent(_))
        ));
        assert!(store.delete_endpoint("é").unwrap());
        assert!(!store.delete_endpoint("é").unwrap());
    }

    #[test]
    fn a_corrupt_component_is_never_returned_and_an_upload_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_component(b"abc").unwrap();
        let path = dir.path().join(format!("components/{ABC}.wasm"));
        std::fs::write(&path, b"abd").unwrap();
        assert!(matches!(store.component(ABC), Err(Error::CorruptComponent(d)) if d == ABC));
        assert!(!path.exists(), "the corrupt copy is removed");
        std::fs::write(&path, b"abX").unwrap();
        assert_eq!(store.put_component(b"abc").unwrap(), ABC);
        assert_eq!(store.component(ABC).unwrap(), b"abc");
    }

    #[test]
    fn start_sweeps_temporaries_and_check_reports() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_component(b"abc").unwrap();
            store
                .put_endpoint(&StoredEndpoint {
                    spec: spec("a"),
                    stopped: false,
                    webhook_secret: String::new(),
                })
                .unwrap();
            store.close();
        }
        let leftover = files::temp_path(&dir.path().join("components/x.wasm"));
        std::fs::write(&leftover, b"partial").unwrap();
        let bad = files::sha256_hex(b"other");
        std::fs::write(dir.path().join(format!("components/{bad}.wasm")), b"not it").unwrap();
        let report = Store::check(dir.path()).unwrap();
        assert_eq!(
            report,
            CheckReport {
                repaired: false,
                endpoints: 1,
                components: 2,
                corrupt_components: vec![bad],
                swept: 1,
            }
        );
        assert!(!leftover.exists());
    }

    #[test]
    fn a_snapshot_is_a_store_that_opens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for name in ["a", "b"] {
            store
                .put_endpoint(&StoredEndpoint {
                    spec: spec(name),
                    stopped: false,
                    webhook_secret: String::new(),
                })
                .unwrap();
        }
        let dest = tempfile::tempdir().unwrap();
        std::fs::write(dest.path().join(DB_FILE), store.snapshot().unwrap()).unwrap();
        let copy = Store::open(dest.path()).unwrap();
        let names: Vec<String> = copy
            .endpoints()
            .unwrap()
            .into_iter()
            .map(|e| e.spec.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        let leftovers = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with(files::TEMP_PREFIX)
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn a_second_open_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let Err(e) = Store::open(dir.path()) else {
            panic!("opened twice")
        };
        assert!(
            e.to_string().contains("in use by another wasp process"),
            "{e}"
        );
    }

    #[test]
    fn a_mangled_database_stops_the_start_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .put_endpoint(&StoredEndpoint {
                    spec: spec("a"),
                    stopped: false,
                    webhook_secret: String::new(),
                })
                .unwrap();
            store.close();
        }
        let path = dir.path().join(DB_FILE);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
        match Store::open(dir.path()) {
            Err(e) => {
                eprintln!("{e}");
                assert!(e.to_string().contains("wasp store check"), "{e}")
            }
            // redb may repair a truncated file; then the store must still be consistent.
            Ok(store) => {
                store.endpoints().unwrap();
            }
        }
    }
}
