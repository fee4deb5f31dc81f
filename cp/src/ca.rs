//! A certificate authority per mesh.
//!
//! Each mesh with mTLS has a root: `builtin` (generated here, key kept in the store by the
//! caller as [`CaMaterial`] JSON) or `provided` (the operator's cert and key). The CA signs
//! the dataplanes' CSRs — the dataplane's private key never leaves its VM — after checking
//! that every SAN asked for is a `spiffe://<mesh>/<service>` the dataplane's token allows.
//! Pure code: no I/O besides reading the files an operator points at.

use std::{collections::BTreeSet, fmt, path::PathBuf, time::Duration};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::{
    certificate::X509Certificate,
    certification_request::X509CertificationRequest,
    extensions::{GeneralName, ParsedExtension},
    pem::Pem,
    prelude::FromDer as _,
};

#[cfg(test)]
mod tests;

/// Default validity of a builtin root: 10 years.
pub const DEFAULT_ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// How far back a leaf's `notBefore` is set, to tolerate clock skew between CP and dataplanes.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Errors of the CA.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration asks for something this build cannot do.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A duration does not fit the certificate's time range.
    #[error("duration {0:?} is out of range")]
    Duration(Duration),
    /// Key generation or certificate signing failed in the crypto library.
    #[error("{what}: {source}")]
    Crypto {
        /// What was being done.
        what: &'static str,
        /// The library's error.
        #[source]
        source: rcgen::Error,
    },
    /// A provided file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Inline base64 did not decode to UTF-8 PEM.
    #[error("{what}: inline base64 is invalid: {reason}")]
    Base64 {
        /// Which input (`cert` or `key`).
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A certificate could not be parsed.
    #[error("{what}: not a valid PEM X.509 certificate: {reason}")]
    Cert {
        /// Which certificate.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A private key could not be parsed (PKCS#8 PEM is expected).
    #[error("key: not a usable PKCS#8 PEM private key: {0}")]
    Key(String),
    /// The CA certificate is not a CA.
    #[error("cert: the certificate is not a CA (basicConstraints CA:true is required)")]
    NotCa,
    /// The key does not belong to the CA certificate.
    #[error("key: the private key does not match the certificate's public key")]
    KeyMismatch,
    /// The CSR could not be parsed.
    #[error("CSR is malformed: {0}")]
    CsrMalformed(String),
    /// The CSR's self-signature does not verify.
    #[error("CSR signature does not verify: {0}")]
    CsrSignature(String),
    /// The CSR asks for no SAN at all.
    #[error("CSR has no subject alternative name; a spiffe://<mesh>/<service> URI is required")]
    NoSan,
    /// The CSR asks for a SPIFFE id in another mesh.
    #[error("CSR SAN {san} is not in mesh {expected}")]
    OtherMesh {
        /// The offending SAN.
        san: String,
        /// The mesh being signed for.
        expected: String,
    },
    /// The CSR asks for a service the dataplane is not allowed.
    #[error("CSR SAN {san}: service {service} is not allowed for this dataplane")]
    UnknownService {
        /// The offending SAN.
        san: String,
        /// Its service.
        service: String,
    },
    /// The CSR asks for a SAN that is not a SPIFFE URI (DNS, IP, e-mail, other URI…).
    #[error("CSR SAN {san} is not allowed: only spiffe://<mesh>/<service> URIs are signed")]
    ExtraSan {
        /// The offending SAN, rendered.
        san: String,
    },
    /// The CSR's key is of an unsupported type.
    #[error("CSR public key is unsupported: {0}")]
    CsrKey(String),
    /// A bundle held no certificate.
    #[error("trust bundle holds no certificate")]
    EmptyBundle,
    /// The leaf is not signed by any root in the bundle.
    #[error("certificate is not signed by any root of the trust bundle")]
    Untrusted,
    /// The certificate (or the root that signed it) is outside its validity window.
    #[error("{what} is not valid now (valid {not_before} to {not_after})")]
    NotValidNow {
        /// `leaf` or `root`.
        what: &'static str,
        /// Start of validity.
        not_before: OffsetDateTime,
        /// End of validity.
        not_after: OffsetDateTime,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A CA's certificate and private key, PEM, as stored by the caller (as JSON).
///
/// The key is never returned from the API; `Debug` redacts it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaMaterial {
    /// The root certificate, PEM.
    pub cert_pem: String,
    /// The root's private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaMaterial")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Options of a builtin CA (Kuma's `conf.caCert`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuiltinOptions {
    /// RSA key size; `None` means ECDSA P-256.
    pub rsa_bits: Option<u32>,
    /// Root validity; `None` means [`DEFAULT_ROOT_VALIDITY`].
    pub expiration: Option<Duration>,
}

/// Where a provided CA's cert or key comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    /// A PEM file.
    File(PathBuf),
    /// PEM text.
    Inline(String),
    /// Base64 of PEM text.
    InlineBase64(String),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Inline sources may hold a private key: never print them.
        match self {
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
            Self::Inline(_) => f.write_str("Inline(<redacted>)"),
            Self::InlineBase64(_) => f.write_str("InlineBase64(<redacted>)"),
        }
    }
}

