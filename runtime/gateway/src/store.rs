//! The embedded store: endpoint records in a redb database, component bytes as
//! content-addressed files, both under the data directory.
//!
//! redb is a pure-Rust, crash-safe (copy-on-write, fsync on commit) key-value store, so
//! `wasp serve` needs nothing else installed; endpoint writes are rare and small.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasp_core::EndpointSpec;

use crate::Error;

const ENDPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("endpoints");

/// What the store keeps of an endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEndpoint {
    /// The spec, with components as digests.
    pub spec: EndpointSpec,
    /// Whether the user stopped it.
    pub stopped: bool,
}

/// The data directory's store.
pub struct Store {
    db: Mutex<Option<Database>>,
    components: PathBuf,
}

fn db_err(e: impl Into<redb::Error>) -> Error {
    Error::Store(e.into().to_string())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        let components = data_dir.join("components");
        std::fs::create_dir_all(&components).map_err(io_err(&components))?;
        let db = Database::create(data_dir.join("wasp.redb")).map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(ENDPOINTS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Self {
            db: Mutex::new(Some(db)),
            components,
        })
    }

    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, Error>) -> Result<T, Error> {
        let guard = self.db.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(Error::Store("the store is closed".into())),
        }
    }

    /// Writes an endpoint record (durable when this returns).
    pub fn put_endpoint(&self, endpoint: &StoredEndpoint) -> Result<(), Error> {
        let bytes = serde_json::to_vec(endpoint).map_err(|e| Error::Store(e.to_string()))?;
        self.with_db(|db| {
            let tx = db.begin_write().map_err(db_err)?;
            tx.open_table(ENDPOINTS)
                .map_err(db_err)?
                .insert(endpoint.spec.name.as_str(), bytes.as_slice())
                .map_err(db_err)?;
            tx.commit().map_err(db_err)
        })
    }

    /// Removes an endpoint record; `false` if there was none.
    pub fn delete_endpoint(&self, name: &str) -> Result<bool, Error> {
        self.with_db(|db| {
            let tx = db.begin_write().map_err(db_err)?;
            let existed = tx
                .open_table(ENDPOINTS)
                .map_err(db_err)?
                .remove(name)
                .map_err(db_err)?
                .is_some();
            tx.commit().map_err(db_err)?;
            Ok(existed)
        })
    }

    /// Every endpoint record.
    pub fn endpoints(&self) -> Result<Vec<StoredEndpoint>, Error> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(ENDPOINTS).map_err(db_err)?;
            let mut out = Vec::new();
            for row in table.iter().map_err(db_err)? {
                let (key, value) = row.map_err(db_err)?;
                let record = serde_json::from_slice(value.value()).map_err(|e| {
                    Error::Store(format!("endpoint record `{}` is corrupt: {e}", key.value()))
                })?;
                out.push(record);
            }
            Ok(out)
        })
    }

    /// Stores component bytes under their SHA-256 and returns the hex digest.
    pub fn put_component(&self, bytes: &[u8]) -> Result<String, Error> {
        let digest = hex(&Sha256::digest(bytes));
        let path = self.component_path(&digest);
        if !path.exists() {
            let tmp = path.with_extension(format!("tmp{}", rand::random::<u64>()));
            std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        }
        Ok(digest)
    }

    /// The bytes of a stored component.
    pub fn component(&self, digest: &str) -> Result<Vec<u8>, Error> {
        let path = self.component_path(digest);
        std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::UnknownComponent(digest.to_owned()),
            _ => Error::Io { path, source: e },
        })
    }

    fn component_path(&self, digest: &str) -> PathBuf {
        self.components.join(format!("{digest}.wasm"))
    }

    /// Closes the database so another server may open the directory.
    pub fn close(&self) {
        self.db.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_components_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let spec = EndpointSpec::from_toml(
            "name = \"é\"\n[[versions]]\nname = \"v1\"\nprocessor = { component = \"a.wasm\" }",
        )
        .unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .put_endpoint(&StoredEndpoint {
                    spec: spec.clone(),
                    stopped: true,
                })
                .unwrap();
            let digest = store.put_component(b"abc").unwrap();
            assert_eq!(
                digest,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            );
            store.close();
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.endpoints().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].spec, spec);
        assert!(all[0].stopped);
        assert_eq!(
            store
                .component("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
                .unwrap(),
            b"abc"
        );
        assert!(matches!(
            store.component("00"),
            Err(Error::UnknownComponent(_))
        ));
        assert!(store.delete_endpoint("é").unwrap());
        assert!(!store.delete_endpoint("é").unwrap());
    }
}
