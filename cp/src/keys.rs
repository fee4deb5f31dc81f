//! The store-backed side of dataplane tokens: each mesh's signing keys and revoked token ids,
//! kept as internal resources (deleted with their mesh, never served by the resource API).
//!
//! The token format and its checks are `crate::tokens`; this module only keeps their state.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::store::{self, Precondition, ResourceKey, Store};
use crate::tokens::{self, Claims, SigningKey};

/// Internal kind of a mesh's token signing keys (name = kid).
pub const SIGNING_KEY_KIND: &str = "_signing-key";
/// Internal kind of revoked token ids (name = jti).
pub const REVOKED_TOKEN_KIND: &str = "_revoked-token";

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed or refused (e.g. the mesh does not exist).
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Creating or using a key, or checking a token, failed.
    #[error(transparent)]
    Token(#[from] tokens::Error),
    /// A stored record does not decode.
    #[error("stored {key} is corrupt: {reason}")]
    Corrupt {
        /// Which record.
        key: ResourceKey,
        /// Why.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A revocation record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Revocation {
    /// Expiry of the revoked token (unix seconds), when known: after it, the record is moot.
    pub exp: Option<i64>,
    /// When it was revoked.
    #[serde(with = "time::serde::rfc3339")]
    pub revoked_at: OffsetDateTime,
}

/// All signing keys of `mesh`, oldest first.
pub fn signing_keys(store: &dyn Store, mesh: &str) -> Result<Vec<SigningKey>> {
    let mut keys = Vec::new();
    for r in store.list(SIGNING_KEY_KIND, Some(mesh))? {
        let k: SigningKey = serde_json::from_slice(&r.body).map_err(|e| Error::Corrupt {
            key: r.key.clone(),
            reason: e.to_string(),
        })?;
        keys.push(k);
    }
    keys.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.kid.cmp(&b.kid)));
    Ok(keys)
}

/// Generates and stores a new signing key for `mesh`; new tokens are signed with it, tokens
/// signed by older keys stay valid until they expire (or the old key is deleted).
pub fn rotate(store: &dyn Store, mesh: &str) -> Result<SigningKey> {
    let key = SigningKey::generate()?;
    let body = serde_json::to_vec(&key).map_err(|e| Error::Corrupt {
        key: ResourceKey::new(SIGNING_KEY_KIND, mesh, &key.kid),
        reason: e.to_string(),
    })?;
    store.put(
        &ResourceKey::new(SIGNING_KEY_KIND, mesh, &key.kid),
        body,
        Precondition::Absent,
    )?;
    Ok(key)
}

/// The newest signing key of `mesh`, created on first use.
pub fn current(store: &dyn Store, mesh: &str) -> Result<SigningKey> {
    match signing_keys(store, mesh)?.pop() {
        Some(k) => Ok(k),
        None => rotate(store, mesh),
    }
}

/// Whether the token id `jti` of `mesh` was revoked.
pub fn is_revoked(store: &dyn Store, mesh: &str, jti: &str) -> Result<bool> {
    Ok(store
        .get(&ResourceKey::new(REVOKED_TOKEN_KIND, mesh, jti))?
        .is_some())
}

/// Records the revocation of token id `jti` (idempotent).
pub fn revoke(store: &dyn Store, mesh: &str, jti: &str, exp: Option<i64>) -> Result<()> {
    let rec = Revocation {
        exp,
        revoked_at: OffsetDateTime::now_utc(),
    };
    let key = ResourceKey::new(REVOKED_TOKEN_KIND, mesh, jti);
    let body = serde_json::to_vec(&rec).map_err(|e| Error::Corrupt {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    store.put(&key, body, Precondition::None)?;
    Ok(())
}

/// Verifies a dataplane token of `mesh` against the mesh's keys and revocations, now.
pub fn verify(store: &dyn Store, mesh: &str, token: &str) -> Result<Claims> {
    let keys = signing_keys(store, mesh)?;
    let revoked = |jti: &str| is_revoked(store, mesh, jti).unwrap_or(true);
    Ok(tokens::verify(
        token,
        mesh,
        &keys,
        &revoked,
        OffsetDateTime::now_utc(),
    )?)
}
