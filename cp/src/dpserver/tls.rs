//! The dataplane server's TLS: its serving certificate and how client certificates are taken.
//!
//! The serving certificate comes from files named in the config, or from a small CA of the
//! CP's own that is generated once into `dp_server.tls_dir` (`ca.pem` is what dataplanes pin
//! with `--ca-cert-file`; the keys are 0600). Its SANs are `localhost`, the loopback
//! addresses, the host name, the bind address when it is specific, and `dp_server.tls_sans`;
//! it is re-issued from the same CA when they change or it nears expiry.
//!
//! Client certificates are optional at the TLS layer (a first join has only a token) and
//! their chain is checked per request against the trust bundle of the mesh the request
//! names — roots differ per mesh and change during CA rotation, which a static rustls root
//! store cannot express. The handshake still proves the client holds the certificate's key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::DistinguishedName as RootHint;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject as _};
use x509_parser::prelude::FromDer as _;

/// Errors setting up the server's TLS.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
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
    /// A certificate or key is unusable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Generating the CA or the serving certificate failed.
    #[error("generating the dataplane server's certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("dataplane server TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum CertSource {
    /// Operator files: certificate chain and key, PEM.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// Generated into (and reused from) a directory, with these extra SANs.
    Generated {
        /// The directory.
        dir: PathBuf,
        /// Extra DNS names or IP addresses.
        sans: Vec<String>,
    },
}

/// Files in a generated TLS directory.
pub const CA_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
const CERT_FILE: &str = "server.pem";
const KEY_FILE: &str = "server-key.pem";
/// Re-issue a generated serving certificate this long before it expires.
const RENEW_BEFORE: time::Duration = time::Duration::days(30);

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        what: "reading",
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, text: &str, private: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let io = |what, source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(|e| io("creating", e))?;
    f.write_all(text.as_bytes()).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming into", e))
}

/// The host's name, for the serving certificate's SANs.
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn san(s: &str) -> Result<SanType> {
    Ok(match s.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(s.try_into()?),
    })
}

/// The SANs a generated serving certificate carries.
pub fn default_sans(bind: IpAddr, extra: &[String]) -> Vec<String> {
    let mut out: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    out.extend(host_name());
    if !bind.is_unspecified() {
        out.push(bind.to_string());
    }
    out.extend(extra.iter().cloned());
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|s| seen.insert(s.clone()));
    out
}

/// Loads or generates the serving certificate; returns the chain and key PEM.
pub fn serving_material(source: &CertSource) -> Result<(String, String)> {
    match source {
        CertSource::Files { cert, key } => Ok((read(cert)?, read(key)?)),
        CertSource::Generated { dir, sans } => generated(dir, sans),
    }
}

fn generated(dir: &Path, sans: &[String]) -> Result<(String, String)> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        what: "creating",
        path: dir.to_owned(),
        source,
    })?;
    let ca_path = dir.join(CA_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let (ca_pem, ca_key) = if ca_path.exists() && ca_key_path.exists() {
        (read(&ca_path)?, read(&ca_key_path)?)
    } else {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "weft control plane CA");
        dn.push(DnType::OrganizationName, "weft");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::days(3650);
        let cert = p.self_signed(&key)?;
        write(&ca_key_path, &key.serialize_pem(), true)?;
        write(&ca_path, &cert.pem(), false)?;
        tracing::info!(ca = %ca_path.display(), "generated the dataplane server's CA; dataplanes pin it with --ca-cert-file");
        (cert.pem(), key.serialize_pem())
    };
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if let (Ok(cert), Ok(key)) = (read(&cert_path), read(&key_path))
        && serving_cert_is_current(&cert, &ca_pem, sans)
    {
        return Ok((cert, key));
    }
    let ca_key_pair = KeyPair::from_pem(&ca_key).map_err(|e| Error::Pem {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| Error::Pem {
        path: ca_path.clone(),
        reason: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key_pair)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "weft control plane");
    p.distinguished_name = dn;
    p.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_>>()?;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(1);
    p.not_after = now + time::Duration::days(365);
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, &issuer)?;
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    tracing::info!(cert = %cert_path.display(), ?sans, "issued the dataplane server's certificate");
    Ok((cert.pem(), key.serialize_pem()))
}

/// Whether a generated serving certificate has exactly `sans`, is signed by `ca_pem` and is
/// not about to expire.
fn serving_cert_is_current(cert_pem: &str, ca_pem: &str, sans: &[String]) -> bool {
    let (Ok(cert_der), Ok(ca_der)) = (
        CertificateDer::from_pem_slice(cert_pem.as_bytes()),
        CertificateDer::from_pem_slice(ca_pem.as_bytes()),
    ) else {
        return false;
    };
    let (Ok((_, cert)), Ok((_, ca))) = (
        x509_parser::certificate::X509Certificate::from_der(&cert_der),
        x509_parser::certificate::X509Certificate::from_der(&ca_der),
    ) else {
        return false;
    };
    if cert.verify_signature(Some(ca.public_key())).is_err() {
        return false;
    }
    if cert.validity().not_after.to_datetime() - time::OffsetDateTime::now_utc() < RENEW_BEFORE {
        return false;
    }
    let have: std::collections::BTreeSet<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => (*d).to_owned(),
                    x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()).to_string(),
                        16 => {
                            IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()).to_string()
                        }
                        _ => String::new(),
                    },
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    have == sans.iter().cloned().collect()
}

/// The rustls server config: the serving certificate, client certificates optional and
/// their chains left to the request handlers (see the module docs), HTTP/2 only.
pub fn server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            path: "serving certificate".into(),
            reason: e.to_string(),
        })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| Error::Pem {
        path: "serving key".into(),
        reason: e.to_string(),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(PerMeshClientCerts { provider }))
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any client certificate whose holder proves possession of its key; the chain is
/// verified against the requested mesh's trust bundle by every handler that relies on it
/// (`dpserver::auth`). Not offering a certificate is allowed: tokens authenticate joins.
#[derive(Debug)]
struct PerMeshClientCerts {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for PerMeshClientCerts {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[RootHint] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Must at least be a certificate; the chain is checked per mesh by the handler.
        x509_parser::certificate::X509Certificate::from_der(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
