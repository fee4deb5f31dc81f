//! The data path across hosts (network namespaces on a bridge): real `weft-cp`, `weft-dp` and
//! test apps, real clients (`curl`, `openssl s_client`, `tcpdump`) run inside the hosts.
//!
//! Layout: host 1 runs the CP; `web` runs on host 2 with an outbound to `backend` on
//! 127.0.0.1:20001; `backend` instances run on hosts 3 (and 4), their inbound on
//! `10.77.0.1x:10002` in front of an HTTP echo on 127.0.0.1:8080. Scenario i adds a TCP
//! service `echo` on host 3 (inbound 10003 in front of a TCP echo on 127.0.0.1:7070) and
//! web's outbound to it on 127.0.0.1:20003.
//!
//! The scenarios that depend on the transport between dataplanes run on each of them: TLS
//! over TCP, QUIC, and `auto` (the mesh's `networking.transport`).

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use weft_e2e::meshbed::{Dataplane, MeshBed};
use weft_e2e::netns::Proc;
use weft_e2e::wait_for;

const WEB_URL: &str = "http://127.0.0.1:20001";

const ALLOW: &str = "type: MeshTrafficPermission\nmesh: default\nname: web-to-backend\nspec:\n  targetRef:\n    kind: MeshService\n    name: backend\n  from:\n  - targetRef:\n      kind: MeshService\n      name: web\n    default:\n      action: Allow\n";

fn backend_yaml(i: usize) -> String {
    format!(
        "type: Dataplane\nmesh: default\nname: backend-{i}\nnetworking:\n  address: 10.77.0.{}\n  inbound:\n  - port: 10002\n    servicePort: 8080\n    tags:\n      kuma.io/service: backend\n",
        10 + i
    )
}

const WEB_YAML: &str = "type: Dataplane\nmesh: default\nname: web\nnetworking:\n  address: 10.77.0.12\n  inbound:\n  - port: 10001\n    servicePort: 8081\n    tags:\n      kuma.io/service: web\n  outbound:\n  - port: 20001\n    tags:\n      kuma.io/service: backend\n";

/// The TCP service `echo` on host 3: its inbound 10003 in front of a TCP echo on 127.0.0.1:7070.
const ECHO_YAML: &str = "type: Dataplane\nmesh: default\nname: echo\nnetworking:\n  address: 10.77.0.13\n  inbound:\n  - port: 10003\n    servicePort: 7070\n    tags:\n      kuma.io/service: echo\n      kuma.io/protocol: tcp\n";

/// web on host 2 with an outbound to `echo` on 127.0.0.1:20003.
const WEB_TO_ECHO_YAML: &str = "type: Dataplane\nmesh: default\nname: web\nnetworking:\n  address: 10.77.0.12\n  inbound:\n  - port: 10001\n    servicePort: 8081\n    tags:\n      kuma.io/service: web\n  outbound:\n  - port: 20003\n    tags:\n      kuma.io/service: echo\n";

/// The transport between dataplanes, as the mesh's `networking.transport` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum T {
    Tls,
    Pooled,
    Quic,
    Auto,
}

impl T {
    fn word(self) -> &'static str {
        match self {
            T::Tls => "tls",
            T::Pooled => "pooled",
            T::Quic => "quic",
            T::Auto => "auto",
        }
    }

    /// `mesh_yaml` (a Mesh resource) with this transport.
    fn mesh(self, mesh_yaml: &str) -> String {
        format!("{mesh_yaml}networking:\n  transport: {}\n", self.word())
    }
}

/// A QUIC metric of `dp` for one side (`client` or `server`): `name{side="…"}`.
fn quic_metric(dp: &Dataplane, name: &str, side: &str) -> f64 {
    dp.metric(&format!("{name}{{side=\"{side}\"}}"), &[])
}

/// Checks that web's outbound used `t`: QUIC streams for quic and auto (UDP open), pooled
/// streams for pooled, neither for tls.
fn check_transport(web: &Dataplane, t: T) -> Result<()> {
    let quic = web.metric("weft_dp_quic_streams_total", &["outbound"]);
    let pooled = web.metric("weft_dp_pooled_streams_total", &["outbound"]);
    let (want_quic, want_pooled) = match t {
        T::Tls => (false, false),
        T::Pooled => (false, true),
        T::Quic | T::Auto => (true, false),
    };
    ensure!(
        (quic > 0.0) == want_quic && (pooled > 0.0) == want_pooled,
        "{t:?} mesh: {quic} QUIC streams, {pooled} pooled streams"
    );
    Ok(())
}

/// web on host 2, backends on hosts 3.., each behind its dataplane.
struct Shop {
    mesh: MeshBed,
    web: Dataplane,
    backends: Vec<(Dataplane, Proc)>,
    _web_app: Proc,
}

impl Shop {
    fn new(backends: usize, allow: bool, mesh_yaml: Option<&str>, t: T) -> Result<Shop> {
        Self::on(MeshBed::new(2 + backends)?, backends, allow, mesh_yaml, t)
    }

    /// The same on a testbed of `2 + backends` hosts made by the caller.
    fn on(
        mesh: MeshBed,
        backends: usize,
        allow: bool,
        mesh_yaml: Option<&str>,
        t: T,
    ) -> Result<Shop> {
        match (mesh_yaml, t) {
            (Some(y), T::Tls) => mesh.apply("mesh", y)?,
            (Some(y), t) => mesh.apply("mesh", &t.mesh(y))?,
            (None, T::Tls) => {}
            (None, t) => mesh.apply("mesh", &t.mesh(MESH_CA1))?,
        }
        if allow {
            mesh.apply("allow", ALLOW)?;
        }
        let mut list = Vec::new();
        for i in 3..3 + backends {
            let app = mesh.http_echo(i, &format!("backend-{i}"), 8080)?;
            let dp = mesh.start_dp(
                i,
                "default",
                &format!("backend-{i}"),
                "backend",
                &backend_yaml(i),
            )?;
            list.push((dp, app));
        }
        let web_app = mesh.http_echo(2, "web", 8081)?;
        let web = mesh.start_dp(2, "default", "web", "web", WEB_YAML)?;
        // Every backend endpoint healthy in web's config before traffic starts.
        let n = backends;
        wait_for(
            "web's outbound with every backend healthy",
            Duration::from_secs(20),
            || {
                let cfg: serde_json::Value =
                    serde_json::from_str(&web.admin("/config").ok()?).ok()?;
                let eps = cfg["config"]["outbounds"][0]["endpoints"]
                    .as_array()?
                    .clone();
                (eps.len() == n && eps.iter().all(|e| e["healthy"] == true)).then_some(())
            },
        )?;
        Ok(Shop {
            mesh,
            web,
            backends: list,
            _web_app: web_app,
        })
    }

    /// Waits until a request from web to backend succeeds; returns the body.
    fn wait_working(&self, within: Duration) -> Result<String> {
        wait_for("web -> backend to work", within, || {
            let (code, body) = self.mesh.curl(2, &format!("{WEB_URL}/"));
            (code == 0 && body.starts_with("backend-")).then_some(body)
        })
    }
}

