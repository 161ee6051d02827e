//! Tenants and API keys, `/api/v1/tenants`, `/api/v1/keys` and `/api/v1/whoami` (see
//! [`crate::tenants`] and [`super::auth`]).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::error::json;
use super::{ApiError, AppState, ErrorBody, Payload, Who};
use crate::limits::{Holding, Quota};
use crate::tenants::{AccessPolicy, Caller, DEFAULT, Role, StoredKey, StoredTenant};

/// Largest body of these routes.
const MAX_BODY: u64 = 64 * 1024;

/// Who a key is.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Whoami {
    /// The tenant it acts in.
    pub tenant: String,
    /// Its role.
    pub role: Role,
    /// Its id (the public part of the key).
    pub key_id: String,
}

/// A tenant.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TenantInfo {
    /// Its name.
    pub name: String,
    /// When it was made, in milliseconds since the Unix epoch (0 for `default`).
    pub created_at_ms: u64,
    /// How many endpoints it has.
    pub endpoints: usize,
    /// What of the host its processors may reach (for `default`, the server's
    /// `--mount-root` and `--allow-host`).
    pub policy: AccessPolicy,
    /// What it may hold (nothing set: unlimited).
    pub quota: Quota,
    /// What its endpoints hold now, in the quota's terms.
    pub holding: Holding,
}

/// Every tenant.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TenantList {
    /// The tenants, `default` first.
    pub tenants: Vec<TenantInfo>,
}

/// A new tenant.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    /// Its name: 1 to 32 lowercase letters, digits and `-`, starting with a letter.
    pub name: String,
}

/// An API key, without the key itself.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyInfo {
    /// Its id (the public part of the key).
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its role.
    pub role: Role,
    /// Its label.
    pub name: String,
    /// When it was made, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Its rate limit over every endpoint, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<wasp_core::RateLimit>,
}

/// A key just made: the only time the key itself is shown.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NewKeyMade {
    /// The key: send it as `Authorization: Bearer <key>`. It is not stored, and cannot be
    /// shown again.
    pub key: String,
    /// The key's record.
    #[serde(flatten)]
    pub info: KeyInfo,
}

/// Keys.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyList {
    /// The keys, by id.
    pub keys: Vec<KeyInfo>,
}

/// A key to make.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// What it may do.
    pub role: Role,
    /// Its tenant (the caller's when absent; only an operator names another).
    #[serde(default)]
    pub tenant: Option<String>,
    /// A label for people.
    #[serde(default)]
    pub name: Option<String>,
    /// How fast and how much at once it may call data routes, over every endpoint.
    #[serde(default)]
    pub rate_limit: Option<wasp_core::RateLimit>,
}

/// Which keys to list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeyQuery {
    /// Only this tenant's (an operator's keys see every tenant's when absent).
    pub tenant: Option<String>,
}

fn info(k: &StoredKey) -> KeyInfo {
    KeyInfo {
        id: k.id.clone(),
        tenant: k.tenant.clone(),
        role: k.role,
        name: k.name.clone(),
        created_at_ms: k.created_ms,
        rate_limit: k.rate_limit.clone(),
    }
}

fn tenant_info(gateway: &AppState, t: StoredTenant) -> TenantInfo {
    TenantInfo {
        endpoints: endpoint_count(gateway, &t.name),
        holding: gateway.holding(&t.name, None),
        name: t.name,
        created_at_ms: t.created_ms,
        policy: t.policy,
        quota: t.quota,
    }
}

/// How many endpoints `tenant` has.
fn endpoint_count(gateway: &AppState, tenant: &str) -> usize {
    gateway
        .endpoints()
        .iter()
        .filter(|d| crate::tenants::tenant_of(&d.spec.name) == tenant)
        .count()
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            "invalid_json",
            format!("request body is not what this route takes: {e}"),
        )
    })
}

fn admin_only(caller: &Caller) -> Result<(), ApiError> {
    if caller.may(Role::Admin) {
        Ok(())
    } else {
        Err(ApiError::new(
            403,
            "forbidden",
            "only admin and operator keys manage keys",
        ))
    }
}

