//! `Discovery.Stream`: one session per connected dataplane.
//!
//! The handler reads the `Hello`, authenticates, registers (creates or updates) the
//! Dataplane, then spawns the session, which:
//! - compiles the dataplane's config whenever its mesh's view changes in a way that touches
//!   it (`Inputs`: pointer comparisons, no compile when nothing it uses changed) and hands
//!   it to the ACK/NACK state, which decides what to send (complete or delta);
//! - records ACKs, NACKs and status reports in the dataplane's insight;
//! - closes the stream at once when the registry asks it to (its token revoked, its Dataplane
//!   or mesh deleted, another stream replaced it, the CP drains: see `DpServer::watch_store`).
//!
//! The service is [`DiscoveryService`], not the generated `DiscoveryServer`: the same handler,
//! with small codec buffers (see [`CODEC_BUFFER`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::codec::{BufferSettings, Codec};
use tonic::codegen::{Body as HttpBody, BoxFuture, Service, StdError};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::{ProstDecoder, ProstEncoder};
use weft_api::v1::discovery_request::{self, Hello};
use weft_api::v1::discovery_response::{self, Close, close::Code as CloseCode};
use weft_api::v1::discovery_server::{Discovery, DiscoveryServer};
use weft_api::v1::{DataplaneConfig, DiscoveryRequest, DiscoveryResponse};

use crate::index::{EndpointInfo, MeshView};
use crate::insight::{self, Status as Online};
use crate::metrics::{BodyLabels, ReasonLabels};
use crate::model::{Kind, Resource};
use crate::store::{self, Precondition, ResourceKey};

use super::DpServer;
use super::ack::{AckState, Body, Outgoing};
use super::auth::{self, Caller};
use super::certify::reason_of;
use super::compile::{compile, version_of};

/// Messages queued towards one dataplane.
const OUTBOX: usize = 8;

/// One message queued towards a dataplane, boxed. A channel allocates its slots 32 at a time
/// whatever its capacity, so queueing `Result<DiscoveryResponse, Status>` by value (a few
/// hundred bytes) cost every session ~8 KiB for a queue that is nearly always empty; a pair
/// of pointers costs 16 bytes a slot.
type Queued = Result<Box<DiscoveryResponse>, Box<Status>>;

/// The response stream of one session: the receiving end of its outbox.
pub struct Outbox(mpsc::Receiver<Queued>);

impl Stream for Outbox {
    type Item = Result<DiscoveryResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0
            .poll_recv(cx)
            .map(|m| m.map(|r| r.map(|b| *b).map_err(|s| *s)))
    }
}

/// Initial size of a stream's encode and decode buffers. tonic's default is 8 KiB each way, and
/// a stream keeps both for its whole life: 16 KiB per connected dataplane, for ACKs of a few
/// dozen bytes and configs that are usually far smaller. The buffers grow when a message needs
/// more, so this bounds nothing.
const CODEC_BUFFER: usize = 1024;
/// Encoded responses are handed to HTTP/2 once this many bytes are buffered (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `weft.v1.Discovery` over [`DpServer`]: `Stream` with [`CODEC_BUFFER`]-sized buffers; any
/// other path is answered by the generated server (`Unimplemented`).
#[derive(Clone)]
pub struct DiscoveryService(Arc<DpServer>);

impl DiscoveryService {
    /// The service of `server`.
    pub fn new(server: Arc<DpServer>) -> DiscoveryService {
        DiscoveryService(server)
    }
}

impl NamedService for DiscoveryService {
    const NAME: &'static str = <DiscoveryServer<DpServer> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for DiscoveryService
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/weft.v1.Discovery/Stream" {
            return DiscoveryServer::from_arc(self.0.clone()).call(req);
        }
        let method = StreamMethod(self.0.clone());
        Box::pin(async move { Ok(Grpc::new(SmallBuffers).streaming(method, req).await) })
    }
}

/// `Discovery.Stream` as tonic's server machinery calls it.
struct StreamMethod(Arc<DpServer>);

