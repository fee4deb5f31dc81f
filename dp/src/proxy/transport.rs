//! How one dataplane reaches another, as the mesh's `networking.transport` says:
//!
//! - `tls`: TLS over TCP, one connection (and handshake, resumed when possible) per proxied
//!   connection;
//! - `pooled`: one TLS connection per peer carrying an HTTP/2 stream per proxied connection
//!   ([`super::pool`]);
//! - `quic`: one QUIC connection per peer, a stream per proxied connection ([`super::quic`]);
//! - `auto`: QUIC; a peer whose QUIC handshake gets no answer within [`AUTO_QUIC_TIMEOUT`]
//!   (UDP blocked on the way, or a peer without QUIC) is reached over pooled TLS at once —
//!   the connection that noticed is not failed — and logged once. QUIC is tried again in the
//!   background every [`RETRY_QUIC_AFTER`]; the peer goes back to QUIC when a probe succeeds.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::pool::{self, PoolClient};
use super::quic::{QuicClient, QuicError, Refusal};
use super::shared::Slot;
use super::tls::TlsState;
use crate::model::Transport;

/// How long `auto` waits for a QUIC handshake before using TLS over TCP.
pub const AUTO_QUIC_TIMEOUT: Duration = Duration::from_millis(700);
/// How long `auto` uses TLS for a peer that did not answer QUIC, before probing again.
pub const RETRY_QUIC_AFTER: Duration = Duration::from_secs(30);
/// How long a pooled connection (QUIC or HTTP/2) stays open once no new stream has asked for
/// it: then it closes as soon as the streams it still carries have ended.
pub const POOL_UNUSED: Duration = Duration::from_secs(300);
/// How long `quic` leaves a peer alone that did not answer (other endpoints are tried).
const QUIC_PEER_DOWN_FOR: Duration = Duration::from_secs(5);

/// A connected byte stream to another dataplane.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Whether the peer has accepted the stream: pooled and QUIC streams are written to before
    /// their answer (see [`Unanswered`]); TCP and TLS streams are accepted once connected.
    fn answered(&self) -> bool {
        true
    }
}
impl Stream for TcpStream {}
impl Stream for tokio_rustls::client::TlsStream<TcpStream> {}

/// A boxed [`Stream`].
pub type BoxStream = Pin<Box<dyn Stream>>;

impl Stream for BoxStream {
    fn answered(&self) -> bool {
        (**self).answered()
    }
}

/// How a connection to another dataplane was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Plain TCP (mTLS off).
    Tcp,
    /// TLS over TCP; whether the handshake resumed a session.
    Tls {
        /// The handshake resumed an earlier session.
        resumed: bool,
    },
    /// A QUIC stream.
    Quic,
    /// A stream of a pooled TLS connection.
    Pooled,
}

/// Why an upstream connection failed.
#[derive(Debug, thiserror::Error)]
pub enum Upstream {
    /// TCP connect failed or timed out, or the QUIC peer did not answer.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// The TLS handshake failed (the server's identity, chain or validity) or timed out.
    #[error("TLS: {0}")]
    Tls(io::Error),
    /// The peer refused the stream (pooled TLS, QUIC).
    #[error("{0}")]
    Refused(Refusal),
}

impl Upstream {
    /// The same failure, for another caller (an I/O error keeps its kind and message).
    pub(crate) fn again(&self) -> Upstream {
        let io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            Upstream::Connect(e) => Upstream::Connect(io(e)),
            Upstream::Tls(e) => Upstream::Tls(io(e)),
            Upstream::Refused(r) => Upstream::Refused(*r),
        }
    }
}

/// A stream's failure before its peer answered it (pooled TLS and QUIC streams carry the
/// client's first bytes without waiting for the answer): the peer refused it — and forwarded
/// nothing — or did not take it (HTTP/2 `REFUSED_STREAM`, GOAWAY), or its connection was lost
/// or went silent past the answer timeout before any answer. The connection may go to another
/// endpoint, replaying what the client had sent ([`super::replay`]). A stream the peer reset
/// otherwise is not `Unanswered`: a reset may follow an acceptance whose answer it overtook.
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub struct Unanswered {
    /// Why.
    pub why: Upstream,
    /// The connection the stream went over.
    pub conn: Conn,
}

