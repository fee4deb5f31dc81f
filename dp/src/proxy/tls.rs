//! rustls configurations built from the dataplane's credentials, swapped atomically when the
//! certificate or trust bundle changes (new connections take the new ones; established
//! connections keep theirs).
//!
//! - Inbound: the dataplane's certificate; clients must present a certificate that chains to
//!   the mesh's trust bundle (rustls' WebPKI client verifier). The client's identity is the
//!   SPIFFE id in its certificate's URI SAN, read after the handshake.
//! - Outbound: the dataplane's certificate as client certificate; the server's chain is
//!   verified against the trust bundle and its URI SANs must hold the SPIFFE id of the
//!   service the outbound targets. Mesh certificates carry no DNS names, so the usual host
//!   name check is replaced by that SPIFFE check (`SpiffeServerVerifier`).
//! - QUIC (`super::quic`): the same certificate, verifiers and SPIFFE checks, TLS 1.3 only
//!   (QUIC has no other), with the ALPN `weft-tunnel/1`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use x509_parser::prelude::FromDer as _;

use super::quic::Congestion;
use crate::identity::manager::Credentials;

#[cfg(test)]
pub(crate) mod tests;

/// Why TLS could not be set up from the credentials.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM block did not parse.
    #[error("{what}: {reason}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// QUIC cannot use the configuration.
    #[error("QUIC: {0}")]
    Quic(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built (e.g. an empty trust bundle).
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The TLS material of one credentials generation.
pub struct TlsState {
    /// Increases with each new credentials or bundle; lets caches notice a swap.
    pub generation: u64,
    /// The mesh (trust domain) the certificate is in.
    pub mesh: String,
    /// For inbound listeners.
    pub server: Arc<ServerConfig>,
    /// For inbound QUIC endpoints.
    pub quic_server: quinn::ServerConfig,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    clients: Mutex<HashMap<String, Arc<ClientConfig>>>,
    pooled_clients: Mutex<HashMap<String, Arc<ClientConfig>>>,
    resumption: bool,
    /// The congestion controller of its QUIC connections.
    quic_congestion: Congestion,
    quic_clients: Mutex<HashMap<String, quinn::ClientConfig>>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("generation", &self.generation)
            .field("mesh", &self.mesh)
            .finish_non_exhaustive()
    }
}

fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let out = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            what,
            reason: e.to_string(),
        })?;
    if out.is_empty() {
        return Err(Error::Pem {
            what,
            reason: "no certificate".into(),
        });
    }
    Ok(out)
}

