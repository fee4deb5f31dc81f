//! The CAs of a mesh, as the store keeps them.
//!
//! Every backend listed in a Mesh's `mtls.backends` is loaded: a `builtin` root is generated
//! the first time it is needed and kept (key included) under the internal kind `_ca`, which
//! the REST API never serves and which is deleted with its mesh; a `provided` root is read
//! from the backend's `conf` (file path, inline base64 or inline string) each time. The
//! enabled backend signs new leaves; the trust bundle holds the roots of every listed
//! backend, so that during a CA rotation leaves from both roots are trusted.

use std::sync::Arc;
use std::time::Duration;

use crate::ca::{self, BuiltinOptions, Ca, CaMaterial, Source};
use crate::model::mesh::{BackendType, DataSource, MeshSpec, MtlsBackend, MtlsMode};
use crate::model::parse_duration;
use crate::store::{self, Precondition, ResourceKey, Store};

#[cfg(test)]
mod tests;

/// Internal kind holding a builtin backend's root certificate and key, named after the backend.
pub const CA_KIND: &str = "_ca";

/// Lifetime of a dataplane certificate when `dpCert.rotation.expiration` is absent.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// Why a mesh's CAs could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One backend failed.
    #[error("mesh {mesh}: mTLS backend {backend}: {reason}")]
    Backend {
        /// The mesh.
        mesh: String,
        /// The backend's name.
        backend: String,
        /// What went wrong.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A mesh's loaded CAs.
#[derive(Debug)]
pub struct MeshCas {
    /// The enabled backend's name.
    pub signing_backend: String,
    /// The enabled backend's CA: it signs every new leaf.
    pub signing: Ca,
    /// Roots of every listed backend, enabled first, concatenated PEM.
    pub bundle_pem: String,
    /// STRICT or PERMISSIVE.
    pub mode: MtlsMode,
    /// Lifetime of new leaves (`dpCert.rotation.expiration`, default 24h).
    pub leaf_lifetime: Duration,
}

fn backend_error(mesh: &str, backend: &str, reason: impl ToString) -> Error {
    Error::Backend {
        mesh: mesh.to_owned(),
        backend: backend.to_owned(),
        reason: reason.to_string(),
    }
}

/// Loads (generating builtin roots on first need) the CAs of `mesh`; `None` when mTLS is off.
///
/// Blocking: it may generate keys and touch the store and the file system.
pub fn load(store: &dyn Store, mesh: &str, spec: &MeshSpec) -> Result<Option<Arc<MeshCas>>> {
    let Some(enabled) = spec.enabled_backend() else {
        return Ok(None);
    };
    let signing = Ca::from_material(&material(store, mesh, enabled)?)
        .map_err(|e| backend_error(mesh, &enabled.name, e))?;
    let mut roots = vec![signing.cert_pem().to_owned()];
    let backends = spec
        .mtls
        .as_ref()
        .and_then(|m| m.backends.as_deref())
        .unwrap_or_default();
    for b in backends.iter().filter(|b| b.name != enabled.name) {
        // A backend kept for rotation must load too: leaves it signed are still in use.
        let m = material(store, mesh, b)?;
        Ca::from_material(&m).map_err(|e| backend_error(mesh, &b.name, e))?;
        roots.push(m.cert_pem);
    }
    let leaf_lifetime = match enabled
        .dp_cert
        .as_ref()
        .and_then(|c| c.rotation.as_ref())
        .and_then(|r| r.expiration.as_deref())
    {
        Some(s) => parse_duration(s).map_err(|e| {
            backend_error(
                mesh,
                &enabled.name,
                format!("dpCert.rotation.expiration: {e}"),
            )
        })?,
        None => DEFAULT_LEAF_LIFETIME,
    };
    let signing_ref = [&signing];
    let mut bundle_pem = ca::trust_bundle(&signing_ref);
    for r in &roots[1..] {
        bundle_pem.push_str(r.trim_end());
        bundle_pem.push('\n');
    }
    Ok(Some(Arc::new(MeshCas {
        signing_backend: enabled.name.clone(),
        signing,
        bundle_pem,
        mode: enabled.effective_mode(),
        leaf_lifetime,
    })))
}

/// One backend's root: stored (builtin, generated on first need) or read from `conf`.
fn material(store: &dyn Store, mesh: &str, backend: &MtlsBackend) -> Result<CaMaterial> {
    match backend.backend_type {
        BackendType::Builtin => builtin(store, mesh, backend),
        BackendType::Provided => {
            let conf = backend.provided_conf().ok_or_else(|| {
                backend_error(mesh, &backend.name, "conf: cert and key are required")
            })?;
            let cert = source(&conf.cert)
                .map_err(|e| backend_error(mesh, &backend.name, format!("conf.cert: {e}")))?;
            let key = source(&conf.key)
                .map_err(|e| backend_error(mesh, &backend.name, format!("conf.key: {e}")))?;
            ca::load_provided(cert, key).map_err(|e| backend_error(mesh, &backend.name, e))
        }
    }
}

fn source(ds: &DataSource) -> Result<Source, String> {
    match ds {
        DataSource { file: Some(f), .. } => Ok(Source::File(f.into())),
        DataSource {
            inline_string: Some(s),
            ..
        } => Ok(Source::Inline(s.clone())),
        DataSource {
            inline: Some(b), ..
        } => Ok(Source::InlineBase64(b.clone())),
        DataSource {
            secret: Some(s), ..
        } => Err(format!(
            "secret {s:?}: Secret resources are not supported yet; give a file or inlineString"
        )),
        _ => Err("one of file, inline or inlineString is required".to_owned()),
    }
}

fn builtin(store: &dyn Store, mesh: &str, backend: &MtlsBackend) -> Result<CaMaterial> {
    let key = ResourceKey::new(CA_KIND, mesh, &backend.name);
    let corrupt = |e: serde_json::Error| {
        backend_error(mesh, &backend.name, format!("stored CA is unreadable: {e}"))
    };
    if let Some(r) = store.get(&key)? {
        return serde_json::from_slice(&r.body).map_err(corrupt);
    }
    let conf = backend.builtin_conf().unwrap_or_default();
    let ca_cert = conf.ca_cert.unwrap_or_default();
    let opts = BuiltinOptions {
        rsa_bits: ca_cert
            .rsa_bits
            .map(|b| u32::try_from(b).unwrap_or(u32::MAX)),
        expiration: match ca_cert.expiration.as_deref() {
            Some(s) => Some(parse_duration(s).map_err(|e| {
                backend_error(mesh, &backend.name, format!("conf.caCert.expiration: {e}"))
            })?),
            None => None,
        },
    };
    let generated = ca::generate_builtin_root(mesh, &backend.name, &opts)
        .map_err(|e| backend_error(mesh, &backend.name, e))?;
    let body = serde_json::to_vec(&generated).map_err(corrupt)?;
    match store.put(&key, body, Precondition::Absent) {
        Ok(_) => {
            tracing::info!(mesh, backend = %backend.name, "generated a builtin CA root");
            Ok(generated)
        }
        // Another task generated it first: use theirs, so there is only ever one root.
        Err(store::Error::Conflict { .. }) => match store.get(&key)? {
            Some(r) => serde_json::from_slice(&r.body).map_err(corrupt),
            None => Err(backend_error(
                mesh,
                &backend.name,
                "root vanished while being created",
            )),
        },
        Err(e) => Err(e.into()),
    }
}
