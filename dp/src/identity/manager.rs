//! Keeps the dataplane's certificate valid: reuses one on disk, certifies with the token on
//! first join, renews at about 2/3 of the lifetime (with jitter) authenticated by the current
//! certificate, renews early when the mesh's signing CA changed, and publishes the result in a
//! `watch<Arc<Credentials>>` for the listeners.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use weft_api::v1;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use super::{BUNDLE_FILE, CERT_FILE, write_private};
use crate::backoff::Backoff;
use crate::cp::CpEndpoint;
use crate::dataplane::Dataplane;
use crate::metrics::Metrics;
use crate::model::Applied;

#[cfg(test)]
mod tests;

/// A certificate on disk closer to its expiry than this is not reused.
pub const EXPIRY_MARGIN_SECS: i64 = 30;
/// The most the renewal after a signing-CA change is delayed (spreads the CP's load).
pub const ROTATION_JITTER: Duration = Duration::from_secs(2);

/// Why certification failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building the CSR or writing a file failed.
    #[error(transparent)]
    Identity(#[from] super::Error),
    /// No valid certificate and no token file to join with.
    #[error("no valid certificate and no --dataplane-token-file to join the mesh with")]
    NoToken,
    /// The token file could not be read or is empty.
    #[error("dataplane token file {path}: {message}")]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The control plane refused or could not be reached.
    #[error("Certify failed: {code:?}: {message}")]
    Rejected {
        /// The gRPC status code.
        code: tonic::Code,
        /// The CP's reason.
        message: String,
    },
    /// The control plane's answer is unusable.
    #[error("Certify returned an unusable certificate: {0}")]
    BadResponse(String),
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Error {
        Error::Rejected {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The dataplane's TLS credentials. The key is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The leaf followed by intermediates, PEM.
    pub cert_chain_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Every root trusted in the mesh, PEM.
    pub trust_bundle_pem: String,
    /// Start of the leaf's validity, Unix seconds.
    pub not_before: i64,
    /// End of the leaf's validity, Unix seconds.
    pub not_after: i64,
    /// The leaf's SPIFFE ids, sorted.
    pub spiffe_ids: Vec<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("spiffe_ids", &self.spiffe_ids)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Whether the leaf is usable at `now` (not expired nor about to).
    pub fn is_valid_at(&self, now: i64) -> bool {
        self.not_before <= now + EXPIRY_MARGIN_SECS && now + EXPIRY_MARGIN_SECS < self.not_after
    }
}

/// What the dataplane reads from its leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// URI SANs, sorted.
    pub spiffe_ids: Vec<String>,
}

/// Reads the first certificate of a PEM chain.
pub fn leaf_info(chain_pem: &str) -> Result<LeafInfo, String> {
    let pem = Pem::iter_from_buffer(chain_pem.as_bytes())
        .next()
        .ok_or("no PEM certificate")?
        .map_err(|e| format!("not PEM: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("leaf does not parse: {e}"))?;
    let mut ids: Vec<String> = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
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
        .unwrap_or_default();
    ids.sort();
    Ok(LeafInfo {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        spiffe_ids: ids,
    })
}

/// Whether a certificate found on disk can be used instead of certifying again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reuse {
    /// Valid and for the right ids.
    Use(LeafInfo),
    /// Expired, not yet valid, or expiring within [`EXPIRY_MARGIN_SECS`].
    Expired {
        /// When it expires.
        not_after: i64,
    },
    /// Issued for other services than the Dataplane file declares now.
    WrongIds {
        /// What the certificate carries.
        have: Vec<String>,
        /// What the Dataplane needs.
        want: Vec<String>,
    },
    /// Does not parse.
    Unusable(String),
}

/// Decides whether `chain_pem` can be reused for `wanted` ids (sorted) at `now`.
pub fn reuse_decision(chain_pem: &str, wanted: &[String], now: i64) -> Reuse {
    let info = match leaf_info(chain_pem) {
        Ok(i) => i,
        Err(e) => return Reuse::Unusable(e),
    };
    if info.not_before > now + EXPIRY_MARGIN_SECS || now + EXPIRY_MARGIN_SECS >= info.not_after {
        return Reuse::Expired {
            not_after: info.not_after,
        };
    }
    if info.spiffe_ids != wanted {
        return Reuse::WrongIds {
            have: info.spiffe_ids,
            want: wanted.to_vec(),
        };
    }
    Reuse::Use(info)
}

/// When to renew a leaf valid `[not_before, not_after]`: at `2/3 ± 5%` of its lifetime, with
/// `jitter` in `[-1, 1]` choosing where in that window.
pub fn renewal_at(not_before: i64, not_after: i64, jitter: f64) -> i64 {
    let lifetime = (not_after - not_before).max(0) as f64;
    let fraction = 2.0 / 3.0 + 0.05 * jitter.clamp(-1.0, 1.0);
    not_before + (lifetime * fraction).round() as i64
}

/// Whether the leaf of `chain_pem` was signed by the certificate `ca_pem`.
pub fn signed_by(chain_pem: &str, ca_pem: &str) -> bool {
    let first = |pem: &str| {
        Pem::iter_from_buffer(pem.as_bytes())
            .next()
            .and_then(Result::ok)
    };
    let (Some(leaf), Some(ca)) = (first(chain_pem), first(ca_pem)) else {
        return false;
    };
    let (Ok(leaf), Ok(ca)) = (leaf.parse_x509(), ca.parse_x509()) else {
        return false;
    };
    leaf.verify_signature(Some(ca.public_key())).is_ok()
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The `Identity.Certify` call, a seam so tests can sign without a control plane.
pub trait Certifier: Send + Sync + 'static {
    /// Calls Certify, presenting `client` as the TLS client certificate when given.
    fn certify(
        &self,
        request: v1::CertifyRequest,
        client: Option<Arc<Credentials>>,
    ) -> impl Future<Output = Result<v1::CertifyResponse, tonic::Status>> + Send;
}

/// [`Certifier`] over gRPC: a new channel per call, so each call presents the current cert.
#[derive(Debug, Clone)]
pub struct GrpcCertifier {
    cp: CpEndpoint,
}

impl GrpcCertifier {
    /// Certifies against `cp`.
    pub fn new(cp: CpEndpoint) -> GrpcCertifier {
        GrpcCertifier { cp }
    }
}

impl Certifier for GrpcCertifier {
    async fn certify(
        &self,
        request: v1::CertifyRequest,
        client: Option<Arc<Credentials>>,
    ) -> Result<v1::CertifyResponse, tonic::Status> {
        let channel = self
            .cp
            .connect(client.as_deref())
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut client = v1::identity_client::IdentityClient::new(channel);
        Ok(client.certify(request).await?.into_inner())
    }
}

/// Loads `cert.pem` and `bundle.pem` from `state_dir` when the certificate can be reused.
pub fn load_existing(
    state_dir: &Path,
    key_pem: &str,
    wanted: &[String],
    now: i64,
) -> Option<Credentials> {
    let chain = std::fs::read_to_string(state_dir.join(CERT_FILE)).ok()?;
    match reuse_decision(&chain, wanted, now) {
        Reuse::Use(info) => {
            let bundle = std::fs::read_to_string(state_dir.join(BUNDLE_FILE)).unwrap_or_default();
            info!(
                spiffe_ids = ?info.spiffe_ids,
                not_after = info.not_after,
                "reusing the certificate in the state directory"
            );
            Some(Credentials {
                cert_chain_pem: chain,
                key_pem: key_pem.to_owned(),
                trust_bundle_pem: bundle,
                not_before: info.not_before,
                not_after: info.not_after,
                spiffe_ids: info.spiffe_ids,
            })
        }
        other => {
            info!(decision = ?other, "not reusing the certificate in the state directory");
            None
        }
    }
}

/// Settings of the [`Manager`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where cert.pem and bundle.pem go.
    pub state_dir: PathBuf,
    /// The token for a first join (read when needed, never cached).
    pub token_file: Option<PathBuf>,
    /// The dataplane's private key, PEM.
    pub key_pem: String,
    /// Cap of the retry backoff.
    pub max_backoff: Duration,
}

/// Keeps the credentials valid.
pub struct Manager<C> {
    certifier: C,
    dataplane: Arc<Dataplane>,
    settings: Settings,
    creds: watch::Sender<Option<Arc<Credentials>>>,
    attempted: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

impl<C> std::fmt::Debug for Manager<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("dataplane", &self.dataplane.name)
            .finish_non_exhaustive()
    }
}

