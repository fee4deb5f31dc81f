//! End to end: dataplane identity with the real `weft-cp`, `weft-dp` and `weftctl` binaries on
//! 127.0.0.1. A dataplane joins with a token, gets a certificate for its own key (which never
//! leaves its state directory), follows policy changes, survives its control plane crashing,
//! rejoins with its certificate after the token expired, is cut off at once when its token is
//! revoked or its Dataplane deleted, and follows a CA rotation.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;
use weft_dp::identity::manager::{Certifier as _, Credentials, GrpcCertifier, leaf_info};
use weft_e2e::{Cp, Dp, DpSpec, ok, wait_for};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

/// The Dataplane file, a template: `--dataplane-var name=…` names it.
const DATAPLANE: &str = "type: Dataplane
mesh: default
name: {{ name }}
networking:
  address: 127.0.0.1
  inbound:
  - port: 20001
    servicePort: 8080
    tags:
      kuma.io/service: web
";

const ALLOW_ALL: &str = "type: MeshTrafficPermission
mesh: default
name: allow-all
spec:
  targetRef:
    kind: Mesh
  from:
  - targetRef:
      kind: Mesh
    default:
      action: Allow
";

/// The default mesh with a second builtin CA that takes over; `ca-1` stays trusted.
const ROTATED_MESH: &str = "type: Mesh
name: default
mtls:
  enabledBackend: ca-2
  backends:
  - name: ca-1
    type: builtin
    mode: STRICT
  - name: ca-2
    type: builtin
    mode: STRICT
    dpCert:
      rotation:
        expiration: 1h
";

const SPIFFE_WEB: &str = "spiffe://default/web";

/// `weftctl generate dataplane-token` for dataplane `name` as service `web`.
fn token(cp: &Cp, name: &str, valid_for: &str) -> String {
    let out = ok(&cp.weftctl(&[
        "generate",
        "dataplane-token",
        "--mesh",
        "default",
        "--name",
        name,
        "--tag",
        "kuma.io/service=web",
        "--valid-for",
        valid_for,
    ]));
    let t = out.trim().to_owned();
    assert_eq!(t.split('.').count(), 3, "a JWT on stdout: {out:?}");
    t
}

