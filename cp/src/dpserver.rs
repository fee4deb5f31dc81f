//! The dataplane server (port 5678): gRPC over TLS with the `Identity` and `Discovery`
//! services of `weft.v1`.
//!
//! - `certify` signs a dataplane's CSR after authenticating it by token or by the
//!   certificate an earlier call issued (`auth`).
//! - `stream` runs one session per connected dataplane: registration of its Dataplane,
//!   compiled config pushed as complete configs then deltas (`compile`), the ACK/NACK state
//!   (`ack`), insights, and closing the stream at once when its token is revoked or its
//!   Dataplane deleted.
//! - `tls` holds the serving certificate and the per-mesh handling of client certificates.
//!
//! TLS handshakes run in their own tasks behind a concurrency limit, so a CP that comes back
//! to many reconnecting dataplanes accepts them at the pace it can sign and compile for.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::v1::discovery_response::close::Code as CloseCode;
use weft_api::v1::identity_server::IdentityServer;

use crate::index::Index;
use crate::keys::{self, REVOKED_TOKEN_KIND};
use crate::metrics::Metrics;
use crate::model::Kind;
use crate::store::{self, ChangeOp, ResourceKey, Store};

pub mod ack;
pub mod auth;
pub mod certify;
pub mod compile;
pub mod gc;
pub mod stream;
pub mod tls;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once.
const MAX_HANDSHAKES: usize = 64;
/// CSRs being signed at once.
const MAX_SIGNING: usize = 16;

/// Tunables of the dataplane server.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Resend an unanswered config after this long.
    pub ack_timeout: Duration,
    /// How long the first message (`Hello`) may take.
    pub hello_timeout: Duration,
    /// Store calls run at once (`[dp_server] store_calls`); more wait for a turn.
    pub store_calls: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ack_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(10),
            store_calls: 16,
        }
    }
}

/// A live session, as the registry knows it.
struct SessionHandle {
    id: u64,
    close: watch::Sender<Option<(CloseCode, String)>>,
    /// The token the dataplane joined with, to close the session when it is revoked.
    token_id: Option<String>,
}

/// State shared by the handlers.
pub struct DpServer {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) index: Arc<Index>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: Settings,
    pub(crate) signing: Semaphore,
    /// Bounds the store calls in flight (see [`Settings::store_calls`]). Without it, a burst
    /// of registrations or ACKs grew tokio's blocking pool to hundreds of threads, each
    /// waiting for the store's write lock and each keeping memory after the burst.
    store_calls: Semaphore,
    sessions: Mutex<HashMap<(String, String), SessionHandle>>,
    next_session: AtomicU64,
    draining: watch::Sender<bool>,
    /// Sessions outlive the request that opened them and need their own handle.
    pub(crate) this: std::sync::Weak<DpServer>,
}