/// rustls' ring provider with the AES-128-GCM suites first (rustls puts AES-256 first):
/// between dataplanes the client's order decides, and AES-128 seals a record in 10 AES rounds
/// where AES-256 takes 14, for the same 128-bit security level that X25519 and the P-256
/// mesh keys give the session. BoringSSL (Envoy) and Go order them this way on hosts with AES
/// instructions. AES-256 and ChaCha20 stay on offer.
fn provider() -> CryptoProvider {
    use rustls::CipherSuite::{
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS13_AES_128_GCM_SHA256,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: the other suites keep rustls' order.
    provider.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            TLS13_AES_128_GCM_SHA256
                | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

impl TlsState {
    /// Builds the configurations from `creds` with the mesh trust bundle `bundle_pem`.
    pub fn new(
        generation: u64,
        mesh: &str,
        creds: &Credentials,
        bundle_pem: &str,
    ) -> Result<TlsState> {
        let provider = Arc::new(provider());
        let mut roots = RootCertStore::empty();
        let (_, bad) = roots.add_parsable_certificates(certs("trust bundle", bundle_pem)?);
        if bad > 0 || roots.is_empty() {
            return Err(Error::Pem {
                what: "trust bundle",
                reason: format!("{bad} certificate(s) are not usable roots"),
            });
        }
        let roots = Arc::new(roots);
        let chain = certs("certificate", &creds.cert_chain_pem)?;
        let key =
            PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).map_err(|e| Error::Pem {
                what: "key",
                reason: e.to_string(),
            })?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| Error::Verifier(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(chain.clone(), key.clone_key())?;
        // Clients that offer no ALPN get a plain tunnel; `weft-pool/1` gets HTTP/2.
        server.alpn_protocols = vec![super::pool::ALPN.to_vec()];
        let mut quic = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        quic.alpn_protocols = vec![super::quic::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(quic))
            .map_err(|e| Error::Quic(e.to_string()))?;
        let mut quic_server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        quic_server.transport_config(super::quic::transport_config(Congestion::default()));
        Ok(TlsState {
            generation,
            mesh: mesh.to_owned(),
            server: Arc::new(server),
            quic_server,
            provider,
            roots,
            chain,
            key,
            clients: Mutex::new(HashMap::new()),
            pooled_clients: Mutex::new(HashMap::new()),
            resumption: true,
            quic_congestion: Congestion::default(),
            quic_clients: Mutex::new(HashMap::new()),
        })
    }

    /// The congestion controller of the QUIC connections this dataplane opens and accepts.
    pub fn with_quic_congestion(mut self, c: Congestion) -> TlsState {
        self.quic_congestion = c;
        self.quic_server
            .transport_config(super::quic::transport_config(c));
        self
    }

    /// Turns TLS session resumption off (every handshake a full one) when `on` is false.
    pub fn with_resumption(mut self, on: bool) -> TlsState {
        self.resumption = on;
        if !on {
            let mut server = (*self.server).clone();
            server.send_tls13_tickets = 0;
            server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            self.server = Arc::new(server);
        }
        self
    }

    /// The rustls client configuration for `service`'s SPIFFE id, TLS 1.3 only or not.
    fn client_config(&self, service: &str, tls13_only: bool) -> Result<ClientConfig> {
        let verifier = Arc::new(SpiffeServerVerifier {
            provider: self.provider.clone(),
            roots: self.roots.clone(),
            expected: format!("spiffe://{}/{service}", self.mesh),
        });
        let builder = ClientConfig::builder_with_provider(self.provider.clone());
        let builder = if tls13_only {
            builder.with_protocol_versions(&[&rustls::version::TLS13])?
        } else {
            builder.with_safe_default_protocol_versions()?
        };
        let mut config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        if !self.resumption {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(config)
    }

    /// The client configuration for pooled connections to `service` (ALPN `weft-pool/1`).
    pub fn pooled_client_for(&self, service: &str) -> Result<Arc<ClientConfig>> {
        cached(&self.pooled_clients, service, || {
            let mut config = self.client_config(service, false)?;
            config.alpn_protocols = vec![super::pool::ALPN.to_vec()];
            Ok(Arc::new(config))
        })
    }

    /// The QUIC client configuration for connections to `service` (cached per service).
    pub fn quic_client_for(&self, service: &str) -> Result<quinn::ClientConfig> {
        cached(&self.quic_clients, service, || {
            let mut tls = self.client_config(service, true)?;
            tls.alpn_protocols = vec![super::quic::ALPN.to_vec()];
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
                .map_err(|e| Error::Quic(e.to_string()))?;
            let mut config = quinn::ClientConfig::new(Arc::new(crypto));
            config.transport_config(super::quic::transport_config(self.quic_congestion));
            Ok(config)
        })
    }

    /// The client configuration for connections to `service` (cached per service, so TLS
    /// session resumption works across connections).
    pub fn client_for(&self, service: &str) -> Result<Arc<ClientConfig>> {
        cached(&self.clients, service, || {
            Ok(Arc::new(self.client_config(service, false)?))
        })
    }
}

/// The configuration cached under `service` in `map`, built by `build` the first time.
fn cached<T: Clone>(
    map: &Mutex<HashMap<String, T>>,
    service: &str,
    build: impl FnOnce() -> Result<T>,
) -> Result<T> {
    // The lock guards a map lookup or insert only (building takes microseconds, no I/O).
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = map.get(service) {
        return Ok(c.clone());
    }
    let config = build()?;
    map.insert(service.to_owned(), config.clone());
    Ok(config)
}

/// The URI SANs of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
        return Vec::new();
    };
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The services a peer certificate proves, in `mesh`: `spiffe://<mesh>/<service>` URI SANs.
pub fn peer_services(der: &[u8], mesh: &str) -> Vec<String> {
    let prefix = format!("spiffe://{mesh}/");
    uri_sans(der)
        .into_iter()
        .filter_map(|u| u.strip_prefix(&prefix).map(str::to_owned))
        .filter(|s| !s.is_empty() && !s.contains('/'))
        .collect()
}

/// Verifies a server's chain against the mesh roots and that it holds the expected SPIFFE id.
///
/// This replaces rustls' host name check, which cannot apply: mesh certificates carry only
/// SPIFFE URIs. The chain, validity and key usage are checked by WebPKI as usual.
#[derive(Debug)]
struct SpiffeServerVerifier {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    expected: String,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Expired)
            }
            webpki::Error::UnknownIssuer => {
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            }
            other => rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                rustls::OtherError(Arc::new(other)),
            )),
        })?;
        if uri_sans(end_entity).contains(&self.expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
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
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