#[test]
fn a_web_reaches_backend_across_hosts_over_tls_only() -> Result<()> {
    let shop = Shop::new(1, true, None, T::Tls)?;
    shop.wait_working(Duration::from_secs(10))?;
    let backend = &shop.backends[0].0;

    // Capture the wire on the backend host while a request with a distinctive path passes.
    let h3 = shop.mesh.host(3).clone();
    let pcap = shop.mesh.bed.dir().join("wire.pcap");
    let mut cmd = h3.command("tcpdump");
    cmd.args(["-i", "eth0", "-U", "-n", "-w"])
        .arg(&pcap)
        .args(["tcp", "port", "10002"]);
    let dump = h3.spawn("tcpdump", cmd)?;
    wait_for("tcpdump to listen", Duration::from_secs(10), || {
        dump.log().contains("listening on").then_some(())
    })?;
    let (code, body) = shop
        .mesh
        .curl(2, &format!("{WEB_URL}/very-secret-path-4711"));
    ensure!(code == 0, "request through the mesh failed: {code}");
    assert_eq!(body, "backend-3 GET /very-secret-path-4711\n");
    // Wait for the exchange to reach the capture file, then stop tcpdump.
    wait_for("packets in the capture", Duration::from_secs(5), || {
        (std::fs::metadata(&pcap).ok()?.len() > 2000).then_some(())
    })?;
    dump.term(Duration::from_secs(5))?;
    let wire = std::fs::read(&pcap)?;
    let find = |needle: &[u8]| wire.windows(needle.len()).any(|w| w == needle);
    assert!(
        !find(b"very-secret-path-4711") && !find(b"backend-3 GET"),
        "plaintext HTTP crossed the wire between the hosts"
    );
    assert!(
        find(&[0x17, 0x03, 0x03]),
        "no TLS application data record in the capture"
    );

    // A plaintext probe straight at the backend's inbound is refused (STRICT).
    let denied_before = backend.metric("weft_dp_connections_denied_total", &["inbound"]);
    let (code, body) = shop.mesh.curl(1, "http://10.77.0.13:10002/");
    ensure!(
        code != 0 && body.is_empty(),
        "plaintext got through: {code} {body:?}"
    );
    wait_for(
        "the plaintext probe to be counted as denied",
        Duration::from_secs(5),
        || {
            (backend.metric("weft_dp_connections_denied_total", &["inbound"]) > denied_before)
                .then_some(())
        },
    )?;
    // Metrics of both sides saw the traffic.
    assert!(
        shop.web
            .metric("weft_dp_connections_opened_total", &["outbound"])
            >= 2.0
    );
    assert!(backend.metric("weft_dp_bytes_from_upstream_total", &["inbound"]) > 0.0);
    Ok(())
}

#[test]
fn b_permissions_take_effect_within_a_second() -> Result<()> {
    permissions_take_effect_within_a_second(T::Tls)
}

#[test]
fn b_pooled_permissions_take_effect_within_a_second() -> Result<()> {
    permissions_take_effect_within_a_second(T::Pooled)
}

#[test]
fn b_quic_permissions_take_effect_within_a_second() -> Result<()> {
    permissions_take_effect_within_a_second(T::Quic)
}

#[test]
fn b_auto_permissions_take_effect_within_a_second() -> Result<()> {
    permissions_take_effect_within_a_second(T::Auto)
}

fn permissions_take_effect_within_a_second(t: T) -> Result<()> {
    let shop = Shop::new(1, false, None, t)?;
    let backend = &shop.backends[0].0;
    // No permission: the mesh is STRICT and nothing allows web, so the backend denies it.
    let (code, _) = shop.mesh.curl(2, &format!("{WEB_URL}/"));
    ensure!(code != 0, "no permission must mean denied");
    wait_for("the denial to be counted", Duration::from_secs(5), || {
        (backend.metric("weft_dp_connections_denied_total", &["inbound"]) >= 1.0).then_some(())
    })?;
    assert!(
        backend.proc.log().contains("denied"),
        "{}",
        backend.proc.log()
    );

    let t0 = Instant::now();
    shop.mesh.apply("allow", ALLOW)?;
    shop.wait_working(Duration::from_secs(1))?;
    eprintln!("allow took effect in {:?}", t0.elapsed());

    let t0 = Instant::now();
    shop.mesh
        .apply("deny", &ALLOW.replace("action: Allow", "action: Deny"))?;
    wait_for("deny to take effect", Duration::from_secs(1), || {
        let (code, _) = shop.mesh.curl(2, &format!("{WEB_URL}/"));
        (code != 0).then_some(())
    })?;
    eprintln!("deny took effect in {:?}", t0.elapsed());
    assert!(
        backend.proc.log().contains("web-to-backend"),
        "the deny names the deciding policy"
    );
    check_transport(&shop.web, t)
}

#[test]
fn c_two_backends_share_traffic_and_survive_losing_one() -> Result<()> {
    two_backends_share_traffic_and_survive_losing_one(T::Tls)
}

#[test]
fn c_pooled_two_backends_share_traffic_and_survive_losing_one() -> Result<()> {
    two_backends_share_traffic_and_survive_losing_one(T::Pooled)
}

#[test]
fn c_quic_two_backends_share_traffic_and_survive_losing_one() -> Result<()> {
    two_backends_share_traffic_and_survive_losing_one(T::Quic)
}

#[test]
fn c_auto_two_backends_share_traffic_and_survive_losing_one() -> Result<()> {
    two_backends_share_traffic_and_survive_losing_one(T::Auto)
}

fn two_backends_share_traffic_and_survive_losing_one(t: T) -> Result<()> {
    let mut shop = Shop::new(2, true, None, t)?;
    let v = shop.mesh.load(2, &format!("{WEB_URL}/"), "3s", "20ms")?;
    assert_eq!(v["failed"], 0, "{v}");
    let served = &v["served_by"];
    let (a, b) = (
        served["backend-3"].as_u64().unwrap_or(0),
        served["backend-4"].as_u64().unwrap_or(0),
    );
    ensure!(a > 20 && b > 20, "traffic is not shared: {v}");

    // Kill backend-4's dataplane: traffic continues on backend-3, no request fails.
    let (dp4, _app4) = shop.backends.pop().expect("two backends");
    dp4.proc.kill9();
    let v = shop.mesh.load(2, &format!("{WEB_URL}/"), "3s", "20ms")?;
    assert_eq!(v["failed"], 0, "{v}");
    assert!(v["served_by"]["backend-4"].is_null(), "{v}");
    ensure!(v["ok"].as_u64().unwrap_or(0) > 100, "{v}");
    check_transport(&shop.web, t)
}

#[test]
fn c_pooled_a_backend_whose_service_is_down_is_replayed_elsewhere() -> Result<()> {
    a_backend_whose_service_is_down_is_replayed_elsewhere(T::Pooled)
}

#[test]
fn c_quic_a_backend_whose_service_is_down_is_replayed_elsewhere() -> Result<()> {
    a_backend_whose_service_is_down_is_replayed_elsewhere(T::Quic)
}

/// Pooled and QUIC streams carry the client's request before the peer has answered: when
/// backend-4's service is down its dataplane refuses each stream (503 / `unavailable`), and
/// web sends the very same bytes to backend-3 — no request fails, none is served twice.
fn a_backend_whose_service_is_down_is_replayed_elsewhere(t: T) -> Result<()> {
    let mut shop = Shop::new(2, true, None, t)?;
    shop.wait_working(Duration::from_secs(10))?;
    let (_dp4, app4) = shop.backends.pop().expect("two backends");
    app4.kill9();
    let refused_before = shop
        .web
        .metric("weft_dp_upstream_connect_failures_total", &["outbound"]);
    // A fresh connection per request, each sent before web's dataplane knows the answer.
    let v = shop.mesh.load(2, &format!("{WEB_URL}/"), "3s", "20ms")?;
    assert_eq!(v["failed"], 0, "{v}");
    assert!(v["served_by"]["backend-4"].is_null(), "{v}");
    ensure!(v["ok"].as_u64().unwrap_or(0) > 100, "{v}");
    let refused = shop
        .web
        .metric("weft_dp_upstream_connect_failures_total", &["outbound"])
        - refused_before;
    ensure!(
        refused > 10.0,
        "backend-4 refused {refused} streams: the replay was not exercised"
    );
    check_transport(&shop.web, t)
}

#[test]
fn d_cp_killed_under_steady_traffic_fails_no_request() -> Result<()> {
    cp_killed_under_steady_traffic_fails_no_request(T::Tls)
}

#[test]
fn d_quic_cp_killed_under_steady_traffic_fails_no_request() -> Result<()> {
    cp_killed_under_steady_traffic_fails_no_request(T::Quic)
}

#[test]
fn d_auto_cp_killed_under_steady_traffic_fails_no_request() -> Result<()> {
    cp_killed_under_steady_traffic_fails_no_request(T::Auto)
}

