//! Dataplane tokens: JWTs (ES256) binding a dataplane to a mesh and its service tags.
//!
//! A token is presented once, when a dataplane joins; the CP then signs only the SPIFFE ids
//! its `kuma.io/service` tags allow. Each mesh has its own signing keys; the header's `kid`
//! names the key, so keys can be rotated while tokens signed by the old one stay valid as
//! long as the old key is kept. Time comes in as an argument so checks are deterministic.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::Duration,
};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[cfg(test)]
mod tests;

/// Default validity of a token: 1 hour. A token is only needed to join, so it is short.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(60 * 60);

/// Longest validity [`issue`] accepts: 1 year. Longer tokens are refused, not clamped.
pub const MAX_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The tag keys whose values are the services a token allows.
pub const SERVICE_TAGS: [&str; 2] = ["kuma.io/service", "weft.io/service"];

/// Errors of token issuance and verification.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The token is not a well-formed ES256 JWT with a `kid` and our claims.
    #[error("token is malformed: {0}")]
    Malformed(String),
    /// The token names a key the mesh does not have (any more).
    #[error("token is signed by unknown key {kid}")]
    UnknownKid {
        /// The header's key id.
        kid: String,
    },
    /// The signature does not verify with the key the token names.
    #[error("token signature does not verify")]
    BadSignature,
    /// The token has expired.
    #[error("token expired at {exp} (unix time)")]
    Expired {
        /// Its expiry, unix seconds.
        exp: i64,
    },
    /// The token is for another mesh.
    #[error("token is for mesh {token_mesh}, not {expected}")]
    WrongMesh {
        /// The token's mesh.
        token_mesh: String,
        /// The mesh it was presented to.
        expected: String,
    },
    /// The token has been revoked.
    #[error("token {jti} is revoked")]
    Revoked {
        /// Its id.
        jti: String,
    },
    /// The asked validity is zero or longer than [`MAX_VALIDITY`].
    #[error("token validity {asked:?} must be more than zero and at most {max:?}")]
    Validity {
        /// What was asked.
        asked: Duration,
        /// The maximum.
        max: Duration,
    },
    /// A signing key could not be generated or used.
    #[error("signing key {kid}: {reason}")]
    Key {
        /// The key id (empty while generating).
        kid: String,
        /// Why.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A mesh's token signing key (ECDSA P-256), stored by the caller as JSON.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKey {
    /// Key id, carried in tokens' `kid` header.
    pub kid: String,
    /// The private key, PKCS#8 PEM.
    pub private_pem: String,
    /// When it was generated.
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("private_pem", &"<redacted>")
            .field("created", &self.created)
            .finish()
    }
}

fn random_hex(len_bytes: usize) -> Result<String> {
    let mut bytes = vec![0u8; len_bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Key {
            kid: String::new(),
            reason: "the system random generator failed".to_owned(),
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl SigningKey {
    /// Generates a P-256 key with a random 16-hex-character `kid`.
    pub fn generate() -> Result<SigningKey> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| {
            Error::Key {
                kid: String::new(),
                reason: e.to_string(),
            }
        })?;
        Ok(SigningKey {
            kid: random_hex(8)?,
            private_pem: key.serialize_pem(),
            created: OffsetDateTime::now_utc(),
        })
    }

    fn key_error(&self, e: impl fmt::Display) -> Error {
        Error::Key {
            kid: self.kid.clone(),
            reason: e.to_string(),
        }
    }

    fn encoding_key(&self) -> Result<EncodingKey> {
        EncodingKey::from_ec_pem(self.private_pem.as_bytes()).map_err(|e| self.key_error(e))
    }

    fn decoding_key(&self) -> Result<DecodingKey> {
        let pair = rcgen::KeyPair::from_pem(&self.private_pem).map_err(|e| self.key_error(e))?;
        DecodingKey::from_ec_pem(pair.public_key_pem().as_bytes()).map_err(|e| self.key_error(e))
    }
}

/// What a token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Unique id, for revocation.
    pub jti: String,
    /// The mesh the dataplane may join.
    pub mesh: String,
    /// The dataplane's name, when bound to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tags, e.g. `kuma.io/service` → `[web]`.
    #[serde(default)]
    pub tags: BTreeMap<String, Vec<String>>,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Expires at, unix seconds.
    pub exp: i64,
}

impl Claims {
    /// The services this token allows (values of `kuma.io/service` and `weft.io/service`);
    /// empty means none.
    pub fn allowed_services(&self) -> BTreeSet<String> {
        SERVICE_TAGS
            .iter()
            .filter_map(|k| self.tags.get(*k))
            .flatten()
            .cloned()
            .collect()
    }
}

/// Issues a token for `mesh`, valid from `now` for `valid_for`, signed by `key`.
pub fn issue(
    key: &SigningKey,
    mesh: &str,
    name: Option<&str>,
    tags: BTreeMap<String, Vec<String>>,
    valid_for: Duration,
    now: OffsetDateTime,
) -> Result<(String, Claims)> {
    if valid_for.is_zero() || valid_for > MAX_VALIDITY {
        return Err(Error::Validity {
            asked: valid_for,
            max: MAX_VALIDITY,
        });
    }
    let iat = now.unix_timestamp();
    // valid_for <= MAX_VALIDITY (checked above), so it fits an i64 of seconds; round up.
    let secs = i64::try_from(valid_for.as_secs()).unwrap_or(i64::MAX)
        + i64::from(valid_for.subsec_nanos() > 0);
    let claims = Claims {
        jti: random_hex(16)?,
        mesh: mesh.to_owned(),
        name: name.map(str::to_owned),
        tags,
        iat,
        exp: iat.saturating_add(secs),
    };
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    let token = jsonwebtoken::encode(&header, &claims, &key.encoding_key()?)
        .map_err(|e| key.key_error(e))?;
    Ok((token, claims))
}

/// Verifies `token` for `mesh` against the mesh's current `keys`, at `now` (no leeway).
pub fn verify(
    token: &str,
    mesh: &str,
    keys: &[SigningKey],
    revoked: &dyn Fn(&str) -> bool,
    now: OffsetDateTime,
) -> Result<Claims> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| Error::Malformed(e.to_string()))?;
    if header.alg != Algorithm::ES256 {
        return Err(Error::Malformed(format!(
            "algorithm {:?}, expected ES256",
            header.alg
        )));
    }
    let kid = header
        .kid
        .ok_or_else(|| Error::Malformed("no kid in header".to_owned()))?;
    let key = keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| Error::UnknownKid { kid: kid.clone() })?;

    let mut validation = Validation::new(Algorithm::ES256);
    // Time and mesh are checked below against `now`, with distinct errors.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    validation.required_spec_claims.clear();
    let data =
        jsonwebtoken::decode::<Claims>(token, &key.decoding_key()?, &validation).map_err(|e| {
            match e.kind() {
                ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey => Error::BadSignature,
                _ => Error::Malformed(e.to_string()),
            }
        })?;
    let claims = data.claims;
    if claims.mesh != mesh {
        return Err(Error::WrongMesh {
            token_mesh: claims.mesh,
            expected: mesh.to_owned(),
        });
    }
    if now.unix_timestamp() >= claims.exp {
        return Err(Error::Expired { exp: claims.exp });
    }
    if revoked(&claims.jti) {
        return Err(Error::Revoked { jti: claims.jti });
    }
    Ok(claims)
}