impl<C: Certifier> Manager<C> {
    /// A manager publishing into `creds` (which may already hold reused credentials) and
    /// setting `attempted` once its first certification attempt finished (or was not needed).
    pub fn new(
        certifier: C,
        dataplane: Arc<Dataplane>,
        settings: Settings,
        creds: watch::Sender<Option<Arc<Credentials>>>,
        attempted: watch::Sender<bool>,
        metrics: Arc<Metrics>,
    ) -> Manager<C> {
        if let Some(c) = creds.borrow().as_ref() {
            metrics.cert_expiry.set(c.not_after);
        }
        Manager {
            certifier,
            dataplane,
            settings,
            creds,
            attempted,
            metrics,
        }
    }

    fn read_token(&self) -> Result<String> {
        let path = self.settings.token_file.as_ref().ok_or(Error::NoToken)?;
        let text = std::fs::read_to_string(path).map_err(|e| Error::Token {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(Error::Token {
                path: path.clone(),
                message: "is empty".into(),
            });
        }
        Ok(token.to_owned())
    }

    /// One certification: with the current certificate when it is valid (falling back to the
    /// token once if the CP refuses it), else with the token. Writes cert.pem and bundle.pem and
    /// publishes the new credentials.
    pub async fn certify_once(&self) -> Result<Arc<Credentials>> {
        let ids = self.dataplane.spiffe_ids();
        let csr = super::csr(&self.settings.key_pem, &ids)?;
        let request = |token: Option<String>| v1::CertifyRequest {
            mesh: self.dataplane.mesh.clone(),
            dataplane_name: self.dataplane.name.clone(),
            csr_pem: csr.clone(),
            auth: token.map(v1::certify_request::Auth::Token),
            dataplane_yaml: self.dataplane.yaml.clone(),
        };
        let current = self.creds.borrow().clone();
        let usable = current.filter(|c| c.is_valid_at(now_unix()) && c.spiffe_ids == ids);
        let response = match usable {
            Some(c) => match self.certifier.certify(request(None), Some(c)).await {
                Ok(r) => r,
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                    ) && self.settings.token_file.is_some() =>
                {
                    warn!(
                        code = ?s.code(),
                        reason = s.message(),
                        "the control plane refused our certificate; retrying once with the token"
                    );
                    let token = self.read_token()?;
                    self.certifier.certify(request(Some(token)), None).await?
                }
                Err(s) => return Err(s.into()),
            },
            None => {
                let token = self.read_token()?;
                self.certifier.certify(request(Some(token)), None).await?
            }
        };
        let info = leaf_info(&response.cert_chain_pem).map_err(Error::BadResponse)?;
        if info.spiffe_ids != ids {
            return Err(Error::BadResponse(format!(
                "it carries {:?}, we asked for {ids:?}",
                info.spiffe_ids
            )));
        }
        let bundle = if response.trust_bundle_pem.is_empty() {
            self.creds
                .borrow()
                .as_ref()
                .map(|c| c.trust_bundle_pem.clone())
                .unwrap_or_default()
        } else {
            response.trust_bundle_pem
        };
        let creds = Arc::new(Credentials {
            cert_chain_pem: response.cert_chain_pem,
            key_pem: self.settings.key_pem.clone(),
            trust_bundle_pem: bundle,
            not_before: info.not_before,
            not_after: info.not_after,
            spiffe_ids: info.spiffe_ids,
        });
        write_private(
            &self.settings.state_dir.join(CERT_FILE),
            &creds.cert_chain_pem,
        )?;
        if !creds.trust_bundle_pem.is_empty() {
            write_private(
                &self.settings.state_dir.join(BUNDLE_FILE),
                &creds.trust_bundle_pem,
            )?;
        }
        let renewed = self.creds.borrow().is_some();
        if renewed {
            self.metrics.cert_renewals.inc();
        }
        self.metrics.cert_expiry.set(creds.not_after);
        info!(
            spiffe_ids = ?creds.spiffe_ids,
            not_after = creds.not_after,
            renewed,
            "certificate issued"
        );
        self.creds.send_replace(Some(creds.clone()));
        Ok(creds)
    }

