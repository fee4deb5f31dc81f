use std::{fs, os::unix::fs::PermissionsExt as _};

use x509_parser::{
    certification_request::X509CertificationRequest, extensions::GeneralName,
    extensions::ParsedExtension, pem::parse_x509_pem, prelude::FromDer as _,
};

use super::*;

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn key_file_is_0600() {
    let dir = tempfile::tempdir().unwrap();
    let key = load_or_create_key(dir.path()).unwrap();
    assert!(key.contains("BEGIN PRIVATE KEY"));
    assert_eq!(mode(&dir.path().join(KEY_FILE)), 0o600);

    let other = dir.path().join("other.pem");
    write_private(&other, "secret").unwrap();
    assert_eq!(mode(&other), 0o600);
    assert_eq!(fs::read_to_string(&other).unwrap(), "secret");
    // Overwrites atomically, leaving no temp file behind.
    write_private(&other, "secret 2").unwrap();
    assert_eq!(fs::read_to_string(&other).unwrap(), "secret 2");
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn load_or_create_is_stable() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let first = load_or_create_key(&state).unwrap();
    let second = load_or_create_key(&state).unwrap();
    assert_eq!(first, second);
}

#[test]
fn group_readable_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(KEY_FILE);
    fs::write(&path, generate_key().unwrap()).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = load_or_create_key(dir.path()).unwrap_err();
    assert!(
        matches!(err, Error::InsecureKeyFile { ref path, mode: 0o644 } if path.ends_with(KEY_FILE)),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("0644") && msg.contains("key.pem"), "{msg}");
}

#[test]
fn csr_parses_and_carries_the_ids() {
    let key = generate_key().unwrap();
    let ids = vec![
        "spiffe://default/web".to_owned(),
        "spiffe://default/api".to_owned(),
    ];
    let pem = csr(&key, &ids).unwrap();
    let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
    assert_eq!(pem.label, "CERTIFICATE REQUEST");
    let (_, req) = X509CertificationRequest::from_der(&pem.contents).unwrap();
    req.verify_signature().unwrap();
    let uris: Vec<String> = req
        .requested_extensions()
        .into_iter()
        .flatten()
        .filter_map(|e| match e {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .map(|n| match n {
            GeneralName::URI(u) => (*u).to_owned(),
            other => panic!("unexpected SAN {other}"),
        })
        .collect();
    assert_eq!(uris, ids);

    assert!(matches!(csr(&key, &[]), Err(Error::NoSpiffeId)));
    assert!(matches!(csr("nope", &ids), Err(Error::Key(_))));
}