/// The key this request was made with: its tenant and role.
#[utoipa::path(get, path = "/api/v1/whoami", tag = "access",
    responses(
        (status = 200, description = "The key's tenant and role", body = Whoami),
        (status = 401, description = "No key, or not a valid one", body = ErrorBody),
    ))]
pub(crate) async fn whoami(Who(caller): Who) -> Result<Response, ApiError> {
    let (Some(role), Some(key_id)) = (caller.role, caller.key_id) else {
        return Err(ApiError::new(401, "missing_api_key", "no API key"));
    };
    Ok(json(
        StatusCode::OK,
        &Whoami {
            tenant: caller.tenant,
            role,
            key_id,
        },
    ))
}

/// Every tenant (operator keys).
#[utoipa::path(get, path = "/api/v1/tenants", tag = "access",
    responses((status = 200, description = "The tenants", body = TenantList)))]
pub(crate) async fn list_tenants(State(gateway): State<AppState>) -> Response {
    let tenants = gateway
        .directory
        .tenants()
        .into_iter()
        .map(|t| tenant_info(&gateway, t))
        .collect();
    json(StatusCode::OK, &TenantList { tenants })
}

/// Makes a tenant (operator keys).
#[utoipa::path(post, path = "/api/v1/tenants", tag = "access",
    request_body = NewTenant,
    responses(
        (status = 201, description = "Made", body = TenantInfo),
        (status = 400, description = "Not a tenant as JSON", body = ErrorBody),
        (status = 409, description = "A tenant of that name exists", body = ErrorBody),
        (status = 422, description = "Not a valid tenant name", body = ErrorBody),
    ))]
pub(crate) async fn create_tenant(
    State(gateway): State<AppState>,
    Payload(body): Payload<MAX_BODY>,
) -> Result<Response, ApiError> {
    let new: NewTenant = json_body(&body)?;
    let tenant = gateway.directory.create_tenant(&gateway.store, &new.name)?;
    Ok(json(StatusCode::CREATED, &tenant_info(&gateway, tenant)))
}

/// Grants a tenant what of the host its processors may reach (operator keys): mount roots
/// and addresses. Deploys from now on are checked against it; the default tenant's grant
/// is the server's flags.
#[utoipa::path(put, path = "/api/v1/tenants/{tenant}/policy", tag = "access",
    params(("tenant" = String, Path, description = "Tenant name")),
    request_body = AccessPolicy,
    responses(
        (status = 200, description = "Granted", body = TenantInfo),
        (status = 400, description = "Not a policy as JSON", body = ErrorBody),
        (status = 404, description = "No such tenant (or `default`)", body = ErrorBody),
        (status = 422, description = "A root that is not absolute, an address that is not IP:PORT or IP:*", body = ErrorBody),
    ))]
pub(crate) async fn set_policy(
    State(gateway): State<AppState>,
    Path(tenant): Path<String>,
    Payload(body): Payload<MAX_BODY>,
) -> Result<Response, ApiError> {
    let policy: AccessPolicy = json_body(&body)?;
    let record = gateway
        .directory
        .set_policy(&gateway.store, &tenant, policy)?
        .ok_or_else(|| {
            ApiError::new(
                404,
                "tenant_not_found",
                format!(
                    "no tenant `{tenant}` whose grant the API sets (the default tenant's is \
                     the server's --mount-root and --allow-host)"
                ),
            )
        })?;
    Ok(json(StatusCode::OK, &tenant_info(&gateway, record)))
}

/// Sets what a tenant may hold (operator keys): endpoints, versions, instances, workers,
/// GPUs, memory, stored bytes and queued jobs; an absent field is unlimited. What it holds
/// now stays; deploys, uploads and jobs from now on are checked against it. The default
/// tenant has no quota.
#[utoipa::path(put, path = "/api/v1/tenants/{tenant}/quota", tag = "access",
    params(("tenant" = String, Path, description = "Tenant name")),
    request_body = Quota,
    responses(
        (status = 200, description = "Set", body = TenantInfo),
        (status = 400, description = "Not a quota as JSON", body = ErrorBody),
        (status = 404, description = "No such tenant (or `default`)", body = ErrorBody),
        (status = 422, description = "`cpu_weight` out of range", body = ErrorBody),
    ))]