impl Source {
    fn read(&self, what: &'static str) -> Result<String> {
        match self {
            Self::File(path) => std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.clone(),
                source,
            }),
            Self::Inline(pem) => Ok(pem.clone()),
            Self::InlineBase64(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| Error::Base64 {
                        what,
                        reason: e.to_string(),
                    })?;
                String::from_utf8(bytes).map_err(|_| Error::Base64 {
                    what,
                    reason: "decoded bytes are not UTF-8 PEM".to_owned(),
                })
            }
        }
    }
}

fn to_time(d: Duration) -> Result<time::Duration> {
    time::Duration::try_from(d).map_err(|_| Error::Duration(d))
}

fn now() -> OffsetDateTime {
    // Certificates carry whole seconds; truncating keeps reported times equal to the cert's.
    let now = OffsetDateTime::now_utc();
    now - time::Duration::nanoseconds(i64::from(now.nanosecond()))
}

fn random_serial() -> Result<(SerialNumber, String)> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Unsupported("the system random generator failed".to_owned()))?;
    // Positive and minimally encoded: top bit clear, next bit set.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok((SerialNumber::from_slice(&bytes), hex))
}

fn uri_san(uri: &str) -> Result<SanType> {
    let ia5 = uri.try_into().map_err(|e| Error::Crypto {
        what: "encoding a URI SAN",
        source: e,
    })?;
    Ok(SanType::URI(ia5))
}

/// RSA key sizes a builtin root may have (Kuma's `conf.caCert.RSAbits`).
pub const RSA_BITS: [u32; 3] = [2048, 3072, 4096];

/// An RSA root key of `bits` (the `rsa` crate generates it, since ring cannot; ring signs).
fn rsa_key(bits: u32) -> Result<KeyPair> {
    use rsa::pkcs8::EncodePrivateKey as _;
    if !RSA_BITS.contains(&bits) {
        return Err(Error::Unsupported(format!(
            "conf.caCert.RSAbits {bits}: use one of 2048, 3072, 4096 (or omit it for ECDSA P-256)"
        )));
    }
    let size = usize::try_from(bits).unwrap_or(2048);
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, size)
        .map_err(|e| Error::Key(format!("generating a {bits}-bit RSA key: {e}")))?;
    let pem = key
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .map_err(|e| Error::Key(format!("encoding the RSA key: {e}")))?;
    KeyPair::from_pkcs8_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).map_err(|source| {
        Error::Crypto {
            what: "loading the RSA root key",
            source,
        }
    })
}

/// Generates a self-signed builtin root for `mesh`'s CA backend `backend`.
///
/// ECDSA P-256 unless `opts.rsa_bits` asks for RSA (2048, 3072 or 4096 bits); valid for
/// `opts.expiration` or 10 years.
pub fn generate_builtin_root(
    mesh: &str,
    backend: &str,
    opts: &BuiltinOptions,
) -> Result<CaMaterial> {
    let validity = to_time(opts.expiration.unwrap_or(DEFAULT_ROOT_VALIDITY))?;
    let key = match opts.rsa_bits {
        None => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            Error::Crypto {
                what: "generating the root key",
                source,
            }
        })?,
        Some(bits) => rsa_key(bits)?,
    };
    let now = now();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("weft {mesh} {backend} root"));
    dn.push(DnType::OrganizationName, "weft");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![uri_san(&format!("spiffe://{mesh}"))?];
    params.not_before = now - to_time(CLOCK_SKEW)?;
    params.not_after = now + validity;
    params.serial_number = Some(random_serial()?.0);
    let cert = params.self_signed(&key).map_err(|source| Error::Crypto {
        what: "self-signing the root",
        source,
    })?;
    Ok(CaMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Loads an operator-provided CA, checking the cert is a CA and the key is its key.
pub fn load_provided(cert: Source, key: Source) -> Result<CaMaterial> {
    let material = CaMaterial {
        cert_pem: cert.read("cert")?,
        key_pem: key.read("key")?,
    };
    Ca::from_material(&material)?;
    Ok(material)
}

fn parse_pem_cert(pem: &str, what: &'static str) -> Result<Pem> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| Error::Cert {
        what,
        reason: e.to_string(),
    })?;
    if pem.label != "CERTIFICATE" {
        return Err(Error::Cert {
            what,
            reason: format!("PEM label is {}, not CERTIFICATE", pem.label),
        });
    }
    Ok(pem)
}

