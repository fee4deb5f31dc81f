use std::os::unix::fs::PermissionsExt as _;

use super::fake::FakeCertifier;
use super::*;
use crate::test_util::TestCa;

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn renewal_is_at_two_thirds_with_bounded_jitter() {
    let (nb, na) = (1_000_000, 1_000_000 + 86_400);
    assert_eq!(renewal_at(nb, na, 0.0), nb + 57_600);
    assert_eq!(renewal_at(nb, na, -1.0), nb + 53_280, "2/3 - 5%");
    assert_eq!(renewal_at(nb, na, 1.0), nb + 61_920, "2/3 + 5%");
    assert_eq!(renewal_at(nb, na, 7.0), nb + 61_920, "jitter is clamped");
    for _ in 0..100 {
        let at = renewal_at(nb, na, fastrand::f64() * 2.0 - 1.0);
        assert!((nb + 53_280..=nb + 61_920).contains(&at), "{at}");
    }
    assert_eq!(renewal_at(nb, nb, 0.0), nb, "zero lifetime: renew at once");
}

#[test]
fn reuse_decision_checks_expiry_and_ids() {
    let ca = TestCa::new("root");
    let key = crate::identity::generate_key().unwrap();
    let want = ids(&["spiffe://default/api", "spiffe://default/web"]);
    let now = 1_700_000_000;
    let valid = ca.leaf(&key, &want, now - 100, now + 3600);
    match reuse_decision(&valid, &want, now) {
        Reuse::Use(info) => {
            assert_eq!(info.spiffe_ids, want);
            assert_eq!(info.not_after, now + 3600);
        }
        other => panic!("{other:?}"),
    }
    let expired = ca.leaf(&key, &want, now - 3600, now - 1);
    assert!(matches!(
        reuse_decision(&expired, &want, now),
        Reuse::Expired { .. }
    ));
    let expiring = ca.leaf(&key, &want, now - 3600, now + 10);
    assert!(
        matches!(reuse_decision(&expiring, &want, now), Reuse::Expired { .. }),
        "within the 30s margin"
    );
    let other = ca.leaf(&key, &ids(&["spiffe://default/web"]), now - 1, now + 3600);
    assert!(matches!(
        reuse_decision(&other, &want, now),
        Reuse::WrongIds { ref have, .. } if have == &ids(&["spiffe://default/web"])
    ));
    assert!(matches!(
        reuse_decision("junk", &want, now),
        Reuse::Unusable(_)
    ));
}

#[test]
fn signed_by_tells_the_issuing_root() {
    let ca = TestCa::new("old");
    let next = TestCa::new("new");
    let key = crate::identity::generate_key().unwrap();
    let leaf = ca.leaf(
        &key,
        &ids(&["spiffe://default/web"]),
        0,
        i64::from(i32::MAX),
    );
    assert!(signed_by(&leaf, &ca.cert_pem));
    assert!(!signed_by(&leaf, &next.cert_pem));
    assert!(!signed_by("junk", &ca.cert_pem));
}

struct Rig {
    dir: tempfile::TempDir,
    fake: Arc<FakeCertifier>,
    manager: Manager<Arc<FakeCertifier>>,
    creds: watch::Receiver<Option<Arc<Credentials>>>,
    metrics: Arc<Metrics>,
}

fn rig(token: Option<&str>, existing: Option<Credentials>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let token_file = token.map(|t| {
        let p = dir.path().join("token");
        std::fs::write(&p, format!("  {t}\n")).unwrap();
        p
    });
    let key_pem = crate::identity::load_or_create_key(dir.path()).unwrap();
    let dataplane = Arc::new(
        Dataplane::parse(
            "name: web-1\nnetworking:\n  address: 10.0.0.1\n  inbound:\n    - port: 15000\n      tags: {kuma.io/service: web}\n"
                .into(),
        )
        .unwrap(),
    );
    let fake = Arc::new(FakeCertifier::new("T0K3N", 3600));
    let (creds_tx, creds) = watch::channel(existing.map(Arc::new));
    let metrics = Arc::new(Metrics::new());
    let manager = Manager::new(
        fake.clone(),
        dataplane,
        Settings {
            state_dir: dir.path().to_owned(),
            token_file,
            key_pem,
            max_backoff: Duration::from_secs(1),
        },
        creds_tx,
        watch::channel(false).0,
        metrics.clone(),
    );
    Rig {
        dir,
        fake,
        manager,
        creds,
        metrics,
    }
}

#[tokio::test]
async fn first_join_uses_the_token_then_renewal_uses_the_cert() {
    let r = rig(Some("T0K3N"), None);
    let first = r.manager.certify_once().await.unwrap();
    assert_eq!(first.spiffe_ids, ids(&["spiffe://default/web"]));
    assert_eq!(r.creds.borrow().as_ref(), Some(&first));
    let calls = r.fake.calls();
    assert_eq!(calls.len(), 1);
    assert!(!calls[0].with_cert);
    assert!(
        matches!(&calls[0].request.auth, Some(v1::certify_request::Auth::Token(t)) if t == "T0K3N"),
        "the token is sent trimmed"
    );
    assert_eq!(calls[0].request.dataplane_name, "web-1");
    assert_eq!(calls[0].request.mesh, "default");
    assert!(calls[0].request.dataplane_yaml.contains("web-1"));
    assert_eq!(
        r.metrics.cert_renewals.get(),
        0,
        "a first join is not a renewal"
    );

    let cert = r.dir.path().join(CERT_FILE);
    assert_eq!(
        std::fs::read_to_string(&cert).unwrap(),
        first.cert_chain_pem
    );
    assert_eq!(
        std::fs::metadata(&cert).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        std::fs::read_to_string(r.dir.path().join(BUNDLE_FILE))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );

    // Renewal: the certificate authenticates, no token.
    std::fs::remove_file(r.dir.path().join("token")).unwrap();
    r.manager.certify_once().await.unwrap();
    let calls = r.fake.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls[1].with_cert && calls[1].request.auth.is_none());
    assert_eq!(r.metrics.cert_renewals.get(), 1);
    assert_eq!(
        r.metrics.cert_expiry.get(),
        r.creds.borrow().as_ref().unwrap().not_after
    );
}

