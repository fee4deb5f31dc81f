use serde_json::json;

use super::*;
use crate::ca::{BuiltinOptions, generate_builtin_root, verify_chain};
use crate::model::{Resource, Spec};
use crate::store::MemoryStore;

fn mesh(doc: serde_json::Value) -> MeshSpec {
    match Resource::from_json(&doc).unwrap().spec {
        Spec::Mesh(m) => m,
        other => panic!("not a mesh: {other:?}"),
    }
}

fn two_backends(enabled: &str) -> MeshSpec {
    mesh(
        json!({"type": "Mesh", "name": "m", "mtls": {"enabledBackend": enabled, "backends": [
            {"name": "ca-1", "type": "builtin"},
            {"name": "ca-2", "type": "builtin", "dpCert": {"rotation": {"expiration": "2h"}}},
        ]}}),
    )
}

fn store_with_mesh() -> MemoryStore {
    let store = MemoryStore::new();
    store
        .put(&ResourceKey::mesh("m"), b"{}".to_vec(), Precondition::None)
        .unwrap();
    store
}

#[test]
fn builtin_root_is_generated_once_and_kept_in_the_store() {
    let store = store_with_mesh();
    let spec = two_backends("ca-1");
    let first = load(&store, "m", &spec).unwrap().unwrap();
    let again = load(&store, "m", &spec).unwrap().unwrap();
    assert_eq!(first.signing.cert_pem(), again.signing.cert_pem());
    assert_eq!(first.signing_backend, "ca-1");
    assert_eq!(first.leaf_lifetime, DEFAULT_LEAF_LIFETIME);
    assert_eq!(first.mode, MtlsMode::Strict);
    assert_eq!(store.list(CA_KIND, Some("m")).unwrap().len(), 2);
}

#[test]
fn rotation_bundle_holds_both_roots_and_the_enabled_one_signs() {
    let store = store_with_mesh();
    let before = load(&store, "m", &two_backends("ca-1")).unwrap().unwrap();
    let after = load(&store, "m", &two_backends("ca-2")).unwrap().unwrap();
    assert_eq!(after.signing_backend, "ca-2");
    assert_ne!(before.signing.cert_pem(), after.signing.cert_pem());
    assert_eq!(after.bundle_pem.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(
        after
            .bundle_pem
            .starts_with(after.signing.cert_pem().trim_end())
    );
    assert_eq!(after.leaf_lifetime, Duration::from_secs(2 * 3600));
    // A leaf of the old root still verifies against the new bundle.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI("spiffe://m/web".try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let allowed = ["web".to_owned()].into();
    let old_leaf = before
        .signing
        .sign_csr(&csr, "m", &allowed, DEFAULT_LEAF_LIFETIME)
        .unwrap();
    verify_chain(&old_leaf.cert_pem, &after.bundle_pem).unwrap();
    // With the old backend removed, it no longer does.
    let only_new = mesh(
        json!({"type": "Mesh", "name": "m", "mtls": {"enabledBackend": "ca-2",
        "backends": [{"name": "ca-2", "type": "builtin"}]}}),
    );
    let done = load(&store, "m", &only_new).unwrap().unwrap();
    assert!(verify_chain(&old_leaf.cert_pem, &done.bundle_pem).is_err());
}

#[test]
fn provided_backend_reads_inline_string_and_refuses_secrets_naming_the_field() {
    let store = store_with_mesh();
    let m = generate_builtin_root("m", "x", &BuiltinOptions::default()).unwrap();
    let spec = mesh(
        json!({"type": "Mesh", "name": "m", "mtls": {"enabledBackend": "p", "backends": [
        {"name": "p", "type": "provided", "mode": "PERMISSIVE",
         "conf": {"cert": {"inlineString": m.cert_pem}, "key": {"inlineString": m.key_pem}}}]}}),
    );
    let cas = load(&store, "m", &spec).unwrap().unwrap();
    assert_eq!(cas.signing.cert_pem(), m.cert_pem);
    assert_eq!(cas.mode, MtlsMode::Permissive);
    assert!(
        store.list(CA_KIND, Some("m")).unwrap().is_empty(),
        "provided keys are not copied"
    );

    let spec = mesh(
        json!({"type": "Mesh", "name": "m", "mtls": {"enabledBackend": "p", "backends": [
        {"name": "p", "type": "provided",
         "conf": {"cert": {"secret": "ca-cert"}, "key": {"inlineString": m.key_pem}}}]}}),
    );
    let e = load(&store, "m", &spec).unwrap_err().to_string();
    assert!(
        e.contains("backend p") && e.contains("conf.cert") && e.contains("secret"),
        "{e}"
    );
}

#[test]
fn no_enabled_backend_means_no_ca() {
    let store = store_with_mesh();
    let spec = mesh(json!({"type": "Mesh", "name": "m"}));
    assert!(load(&store, "m", &spec).unwrap().is_none());
}
