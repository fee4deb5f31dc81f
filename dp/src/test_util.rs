//! Test helpers shared by unit tests and crate tests: a CA minted with rcgen at test time,
//! and a deadline-based wait. Built only for tests (`cfg(test)` or the `test-util` feature).

use std::future::Future;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// A throwaway CA.
pub struct TestCa {
    /// The root certificate, PEM.
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new root CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(1);
        let cert = params.self_signed(&key).expect("self-signed CA");
        TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Signs `csr_pem` for `[not_before, not_after]` (Unix seconds), keeping its URI SANs.
    pub fn sign_csr(&self, csr_pem: &str, not_before: i64, not_after: i64) -> String {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).expect("CSR parses");
        csr.params.not_before =
            OffsetDateTime::from_unix_timestamp(not_before).expect("not_before");
        csr.params.not_after = OffsetDateTime::from_unix_timestamp(not_after).expect("not_after");
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        csr.signed_by(&self.issuer).expect("signing the CSR").pem()
    }

    /// A leaf for `key_pem` carrying `spiffe_ids`, valid `[not_before, not_after]`.
    pub fn leaf(
        &self,
        key_pem: &str,
        spiffe_ids: &[String],
        not_before: i64,
        not_after: i64,
    ) -> String {
        let csr = crate::identity::csr(key_pem, spiffe_ids).expect("CSR");
        self.sign_csr(&csr, not_before, not_after)
    }

    /// A server certificate and key (PEM) for `ip`.
    pub fn server(&self, ip: std::net::IpAddr) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("server key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::IpAddress(ip)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(1);
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        (cert.pem(), key.serialize_pem())
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// Polls `f` every 20 ms until it returns `Some`, panicking with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
