//! The data path: one listener per inbound and per outbound of the applied config, mTLS
//! between dataplanes, authorization on inbounds, load balancing on outbounds.
//!
//! - The reconciler follows the applied config (`watch`): it binds listeners for new ports,
//!   hands changed settings (rules, endpoints) to running listeners through their own
//!   `watch`, and stops listeners that disappeared. Established connections are never
//!   touched by a change: each keeps what it was accepted with.
//! - TLS configurations are rebuilt when the certificate or trust bundle changes and swapped
//!   in atomically (`watch<Option<Arc<TlsState>>>`); new handshakes use the new ones.
//! - Bytes are copied both ways, half-close propagated, with no buffer held while a
//!   connection is idle (`copy`).
//! - Draining: listeners stop accepting, and the caller waits (bounded) for [`Tracker`] to
//!   reach zero active connections.
//!
//! The transport between dataplanes is the mesh's choice ([`transport::Dialer`]): TLS over
//! TCP, QUIC ([`quic`]: one connection per peer, a stream per proxied connection), or `auto`.
//! Inbounds accept QUIC on their port over UDP unless the transport is `tls`; authorization,
//! metrics and draining are the same on both.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::dataplane::Dataplane;
use crate::identity::manager::Credentials;
use crate::metrics::{ListenerMetrics, ProxyMetrics};
use crate::model::{Applied, Inbound, LoadBalancer, MtlsMode, Outbound, Transport};

pub mod authz;
pub mod balance;
mod copy;
pub mod pool;
pub mod quic;
mod replay;
mod shared;
#[cfg(test)]
mod tests;
pub mod tls;
pub mod transport;

