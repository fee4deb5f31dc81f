//! The generated servers and clients talk to each other over real TCP.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{Context, Result, bail, ensure};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};
use weft_api::v1::{
    CertifyRequest, CertifyResponse, DataplaneConfig, DiscoveryRequest, DiscoveryResponse,
    Endpoint, Inbound, Outbound, PermissionRule, TargetRef, certify_request,
    dataplane_config::MtlsMode,
    discovery_client::DiscoveryClient,
    discovery_request::{self, Ack, Hello},
    discovery_response::{self, Close, close},
    discovery_server::{Discovery, DiscoveryServer},
    identity_client::IdentityClient,
    identity_server::{Identity, IdentityServer},
    outbound::LoadBalancer,
    permission_rule::Action,
};

/// Signs nothing: echoes the request back in a recognisable response.
struct FakeIdentity;

#[tonic::async_trait]
impl Identity for FakeIdentity {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let req = request.into_inner();
        let Some(certify_request::Auth::Token(token)) = req.auth else {
            return Err(Status::unauthenticated(
                "no token and no client certificate",
            ));
        };
        if token != "join-token" {
            return Err(Status::permission_denied("bad token"));
        }
        Ok(Response::new(CertifyResponse {
            cert_chain_pem: format!("CHAIN FOR {}", req.csr_pem),
            trust_bundle_pem: "BUNDLE".into(),
            not_after_unix: 1_700_000_000,
            spiffe_ids: vec![format!("spiffe://{}/{}", req.mesh, req.dataplane_name)],
        }))
    }
}

/// Answers a `Hello` with one config, reports the ACK it gets, then closes the stream.
struct FakeDiscovery {
    acks: mpsc::Sender<String>,
}

fn config_for(hello: &Hello) -> DataplaneConfig {
    DataplaneConfig {
        mesh: hello.mesh.clone(),
        dataplane_name: hello.dataplane_name.clone(),
        mtls_mode: MtlsMode::Strict.into(),
        transport: weft_api::v1::dataplane_config::Transport::Quic.into(),
        trust_bundle_pem: "BUNDLE".into(),
        inbounds: vec![Inbound {
            port: 10001,
            service_address: "127.0.0.1".into(),
            service_port: 8080,
            tags: BTreeMap::from([("kuma.io/service".into(), "web".into())]),
            rules: vec![PermissionRule {
                from: Some(TargetRef {
                    kind: "Mesh".into(),
                    ..Default::default()
                }),
                action: Action::AllowWithShadowDeny.into(),
                policy: "allow-all".into(),
            }],
        }],
        outbounds: vec![Outbound {
            port: 20001,
            address: "127.0.0.1".into(),
            service: "backend".into(),
            endpoints: vec![Endpoint {
                address: "10.0.0.2".into(),
                port: 10001,
                healthy: true,
                zone: String::new(),
                tags: BTreeMap::new(),
            }],
            lb: LoadBalancer::LeastRequest.into(),
        }],
        policies_json: BTreeMap::new(),
        signing_ca_pem: String::new(),
    }
}