/// The `exp` claim of a JWT, Unix seconds.
fn token_expiry(jwt: &str) -> i64 {
    let payload = jwt.split('.').nth(1).expect("JWT payload");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    let v: Value = serde_json::from_slice(&json).expect("JSON claims");
    v["exp"].as_i64().expect("exp claim")
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// `weftctl apply -f FILE` with `yaml`; returns when weftctl has.
fn apply(cp: &Cp, dir: &Path, file: &str, yaml: &str) {
    let f = dir.join(file);
    std::fs::write(&f, yaml).unwrap();
    ok(&cp.weftctl(&["apply", "-f", f.to_str().unwrap()]));
}

/// A dataplane `name` of `cp` in `dir/name`, joined with a fresh token and ready.
fn join(cp: &Cp, dir: &Path, name: &str) -> (Dp, String) {
    let t = token(cp, name, "1h");
    let spec = DpSpec::new(cp, &dir.join(name), DATAPLANE, Some(&t))
        .unwrap()
        .var("name", name);
    let mut dp = Dp::start(spec).unwrap();
    dp.wait_ready(Duration::from_secs(15)).unwrap();
    wait_online(cp, name, Duration::from_secs(5));
    (dp, t)
}

/// The dataplane's insight, or `Value::Null` when the CP lists no such dataplane.
fn insight(cp: &Cp, name: &str) -> Value {
    cp.insight("default", name).unwrap().unwrap_or(Value::Null)
}

fn wait_online(cp: &Cp, name: &str, timeout: Duration) -> Value {
    wait_for(&format!("{name} Online"), timeout, || {
        let i = insight(cp, name);
        (i["status"] == "Online").then_some(i)
    })
    .unwrap_or_else(|e| panic!("{e}\nCP log:\n{}", cp.log()))
}

/// The certificates of a PEM bundle.
fn pems(text: &str) -> Vec<Pem> {
    Pem::iter_from_buffer(text.as_bytes())
        .map(|p| p.expect("well-formed PEM"))
        .collect()
}

/// Whether the first certificate of `leaf_pem` carries a signature by the first certificate
/// of `ca_pem`.
fn signed_by(leaf_pem: &str, ca_pem: &str) -> bool {
    let (leaf, ca) = (pems(leaf_pem), pems(ca_pem));
    let leaf = leaf[0].parse_x509().expect("leaf parses");
    let ca = ca[0].parse_x509().expect("CA parses");
    leaf.verify_signature(Some(ca.public_key())).is_ok()
}

/// The URI SANs of the first certificate of `pem`.
fn uri_sans(pem: &str) -> Vec<String> {
    let p = pems(pem);
    let cert = p[0].parse_x509().expect("certificate parses");
    cert.subject_alternative_name()
        .expect("well-formed SAN")
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

fn first_cert_der(pem: &str) -> Vec<u8> {
    pems(pem)[0].contents.clone()
}

/// The base64 lines of a PEM key, without the armor.
fn key_lines(key_pem: &str) -> Vec<&str> {
    key_pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect()
}

fn key_der(key_pem: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(key_lines(key_pem).concat())
        .expect("base64 key body")
}

/// Strings and byte patterns that would betray `key_pem` if found somewhere: the base64 body
/// (whole, and each full line), a 40-character piece of it, the DER, and the raw private
/// scalar (raw and hex).
fn key_fingerprints(key_pem: &str) -> Vec<(String, Vec<u8>)> {
    let lines = key_lines(key_pem);
    let body = lines.concat();
    assert!(body.len() > 100, "a key body: {key_pem}");
    let der = key_der(key_pem);
    // PKCS#8 EC key: ... ECPrivateKey { version 1 (02 01 01), privateKey OCTET STRING (04 20) }.
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("an EC private key in the PKCS#8 DER");
    let scalar = der[at + 5..at + 5 + 32].to_vec();
    let hex: String = scalar.iter().map(|b| format!("{b:02x}")).collect();
    let mut v = vec![
        ("key body".to_owned(), body.as_bytes().to_vec()),
        (
            "40 chars of the key".to_owned(),
            body.as_bytes()[20..60].to_vec(),
        ),
        ("key DER".to_owned(), der.clone()),
        ("private scalar".to_owned(), scalar),
        ("private scalar, hex".to_owned(), hex.as_bytes().to_vec()),
        (
            "private scalar, HEX".to_owned(),
            hex.to_uppercase().into_bytes(),
        ),
    ];
    for (i, l) in lines.iter().enumerate().filter(|(_, l)| l.len() >= 40) {
        v.push((format!("key line {i}"), l.as_bytes().to_vec()));
    }
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p, bytes));
            }
        }
    }
    out
}

/// Lines of `log` that contain every one of `words`.
fn log_lines<'a>(log: &'a str, words: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .collect()
}

