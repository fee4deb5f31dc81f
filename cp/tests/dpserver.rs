//! The dataplane server through its public gRPC API, over real TLS, with a real tonic client:
//! joining with a token, renewing with the certificate, the config stream (complete config,
//! deltas, NACK), and closing streams on revocation and deletion.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use weft_api::v1::{
    CertifyRequest, DiscoveryRequest, DiscoveryResponse, certify_request,
    dataplane_config::MtlsMode,
    discovery_client::DiscoveryClient,
    discovery_request::{Ack, Hello, Kind as Req, Nack},
    discovery_response::{Kind as Resp, close::Code},
    identity_client::IdentityClient,
};
use weft_cp::app::{self, Listeners};
use weft_cp::config::{Config, StoreType};
use weft_cp::insight;
use weft_cp::model::Resource;
use weft_cp::store::{MemoryStore, Precondition, ResourceKey, Store};
use weft_cp::{ca, keys, tokens};

struct Cp {
    store: Arc<dyn Store>,
    dp_server: SocketAddr,
    ca_pem: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Result<Cp> {
    let dir = tempfile::tempdir()?;
    let config = Config {
        store_type: StoreType::Memory,
        api_address: "127.0.0.1:0".parse()?,
        diagnostics_address: "127.0.0.1:0".parse()?,
        dp_server_address: "127.0.0.1:0".parse()?,
        dp_server_tls_dir: dir.path().join("tls"),
        ..Config::default()
    };
    let listeners = Listeners::bind(&config).await?;
    let dp_server = listeners.dp_server.local_addr()?;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app::run(config, store.clone(), listeners, async move {
        let _ = stopped.await;
    }));
    let ca_file = dir.path().join("tls/ca.pem");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(pem) = std::fs::read_to_string(&ca_file)
            && tokio::net::TcpStream::connect(dp_server).await.is_ok()
            && store.get(&ResourceKey::mesh("default"))?.is_some()
        {
            return Ok(Cp {
                store,
                dp_server,
                ca_pem: pem,
                _dir: dir,
                _stop: stop,
            });
        }
        ensure!(Instant::now() < deadline, "the CP did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Cp {
    async fn channel(&self, identity: Option<(&str, &str)>) -> Result<Channel> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Ok(
            Endpoint::from_shared(format!("https://{}", self.dp_server))?
                .tls_config(tls)?
                .connect()
                .await?,
        )
    }

    fn token(&self, name: Option<&str>, services: &[&str]) -> Result<(String, tokens::Claims)> {
        let key = keys::current(self.store.as_ref(), "default")?;
        let tags = BTreeMap::from([(
            "kuma.io/service".to_owned(),
            services.iter().map(|s| (*s).to_owned()).collect(),
        )]);
        Ok(tokens::issue(
            &key,
            "default",
            name,
            tags,
            Duration::from_secs(3600),
            time::OffsetDateTime::now_utc(),
        )?)
    }

    fn put(&self, doc: serde_json::Value) -> Result<()> {
        let r = Resource::from_json(&doc).map_err(|e| anyhow::anyhow!("{e}"))?;
        let key = ResourceKey::new(r.kind.type_name(), r.mesh.as_deref().unwrap_or(""), &r.name);
        self.store
            .put(&key, serde_json::to_vec(&r.to_json())?, Precondition::None)?;
        Ok(())
    }
}

fn csr(key: &rcgen::KeyPair, services: &[&str]) -> String {
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = services
        .iter()
        .map(|s| rcgen::SanType::URI(format!("spiffe://default/{s}").try_into().unwrap()))
        .collect();
    p.serialize_request(key).unwrap().pem().unwrap()
}

fn dataplane_yaml(name: &str, service: &str, port: u16, outbound: Option<&str>) -> String {
    let mut y = format!(
        "type: Dataplane\nmesh: default\nname: {name}\nnetworking:\n  address: 127.0.0.2\n  inbound:\n  - port: {port}\n    servicePort: 8080\n    tags:\n      kuma.io/service: {service}\n"
    );
    if let Some(o) = outbound {
        y += &format!("  outbound:\n  - port: 10001\n    tags:\n      kuma.io/service: {o}\n");
    }
    y
}

