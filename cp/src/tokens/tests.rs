use std::{collections::BTreeMap, time::Duration};

use base64::Engine as _;
use time::macros::datetime;

use super::*;

const NOW: OffsetDateTime = datetime!(2026-01-01 12:00 UTC);

fn web_tags() -> BTreeMap<String, Vec<String>> {
    BTreeMap::from([("kuma.io/service".to_owned(), vec!["web".to_owned()])])
}

fn never(_: &str) -> bool {
    false
}

fn issue_web(key: &SigningKey) -> (String, Claims) {
    issue(
        key,
        "default",
        Some("web-1"),
        web_tags(),
        DEFAULT_VALIDITY,
        NOW,
    )
    .unwrap()
}

#[test]
fn round_trip() {
    let key = SigningKey::generate().unwrap();
    assert_eq!(key.kid.len(), 16);
    let (token, claims) = issue_web(&key);
    assert_eq!(claims.exp - claims.iat, 3600);
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.kid.as_deref(), Some(key.kid.as_str()));
    assert_eq!(header.alg, Algorithm::ES256);

    let got = verify(
        &token,
        "default",
        std::slice::from_ref(&key),
        &never,
        NOW + time::Duration::minutes(59),
    )
    .unwrap();
    assert_eq!(got, claims);
    assert_eq!(got.name.as_deref(), Some("web-1"));
    assert_eq!(got.allowed_services(), BTreeSet::from(["web".to_owned()]));

    // Keys are stored as JSON, never printed.
    let json = serde_json::to_string(&key).unwrap();
    assert_eq!(serde_json::from_str::<SigningKey>(&json).unwrap(), key);
    assert!(!format!("{key:?}").contains("PRIVATE"));
}

#[test]
fn expired() {
    let key = SigningKey::generate().unwrap();
    let (token, claims) = issue_web(&key);
    let at_exp = NOW + time::Duration::hours(1);
    let err = verify(&token, "default", &[key], &never, at_exp).unwrap_err();
    assert!(
        matches!(err, Error::Expired { exp } if exp == claims.exp),
        "{err:?}"
    );
}

#[test]
fn wrong_mesh() {
    let key = SigningKey::generate().unwrap();
    let (token, _) = issue_web(&key);
    let err = verify(&token, "prod", &[key], &never, NOW).unwrap_err();
    assert!(
        matches!(err, Error::WrongMesh { ref token_mesh, ref expected }
            if token_mesh == "default" && expected == "prod"),
        "{err:?}"
    );
}

#[test]
fn bad_signature_from_another_key_with_the_same_kid() {
    let key = SigningKey::generate().unwrap();
    let mut impostor = SigningKey::generate().unwrap();
    impostor.kid = key.kid.clone();
    let (token, _) = issue_web(&impostor);
    let err = verify(&token, "default", &[key], &never, NOW).unwrap_err();
    assert!(matches!(err, Error::BadSignature), "{err:?}");
}

#[test]
fn tampered_claims_fail_the_signature() {
    let key = SigningKey::generate().unwrap();
    let (token, mut claims) = issue_web(&key);
    claims.tags = BTreeMap::from([("kuma.io/service".to_owned(), vec!["db".to_owned()])]);
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&claims).unwrap());
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!("{}.{body}.{}", parts[0], parts[2]);
    let err = verify(&forged, "default", &[key], &never, NOW).unwrap_err();
    assert!(matches!(err, Error::BadSignature), "{err:?}");
}

#[test]
fn unknown_kid() {
    let key = SigningKey::generate().unwrap();
    let other = SigningKey::generate().unwrap();
    let (token, _) = issue_web(&key);
    let err = verify(&token, "default", &[other], &never, NOW).unwrap_err();
    assert!(
        matches!(err, Error::UnknownKid { ref kid } if *kid == key.kid),
        "{err:?}"
    );
}

#[test]
fn revoked() {
    let key = SigningKey::generate().unwrap();
    let (token, claims) = issue_web(&key);
    let jti = claims.jti.clone();
    let is_revoked = move |j: &str| j == jti;
    let err = verify(&token, "default", &[key], &is_revoked, NOW).unwrap_err();
    assert!(
        matches!(err, Error::Revoked { ref jti } if *jti == claims.jti),
        "{err:?}"
    );
}

#[test]
fn malformed() {
    let key = SigningKey::generate().unwrap();
    for bad in ["", "abc", "a.b.c", "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"] {
        let err = verify(bad, "default", std::slice::from_ref(&key), &never, NOW).unwrap_err();
        assert!(matches!(err, Error::Malformed(_)), "{bad}: {err:?}");
    }
    // An HS256 token is refused whatever its signature.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.kid.clone());
    let hs = jsonwebtoken::encode(
        &header,
        &issue_web(&key).1,
        &EncodingKey::from_secret(b"secret"),
    )
    .unwrap();
    let err = verify(&hs, "default", &[key], &never, NOW).unwrap_err();
    assert!(matches!(err, Error::Malformed(_)), "{err:?}");
}

#[test]
fn key_rotation_keeps_old_tokens_valid_while_the_old_key_is_kept() {
    let old = SigningKey::generate().unwrap();
    let new = SigningKey::generate().unwrap();
    let (old_token, _) = issue_web(&old);
    let (new_token, _) = issue_web(&new);
    let both = [new.clone(), old.clone()];
    verify(&old_token, "default", &both, &never, NOW).unwrap();
    verify(&new_token, "default", &both, &never, NOW).unwrap();
    let err = verify(&old_token, "default", &[new], &never, NOW).unwrap_err();
    assert!(matches!(err, Error::UnknownKid { .. }), "{err:?}");
}

#[test]
fn validity_is_bounded() {
    let key = SigningKey::generate().unwrap();
    for bad in [Duration::ZERO, MAX_VALIDITY + Duration::from_secs(1)] {
        let err = issue(&key, "default", None, web_tags(), bad, NOW).unwrap_err();
        assert!(matches!(err, Error::Validity { .. }), "{err:?}");
    }
    issue(&key, "default", None, web_tags(), MAX_VALIDITY, NOW).unwrap();
}

#[test]
fn allowed_services_reads_both_tag_keys() {
    let claims = Claims {
        jti: "j".to_owned(),
        mesh: "m".to_owned(),
        name: None,
        tags: BTreeMap::from([
            ("kuma.io/service".to_owned(), vec!["web".to_owned()]),
            ("weft.io/service".to_owned(), vec!["api".to_owned()]),
            ("version".to_owned(), vec!["v1".to_owned()]),
        ]),
        iat: 0,
        exp: 1,
    };
    assert_eq!(
        claims.allowed_services(),
        BTreeSet::from(["api".to_owned(), "web".to_owned()])
    );
    let none = Claims {
        tags: BTreeMap::new(),
        ..claims
    };
    assert!(none.allowed_services().is_empty());
}