impl StreamingService<DiscoveryRequest> for StreamMethod {
    type Response = DiscoveryResponse;
    type ResponseStream = Outbox;
    type Future = BoxFuture<Response<Outbox>, Status>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move { Discovery::stream(server.as_ref(), request).await })
    }
}

/// The prost codec with [`CODEC_BUFFER`]-sized buffers.
struct SmallBuffers;

impl Codec for SmallBuffers {
    type Encode = DiscoveryResponse;
    type Decode = DiscoveryRequest;
    type Encoder = ProstEncoder<DiscoveryResponse>;
    type Decoder = ProstDecoder<DiscoveryRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(CODEC_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(CODEC_BUFFER, YIELD_THRESHOLD))
    }
}

#[tonic::async_trait]
impl Discovery for DpServer {
    type StreamStream = Outbox;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let certs = request.peer_certs();
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(self.settings.hello_timeout, inbound.message()).await
        {
            Ok(Ok(Some(DiscoveryRequest {
                kind: Some(discovery_request::Kind::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ));
            }
            Ok(Ok(None)) => return Err(Status::cancelled("stream ended before a Hello")),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no Hello in time")),
        };
        let (mesh, name) = (hello.mesh.clone(), hello.dataplane_name.clone());
        let admitted = self.admit(&hello, certs).await;
        let (caller, dataplane) = match admitted {
            Ok(x) => x,
            Err(s) => {
                self.metrics
                    .dp_refused
                    .get_or_create(&ReasonLabels {
                        reason: reason_of(&s),
                    })
                    .inc();
                tracing::warn!(%mesh, dataplane = %name, ?peer, reason = %s.message(), "refused a dataplane stream");
                return Err(s);
            }
        };
        let (id, close_rx) = self.open_session(&mesh, &name, caller.token_id());
        let now = OffsetDateTime::now_utc();
        let (m, n) = (mesh.clone(), name.clone());
        let (dp_version, admin) = (hello.dp_version.clone(), hello.admin_address.clone());
        let session_tag = id.to_string();
        self.blocking(move |s| {
            insight::update(s, &m, &n, |i| {
                i.status = Online::Online;
                i.connected_since = Some(now);
                i.dp_version = Some(dp_version).filter(|v| !v.is_empty());
                i.admin_address = Some(admin).filter(|v| !v.is_empty());
                i.session = Some(session_tag);
                // Renewals are counted per dataplane process; it reports them again.
                i.cert_renewals = 0;
            })
        })
        .await?
        .map_err(|e| Status::unavailable(e.to_string()))?;
        tracing::info!(%mesh, dataplane = %name, ?peer, auth = caller.method(), session = id, "dataplane connected");
        let Some(server) = self.this.upgrade() else {
            return Err(Status::unavailable("control plane is shutting down"));
        };
        let (tx, rx) = mpsc::channel(OUTBOX);
        let session = Session {
            server,
            mesh,
            name,
            id,
            dataplane: Arc::new(dataplane),
            tx,
            ack: AckState::new(self.settings.ack_timeout),
            inputs: None,
        };
        self.metrics.dp_streams.inc();
        tokio::spawn(session.run(inbound, close_rx));
        Ok(Response::new(Outbox(rx)))
    }
}

impl DpServer {
    /// Authenticates a `Hello` and registers its Dataplane.
    async fn admit(
        &self,
        hello: &Hello,
        certs: Option<Arc<Vec<rustls_pki_types::CertificateDer<'static>>>>,
    ) -> Result<(Caller, Resource), Status> {
        let (mesh, name) = (hello.mesh.as_str(), hello.dataplane_name.as_str());
        if mesh.is_empty() || name.is_empty() {
            return Err(Status::invalid_argument(
                "mesh and dataplane_name are required",
            ));
        }
        let view = auth::view(self, mesh)?;
        let caller = auth::authenticate(self, &view, mesh, name, &hello.token, certs).await?;
        let key = ResourceKey::new(Kind::Dataplane.type_name(), mesh, name);
        let dataplane = if hello.dataplane_yaml.trim().is_empty() {
            None
        } else {
            Some(auth::parse_dataplane(&hello.dataplane_yaml, mesh, name)?)
        };
        if let Some(dp) = &dataplane {
            auth::check_dataplane_allowed(&caller, dp, mesh)?;
        }
        let join = caller.join_record();
        let (m, n) = (mesh.to_owned(), name.to_owned());
        let registered = self
            .blocking(move |s| -> Result<Option<Resource>, Status> {
                let unavailable = |e: store::Error| Status::unavailable(e.to_string());
                for _ in 0..3 {
                    let current = s.get(&key).map_err(unavailable)?;
                    let Some(dp) = &dataplane else {
                        // No Dataplane sent: use the registered one.
                        return match current {
                            Some(c) => {
                                let v: serde_json::Value = serde_json::from_slice(&c.body)
                                    .map_err(|e| Status::internal(e.to_string()))?;
                                Resource::from_json(&v)
                                    .map(Some)
                                    .map_err(|e| Status::internal(e.to_string()))
                            }
                            None => Err(Status::failed_precondition(format!(
                                "dataplane {n:?} is not registered in mesh {m:?}: send it in the Hello"
                            ))),
                        };
                    };
                    let body = serde_json::to_vec(&dp.to_json())
                        .map_err(|e| Status::internal(e.to_string()))?;
                    let pre = match &current {
                        Some(c) if c.body == body => break,
                        Some(c) => Precondition::Version(c.version),
                        None => Precondition::Absent,
                    };
                    match s.put(&key, body, pre) {
                        Ok(o) => {
                            tracing::info!(mesh = %m, dataplane = %n, created = o.created, "registered the dataplane");
                            break;
                        }
                        Err(store::Error::Conflict { .. }) => continue,
                        Err(e) => return Err(unavailable(e)),
                    }
                }
                if let Some(j) = &join {
                    insight::record_join(s, &m, &n, j)
                        .map_err(|e| Status::unavailable(e.to_string()))?;
                }
                Ok(dataplane)
            })
            .await??;
        let Some(dp) = registered.filter(|d| d.dataplane().is_some()) else {
            return Err(Status::internal(
                "dataplane registration returned no Dataplane",
            ));
        };
        // For a Dataplane taken from the store, check it against the credentials too.
        auth::check_dataplane_allowed(&caller, &dp, mesh)?;
        Ok((caller, dp))
    }
}

/// What a dataplane's config was compiled from, compared by pointer: if none changed, the
/// config did not change either.
#[derive(Clone)]
struct Inputs {
    mesh: Arc<Resource>,
    cas: Option<Arc<crate::meshca::MeshCas>>,
    dataplane: Arc<Resource>,
    mtps: Arc<Vec<Arc<Resource>>>,
    mlbs: Arc<Vec<Arc<Resource>>>,
    endpoints: BTreeMap<String, Option<Arc<Vec<EndpointInfo>>>>,
}

impl Inputs {
    fn of(view: &MeshView, dataplane: &Arc<Resource>) -> Inputs {
        let services = dataplane
            .dataplane()
            .map(|d| {
                d.outbounds()
                    .iter()
                    .filter_map(|o| {
                        o.backend_ref
                            .as_ref()
                            .map(|r| r.name.clone())
                            .or_else(|| o.tags().get("kuma.io/service").cloned())
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        Inputs {
            mesh: view.mesh.clone(),
            cas: view.cas.clone(),
            dataplane: dataplane.clone(),
            mtps: view.mtps.clone(),
            mlbs: view.mlbs.clone(),
            endpoints: services
                .into_iter()
                .map(|s| {
                    let e = view.endpoints.get(&s).cloned();
                    (s, e)
                })
                .collect(),
        }
    }

    fn same(&self, other: &Inputs) -> bool {
        fn opt<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
        }
        Arc::ptr_eq(&self.mesh, &other.mesh)
            && opt(&self.cas, &other.cas)
            && Arc::ptr_eq(&self.dataplane, &other.dataplane)
            && Arc::ptr_eq(&self.mtps, &other.mtps)
            && Arc::ptr_eq(&self.mlbs, &other.mlbs)
            && self.endpoints.len() == other.endpoints.len()
            && self
                .endpoints
                .iter()
                .zip(&other.endpoints)
                .all(|((ka, a), (kb, b))| ka == kb && opt(a, b))
    }
}

/// Resolves when the registry asks the session to close.
async fn closed(rx: &mut watch::Receiver<Option<(CloseCode, String)>>) -> (CloseCode, String) {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.clone().unwrap_or((CloseCode::Draining, String::new())),
        Err(_) => (CloseCode::Draining, "control plane is shutting down".into()),
    }
}

struct Session {
    server: Arc<DpServer>,
    mesh: String,
    name: String,
    id: u64,
    dataplane: Arc<Resource>,
    tx: mpsc::Sender<Queued>,
    ack: AckState,
    inputs: Option<Inputs>,
}

enum End {
    Close(CloseCode, String),
    Gone,
    Error(Status),
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<DiscoveryRequest>,
        mut close_rx: watch::Receiver<Option<(CloseCode, String)>>,
    ) {
        let mut views = self.server.index.subscribe(&self.mesh);
        views.mark_changed();
        let end = loop {
            let deadline = self.ack.deadline();
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => if let Err(e) = self.on_message(m).await { break e },
                    Ok(None) => break End::Gone,
                    Err(s) => {
                        tracing::debug!(mesh = %self.mesh, dataplane = %self.name, error = %s, "stream error");
                        break End::Gone;
                    }
                },
                r = views.changed() => {
                    if r.is_err() { break End::Close(CloseCode::Draining, "index stopped".into()) }
                    let view = views.borrow_and_update().clone();
                    match view {
                        None => break End::Close(CloseCode::Deleted, format!("mesh {} was deleted", self.mesh)),
                        Some(v) => if let Err(e) = self.on_view(&v).await { break e },
                    }
                }
                (code, reason) = closed(&mut close_rx) => break End::Close(code, reason),
                () = timer => match self.ack.on_timeout(Instant::now()) {
                    Ok(Some(o)) => if let Err(e) = self.send(o).await { break e },
                    Ok(None) => {}
                    Err(e) => break End::Error(Status::deadline_exceeded(e.to_string())),
                },
            }
        };
        self.finish(end).await;
    }

