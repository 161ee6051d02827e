//! Who is calling, and may they: every request passes here before it is routed.
//!
//! A path may start with `/t/{tenant}`, which names the tenant the rest of the path acts
//! in (an operator's way into a tenant, and the way to a tenant's public endpoints); the
//! prefix is removed before routing. A key (`Authorization: Bearer wasp_...`) acts in its
//! own tenant; naming another tenant in the prefix finds nothing there (404, as for any
//! resource the caller cannot see). Then the route's class decides:
//!
//! | paths | who |
//! | --- | --- |
//! | `/healthz`, `/api/v1/openapi.json`, `/ui…` (the console's page and assets) | anyone |
//! | `/metrics`, `/api/v1/tenants…`, `/api/v1/store/snapshot` | operator keys |
//! | `/api/v1/keys…`, `/api/v1/whoami`, `/api/v1/jobs…`, `/api/v1/batches…` | any key (the handlers check the rest) |
//! | other `/api/v1/…` | admin and operator keys |
//! | everything else (invoke, OpenAI, KServe, jobs) | any key; without one, public endpoints only |

use axum::body::Body;
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderValue, Request, Uri};
use axum::response::{IntoResponse, Response};

use crate::Gateway;
use crate::api::ApiError;
use crate::tenants::{Caller, DEFAULT, Role};

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Open,
    Operator,
    AnyKey,
    Admin,
    Data,
}

fn class(path: &str) -> Class {
    match path {
        "/healthz" | "/api/v1/openapi.json" | "/ui" => return Class::Open,
        _ if path.starts_with("/ui/") => return Class::Open,
        "/metrics" | "/api/v1/store/snapshot" => return Class::Operator,
        "/api/v1/keys" | "/api/v1/whoami" => return Class::AnyKey,
        _ => {}
    }
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if under("/api/v1/tenants") {
        Class::Operator
    } else if under("/api/v1/keys") || under("/api/v1/jobs") || under("/api/v1/batches") {
        Class::AnyKey
    } else if path.starts_with("/api/v1/") {
        Class::Admin
    } else {
        Class::Data
    }
}

/// 401 for a request that needs a key and has none (or a bad one).
pub(crate) fn unauthorized(code: &'static str, message: &str) -> Response {
    let mut response = ApiError::new(401, code, message).into_response();
    response.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"wasp\""),
    );
    response
}

/// What a request without a key to a non-public endpoint is told.
pub(crate) const NEEDS_KEY: &str =
    "this route needs an API key (`Authorization: Bearer wasp_...`) unless the endpoint is public";