pub(crate) async fn set_quota(
    State(gateway): State<AppState>,
    Path(tenant): Path<String>,
    Payload(body): Payload<MAX_BODY>,
) -> Result<Response, ApiError> {
    let quota: Quota = json_body(&body)?;
    let weight = quota.cpu_weight.unwrap_or(1);
    let record = gateway
        .directory
        .set_quota(&gateway.store, &tenant, quota)?
        .ok_or_else(|| {
            ApiError::new(
                404,
                "tenant_not_found",
                format!("no tenant `{tenant}` with a quota (the default tenant has none)"),
            )
        })?;
    gateway.runtime.set_cpu_weight(&tenant, weight);
    Ok(json(StatusCode::OK, &tenant_info(&gateway, record)))
}

/// A tenant's metered usage, counted since the tenant was made (kept across restarts).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TenantUsage {
    /// The tenant.
    pub tenant: String,
    /// Requests served (sync requests, and each attempt of a job).
    pub requests: u64,
    /// Time its processors' guest code ran, in seconds (not counting waits for a core,
    /// an instance or a model).
    pub guest_cpu_seconds: f64,
    /// Time its requests spent in model backends, in seconds (requests batched together
    /// each count the batch's time).
    pub model_seconds: f64,
    /// Tokens its backends reported.
    pub tokens: u64,
    /// Bytes of the components it uploaded.
    pub stored_bytes: u64,
    /// Jobs waiting in its queues now.
    pub queued_jobs: u64,
}

/// Usage of tenants.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    /// One entry per tenant, by name.
    pub tenants: Vec<TenantUsage>,
}

/// Which tenant's usage.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Only this tenant (an operator sees every tenant when absent; others see their own).
    pub tenant: Option<String>,
}

/// Metered usage, the basis for billing: the caller's tenant's, or an operator's view of
/// every tenant (or `tenant`).
#[utoipa::path(get, path = "/api/v1/usage", tag = "access",
    params(UsageQuery),
    responses(
        (status = 200, description = "Usage per tenant", body = UsageReport),
        (status = 400, description = "A query that is not what this route takes", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ))]
pub(crate) async fn usage(
    State(gateway): State<AppState>,
    Who(caller): Who,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let names: Vec<String> = if caller.may(Role::Operator) {
        match query.tenant {
            Some(t) if gateway.directory.tenant_exists(&t) => vec![t],
            Some(t) => {
                return Err(ApiError::new(
                    404,
                    "tenant_not_found",
                    format!("no tenant `{t}`"),
                ));
            }
            None => gateway
                .directory
                .tenants()
                .into_iter()
                .map(|t| t.name)
                .collect(),
        }
    } else {
        vec![caller.tenant.clone()]
    };
    let counts = gateway.usage.snapshot();
    let this = gateway.clone();
    let tenants = tokio::task::spawn_blocking(move || {
        names
            .into_iter()
            .map(|tenant| {
                let c = counts.get(&tenant).copied().unwrap_or_default();
                TenantUsage {
                    requests: c.requests,
                    guest_cpu_seconds: c.guest_nanos as f64 / 1e9,
                    model_seconds: c.model_nanos as f64 / 1e9,
                    tokens: c.tokens,
                    stored_bytes: this.store.owned_bytes(&tenant).unwrap_or(0),
                    queued_jobs: this.queued_jobs(&tenant),
                    tenant,
                }
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
    Ok(json(StatusCode::OK, &UsageReport { tenants }))
}

/// Audit entries.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    /// The entries, oldest first.
    pub entries: Vec<crate::audit::AuditEntry>,
    /// Pass as `after` for the next page; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// Which audit entries.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only entries after this sequence number (0 by default: from the oldest kept).
    pub after: Option<u64>,
    /// At most this many (100 by default, 1000 at most).
    pub limit: Option<usize>,
}

/// The audit log of control-plane changes: who (key, role, tenant) made which change
/// (method and path), when, and how it was answered. A tenant admin sees its own
/// tenant's; an operator sees all.
#[utoipa::path(get, path = "/api/v1/audit", tag = "access",
    params(AuditQuery),
    responses(
        (status = 200, description = "Entries, oldest first", body = AuditPage),
        (status = 400, description = "`after` or `limit` is not a count", body = ErrorBody),
    ))]
pub(crate) async fn audit(
    State(gateway): State<AppState>,
    Who(caller): Who,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let tenant = (!caller.may(Role::Operator)).then(|| caller.tenant.clone());
    let this = gateway.clone();
    let entries = tokio::task::spawn_blocking(move || {
        this.audit.read(
            &this.store,
            query.after.unwrap_or(0),
            limit,
            tenant.as_deref(),
        )
    })
    .await
    .map_err(|e| ApiError::new(500, "internal", e.to_string()))??;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    Ok(json(StatusCode::OK, &AuditPage { entries, next }))
}

/// Removes a tenant and its keys (operator keys); refused while it has endpoints.
#[utoipa::path(delete, path = "/api/v1/tenants/{tenant}", tag = "access",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 409, description = "It still has endpoints", body = ErrorBody),
    ))]
