//! Dataplane tokens over REST: issue (`POST /tokens/dataplane`, answers `{token, id, mesh, expiresAt}`), rotate the signing key
//! (`POST /meshes/{mesh}/signing-keys`), list key ids, revoke (`POST /tokens/dataplane/revocations`).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;

use super::{ApiError, ApiState, blocking};
use crate::keys;
use crate::model::{FieldError, parse_duration};
use crate::store::{self, ResourceKey};
use crate::tokens::{self, DEFAULT_VALIDITY, SERVICE_TAGS};

/// `POST /tokens/dataplane` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct TokenRequest {
    #[serde(default = "default_mesh")]
    mesh: String,
    name: Option<String>,
    #[serde(default)]
    tags: BTreeMap<String, Vec<String>>,
    valid_for: Option<String>,
}

fn default_mesh() -> String {
    "default".to_owned()
}

fn field(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        details: "invalid token request".into(),
        causes: vec![FieldError {
            field: field.into(),
            message: message.into(),
        }],
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest {
        details: format!("invalid request body: {e}"),
        causes: vec![],
    })
}

fn mesh_must_exist(s: &dyn store::Store, mesh: &str) -> store::Result<()> {
    match s.get(&ResourceKey::mesh(mesh))? {
        Some(_) => Ok(()),
        None => Err(store::Error::MeshNotFound {
            mesh: mesh.to_owned(),
        }),
    }
}

fn keys_error(e: keys::Error) -> ApiError {
    match e {
        keys::Error::Store(s) => ApiError::Store(s),
        keys::Error::Token(t @ tokens::Error::Validity { .. }) => field("validFor", t.to_string()),
        other => ApiError::Internal(other.to_string()),
    }
}

pub(super) async fn issue(
    State(st): State<ApiState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: TokenRequest = parse_json(&body)?;
    let valid_for = match &req.valid_for {
        None => DEFAULT_VALIDITY,
        Some(s) => parse_duration(s).map_err(|m| field("validFor", m))?,
    };
    if !SERVICE_TAGS
        .iter()
        .any(|t| req.tags.get(*t).is_some_and(|v| !v.is_empty()))
    {
        return Err(field(
            "tags",
            "must name at least one service (kuma.io/service): a token allows only the services it names",
        ));
    }
    let (token, claims) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let store = st.store.as_ref();
        mesh_must_exist(store, &req.mesh)?;
        let key = keys::current(store, &req.mesh).map_err(keys_error)?;
        let (token, claims) = tokens::issue(
            &key,
            &req.mesh,
            req.name.as_deref(),
            req.tags,
            valid_for,
            OffsetDateTime::now_utc(),
        )
        .map_err(|e| keys_error(e.into()))?;
        tracing::info!(mesh = %claims.mesh, jti = %claims.jti, exp = claims.exp, "issued a dataplane token");
        Ok((token, claims))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("token task failed: {e}")))??;
    Ok(Json(json!({
        "token": token,
        "id": claims.jti,
        "mesh": claims.mesh,
        "expiresAt": claims.exp,
    }))
    .into_response())
}

pub(super) async fn rotate_signing_key(
    State(st): State<ApiState>,
    Path(mesh): Path<String>,
) -> Result<Response, ApiError> {
    let key = blocking(&st, move |s| {
        mesh_must_exist(s, &mesh)?;
        keys::rotate(s, &mesh).map_err(|e| match e {
            keys::Error::Store(s) => s,
            other => store::Error::Backend(other.to_string()),
        })
    })
    .await?;
    Ok(Json(json!({ "kid": key.kid, "created": key.created.unix_timestamp() })).into_response())
}

pub(super) async fn list_signing_keys(
    State(st): State<ApiState>,
    Path(mesh): Path<String>,
) -> Result<Response, ApiError> {
    let keys = blocking(&st, move |s| {
        mesh_must_exist(s, &mesh)?;
        keys::signing_keys(s, &mesh).map_err(|e| store::Error::Backend(e.to_string()))
    })
    .await?;
    let items: Vec<_> = keys
        .iter()
        .map(|k| json!({ "kid": k.kid, "created": k.created.unix_timestamp() }))
        .collect();
    Ok(Json(json!({ "total": items.len(), "items": items })).into_response())
}

/// `POST /tokens/dataplane/revocations` body: the token itself, or its id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeRequest {
    #[serde(default = "default_mesh")]
    mesh: String,
    token: Option<String>,
    id: Option<String>,
}

pub(super) async fn revoke(
    State(st): State<ApiState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: RevokeRequest = parse_json(&body)?;
    let jti = tokio::task::spawn_blocking(move || -> Result<String, ApiError> {
        let store = st.store.as_ref();
        mesh_must_exist(store, &req.mesh)?;
        let (jti, exp) = match (req.token, req.id) {
            (Some(token), None) => {
                let keys = keys::signing_keys(store, &req.mesh).map_err(keys_error)?;
                // Revoking checks the signature but not expiry or revocation: an operator may
                // revoke a token that is already revoked or about to expire.
                let far_past = OffsetDateTime::UNIX_EPOCH;
                let claims = tokens::verify(&token, &req.mesh, &keys, &|_| false, far_past)
                    .map_err(|e| field("token", e.to_string()))?;
                (claims.jti, Some(claims.exp))
            }
            (None, Some(id)) if !id.is_empty() && !id.contains('\0') => (id, None),
            (None, Some(_)) => return Err(field("id", "must be a token id")),
            _ => return Err(field("token", "give exactly one of token and id")),
        };
        keys::revoke(store, &req.mesh, &jti, exp).map_err(keys_error)?;
        tracing::info!(mesh = %req.mesh, jti = %jti, "revoked a dataplane token");
        Ok(jti)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("revoke task failed: {e}")))??;
    Ok(Json(json!({ "revoked": jti })).into_response())
}