fn parse_x509<'a>(pem: &'a Pem, what: &'static str) -> Result<X509Certificate<'a>> {
    pem.parse_x509().map_err(|e| Error::Cert {
        what,
        reason: e.to_string(),
    })
}

/// A leaf certificate signed by a [`Ca`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedLeaf {
    /// The leaf, PEM.
    pub cert_pem: String,
    /// When it expires.
    pub not_after: OffsetDateTime,
    /// Its serial number, lowercase hex.
    pub serial_hex: String,
}

/// A mesh's CA, ready to sign.
pub struct Ca {
    cert_pem: String,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Builds a CA from stored or provided material, checking it is a CA and the key matches.
    pub fn from_material(material: &CaMaterial) -> Result<Ca> {
        let pem = parse_pem_cert(&material.cert_pem, "cert")?;
        let cert = parse_x509(&pem, "cert")?;
        if !cert.is_ca() {
            return Err(Error::NotCa);
        }
        let key = KeyPair::from_pem(&material.key_pem).map_err(|e| Error::Key(e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::KeyMismatch);
        }
        let not_after = cert.validity().not_after.to_datetime();
        let issuer =
            Issuer::from_ca_cert_der(&pem.contents.clone().into(), key).map_err(|source| {
                Error::Crypto {
                    what: "reading the CA certificate",
                    source,
                }
            })?;
        Ok(Ca {
            cert_pem: material.cert_pem.clone(),
            not_after,
            issuer,
        })
    }

    /// The root certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// When the root expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Signs a dataplane's CSR for `mesh`, for `lifetime`.
    ///
    /// The CSR's SANs must be exactly a non-empty set of `spiffe://<mesh>/<service>` URIs
    /// whose services are all in `allowed_services`; anything else is refused, naming the SAN.
    /// Only the CSR's public key and SANs are used: subject, extensions and usages are set here.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        mesh: &str,
        allowed_services: &BTreeSet<String>,
        lifetime: Duration,
    ) -> Result<SignedLeaf> {
        self.sign_dataplane_csr(csr_pem, mesh, None, allowed_services, lifetime)
    }

    /// Like [`Ca::sign_csr`], and binds the leaf to one Dataplane: its subject's common name is
    /// `dataplane` (the organisation is always the mesh), so a certificate can authenticate only
    /// the dataplane it was issued to.
    pub fn sign_dataplane_csr(
        &self,
        csr_pem: &str,
        mesh: &str,
        dataplane: Option<&str>,
        allowed_services: &BTreeSet<String>,
        lifetime: Duration,
    ) -> Result<SignedLeaf> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
            .map_err(|e| Error::CsrMalformed(e.to_string()))?;
        if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
            return Err(Error::CsrMalformed(format!(
                "PEM label is {}, not CERTIFICATE REQUEST",
                pem.label
            )));
        }
        let (_, csr) = X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| Error::CsrMalformed(e.to_string()))?;
        csr.verify_signature()
            .map_err(|e| Error::CsrSignature(e.to_string()))?;

        let ids = check_sans(&csr, mesh, allowed_services)?;

        let spki = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|e| Error::CsrKey(e.to_string()))?;

        let now = now();
        let (serial, serial_hex) = random_serial()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, mesh);
        if let Some(name) = dataplane {
            dn.push(DnType::CommonName, name);
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = ids.iter().map(|id| uri_san(id)).collect::<Result<_>>()?;
        // Back-dated for clock skew, but by at most a tenth of the lifetime: dataplanes renew
        // at 2/3 of notBefore..notAfter, which must stay in the future for short lifetimes.
        params.not_before = now - to_time(CLOCK_SKEW.min(lifetime / 10))?;
        params.not_after = now + to_time(lifetime)?;
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&spki, &self.issuer)
            .map_err(|source| Error::Crypto {
                what: "signing the leaf",
                source,
            })?;
        Ok(SignedLeaf {
            cert_pem: cert.pem(),
            not_after: params.not_after,
            serial_hex,
        })
    }
}

