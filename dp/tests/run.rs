//! `weft_dp::app::run` against an in-process fake control plane: a tonic server with TLS
//! (rcgen-minted PKI) implementing Identity and Discovery, driven step by step by the test.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use weft_api::v1;
use weft_api::v1::discovery_request::Kind as Req;
use weft_api::v1::discovery_response::Kind as Resp;
use weft_dp::config::Config;
use weft_dp::test_util::{TestCa, eventually, now_unix};

const TOKEN: &str = "T0K3N";
const WAIT: Duration = Duration::from_secs(15);

/// One Certify call as the fake CP saw it.
#[derive(Debug, Clone)]
struct CertifyCall {
    request: v1::CertifyRequest,
    with_cert: bool,
}

/// One discovery stream, handed to the test.
struct StreamHandle {
    requests: Streaming<v1::DiscoveryRequest>,
    responses: mpsc::Sender<Result<v1::DiscoveryResponse, Status>>,
    with_cert: bool,
    statuses: Vec<v1::discovery_request::Status>,
}

impl StreamHandle {
    /// The next message that is not a Status (Statuses are kept in `statuses`).
    async fn next(&mut self) -> Req {
        loop {
            let msg = tokio::time::timeout(WAIT, self.requests.message())
                .await
                .expect("a message from the dataplane in time")
                .expect("stream healthy")
                .expect("stream open");
            match msg.kind.expect("a kind") {
                Req::Status(s) => self.statuses.push(s),
                other => return other,
            }
        }
    }

    async fn send(&self, version: &str, kind: Resp) {
        self.responses
            .send(Ok(v1::DiscoveryResponse {
                version: version.into(),
                kind: Some(kind),
            }))
            .await
            .expect("stream open");
    }

    async fn expect_ack(&mut self, version: &str) {
        match self.next().await {
            Req::Ack(a) => assert_eq!(a.version, version),
            other => panic!("expected ACK {version}, got {other:?}"),
        }
    }
}

struct FakeCp {
    mesh_ca: Arc<Mutex<TestCa>>,
    certify_calls: Arc<Mutex<Vec<CertifyCall>>>,
    streams: mpsc::UnboundedSender<StreamHandle>,
}

#[tonic::async_trait]
impl v1::identity_server::Identity for FakeCp {
    async fn certify(
        &self,
        request: Request<v1::CertifyRequest>,
    ) -> Result<Response<v1::CertifyResponse>, Status> {
        let with_cert = request.peer_certs().is_some_and(|c| !c.is_empty());
        let request = request.into_inner();
        self.certify_calls.lock().unwrap().push(CertifyCall {
            request: request.clone(),
            with_cert,
        });
        let token_ok =
            matches!(&request.auth, Some(v1::certify_request::Auth::Token(t)) if t == TOKEN);
        if !with_cert && !token_ok {
            return Err(Status::unauthenticated("dataplane token is not valid"));
        }
        let ca = self.mesh_ca.lock().unwrap();
        let now = now_unix();
        Ok(Response::new(v1::CertifyResponse {
            cert_chain_pem: ca.sign_csr(&request.csr_pem, now - 60, now + 3600),
            trust_bundle_pem: ca.cert_pem.clone(),
            not_after_unix: now + 3600,
            spiffe_ids: vec![],
        }))
    }
}