/// A `Certify` presenting the dataplane's own certificate, as its renewal does.
fn renew_with_certificate(cp: &Cp, dp: &Dp) -> Result<(), tonic::Status> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let chain = dp.state_file("cert.pem").unwrap();
    let key = dp.state_file("key.pem").unwrap();
    let info = leaf_info(&chain).unwrap();
    let creds = Credentials {
        cert_chain_pem: chain,
        key_pem: key.clone(),
        trust_bundle_pem: dp.state_file("bundle.pem").unwrap(),
        not_before: info.not_before,
        not_after: info.not_after,
        spiffe_ids: info.spiffe_ids,
    };
    let endpoint = weft_dp::cp::CpEndpoint::new(
        &cp.dp_server_url(),
        std::fs::read_to_string(cp.ca_cert_file()).unwrap(),
    )
    .unwrap();
    let request = weft_api::v1::CertifyRequest {
        mesh: "default".into(),
        dataplane_name: "web-1".into(),
        csr_pem: weft_dp::identity::csr(&key, &[SPIFFE_WEB.to_owned()]).unwrap(),
        auth: None,
        dataplane_yaml: String::new(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(GrpcCertifier::new(endpoint).certify(request, Some(Arc::new(creds))))
        .map(|r| assert!(uri_sans(&r.cert_chain_pem).contains(&SPIFFE_WEB.to_owned())))
}

/// 1. A dataplane joins with a token: its certificate names `spiffe://default/web` and chains
///    to the mesh CA, its key is 0600 and stays on the VM.
#[test]
fn joins_with_token_and_its_key_never_reaches_the_cp() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = Cp::start(&tmp.path().join("cp")).unwrap();
    let (mut dp, _) = join(&cp, tmp.path(), "web-1");

    let cert = dp.state_file("cert.pem").unwrap();
    let bundle = dp.state_file("bundle.pem").unwrap();
    let key = dp.state_file("key.pem").unwrap();
    let mode = std::fs::metadata(dp.spec.state_dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "key.pem mode {mode:o}");
    assert_eq!(uri_sans(&cert), vec![SPIFFE_WEB.to_owned()]);
    assert!(
        signed_by(&cert, &bundle),
        "leaf chains to bundle.pem's root"
    );
    let config = dp.config().unwrap();
    let trust = config["config"]["trustBundlePem"].as_str().unwrap();
    assert!(signed_by(&cert, trust), "leaf chains to the served bundle");
    assert_eq!(first_cert_der(trust), first_cert_der(&bundle));
    // The check can fail: the CP's serving CA did not sign the leaf.
    let serving_ca = std::fs::read_to_string(cp.ca_cert_file()).unwrap();
    assert!(!signed_by(&cert, &serving_ca));
    assert_eq!(config["config"]["dataplaneName"], "web-1");
    assert_eq!(config["config"]["mtlsMode"], "STRICT");

    let table = ok(&cp.weftctl(&["inspect", "dataplanes"]));
    assert!(
        table
            .lines()
            .any(|l| l.contains("web-1") && l.contains("Online")),
        "{table}"
    );
    let i = insight(&cp, "web-1");
    assert_eq!(i["certsIssued"], 1, "{i}");
    assert!(i["certExpiry"].is_string(), "{i}");

    // Everything the CP says about the dataplane, in every form it says it.
    let mut answers = vec![
        table,
        ok(&cp.weftctl(&["get", "dataplanes", "-o", "json"])),
        ok(&cp.weftctl(&["get", "dataplane", "web-1", "-o", "yaml"])),
        ok(&cp.weftctl(&["inspect", "meshes"])),
        ok(&cp.weftctl(&["get", "mesh", "default", "-o", "json"])),
    ];
    for path in [
        "/meshes/default/dataplanes/_overview",
        "/dataplanes/_overview",
        "/meshes/default/dataplanes",
        "/meshes/default/dataplanes/web-1",
        "/meshes/default",
        "/mesh-insights",
    ] {
        answers.push(cp.get_json(path).unwrap().to_string());
    }
    answers.push(
        weft_e2e::client()
            .get(format!("http://{}/metrics", cp.diagnostics))
            .send()
            .unwrap()
            .text()
            .unwrap(),
    );
    assert!(answers[5].contains("certExpiry"), "{}", answers[5]);
    let marks = key_fingerprints(&key);
    // The search can fail: each mark is found in the key itself (PEM or DER).
    let der = key_der(&key);
    for (what, m) in &marks {
        let hex: String = der.iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            contains(key.replace('\n', "").as_bytes(), m)
                || contains(&der, m)
                || contains(hex.as_bytes(), m)
                || contains(hex.to_uppercase().as_bytes(), m),
            "{what} is a mark of the key"
        );
    }
    for a in &answers {
        for (what, m) in &marks {
            assert!(!contains(a.as_bytes(), m), "{what} in a CP answer: {a}");
        }
    }

    // The store, once the CP has stopped and sled flushed.
    dp.stop().unwrap();
    cp.stop().unwrap();
    let files = files_under(&cp.data_dir);
    assert!(
        files.iter().any(|(_, b)| contains(b, b"web-1")),
        "the scan sees the store's contents (the Dataplane web-1 is in it)"
    );
    let tls = cp.data_dir.with_extension("tls");
    let log = cp.log();
    let everything = files
        .into_iter()
        .chain(files_under(&tls))
        .chain([(cp.data_dir.with_extension("log"), log.into_bytes())]);
    for (path, bytes) in everything {
        for (what, m) in &marks {
            assert!(
                !contains(&bytes, m),
                "{what} of the dataplane's key found in {}",
                path.display()
            );
        }
    }
}

