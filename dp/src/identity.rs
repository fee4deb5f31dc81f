//! The dataplane's identity: its private key and the CSR it sends to the CP.
//!
//! The private key never leaves the VM: it is generated here, kept in the state directory
//! with mode 0600 (written atomically, never readable by others even for an instant), and
//! only a CSR carrying the SPIFFE ids goes to the CP. [`manager`] keeps the certificate the
//! CP signs for it valid.

use std::{
    fs::{self, OpenOptions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

pub mod manager;
#[cfg(test)]
mod tests;

/// File name of the private key in the state directory.
pub const KEY_FILE: &str = "key.pem";
/// File name of the certificate chain in the state directory.
pub const CERT_FILE: &str = "cert.pem";
/// File name of the mesh trust bundle in the state directory.
pub const BUNDLE_FILE: &str = "bundle.pem";

/// A private key, PKCS#8 PEM.
pub type KeyPem = String;

/// Errors of the dataplane identity.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Key generation failed.
    #[error("generating the private key: {0}")]
    Generate(rcgen::Error),
    /// The private key could not be parsed.
    #[error("private key is not a usable PKCS#8 PEM key: {0}")]
    Key(rcgen::Error),
    /// A SPIFFE id cannot be put in a URI SAN.
    #[error("SPIFFE id {id:?} is not a valid URI SAN: {source}")]
    SpiffeId {
        /// The id.
        id: String,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// No SPIFFE id was given.
    #[error("a CSR needs at least one SPIFFE id")]
    NoSpiffeId,
    /// The CSR could not be built.
    #[error("building the CSR: {0}")]
    Csr(rcgen::Error),
    /// File I/O failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file is readable or writable by group or others.
    #[error(
        "key file {path} has mode {mode:04o}; it must not be accessible by group or others \
         (chmod 600 it, or delete it to get a new key)"
    )]
    InsecureKeyFile {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Generates an ECDSA P-256 private key, PKCS#8 PEM.
pub fn generate_key() -> Result<KeyPem> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(Error::Generate)?;
    Ok(key.serialize_pem())
}

/// Builds a CSR, PEM, signed by `key_pem`, asking for `spiffe_ids` as URI SANs.
pub fn csr(key_pem: &str, spiffe_ids: &[String]) -> Result<String> {
    if spiffe_ids.is_empty() {
        return Err(Error::NoSpiffeId);
    }
    let key = KeyPair::from_pem(key_pem).map_err(Error::Key)?;
    let mut params = CertificateParams::default();
    // The CP sets the subject; ours carries nothing.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = spiffe_ids
        .iter()
        .map(|id| {
            id.as_str()
                .try_into()
                .map(SanType::URI)
                .map_err(|source| Error::SpiffeId {
                    id: id.clone(),
                    source,
                })
        })
        .collect::<Result<_>>()?;
    let req = params.serialize_request(&key).map_err(Error::Csr)?;
    req.pem().map_err(Error::Csr)
}

/// Writes `pem` to `path` with mode 0600 from the start, atomically (temp file + rename).
pub fn write_private(path: &Path, pem: &str) -> Result<()> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { what, path, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "key".to_owned());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    // A stale temp file from a crashed run would make create_new fail; it holds nothing we need.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        file.write_all(pem.as_bytes())
            .map_err(io("writing", &tmp))?;
        file.sync_all().map_err(io("syncing", &tmp))?;
        fs::rename(&tmp, path).map_err(io("renaming into", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Loads `key.pem` from `state_dir`, creating it (0600) when absent.
///
/// Refuses a key file accessible by group or others, naming its path and mode.
pub fn load_or_create_key(state_dir: &Path) -> Result<String> {
    let path = state_dir.join(KEY_FILE);
    match fs::metadata(&path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(Error::InsecureKeyFile { path, mode });
            }
            let pem = fs::read_to_string(&path).map_err(|source| Error::Io {
                what: "reading",
                path: path.clone(),
                source,
            })?;
            KeyPair::from_pem(&pem).map_err(Error::Key)?;
            Ok(pem)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(state_dir).map_err(|source| Error::Io {
                what: "creating state directory",
                path: state_dir.to_owned(),
                source,
            })?;
            let pem = generate_key()?;
            write_private(&path, &pem)?;
            Ok(pem)
        }
        Err(source) => Err(Error::Io {
            what: "inspecting",
            path,
            source,
        }),
    }
}
