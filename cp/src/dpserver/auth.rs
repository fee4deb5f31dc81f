//! Who is calling: a dataplane token (first join), or the certificate an earlier `Certify`
//! issued (renewals, restarts, streams). Also parses and checks the Dataplane a caller
//! registers against what its credentials allow.

use std::collections::BTreeSet;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use tonic::Status;

use crate::ca::{self, LeafInfo};
use crate::index::MeshView;
use crate::insight;
use crate::keys;
use crate::model::{Kind, Resource};
use crate::tokens::{Claims, SERVICE_TAGS};

use super::DpServer;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Presented a valid dataplane token.
    Token(Claims),
    /// Presented a client certificate that chains to the mesh's trust bundle and was issued
    /// to this dataplane, whose join token is not revoked.
    Cert {
        /// What the certificate says.
        leaf: LeafInfo,
        /// The id of the token the dataplane originally joined with.
        token_id: Option<String>,
    },
}

impl Caller {
    /// The services the caller may hold identities for.
    pub fn allowed_services(&self, mesh: &str) -> BTreeSet<String> {
        match self {
            Caller::Token(c) => c.allowed_services(),
            Caller::Cert { leaf, .. } => {
                let prefix = format!("spiffe://{mesh}/");
                leaf.spiffe_ids
                    .iter()
                    .filter_map(|id| id.strip_prefix(&prefix).map(str::to_owned))
                    .collect()
            }
        }
    }

    /// The token id to watch for revocation.
    pub fn token_id(&self) -> Option<&str> {
        match self {
            Caller::Token(c) => Some(&c.jti),
            Caller::Cert { token_id, .. } => token_id.as_deref(),
        }
    }

    /// What to record when this caller joins: the token's id and expiry (a certificate
    /// caller joined earlier).
    pub fn join_record(&self) -> Option<insight::JoinRecord> {
        match self {
            Caller::Token(c) => Some(insight::JoinRecord {
                token_id: c.jti.clone(),
                token_expiry: c.exp,
                joined_at: time::OffsetDateTime::now_utc(),
            }),
            Caller::Cert { .. } => None,
        }
    }

    /// `token` or `certificate`, for logs and metrics.
    pub fn method(&self) -> &'static str {
        match self {
            Caller::Token(_) => "token",
            Caller::Cert { .. } => "certificate",
        }
    }
}

/// The mesh's current view, or `NotFound`.
pub fn view(server: &DpServer, mesh: &str) -> Result<Arc<MeshView>, Status> {
    server
        .index
        .view(mesh)
        .ok_or_else(|| Status::not_found(format!("mesh {mesh:?} does not exist")))
}

/// Authenticates the caller of `mesh`/`name` by `token` (when non-empty) or else by its
/// client certificate.
pub async fn authenticate(
    server: &DpServer,
    view: &MeshView,
    mesh: &str,
    name: &str,
    token: &str,
    peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
) -> Result<Caller, Status> {
    let token = token.trim();
    if !token.is_empty() {
        let (m, t) = (mesh.to_owned(), token.to_owned());
        let claims = server
            .blocking(move |s| keys::verify(s, &m, &t))
            .await?
            .map_err(|e| Status::unauthenticated(format!("dataplane token: {e}")))?;
        if let Some(bound) = &claims.name
            && bound != name
        {
            return Err(Status::permission_denied(format!(
                "dataplane token is bound to dataplane {bound:?}, not {name:?}"
            )));
        }
        return Ok(Caller::Token(claims));
    }
    let Some(der) = peer_certs.as_ref().and_then(|c| c.first()) else {
        return Err(Status::unauthenticated(
            "no dataplane token and no client certificate: join with --dataplane-token-file",
        ));
    };
    let Some(cas) = &view.cas else {
        return Err(Status::unauthenticated(format!(
            "mesh {mesh:?} has mTLS disabled, so certificates do not authenticate: use a token"
        )));
    };
    let leaf = ca::verify_chain_der(der, &cas.bundle_pem)
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    if leaf.organization.as_deref() != Some(mesh) || leaf.common_name.as_deref() != Some(name) {
        return Err(Status::permission_denied(format!(
            "client certificate was issued to dataplane {:?} of mesh {:?}, not {name:?} of {mesh:?}",
            leaf.common_name.as_deref().unwrap_or(""),
            leaf.organization.as_deref().unwrap_or("")
        )));
    }
    // The join record is written when a token buys the first certificate and removed with
    // the Dataplane: without it the certificate no longer speaks for a member of the mesh.
    let (m, n) = (mesh.to_owned(), name.to_owned());
    let (join, revoked) = server
        .blocking(move |s| {
            let join = insight::join_record(s, &m, &n);
            let revoked = match &join {
                Ok(Some(j)) => keys::is_revoked(s, &m, &j.token_id).unwrap_or(true),
                _ => false,
            };
            (join, revoked)
        })
        .await?;
    let Some(join) = join.map_err(|e| Status::unavailable(e.to_string()))? else {
        return Err(Status::permission_denied(format!(
            "dataplane {name:?} of mesh {mesh:?} was deleted: join again with a new token"
        )));
    };
    if revoked {
        return Err(Status::permission_denied(format!(
            "the token dataplane {name:?} joined with was revoked: join again with a new token"
        )));
    }
    Ok(Caller::Cert {
        leaf,
        token_id: Some(join.token_id),
    })
}

/// Parses the Dataplane a caller sent (YAML or JSON) and checks it names `mesh`/`name`.
pub fn parse_dataplane(yaml: &str, mesh: &str, name: &str) -> Result<Resource, Status> {
    let value: serde_json::Value = serde_yaml_ng::from_str(yaml)
        .map_err(|e| Status::invalid_argument(format!("dataplane: not valid YAML: {e}")))?;
    let r = Resource::from_json(&value)
        .map_err(|e| Status::invalid_argument(format!("dataplane: {e}")))?;
    if r.kind != Kind::Dataplane {
        return Err(Status::invalid_argument(format!(
            "dataplane: type is {}, expected Dataplane",
            r.kind.type_name()
        )));
    }
    if r.name != name || r.mesh.as_deref() != Some(mesh) {
        return Err(Status::invalid_argument(format!(
            "dataplane: the resource is {}/{}, but the request is for {mesh}/{name}",
            r.mesh.as_deref().unwrap_or(""),
            r.name
        )));
    }
    Ok(r)
}

/// Checks that every inbound service (and every other tag the token restricts) of `dp` is
/// allowed to `caller`.
pub fn check_dataplane_allowed(caller: &Caller, dp: &Resource, mesh: &str) -> Result<(), Status> {
    let allowed = caller.allowed_services(mesh);
    let Some(spec) = dp.dataplane() else {
        return Ok(());
    };
    for (i, ib) in spec.inbounds().iter().enumerate() {
        let svc = ib.service().unwrap_or("");
        if !allowed.contains(svc) {
            return Err(Status::permission_denied(format!(
                "networking.inbound[{i}]: service {svc:?} is not allowed by the dataplane's {} (allowed: {})",
                caller.method(),
                allowed.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        if let Caller::Token(claims) = caller {
            for (key, values) in &claims.tags {
                if SERVICE_TAGS.contains(&key.as_str()) {
                    continue;
                }
                let have = ib.tags().get(key);
                if !have.is_some_and(|v| values.contains(v)) {
                    return Err(Status::permission_denied(format!(
                        "networking.inbound[{i}]: tag {key}={} is not allowed by the token (allowed: {})",
                        have.map_or("<absent>", String::as_str),
                        values.join(", ")
                    )));
                }
            }
        }
    }
    Ok(())
}