/// The pooled connection an [`Unanswered`] stream went over: the one to evict if it does not
/// answer — not whichever connection has taken its place in the pool meanwhile (when many
/// streams time out at once, the first eviction's replacement must survive the others).
pub enum Conn {
    /// The pool's slot of an HTTP/2 connection.
    Pooled(Slot<pool::Sender>),
    /// A QUIC connection.
    Quic(quinn::Connection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conn::Pooled(_) => f.write_str("pooled"),
            Conn::Quic(c) => write!(f, "QUIC {}", c.stable_id()),
        }
    }
}

impl Unanswered {
    /// As the I/O error a stream returns.
    pub fn io(why: Upstream, conn: Conn) -> io::Error {
        io::Error::other(Unanswered { why, conn })
    }
}

/// `e`, if it is a stream's [`Unanswered`] error.
pub fn unanswered(e: &io::Error) -> Option<&Unanswered> {
    e.get_ref()?.downcast_ref::<Unanswered>()
}

/// Whether `why` is an answer timeout.
fn timed_out(why: &Upstream) -> bool {
    matches!(why, Upstream::Connect(e) if e.kind() == io::ErrorKind::TimedOut)
}

/// Opens connections to other dataplanes over the mesh's transport.
#[derive(Default)]
pub struct Dialer {
    quic: QuicClient,
    pool: PoolClient,
    /// `quic`: peers whose QUIC handshake or stream got no answer, left alone (other
    /// endpoints are tried) until then.
    down: Mutex<HashMap<SocketAddr, Instant>>,
    /// `auto`: peers whose QUIC handshake or stream got no answer, reached over pooled TLS.
    /// Apart from `down`: a mesh switched from one to the other starts afresh (a peer `quic`
    /// left alone for a moment is tried, and a fallback is logged).
    silent: Mutex<HashMap<SocketAddr, Silent>>,
}

/// A peer that did not answer over QUIC.
struct Silent {
    until: Instant,
    /// `auto`: a background probe of QUIC is running.
    probing: bool,
}

/// What `auto` does for a peer now.
enum AutoRoute {
    /// UDP answers (or has not been tried): QUIC.
    Quic,
    /// UDP did not answer lately: pooled TLS.
    Pooled,
    /// Pooled TLS, and time to probe QUIC again in the background.
    PooledAndProbe,
}