/// 2. A policy change reaches the dataplane's `/config` within 1 s of `weftctl apply`.
#[test]
fn policy_change_reaches_the_dataplane_within_a_second() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = Cp::start(&tmp.path().join("cp")).unwrap();
    let (dp, _) = join(&cp, tmp.path(), "web-1");
    let before = dp.config().unwrap();
    assert_eq!(
        before["config"]["inbounds"][0]["rules"],
        Value::Array(vec![])
    );

    apply(&cp, tmp.path(), "allow.yaml", ALLOW_ALL);
    let applied = Instant::now();
    let after = wait_for(
        "the MeshTrafficPermission in /config",
        Duration::from_secs(1),
        || {
            let c = dp.config().ok()?;
            (c["version"] != before["version"]).then_some(c)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\ndp log:\n{}", dp.log()));
    let took = applied.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let rules = after["config"]["inbounds"][0]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{after}");
    assert_eq!(rules[0]["action"], "Allow", "{after}");
    let version = after["version"].as_str().unwrap().to_owned();
    wait_for("the CP to see the ACK", Duration::from_secs(2), || {
        (insight(&cp, "web-1")["config"]["acked"] == version.as_str()).then_some(())
    })
    .unwrap();
}

/// 3. The CP is killed: the dataplane keeps serving its config; the CP returns: the dataplane
///    is back in sync within 5 s and follows new changes.
#[test]
fn dataplane_outlives_a_cp_crash_and_resyncs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = Cp::start(&tmp.path().join("cp")).unwrap();
    let (dp, _) = join(&cp, tmp.path(), "web-1");
    let version = dp.config_version().unwrap();
    let connected_since = insight(&cp, "web-1")["connectedSince"].clone();

    cp.kill9();
    // While it retries (twice, noticed from its metrics), it serves the same config, ready.
    wait_for(
        "the dataplane to retry the CP twice",
        Duration::from_secs(10),
        || {
            assert!(dp.ready(), "ready while the CP is down");
            assert_eq!(dp.config_version().as_deref(), Some(version.as_str()));
            let connected = dp.metric("weft_dp_cp_connected")?;
            let retries = dp.metric("weft_dp_cp_reconnects_total")?;
            (connected == 0.0 && retries >= 2.0).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\ndp log:\n{}", dp.log()));
    assert!(dp.ready());
    assert_eq!(dp.config_version().as_deref(), Some(version.as_str()));

    cp.restart().unwrap();
    let back = Instant::now();
    wait_for("the dataplane back in sync", Duration::from_secs(5), || {
        let i = insight(&cp, "web-1");
        let v = dp.config_version()?;
        (i["status"] == "Online"
            && i["connectedSince"] != connected_since
            && i["config"]["acked"] == v.as_str())
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\ndp log:\n{}\nCP log:\n{}", dp.log(), cp.log()));
    assert!(back.elapsed() < Duration::from_secs(5));

    apply(&cp, tmp.path(), "allow.yaml", ALLOW_ALL);
    let c = wait_for(
        "a change made after the restart",
        Duration::from_secs(2),
        || {
            let c = dp.config().ok()?;
            (c["config"]["inbounds"][0]["rules"][0]["action"] == "Allow").then_some(c)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\ndp log:\n{}", dp.log()));
    assert_ne!(c["version"], version.as_str());
}

/// 4. A dataplane restarted after its token expired rejoins with its certificate; a new one
///    with an expired token is refused.
#[test]
fn restart_after_token_expiry_rejoins_with_the_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = Cp::start(&tmp.path().join("cp")).unwrap();
    let t1 = token(&cp, "web-1", "3s");
    let t2 = token(&cp, "web-2", "3s");
    let spec = DpSpec::new(&cp, &tmp.path().join("web-1"), DATAPLANE, Some(&t1))
        .unwrap()
        .var("name", "web-1");
    let mut dp = Dp::start(spec).unwrap();
    dp.wait_ready(Duration::from_secs(3)).unwrap();
    wait_online(&cp, "web-1", Duration::from_secs(3));
    let cert = dp.state_file("cert.pem").unwrap();
    dp.stop().unwrap();
    wait_for("web-1 Offline", Duration::from_secs(2), || {
        (insight(&cp, "web-1")["status"] == "Offline").then_some(())
    })
    .unwrap();

    let exp = token_expiry(&t1).max(token_expiry(&t2));
    wait_for("the tokens to expire", Duration::from_secs(10), || {
        (now_unix() > exp).then_some(())
    })
    .unwrap();

    dp.restart().unwrap();
    dp.wait_ready(Duration::from_secs(5)).unwrap();
    let i = wait_online(&cp, "web-1", Duration::from_secs(5));
    assert_eq!(i["certsIssued"], 1, "no new certificate was needed: {i}");
    assert_eq!(dp.state_file("cert.pem").unwrap(), cert);
    assert!(dp.config_version().is_some());
    assert!(
        log_lines(&cp.log(), &["refused", "web-1"]).is_empty(),
        "web-1 was never refused:\n{}",
        cp.log()
    );

    // A newcomer with an expired token gets nothing.
    let spec = DpSpec::new(&cp, &tmp.path().join("web-2"), DATAPLANE, Some(&t2))
        .unwrap()
        .var("name", "web-2");
    let fresh = Dp::start(spec).unwrap();
    wait_for(
        "the CP to refuse web-2's expired token",
        Duration::from_secs(5),
        || {
            assert!(!fresh.ready(), "web-2 is not ready");
            let log = cp.log();
            let cert = log_lines(&log, &["refused a certificate", "web-2", "expired"]);
            let stream = log_lines(&log, &["refused a dataplane stream", "web-2", "expired"]);
            (!cert.is_empty() && !stream.is_empty()).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\nCP log:\n{}\nweb-2 log:\n{}", cp.log(), fresh.log()));
    assert!(fresh.log().contains("token expired"), "{}", fresh.log());
    assert!(!fresh.ready());
    assert!(fresh.config().is_err(), "no config for web-2");
    assert!(!fresh.spec.state_dir.join("cert.pem").exists());
    assert_eq!(
        insight(&cp, "web-2"),
        Value::Null,
        "web-2 is not registered"
    );
}

/// 5. Revoking the token closes the stream within 1 s; certificate renewal is refused after.
#[test]
fn revoked_token_closes_the_stream_and_refuses_renewal() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = Cp::start(&tmp.path().join("cp")).unwrap();
    let (dp, t) = join(&cp, tmp.path(), "web-1");
    // Renewal with the certificate works before the revocation.
    renew_with_certificate(&cp, &dp).unwrap();

    ok(&cp.weftctl(&["revoke", "dataplane-token", "--mesh", "default", &t]));
    let revoked = Instant::now();
    wait_for("web-1 Offline", Duration::from_secs(1), || {
        (insight(&cp, "web-1")["status"] == "Offline").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nCP log:\n{}", cp.log()));
    assert!(revoked.elapsed() < Duration::from_secs(1));
    let closed = "the token dataplane web-1 joined with was revoked";
    let cp_log = cp.log();
    assert!(
        !log_lines(&cp_log, &["closing the dataplane's stream", closed]).is_empty(),
        "{cp_log}"
    );
    wait_for(
        "the dataplane to log the revocation",
        Duration::from_secs(1),
        || dp.log().contains(closed).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\ndp log:\n{}", dp.log()));

    let refused = renew_with_certificate(&cp, &dp).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    // Its own reconnections with the certificate are refused too, and it stays Offline.
    wait_for("a refused reconnection", Duration::from_secs(5), || {
        let log = cp.log();
        let lines = log_lines(&log, &["refused a dataplane stream", "web-1", "revoked"]);
        (!lines.is_empty()).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nCP log:\n{}", cp.log()));
    assert_eq!(insight(&cp, "web-1")["status"], "Offline");
    assert_eq!(dp.metric("weft_dp_cp_connected"), Some(0.0));
}

/// 6. Deleting the Dataplane closes its stream within 1 s, and it cannot re-register itself.
#[test]
fn deleted_dataplane_is_disconnected() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = Cp::start(&tmp.path().join("cp")).unwrap();
    let (dp, _) = join(&cp, tmp.path(), "web-1");
    assert_eq!(dp.metric("weft_dp_cp_connected"), Some(1.0));

    ok(&cp.weftctl(&["delete", "dataplane", "web-1", "--mesh", "default"]));
    let deleted = Instant::now();
    let closed = "dataplane web-1 of mesh default was deleted";
    wait_for("the stream to close", Duration::from_secs(1), || {
        let log = cp.log();
        let closing = log_lines(&log, &["closing the dataplane's stream", closed]);
        (dp.metric("weft_dp_cp_connected") == Some(0.0) && !closing.is_empty()).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nCP log:\n{}\ndp log:\n{}", cp.log(), dp.log()));
    assert!(deleted.elapsed() < Duration::from_secs(1));
    assert!(dp.log().contains(closed), "{}", dp.log());

    // It tries again with its certificate, is refused, and does not come back.
    wait_for("a refused reconnection", Duration::from_secs(5), || {
        let log = cp.log();
        let lines = log_lines(&log, &["refused a dataplane stream", "web-1", "deleted"]);
        (!lines.is_empty()).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nCP log:\n{}", cp.log()));
    assert!(
        !cp.weftctl(&["get", "dataplane", "web-1"]).status.success(),
        "web-1 stays deleted"
    );
    assert_eq!(insight(&cp, "web-1"), Value::Null);
    assert!(dp.ready(), "it keeps serving its last config");
}

/// 7. CA rotation: the bundle first carries both roots, then the leaf comes from the new CA.
#[test]
fn ca_rotation_bundles_both_roots_then_reissues_the_leaf() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = Cp::start(&tmp.path().join("cp")).unwrap();
    let (dp, _) = join(&cp, tmp.path(), "web-1");
    let old_cert = dp.state_file("cert.pem").unwrap();
    let old_root = dp.config().unwrap()["config"]["trustBundlePem"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(pems(&old_root).len(), 1);

    apply(&cp, tmp.path(), "rotate.yaml", ROTATED_MESH);
    let config = wait_for("both roots in /config", Duration::from_secs(5), || {
        let c = dp.config().ok()?;
        let b = c["config"]["trustBundlePem"].as_str()?;
        (pems(b).len() == 2).then_some(c)
    })
    .unwrap_or_else(|e| panic!("{e}\ndp log:\n{}", dp.log()));
    let bundle = config["config"]["trustBundlePem"].as_str().unwrap();
    let roots = pems(bundle);
    let new_root = first_cert_der(bundle);
    assert_ne!(new_root, first_cert_der(&old_root), "ca-2 signs now");
    assert_eq!(
        roots[1].contents,
        first_cert_der(&old_root),
        "ca-1 still trusted"
    );
    assert_eq!(
        first_cert_der(config["config"]["signingCaPem"].as_str().unwrap()),
        new_root
    );

    let cert = wait_for(
        "a leaf signed by the new CA",
        Duration::from_secs(10),
        || {
            let c = dp.state_file("cert.pem").ok()?;
            (c != old_cert && signed_by(&c, bundle)).then_some(c)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\ndp log:\n{}", dp.log()));
    assert!(!signed_by(&cert, &old_root), "not by the old CA");
    assert_eq!(uri_sans(&cert), vec![SPIFFE_WEB.to_owned()]);
    let info = leaf_info(&cert).unwrap();
    let lifetime = info.not_after - info.not_before;
    assert!(
        lifetime <= 3700,
        "ca-2's dpCert expiration (1h): {lifetime}s"
    );
    assert_eq!(pems(&dp.state_file("bundle.pem").unwrap()).len(), 2);
    assert!(dp.ready());
    let i = wait_for("the renewal in the insight", Duration::from_secs(5), || {
        let i = insight(&cp, "web-1");
        (i["certsIssued"] == 2 && i["certRenewals"] == 1).then_some(i)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", insight(&cp, "web-1")));
    assert_eq!(i["status"], "Online");
}

/// 8. `weft-dp validate` and `run` refuse a bad Dataplane file or CA file with 64, naming it.
#[test]
fn bad_dataplane_or_ca_file_exits_64() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    let dataplane_file = dir.join("dataplane.yaml");
    std::fs::write(&dataplane_file, DATAPLANE).unwrap();
    let good = DpSpec {
        cp_address: "https://127.0.0.1:1".into(),
        ca_cert_file: ca_file.clone(),
        dataplane_file: dataplane_file.clone(),
        token_file: None,
        state_dir: dir.join("state"),
        vars: vec![("name".into(), "web-7".into())],
        log_file: dir.join("dp.log"),
    };
    let out = good.validate();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("default/web-7"),
        "{out:?}"
    );

    let run = |spec: &DpSpec| {
        std::process::Command::new(weft_e2e::bin("weft-dp"))
            .arg("run")
            .args(spec.args())
            .output()
            .unwrap()
    };
    let refused = |spec: &DpSpec, names: &[&str]| {
        for (cmd, out) in [("validate", spec.validate()), ("run", run(spec))] {
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{cmd}: {out:?}");
            for n in names {
                assert!(err.contains(n), "{cmd}: {n:?} in {err}");
            }
        }
        assert!(
            !spec.state_dir.join("admin-address").exists(),
            "nothing was bound"
        );
    };

    // No --dataplane-var for the template's variable.
    let mut s = good.clone();
    s.vars.clear();
    refused(
        &s,
        &["undefined variable \"name\"", "--dataplane-var name="],
    );

    // A Dataplane with a port out of range.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, DATAPLANE.replace("20001", "70000")).unwrap();
    let mut s = good.clone();
    s.dataplane_file = bad.clone();
    refused(&s, &[bad.to_str().unwrap(), "networking.inbound[0].port"]);

    // A Dataplane file that does not exist.
    let mut s = good.clone();
    s.dataplane_file = dir.join("missing.yaml");
    refused(&s, &["missing.yaml"]);

    // A CA file that does not exist.
    let mut s = good.clone();
    s.ca_cert_file = dir.join("no-ca.pem");
    refused(&s, &["--ca-cert-file", "no-ca.pem"]);

    // A CA file with no certificate in it.
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let mut s = good.clone();
    s.ca_cert_file = junk;
    refused(&s, &["--ca-cert-file", "junk.pem"]);
}