    async fn finish(self, end: End) {
        let (mesh, name) = (self.mesh.clone(), self.name.clone());
        match end {
            End::Close(code, reason) => {
                tracing::info!(%mesh, dataplane = %name, ?code, %reason, "closing the dataplane's stream");
                let label = format!("{code:?}").to_lowercase();
                self.server
                    .metrics
                    .streams_closed
                    .get_or_create(&ReasonLabels { reason: label })
                    .inc();
                let _ = self
                    .tx
                    .send(Ok(Box::new(DiscoveryResponse {
                        version: String::new(),
                        kind: Some(discovery_response::Kind::Close(Close {
                            reason,
                            code: code.into(),
                        })),
                    })))
                    .await;
            }
            End::Error(s) => {
                tracing::warn!(%mesh, dataplane = %name, error = %s.message(), "ending the dataplane's stream");
                let _ = self.tx.send(Err(Box::new(s))).await;
            }
            End::Gone => tracing::info!(%mesh, dataplane = %name, "dataplane disconnected"),
        }
        self.server.metrics.dp_streams.dec();
        let current = self.server.close_session(&mesh, &name, self.id);
        let tag = self.id.to_string();
        let _ = self
            .server
            .blocking(move |s| {
                insight::update(s, &mesh, &name, |i| {
                    // A newer stream of the same dataplane owns the record now.
                    if current && i.session.as_deref() == Some(tag.as_str()) {
                        i.status = Online::Offline;
                        i.disconnected_at = Some(OffsetDateTime::now_utc());
                        i.session = None;
                    }
                })
            })
            .await;
    }