#[tonic::async_trait]
impl v1::discovery_server::Discovery for FakeCp {
    type StreamStream = ReceiverStream<Result<v1::DiscoveryResponse, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<v1::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let with_cert = request.peer_certs().is_some_and(|c| !c.is_empty());
        let (tx, rx) = mpsc::channel(16);
        let _ = self.streams.send(StreamHandle {
            requests: request.into_inner(),
            responses: tx,
            with_cert,
            statuses: Vec::new(),
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Pki {
    cp_ca: TestCa,
    mesh_ca: Arc<Mutex<TestCa>>,
}

struct RunningCp {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_cp(
    pki: &Pki,
    addr: SocketAddr,
    certify_calls: Arc<Mutex<Vec<CertifyCall>>>,
) -> (RunningCp, SocketAddr, mpsc::UnboundedReceiver<StreamHandle>) {
    let (cert, key) = pki.cp_ca.server(addr.ip());
    let mesh_ca_pem = pki.mesh_ca.lock().unwrap().cert_pem.clone();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(mesh_ca_pem))
        .client_auth_optional(true);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind the fake CP");
    let addr = listener.local_addr().unwrap();
    let (streams_tx, streams_rx) = mpsc::unbounded_channel();
    let cp = Arc::new(FakeCp {
        mesh_ca: pki.mesh_ca.clone(),
        certify_calls,
        streams: streams_tx,
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let router = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(v1::identity_server::IdentityServer::from_arc(cp.clone()))
        .add_service(v1::discovery_server::DiscoveryServer::from_arc(cp));
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (RunningCp { stop, task }, addr, streams_rx)
}

async fn next_stream(rx: &mut mpsc::UnboundedReceiver<StreamHandle>) -> StreamHandle {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the dataplane opens a stream in time")
        .expect("fake CP running")
}

async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8(buf).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

async fn config_version(admin: &str) -> Option<String> {
    let (status, body) = http_get(admin, "/config").await?;
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    (status == 200).then(|| json["version"].as_str().map(str::to_owned))?
}

fn full_config(mesh_ca: &str, inbound_port: u32) -> Resp {
    Resp::Config(v1::DataplaneConfig {
        mesh: "default".into(),
        dataplane_name: "web-1".into(),
        mtls_mode: v1::dataplane_config::MtlsMode::Strict as i32,
        trust_bundle_pem: mesh_ca.into(),
        signing_ca_pem: mesh_ca.into(),
        inbounds: vec![v1::Inbound {
            port: inbound_port,
            service_address: "127.0.0.1".into(),
            service_port: 8080,
            tags: [("kuma.io/service".to_owned(), "web".to_owned())].into(),
            rules: vec![],
        }],
        ..Default::default()
    })
}

fn start_dp(config: Config) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        weft_dp::app::run(config, async {
            let _ = stopped.await;
        })
        .await
        .expect("app runs and stops cleanly");
    });
    (stop, task)
}

fn admin_address(state: &Path) -> Option<String> {
    std::fs::read_to_string(state.join("admin-address"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_acks_nacks_serves_config_and_survives_cp_restart() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let pki = Pki {
        cp_ca: TestCa::new("cp ca"),
        mesh_ca: Arc::new(Mutex::new(TestCa::new("mesh ca"))),
    };
    let mesh_ca_pem = pki.mesh_ca.lock().unwrap().cert_pem.clone();
    std::fs::write(dir.path().join("ca.pem"), &pki.cp_ca.cert_pem).unwrap();
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        dir.path().join("dp.yaml"),
        "type: Dataplane\nmesh: default\nname: {{ name }}\nnetworking:\n  address: 127.0.0.1\n  \
         inbound:\n    - port: 15000\n      servicePort: 8080\n      tags:\n        kuma.io/service: web\n",
    )
    .unwrap();

    let calls = Arc::new(Mutex::new(Vec::new()));
    let (cp, cp_addr, mut streams) =
        start_cp(&pki, "127.0.0.1:0".parse().unwrap(), calls.clone()).await;
    let config = Config {
        cp_address: format!("https://{cp_addr}"),
        ca_cert_file: dir.path().join("ca.pem"),
        dataplane_file: dir.path().join("dp.yaml"),
        dataplane_token_file: Some(dir.path().join("token")),
        state_dir: state.clone(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        dataplane_vars: [("name".to_owned(), "web-1".to_owned())].into(),
        reconnect_max_backoff: Duration::from_millis(500),
        status_interval: Duration::from_secs(1),
        drain_timeout: Duration::from_secs(1),
        worker_threads: None,
        tls_resumption: true,
        quic_congestion: Default::default(),
    };
    let (dp_stop, dp_task) = start_dp(config.clone());

    // Certify with the token first, then Hello authenticated by the new certificate.
    let mut s = next_stream(&mut streams).await;
    {
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert!(!calls[0].with_cert);
        assert!(
            matches!(&calls[0].request.auth, Some(v1::certify_request::Auth::Token(t)) if t == TOKEN)
        );
        assert_eq!(calls[0].request.dataplane_name, "web-1");
        assert!(
            calls[0].request.dataplane_yaml.contains("name: web-1"),
            "substituted"
        );
    }
    let key_mode = std::fs::metadata(state.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert!(
        std::fs::read_to_string(state.join("cert.pem"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let admin = admin_address(&state).expect("admin-address written before the stream opens");
    let Req::Hello(hello) = s.next().await else {
        panic!("the first message is a Hello")
    };
    assert!(
        s.with_cert,
        "the stream is authenticated by the client certificate"
    );
    assert_eq!(
        hello.token, "",
        "no token once the dataplane has a certificate"
    );
    assert_eq!(
        (hello.mesh.as_str(), hello.dataplane_name.as_str()),
        ("default", "web-1")
    );
    assert_eq!(hello.dp_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(hello.admin_address, admin);
    assert!(hello.dataplane_yaml.contains("kuma.io/service: web"));

    // Before any config: /config is 503 with a null version, /ready is 503.
    let (status, body) = http_get(&admin, "/config").await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("\"version\":null"), "{body}");
    assert_eq!(http_get(&admin, "/ready").await.unwrap().0, 503);

    // A complete config is ACKed, followed by a status report.
    s.send("v1", full_config(&mesh_ca_pem, 15000)).await;
    s.expect_ack("v1").await;
    let status = tokio::time::timeout(WAIT, s.requests.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(Req::Status(status)) = status.kind else {
        panic!("a Status follows the first ACK, got {status:?}")
    };
    assert!(status.cert_not_after_unix > now_unix());
    assert_eq!(status.inbounds.len(), 1);
    assert_eq!(status.inbounds[0].port, 15000);
    eventually("/config at v1", WAIT, || async {
        (config_version(&admin).await? == "v1").then_some(())
    })
    .await;
    assert_eq!(
        http_get(&admin, "/ready").await.unwrap(),
        (200, "ready\n".to_owned())
    );

    // A delta on top of it is ACKed and shows on /config.
    s.send(
        "v2",
        Resp::Delta(v1::ConfigDelta {
            base_version: "v1".into(),
            upsert_outbounds: vec![v1::Outbound {
                port: 10001,
                address: "127.0.0.1".into(),
                service: "api".into(),
                endpoints: vec![],
                lb: 0,
            }],
            ..Default::default()
        }),
    )
    .await;
    s.expect_ack("v2").await;
    eventually("/config at v2", WAIT, || async {
        (config_version(&admin).await? == "v2").then_some(())
    })
    .await;
    let (_, body) = http_get(&admin, "/config").await.unwrap();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["config"]["outbounds"][0]["service"], "api");
    assert_eq!(json["config"]["outbounds"][0]["lb"], "RoundRobin");
    assert_eq!(json["config"]["inbounds"][0]["servicePort"], 8080);

    // A delta on a stale base is NACKed with the reason; v2 stays.
    s.send(
        "v3",
        Resp::Delta(v1::ConfigDelta {
            base_version: "v1".into(),
            remove_outbounds: vec!["127.0.0.1:10001".into()],
            ..Default::default()
        }),
    )
    .await;
    match s.next().await {
        Req::Nack(n) => {
            assert_eq!(n.version, "v3");
            assert_eq!(n.error, "delta base v1 does not match current v2");
        }
        other => panic!("expected a NACK, got {other:?}"),
    }
    assert_eq!(config_version(&admin).await.as_deref(), Some("v2"));
    let (_, metrics) = http_get(&admin, "/metrics").await.unwrap();
    for needle in [
        "weft_dp_cp_connected 1",
        "weft_dp_configs_applied_total 2",
        "weft_dp_configs_rejected_total 1",
    ] {
        assert!(metrics.contains(needle), "{needle} missing in\n{metrics}");
    }

    // The CP goes away and comes back on the same address: the dataplane keeps serving v2,
    // then reconnects with its certificate.
    let _ = cp.stop.send(());
    drop(s);
    tokio::time::timeout(WAIT, cp.task)
        .await
        .expect("fake CP stops")
        .unwrap();
    assert_eq!(
        config_version(&admin).await.as_deref(),
        Some("v2"),
        "static stability"
    );
    let (cp, _, mut streams) = start_cp(&pki, cp_addr, calls.clone()).await;
    let mut s = next_stream(&mut streams).await;
    let Req::Hello(hello) = s.next().await else {
        panic!("Hello first")
    };
    assert!(s.with_cert);
    assert_eq!(hello.token, "");
    s.send("v10", full_config(&mesh_ca_pem, 15000)).await;
    s.expect_ack("v10").await;
    eventually("/config at v10", WAIT, || async {
        (config_version(&admin).await? == "v10").then_some(())
    })
    .await;
    let (_, metrics) = http_get(&admin, "/metrics").await.unwrap();
    assert!(
        !metrics.contains("weft_dp_cp_reconnects_total 0"),
        "{metrics}"
    );

    // Graceful stop.
    let _ = dp_stop.send(());
    tokio::time::timeout(WAIT, dp_task)
        .await
        .expect("dataplane stops")
        .unwrap();
    let persisted: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("config.json")).unwrap()).unwrap();
    assert_eq!(persisted["version"], "v10");

    // A restart after the token is gone reuses the certificate and serves the persisted
    // config before the CP answers.
    std::fs::remove_file(dir.path().join("token")).unwrap();
    let certify_calls_before = calls.lock().unwrap().len();
    let (dp_stop, dp_task) = start_dp(config);
    let mut s = next_stream(&mut streams).await;
    let Req::Hello(hello) = s.next().await else {
        panic!("Hello first")
    };
    assert!(s.with_cert && hello.token.is_empty());
    assert_eq!(
        calls.lock().unwrap().len(),
        certify_calls_before,
        "no Certify: cert reused"
    );
    let admin = admin_address(&state).unwrap();
    assert_eq!(
        config_version(&admin).await.as_deref(),
        Some("v10"),
        "persisted config served"
    );

    let _ = dp_stop.send(());
    tokio::time::timeout(WAIT, dp_task)
        .await
        .expect("dataplane stops")
        .unwrap();
    drop(s);
    let _ = cp.stop.send(());
}