#[tonic::async_trait]
impl Discovery for FakeDiscovery {
    type StreamStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let acks = self.acks.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                match msg.kind {
                    Some(discovery_request::Kind::Hello(hello)) => {
                        let resp = DiscoveryResponse {
                            version: "v1".into(),
                            kind: Some(discovery_response::Kind::Config(config_for(&hello))),
                        };
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                    Some(discovery_request::Kind::Ack(Ack { version })) => {
                        let _ = acks.send(version).await;
                        let close = DiscoveryResponse {
                            version: String::new(),
                            kind: Some(discovery_response::Kind::Close(Close {
                                reason: "test over".into(),
                                code: close::Code::Draining.into(),
                            })),
                        };
                        let _ = tx.send(Ok(close)).await;
                        return;
                    }
                    _ => {}
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves both services on `127.0.0.1:0` until `shutdown` fires.
async fn serve(acks: mpsc::Sender<String>) -> Result<(SocketAddr, oneshot::Sender<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (shutdown, stop) = oneshot::channel::<()>();
    tokio::spawn(
        Server::builder()
            .add_service(IdentityServer::new(FakeIdentity))
            .add_service(DiscoveryServer::new(FakeDiscovery { acks }))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop.await;
            }),
    );
    Ok((addr, shutdown))
}

#[tokio::test]
async fn identity_certify_roundtrip() -> Result<()> {
    let (acks, _acks_rx) = mpsc::channel(1);
    let (addr, _shutdown) = serve(acks).await?;
    let mut client = IdentityClient::connect(format!("http://{addr}")).await?;

    let resp = client
        .certify(CertifyRequest {
            mesh: "default".into(),
            dataplane_name: "web-1".into(),
            csr_pem: "CSR".into(),
            auth: Some(certify_request::Auth::Token("join-token".into())),
            dataplane_yaml: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(resp.cert_chain_pem, "CHAIN FOR CSR");
    assert_eq!(resp.trust_bundle_pem, "BUNDLE");
    assert_eq!(resp.not_after_unix, 1_700_000_000);
    assert_eq!(resp.spiffe_ids, ["spiffe://default/web-1"]);

    let err = client
        .certify(CertifyRequest {
            mesh: "default".into(),
            dataplane_name: "web-1".into(),
            csr_pem: "CSR".into(),
            auth: None,
            dataplane_yaml: String::new(),
        })
        .await
        .expect_err("no token must be refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    Ok(())
}

#[tokio::test]
async fn discovery_hello_config_ack() -> Result<()> {
    let (acks, mut acks_rx) = mpsc::channel(1);
    let (addr, _shutdown) = serve(acks).await?;
    let mut client = DiscoveryClient::connect(format!("http://{addr}")).await?;

    let (req_tx, req_rx) = mpsc::channel(4);
    req_tx
        .send(DiscoveryRequest {
            kind: Some(discovery_request::Kind::Hello(Hello {
                mesh: "default".into(),
                dataplane_name: "web-1".into(),
                dataplane_yaml: "type: Dataplane\nmesh: default\nname: web-1\n".into(),
                dp_version: "0.1.0".into(),
                admin_address: "127.0.0.1:9901".into(),
                token: String::new(),
            })),
        })
        .await?;
    let mut responses = client
        .stream(ReceiverStream::new(req_rx))
        .await?
        .into_inner();

    let first = responses
        .next()
        .await
        .context("stream ended before the config")??;
    assert_eq!(first.version, "v1");
    let Some(discovery_response::Kind::Config(config)) = first.kind else {
        bail!("expected a config, got {:?}", first.kind);
    };
    assert_eq!(config.mesh, "default");
    assert_eq!(config.dataplane_name, "web-1");
    assert_eq!(config.mtls_mode(), MtlsMode::Strict);
    assert_eq!(
        config.transport(),
        weft_api::v1::dataplane_config::Transport::Quic
    );
    assert_eq!(
        config.inbounds[0].rules[0].action(),
        Action::AllowWithShadowDeny
    );
    assert_eq!(config.outbounds[0].lb(), LoadBalancer::LeastRequest);
    assert!(config.outbounds[0].endpoints[0].healthy);

    req_tx
        .send(DiscoveryRequest {
            kind: Some(discovery_request::Kind::Ack(Ack {
                version: first.version.clone(),
            })),
        })
        .await?;
    let acked = acks_rx.recv().await.context("server saw no ACK")?;
    assert_eq!(acked, "v1");

    let last = responses
        .next()
        .await
        .context("stream ended before the close")??;
    let Some(discovery_response::Kind::Close(Close { reason, code })) = last.kind else {
        bail!("expected a close, got {:?}", last.kind);
    };
    assert_eq!(reason, "test over");
    assert_eq!(code, i32::from(close::Code::Draining));
    ensure!(
        responses.next().await.is_none(),
        "stream must end after a close"
    );
    Ok(())
}