fn cp_killed_under_steady_traffic_fails_no_request(t: T) -> Result<()> {
    let mut shop = Shop::new(1, true, None, t)?;
    shop.wait_working(Duration::from_secs(10))?;
    let host2 = shop.mesh.host(2).clone();
    let mut cmd = host2.command(weft_e2e::bin("weft-testapp"));
    cmd.args([
        "load",
        "--url",
        &format!("{WEB_URL}/"),
        "--duration",
        "30s",
        "--interval",
        "20ms",
    ]);
    let load = host2.spawn("load", cmd)?;
    std::thread::sleep(Duration::from_secs(5));
    shop.mesh.kill_cp();
    std::thread::sleep(Duration::from_secs(10));
    shop.mesh.start_cp()?;
    let out = wait_for("the load to finish", Duration::from_secs(40), || {
        (!load.is_running()).then(|| load.log())
    })?;
    let v: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap_or(""))?;
    assert_eq!(v["failed"], 0, "{v}");
    ensure!(v["ok"].as_u64().unwrap_or(0) > 1000, "{v}");
    // And the dataplanes are back in sync with the restarted CP.
    wait_for("web Online again", Duration::from_secs(10), || {
        (shop.mesh.insight("default", "web").ok()?["status"] == "Online").then_some(())
    })?;
    check_transport(&shop.web, t)
}

#[test]
fn e_certificate_rotation_under_steady_traffic_fails_no_request() -> Result<()> {
    certificate_rotation_under_steady_traffic_fails_no_request(T::Tls)
}

#[test]
fn e_pooled_certificate_rotation_under_steady_traffic_fails_no_request() -> Result<()> {
    certificate_rotation_under_steady_traffic_fails_no_request(T::Pooled)
}

#[test]
fn e_quic_certificate_rotation_under_steady_traffic_fails_no_request() -> Result<()> {
    certificate_rotation_under_steady_traffic_fails_no_request(T::Quic)
}

#[test]
fn e_auto_certificate_rotation_under_steady_traffic_fails_no_request() -> Result<()> {
    certificate_rotation_under_steady_traffic_fails_no_request(T::Auto)
}

fn certificate_rotation_under_steady_traffic_fails_no_request(t: T) -> Result<()> {
    // Leaves live 20 s: each dataplane renews about every 14 s.
    let mesh = "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n    dpCert:\n      rotation:\n        expiration: 20s\n";
    let shop = Shop::new(1, true, Some(mesh), t)?;
    shop.wait_working(Duration::from_secs(10))?;
    let v = shop.mesh.load(2, &format!("{WEB_URL}/"), "25s", "20ms")?;
    assert_eq!(v["failed"], 0, "{v}");
    ensure!(v["ok"].as_u64().unwrap_or(0) > 800, "{v}");
    let renewals = |dp: &Dataplane| dp.metric("weft_dp_cert_renewals_total", &[]);
    ensure!(
        renewals(&shop.web) >= 1.0 && renewals(&shop.backends[0].0) >= 1.0,
        "no renewal happened during the load: web {}, backend {}",
        renewals(&shop.web),
        renewals(&shop.backends[0].0)
    );
    check_transport(&shop.web, t)
}

/// `openssl s_client` from host 1 at backend's inbound with the given client certificate;
/// returns whether an HTTP request got an answer from the backend app.
fn s_client(mesh: &MeshBed, cert_key: Option<(&std::path::Path, &std::path::Path)>) -> bool {
    let mut args: Vec<String> = [
        "openssl",
        "s_client",
        "-connect",
        "10.77.0.13:10002",
        "-quiet",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let Some((c, k)) = cert_key {
        args.extend([
            "-cert".into(),
            c.display().to_string(),
            "-key".into(),
            k.display().to_string(),
        ]);
    }
    // Feed a request through a shell pipe inside the host.
    let cmd = format!(
        "printf 'GET /probe HTTP/1.0\\r\\n\\r\\n' | timeout 5 {} 2>&1",
        args.join(" ")
    );
    let out = mesh.host(1).run(["sh", "-c", &cmd]);
    String::from_utf8_lossy(&out.stdout).contains("backend-3 GET /probe")
}

/// `weft-testapp quic-get` (weft-dp's QUIC client) from host 1 at backend's inbound with the
/// given client certificate, verifying the server against `ca`; returns whether an HTTP
/// request got an answer from the backend app.
fn quic_get(
    mesh: &MeshBed,
    cert_key: (&std::path::Path, &std::path::Path),
    ca: &std::path::Path,
) -> bool {
    let (cert, key, ca) = (
        cert_key.0.display().to_string(),
        cert_key.1.display().to_string(),
        ca.display().to_string(),
    );
    let out = mesh.run_testapp(
        1,
        &[
            "quic-get",
            "--to",
            "10.77.0.13:10002",
            "--service",
            "backend",
            "--mesh",
            "default",
            "--cert",
            &cert,
            "--key",
            &key,
            "--ca",
            &ca,
            "--path",
            "/probe",
            "--timeout",
            "15s",
        ],
        // Generous: a loaded 2-core machine can starve a debug build's handshake for seconds.
        Duration::from_secs(30),
    );
    eprintln!(
        "quic-get: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).contains("backend-3 GET /probe")
}

#[test]
fn f_foreign_expired_or_missing_client_certificates_are_refused() -> Result<()> {
    foreign_expired_or_missing_client_certificates_are_refused(T::Tls)
}

#[test]
fn f_quic_foreign_expired_or_other_mesh_client_certificates_are_refused() -> Result<()> {
    foreign_expired_or_missing_client_certificates_are_refused(T::Quic)
}

fn foreign_expired_or_missing_client_certificates_are_refused(t: T) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    // A provided CA the test holds, so it can mint good, expired and foreign leaves.
    let ca_key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "test mesh CA");
    let ca = p.self_signed(&ca_key)?;
    let foreign_key = KeyPair::generate()?;
    let foreign_ca = {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "another mesh CA");
        p.self_signed(&foreign_key)?
    };
    let mesh_yaml = format!(
        "type: Mesh\nname: default\nmtls:\n  enabledBackend: p\n  backends:\n  - name: p\n    type: provided\n    conf:\n      cert:\n        inlineString: |\n{}      key:\n        inlineString: |\n{}",
        indent(&ca.pem()),
        indent(&ca_key.serialize_pem())
    );
    let allow_all = ALLOW.replace("kind: MeshService\n      name: web", "kind: Mesh");
    let shop = Shop::new(1, false, Some(&mesh_yaml), t)?;
    shop.mesh.apply("allow-all", &allow_all)?;
    shop.wait_working(Duration::from_secs(10))?;

    let dir = shop.mesh.bed.dir().to_owned();
    let leaf = |name: &str,
                issuer: &Issuer<'_, KeyPair>,
                mesh: &str,
                expired: bool|
     -> Result<(std::path::PathBuf, std::path::PathBuf)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(format!("spiffe://{mesh}/web").try_into()?)];
        let now = time::OffsetDateTime::now_utc();
        if expired {
            p.not_before = now - time::Duration::days(2);
            p.not_after = now - time::Duration::days(1);
        } else {
            p.not_before = now - time::Duration::minutes(1);
            p.not_after = now + time::Duration::hours(1);
        }
        let cert = p.signed_by(&key, issuer)?;
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert.pem())?;
        std::fs::write(&k, key.serialize_pem())?;
        Ok((c, k))
    };
    let mesh_issuer = Issuer::from_ca_cert_der(ca.der(), ca_key)?;
    let foreign_issuer = Issuer::from_ca_cert_der(foreign_ca.der(), foreign_key)?;
    let good = leaf("good", &mesh_issuer, "default", false)?;
    let expired = leaf("expired", &mesh_issuer, "default", true)?;
    let foreign = leaf("foreign", &foreign_issuer, "default", false)?;
    let other_mesh = leaf("other-mesh", &mesh_issuer, "other", false)?;

    let ca_file = dir.join("mesh-ca.pem");
    std::fs::write(&ca_file, ca.pem())?;
    let probe = |cert_key: Option<(&std::path::PathBuf, &std::path::PathBuf)>| match (t, cert_key) {
        (T::Tls, c) => s_client(&shop.mesh, c.map(|(c, k)| (c.as_path(), k.as_path()))),
        (_, Some((c, k))) => quic_get(&shop.mesh, (c, k), &ca_file),
        // weft's QUIC client always presents a certificate.
        (_, None) => false,
    };

    // The control: a valid mesh certificate gets through, so the refusals below are real.
    ensure!(
        probe(Some((&good.0, &good.1))),
        "a valid certificate must pass"
    );
    let backend = &shop.backends[0].0;
    let failures = || backend.metric("weft_dp_tls_handshake_failures_total", &["inbound"]);
    let denied = || backend.metric("weft_dp_connections_denied_total", &["inbound"]);
    let before = failures();
    let mut refused = 0.0;
    if t == T::Tls {
        ensure!(!probe(None), "no client certificate must be refused");
        refused += 1.0;
    }
    ensure!(
        !probe(Some((&expired.0, &expired.1))),
        "an expired certificate must be refused"
    );
    ensure!(
        !probe(Some((&foreign.0, &foreign.1))),
        "a certificate of another CA must be refused"
    );
    refused += 2.0;
    wait_for(
        "the handshake failures counted",
        Duration::from_secs(5),
        || (failures() >= before + refused).then_some(()),
    )?;
    // Signed by this mesh's CA but naming another trust domain: no identity here, denied.
    let denied_before = denied();
    ensure!(
        !probe(Some((&other_mesh.0, &other_mesh.1))),
        "another mesh's identity must be refused"
    );
    wait_for(
        "the foreign identity denied",
        Duration::from_secs(5),
        || (denied() > denied_before).then_some(()),
    )?;
    Ok(())
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("          {l}\n")).collect()
}

