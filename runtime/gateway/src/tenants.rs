//! Tenants and API keys.
//!
//! A tenant owns endpoints (and through them jobs, batches, logs and events) and the
//! components it uploaded. Endpoint names are unique per tenant: inside the server an
//! endpoint of tenant `acme` named `embed` is `acme/embed` (the store's key, the registry's,
//! a job's `endpoint`); the `default` tenant's endpoints keep their plain names, so a
//! data directory from before tenants is the default tenant's.
//!
//! An API key is `wasp_<id>_<secret>`: the id finds the record, and the record holds the
//! SHA-256 of the whole key, never the key (it is shown once, when made). Roles:
//! `operator` (every tenant, tenants, keys, metrics, backups), `admin` (deploys and manages
//! its tenant's endpoints and keys) and `invoker` (its tenant's data routes only).

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::store::{Records, Store};

/// The tenant of a data directory from before tenants, and of operators by default.
pub const DEFAULT: &str = "default";

/// What a key may do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Its tenant's data routes: invoke, OpenAI, KServe, jobs and batches.
    Invoker,
    /// Also deploys and manages its tenant's endpoints, components and keys.
    Admin,
    /// Everything, for every tenant: tenants, keys, metrics, backups.
    Operator,
}

impl Role {
    /// The role's name, as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invoker => "invoker",
            Self::Admin => "admin",
            Self::Operator => "operator",
        }
    }
}

/// A key as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredKey {
    /// The public part of the key (`wasp_<id>_...`).
    pub id: String,
    /// Its tenant (`default` for operators).
    pub tenant: String,
    /// What it may do.
    pub role: Role,
    /// A label for people.
    #[serde(default)]
    pub name: String,
    /// SHA-256 of the whole key, hex.
    pub hash: String,
    /// When it was made, in milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// How fast and how much at once it may call data routes (every endpoint together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<wasp_core::RateLimit>,
}

/// A tenant as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredTenant {
    /// Its name.
    pub name: String,
    /// When it was made, in milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// What of the host its processors may reach.
    #[serde(default)]
    pub policy: AccessPolicy,
    /// What it may hold.
    #[serde(default)]
    pub quota: crate::limits::Quota,
}

/// What of the host a tenant's processors may reach: the operator's grant. A spec asking
/// for more is refused at deploy, with the field named. Nothing by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessPolicy {
    /// Host directories under which `mounts` may lie (read-only, as every mount).
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub mount_roots: Vec<std::path::PathBuf>,
    /// Addresses `allow_hosts` may name: `IP:PORT`, or `IP:*` for every port of that IP.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
}