use balance::{Balancer, Slot};
use tls::TlsState;
use transport::{Dialer, Upstream, Via};

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TCP connect to the local service may take (and the replay of refused bytes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP connect or a QUIC handshake to a peer dataplane may take: past Linux's
/// second SYN retransmission (1 s, then 3 s after the first SYN), so that a connection whose
/// SYN or SYN-ACK is lost twice on a lossy link still comes up (at 3 % loss each way, two
/// ~6 % losses in a row: ~0.35 % of new connections would fail at 2 s, and the e2e
/// lossy-link test makes 34). Envoy's default is 5 s.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(3500);
/// How many endpoints an outbound connection tries before giving up.
const MAX_ATTEMPTS: usize = 3;
/// How long to wait before binding a port again after a failure.
const REBIND_AFTER: Duration = Duration::from_secs(1);
/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Counts open connections, so that a drain can wait for them.
#[derive(Debug, Default)]
pub struct Tracker {
    active: AtomicUsize,
    idle: Notify,
}

impl Tracker {
    fn enter(self: &Arc<Self>) -> TrackGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        TrackGuard(self.clone())
    }

    /// Connections open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct TrackGuard(Arc<Tracker>);

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Builds TLS state from credentials and the applied config's trust bundle, each time either
/// changes, until `stop`.
pub async fn tls_task(
    mesh: String,
    resumption: bool,
    quic_congestion: quic::Congestion,
    mut creds: watch::Receiver<Option<Arc<Credentials>>>,
    mut config: watch::Receiver<Option<Arc<Applied>>>,
    out: watch::Sender<Option<Arc<TlsState>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut generation = 0u64;
    let mut last: Option<(String, String)> = None;
    loop {
        let c = creds.borrow_and_update().clone();
        let bundle = config
            .borrow_and_update()
            .as_ref()
            .map(|a| a.config.trust_bundle_pem.clone())
            .filter(|b| !b.is_empty());
        if let Some(c) = c {
            let bundle = bundle.unwrap_or_else(|| c.trust_bundle_pem.clone());
            let key = (c.cert_chain_pem.clone(), bundle.clone());
            if last.as_ref() != Some(&key) {
                generation += 1;
                match TlsState::new(generation, &mesh, &c, &bundle).map(|s| {
                    s.with_resumption(resumption)
                        .with_quic_congestion(quic_congestion)
                }) {
                    Ok(s) => {
                        info!(
                            generation,
                            ids = ?c.spiffe_ids,
                            quic_congestion = %quic_congestion.name(),
                            "TLS credentials in use"
                        );
                        out.send_replace(Some(Arc::new(s)));
                        last = Some(key);
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot use the new credentials; keeping the previous ones")
                    }
                }
            }
        }
        tokio::select! {
            r = creds.changed() => if r.is_err() { return },
            r = config.changed() => if r.is_err() { return },
            () = crate::shutdown::stopped(&mut stop) => return,
        }
    }
}

/// What the proxy runs on.
pub struct Proxy {
    /// The dataplane's file: listen addresses of inbounds.
    pub dataplane: Arc<Dataplane>,
    /// The applied config.
    pub config: watch::Receiver<Option<Arc<Applied>>>,
    /// Current TLS state.
    pub tls: watch::Receiver<Option<Arc<TlsState>>>,
    /// Metric families.
    pub metrics: ProxyMetrics,
    /// How dataplanes reach each other.
    pub dialer: Arc<Dialer>,
    /// Open connections.
    pub tracker: Arc<Tracker>,
}

/// A running listener: its settings channel and its stop signal.
struct Running<T> {
    settings: watch::Sender<Arc<T>>,
    stop: watch::Sender<bool>,
}

impl<T> Drop for Running<T> {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// The inbound's listen address: the inbound's own `address`, else the Dataplane's
/// `networking.address`.
fn inbound_bind(dp: &Dataplane, port: u16) -> Option<SocketAddr> {
    let spec = dp.inbounds.iter().find(|i| i.port == port);
    let addr = spec
        .and_then(|i| i.address.clone())
        .unwrap_or_else(|| dp.address.clone());
    let ip: IpAddr = addr.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

impl Proxy {
    /// Reconciles listeners with the applied config until `stop`; then every listener stops
    /// accepting (open connections continue, tracked by `tracker`).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut inbounds: BTreeMap<u16, Running<InboundState>> = BTreeMap::new();
        let mut outbounds: BTreeMap<(IpAddr, u16), Running<OutboundState>> = BTreeMap::new();
        let mut sweep = tokio::time::interval(transport::POOL_UNUSED / 5);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'config: loop {
            let applied = self.config.borrow_and_update().clone();
            if let Some(a) = applied {
                self.reconcile(&a, &mut inbounds, &mut outbounds);
            }
            loop {
                tokio::select! {
                    r = self.config.changed() => if r.is_err() { break 'config } else { break },
                    () = crate::shutdown::stopped(&mut stop) => break 'config,
                    _ = sweep.tick() => self.dialer.release_unused(),
                }
            }
        }
        info!("listeners closing");
        drop(inbounds);
        drop(outbounds);
    }

    fn reconcile(
        &self,
        applied: &Applied,
        inbounds: &mut BTreeMap<u16, Running<InboundState>>,
        outbounds: &mut BTreeMap<(IpAddr, u16), Running<OutboundState>>,
    ) {
        let cfg = &applied.config;
        let want_in: BTreeMap<u16, &Inbound> = cfg.inbounds.iter().map(|i| (i.port, i)).collect();
        inbounds.retain(|port, _| want_in.contains_key(port));
        for (port, ib) in want_in {
            let state = Arc::new(InboundState {
                inbound: ib.clone(),
                mode: cfg.mtls_mode,
                transport: cfg.transport,
            });
            if let Some(r) = inbounds.get(&port) {
                r.settings.send_if_modified(|s| {
                    if **s == *state {
                        return false;
                    }
                    *s = state.clone();
                    true
                });
                continue;
            }
            let Some(bind) = inbound_bind(&self.dataplane, port) else {
                warn!(port, "inbound has no usable listen address; not serving it");
                continue;
            };
            let service = ib.tags.get("kuma.io/service").cloned().unwrap_or_default();
            let (settings, settings_rx) = watch::channel(state);
            let (stop, stop_rx) = watch::channel(false);
            let l = InboundListener {
                bind,
                stop: stop_rx.clone(),
                settings: settings_rx,
                tls: self.tls.clone(),
                metrics: self.metrics.listener("inbound", port, &service),
                tracker: self.tracker.clone(),
            };
            tokio::spawn(l.run(stop_rx));
            inbounds.insert(port, Running { settings, stop });
        }

        let want_out: BTreeMap<(IpAddr, u16), &Outbound> =
            cfg.outbounds.iter().map(|o| (o.key(), o)).collect();
        outbounds.retain(|k, _| want_out.contains_key(k));
        for (key, ob) in want_out {
            let state = Arc::new(OutboundState::new(
                ob,
                cfg.mtls_mode,
                cfg.transport,
                outbounds.get(&key),
            ));
            if let Some(r) = outbounds.get(&key) {
                r.settings.send_if_modified(|s| {
                    if s.same_as(&state) {
                        return false;
                    }
                    *s = state.clone();
                    true
                });
                continue;
            }
            let (settings, settings_rx) = watch::channel(state);
            let (stop, stop_rx) = watch::channel(false);
            let l = OutboundListener {
                bind: SocketAddr::new(key.0, key.1),
                settings: settings_rx,
                tls: self.tls.clone(),
                metrics: self.metrics.listener("outbound", key.1, &ob.service),
                tracker: self.tracker.clone(),
                dialer: self.dialer.clone(),
                balancer: Arc::new(Balancer::default()),
            };
            tokio::spawn(l.run(stop_rx));
            outbounds.insert(key, Running { settings, stop });
        }
    }
}

/// Binds `addr`, retrying until it works or `stop`.
async fn bind(
    addr: SocketAddr,
    what: &str,
    stop: &mut watch::Receiver<bool>,
) -> Option<TcpListener> {
    loop {
        match listen(addr) {
            Ok(l) => {
                info!(%addr, what, "listening");
                return Some(l);
            }
            Err(e) => warn!(%addr, what, error = %e, "cannot bind; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(REBIND_AFTER) => {}
            () = crate::shutdown::stopped(stop) => return None,
        }
    }
}

/// A listener whose accepted sockets start with TCP_NODELAY (Linux copies it from the
/// listener: one `setsockopt` less per connection), SO_REUSEADDR as std sets it.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts on `addr` until `stop`, serving each connection in its own task with `serve`,
/// counted in `metrics` and `tracker`; open connections outlive the listener.
async fn accept_loop<F, Fut>(
    addr: SocketAddr,
    what: &'static str,
    mut stop: watch::Receiver<bool>,
    tracker: Arc<Tracker>,
    metrics: ListenerMetrics,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    let Some(listener) = bind(addr, what, &mut stop).await else {
        return;
    };
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = crate::shutdown::stopped(&mut stop) => break,
        };
        let guard = tracker.enter();
        metrics.opened.inc();
        metrics.active.inc();
        let active = metrics.active.clone();
        // A combinator, not an `async move` block awaiting `serve(..)`: a block would store
        // the connection's future twice (captured, then as the awaited value), doubling every
        // connection's task.
        tokio::spawn(serve(tcp, peer).map(move |r| {
            if let Err(e) = r {
                debug!(%peer, what, error = %e, "connection ended with an error");
            }
            active.dec();
            drop(guard);
        }));
    }
    info!(addr = %self_addr(&listener), what, "stopped accepting");
}

/// Copies both ways until both sides are done; returns (to upstream, from upstream).
async fn splice<A, B>(mut down: A, mut up: B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    copy::copy_bidirectional(&mut down, &mut up).await
}

/// Connects to a local service (plain TCP on the dataplane's host).
async fn connect_local(addr: SocketAddr, m: &ListenerMetrics) -> io::Result<TcpStream> {
    let t0 = Instant::now();
    let r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")));
    match &r {
        Ok(s) => {
            let _ = s.set_nodelay(true);
            m.connect_seconds.observe(t0.elapsed().as_secs_f64());
        }
        Err(_) => {
            m.connect_failures.inc();
        }
    }
    r
}

/// Decides whether a client proving `services` may use inbound `ib` (the same on every
/// transport): counts and logs a denial with the deciding policy, logs a shadow deny.
fn authorize(ib: &Inbound, services: &[String], peer: SocketAddr, m: &ListenerMetrics) -> bool {
    let verdict = authz::decide(&ib.rules, services);
    if !verdict.allow {
        m.denied.inc();
        warn!(
            %peer,
            port = ib.port,
            client = ?services,
            policy = verdict.policy.as_deref().unwrap_or("none matched (default deny)"),
            "denied"
        );
        return false;
    }
    if verdict.action == Some(crate::model::Action::AllowWithShadowDeny) {
        info!(%peer, client = ?services, policy = ?verdict.policy, "allowed (shadow deny)");
    }
    true
}

/// An inbound's settings, as of the last config.
#[derive(Debug, PartialEq)]
pub(crate) struct InboundState {
    inbound: Inbound,
    mode: MtlsMode,
    transport: Transport,
}

struct InboundListener {
    bind: SocketAddr,
    stop: watch::Receiver<bool>,
    settings: watch::Receiver<Arc<InboundState>>,
    tls: watch::Receiver<Option<Arc<TlsState>>>,
    metrics: ListenerMetrics,
    tracker: Arc<Tracker>,
}

impl InboundListener {
    async fn run(self, stop: watch::Receiver<bool>) {
        let (addr, tracker, metrics) = (self.bind, self.tracker.clone(), self.metrics.clone());
        let quic = quic::QuicInbound {
            bind: addr,
            settings: self.settings.clone(),
            tls: self.tls.clone(),
            metrics: metrics.clone(),
            tracker: tracker.clone(),
        };
        tokio::spawn(quic.run(stop.clone()));
        let this = Arc::new(self);
        accept_loop(addr, "inbound", stop, tracker, metrics, move |tcp, peer| {
            let this = this.clone();
            async move { this.serve(tcp, peer).await }
        })
        .await;
    }

    /// Two phases, so that a connection's task is sized by what lives as long as the
    /// connection (the streams and the copy), not by the set-up (handshake, HTTP/2 server),
    /// which is boxed and freed once done.
    async fn serve(&self, tcp: TcpStream, peer: SocketAddr) -> io::Result<()> {
        match Box::pin(self.establish(tcp, peer)).await? {
            Established::Done => Ok(()),
            Established::Plain(down, up) => self.copy(down, up).await,
            Established::Tls(down, up) => self.copy(down, up).await,
        }
    }

    async fn establish(&self, tcp: TcpStream, peer: SocketAddr) -> io::Result<Established> {
        let state = self.settings.borrow().clone();
        let ib = &state.inbound;
        let target = SocketAddr::new(ib.service_address, ib.service_port);
        if state.mode == MtlsMode::Disabled {
            let up = connect_local(target, &self.metrics).await?;
            return Ok(Established::Plain(tcp, up));
        }
        let mut first = [0u8; 1];
        let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first))
            .await
            .unwrap_or(Ok(0))?;
        if n == 0 {
            return Ok(Established::Done);
        }
        if first[0] != TLS_HANDSHAKE {
            if state.mode == MtlsMode::Permissive {
                let up = connect_local(target, &self.metrics).await?;
                return Ok(Established::Plain(tcp, up));
            }
            self.metrics.denied.inc();
            warn!(%peer, port = ib.port, "refused plaintext: the mesh is STRICT");
            return Ok(Established::Done);
        }
        let Some(tls) = self.tls.borrow().clone() else {
            self.metrics.tls_failures.inc();
            warn!(%peer, port = ib.port, "refused: no certificate yet");
            return Ok(Established::Done);
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.tls_failures.inc();
                warn!(%peer, port = ib.port, error = %e, "TLS handshake failed");
                return Ok(Established::Done);
            }
            Err(_) => {
                self.metrics.tls_failures.inc();
                warn!(%peer, port = ib.port, "TLS handshake timed out");
                return Ok(Established::Done);
            }
        };
        let conn = stream.get_ref().1;
        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.metrics.tls_resumed.inc();
        }
        let services = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|leaf| tls::peer_services(leaf, &tls.mesh))
            .unwrap_or_default();
        if pool::negotiated(conn) {
            // Authorized (and counted) per stream. Boxed: the HTTP/2 server's state would
            // otherwise size this future.
            Box::pin(pool::serve(
                stream,
                peer,
                Arc::new(services),
                self.settings.clone(),
                self.metrics.clone(),
                self.stop.clone(),
            ))
            .await?;
            return Ok(Established::Done);
        }
        if !authorize(ib, &services, peer, &self.metrics) {
            return Ok(Established::Done);
        }
        let up = connect_local(target, &self.metrics).await?;
        Ok(Established::Tls(Box::new(stream), up))
    }

    /// Not an `async fn`: its arguments would be stored twice (as arguments, and inside the
    /// copy), a TLS stream's state among them.
    fn copy<A>(&self, down: A, up: TcpStream) -> impl Future<Output = io::Result<()>>
    where
        A: AsyncRead + AsyncWrite + Unpin,
    {
        let metrics = &self.metrics;
        copy::copy_bidirectional(down, up).map(move |r| {
            let (to, from) = r?;
            metrics.bytes_to_upstream.inc_by(to);
            metrics.bytes_from_upstream.inc_by(from);
            Ok(())
        })
    }
}