    async fn send(&mut self, o: Outgoing) -> Result<(), End> {
        let kind = match &o.body {
            Body::Full(_) => "full",
            Body::Delta(_) => "delta",
        };
        self.server
            .metrics
            .configs_sent
            .get_or_create(&BodyLabels { kind: kind.into() })
            .inc();
        let version = o.version.clone();
        let msg = Box::new(DiscoveryResponse {
            version: o.version,
            kind: Some(match o.body {
                Body::Full(c) => discovery_response::Kind::Config(DataplaneConfig::clone(&c)),
                Body::Delta(d) => discovery_response::Kind::Delta(*d),
            }),
        });
        if self.tx.send(Ok(msg)).await.is_err() {
            return Err(End::Gone);
        }
        tracing::debug!(mesh = %self.mesh, dataplane = %self.name, %version, kind, "sent config");
        self.record(move |i| i.config.sent = Some(version)).await;
        Ok(())
    }

    async fn record(&self, f: impl FnOnce(&mut insight::Insight) + Send + 'static) {
        let (m, n) = (self.mesh.clone(), self.name.clone());
        let r = self
            .server
            .blocking(move |s| insight::update(s, &m, &n, f))
            .await;
        if let Ok(Err(e)) = r {
            tracing::warn!(mesh = %self.mesh, dataplane = %self.name, error = %e, "cannot record the dataplane's insight");
        }
    }