pub(crate) async fn remove_tenant(
    State(gateway): State<AppState>,
    Path(tenant): Path<String>,
) -> Result<StatusCode, ApiError> {
    let not_found = || ApiError::new(404, "tenant_not_found", format!("no tenant `{tenant}`"));
    if tenant == DEFAULT || !gateway.directory.tenant_exists(&tenant) {
        return Err(not_found());
    }
    let left = endpoint_count(&gateway, &tenant);
    if left > 0 {
        return Err(ApiError::new(
            409,
            "tenant_in_use",
            format!("tenant `{tenant}` has {left} endpoints; remove them first"),
        ));
    }
    gateway.directory.remove_tenant(&gateway.store, &tenant)?;
    gateway.usage.forget(&gateway.store, &tenant)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Keys: a tenant admin's own tenant's; an operator's every tenant's (or `tenant`'s).
#[utoipa::path(get, path = "/api/v1/keys", tag = "access",
    params(KeyQuery),
    responses(
        (status = 200, description = "The keys, without the keys themselves", body = KeyList),
        (status = 403, description = "An invoker key", body = ErrorBody),
    ))]
pub(crate) async fn list_keys(
    State(gateway): State<AppState>,
    Who(caller): Who,
    Query(query): Query<KeyQuery>,
) -> Result<Response, ApiError> {
    admin_only(&caller)?;
    let tenant = if caller.may(Role::Operator) {
        query.tenant
    } else {
        Some(caller.tenant.clone())
    };
    let keys = gateway
        .directory
        .keys(tenant.as_deref())
        .iter()
        .map(info)
        .collect();
    Ok(json(StatusCode::OK, &KeyList { keys }))
}

/// Makes a key; the answer holds the key, which is never shown again. A tenant admin makes
/// admin and invoker keys of its own tenant; an operator makes any key.
#[utoipa::path(post, path = "/api/v1/keys", tag = "access",
    request_body = NewKey,
    responses(
        (status = 201, description = "Made", body = NewKeyMade),
        (status = 400, description = "Not a key request as JSON", body = ErrorBody),
        (status = 403, description = "Not this key's to make", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 422, description = "A name too long, a rate limit out of range (the error names the field)", body = ErrorBody),
    ))]