/// What an accepted inbound connection turned out to be once set up.
enum Established {
    /// Nothing left to carry: refused, closed early, or served as a pooled connection.
    Done,
    /// Plaintext (mTLS off, or PERMISSIVE and the client spoke plaintext), and the local service.
    Plain(TcpStream, TcpStream),
    /// The client's mTLS connection (boxed: rustls' state is ~1.2 KiB), and the local service.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, TcpStream),
}

fn self_addr(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

/// An outbound's settings and its endpoints' live counters.
struct OutboundState {
    service: String,
    lb: LoadBalancer,
    mode: MtlsMode,
    transport: Transport,
    endpoints: Vec<crate::model::Endpoint>,
    slots: Vec<Slot>,
}

impl OutboundState {
    /// Keeps the connection counters of endpoints that stay, so least-request stays accurate
    /// across config changes.
    fn new(
        ob: &Outbound,
        mode: MtlsMode,
        transport: Transport,
        previous: Option<&Running<OutboundState>>,
    ) -> Self {
        let old: BTreeMap<String, Arc<AtomicUsize>> = previous
            .map(|r| {
                r.settings
                    .borrow()
                    .slots
                    .iter()
                    .map(|s| (s.address.clone(), s.active.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let slots = ob
            .endpoints
            .iter()
            .map(|e| {
                let address = format!("{}:{}", e.address, e.port);
                Slot {
                    active: old.get(&address).cloned().unwrap_or_default(),
                    address,
                    healthy: e.healthy,
                }
            })
            .collect();
        OutboundState {
            service: ob.service.clone(),
            lb: ob.lb,
            mode,
            transport,
            endpoints: ob.endpoints.clone(),
            slots,
        }
    }

    fn same_as(&self, other: &OutboundState) -> bool {
        self.service == other.service
            && self.lb == other.lb
            && self.mode == other.mode
            && self.transport == other.transport
            && self.endpoints == other.endpoints
    }
}

struct OutboundListener {
    bind: SocketAddr,
    settings: watch::Receiver<Arc<OutboundState>>,
    tls: watch::Receiver<Option<Arc<TlsState>>>,
    metrics: ListenerMetrics,
    tracker: Arc<Tracker>,
    dialer: Arc<Dialer>,
    balancer: Arc<Balancer>,
}

impl OutboundListener {
    async fn run(self, stop: watch::Receiver<bool>) {
        let (addr, tracker, metrics) = (self.bind, self.tracker.clone(), self.metrics.clone());
        let this = Arc::new(self);
        accept_loop(
            addr,
            "outbound",
            stop,
            tracker,
            metrics,
            move |tcp, _peer| {
                let this = this.clone();
                async move { this.serve(tcp).await }
            },
        )
        .await;
    }

    async fn serve(&self, mut tcp: TcpStream) -> io::Result<()> {
        let state = self.settings.borrow().clone();
        let tls = if state.mode == MtlsMode::Disabled {
            None
        } else {
            let Some(t) = self.tls.borrow().clone() else {
                warn!(service = %state.service, "no certificate yet; refusing the connection");
                return Ok(());
            };
            Some(t)
        };
        let order = self.balancer.order(state.lb, &state.slots, MAX_ATTEMPTS);
        if order.is_empty() {
            warn!(service = %state.service, "no healthy endpoint");
            return Ok(());
        }
        // What the client sent to an endpoint that refused it (or never answered), for the
        // next one; and whether the one extra try on the same endpoint was used.
        let mut replay = Vec::new();
        let mut again = false;
        let mut i = 0;
        while let Some(&idx) = order.get(i) {
            let slot = &state.slots[idx];
            let t0 = Instant::now();
            // Boxed: the dialer's state (handshakes, QUIC and HTTP/2 set-up) lives only until
            // the connection is up, and would otherwise size every outbound task.
            let r = Box::pin(self.dialer.connect(
                state.transport,
                &slot.address,
                &state.service,
                tls.as_ref(),
                PEER_CONNECT_TIMEOUT,
                HANDSHAKE_TIMEOUT,
            ))
            .await;
            let (up, via) = match r {
                Ok(ok) => ok,
                Err(e) => {
                    if !self.failed(&state, slot, &e, true) {
                        return Ok(());
                    }
                    i += 1;
                    continue;
                }
            };
            self.metrics
                .connect_seconds
                .observe(t0.elapsed().as_secs_f64());
            match via {
                Via::Quic => self.metrics.quic_streams.inc(),
                Via::Tls { resumed: true } => self.metrics.tls_resumed.inc(),
                Via::Pooled => self.metrics.pooled_streams.inc(),
                Via::Tls { resumed: false } | Via::Tcp => 0,
            };
            // Pooled and QUIC streams are answered after the client's first bytes went out.
            let mut up = replay::Replay::new(up, matches!(via, Via::Quic | Via::Pooled));
            slot.active.fetch_add(1, Ordering::Relaxed);
            let copied = async {
                // What an earlier endpoint refused goes first (bounded: nothing reads the
                // answer meanwhile, so a wedged peer must not hold the client forever).
                let earlier = std::mem::take(&mut replay);
                if !earlier.is_empty() {
                    tokio::time::timeout(CONNECT_TIMEOUT, up.write_all(&earlier))
                        .await
                        .unwrap_or_else(|_| {
                            Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "replaying to the next endpoint timed out",
                            ))
                        })?;
                }
                drop(earlier);
                splice(&mut tcp, &mut up).await
            }
            .await;
            slot.active.fetch_sub(1, Ordering::Relaxed);
            let e = match copied {
                Ok((to, from)) => {
                    self.metrics.bytes_to_upstream.inc_by(to);
                    self.metrics.bytes_from_upstream.inc_by(from);
                    return Ok(());
                }
                Err(e) => e,
            };
            let Some(unanswered) = transport::unanswered(&e) else {
                // The far side failed or was reset: reset the client too.
                let _ = tcp.set_zero_linger();
                return Err(e);
            };
            let why = &unanswered.why;
            let same = tls.as_ref().is_some_and(|t| {
                self.dialer.unanswered(
                    state.transport,
                    &slot.address,
                    &state.service,
                    t,
                    via,
                    unanswered,
                )
            });
            let Some(sent) = up.into_replay() else {
                // More than can be replayed went out: fail like an established connection.
                if !self.failed(&state, slot, why, false) {
                    return Ok(());
                }
                let _ = tcp.set_zero_linger();
                return Err(e);
            };
            replay = sent;
            if same && !again {
                // `auto` falling back to pooled TLS, or a fresh pooled connection: the same
                // endpoint once more, not counted as a failure.
                debug!(service = %state.service, endpoint = %slot.address, error = %why, "stream unanswered; trying the same endpoint again");
                again = true;
                continue;
            }
            if !self.failed(&state, slot, why, true) {
                return Ok(());
            }
            i += 1;
        }
        if !replay.is_empty() {
            // The client's bytes reached no service: a reset, not a clean close.
            let _ = tcp.set_zero_linger();
        }
        warn!(service = %state.service, "every endpoint tried failed");
        Ok(())
    }

    /// Counts and logs a failed attempt on `slot` (`next`: whether another endpoint can be
    /// tried); whether it may be (not when the peer denied the client: no other will say
    /// otherwise).
    fn failed(&self, state: &OutboundState, slot: &Slot, e: &Upstream, next: bool) -> bool {
        if matches!(e, Upstream::Refused(quic::Refusal::Denied)) {
            warn!(service = %state.service, endpoint = %slot.address, "denied by the peer's traffic permissions");
            return false;
        }
        self.metrics.connect_failures.inc();
        if matches!(e, Upstream::Tls(_)) {
            self.metrics.tls_failures.inc();
        }
        if next {
            warn!(service = %state.service, endpoint = %slot.address, error = %e, "upstream connect failed; trying another endpoint");
        } else {
            warn!(service = %state.service, endpoint = %slot.address, error = %e, "upstream refused the stream after more than can be replayed; resetting the client");
        }
        true
    }
}
