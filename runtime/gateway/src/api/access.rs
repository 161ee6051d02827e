//! Tenants and API keys, `/api/v1/tenants`, `/api/v1/keys` and `/api/v1/whoami` (see
//! [`crate::tenants`] and [`super::auth`]).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::error::json;
use super::{ApiError, AppState, ErrorBody, Payload, Who};
use crate::tenants::{AccessPolicy, Caller, DEFAULT, Role, StoredKey};

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
        .map(|t| TenantInfo {
            endpoints: endpoint_count(&gateway, &t.name),
            name: t.name,
            created_at_ms: t.created_ms,
            policy: t.policy,
        })
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
    Ok(json(
        StatusCode::CREATED,
        &TenantInfo {
            name: tenant.name,
            created_at_ms: tenant.created_ms,
            endpoints: 0,
            policy: tenant.policy,
        },
    ))
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
    let endpoints = endpoint_count(&gateway, &tenant);
    Ok(json(
        StatusCode::OK,
        &TenantInfo {
            name: record.name,
            created_at_ms: record.created_ms,
            endpoints,
            policy: record.policy,
        },
    ))
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
    let (key, token) = gateway
        .directory
        .create_key(&gateway.store, &tenant, new.role, &name)?;
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
    if visible.is_none() {
        return Err(ApiError::new(
            404,
            "key_not_found",
            format!("no key `{id}`"),
        ));
    }
    gateway.directory.revoke(&gateway.store, &id)?;
    tracing::info!(key = %id, by = ?caller.key_id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}