impl DpServer {
    /// A server over `store`, compiling from `index`.
    pub fn new(
        store: Arc<dyn Store>,
        index: Arc<Index>,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Arc<DpServer> {
        let store_calls = Semaphore::new(settings.store_calls.max(1));
        Arc::new_cyclic(|this| DpServer {
            this: this.clone(),
            store,
            index,
            metrics,
            settings,
            signing: Semaphore::new(MAX_SIGNING),
            store_calls,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            draining: watch::channel(false).0,
        })
    }

    /// Runs `f` on the store off the async threads.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> T + Send + 'static,
    ) -> Result<T, tonic::Status> {
        let _turn = self
            .store_calls
            .acquire()
            .await
            .map_err(|_| tonic::Status::unavailable("control plane is shutting down"))?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| tonic::Status::internal(format!("store task failed: {e}")))
    }

    /// Registers a new session for `mesh`/`name`, closing any older one of the same
    /// dataplane; returns its id and the receiver of its close signal.
    pub(crate) fn open_session(
        &self,
        mesh: &str,
        name: &str,
        token_id: Option<&str>,
    ) -> (u64, watch::Receiver<Option<(CloseCode, String)>>) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        if *self.draining.borrow() {
            tx.send_replace(Some((
                CloseCode::Draining,
                "control plane is shutting down".into(),
            )));
        }
        // The lock guards a map update only; it is never held across an await.
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = map.insert(
            (mesh.to_owned(), name.to_owned()),
            SessionHandle {
                id,
                close: tx,
                token_id: token_id.map(str::to_owned),
            },
        ) {
            old.close.send_replace(Some((
                CloseCode::Replaced,
                "another stream for this dataplane replaced this one".into(),
            )));
        }
        (id, rx)
    }

    /// Forgets session `id` of `mesh`/`name` if it is still the current one; returns whether
    /// it was.
    pub(crate) fn close_session(&self, mesh: &str, name: &str, id: u64) -> bool {
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let key = (mesh.to_owned(), name.to_owned());
        if map.get(&key).is_some_and(|h| h.id == id) {
            map.remove(&key);
            true
        } else {
            false
        }
    }

    /// Whether `mesh`/`name` has a live session.
    pub fn is_connected(&self, mesh: &str, name: &str) -> bool {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        map.contains_key(&(mesh.to_owned(), name.to_owned()))
    }

    /// Asks the sessions `select` picks to close, with `code` and `reason`.
    fn close_where(
        &self,
        code: CloseCode,
        reason: impl Fn(&(String, String)) -> String,
        select: impl Fn(&(String, String), &SessionHandle) -> bool,
    ) {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for (k, h) in map.iter().filter(|(k, h)| select(k, h)) {
            h.close.send_replace(Some((code, reason(k))));
        }
    }

    /// Closes the sessions a store change ends: their Dataplane deleted, or the token they
    /// joined with revoked. One task for all sessions, so a change costs one lookup, not one
    /// wake-up per connected dataplane.
    fn on_change(&self, c: &store::Change) {
        let k = &c.key;
        if c.op == ChangeOp::Delete && k.kind == Kind::Dataplane.type_name() {
            self.close_where(
                CloseCode::Deleted,
                |(m, n)| format!("dataplane {n} of mesh {m} was deleted"),
                |(m, n), _| *m == k.mesh && *n == k.name,
            );
        } else if c.op == ChangeOp::Put && k.kind == REVOKED_TOKEN_KIND {
            self.close_where(
                CloseCode::Revoked,
                |(_, n)| format!("the token dataplane {n} joined with was revoked"),
                |(m, _), h| *m == k.mesh && h.token_id.as_deref() == Some(k.name.as_str()),
            );
        }
    }

    /// After missing changes: checks every session's Dataplane and token against the store.
    fn recheck_all(&self) {
        let sessions: Vec<((String, String), Option<String>)> = {
            let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            map.iter()
                .map(|(k, h)| (k.clone(), h.token_id.clone()))
                .collect()
        };
        for ((mesh, name), jti) in sessions {
            let key = ResourceKey::new(Kind::Dataplane.type_name(), &mesh, &name);
            if matches!(self.store.get(&key), Ok(None)) {
                self.on_change(&store::Change {
                    key,
                    op: ChangeOp::Delete,
                    version: 0,
                    revision: 0,
                });
            } else if let Some(j) = jti
                && keys::is_revoked(self.store.as_ref(), &mesh, &j).unwrap_or(false)
            {
                self.on_change(&store::Change {
                    key: ResourceKey::new(REVOKED_TOKEN_KIND, &mesh, &j),
                    op: ChangeOp::Put,
                    version: 0,
                    revision: 0,
                });
            }
        }
    }

    /// Follows the store's change feed for [`DpServer::on_change`] until it closes.
    pub async fn watch_store(self: Arc<Self>) {
        let mut feed = self.store.subscribe();
        loop {
            match feed.recv().await {
                Ok(c) => self.on_change(&c),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "dataplane server fell behind the change feed; rechecking sessions"
                    );
                    let s = self.clone();
                    let _ = tokio::task::spawn_blocking(move || s.recheck_all()).await;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Asks every session to close with `Draining`.
    fn drain(&self) {
        self.draining.send_replace(true);
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for h in map.values() {
            h.close.send_replace(Some((
                CloseCode::Draining,
                "control plane is shutting down".into(),
            )));
        }
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Serves the dataplane server on `listener` until `shutdown` resolves; open streams are sent
/// a `Close { code: DRAINING }` and end. Each handshake uses the TLS configuration `tls` holds
/// at that moment, so a reloaded serving certificate applies to new connections at once.
pub async fn serve(
    server: Arc<DpServer>,
    listener: TcpListener,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let accept = tokio::spawn({
        let mut stop_rx = stop_rx.clone();
        async move {
            loop {
                let permit = tokio::select! {
                    p = handshakes.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    () = stopped(&mut stop_rx) => return,
                };
                let (tcp, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "dataplane server: accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = stopped(&mut stop_rx) => return,
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.borrow().clone());
                let conn_tx = conn_tx.clone();
                tokio::spawn(async move {
                    let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    drop(permit);
                    match r {
                        Ok(Ok(tls)) => {
                            let _ = conn_tx.send(Ok::<_, std::io::Error>(tls)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "dataplane server: TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "dataplane server: TLS handshake timed out")
                        }
                    }
                });
            }
        }
    });

    let watcher = tokio::spawn(server.clone().watch_store());
    let s = server.clone();
    tokio::spawn(async move {
        shutdown.await;
        s.drain();
        let _ = stop_tx.send(true);
    });
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(IdentityServer::from_arc(server.clone()))
        .add_service(stream::DiscoveryService::new(server.clone()));
    // Sessions close themselves on drain; give them a moment to send their Close.
    let stopped = async move {
        stopped(&mut stop_rx).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    router
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), stopped)
        .await?;
    accept.abort();
    watcher.abort();
    Ok(())
}