/// Waits (up to `within`) for a background `weft-testapp` client to exit; its last line of
/// output, parsed as the JSON summary.
fn summary(p: &Proc, within: Duration) -> Result<serde_json::Value> {
    let log = wait_for(&format!("{} to finish", p.name()), within, || {
        (!p.is_running()).then(|| p.log())
    })?;
    let last = log.trim().lines().last().unwrap_or("");
    serde_json::from_str(last).map_err(|e| anyhow::anyhow!("{e}: not a summary: {log}"))
}

#[test]
fn g_permissive_accepts_plaintext_and_mtls() -> Result<()> {
    let mesh = "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n    mode: PERMISSIVE\n";
    let shop = Shop::new(1, true, Some(mesh), T::Tls)?;
    let backend = &shop.backends[0].0;
    // Through the mesh: web's dataplane still originates mTLS.
    shop.wait_working(Duration::from_secs(10))?;
    // Plaintext straight at the backend's inbound from a host without a dataplane.
    let body = wait_for(
        "plaintext to reach the backend app",
        Duration::from_secs(5),
        || {
            let (code, body) = shop.mesh.curl(1, "http://10.77.0.13:10002/plain");
            (code == 0).then_some(body)
        },
    )?;
    assert_eq!(body, "backend-3 GET /plain\n");
    // Both kinds on the same inbound, none refused.
    let (code, body) = shop.mesh.curl(2, &format!("{WEB_URL}/mtls"));
    ensure!(
        code == 0,
        "web -> backend failed after the plaintext one: {code}"
    );
    assert_eq!(body, "backend-3 GET /mtls\n");
    assert_eq!(
        backend.metric("weft_dp_connections_denied_total", &["inbound"]),
        0.0
    );
    assert_eq!(
        backend.metric("weft_dp_tls_handshake_failures_total", &["inbound"]),
        0.0
    );
    ensure!(backend.metric("weft_dp_connections_opened_total", &["inbound"]) >= 3.0);
    Ok(())
}

#[test]
fn h_sigterm_drains_without_failed_requests() -> Result<()> {
    sigterm_drains_without_failed_requests(T::Tls)
}

#[test]
fn h_pooled_sigterm_drains_without_failed_requests() -> Result<()> {
    sigterm_drains_without_failed_requests(T::Pooled)
}

#[test]
fn h_quic_sigterm_drains_without_failed_requests() -> Result<()> {
    sigterm_drains_without_failed_requests(T::Quic)
}