    /// When the current credentials should be renewed.
    fn renewal_due(&self) -> Option<Instant> {
        let c = self.creds.borrow().clone()?;
        let at = renewal_at(c.not_before, c.not_after, fastrand::f64() * 2.0 - 1.0);
        let wait = u64::try_from(at - now_unix()).unwrap_or(0);
        Some(Instant::now() + Duration::from_secs(wait))
    }

    /// Reacts to a newly applied config: writes a changed trust bundle, and returns whether
    /// the leaf must be renewed because the signing CA changed.
    fn on_config(&self, applied: &Applied, rotated_for: &mut Option<String>) -> bool {
        let config = &applied.config;
        let Some(current) = self.creds.borrow().clone() else {
            return false;
        };
        if !config.trust_bundle_pem.is_empty()
            && config.trust_bundle_pem != current.trust_bundle_pem
        {
            let path = self.settings.state_dir.join(BUNDLE_FILE);
            if let Err(e) = write_private(&path, &config.trust_bundle_pem) {
                warn!(error = %e, "cannot write the new trust bundle");
            }
            info!("trust bundle changed");
            let mut next = (*current).clone();
            next.trust_bundle_pem = config.trust_bundle_pem.clone();
            self.creds.send_replace(Some(Arc::new(next)));
        }
        if config.signing_ca_pem.is_empty()
            || rotated_for.as_deref() == Some(config.signing_ca_pem.as_str())
            || signed_by(&current.cert_chain_pem, &config.signing_ca_pem)
        {
            return false;
        }
        *rotated_for = Some(config.signing_ca_pem.clone());
        info!("the mesh's signing CA changed; renewing the certificate soon");
        true
    }