impl Dialer {
    /// Connects to `address` (`ip:port`) serving `service`. With `tls` (mTLS on), over
    /// `transport`, verifying the peer holds `service`'s SPIFFE id; without, plain TCP.
    pub async fn connect(
        self: &Arc<Self>,
        transport: Transport,
        address: &str,
        service: &str,
        tls: Option<&Arc<TlsState>>,
        connect_timeout: Duration,
        handshake_timeout: Duration,
    ) -> Result<(BoxStream, Via), Upstream> {
        let Some(tls) = tls else {
            return tcp_tls(address, service, None, connect_timeout, handshake_timeout).await;
        };
        let tls_now = || async {
            let config = tls
                .client_for(service)
                .map_err(|e| Upstream::Tls(io::Error::other(e.to_string())))?;
            tcp_tls(
                address,
                service,
                Some(config),
                connect_timeout,
                handshake_timeout,
            )
            .await
        };
        let pooled = || async {
            self.pool
                .open(address, service, tls, connect_timeout, handshake_timeout)
                .await
                .map(|s| (s, Via::Pooled))
        };
        match transport {
            Transport::Tls => return tls_now().await,
            Transport::Pooled => return pooled().await,
            Transport::Quic | Transport::Auto => {}
        }
        let peer: SocketAddr = address.parse().map_err(|_| {
            Upstream::Connect(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("QUIC needs an IP address and port, not {address:?}"),
            ))
        })?;
        if transport == Transport::Quic {
            if self.down_now(peer) {
                return Err(Upstream::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer did not answer over QUIC a moment ago",
                )));
            }
            return match self.quic.open(peer, service, tls, connect_timeout).await {
                Ok(s) => Ok((s, Via::Quic)),
                Err(QuicError::Timeout) => {
                    self.mark_down(peer);
                    Err(Upstream::Connect(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no answer over QUIC",
                    )))
                }
                Err(QuicError::Upstream(e)) => Err(e),
            };
        }
        match self.auto_route(peer) {
            AutoRoute::Pooled => return pooled().await,
            AutoRoute::PooledAndProbe => {
                self.probe(peer, service.to_owned(), tls.clone());
                return pooled().await;
            }
            AutoRoute::Quic => {}
        }
        match self.quic.open(peer, service, tls, AUTO_QUIC_TIMEOUT).await {
            Ok(s) => Ok((s, Via::Quic)),
            Err(QuicError::Timeout) => {
                self.quic_silent(peer, service);
                pooled().await
            }
            Err(QuicError::Upstream(e)) => Err(e),
        }
    }

    /// Lets go of the pooled connections (QUIC and HTTP/2) no new stream has asked for in
    /// [`POOL_UNUSED`]: to a peer no longer used, or since the mesh switched transport. Also
    /// forgets the peers `quic` left alone whose time is up, and those `auto` moved to pooled
    /// TLS and has not probed for as long (no stream asked for them): a peer asked for again
    /// is tried over QUIC first, as a new one.
    pub fn release_unused(&self) {
        self.release_unused_at(Instant::now());
    }

    /// [`Self::release_unused`] as of `now`.
    fn release_unused_at(&self, now: Instant) {
        self.down().retain(|_, until| *until > now);
        let Some(since) = now.checked_sub(POOL_UNUSED) else {
            return; // a host up for less than that: nothing can be unused for so long
        };
        self.quic.release_unused(since);
        self.pool.release_unused(since);
        self.silent().retain(|_, s| s.probing || s.until > since);
    }

    /// After a stream [`connect`](Self::connect) opened over `via` failed unanswered (`u`),
    /// what waiting for the answer would have done: a connection that does not answer takes
    /// no new streams (nor does a QUIC connection whose peer is draining); a QUIC peer that
    /// does not answer is left alone for a while (`quic`) or reached over pooled TLS (`auto`,
    /// logged once). Returns whether the same endpoint is worth one more try (not counted as
    /// a failed attempt): over a fresh pooled connection, or over pooled TLS for `auto`.
    pub fn unanswered(
        &self,
        transport: Transport,
        address: &str,
        service: &str,
        tls: &TlsState,
        via: Via,
        u: &Unanswered,
    ) -> bool {
        let (why, timeout) = (&u.why, timed_out(&u.why));
        match (via, &u.conn) {
            // Silent, lost or going away: a fresh connection to the same peer, once.
            (Via::Pooled, Conn::Pooled(slot)) if matches!(why, Upstream::Connect(_)) => {
                self.pool.forget(address, service, tls, slot);
                true
            }
            (Via::Quic, Conn::Quic(conn)) => {
                if timeout || matches!(why, Upstream::Refused(Refusal::Draining)) {
                    self.quic.evict(conn);
                }
                let Ok(peer) = address.parse::<SocketAddr>() else {
                    return false;
                };
                if !timeout {
                    return false;
                }
                if transport == Transport::Auto {
                    self.quic_silent(peer, service);
                    return true;
                }
                self.mark_down(peer);
                false
            }
            _ => false,
        }
    }

    /// `quic`'s peers left alone (a poisoned lock still holds nothing but deadlines: used as is).
    fn down(&self) -> MutexGuard<'_, HashMap<SocketAddr, Instant>> {
        self.down.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `quic`: whether `peer` is being left alone (forgotten once its time is up).
    fn down_now(&self, peer: SocketAddr) -> bool {
        let mut map = self.down();
        match map.get(&peer) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                map.remove(&peer);
                false
            }
            None => false,
        }
    }

    /// `quic`: leaves `peer` alone for [`QUIC_PEER_DOWN_FOR`].
    fn mark_down(&self, peer: SocketAddr) {
        self.down()
            .insert(peer, Instant::now() + QUIC_PEER_DOWN_FOR);
    }

    /// `auto`'s silent peers (as [`Self::down`]).
    fn silent(&self) -> MutexGuard<'_, HashMap<SocketAddr, Silent>> {
        self.silent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `auto`: records that `peer` did not answer over QUIC, for [`RETRY_QUIC_AFTER`] from
    /// now; returns whether it was answering until now.
    fn mark_silent(&self, peer: SocketAddr) -> bool {
        let until = Instant::now() + RETRY_QUIC_AFTER;
        self.silent()
            .insert(
                peer,
                Silent {
                    until,
                    probing: false,
                },
            )
            .is_none()
    }

    /// `auto`: `peer` did not answer over QUIC; pooled TLS for it from now on (logged once).
    fn quic_silent(&self, peer: SocketAddr, service: &str) {
        if self.mark_silent(peer) {
            warn!(
                %peer,
                service,
                "no answer over QUIC (UDP blocked?): using pooled TLS for this peer, trying QUIC again every {}s",
                RETRY_QUIC_AFTER.as_secs()
            );
        }
    }

    fn auto_route(&self, peer: SocketAddr) -> AutoRoute {
        match self.silent().get_mut(&peer) {
            None => AutoRoute::Quic,
            Some(f) if f.probing || f.until > Instant::now() => AutoRoute::Pooled,
            Some(f) => {
                f.probing = true;
                AutoRoute::PooledAndProbe
            }
        }
    }

    /// Tries a QUIC handshake with `peer` in the background; on success the peer is back on
    /// QUIC (the probe's connection stays pooled for the next stream).
    fn probe(self: &Arc<Self>, peer: SocketAddr, service: String, tls: Arc<TlsState>) {
        let this = self.clone();
        tokio::spawn(async move {
            let ok = this
                .quic
                .connect_only(peer, &service, &tls, AUTO_QUIC_TIMEOUT)
                .await
                .is_ok();
            if ok {
                this.silent().remove(&peer);
                info!(%peer, service, "QUIC answers again: back from pooled TLS");
            } else {
                this.mark_silent(peer);
            }
        });
    }
}

