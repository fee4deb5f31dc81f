//! The discovery stream client: says hello, ACKs or NACKs every config and delta, reports
//! status, and reconnects with backoff when the stream ends.
//!
//! The ACK/NACK decisions live in [`ack`]; this module only moves messages. Applied configs are
//! published in a `watch<Arc<Applied>>` and persisted to `config.json`, so the dataplane keeps
//! (and serves) its last config while the control plane is away.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};
use weft_api::v1;
use weft_api::v1::discovery_request::{Hello, InboundHealth, Kind as Req, Status};

use crate::backoff::Backoff;
use crate::cp::CpEndpoint;
use crate::dataplane::Dataplane;
use crate::identity::manager::{Credentials, now_unix};
use crate::metrics::Metrics;
use crate::model::Applied;
use crate::probe;

pub mod ack;

use ack::{AckState, CloseCode, Outcome};

/// File name of the persisted config in the state directory.
pub const CONFIG_FILE: &str = "config.json";

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting failed.
    #[error(transparent)]
    Connect(#[from] crate::cp::Error),
    /// The stream failed or the CP refused it.
    #[error("discovery stream: {code:?}: {message}")]
    Stream {
        /// gRPC status code.
        code: tonic::Code,
        /// The CP's reason.
        message: String,
    },
    /// The CP ended the stream without a Close.
    #[error("discovery stream ended by the control plane")]
    Eof,
    /// Reading the token file failed.
    #[error("dataplane token file {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Our half of the stream went away.
    #[error("discovery stream: the request channel closed")]
    RequestChannel,
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Error {
        Error::Stream {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Loads `config.json` from `state_dir`, if an earlier run left a readable one.
pub fn load_persisted(state_dir: &Path) -> Option<Applied> {
    let path = state_dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the persisted config");
            return None;
        }
    };
    match serde_json::from_str(&text) {
        Ok(a) => Some(a),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "ignoring an unreadable persisted config");
            None
        }
    }
}

fn persist(state_dir: &Path, applied: &Applied) {
    let path = state_dir.join(CONFIG_FILE);
    let result = serde_json::to_string_pretty(applied)
        .map_err(|e| e.to_string())
        .and_then(|json| crate::identity::write_private(&path, &json).map_err(|e| e.to_string()));
    if let Err(e) = result {
        warn!(path = %path.display(), error = %e, "cannot persist the applied config");
    }
}

/// Settings of the discovery client.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where config.json goes.
    pub state_dir: PathBuf,
    /// The token, sent in Hello only without a valid certificate.
    pub token_file: Option<PathBuf>,
    /// The admin server's `host:port`, reported in Hello.
    pub admin_address: String,
    /// Cap of the reconnect backoff (also the wait after a revoke or delete).
    pub max_backoff: Duration,
    /// Period of the status report.
    pub status_interval: Duration,
}

/// The watches the client reads and writes.
#[derive(Debug)]
pub struct Channels {
    /// The credentials (read: TLS identity, status).
    pub creds: watch::Receiver<Option<Arc<Credentials>>>,
    /// Set once the identity manager made its first attempt.
    pub cert_attempted: watch::Receiver<bool>,
    /// Inbound health (read: status).
    pub health: watch::Receiver<Arc<Vec<probe::InboundHealth>>>,
    /// The applied config (written).
    pub config: watch::Sender<Option<Arc<Applied>>>,
    /// Turns true on shutdown.
    pub shutdown: watch::Receiver<bool>,
}

/// How one stream ended.
enum Ended {
    Shutdown,
    Closed(CloseCode),
    Failed(Error),
}

/// The discovery client.
#[derive(Debug)]
pub struct Client {
    cp: CpEndpoint,
    dataplane: Arc<Dataplane>,
    settings: Settings,
    channels: Channels,
    metrics: Arc<Metrics>,
    state: AckState,
}

impl Client {
    /// A client starting from `state` (which may hold the persisted config).
    pub fn new(
        cp: CpEndpoint,
        dataplane: Arc<Dataplane>,
        settings: Settings,
        channels: Channels,
        metrics: Arc<Metrics>,
        state: AckState,
    ) -> Client {
        Client {
            cp,
            dataplane,
            settings,
            channels,
            metrics,
            state,
        }
    }