/// Checks the CSR's SANs, returning its SPIFFE ids in order.
fn check_sans(
    csr: &X509CertificationRequest<'_>,
    mesh: &str,
    allowed_services: &BTreeSet<String>,
) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        let ParsedExtension::SubjectAlternativeName(san) = ext else {
            continue;
        };
        for name in &san.general_names {
            match name {
                GeneralName::URI(uri) => names.push((*uri).to_owned()),
                other => {
                    return Err(Error::ExtraSan {
                        san: other.to_string(),
                    });
                }
            }
        }
    }
    if names.is_empty() {
        return Err(Error::NoSan);
    }
    for uri in names {
        let Some(rest) = uri.strip_prefix("spiffe://") else {
            return Err(Error::ExtraSan { san: uri });
        };
        let Some((trust_domain, service)) = rest.split_once('/') else {
            return Err(Error::ExtraSan { san: uri });
        };
        if trust_domain != mesh {
            return Err(Error::OtherMesh {
                san: uri.clone(),
                expected: mesh.to_owned(),
            });
        }
        if service.is_empty() || service.contains('/') {
            return Err(Error::ExtraSan { san: uri });
        }
        if !allowed_services.contains(service) {
            return Err(Error::UnknownService {
                service: service.to_owned(),
                san: uri,
            });
        }
        if !ids.contains(&uri) {
            ids.push(uri);
        }
    }
    Ok(ids)
}

/// The trust bundle of a mesh: its roots' certificates, concatenated PEM.
pub fn trust_bundle(roots: &[&Ca]) -> String {
    let mut out = String::new();
    for ca in roots {
        out.push_str(ca.cert_pem.trim_end());
        out.push('\n');
    }
    out
}

/// The URI SANs (SPIFFE ids) of a PEM certificate.
pub fn spiffe_ids_of(cert_pem: &str) -> Result<Vec<String>> {
    let pem = parse_pem_cert(cert_pem, "certificate")?;
    let cert = parse_x509(&pem, "certificate")?;
    // Fail on a malformed SAN extension rather than reading it as "no SANs".
    cert.subject_alternative_name().map_err(|e| Error::Cert {
        what: "certificate",
        reason: e.to_string(),
    })?;
    Ok(uri_sans(&cert))
}

/// The URI SANs of a certificate (empty without a readable SAN extension).
fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn check_valid_now(cert: &X509Certificate<'_>, what: &'static str) -> Result<()> {
    let validity = cert.validity();
    if validity.is_valid() {
        Ok(())
    } else {
        Err(Error::NotValidNow {
            what,
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
        })
    }
}

/// Checks that `leaf_pem` is signed by a CA root of `bundle_pem` and that both are valid now.
pub fn verify_chain(leaf_pem: &str, bundle_pem: &str) -> Result<()> {
    let leaf_pem = parse_pem_cert(leaf_pem, "leaf")?;
    verify_chain_der(&leaf_pem.contents, bundle_pem).map(|_| ())
}

/// What a verified leaf says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafInfo {
    /// The subject's organisation: the mesh it was issued in.
    pub organization: Option<String>,
    /// The subject's common name: the Dataplane it was issued to.
    pub common_name: Option<String>,
    /// Its URI SANs.
    pub spiffe_ids: Vec<String>,
    /// When it expires.
    pub not_after: OffsetDateTime,
}

/// Checks that the DER leaf (e.g. a TLS peer's certificate) is signed by a CA root of
/// `bundle_pem` and that both are valid now, and says who it names.
pub fn verify_chain_der(leaf_der: &[u8], bundle_pem: &str) -> Result<LeafInfo> {
    let (_, leaf) = X509Certificate::from_der(leaf_der).map_err(|e| Error::Cert {
        what: "leaf",
        reason: e.to_string(),
    })?;
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_owned)
    };
    let info = LeafInfo {
        organization: first(&mut leaf.subject().iter_organization()),
        common_name: first(&mut leaf.subject().iter_common_name()),
        spiffe_ids: uri_sans(&leaf),
        not_after: leaf.validity().not_after.to_datetime(),
    };
    let roots = Pem::iter_from_buffer(bundle_pem.as_bytes())
        .map(|p| {
            p.map_err(|e| Error::Cert {
                what: "trust bundle",
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if roots.is_empty() {
        return Err(Error::EmptyBundle);
    }
    for root_pem in &roots {
        let root = parse_x509(root_pem, "trust bundle")?;
        if !root.is_ca() || root.subject() != leaf.issuer() {
            continue;
        }
        if leaf.verify_signature(Some(root.public_key())).is_ok() {
            check_valid_now(&root, "root")?;
            check_valid_now(&leaf, "leaf")?;
            return Ok(info);
        }
    }
    Err(Error::Untrusted)
}