#[tokio::test]
async fn refused_cert_falls_back_to_the_token_once() {
    let r = rig(Some("T0K3N"), None);
    r.manager.certify_once().await.unwrap();
    *r.fake.refuse_certs.lock().unwrap() = Some(tonic::Code::PermissionDenied);
    r.manager.certify_once().await.unwrap();
    let with: Vec<bool> = r.fake.calls().iter().map(|c| c.with_cert).collect();
    assert_eq!(with, vec![false, true, false]);

    // Unavailable is not a reason to spend the token.
    *r.fake.refuse_certs.lock().unwrap() = Some(tonic::Code::Unavailable);
    let err = r.manager.certify_once().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Rejected {
                code: tonic::Code::Unavailable,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(r.fake.calls().len(), 4);
}

#[tokio::test]
async fn no_token_and_bad_token_are_errors() {
    let r = rig(None, None);
    assert!(matches!(
        r.manager.certify_once().await,
        Err(Error::NoToken)
    ));
    let r = rig(Some("wrong"), None);
    let err = r.manager.certify_once().await.unwrap_err();
    assert!(
        matches!(err, Error::Rejected { code: tonic::Code::Unauthenticated, ref message } if message.contains("token")),
        "{err}"
    );
    assert!(r.creds.borrow().is_none());
}

#[test]
fn existing_cert_is_reused_only_when_valid_for_the_ids() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("root");
    let key = crate::identity::generate_key().unwrap();
    let want = ids(&["spiffe://default/web"]);
    let now = crate::test_util::now_unix();
    assert!(
        load_existing(dir.path(), &key, &want, now).is_none(),
        "no file"
    );
    std::fs::write(
        dir.path().join(CERT_FILE),
        ca.leaf(&key, &want, now - 10, now + 600),
    )
    .unwrap();
    std::fs::write(dir.path().join(BUNDLE_FILE), &ca.cert_pem).unwrap();
    let c = load_existing(dir.path(), &key, &want, now).unwrap();
    assert_eq!(c.trust_bundle_pem, ca.cert_pem);
    assert_eq!(c.key_pem, key);
    assert!(
        !format!("{c:?}").contains("PRIVATE KEY"),
        "Debug never shows the key"
    );
    assert!(load_existing(dir.path(), &key, &ids(&["spiffe://default/api"]), now).is_none());
    assert!(load_existing(dir.path(), &key, &want, now + 600).is_none());
}

#[tokio::test]
async fn signing_ca_change_triggers_one_renewal_and_bundle_changes_are_written() {
    let r = rig(Some("T0K3N"), None);
    r.manager.certify_once().await.unwrap();
    let current_ca = r.fake.ca.lock().unwrap().cert_pem.clone();
    let new_ca = TestCa::new("rotated");
    let applied = |signing: &str, bundle: &str| Applied {
        version: "1".into(),
        config: crate::model::DataplaneConfig {
            mesh: "default".into(),
            dataplane_name: "web-1".into(),
            mtls_mode: crate::model::MtlsMode::Strict,
            transport: Default::default(),
            trust_bundle_pem: bundle.into(),
            signing_ca_pem: signing.into(),
            inbounds: vec![],
            outbounds: vec![],
            policies: Default::default(),
        },
    };
    let mut rotated = None;
    assert!(
        !r.manager
            .on_config(&applied(&current_ca, &current_ca), &mut rotated)
    );
    let both = format!("{current_ca}{}", new_ca.cert_pem);
    assert!(
        r.manager
            .on_config(&applied(&new_ca.cert_pem, &both), &mut rotated)
    );
    assert_eq!(r.creds.borrow().as_ref().unwrap().trust_bundle_pem, both);
    assert_eq!(
        std::fs::read_to_string(r.dir.path().join(BUNDLE_FILE)).unwrap(),
        both
    );
    assert!(
        !r.manager
            .on_config(&applied(&new_ca.cert_pem, &both), &mut rotated),
        "only once per signing CA"
    );
}

#[tokio::test]
async fn run_certifies_at_once_and_signals_the_attempt() {
    let r = rig(Some("T0K3N"), None);
    let Rig {
        manager,
        mut creds,
        fake,
        ..
    } = r;
    let (_config_tx, config_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (renew_tx, renew_rx) = watch::channel(0u64);
    let task = tokio::spawn(manager.run(config_rx, renew_rx, stop_rx));
    let got = tokio::time::timeout(Duration::from_secs(10), creds.wait_for(Option::is_some))
        .await
        .expect("certified in time")
        .unwrap()
        .clone();
    assert!(got.is_some());
    assert_eq!(fake.calls().len(), 1);
    // SIGHUP's renewal: a second Certify at once, with the certificate.
    renew_tx.send_replace(1);
    crate::test_util::eventually("a renewal on request", Duration::from_secs(5), || {
        let n = fake.calls().len();
        async move { (n == 2).then_some(()) }
    })
    .await;
    assert!(fake.calls()[1].with_cert, "{:?}", fake.calls());
    stop_tx.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops on shutdown")
        .unwrap();
}
