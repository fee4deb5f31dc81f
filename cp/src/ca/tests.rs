use std::{collections::BTreeSet, time::Duration};

use base64::Engine as _;
use rcgen::{CertificateParams, KeyPair, SanType};
use x509_parser::{extensions::GeneralName, pem::parse_x509_pem};

use super::*;

fn root(mesh: &str) -> (CaMaterial, Ca) {
    let material = generate_builtin_root(mesh, "ca-1", &BuiltinOptions::default()).unwrap();
    let ca = Ca::from_material(&material).unwrap();
    (material, ca)
}

fn services(s: &[&str]) -> BTreeSet<String> {
    s.iter().map(|s| (*s).to_owned()).collect()
}

/// A CSR as the dataplane builds it (the cp must not depend on weft-dp).
fn csr_with(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn csr_for(uris: &[&str]) -> String {
    csr_with(uris.iter().map(|u| uri(u)).collect())
}

const DAY: Duration = Duration::from_secs(24 * 3600);

#[test]
fn builtin_root_is_a_p256_ca() {
    let (material, ca) = root("default");
    let (_, pem) = parse_x509_pem(material.cert_pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    assert!(cert.is_ca());
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    assert_eq!(
        cert.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
    let curve = cert
        .public_key()
        .algorithm
        .parameters
        .as_ref()
        .unwrap()
        .as_oid()
        .unwrap();
    assert_eq!(curve, x509_parser::oid_registry::OID_EC_P256);
    assert!(
        cert.subject()
            .to_string()
            .contains("weft default ca-1 root")
    );
    let years = (ca.not_after() - OffsetDateTime::now_utc()).whole_days();
    assert!((3640..=3651).contains(&years), "{years} days");
    assert_eq!(spiffe_ids_of(ca.cert_pem()).unwrap(), ["spiffe://default"]);
    // The key is stored as JSON by the caller.
    let json = serde_json::to_string(&material).unwrap();
    assert_eq!(serde_json::from_str::<CaMaterial>(&json).unwrap(), material);
    assert!(!format!("{material:?}").contains("PRIVATE KEY"));
}

#[test]
fn builtin_root_honours_expiration_and_rsa_bits() {
    let opts = BuiltinOptions {
        rsa_bits: None,
        expiration: Some(Duration::from_secs(3600)),
    };
    let ca = Ca::from_material(&generate_builtin_root("m", "b", &opts).unwrap()).unwrap();
    let left = ca.not_after() - OffsetDateTime::now_utc();
    assert!(left <= time::Duration::hours(1) && left > time::Duration::minutes(58));

    let rsa = BuiltinOptions {
        rsa_bits: Some(2048),
        expiration: None,
    };
    let material = generate_builtin_root("m", "b", &rsa).unwrap();
    let (_, pem) = parse_x509_pem(material.cert_pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    assert_eq!(
        cert.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION
    );
    // An RSA root signs P-256 leaves that chain to it.
    let ca = Ca::from_material(&material).unwrap();
    let leaf = ca
        .sign_csr(&csr_for(&["spiffe://m/web"]), "m", &services(&["web"]), DAY)
        .unwrap();
    verify_chain(&leaf.cert_pem, ca.cert_pem()).unwrap();

    let odd = BuiltinOptions {
        rsa_bits: Some(1000),
        expiration: None,
    };
    let err = generate_builtin_root("m", "b", &odd).unwrap_err();
    assert!(
        matches!(err, Error::Unsupported(ref m) if m.contains("RSAbits 1000")),
        "{err}"
    );
}

#[test]
fn signs_a_csr_into_a_leaf_that_chains_to_the_root() {
    let (_, ca) = root("default");
    let csr = csr_for(&["spiffe://default/web", "spiffe://default/api"]);
    let lifetime = Duration::from_secs(24 * 3600);
    let leaf = ca
        .sign_csr(&csr, "default", &services(&["web", "api", "db"]), lifetime)
        .unwrap();

    verify_chain(&leaf.cert_pem, &trust_bundle(&[&ca])).unwrap();
    assert_eq!(
        spiffe_ids_of(&leaf.cert_pem).unwrap(),
        ["spiffe://default/web", "spiffe://default/api"]
    );

    let (_, pem) = parse_x509_pem(leaf.cert_pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    assert!(!cert.is_ca());
    let validity = cert.validity();
    assert_eq!(
        validity.not_after.to_datetime() - validity.not_before.to_datetime(),
        time::Duration::try_from(lifetime + CLOCK_SKEW).unwrap()
    );
    assert_eq!(validity.not_after.to_datetime(), leaf.not_after);
    // A short lifetime is back-dated by a tenth of it only, so 2/3 of it lies ahead.
    let short = Duration::from_secs(30);
    let short_leaf = ca
        .sign_csr(
            &csr_for(&["spiffe://default/web"]),
            "default",
            &services(&["web"]),
            short,
        )
        .unwrap();
    let (_, short_pem) = parse_x509_pem(short_leaf.cert_pem.as_bytes()).unwrap();
    let c = short_pem.parse_x509().unwrap();
    assert_eq!(
        c.validity().not_after.to_datetime() - c.validity().not_before.to_datetime(),
        time::Duration::seconds(33)
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let (_, root_pem) = parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
    assert_eq!(cert.issuer(), root_pem.parse_x509().unwrap().subject());
    assert_eq!(
        cert.raw_serial_as_string().replace(':', ""),
        leaf.serial_hex
    );
    // Only URI SANs.
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert!(
        san.general_names
            .iter()
            .all(|n| matches!(n, GeneralName::URI(_)))
    );

    // Serials are random.
    let again = ca
        .sign_csr(&csr, "default", &services(&["web", "api"]), lifetime)
        .unwrap();
    assert_ne!(again.serial_hex, leaf.serial_hex);
}

#[test]
fn refuses_a_service_the_token_does_not_allow() {
    let (_, ca) = root("default");
    let csr = csr_for(&["spiffe://default/web", "spiffe://default/db"]);
    let err = ca
        .sign_csr(&csr, "default", &services(&["web"]), DAY)
        .unwrap_err();
    assert!(
        matches!(err, Error::UnknownService { ref san, ref service }
            if san == "spiffe://default/db" && service == "db"),
        "{err:?}"
    );
    let err = ca
        .sign_csr(&csr, "default", &BTreeSet::new(), DAY)
        .unwrap_err();
    assert!(matches!(err, Error::UnknownService { .. }), "{err:?}");
}

#[test]
fn refuses_extra_dns_san() {
    let (_, ca) = root("default");
    let csr = csr_with(vec![
        uri("spiffe://default/web"),
        SanType::DnsName("evil.example.com".try_into().unwrap()),
    ]);
    let err = ca
        .sign_csr(&csr, "default", &services(&["web"]), DAY)
        .unwrap_err();
    assert!(
        matches!(err, Error::ExtraSan { ref san } if san.contains("evil.example.com")),
        "{err:?}"
    );
}

#[test]
fn refuses_extra_ip_san() {
    let (_, ca) = root("default");
    let csr = csr_with(vec![
        uri("spiffe://default/web"),
        SanType::IpAddress("10.0.0.1".parse().unwrap()),
    ]);
    let err = ca
        .sign_csr(&csr, "default", &services(&["web"]), DAY)
        .unwrap_err();
    assert!(matches!(err, Error::ExtraSan { .. }), "{err:?}");
}

#[test]
fn refuses_extra_non_spiffe_uri() {
    let (_, ca) = root("default");
    for bad in [
        "https://default/web",
        "spiffe://default",
        "spiffe://default/web/extra",
        "spiffe://default/",
    ] {
        let csr = csr_for(&["spiffe://default/web", bad]);
        let err = ca
            .sign_csr(&csr, "default", &services(&["web"]), DAY)
            .unwrap_err();
        assert!(
            matches!(err, Error::ExtraSan { ref san } if san == bad),
            "{bad}: {err:?}"
        );
    }
}

#[test]
fn refuses_other_mesh() {
    let (_, ca) = root("default");
    let csr = csr_for(&["spiffe://other/web"]);
    let err = ca
        .sign_csr(&csr, "default", &services(&["web"]), DAY)
        .unwrap_err();
    assert!(
        matches!(err, Error::OtherMesh { ref san, ref expected }
            if san == "spiffe://other/web" && expected == "default"),
        "{err:?}"
    );
}

#[test]
fn refuses_csr_without_san() {
    let (_, ca) = root("default");
    let err = ca
        .sign_csr(&csr_with(vec![]), "default", &services(&["web"]), DAY)
        .unwrap_err();
    assert!(matches!(err, Error::NoSan), "{err:?}");
}

#[test]
fn refuses_tampered_csr() {
    let (_, ca) = root("default");
    let csr = csr_for(&["spiffe://default/web"]);
    let (_, pem) = parse_x509_pem(csr.as_bytes()).unwrap();
    let mut der = pem.contents.clone();
    // Change the requested SAN after signing: web -> wex.
    let needle = b"spiffe://default/web";
    let at = der.windows(needle.len()).position(|w| w == needle).unwrap();
    der[at + needle.len() - 1] = b'x';
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    let tampered =
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n");
    let err = ca
        .sign_csr(&tampered, "default", &services(&["web", "wex"]), DAY)
        .unwrap_err();
    assert!(matches!(err, Error::CsrSignature(_)), "{err:?}");

    let err = ca
        .sign_csr("not a csr", "default", &services(&["web"]), DAY)
        .unwrap_err();
    assert!(matches!(err, Error::CsrMalformed(_)), "{err:?}");
    let err = ca
        .sign_csr(ca.cert_pem(), "default", &services(&["web"]), DAY)
        .unwrap_err();
    assert!(matches!(err, Error::CsrMalformed(_)), "{err:?}");
}

#[test]
fn provided_ca_from_inline_base64_and_file() {
    let (material, _) = root("prod");
    let inline = load_provided(
        Source::Inline(material.cert_pem.clone()),
        Source::Inline(material.key_pem.clone()),
    )
    .unwrap();
    assert_eq!(inline, material);

    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let from_b64 = load_provided(
        Source::InlineBase64(b64(&material.cert_pem)),
        Source::InlineBase64(b64(&material.key_pem)),
    )
    .unwrap();
    assert_eq!(from_b64, material);

    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("ca.crt");
    let key_path = dir.path().join("ca.key");
    std::fs::write(&cert_path, &material.cert_pem).unwrap();
    std::fs::write(&key_path, &material.key_pem).unwrap();
    let from_file = load_provided(Source::File(cert_path), Source::File(key_path)).unwrap();
    let ca = Ca::from_material(&from_file).unwrap();
    let leaf = ca
        .sign_csr(
            &csr_for(&["spiffe://prod/web"]),
            "prod",
            &services(&["web"]),
            DAY,
        )
        .unwrap();
    verify_chain(&leaf.cert_pem, &trust_bundle(&[&ca])).unwrap();

    let err = load_provided(
        Source::File(dir.path().join("missing.crt")),
        Source::Inline(material.key_pem.clone()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Read { .. }), "{err:?}");
    let err = load_provided(
        Source::InlineBase64("***".to_owned()),
        Source::Inline(material.key_pem.clone()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Base64 { what: "cert", .. }), "{err:?}");
    // Inline sources are never printed.
    assert!(!format!("{:?}", Source::Inline(material.key_pem.clone())).contains("PRIVATE"));
}

#[test]
fn provided_ca_with_mismatched_key_or_non_ca_cert_is_refused() {
    let (a, ca_a) = root("prod");
    let (b, _) = root("prod");
    let err = load_provided(
        Source::Inline(a.cert_pem.clone()),
        Source::Inline(b.key_pem),
    )
    .unwrap_err();
    assert!(matches!(err, Error::KeyMismatch), "{err:?}");
    assert!(err.to_string().starts_with("key:"));

    let leaf = ca_a
        .sign_csr(
            &csr_for(&["spiffe://prod/web"]),
            "prod",
            &services(&["web"]),
            DAY,
        )
        .unwrap();
    let err = load_provided(
        Source::Inline(leaf.cert_pem),
        Source::Inline(a.key_pem.clone()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotCa), "{err:?}");
    assert!(err.to_string().starts_with("cert:"));

    let err = load_provided(
        Source::Inline("garbage".to_owned()),
        Source::Inline(a.key_pem.clone()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Cert { what: "cert", .. }), "{err:?}");
    let err = load_provided(
        Source::Inline(a.cert_pem.clone()),
        Source::Inline("garbage".to_owned()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Key(_)), "{err:?}");
}

#[test]
fn trust_bundle_with_two_roots_verifies_leaves_of_both() {
    let (_, old) = root("default");
    let (_, new) = root("default");
    let (_, other) = root("default");
    let bundle = trust_bundle(&[&old, &new]);
    let sign = |ca: &Ca| {
        ca.sign_csr(
            &csr_for(&["spiffe://default/web"]),
            "default",
            &services(&["web"]),
            DAY,
        )
        .unwrap()
        .cert_pem
    };
    verify_chain(&sign(&old), &bundle).unwrap();
    verify_chain(&sign(&new), &bundle).unwrap();
    let err = verify_chain(&sign(&other), &bundle).unwrap_err();
    assert!(matches!(err, Error::Untrusted), "{err:?}");
    let err = verify_chain(&sign(&old), "").unwrap_err();
    assert!(matches!(err, Error::EmptyBundle), "{err:?}");
}

#[test]
fn expired_leaf_does_not_verify() {
    let (_, ca) = root("default");
    // A zero lifetime leaf ends now; with notBefore in the past it is already expired soon.
    let leaf = ca
        .sign_csr(
            &csr_for(&["spiffe://default/web"]),
            "default",
            &services(&["web"]),
            Duration::ZERO,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let err = verify_chain(&leaf.cert_pem, &trust_bundle(&[&ca])).unwrap_err();
    assert!(
        matches!(err, Error::NotValidNow { what: "leaf", .. }),
        "{err:?}"
    );
}