    /// Runs until `shutdown` turns true, renewing as needed. `config` is the applied config;
    /// each change of `renew_now` (SIGHUP) renews at once.
    pub async fn run(
        self,
        mut config: watch::Receiver<Option<Arc<Applied>>>,
        mut renew_now: watch::Receiver<u64>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut renew_open = true;
        let far = || Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let mut backoff = Backoff::new(self.settings.max_backoff);
        let mut rotated_for: Option<String> = None;
        let mut config_open = true;
        let needs_cert = |config: &watch::Receiver<Option<Arc<Applied>>>| {
            config
                .borrow()
                .as_ref()
                .is_none_or(|a| a.config.mtls_mode.needs_certificate())
        };
        let mut due = match self.renewal_due() {
            Some(at) => {
                self.attempted.send_replace(true);
                at
            }
            None => Instant::now(),
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                changed = config.changed(), if config_open => {
                    if changed.is_err() {
                        config_open = false;
                        continue;
                    }
                    let applied = config.borrow_and_update().clone();
                    if let Some(applied) = applied {
                        if self.on_config(&applied, &mut rotated_for) {
                            let soon = Instant::now() + ROTATION_JITTER.mul_f64(fastrand::f64());
                            due = due.min(soon);
                        }
                        if self.creds.borrow().is_none() {
                            // No cert yet: certify now if the mesh wants mTLS, else wait.
                            due = if needs_cert(&config) { due.min(Instant::now()) } else { far() };
                        }
                    }
                    continue;
                }
                changed = renew_now.changed(), if renew_open => {
                    if changed.is_err() {
                        renew_open = false;
                        continue;
                    }
                    info!("renewing the certificate now, as asked (SIGHUP)");
                }
                () = crate::shutdown::stopped(&mut shutdown) => return,
            }
            if self.dataplane.spiffe_ids().is_empty() {
                info!("the Dataplane declares no inbound services; it has no identity to certify");
                self.attempted.send_replace(true);
                due = far();
                continue;
            }
            if self.creds.borrow().is_none() && !needs_cert(&config) {
                debug!("mTLS is off in this mesh; not certifying");
                self.attempted.send_replace(true);
                due = far();
                continue;
            }
            match self.certify_once().await {
                Ok(_) => {
                    backoff.reset();
                    due = self.renewal_due().unwrap_or_else(far);
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    warn!(error = %e, retry_in = ?wait, "certification failed");
                    due = Instant::now() + wait;
                }
            }
            self.attempted.send_replace(true);
        }
    }
}