fn sigterm_drains_without_failed_requests(t: T) -> Result<()> {
    let shop = Shop::new(2, true, None, t)?;
    shop.wait_working(Duration::from_secs(10))?;
    // Requests that take 200 ms each: about ten are in flight at any time, some on backend-4
    // when it is told to stop.
    let load = shop.mesh.testapp(
        2,
        "load",
        &[
            "load",
            "--url",
            &format!("{WEB_URL}/slow?ms=200"),
            "--duration",
            "8s",
            "--interval",
            "20ms",
        ],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let web_retries = || {
        shop.web
            .metric("weft_dp_upstream_connect_failures_total", &["outbound"])
    };
    let retries_before = web_retries();
    let dp4 = &shop.backends[1].0;
    let drain_timeout = Duration::from_secs(2); // MeshBed::start_dp's --drain-timeout
    let (status, took, probe) = std::thread::scope(|s| {
        let t0 = Instant::now();
        let term = s.spawn(|| dp4.proc.term(drain_timeout + Duration::from_secs(3)));
        // During the propagation second it still accepts connections (so that nothing is
        // refused before every other dataplane has learnt it is going). The probe connects,
        // sends nothing and half-closes; the dataplane closes too.
        std::thread::sleep(Duration::from_millis(300));
        let probe = shop.mesh.run_testapp(
            1,
            &[
                "tcp-send",
                "--to",
                "10.77.0.14:10002",
                "--data",
                "",
                "--timeout",
                "1s",
            ],
            Duration::from_secs(5),
        );
        let status = term.join().expect("term thread");
        (status, t0.elapsed(), probe)
    });
    let status = status?;
    eprintln!("backend-4's dataplane exited with {status} after {took:?}");
    ensure!(
        status.success(),
        "the draining dataplane must exit 0: {status}\n{}",
        dp4.proc.log()
    );
    ensure!(
        took < drain_timeout + Duration::from_secs(2),
        "drain took {took:?}"
    );
    ensure!(
        probe.status.success(),
        "backend-4 refused connections at once instead of after the propagation delay: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let log = dp4.proc.log();
    ensure!(log.contains("draining"), "{log}");

    let v = summary(&load, Duration::from_secs(20))?;
    assert_eq!(v["failed"], 0, "{v}");
    ensure!(v["ok"].as_u64().unwrap_or(0) > 250, "{v}");
    ensure!(
        v["served_by"]["backend-4"].as_u64().unwrap_or(0) > 0,
        "backend-4 served nothing before its drain: {v}"
    );
    ensure!(
        web_retries() == retries_before,
        "web had to retry connections refused by the draining backend: {} -> {}",
        retries_before,
        web_retries()
    );
    // The CP saw backend-4's inbound go unready, then the dataplane go.
    let insight = wait_for(
        "backend-4 unready and Offline in its insight",
        Duration::from_secs(5),
        || {
            let i = shop.mesh.insight("default", "backend-4").ok()?;
            (i["status"] == "Offline" && i["inboundHealth"]["10002"] == false).then_some(i)
        },
    )?;
    eprintln!("backend-4's insight: {insight}");
    check_transport(&shop.web, t)
}

/// The default mesh, builtin `ca-1`.
const MESH_CA1: &str = "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n";
/// The default mesh rotated to a second builtin CA, `ca-1` still trusted: every dataplane
/// gets a certificate from `ca-2` at once.
const MESH_CA2: &str = "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-2\n  backends:\n  - name: ca-1\n    type: builtin\n  - name: ca-2\n    type: builtin\n";

const ALLOW_ALL: &str = "type: MeshTrafficPermission\nmesh: default\nname: allow-all\nspec:\n  targetRef:\n    kind: Mesh\n  from:\n  - targetRef:\n      kind: Mesh\n    default:\n      action: Allow\n";

/// A permission from `from` to `to`, named `name`.
fn permission(name: &str, from: &str, to: &str) -> String {
    format!(
        "type: MeshTrafficPermission\nmesh: default\nname: {name}\nspec:\n  targetRef:\n    kind: MeshService\n    name: {to}\n  from:\n  - targetRef:\n      kind: MeshService\n      name: {from}\n    default:\n      action: Allow\n"
    )
}

#[test]
fn i_established_connections_survive_config_and_certificate_changes() -> Result<()> {
    established_connections_survive_config_and_certificate_changes(T::Tls)
}

/// The QUIC connection between web and echo is replaced after the rotation; the stream on the
/// old one carries on.
#[test]
fn i_pooled_established_streams_survive_config_and_certificate_changes() -> Result<()> {
    established_connections_survive_config_and_certificate_changes(T::Pooled)
}

#[test]
fn i_quic_established_streams_survive_config_and_certificate_changes() -> Result<()> {
    established_connections_survive_config_and_certificate_changes(T::Quic)
}

fn established_connections_survive_config_and_certificate_changes(t: T) -> Result<()> {
    let mesh_yaml = |y: &str| if t == T::Tls { y.to_owned() } else { t.mesh(y) };
    let mesh = MeshBed::new(3)?;
    mesh.apply("mesh", &mesh_yaml(MESH_CA1))?;
    mesh.apply("allow-all", ALLOW_ALL)?;
    // A TCP service `echo` on host 3, and web on host 2 with an outbound to it.
    let _echo_app = mesh.tcp_echo(3, "echo", 7070)?;
    let echo = mesh.start_dp(3, "default", "echo", "echo", ECHO_YAML)?;
    let _web_app = mesh.http_echo(2, "web", 8081)?;
    let web = mesh.start_dp(2, "default", "web", "web", WEB_TO_ECHO_YAML)?;
    let config = |dp: &Dataplane| -> Option<serde_json::Value> {
        serde_json::from_str(&dp.admin("/config").ok()?).ok()
    };
    wait_for("web -> echo to work", Duration::from_secs(20), || {
        let out = mesh.run_testapp(
            2,
            &[
                "tcp-send",
                "--to",
                "127.0.0.1:20003",
                "--data",
                "ping",
                "--timeout",
                "2s",
            ],
            Duration::from_secs(5),
        );
        (out.stdout == b"ping").then_some(())
    })?;

    // One connection for 10 s, a line echoed every 200 ms.
    let chat = mesh.testapp(
        2,
        "tcp-chat",
        &[
            "tcp-chat",
            "--to",
            "127.0.0.1:20003",
            "--every",
            "200ms",
            "--duration",
            "10s",
        ],
    )?;
    wait_for("tcp-chat to connect", Duration::from_secs(5), || {
        chat.log().contains("connected to").then_some(())
    })?;
    let echo_connections = echo.metric("weft_dp_connections_opened_total", &["inbound"]);
    std::thread::sleep(Duration::from_secs(1));

    // A config change on both ends: new permissions for web's and echo's inbounds.
    let version = |dp: &Dataplane| config(dp).map(|c| c["version"].clone());
    let (web_v0, echo_v0) = (version(&web), version(&echo));
    ensure!(web_v0.is_some() && echo_v0.is_some(), "no config versions");
    mesh.apply("echo-to-web", &permission("echo-to-web", "echo", "web"))?;
    mesh.apply("web-to-echo", &permission("web-to-echo", "web", "echo"))?;
    wait_for(
        "new config versions on web and echo",
        Duration::from_secs(3),
        || (version(&web) != web_v0 && version(&echo) != echo_v0).then_some(()),
    )?;

    // A CA rotation: both dataplanes get new certificates (from ca-2) and a new trust bundle.
    let renewals = |dp: &Dataplane| dp.metric("weft_dp_cert_renewals_total", &[]);
    let (web_r0, echo_r0) = (renewals(&web), renewals(&echo));
    let web_cert0 = std::fs::read_to_string(web.state_dir.join("cert.pem"))?;
    mesh.apply("mesh", &mesh_yaml(MESH_CA2))?;
    wait_for(
        "web and echo renewed their certificates",
        Duration::from_secs(5),
        || (renewals(&web) > web_r0 && renewals(&echo) > echo_r0).then_some(()),
    )?;
    ensure!(std::fs::read_to_string(web.state_dir.join("cert.pem"))? != web_cert0);
    ensure!(chat.is_running(), "tcp-chat ended early: {}", chat.log());

    let v = summary(&chat, Duration::from_secs(20))?;
    eprintln!("tcp-chat: {v}");
    assert_eq!(v["error"], serde_json::Value::Null, "{v}");
    assert_eq!(v["sent"], v["echoed"], "{v}");
    ensure!(v["sent"].as_u64().unwrap_or(0) >= 40, "{v}");
    // It really was one connection the whole time.
    assert_eq!(
        echo.metric("weft_dp_connections_opened_total", &["inbound"]),
        echo_connections,
        "tcp-chat reconnected"
    );
    // And new connections use the new certificates.
    let out = mesh.run_testapp(
        2,
        &["tcp-send", "--to", "127.0.0.1:20003", "--data", "after"],
        Duration::from_secs(10),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "after");
    if t == T::Quic {
        // The connection of the old certificates closes now that its last stream has ended:
        // one connection open on each side, two opened by web over the test.
        let open = |dp: &Dataplane, side: &str| quic_metric(dp, "weft_dp_quic_connections", side);
        wait_for(
            "the old QUIC connection to close",
            Duration::from_secs(10),
            || (open(&web, "client") == 1.0 && open(&echo, "server") == 1.0).then_some(()),
        )?;
        assert_eq!(
            quic_metric(&web, "weft_dp_quic_connections_opened_total", "client"),
            2.0
        );
    }
    check_transport(&web, t)
}

#[test]
fn a_quic_carries_web_to_backend_over_udp_only() -> Result<()> {
    let shop = Shop::new(1, true, None, T::Quic)?;
    shop.wait_working(Duration::from_secs(10))?;
    let backend = &shop.backends[0].0;
    // Capture port 10002 on the backend host, TCP and UDP apart.
    let h3 = shop.mesh.host(3).clone();
    let dir = shop.mesh.bed.dir().to_owned();
    let capture = |proto: &str| -> Result<(Proc, std::path::PathBuf)> {
        let pcap = dir.join(format!("{proto}.pcap"));
        let mut cmd = h3.command("tcpdump");
        cmd.args(["-i", "eth0", "-U", "-n", "-w"])
            .arg(&pcap)
            .args([proto, "port", "10002"]);
        let dump = h3.spawn(&format!("tcpdump-{proto}"), cmd)?;
        wait_for("tcpdump to listen", Duration::from_secs(10), || {
            dump.log().contains("listening on").then_some(())
        })?;
        Ok((dump, pcap))
    };
    let (udp, udp_pcap) = capture("udp")?;
    let (tcp, tcp_pcap) = capture("tcp")?;
    for i in 0..5 {
        let (code, body) = shop
            .mesh
            .curl(2, &format!("{WEB_URL}/very-secret-path-{i}"));
        ensure!(code == 0, "request through the mesh failed: {code}");
        assert_eq!(body, format!("backend-3 GET /very-secret-path-{i}\n"));
    }
    wait_for("packets in the UDP capture", Duration::from_secs(5), || {
        (std::fs::metadata(&udp_pcap).ok()?.len() > 2000).then_some(())
    })?;
    udp.term(Duration::from_secs(5))?;
    tcp.term(Duration::from_secs(5))?;
    let wire = std::fs::read(&udp_pcap)?;
    let find = |needle: &[u8]| wire.windows(needle.len()).any(|w| w == needle);
    assert!(
        !find(b"very-secret-path") && !find(b"backend-3 GET"),
        "plaintext HTTP crossed the wire between the hosts"
    );
    // A pcap file with no packet is its 24-byte header.
    let tcp_len = std::fs::metadata(&tcp_pcap)?.len();
    ensure!(
        tcp_len <= 24,
        "TCP packets on port 10002 ({tcp_len} bytes of capture)"
    );
    // Five requests, five streams, one connection: nothing was refused or retried.
    assert_eq!(
        shop.web.metric("weft_dp_quic_streams_total", &["outbound"]),
        shop.web
            .metric("weft_dp_connections_opened_total", &["outbound"])
    );
    ensure!(backend.metric("weft_dp_quic_streams_total", &["inbound"]) >= 5.0);
    assert_eq!(
        shop.web
            .metric("weft_dp_upstream_connect_failures_total", &["outbound"]),
        0.0
    );
    ensure!(backend.metric("weft_dp_bytes_from_upstream_total", &["inbound"]) > 0.0);
    // One QUIC connection, seen from both ends, its packets within Ethernet's 1500 bytes.
    assert_eq!(
        quic_metric(&shop.web, "weft_dp_quic_connections", "client"),
        1.0
    );
    assert_eq!(
        quic_metric(backend, "weft_dp_quic_connections", "server"),
        1.0
    );
    assert_eq!(
        quic_metric(&shop.web, "weft_dp_quic_connections", "server"),
        0.0
    );
    assert_eq!(
        quic_metric(&shop.web, "weft_dp_quic_connections_opened_total", "client"),
        1.0
    );
    ensure!(quic_metric(backend, "weft_dp_quic_packets_sent_total", "server") >= 5.0);
    for (dp, side) in [(&shop.web, "client"), (backend, "server")] {
        let mtu = quic_metric(dp, "weft_dp_quic_path_mtu_min_bytes", side);
        ensure!(
            (1200.0..=1452.0).contains(&mtu),
            "{side} path MTU {mtu} on a 1500-byte link (ceiling: quinn's 1452)"
        );
    }
    Ok(())
}

/// Starts `weft-testapp load` on web's host against web's outbound (one GET every `interval`
/// for `duration`, each failing after `timeout` if given); [`summary`] reads its result.
fn load_from_web(
    mesh: &MeshBed,
    name: &str,
    duration: &str,
    interval: &str,
    timeout: Option<&str>,
) -> Result<Proc> {
    let url = format!("{WEB_URL}/");
    let mut args = vec![
        "load",
        "--url",
        &url,
        "--duration",
        duration,
        "--interval",
        interval,
    ];
    if let Some(t) = timeout {
        args.extend(["--timeout", t]);
    }
    mesh.testapp(2, name, &args)
}

/// A firewall inside a test host: an nftables table `weft_test` with input and output chains
/// (policy accept) for the test's drop rules.
struct Firewall<'a>(&'a weft_e2e::netns::Host);

impl<'a> Firewall<'a> {
    fn on(host: &'a weft_e2e::netns::Host) -> Result<Self> {
        let fw = Firewall(host);
        fw.nft("add table inet weft_test")?;
        for hook in ["input", "output"] {
            fw.nft(&format!(
                "add chain inet weft_test {hook} {{ type filter hook {hook} priority 0; policy accept; }}"
            ))?;
        }
        Ok(fw)
    }

    /// Runs one `nft` command (a whole rule or table statement as one argument).
    fn nft(&self, script: &str) -> Result<()> {
        let out = self.0.run(["nft", script]);
        ensure!(
            out.status.success(),
            "nft {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Drops UDP to (`input`) or from (`output`) local port `port`, counting what it drops.
    fn drop_udp(&self, hook: &str, port: u16) -> Result<()> {
        let dir = if hook == "input" { "dport" } else { "sport" };
        self.nft(&format!(
            "add rule inet weft_test {hook} udp {dir} {port} counter drop"
        ))
    }

    /// Whether the rules of chain `hook` have dropped any packet.
    fn dropped(&self, hook: &str) -> bool {
        let out = self
            .0
            .run(["nft", "list", "chain", "inet", "weft_test", hook]);
        let listing = String::from_utf8_lossy(&out.stdout);
        listing.contains("counter packets ") && !listing.contains("counter packets 0 ")
    }

    fn open(self) -> Result<()> {
        self.nft("delete table inet weft_test")
    }
}

#[test]
fn j_auto_falls_back_to_pooled_tls_when_udp_is_blocked_and_returns_to_quic() -> Result<()> {
    let shop = Shop::new(1, true, None, T::Auto)?;
    // UDP to backend's host dropped by its own firewall, before any traffic.
    let h3 = shop.mesh.host(3).clone();
    let fw = Firewall::on(&h3)?;
    fw.drop_udp("input", 10002)?;
    let t0 = Instant::now();
    let (code, body) = shop.mesh.curl(2, &format!("{WEB_URL}/first"));
    let first = t0.elapsed();
    ensure!(code == 0, "the first request must not fail: {code}");
    assert_eq!(body, "backend-3 GET /first\n");
    ensure!(first < Duration::from_secs(1), "fallback took {first:?}");
    eprintln!("first request, falling back to TLS: {first:?}");
    // Steady traffic: no failure, all over pooled TLS, one warning.
    let v = shop.mesh.load(2, &format!("{WEB_URL}/"), "3s", "20ms")?;
    assert_eq!(v["failed"], 0, "{v}");
    check_transport(&shop.web, T::Pooled)?;
    let warnings = shop.web.proc.log().matches("UDP blocked?").count();
    assert_eq!(warnings, 1, "{}", shop.web.proc.log());
    ensure!(fw.dropped("input"), "the drop rule saw no packet");
    // UDP open again: within the retry period QUIC is probed and used again, still nothing fails.
    fw.open()?;
    let load = load_from_web(&shop.mesh, "load", "40s", "50ms", None)?;
    wait_for("streams over QUIC again", Duration::from_secs(40), || {
        (shop.web.metric("weft_dp_quic_streams_total", &["outbound"]) > 0.0).then_some(())
    })?;
    ensure!(shop.web.proc.log().contains("QUIC answers again"));
    let v = summary(&load, Duration::from_secs(60))?;
    assert_eq!(v["failed"], 0, "{v}");
    Ok(())
}

/// UDP dropped only on the way back (backend's answers to QUIC handshakes never reach web), as
/// the first traffic is ten connections started within 50 ms: each falls back to pooled TLS
/// within a second, none fails, the fallback is logged once, and the backend does not count
/// the handshakes web gave up on as TLS failures (they are a path problem, not a refused
/// certificate).
#[test]
fn j_auto_falls_back_for_concurrent_first_connections_when_only_answers_are_dropped() -> Result<()>
{
    let shop = Shop::new(1, true, None, T::Auto)?;
    let h3 = shop.mesh.host(3).clone();
    let fw = Firewall::on(&h3)?;
    fw.drop_udp("output", 10002)?;
    let url = format!("{WEB_URL}/");
    let first = load_from_web(&shop.mesh, "first", "50ms", "5ms", Some("1s"))?;
    let v = summary(&first, Duration::from_secs(10))?;
    assert_eq!(v["failed"], 0, "each must succeed within 1 s: {v}");
    ensure!(v["ok"].as_u64().unwrap_or(0) >= 9, "{v}");
    ensure!(fw.dropped("output"), "backend's answers were not dropped");
    // Steady traffic past the backend's QUIC handshake timeout (10 s): all over pooled TLS.
    let v = shop.mesh.load(2, &url, "11s", "50ms")?;
    assert_eq!(v["failed"], 0, "{v}");
    check_transport(&shop.web, T::Pooled)?;
    let warnings = shop.web.proc.log().matches("UDP blocked?").count();
    assert_eq!(warnings, 1, "{}", shop.web.proc.log());
    let backend = &shop.backends[0].0;
    let failures = backend.metric("weft_dp_tls_handshake_failures_total", &["inbound"]);
    assert_eq!(failures, 0.0, "{}", backend.proc.log());
    Ok(())
}

/// UDP dropped both ways under an established QUIC connection, with requests every 50 ms: new
/// streams get no acknowledgement, so within 0.5 s web reads the connection as silent and
/// sends them, and everything after, over pooled TLS (logged once). Only a request whose
/// stream was already accepted when the block came can fail: at 50 ms between ~1 ms
/// requests, at most one.
#[test]
fn j_auto_falls_back_when_udp_is_blocked_under_an_established_connection() -> Result<()> {
    let shop = Shop::new(1, true, None, T::Auto)?;
    shop.wait_working(Duration::from_secs(10))?;
    check_transport(&shop.web, T::Auto)?;
    let quic_streams = || shop.web.metric("weft_dp_quic_streams_total", &["outbound"]);
    let load = load_from_web(&shop.mesh, "load", "8s", "50ms", Some("3s"))?;
    let before = quic_streams();
    wait_for("the load over QUIC", Duration::from_secs(5), || {
        (quic_streams() >= before + 20.0).then_some(())
    })?;
    let h3 = shop.mesh.host(3).clone();
    let fw = Firewall::on(&h3)?;
    fw.drop_udp("input", 10002)?;
    fw.drop_udp("output", 10002)?;
    let pooled = || {
        shop.web
            .metric("weft_dp_pooled_streams_total", &["outbound"])
    };
    wait_for("streams over pooled TLS", Duration::from_secs(3), || {
        (pooled() > 0.0).then_some(())
    })?;
    let v = summary(&load, Duration::from_secs(20))?;
    ensure!(
        v["failed"].as_u64().unwrap_or(u64::MAX) <= 1,
        "more than the one request in flight failed: {v}"
    );
    ensure!(
        pooled() >= 80.0,
        "pooled TLS carried the rest: {}",
        pooled()
    );
    ensure!(fw.dropped("input"), "the drop rule saw no packet");
    let warnings = shop.web.proc.log().matches("UDP blocked?").count();
    assert_eq!(warnings, 1, "{}", shop.web.proc.log());
    eprintln!("blocked under load: {v}");
    Ok(())
}

/// The mesh's transport changed at runtime, under steady traffic, from `quic` to `tls` and
/// back: no request fails; after the switch to `tls` new connections go over TLS and the QUIC
/// connections close on both sides (the inbound drains them after a 3 s grace), and after the
/// switch back streams go over QUIC again.
#[test]
fn m_quic_to_tls_and_back_at_runtime_fails_no_request_and_closes_quic_connections() -> Result<()> {
    let shop = Shop::new(1, true, None, T::Quic)?;
    shop.wait_working(Duration::from_secs(10))?;
    let backend = &shop.backends[0].0;
    let load = load_from_web(&shop.mesh, "load", "25s", "20ms", None)?;
    let open = |dp: &Dataplane, side: &str| quic_metric(dp, "weft_dp_quic_connections", side);
    wait_for("QUIC connections", Duration::from_secs(5), || {
        (open(&shop.web, "client") >= 1.0 && open(backend, "server") >= 1.0).then_some(())
    })?;
    let streams = |t: &str| {
        shop.web
            .metric(&format!("weft_dp_{t}_streams_total"), &["outbound"])
    };
    shop.mesh.apply("mesh", &T::Tls.mesh(MESH_CA1))?;
    wait_for(
        "QUIC closed on both sides after the switch to tls",
        Duration::from_secs(10),
        || (open(&shop.web, "client") == 0.0 && open(backend, "server") == 0.0).then_some(()),
    )?;
    // Traffic goes on over TLS (resumed handshakes), none over QUIC.
    let quic_after = streams("quic");
    let resumed = || shop.web.metric("weft_dp_tls_resumed_total", &["outbound"]);
    let resumed_then = resumed();
    wait_for("requests over TLS", Duration::from_secs(5), || {
        (resumed() >= resumed_then + 20.0).then_some(())
    })?;
    ensure!(
        streams("quic") == quic_after,
        "QUIC streams opened on a tls mesh"
    );
    shop.mesh.apply("mesh", &T::Quic.mesh(MESH_CA1))?;
    wait_for("streams over QUIC again", Duration::from_secs(10), || {
        (streams("quic") > quic_after + 20.0).then_some(())
    })?;
    let v = summary(&load, Duration::from_secs(40))?;
    assert_eq!(v["failed"], 0, "{v}");
    ensure!(v["ok"].as_u64().unwrap_or(0) > 900, "{v}");
    Ok(())
}

/// A reset on one side reaches the other as a reset, not as a clean end: backend's app resets
/// (RST) the connection web's client made through the mesh, and that client must see a reset.
fn a_reset_upstream_resets_the_client(t: T) -> Result<()> {
    let mesh = MeshBed::new(3)?;
    mesh.apply("mesh", &t.mesh(MESH_CA1))?;
    mesh.apply("allow-all", ALLOW_ALL)?;
    let _app = mesh.testapp(3, "tcp-reset", &["tcp-reset", "--listen", "127.0.0.1:7070"])?;
    let _rst = mesh.start_dp(
        3,
        "default",
        "rst",
        "rst",
        "type: Dataplane\nmesh: default\nname: rst\nnetworking:\n  address: 10.77.0.13\n  inbound:\n  - port: 10003\n    servicePort: 7070\n    tags:\n      kuma.io/service: rst\n      kuma.io/protocol: tcp\n",
    )?;
    let web = mesh.start_dp(
        2,
        "default",
        "web",
        "web",
        "type: Dataplane\nmesh: default\nname: web\nnetworking:\n  address: 10.77.0.12\n  inbound:\n  - port: 10001\n    servicePort: 8081\n    tags:\n      kuma.io/service: web\n  outbound:\n  - port: 20003\n    tags:\n      kuma.io/service: rst\n",
    )?;
    let send = || {
        mesh.run_testapp(
            2,
            &[
                "tcp-send",
                "--to",
                "127.0.0.1:20003",
                "--data",
                "hello",
                "--timeout",
                "3s",
            ],
            Duration::from_secs(10),
        )
    };
    // Until web has the endpoint and the app is reached, the client sees other failures; the
    // outcome that matters is the one after the app has read our bytes.
    let out = wait_for(
        "the app's reset to reach the client",
        Duration::from_secs(20),
        || {
            let o = send();
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            (err.contains("reset")
                || (o.status.success()
                    && web.metric("weft_dp_bytes_to_upstream_total", &["outbound"]) > 0.0))
                .then_some(o)
        },
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("reset"),
        "{t:?}: the client saw a clean end instead of a reset: status {}, stdout {:?}, stderr {err}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

#[test]
fn k_a_reset_upstream_resets_the_client_over_tls() -> Result<()> {
    a_reset_upstream_resets_the_client(T::Tls)
}

#[test]
fn k_pooled_a_reset_upstream_resets_the_client() -> Result<()> {
    a_reset_upstream_resets_the_client(T::Pooled)
}

#[test]
fn k_quic_a_reset_upstream_resets_the_client() -> Result<()> {
    a_reset_upstream_resets_the_client(T::Quic)
}

/// The sizes of the packets in a pcap file (classic format, as tcpdump writes it): each
/// record's original length on the wire (Ethernet header included).
fn pcap_packet_sizes(pcap: &[u8]) -> Result<Vec<u32>> {
    ensure!(pcap.len() >= 24, "pcap shorter than its header");
    let le = match pcap[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => anyhow::bail!("not a pcap file"),
    };
    let u32_at = |at: usize| -> u32 {
        let b = [pcap[at], pcap[at + 1], pcap[at + 2], pcap[at + 3]];
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let mut sizes = Vec::new();
    let mut at = 24;
    // A record: seconds, fraction, captured length, original length, the captured bytes.
    while at + 16 <= pcap.len() {
        let captured = u32_at(at + 8) as usize;
        sizes.push(u32_at(at + 12));
        at += 16 + captured;
    }
    Ok(sizes)
}

/// On links with jumbo frames, QUIC's path MTU discovery grows the packets past Ethernet's
/// 1500 bytes to (nearly) weft's ceiling, a 9000-byte frame, and a bulk response crosses in
/// those big datagrams (every other test runs on 1500-byte links, where the probes are lost
/// and nothing else changes).
#[test]
fn l_quic_packets_grow_to_fill_jumbo_frames() -> Result<()> {
    const LINK_MTU: u16 = 9000;
    let mesh = MeshBed::new(3)?;
    // Before any QUIC connection: discovery runs once a connection is up.
    mesh.bed.set_mtu(LINK_MTU.into())?;
    let shop = Shop::on(mesh, 1, true, None, T::Quic)?;
    shop.wait_working(Duration::from_secs(10))?;
    let h3 = shop.mesh.host(3).clone();
    // The kernel hands veth a GSO batch (up to 64 KiB of packets) as one frame, and that is
    // what a capture shows; with the offload off the batch is cut into its packets before the
    // tap.
    let out = h3.run(["ethtool", "-K", "eth0", "tx-udp-segmentation", "off"]);
    ensure!(
        out.status.success(),
        "ethtool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pcap = shop.mesh.bed.dir().join("jumbo.pcap");
    // Headers only: the sizes are what counts.
    let mut cmd = h3.command("tcpdump");
    cmd.args(["-i", "eth0", "-U", "-n", "-s", "96", "-w"])
        .arg(&pcap)
        .args(["udp", "src", "port", "10002"]);
    let dump = h3.spawn("tcpdump-jumbo", cmd)?;
    wait_for("tcpdump to listen", Duration::from_secs(10), || {
        dump.log().contains("listening on").then_some(())
    })?;
    const BYTES: u64 = 8 << 20;
    let out = shop.mesh.host(2).run_timeout(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            &format!("{WEB_URL}/big?bytes={BYTES}"),
        ],
        Duration::from_secs(25),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("200 {BYTES}"),
        "the download through the mesh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // tcpdump writes each packet as it comes (-U): wait until (nearly) the whole body is in.
    let sizes = wait_for(
        "the response in the capture",
        Duration::from_secs(5),
        || {
            let sizes = pcap_packet_sizes(&std::fs::read(&pcap).ok()?).ok()?;
            (sizes.iter().map(|&s| u64::from(s)).sum::<u64>() > BYTES * 9 / 10).then_some(sizes)
        },
    )?;
    dump.term(Duration::from_secs(5))?;
    // Ethernet 14 + IPv4 20 + UDP 8 around the QUIC packet.
    let frame = |payload: u16| u32::from(payload) + 42;
    let ceiling = weft_dp::proxy::quic::MAX_UDP_PAYLOAD;
    // What the link carries, less IPv6 and UDP headers (8952), and 100 bytes of room: the
    // search stops within quinn's 20-byte step of its ceiling.
    let near = LINK_MTU - 48 - 100;
    let max = sizes.iter().copied().max().unwrap_or(0);
    let big: Vec<u32> = sizes.iter().copied().filter(|&s| s > frame(near)).collect();
    ensure!(
        max > frame(near) && max <= frame(ceiling),
        "largest frame {max} bytes ({} frames): want above {}, at most {}",
        sizes.len(),
        frame(near),
        frame(ceiling)
    );
    // Both ends report it.
    for (dp, side) in [(&shop.web, "client"), (&shop.backends[0].0, "server")] {
        let mtu = quic_metric(dp, "weft_dp_quic_path_mtu_min_bytes", side);
        ensure!(
            mtu > f64::from(near) && mtu <= f64::from(ceiling),
            "{side} path MTU {mtu} on a 9000-byte link"
        );
    }
    // Most of the 8 MiB went in packets near the ceiling, not just the probes.
    let in_big: u64 = big.iter().map(|&s| u64::from(s)).sum();
    ensure!(
        in_big > BYTES / 2,
        "{} of {} frames above {} bytes, {in_big} bytes in them",
        big.len(),
        sizes.len(),
        frame(near)
    );
    Ok(())
}

#[test]
fn n_a_lossy_link_loses_no_byte_and_fails_no_connection_over_tls() -> Result<()> {
    lossy_link_loses_no_byte_and_fails_no_connection(T::Tls)
}

#[test]
fn n_pooled_a_lossy_link_loses_no_byte_and_fails_no_connection() -> Result<()> {
    lossy_link_loses_no_byte_and_fails_no_connection(T::Pooled)
}

#[test]
fn n_quic_a_lossy_link_loses_no_byte_and_fails_no_connection() -> Result<()> {
    lossy_link_loses_no_byte_and_fails_no_connection(T::Quic)
}

/// The same with both dataplanes on BBR (`--quic-congestion bbr`, which quinn calls
/// experimental): it keeps sending through the loss rather than backing off, and must still
/// deliver every byte.
#[test]
fn n_quic_bbr_a_lossy_link_loses_no_byte_and_fails_no_connection() -> Result<()> {
    lossy_link_check(T::Quic, &["--quic-congestion", "bbr"])
}

#[test]
fn n_auto_a_lossy_link_loses_no_byte_and_fails_no_connection() -> Result<()> {
    lossy_link_loses_no_byte_and_fails_no_connection(T::Auto)
}

/// With 3 % of the packets lost each way between the two dataplanes' hosts (and nothing else
/// wrong), four 4 MiB echoes running at once come back byte for byte, and short connections
/// opened one after the other alongside them all succeed. `auto` stays on QUIC: a lost packet
/// is not a blocked port.
fn lossy_link_loses_no_byte_and_fails_no_connection(t: T) -> Result<()> {
    lossy_link_check(t, &[])
}

/// [`lossy_link_loses_no_byte_and_fails_no_connection`] with `flags` for both dataplanes.
fn lossy_link_check(t: T, flags: &[&str]) -> Result<()> {
    const LOSS: f64 = 3.0;
    const BIG: u64 = 4 << 20;
    const SMALL: u32 = 30;
    let label = format!("{t:?} {}", flags.join(" "));
    let mut mesh = MeshBed::new(3)?;
    mesh.apply(
        "mesh",
        &if t == T::Tls {
            MESH_CA1.to_owned()
        } else {
            t.mesh(MESH_CA1)
        },
    )?;
    mesh.apply("allow-all", ALLOW_ALL)?;
    let _echo_app = mesh.tcp_echo(3, "echo", 7070)?;
    mesh.set_dp_flags(flags);
    let echo = mesh.start_dp(3, "default", "echo", "echo", ECHO_YAML)?;
    let web = mesh.start_dp(2, "default", "web", "web", WEB_TO_ECHO_YAML)?;
    // Each dataplane runs the congestion controller it was given (CUBIC unless a flag says).
    let controller = flags
        .windows(2)
        .find(|w| w[0] == "--quic-congestion")
        .map_or("cubic", |w| w[1]);
    for dp in [&web, &echo] {
        wait_for(
            &format!("{} to name its QUIC congestion controller", dp.name),
            Duration::from_secs(10),
            || {
                dp.proc
                    .log()
                    .lines()
                    .any(|l| {
                        l.contains("TLS credentials in use")
                            && l.contains(&format!("quic_congestion={controller}"))
                    })
                    .then_some(())
            },
        )?;
    }
    /// `weft-testapp tcp-check` through web's outbound to echo.
    fn tcp_check<'a>(bytes: &'a str, timeout: &'a str) -> [&'a str; 7] {
        [
            "tcp-check",
            "--to",
            "127.0.0.1:20003",
            "--bytes",
            bytes,
            "--timeout",
            timeout,
        ]
    }
    let check = |bytes: u64, timeout: &str| {
        let bytes = bytes.to_string();
        mesh.run_testapp(2, &tcp_check(&bytes, timeout), Duration::from_secs(90))
    };
    wait_for("web -> echo to work", Duration::from_secs(20), || {
        check(1000, "2s").status.success().then_some(())
    })?;

    mesh.bed.set_loss(2, 3, LOSS)?;
    let big: Vec<Proc> = (0..4)
        .map(|i| {
            let bytes = BIG.to_string();
            mesh.testapp(2, &format!("tcp-check-{i}"), &tcp_check(&bytes, "60s"))
        })
        .collect::<Result<_>>()?;
    // Meanwhile, short connections one after the other, each a fresh proxied connection.
    for n in 0..SMALL {
        let out = check(10_000, "20s");
        ensure!(
            out.status.success(),
            "{label}: short connection {n} over the lossy link: {}\nweb's log:\n{}\necho's log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            web.proc.log(),
            echo.proc.log()
        );
    }
    let done = format!("{{\"bytes\":{BIG},");
    for p in &big {
        wait_for(
            &format!("{} to finish", p.name()),
            Duration::from_secs(70),
            || (!p.is_running()).then_some(()),
        )?;
        ensure!(
            p.log().starts_with(&done),
            "{label}: {} over the lossy link: {}",
            p.name(),
            p.log()
        );
        eprintln!("{label} {}: {}", p.name(), p.log().trim());
    }
    // The link really lost packets, both ways.
    let (lost_out, lost_back) = (mesh.bed.lost(3)?, mesh.bed.lost(2)?);
    eprintln!("{label}: {lost_out} frames lost web -> echo, {lost_back} echo -> web");
    ensure!(
        lost_out > 10 && lost_back > 10,
        "{lost_out} and {lost_back} frames lost"
    );
    assert_eq!(
        web.metric("weft_dp_upstream_connect_failures_total", &["outbound"]),
        0.0
    );
    if matches!(t, T::Quic | T::Auto) {
        // ... and QUIC saw it and sent again what was lost.
        for (dp, side) in [(&web, "client"), (&echo, "server")] {
            ensure!(
                quic_metric(dp, "weft_dp_quic_packets_lost_total", side) > 0.0,
                "{side}: no QUIC packet counted as lost"
            );
        }
    }
    check_transport(&web, t)
}