impl AccessPolicy {
    /// Checks a spec's mounts and `allow_hosts` against the grant.
    pub fn check(&self, spec: &wasp_core::EndpointSpec) -> Result<(), Error> {
        let roots: Vec<std::path::PathBuf> = self
            .mount_roots
            .iter()
            .filter_map(|r| r.canonicalize().ok())
            .collect();
        let granted: Vec<_> = self
            .allow_hosts
            .iter()
            .filter_map(|h| wasp_core::spec::parse_allow_host(h))
            .collect();
        for (i, version) in spec.versions.iter().enumerate() {
            let Some(processor) = &version.processor else {
                continue;
            };
            for (j, mount) in processor.mounts.iter().enumerate() {
                // One answer for a path outside the roots and one that is not there, so
                // that a spec cannot probe the host.
                let inside = mount
                    .host
                    .canonicalize()
                    .ok()
                    .filter(|p| p.is_dir())
                    .is_some_and(|p| roots.iter().any(|root| p.starts_with(root)));
                if !inside {
                    return Err(Error::Invalid {
                        field: format!("versions[{i}].processor.mounts[{j}].host"),
                        message: format!(
                            "`{}` is not a directory under a mount root this tenant was \
                             granted ({})",
                            mount.host.display(),
                            if self.mount_roots.is_empty() {
                                "it was granted none".to_owned()
                            } else {
                                self.mount_roots
                                    .iter()
                                    .map(|r| r.display().to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        ),
                    });
                }
            }
            for (k, entry) in processor.allow_hosts.iter().enumerate() {
                let covered = wasp_core::spec::parse_allow_host(entry).is_some_and(|(ip, port)| {
                    granted.iter().any(|(gip, gport)| {
                        *gip == ip && (gport.is_none() || (port.is_some() && *gport == port))
                    })
                });
                if !covered {
                    return Err(Error::Invalid {
                        field: format!("versions[{i}].processor.allow_hosts[{k}]"),
                        message: format!(
                            "`{entry}` is not among the addresses this tenant was granted ({})",
                            if self.allow_hosts.is_empty() {
                                "it was granted none".to_owned()
                            } else {
                                self.allow_hosts.join(", ")
                            }
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Who makes a request: the tenant it acts in, and its key's role (`None` without a key).
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The tenant whose resources the request sees.
    pub tenant: String,
    /// The key's role; `None` for a request without a key (public endpoints only).
    pub role: Option<Role>,
    /// The key's id.
    pub key_id: Option<String>,
    /// The key's rate limit.
    pub rate_limit: Option<wasp_core::RateLimit>,
}

impl Caller {
    /// The server's name for this tenant's endpoint `name`.
    pub fn qualify(&self, name: &str) -> String {
        qualify(&self.tenant, name)
    }

    /// Whether the endpoint with the server's name `qualified` is this tenant's.
    pub fn sees(&self, qualified: &str) -> bool {
        tenant_of(qualified) == self.tenant
    }

    /// Whether the key's role is at least `role`.
    pub fn may(&self, role: Role) -> bool {
        self.role.is_some_and(|r| r >= role)
    }
}

/// The server's name for endpoint `name` of `tenant`.
pub(crate) fn qualify(tenant: &str, name: &str) -> String {
    if tenant == DEFAULT {
        name.to_owned()
    } else {
        format!("{tenant}/{name}")
    }
}

/// The tenant of an endpoint by its server's name.
pub(crate) fn tenant_of(qualified: &str) -> &str {
    qualified.split_once('/').map_or(DEFAULT, |(t, _)| t)
}

/// An endpoint's name within its tenant.
pub(crate) fn local_name(qualified: &str) -> &str {
    qualified.split_once('/').map_or(qualified, |(_, n)| n)
}

/// A tenant's login to an image registry, as stored. The password is kept as given (a
/// pull needs it), in the store only, and never answered.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct StoredLogin {
    /// The tenant it belongs to.
    pub tenant: String,
    /// The registry's host (`ghcr.io`, `registry.example.com:5000`).
    pub registry: String,
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
    /// When it was last set, in ms since the epoch.
    pub updated_ms: u64,
}

impl std::fmt::Debug for StoredLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredLogin")
            .field("tenant", &self.tenant)
            .field("registry", &self.registry)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Whether `host` is a registry host as image references name one: a DNS name or an IP
/// address, with an optional port, at most 255 characters.
pub(crate) fn valid_registry(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    !name.is_empty()
        && host.len() <= 255
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn login_key(tenant: &str, registry: &str) -> String {
    format!("{tenant} {registry}")
}

/// A change of one access record (a tenant, an API key, a registry login), as the store
/// keeps it: what a cluster's nodes share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessChange {
    /// The kind: `tenants`, `api_keys` or `registry_logins`.
    pub table: String,
    /// The record's key in its table.
    pub key: String,
    /// The record (JSON), or `None` when it was removed.
    pub value: Option<Vec<u8>>,
}

/// The tables of access records, by the name an [`AccessChange`] gives them.
const ACCESS_TABLES: [(&str, Records); 3] = [
    ("tenants", Records::Tenants),
    ("api_keys", Records::ApiKeys),
    ("registry_logins", Records::RegistryLogins),
];

/// Told of each access record written here (cluster mode).
pub(crate) type AccessHook = Box<dyn Fn(AccessChange) + Send + Sync>;

/// Tenants and keys, in memory (the store holds them durably).
#[derive(Default)]
pub(crate) struct Directory {
    /// Told of each change made here.
    hook: std::sync::OnceLock<AccessHook>,
    keys: RwLock<HashMap<String, StoredKey>>,
    /// Registry logins, by tenant and registry host.
    logins: RwLock<BTreeMap<(String, String), StoredLogin>>,
    tenants: RwLock<BTreeMap<String, StoredTenant>>,
    /// The default tenant's grant: the server's `--mount-root` and `--allow-host`.
    default_policy: RwLock<AccessPolicy>,
}

impl Directory {
    /// Reads every tenant and key from the store.
    pub fn load(store: &Store) -> Result<Self, Error> {
        let directory = Self::default();
        for (id, bytes) in store.records(Records::ApiKeys)? {
            match serde_json::from_slice::<StoredKey>(&bytes) {
                Ok(key) => {
                    directory.write_keys().insert(key.id.clone(), key);
                }
                Err(e) => {
                    tracing::error!(key = %id, "an API key record is corrupt ({e}); the key does not work")
                }
            }
        }
        for (key, bytes) in store.records(Records::RegistryLogins)? {
            match serde_json::from_slice::<StoredLogin>(&bytes) {
                Ok(login) => {
                    directory
                        .write_logins()
                        .insert((login.tenant.clone(), login.registry.clone()), login);
                }
                Err(e) => tracing::error!(login = %key, "a registry login record is corrupt ({e})"),
            }
        }
        for (name, bytes) in store.records(Records::Tenants)? {
            match serde_json::from_slice::<StoredTenant>(&bytes) {
                Ok(tenant) => {
                    directory
                        .write_tenants()
                        .insert(tenant.name.clone(), tenant);
                }
                Err(e) => tracing::error!(tenant = %name, "a tenant record is corrupt ({e})"),
            }
        }
        Ok(directory)
    }

    fn write_keys(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, StoredKey>> {
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes an access record, and tells the hook.
    fn put(&self, store: &Store, table: Records, key: &str, bytes: &[u8]) -> Result<(), Error> {
        store.put_record(table, key, bytes)?;
        self.emit(table, key, Some(bytes.to_vec()));
        Ok(())
    }

    /// Removes an access record, and tells the hook.
    fn delete(&self, store: &Store, table: Records, key: &str) -> Result<bool, Error> {
        let existed = store.delete_record(table, key)?;
        self.emit(table, key, None);
        Ok(existed)
    }

    fn emit(&self, table: Records, key: &str, value: Option<Vec<u8>>) {
        let Some(hook) = self.hook.get() else {
            return;
        };
        if let Some((name, _)) = ACCESS_TABLES
            .iter()
            .find(|(_, t)| std::mem::discriminant(t) == std::mem::discriminant(&table))
        {
            hook(AccessChange {
                table: (*name).to_owned(),
                key: key.to_owned(),
                value,
            });
        }
    }

    /// Tells `hook` of every access record written here from now on.
    pub fn on_change(&self, hook: AccessHook) {
        let _ = self.hook.set(hook);
    }

    /// Every access record, as changes that would make them.
    pub fn records(&self, store: &Store) -> Result<Vec<AccessChange>, Error> {
        let mut all = Vec::new();
        for (name, table) in ACCESS_TABLES {
            for (key, bytes) in store.records(table)? {
                all.push(AccessChange {
                    table: name.to_owned(),
                    key,
                    value: Some(bytes),
                });
            }
        }
        Ok(all)
    }

    /// Applies a change another node made (not told to the hook); an error names what is
    /// wrong with it. Returns the id of a key it removed, if any.
    pub fn apply(&self, store: &Store, change: &AccessChange) -> Result<Option<String>, Error> {
        let table = ACCESS_TABLES
            .iter()
            .find(|(name, _)| *name == change.table)
            .map(|(_, t)| *t)
            .ok_or_else(|| Error::Store(format!("no access table `{}`", change.table)))?;
        let bad =
            |e: serde_json::Error| Error::Store(format!("{} `{}`: {e}", change.table, change.key));
        match &change.value {
            Some(bytes) => {
                // Parsed before it is written: a record this node cannot read stays out.
                match table {
                    Records::Tenants => {
                        let tenant: StoredTenant = serde_json::from_slice(bytes).map_err(bad)?;
                        store.put_record(table, &change.key, bytes)?;
                        self.write_tenants().insert(tenant.name.clone(), tenant);
                    }
                    Records::ApiKeys => {
                        let key: StoredKey = serde_json::from_slice(bytes).map_err(bad)?;
                        store.put_record(table, &change.key, bytes)?;
                        self.write_keys().insert(key.id.clone(), key);
                    }
                    _ => {
                        let login: StoredLogin = serde_json::from_slice(bytes).map_err(bad)?;
                        store.put_record(table, &change.key, bytes)?;
                        self.write_logins()
                            .insert((login.tenant.clone(), login.registry.clone()), login);
                    }
                }
                Ok(None)
            }
            None => {
                store.delete_record(table, &change.key)?;
                match table {
                    Records::Tenants => {
                        self.write_tenants().remove(&change.key);
                        Ok(None)
                    }
                    Records::ApiKeys => {
                        self.write_keys().remove(&change.key);
                        Ok(Some(change.key.clone()))
                    }
                    _ => {
                        self.write_logins()
                            .retain(|(t, r), _| login_key(t, r) != change.key);
                        Ok(None)
                    }
                }
            }
        }
    }

    fn write_logins(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, BTreeMap<(String, String), StoredLogin>> {
        self.logins.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets `tenant`'s login to `registry` (replacing one there was); `true` when new.
    pub fn set_login(
        &self,
        store: &Store,
        tenant: &str,
        registry: &str,
        username: &str,
        password: &str,
    ) -> Result<bool, Error> {
        let login = StoredLogin {
            tenant: tenant.to_owned(),
            registry: registry.to_owned(),
            username: username.to_owned(),
            password: password.to_owned(),
            updated_ms: crate::workers::now_ms(),
        };
        let bytes = serde_json::to_vec(&login).map_err(|e| Error::Store(e.to_string()))?;
        self.put(
            store,
            Records::RegistryLogins,
            &login_key(tenant, registry),
            &bytes,
        )?;
        Ok(self
            .write_logins()
            .insert((tenant.to_owned(), registry.to_owned()), login)
            .is_none())
    }

    /// Forgets `tenant`'s login to `registry`; `false` when there was none.
    pub fn remove_login(&self, store: &Store, tenant: &str, registry: &str) -> Result<bool, Error> {
        self.delete(store, Records::RegistryLogins, &login_key(tenant, registry))?;
        Ok(self
            .write_logins()
            .remove(&(tenant.to_owned(), registry.to_owned()))
            .is_some())
    }

    /// `tenant`'s registry logins, by registry.
    pub fn logins(&self, tenant: &str) -> Vec<StoredLogin> {
        self.logins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|l| l.tenant == tenant)
            .cloned()
            .collect()
    }

    /// `tenant`'s user name and password for `registry`, if it has a login there.
    pub fn login(&self, tenant: &str, registry: &str) -> Option<(String, String)> {
        self.logins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(tenant.to_owned(), registry.to_owned()))
            .map(|l| (l.username.clone(), l.password.clone()))
    }

    fn write_tenants(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, StoredTenant>> {
        self.tenants.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The key `token` is, if it is a live one.
    pub fn verify(&self, token: &str) -> Option<StoredKey> {
        let rest = token.strip_prefix("wasp_")?;
        let (id, _) = rest.split_once('_')?;
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = keys.get(id)?;
        let hash = hash(token);
        constant_time_eq(hash.as_bytes(), key.hash.as_bytes()).then(|| key.clone())
    }

    /// Whether a tenant of that name exists (`default` always does).
    pub fn tenant_exists(&self, name: &str) -> bool {
        name == DEFAULT
            || self
                .tenants
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(name)
    }

    /// Whether there is any key (none before the first start made the operator's).
    pub fn has_keys(&self) -> bool {
        !self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Every tenant, by name (`default` first).
    pub fn tenants(&self) -> Vec<StoredTenant> {
        let mut all = vec![StoredTenant {
            name: DEFAULT.into(),
            created_ms: 0,
            policy: self.default_policy(),
            quota: crate::limits::Quota::default(),
        }];
        all.extend(
            self.tenants
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned(),
        );
        all
    }

    /// The default tenant's grant (the server's flags).
    pub fn default_policy(&self) -> AccessPolicy {
        self.default_policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets the default tenant's grant (at start, from the server's flags).
    pub fn set_default_policy(&self, policy: AccessPolicy) {
        *self
            .default_policy
            .write()
            .unwrap_or_else(|e| e.into_inner()) = policy;
    }

    /// A tenant's grant; `None` when there is no such tenant.
    pub fn policy(&self, tenant: &str) -> Option<AccessPolicy> {
        if tenant == DEFAULT {
            return Some(self.default_policy());
        }
        self.tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .map(|t| t.policy.clone())
    }

    /// Replaces a tenant's grant (not the default tenant's, which the flags set); endpoints
    /// deployed before keep running, and the next deploy is checked against it.
    pub fn set_policy(
        &self,
        store: &Store,
        tenant: &str,
        policy: AccessPolicy,
    ) -> Result<Option<StoredTenant>, Error> {
        for (k, entry) in policy.allow_hosts.iter().enumerate() {
            if wasp_core::spec::parse_allow_host(entry).is_none() {
                return Err(Error::Invalid {
                    field: format!("allow_hosts[{k}]"),
                    message: format!("`{entry}` is not IP:PORT or IP:*"),
                });
            }
        }
        for (k, root) in policy.mount_roots.iter().enumerate() {
            if !root.is_absolute() {
                return Err(Error::Invalid {
                    field: format!("mount_roots[{k}]"),
                    message: format!("`{}` is not an absolute path", root.display()),
                });
            }
        }
        self.update(store, tenant, |record| record.policy = policy)
    }

    /// Changes a tenant's record (not the default tenant's, which has none), durably;
    /// `None` when there is no such tenant.
    fn update(
        &self,
        store: &Store,
        tenant: &str,
        change: impl FnOnce(&mut StoredTenant),
    ) -> Result<Option<StoredTenant>, Error> {
        let Some(mut record) = self
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .cloned()
        else {
            return Ok(None);
        };
        change(&mut record);
        let bytes = serde_json::to_vec(&record).map_err(|e| Error::Store(e.to_string()))?;
        self.put(store, Records::Tenants, tenant, &bytes)?;
        self.write_tenants()
            .insert(tenant.to_owned(), record.clone());
        Ok(Some(record))
    }

    /// A tenant's quota (the default tenant has none); `None` when there is no such
    /// tenant.
    pub fn quota(&self, tenant: &str) -> Option<crate::limits::Quota> {
        if tenant == DEFAULT {
            return Some(crate::limits::Quota::default());
        }
        self.tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .map(|t| t.quota.clone())
    }

    /// Replaces a tenant's quota (not the default tenant's, which has none): what it
    /// holds now stays, and the next deploy, upload or job is checked against it.
    pub fn set_quota(
        &self,
        store: &Store,
        tenant: &str,
        quota: crate::limits::Quota,
    ) -> Result<Option<StoredTenant>, Error> {
        if let Some(weight) = quota.cpu_weight
            && !(1..=1000).contains(&weight)
        {
            return Err(Error::Invalid {
                field: "cpu_weight".into(),
                message: "must be between 1 and 1000".into(),
            });
        }
        self.update(store, tenant, |record| record.quota = quota)
    }

    /// Makes a tenant.
    pub fn create_tenant(&self, store: &Store, name: &str) -> Result<StoredTenant, Error> {
        wasp_core::spec::check_tenant_name("name", name)?;
        if self.tenant_exists(name) {
            return Err(Error::AlreadyExists(format!(
                "tenant `{name}` exists already"
            )));
        }
        let tenant = StoredTenant {
            name: name.to_owned(),
            created_ms: crate::workers::now_ms(),
            policy: AccessPolicy::default(),
            quota: crate::limits::Quota::default(),
        };
        let bytes = serde_json::to_vec(&tenant).map_err(|e| Error::Store(e.to_string()))?;
        self.put(store, Records::Tenants, name, &bytes)?;
        self.write_tenants().insert(name.to_owned(), tenant.clone());
        Ok(tenant)
    }

    /// Removes a tenant and its keys; `false` when there was none.
    pub fn remove_tenant(&self, store: &Store, name: &str) -> Result<bool, Error> {
        if name == DEFAULT || !self.tenant_exists(name) {
            return Ok(false);
        }
        let ids: Vec<String> = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|k| k.tenant == name)
            .map(|k| k.id.clone())
            .collect();
        for id in ids {
            self.revoke(store, &id)?;
        }
        for login in self.logins(name) {
            self.remove_login(store, name, &login.registry)?;
        }
        self.delete(store, Records::Tenants, name)?;
        self.write_tenants().remove(name);
        Ok(true)
    }

    /// Makes a key; returns its record and the key itself (shown once, never stored).
    pub fn create_key(
        &self,
        store: &Store,
        tenant: &str,
        role: Role,
        name: &str,
        rate_limit: Option<wasp_core::RateLimit>,
    ) -> Result<(StoredKey, String), Error> {
        if let Some(limit) = &rate_limit {
            limit.validate("rate_limit")?;
        }
        let id = hex(&rand::random::<[u8; 8]>());
        let token = format!("wasp_{id}_{}", hex(&rand::random::<[u8; 32]>()));
        let key = StoredKey {
            id: id.clone(),
            tenant: if role == Role::Operator {
                DEFAULT.into()
            } else {
                tenant.to_owned()
            },
            role,
            name: name.to_owned(),
            hash: hash(&token),
            created_ms: crate::workers::now_ms(),
            rate_limit,
        };
        let bytes = serde_json::to_vec(&key).map_err(|e| Error::Store(e.to_string()))?;
        self.put(store, Records::ApiKeys, &id, &bytes)?;
        self.write_keys().insert(id, key.clone());
        Ok((key, token))
    }

    /// Revokes a key; `false` when there was none.
    pub fn revoke(&self, store: &Store, id: &str) -> Result<bool, Error> {
        let existed = self.delete(store, Records::ApiKeys, id)?;
        Ok(self.write_keys().remove(id).is_some() || existed)
    }

    /// The key with this id.
    pub fn key(&self, id: &str) -> Option<StoredKey> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Every key of `tenant` (of every tenant when `None`), by id.
    pub fn keys(&self, tenant: Option<&str>) -> Vec<StoredKey> {
        let mut keys: Vec<StoredKey> = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|k| tenant.is_none_or(|t| k.tenant == t))
            .cloned()
            .collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        keys
    }
}

/// SHA-256 of a key, hex.
fn hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    wasp_core::files::hex(bytes)
}

/// Compares without an early exit, so that the time taken says nothing of where two
/// hashes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn names_qualify_within_their_tenant() {
        assert_eq!(qualify(DEFAULT, "embed"), "embed");
        assert_eq!(qualify("acme", "embed"), "acme/embed");
        assert_eq!(tenant_of("acme/embed"), "acme");
        assert_eq!(tenant_of("embed"), DEFAULT);
        assert_eq!(local_name("acme/embed"), "embed");
        assert_eq!(local_name("embed"), "embed");
    }

    #[test]
    fn a_key_verifies_only_whole_and_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let directory = Directory::load(&store).unwrap();
        directory.create_tenant(&store, "acme").unwrap();
        let (key, token) = directory
            .create_key(&store, "acme", Role::Invoker, "ci", None)
            .unwrap();
        assert!(token.starts_with(&format!("wasp_{}_", key.id)));
        assert_eq!(directory.verify(&token).unwrap().tenant, "acme");
        let mut wrong = token.clone();
        wrong.pop();
        wrong.push('x');
        assert!(directory.verify(&wrong).is_none());
        assert!(directory.verify(&token[..token.len() - 1]).is_none());
        assert!(directory.verify("wasp_nope_x").is_none());
        assert!(directory.verify("").is_none());
        // Kept durably, as a hash only.
        drop(directory);
        let reloaded = Directory::load(&store).unwrap();
        assert!(reloaded.verify(&token).is_some());
        let stored = store.records(Records::ApiKeys).unwrap();
        assert!(!String::from_utf8_lossy(&stored[0].1).contains(&token));
        assert!(reloaded.revoke(&store, &key.id).unwrap());
        assert!(reloaded.verify(&token).is_none());
        assert!(Directory::load(&store).unwrap().verify(&token).is_none());
    }

    #[test]
    fn a_spec_reaches_only_the_host_it_was_granted() {
        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("models");
        std::fs::create_dir(&inside).unwrap();
        let outside = tempfile::tempdir().unwrap();
        let spec = |mount: &std::path::Path, host: &str| {
            wasp_core::EndpointSpec::from_toml(&format!(
                "name = \"e\"\n[[versions]]\nname = \"v1\"\n[versions.processor]\n\
                 component = \"a.wasm\"\nallow_hosts = [\"{host}\"]\n\
                 [[versions.processor.mounts]]\nhost = {:?}\nguest = \"/m\"\n",
                mount.display().to_string()
            ))
            .unwrap()
        };
        let policy = AccessPolicy {
            mount_roots: vec![root.path().to_owned()],
            allow_hosts: vec!["10.0.0.5:443".into(), "10.0.0.6:*".into()],
        };
        assert!(policy.check(&spec(&inside, "10.0.0.5:443")).is_ok());
        assert!(policy.check(&spec(&inside, "10.0.0.6:80")).is_ok());
        let field = |e: Error| match e {
            Error::Invalid { field, .. } => field,
            other => panic!("{other}"),
        };
        for (mount, host, at) in [
            (
                outside.path(),
                "10.0.0.5:443",
                "versions[0].processor.mounts[0].host",
            ),
            (
                std::path::Path::new("/"),
                "10.0.0.5:443",
                "versions[0].processor.mounts[0].host",
            ),
            (
                &inside.join("../../.."),
                "10.0.0.5:443",
                "versions[0].processor.mounts[0].host",
            ),
            (
                &inside,
                "10.0.0.5:80",
                "versions[0].processor.allow_hosts[0]",
            ),
            (
                &inside,
                "10.0.0.5:*",
                "versions[0].processor.allow_hosts[0]",
            ),
            (
                &inside,
                "10.0.0.7:443",
                "versions[0].processor.allow_hosts[0]",
            ),
        ] {
            let e = policy.check(&spec(mount, host)).unwrap_err();
            assert_eq!(field(e), at, "{} {host}", mount.display());
        }
        let e = AccessPolicy::default()
            .check(&spec(&inside, "10.0.0.5:443"))
            .unwrap_err();
        assert!(e.to_string().contains("granted none"), "{e}");
    }

    #[test]
    fn tenants_are_named_once_and_take_their_keys_along() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let directory = Directory::load(&store).unwrap();
        assert!(directory.create_tenant(&store, "Bad Name").is_err());
        directory.create_tenant(&store, "acme").unwrap();
        assert!(directory.create_tenant(&store, "acme").is_err());
        assert!(directory.create_tenant(&store, DEFAULT).is_err());
        let (_, token) = directory
            .create_key(&store, "acme", Role::Admin, "", None)
            .unwrap();
        assert!(directory.remove_tenant(&store, "acme").unwrap());
        assert!(directory.verify(&token).is_none());
        assert!(!directory.tenant_exists("acme"));
        assert!(!directory.remove_tenant(&store, DEFAULT).unwrap());
    }
}