/// Finds who calls and checks that they may call this route; the request's path loses its
/// `/t/{tenant}` prefix and gains the [`Caller`] as an extension. `Err` is the answer.
pub(crate) fn authenticate(
    gateway: &Gateway,
    request: &mut Request<Body>,
) -> Result<(), Box<Response>> {
    let named = strip_tenant(request).map_err(Box::new)?;
    if named
        .as_ref()
        .is_some_and(|t| !gateway.directory.tenant_exists(t))
    {
        return Err(Box::new(
            ApiError::no_route(request.method(), request.uri()).into_response(),
        ));
    }
    let key = match request.headers().get(AUTHORIZATION) {
        None => None,
        Some(value) => {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or(v.strip_prefix("bearer ")))
                .map(str::trim)
                .ok_or_else(|| {
                    unauthorized(
                        "invalid_api_key",
                        "the Authorization header must be `Bearer <API key>`",
                    )
                })?;
            Some(gateway.directory.verify(token).ok_or_else(|| {
                unauthorized(
                    "invalid_api_key",
                    "the API key is not valid (or was revoked)",
                )
            })?)
        }
    };
    let not_found = || ApiError::no_route(request.method(), request.uri()).into_response();
    let caller = match &key {
        Some(key) if key.role == Role::Operator => Caller {
            tenant: named.clone().unwrap_or_else(|| DEFAULT.to_owned()),
            role: Some(key.role),
            key_id: Some(key.id.clone()),
            rate_limit: key.rate_limit.clone(),
        },
        Some(key) => {
            if named.as_ref().is_some_and(|t| *t != key.tenant) {
                // Another tenant's space: nothing there this key may see.
                return Err(Box::new(not_found()));
            }
            Caller {
                tenant: key.tenant.clone(),
                role: Some(key.role),
                key_id: Some(key.id.clone()),
                rate_limit: key.rate_limit.clone(),
            }
        }
        None => Caller {
            tenant: named.clone().unwrap_or_else(|| DEFAULT.to_owned()),
            role: None,
            key_id: None,
            rate_limit: None,
        },
    };
    let needed = class(request.uri().path());
    let allowed = match needed {
        Class::Open | Class::Data => true,
        Class::AnyKey => caller.role.is_some(),
        Class::Admin => caller.may(Role::Admin),
        Class::Operator => caller.may(Role::Operator),
    };
    if !allowed {
        return Err(Box::new(match caller.role {
            None => unauthorized("missing_api_key", NEEDS_KEY),
            Some(role) => ApiError::new(
                403,
                "forbidden",
                format!(
                    "a key with role `{}` cannot use {}",
                    role.as_str(),
                    request.uri().path()
                ),
            )
            .into_response(),
        }));
    }
    // A key's header is the server's business only: processors never see it. It is kept
    // aside for a request this node forwards to another node of its cluster.
    if let Some(presented) = request.headers_mut().remove(AUTHORIZATION) {
        request.extensions_mut().insert(Presented(presented));
    }
    request.extensions_mut().insert(caller);
    Ok(())
}

/// The `Authorization` header a request came with (taken out of its headers), for a
/// forward to another node of the cluster, which checks it again.
#[derive(Clone)]
pub(crate) struct Presented(pub(crate) axum::http::HeaderValue);

/// Removes a leading `/t/{tenant}` from the request's path and returns the tenant; 404 when
/// no such tenant exists.
#[allow(clippy::result_large_err)]
fn strip_tenant(request: &mut Request<Body>) -> Result<Option<String>, Response> {
    let path = request.uri().path();
    let Some(rest) = path.strip_prefix("/t/") else {
        return Ok(None);
    };
    let (tenant, below) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let tenant = tenant.to_owned();
    let mut target = below.to_owned();
    if let Some(query) = request.uri().query() {
        target.push('?');
        target.push_str(query);
    }
    let uri: Uri = target
        .parse()
        .map_err(|_| ApiError::new(400, "invalid_path", "the path is not valid").into_response())?;
    *request.uri_mut() = uri;
    Ok(Some(tenant))
}

/// The caller a request was authenticated as, from its extensions (a request that skipped
/// [`authenticate`] acts as nobody in the default tenant).
pub(crate) fn caller_in(extensions: &axum::http::Extensions) -> Caller {
    extensions
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(|| Caller {
            tenant: DEFAULT.to_owned(),
            role: None,
            key_id: None,
            rate_limit: None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_classed_by_path() {
        assert_eq!(class("/healthz"), Class::Open);
        assert_eq!(class("/api/v1/openapi.json"), Class::Open);
        assert_eq!(class("/metrics"), Class::Operator);
        assert_eq!(class("/api/v1/tenants/acme"), Class::Operator);
        assert_eq!(class("/api/v1/store/snapshot"), Class::Operator);
        assert_eq!(class("/api/v1/tenants"), Class::Operator);
        assert_eq!(class("/api/v1/keys/abc"), Class::AnyKey);
        assert_eq!(class("/api/v1/endpoints"), Class::Admin);
        assert_eq!(class("/api/v1/jobs"), Class::AnyKey);
        assert_eq!(class("/api/v1/batches/b1/output"), Class::AnyKey);
        assert_eq!(class("/api/v1/jobsx"), Class::Admin);
        assert_eq!(class("/endpoints/x/invoke"), Class::Data);
        assert_eq!(class("/v1/embeddings"), Class::Data);
        assert_eq!(class("/v2/models/x/infer"), Class::Data);
    }
}