/// An in-memory [`Certifier`] that signs with a test CA and records what it was asked.
#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    use std::sync::Mutex;

    use super::*;
    use crate::test_util::TestCa;

    /// What one call looked like.
    #[derive(Debug, Clone)]
    pub struct Call {
        /// The request.
        pub request: v1::CertifyRequest,
        /// Whether a client certificate was presented.
        pub with_cert: bool,
    }

    /// Signs CSRs with `ca` for `lifetime` seconds; accepts `token`, refuses others.
    pub struct FakeCertifier {
        /// The signing CA.
        pub ca: Mutex<TestCa>,
        /// The accepted token.
        pub token: String,
        /// Leaf lifetime in seconds.
        pub lifetime: i64,
        /// Every call, in order.
        pub calls: Mutex<Vec<Call>>,
        /// When set, cert-authenticated calls fail with this code.
        pub refuse_certs: Mutex<Option<tonic::Code>>,
    }

    impl FakeCertifier {
        /// A fake accepting `token`.
        pub fn new(token: &str, lifetime: i64) -> FakeCertifier {
            FakeCertifier {
                ca: Mutex::new(TestCa::new("fake mesh CA")),
                token: token.to_owned(),
                lifetime,
                calls: Mutex::new(Vec::new()),
                refuse_certs: Mutex::new(None),
            }
        }

        /// The recorded calls.
        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }
    }

    impl Certifier for Arc<FakeCertifier> {
        async fn certify(
            &self,
            request: v1::CertifyRequest,
            client: Option<Arc<Credentials>>,
        ) -> Result<v1::CertifyResponse, tonic::Status> {
            let with_cert = client.is_some();
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(Call {
                    request: request.clone(),
                    with_cert,
                });
            }
            let token = match &request.auth {
                Some(v1::certify_request::Auth::Token(t)) => t.as_str(),
                None => "",
            };
            if with_cert {
                if let Some(code) = *self
                    .refuse_certs
                    .lock()
                    .map_err(|_| tonic::Status::internal("poisoned"))?
                {
                    return Err(tonic::Status::new(code, "certificate revoked"));
                }
            } else if token != self.token {
                return Err(tonic::Status::unauthenticated("token is not valid"));
            }
            let ca = self
                .ca
                .lock()
                .map_err(|_| tonic::Status::internal("poisoned"))?;
            let now = now_unix();
            let not_after = now + self.lifetime;
            let chain = ca.sign_csr(&request.csr_pem, now - 1, not_after);
            let ids = leaf_info(&chain).map(|i| i.spiffe_ids).unwrap_or_default();
            Ok(v1::CertifyResponse {
                cert_chain_pem: chain,
                trust_bundle_pem: ca.cert_pem.clone(),
                not_after_unix: not_after,
                spiffe_ids: ids,
            })
        }
    }
}