pub(crate) async fn create_key(
    State(gateway): State<AppState>,
    Who(caller): Who,
    Payload(body): Payload<MAX_BODY>,
) -> Result<Response, ApiError> {
    admin_only(&caller)?;
    let new: NewKey = json_body(&body)?;
    let operator = caller.may(Role::Operator);
    let tenant = new.tenant.unwrap_or_else(|| caller.tenant.clone());
    if !operator && (tenant != caller.tenant || new.role == Role::Operator) {
        return Err(ApiError::new(
            403,
            "forbidden",
            "a tenant admin makes admin and invoker keys of its own tenant only",
        )
        .with_field(if new.role == Role::Operator {
            "role"
        } else {
            "tenant"
        }));
    }
    if !gateway.directory.tenant_exists(&tenant) {
        return Err(
            ApiError::new(404, "tenant_not_found", format!("no tenant `{tenant}`"))
                .with_field("tenant"),
        );
    }
    let name = new.name.unwrap_or_default();
    if name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::new(
            422,
            "invalid_field",
            "a key's name is at most 128 characters, none of them control characters",
        )
        .with_field("name"));
    }
    let (key, token) =
        gateway
            .directory
            .create_key(&gateway.store, &tenant, new.role, &name, new.rate_limit)?;
    tracing::info!(key = %key.id, tenant = %key.tenant, role = key.role.as_str(), by = ?caller.key_id, "API key made");
    Ok(json(
        StatusCode::CREATED,
        &NewKeyMade {
            key: token,
            info: info(&key),
        },
    ))
}

/// Revokes a key at once. A tenant admin revokes its own tenant's keys.
#[utoipa::path(delete, path = "/api/v1/keys/{id}", tag = "access",
    params(("id" = String, Path, description = "Key id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 403, description = "An invoker key", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 409, description = "The last operator key", body = ErrorBody),
    ))]
pub(crate) async fn revoke_key(
    State(gateway): State<AppState>,
    Who(caller): Who,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin_only(&caller)?;
    let visible = gateway
        .directory
        .key(&id)
        .filter(|k| caller.may(Role::Operator) || k.tenant == caller.tenant);
    let Some(key) = visible else {
        return Err(ApiError::new(
            404,
            "key_not_found",
            format!("no key `{id}`"),
        ));
    };
    let operators = gateway
        .directory
        .keys(None)
        .iter()
        .filter(|k| k.role == Role::Operator)
        .count();
    if key.role == Role::Operator && operators <= 1 {
        // Without an operator key nobody could reach the control plane again short of
        // editing the data directory by hand.
        return Err(ApiError::new(
            409,
            "last_operator_key",
            format!("`{id}` is the last operator key; make another before revoking it"),
        ));
    }
    gateway.directory.revoke(&gateway.store, &id)?;
    gateway.limiters.forget_key(&id);
    tracing::info!(key = %id, by = ?caller.key_id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// A registry login, as answered (never its password).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RegistryLogin {
    /// The registry's host, as image references name it (`ghcr.io`, `host:5000`).
    pub registry: String,
    /// The user name.
    pub username: String,
    /// When it was last set, in milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
}

/// The caller's tenant's registry logins.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RegistryLoginList {
    /// The logins, by registry.
    pub registries: Vec<RegistryLogin>,
}

/// A login to set.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRegistryLogin {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

fn registry_login(login: &crate::tenants::StoredLogin) -> RegistryLogin {
    RegistryLogin {
        registry: login.registry.clone(),
        username: login.username.clone(),
        updated_at_ms: login.updated_ms,
    }
}

fn registry_host(registry: &str) -> Result<(), ApiError> {
    if crate::tenants::valid_registry(registry) {
        Ok(())
    } else {
        Err(ApiError::new(
            422,
            "invalid_field",
            format!(
                "`{registry}` is not a registry host (a DNS name or IP address, with an \
                 optional port: `ghcr.io`, `registry.example.com:5000`)"
            ),
        )
        .with_field("registry"))
    }
}

/// The tenant's image registry logins (without their passwords): container images from
/// those registries are pulled with them.
#[utoipa::path(get, path = "/api/v1/registries", tag = "access",
    responses(
        (status = 200, description = "The logins", body = RegistryLoginList),
        (status = 403, description = "An invoker key", body = ErrorBody),
    ))]
pub(crate) async fn list_registries(
    State(gateway): State<AppState>,
    Who(caller): Who,
) -> Result<Response, ApiError> {
    admin_only(&caller)?;
    let registries = gateway
        .directory
        .logins(&caller.tenant)
        .iter()
        .map(registry_login)
        .collect();
    Ok(json(StatusCode::OK, &RegistryLoginList { registries }))
}