    /// Runs streams until shutdown, reconnecting with backoff.
    pub async fn run(mut self) {
        let mut shutdown = self.channels.shutdown.clone();
        // In an mTLS mesh the dataplane certifies before it says hello: wait for the first
        // attempt (successful or not).
        let mut attempted = self.channels.cert_attempted.clone();
        tokio::select! {
            _ = attempted.wait_for(|a| *a) => {}
            () = crate::shutdown::stopped(&mut shutdown) => return,
        }
        let mut backoff = Backoff::new(self.settings.max_backoff);
        let mut first = true;
        loop {
            if !first {
                self.metrics.cp_reconnects.inc();
            }
            first = false;
            let ended = self.session(&mut backoff).await;
            self.metrics.cp_connected.set(0);
            let wait = match ended {
                Ended::Shutdown => return,
                Ended::Closed(code) if code.is_final() => self.settings.max_backoff,
                Ended::Closed(_) => backoff.next_delay(),
                Ended::Failed(e) => {
                    let wait = backoff.next_delay();
                    warn!(error = %e, retry_in = ?wait, "discovery stream failed");
                    wait
                }
            };
            debug!(?wait, "reconnecting after");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = crate::shutdown::stopped(&mut shutdown) => return,
            }
        }
    }

    fn status(&self) -> v1::DiscoveryRequest {
        let health = self.channels.health.borrow().clone();
        let not_after = self
            .channels
            .creds
            .borrow()
            .as_ref()
            .map_or(0, |c| c.not_after);
        v1::DiscoveryRequest {
            kind: Some(Req::Status(Status {
                inbounds: health
                    .iter()
                    .map(|h| InboundHealth {
                        port: u32::from(h.port),
                        ready: h.ready,
                    })
                    .collect(),
                cert_not_after_unix: not_after,
                cert_renewals: self.metrics.cert_renewals.get(),
            })),
        }
    }

    fn hello(&self, with_cert: bool) -> Result<v1::DiscoveryRequest> {
        let token = match (&self.settings.token_file, with_cert) {
            (Some(path), false) => std::fs::read_to_string(path)
                .map_err(|source| Error::Token {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
            _ => String::new(),
        };
        Ok(v1::DiscoveryRequest {
            kind: Some(Req::Hello(Hello {
                mesh: self.dataplane.mesh.clone(),
                dataplane_name: self.dataplane.name.clone(),
                dataplane_yaml: self.dataplane.yaml.clone(),
                dp_version: env!("CARGO_PKG_VERSION").to_owned(),
                admin_address: self.settings.admin_address.clone(),
                token,
            })),
        })
    }

    async fn session(&mut self, backoff: &mut Backoff) -> Ended {
        match self.session_inner(backoff).await {
            Ok(e) => e,
            Err(e) => Ended::Failed(e),
        }
    }

    async fn session_inner(&mut self, backoff: &mut Backoff) -> Result<Ended> {
        let creds = self
            .channels
            .creds
            .borrow()
            .clone()
            .filter(|c| c.is_valid_at(now_unix()));
        let channel = self.cp.connect(creds.as_deref()).await?;
        let (tx, rx) = mpsc::channel::<v1::DiscoveryRequest>(16);
        tx.send(self.hello(creds.is_some())?)
            .await
            .map_err(|_| Error::RequestChannel)?;
        let mut client = v1::discovery_client::DiscoveryClient::new(channel);
        let mut stream = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        info!(
            cp = self.cp.address(),
            with_cert = creds.is_some(),
            "discovery stream open"
        );
        self.metrics.cp_connected.set(1);

        let mut shutdown = self.channels.shutdown.clone();
        let mut health = self.channels.health.clone();
        let mut creds_rx = self.channels.creds.clone();
        health.mark_unchanged();
        creds_rx.mark_unchanged();
        let (mut health_open, mut creds_open) = (true, true);
        let mut reporting = false;
        let mut tick = tokio::time::interval(self.settings.status_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            let send_status = tokio::select! {
                message = stream.message() => {
                    let Some(response) = message? else {
                        return Err(Error::Eof);
                    };
                    let version = response.version.clone();
                    match self.state.handle(response) {
                        Outcome::Applied { reply, applied } => {
                            info!(version, "config applied");
                            persist(&self.settings.state_dir, &applied);
                            self.channels.config.send_replace(Some(applied));
                            self.metrics.configs_applied.inc();
                            tx.send(reply).await.map_err(|_| Error::RequestChannel)?;
                            backoff.reset();
                            let first = !reporting;
                            reporting = true;
                            first
                        }
                        Outcome::Rejected { reply, reason } => {
                            warn!(version, reason, "config rejected (NACK); keeping the previous one");
                            self.metrics.configs_rejected.inc();
                            tx.send(reply).await.map_err(|_| Error::RequestChannel)?;
                            backoff.reset();
                            false
                        }
                        Outcome::Closed { reason, code } => {
                            if code.is_final() {
                                warn!(reason, ?code, "the control plane closed the stream; serving the last config");
                            } else {
                                info!(reason, ?code, "the control plane closed the stream");
                            }
                            return Ok(Ended::Closed(code));
                        }
                    }
                }
                changed = health.changed(), if reporting && health_open => {
                    health_open = changed.is_ok();
                    health_open
                }
                changed = creds_rx.changed(), if reporting && creds_open => {
                    creds_open = changed.is_ok();
                    creds_open
                }
                _ = tick.tick(), if reporting => true,
                () = crate::shutdown::stopped(&mut shutdown) => return Ok(Ended::Shutdown),
            };
            if send_status {
                tx.send(self.status())
                    .await
                    .map_err(|_| Error::RequestChannel)?;
                tick.reset();
            }
        }
    }
}