/// TLS over TCP (or plain TCP when the mesh has mTLS off).
pub(crate) async fn tcp_tls(
    address: &str,
    service: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
) -> Result<(BoxStream, Via), Upstream> {
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(address))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))
        .map_err(Upstream::Connect)?;
    let _ = tcp.set_nodelay(true);
    let Some(config) = tls else {
        return Ok((Box::pin(tcp) as BoxStream, Via::Tcp));
    };
    // SNI carries the service (what a zone ingress routes on); the certificate check is by
    // SPIFFE id, not by this name.
    let name = ServerName::try_from(service.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("mesh.invalid").expect("a valid DNS name"));
    let connector = tokio_rustls::TlsConnector::from(config);
    let s = tokio::time::timeout(handshake_timeout, connector.connect(name, tcp))
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake timed out",
            ))
        })
        .map_err(Upstream::Tls)?;
    let resumed = s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    Ok((Box::pin(s) as BoxStream, Via::Tls { resumed }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peers left alone or moved to pooled TLS are forgotten once that no longer matters:
    /// `quic`'s when their time is up, `auto`'s when not probed for [`POOL_UNUSED`] (no
    /// stream asked for them) and no probe is running.
    #[test]
    fn peers_no_longer_asked_for_are_forgotten() {
        let dialer = Dialer::default();
        // The sweep runs at `later`; the entries are dated from `earlier` (all in the future,
        // so the test does not depend on how long the host has been up).
        let earlier = Instant::now();
        let later = earlier + POOL_UNUSED + Duration::from_secs(2);
        let ago = later - Duration::from_secs(1);
        let peer = |n: u16| SocketAddr::from(([10, 0, 0, 1], n));
        dialer.down().insert(peer(1), ago);
        dialer.down().insert(peer(2), later + QUIC_PEER_DOWN_FOR);
        let silent = |until, probing| Silent { until, probing };
        dialer.silent().insert(peer(3), silent(earlier, false));
        dialer.silent().insert(peer(4), silent(earlier, true));
        dialer.silent().insert(peer(5), silent(ago, false));
        dialer.release_unused_at(later);
        let mut down: Vec<_> = dialer.down().keys().map(SocketAddr::port).collect();
        let mut silent: Vec<_> = dialer.silent().keys().map(SocketAddr::port).collect();
        down.sort_unstable();
        silent.sort_unstable();
        assert_eq!(down, [2], "quic: only the peer still left alone");
        assert_eq!(
            silent,
            [4, 5],
            "auto: the peer being probed, the one due a probe"
        );
    }
}