/// Sets the tenant's login to an image registry (as `docker login` does): the tenant's
/// container workers pull images from that registry with it. The password is stored as
/// given (a pull needs it) and never answered.
#[utoipa::path(put, path = "/api/v1/registries/{registry}", tag = "access",
    params(("registry" = String, Path, description = "Registry host, as image references name it")),
    request_body = NewRegistryLogin,
    responses(
        (status = 200, description = "Replaced", body = RegistryLogin),
        (status = 201, description = "Set", body = RegistryLogin),
        (status = 400, description = "Not a login as JSON", body = ErrorBody),
        (status = 403, description = "An invoker key", body = ErrorBody),
        (status = 422, description = "Not a registry host, or an empty or overlong user name or password (the error names the field)", body = ErrorBody),
    ))]
pub(crate) async fn set_registry(
    State(gateway): State<AppState>,
    Who(caller): Who,
    Path(registry): Path<String>,
    Payload(body): Payload<MAX_BODY>,
) -> Result<Response, ApiError> {
    admin_only(&caller)?;
    registry_host(&registry)?;
    let new: NewRegistryLogin = json_body(&body)?;
    for (field, value) in [("username", &new.username), ("password", &new.password)] {
        if value.is_empty() || value.len() > 4096 || value.chars().any(char::is_control) {
            return Err(ApiError::new(
                422,
                "invalid_field",
                format!("the {field} is 1 to 4096 characters, none of them control characters"),
            )
            .with_field(field));
        }
    }
    let created = gateway.directory.set_login(
        &gateway.store,
        &caller.tenant,
        &registry,
        &new.username,
        &new.password,
    )?;
    tracing::info!(tenant = %caller.tenant, %registry, by = ?caller.key_id, "registry login set");
    let login = gateway
        .directory
        .logins(&caller.tenant)
        .into_iter()
        .find(|l| l.registry == registry)
        .map(|l| registry_login(&l))
        .ok_or_else(|| ApiError::new(500, "internal", "the login vanished as it was set"))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &login))
}

/// Forgets the tenant's login to a registry; its workers that run go on running.
#[utoipa::path(delete, path = "/api/v1/registries/{registry}", tag = "access",
    params(("registry" = String, Path, description = "Registry host")),
    responses(
        (status = 204, description = "Forgotten"),
        (status = 403, description = "An invoker key", body = ErrorBody),
        (status = 404, description = "No login to that registry", body = ErrorBody),
    ))]
pub(crate) async fn remove_registry(
    State(gateway): State<AppState>,
    Who(caller): Who,
    Path(registry): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin_only(&caller)?;
    if !gateway
        .directory
        .remove_login(&gateway.store, &caller.tenant, &registry)?
    {
        return Err(ApiError::new(
            404,
            "registry_login_not_found",
            format!("no login to `{registry}`"),
        ));
    }
    tracing::info!(tenant = %caller.tenant, %registry, by = ?caller.key_id, "registry login removed");
    Ok(StatusCode::NO_CONTENT)
}

/// The nodes of the cluster.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NodeList {
    /// The nodes whose heartbeat is recent, by name; this node alone outside cluster mode.
    pub nodes: Vec<crate::NodeInfo>,
}

/// The cluster's nodes: their API, endpoints, workers and GPUs (operator keys).
#[utoipa::path(get, path = "/api/v1/nodes", tag = "access",
    responses(
        (status = 200, description = "The nodes", body = NodeList),
        (status = 403, description = "Not an operator key", body = ErrorBody),
    ))]
pub(crate) async fn nodes(
    State(gateway): State<AppState>,
    Who(caller): Who,
) -> Result<Response, ApiError> {
    if !caller.may(Role::Operator) {
        return Err(ApiError::new(
            403,
            "forbidden",
            "only operator keys see the cluster's nodes",
        ));
    }
    let mut nodes = gateway.nodes();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(json(StatusCode::OK, &NodeList { nodes }))
}