struct Stream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl Stream {
    async fn open(ch: Channel, hello: Hello) -> Result<Stream, tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(DiscoveryRequest {
            kind: Some(Req::Hello(hello)),
        })
        .await
        .expect("queue hello");
        let rx = DiscoveryClient::new(ch)
            .stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Stream { tx, rx })
    }

    async fn next(&mut self, within: Duration) -> Result<DiscoveryResponse> {
        timeout(within, self.rx.message())
            .await
            .context("no message in time")??
            .context("stream ended")
    }

    async fn send(&self, kind: Req) -> Result<()> {
        self.tx
            .send(DiscoveryRequest { kind: Some(kind) })
            .await
            .context("stream closed")
    }

    async fn ack(&self, version: &str) -> Result<()> {
        self.send(Req::Ack(Ack {
            version: version.into(),
        }))
        .await
    }
}

fn hello(name: &str, yaml: String, token: &str) -> Hello {
    Hello {
        mesh: "default".into(),
        dataplane_name: name.into(),
        dataplane_yaml: yaml,
        dp_version: "test".into(),
        admin_address: "127.0.0.1:9901".into(),
        token: token.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_renew_stream_and_revoke() -> Result<()> {
    let cp = start().await?;
    let (token, claims) = cp.token(Some("web-1"), &["web"])?;
    let key = rcgen::KeyPair::generate()?;
    let yaml = dataplane_yaml("web-1", "web", 20001, Some("backend"));

    // A first join: token, no client certificate.
    let mut id = IdentityClient::new(cp.channel(None).await?);
    let req = |token: Option<&str>, csr_pem: String| CertifyRequest {
        mesh: "default".into(),
        dataplane_name: "web-1".into(),
        csr_pem,
        auth: token.map(|t| certify_request::Auth::Token(t.into())),
        dataplane_yaml: yaml.clone(),
    };
    let bad = id
        .certify(req(Some("not-a-token"), csr(&key, &["web"])))
        .await
        .expect_err("a bad token is refused");
    assert_eq!(bad.code(), tonic::Code::Unauthenticated, "{bad:?}");
    let wrong = id
        .certify(req(Some(&token), csr(&key, &["web", "db"])))
        .await
        .expect_err("a service the token does not allow is refused");
    assert_eq!(wrong.code(), tonic::Code::PermissionDenied);
    assert!(wrong.message().contains("db"), "{}", wrong.message());
    let issued = id
        .certify(req(Some(&token), csr(&key, &["web"])))
        .await?
        .into_inner();
    assert_eq!(issued.spiffe_ids, ["spiffe://default/web"]);
    ca::verify_chain(&issued.cert_chain_pem, &issued.trust_bundle_pem)?;
    assert_eq!(
        ca::spiffe_ids_of(&issued.cert_chain_pem)?,
        issued.spiffe_ids
    );

    // Renewal with the certificate alone.
    let key_pem = key.serialize_pem();
    let with_cert = cp.channel(Some((&issued.cert_chain_pem, &key_pem))).await?;
    let renewed = IdentityClient::new(with_cert.clone())
        .certify(req(None, csr(&key, &["web"])))
        .await?
        .into_inner();
    ca::verify_chain(&renewed.cert_chain_pem, &renewed.trust_bundle_pem)?;
    // Without a token or a certificate there is nothing to go on.
    let anon = IdentityClient::new(cp.channel(None).await?)
        .certify(req(None, csr(&key, &["web"])))
        .await
        .expect_err("anonymous");
    assert_eq!(anon.code(), tonic::Code::Unauthenticated);

    // The stream, authenticated by the certificate; it registers the Dataplane.
    let mut s = Stream::open(with_cert.clone(), hello("web-1", yaml.clone(), ""))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let first = s.next(Duration::from_secs(5)).await?;
    let Some(Resp::Config(cfg)) = &first.kind else {
        bail!("first message must be a complete config, got {first:?}");
    };
    assert_eq!(cfg.mtls_mode, i32::from(MtlsMode::Strict));
    assert_eq!(cfg.inbounds.len(), 1);
    assert_eq!(
        (cfg.inbounds[0].port, cfg.inbounds[0].service_port),
        (20001, 8080)
    );
    assert!(cfg.inbounds[0].rules.is_empty(), "no permission yet");
    assert_eq!(cfg.outbounds[0].service, "backend");
    assert!(cfg.outbounds[0].endpoints.is_empty());
    assert_eq!(cfg.trust_bundle_pem, issued.trust_bundle_pem);
    assert!(
        cp.store
            .get(&ResourceKey::new("Dataplane", "default", "web-1"))?
            .is_some()
    );
    s.ack(&first.version).await?;

    // A permission shows up as a delta touching only the inbound, within a second.
    let t0 = Instant::now();
    cp.put(
        serde_json::json!({"type": "MeshTrafficPermission", "mesh": "default", "name": "allow-all",
        "spec": {"targetRef": {"kind": "Mesh"}, "from": [{"targetRef": {"kind": "Mesh"},
        "default": {"action": "Allow"}}]}}),
    )?;
    let d = s.next(Duration::from_secs(1)).await?;
    let Some(Resp::Delta(delta)) = &d.kind else {
        bail!("expected a delta, got {d:?}");
    };
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(delta.base_version, first.version);
    assert_eq!(delta.upsert_inbounds.len(), 1);
    assert_eq!(delta.upsert_inbounds[0].rules[0].policy, "allow-all");
    assert!(delta.upsert_outbounds.is_empty() && delta.trust_bundle_pem.is_none());
    s.ack(&d.version).await?;

    // A backend instance appears in the outbound; the dataplane NACKs it and gets it complete.
    let (btoken, _) = cp.token(None, &["backend"])?;
    let mut b = Stream::open(
        cp.channel(None).await?,
        hello(
            "backend-1",
            dataplane_yaml("backend-1", "backend", 20002, None),
            &btoken,
        ),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let bfirst = b.next(Duration::from_secs(5)).await?;
    b.ack(&bfirst.version).await?;
    let d = s.next(Duration::from_secs(2)).await?;
    let Some(Resp::Delta(delta)) = &d.kind else {
        bail!("expected a delta, got {d:?}");
    };
    assert_eq!(delta.upsert_outbounds[0].endpoints[0].port, 20002);
    s.send(Req::Nack(Nack {
        version: d.version.clone(),
        error: "testing a NACK".into(),
    }))
    .await?;
    let again = s.next(Duration::from_secs(2)).await?;
    let Some(Resp::Config(full)) = &again.kind else {
        bail!("a NACKed delta is followed by the complete config, got {again:?}");
    };
    assert_eq!(again.version, d.version);
    assert_eq!(full.outbounds[0].endpoints.len(), 1);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let i = insight::load(cp.store.as_ref(), "default", "web-1")?.unwrap_or_default();
        if i.config.nack_error.as_deref() == Some("testing a NACK") {
            assert_eq!(i.status, insight::Status::Online);
            assert_eq!(i.admin_address.as_deref(), Some("127.0.0.1:9901"));
            assert_eq!(i.certs_issued, 2);
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the NACK is not in the insight: {i:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.ack(&again.version).await?;

    // Deleting backend-1 closes its stream at once.
    let t0 = Instant::now();
    cp.store.delete(
        &ResourceKey::new("Dataplane", "default", "backend-1"),
        Precondition::None,
    )?;
    let close = b.next(Duration::from_secs(1)).await?;
    let Some(Resp::Close(c)) = &close.kind else {
        bail!("expected a close, got {close:?}");
    };
    assert_eq!(c.code, i32::from(Code::Deleted));
    assert!(t0.elapsed() < Duration::from_secs(1));

    // Revoking web-1's token closes its stream within a second and refuses renewal.
    let t0 = Instant::now();
    keys::revoke(cp.store.as_ref(), "default", &claims.jti, Some(claims.exp))?;
    let close = loop {
        let m = s.next(Duration::from_secs(1)).await?;
        if matches!(m.kind, Some(Resp::Close(_))) {
            break m;
        }
        // An endpoint update for backend-1's removal may come first; the stream may already
        // be closing when the ACK goes out.
        let _ = s.ack(&m.version).await;
    };
    assert!(t0.elapsed() < Duration::from_secs(1));
    let Some(Resp::Close(c)) = close.kind else {
        unreachable!()
    };
    assert_eq!(c.code, i32::from(Code::Revoked), "{c:?}");
    let refused = IdentityClient::new(with_cert.clone())
        .certify(req(None, csr(&key, &["web"])))
        .await
        .expect_err("renewal after revocation");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("revoked"),
        "{}",
        refused.message()
    );
    let refused = Stream::open(with_cert, hello("web-1", yaml, ""))
        .await
        .err()
        .context("a stream after revocation must be refused")?;
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_authenticates_only_its_own_dataplane() -> Result<()> {
    let cp = start().await?;
    let (token, _) = cp.token(Some("web-1"), &["web"])?;
    let key = rcgen::KeyPair::generate()?;
    let issued = IdentityClient::new(cp.channel(None).await?)
        .certify(CertifyRequest {
            mesh: "default".into(),
            dataplane_name: "web-1".into(),
            csr_pem: csr(&key, &["web"]),
            auth: Some(certify_request::Auth::Token(token.clone())),
            dataplane_yaml: dataplane_yaml("web-1", "web", 20001, None),
        })
        .await?
        .into_inner();
    let ch = cp
        .channel(Some((&issued.cert_chain_pem, &key.serialize_pem())))
        .await?;
    // web-1's certificate cannot register web-2, nor a service it does not hold.
    let e = Stream::open(
        ch.clone(),
        hello("web-2", dataplane_yaml("web-2", "web", 20002, None), ""),
    )
    .await
    .err()
    .context("another dataplane's certificate must be refused")?;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("web-1"), "{}", e.message());
    let e = Stream::open(
        ch,
        hello("web-1", dataplane_yaml("web-1", "db", 20001, None), ""),
    )
    .await
    .err()
    .context("a service outside the certificate must be refused")?;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("\"db\""), "{}", e.message());
    // A token bound to web-1 does not let web-2 in either.
    let e = Stream::open(
        cp.channel(None).await?,
        hello("web-2", dataplane_yaml("web-2", "web", 20002, None), &token),
    )
    .await
    .err()
    .context("a token bound to another name must be refused")?;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    // A Dataplane with an error is refused with the field's path.
    let e = Stream::open(
        cp.channel(None).await?,
        hello("web-1", dataplane_yaml("web-1", "web", 0, None), &token),
    )
    .await
    .err()
    .context("an invalid Dataplane must be refused")?;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("networking.inbound[0].port"),
        "{}",
        e.message()
    );
    Ok(())
}

/// Runs a CP on `store` with its dataplane server on `dp_server` until `stop` fires.
async fn run_cp(
    store: Arc<dyn Store>,
    tls_dir: &std::path::Path,
    dp_server: SocketAddr,
) -> Result<(
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<()>>,
)> {
    let config = Config {
        store_type: StoreType::Memory,
        api_address: "127.0.0.1:0".parse()?,
        diagnostics_address: "127.0.0.1:0".parse()?,
        dp_server_address: dp_server,
        dp_server_tls_dir: tls_dir.to_owned(),
        ..Config::default()
    };
    let listeners = Listeners::bind(&config).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(app::run(config, store, listeners, async move {
        let _ = stopped.await;
    }));
    Ok((stop, done))
}

/// One simulated dataplane: connects (retrying every 50 ms, with no jitter: the worst case
/// for the CP), says Hello with the shared token, ACKs its first config, reports it synced,
/// and starts over when its stream ends.
async fn simulated_dataplane(
    i: usize,
    dp_server: SocketAddr,
    ca_pem: String,
    token: String,
    synced: mpsc::UnboundedSender<usize>,
) {
    let yaml = dataplane_yaml(&format!("dp-{i}"), "svc", 20000, None);
    loop {
        let attempt = async {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca_pem))
                .domain_name("localhost");
            let ch = Endpoint::from_shared(format!("https://{dp_server}"))?
                .tls_config(tls)?
                .connect()
                .await?;
            let mut s = Stream::open(ch, hello(&format!("dp-{i}"), yaml.clone(), &token))
                .await
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let first = s.next(Duration::from_secs(120)).await?;
            ensure!(matches!(first.kind, Some(Resp::Config(_))), "{first:?}");
            s.ack(&first.version).await?;
            let _ = synced.send(i);
            // Hold the stream until the CP ends it.
            while s.rx.message().await.ok().flatten().is_some() {}
            anyhow::Ok(())
        };
        let _ = attempt.await;
        if synced.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_synced(rx: &mut mpsc::UnboundedReceiver<usize>, n: usize, what: &str) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while seen.len() < n {
        let i = timeout(
            deadline.saturating_duration_since(Instant::now()),
            rx.recv(),
        )
        .await
        .with_context(|| format!("{what}: only {} of {n} dataplanes in sync", seen.len()))?
        .context("all dataplanes stopped")?;
        seen.insert(i);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_cp_serves_1000_reconnecting_dataplanes() -> Result<()> {
    const N: usize = 1000;
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let dp_server: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let tls_dir = dir.path().join("tls");
    let (stop, done) = run_cp(store.clone(), &tls_dir, dp_server).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.get(&ResourceKey::mesh("default"))?.is_none()
        || !tls_dir.join("ca.pem").exists()
        || tokio::net::TcpStream::connect(dp_server).await.is_err()
    {
        ensure!(Instant::now() < deadline, "the CP did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ca_pem = std::fs::read_to_string(tls_dir.join("ca.pem"))?;
    let key = keys::current(store.as_ref(), "default")?;
    let (token, _) = tokens::issue(
        &key,
        "default",
        None,
        BTreeMap::from([("kuma.io/service".to_owned(), vec!["svc".to_owned()])]),
        Duration::from_secs(3600),
        time::OffsetDateTime::now_utc(),
    )?;

    let (synced_tx, mut synced) = mpsc::unbounded_channel();
    let mut dps = tokio::task::JoinSet::new();
    for i in 0..N {
        dps.spawn(simulated_dataplane(
            i,
            dp_server,
            ca_pem.clone(),
            token.clone(),
            synced_tx.clone(),
        ));
    }
    drop(synced_tx);
    let t0 = Instant::now();
    wait_synced(&mut synced, N, "first connect").await?;
    let first = t0.elapsed();

    // The CP goes away; every dataplane starts reconnecting at once.
    let _ = stop.send(());
    done.await??;
    let (stop, done) = run_cp(store.clone(), &tls_dir, dp_server).await?;
    let t0 = Instant::now();
    wait_synced(&mut synced, N, "after the CP came back").await?;
    let again = t0.elapsed();
    eprintln!("{N} dataplanes in sync: first {first:?}, after a CP restart {again:?}");
    let online = insight::load_all(store.as_ref(), Some("default"))?
        .values()
        .filter(|i| i.status == insight::Status::Online)
        .count();
    assert_eq!(online, N, "every dataplane is Online in its insight");
    drop(synced);
    dps.abort_all();
    let _ = stop.send(());
    done.await??;
    Ok(())
}