    async fn on_view(&mut self, view: &MeshView) -> Result<(), End> {
        // The registered Dataplane may have been changed (weftctl apply); follow it.
        if let Some(dp) = view.dataplanes.get(&self.name) {
            self.dataplane = dp.clone();
        }
        let inputs = Inputs::of(view, &self.dataplane);
        if self.inputs.as_ref().is_some_and(|old| old.same(&inputs)) {
            return Ok(());
        }
        self.inputs = Some(inputs);
        let config = compile(view, &self.dataplane);
        let version = version_of(&config);
        if let Some(o) = self.ack.desire(version, Arc::new(config), Instant::now()) {
            self.send(o).await?;
        }
        Ok(())
    }

    async fn on_message(&mut self, m: DiscoveryRequest) -> Result<(), End> {
        let now = Instant::now();
        match m.kind {
            Some(discovery_request::Kind::Ack(a)) => {
                self.server.metrics.acks.inc();
                let next = self
                    .ack
                    .on_ack(&a.version, now)
                    .map_err(|e| End::Error(Status::invalid_argument(e.to_string())))?;
                let v = a.version.clone();
                self.record(move |i| {
                    i.config.acked = Some(v);
                    i.config.nacked = None;
                    i.config.nack_error = None;
                    i.config.acks += 1;
                })
                .await;
                if let Some(o) = next {
                    self.send(o).await?;
                }
            }
            Some(discovery_request::Kind::Nack(n)) => {
                self.server.metrics.nacks.inc();
                tracing::warn!(mesh = %self.mesh, dataplane = %self.name, version = %n.version, error = %n.error, "dataplane rejected a config");
                let next = self
                    .ack
                    .on_nack(&n.version, &n.error, now)
                    .map_err(|e| End::Error(Status::invalid_argument(e.to_string())))?;
                self.record(move |i| {
                    i.config.nacked = Some(n.version);
                    i.config.nack_error = Some(n.error);
                    i.config.nacks += 1;
                })
                .await;
                if let Some(o) = next {
                    self.send(o).await?;
                }
            }
            Some(discovery_request::Kind::Status(s)) => {
                let health: BTreeMap<u32, bool> =
                    s.inbounds.iter().map(|h| (h.port, h.ready)).collect();
                let expiry = OffsetDateTime::from_unix_timestamp(s.cert_not_after_unix).ok();
                self.record(move |i| {
                    i.inbound_health = health;
                    if s.cert_not_after_unix > 0 {
                        i.cert_expiry = expiry;
                    }
                    i.cert_renewals = s.cert_renewals;
                })
                .await;
            }
            Some(discovery_request::Kind::Hello(_)) => {
                return Err(End::Error(Status::invalid_argument(
                    "Hello is only valid as the first message",
                )));
            }
            None => {}
        }
        Ok(())
    }
}
