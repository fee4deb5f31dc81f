//! QUIC between dataplanes: one connection per peer inbound, one bidirectional stream per
//! proxied TCP connection.
//!
//! - Both ends authenticate with the mesh certificates exactly as over TLS (the same
//!   verifiers: WebPKI chain to the mesh bundle; the server must hold the target service's
//!   SPIFFE id). The client's identity is the SPIFFE id of the *connection's* certificate;
//!   nothing in a stream can claim another.
//! - A stream opens with a header, client → server: version (1), the inbound port (u16, big
//!   endian), the length of the target service's name (u8) and the name. The server checks the
//!   port and service against the inbound, authorizes the connection's identity, connects to
//!   the local service and answers one byte, [`ACCEPTED`], before anything from the service. A
//!   refusal is a stream reset with one of the [`code`]s, so the client can tell "denied"
//!   (give up) from "unavailable" or "draining" (try another endpoint). The client sends the
//!   proxied connection's bytes right behind the header, without waiting for the answer; the
//!   server forwards them only once it accepted, and a refused stream's bytes go to another
//!   endpoint ([`super::replay`]).
//! - Half-close maps to FIN both ways; a reset TCP connection resets the stream
//!   ([`code::RESET`]) and a reset stream resets the TCP connection (linger 0).
//! - Inbound endpoints listen on the inbound's port over UDP while the mesh's transport is
//!   `quic` or `auto`; their server configuration follows certificate rotation (new
//!   connections get the new certificate, established connections and their streams stay).
//!   When the mesh leaves QUIC, new handshakes are refused and established connections drain
//!   after [`SWITCH_GRACE`].
//! - Client connections are pooled per (peer, service, TLS generation): after a rotation new
//!   streams go over a new connection and the old one closes when its last stream ends.

use std::future::Future as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::net::TcpStream;
use tokio::sync::{OnceCell, watch};
use tracing::{debug, info, warn};

pub mod stats;
#[cfg(test)]
mod tests;

use super::shared::Shared;
use super::tls::{self, TlsState};
use super::transport::{BoxStream, Conn, Unanswered, Upstream};
use super::{InboundState, Tracker, authorize, connect_local, splice};
use crate::metrics::ListenerMetrics;
use crate::model::Transport;

/// ALPN of weft's tunnel protocol.
pub const ALPN: &[u8] = b"weft-tunnel/1";
/// Header version.
const VERSION: u8 = 1;
/// The server's answer when the stream is accepted.
const ACCEPTED: u8 = 0;
/// How long a server waits for a stream's header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for the server to accept a stream, beyond a few round trips, when
/// the peer sends nothing back: the server answers once its local service accepted the TCP
/// connection, and acknowledges the stream's first packet within milliseconds. Nothing at all
/// back means the peer is gone (a dead peer's UDP port sends nothing back) or the path drops
/// UDP: another endpoint (or, for `auto`, pooled TLS) is tried. A peer that did send is waited
/// for longer ([`Awaiting`]): its service is slow.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a finished stream waits for the peer to acknowledge its last bytes.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an inbound's established QUIC connections keep taking streams after the mesh
/// switched to another transport, before they drain and close.
const SWITCH_GRACE: Duration = Duration::from_secs(3);
/// Concurrent proxied connections per peer connection.
const MAX_STREAMS: u32 = 4096;

/// Application error codes (stream resets and connection closes).
pub mod code {
    /// The client's identity is not allowed on this inbound.
    pub const DENIED: u32 = 1;
    /// The local service did not accept the connection.
    pub const UNAVAILABLE: u32 = 2;
    /// The inbound is draining or gone: use another endpoint.
    pub const DRAINING: u32 = 3;
    /// The header was malformed or named another inbound.
    pub const BAD_HEADER: u32 = 4;
    /// The TCP connection on the other side was reset.
    pub const RESET: u32 = 5;
}

/// The largest QUIC packet (UDP payload) a dataplane sends or accepts, where the path carries
/// it: path MTU discovery (RFC 8899 probes) starts at 1200 bytes and searches up to this, so a
/// link with 9000-byte jumbo frames carries a bulk transfer in 6× fewer packets than at quinn's
/// own ceiling (1452), and each packet is a fixed cost in user space (sealing, framing, loss
/// tracking). 8952 is a 9000-byte frame less IPv6 and UDP headers. The ceiling actually used is
/// [`packet_ceiling`]: on a host whose interfaces are all 1500 bytes it stays at quinn's 1452 (a
/// higher one only sends probes the local kernel refuses, about a dozen per connection and
/// re-search). Packets this big need the vendored quinn (`vendor/quinn/WEFT.md`), which caps
/// each GSO send at the 64 KiB the kernel takes (7 packets of 8952): upstream quinn 0.11.12
/// sends 10 packets per `sendmsg` whatever their size, and with 8952-byte packets those full
/// batches were lost and black-hole detection took the connection down to 1200 bytes.
pub const MAX_UDP_PAYLOAD: u16 = 8952;

/// quinn's default probing ceiling: a 1500-byte frame with IPv6 and UDP headers.
const ETHERNET_PAYLOAD: u16 = 1452;

/// The probing ceiling and the advertised `max_udp_payload_size`: what the largest interface
/// of the dataplane's network namespace (loopback aside) carries, less IPv6 and UDP headers,
/// between quinn's 1452 and [`MAX_UDP_PAYLOAD`]; [`MAX_UDP_PAYLOAD`] if the interfaces cannot
/// be read. Read once: a changed interface MTU takes a restart.
pub fn packet_ceiling() -> u16 {
    static CEILING: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *CEILING.get_or_init(|| ceiling_for(largest_interface_mtu()))
}

/// The largest MTU among the interfaces in `/sys/class/net` but `lo`.
fn largest_interface_mtu() -> Option<u32> {
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "lo")
        .filter_map(|e| {
            let mtu = std::fs::read_to_string(e.path().join("mtu")).ok()?;
            mtu.trim().parse::<u32>().ok()
        })
        .max()
}

/// [`packet_ceiling`] for the largest interface MTU `mtu`.
pub(crate) fn ceiling_for(mtu: Option<u32>) -> u16 {
    let Some(mtu) = mtu else {
        return MAX_UDP_PAYLOAD;
    };
    u16::try_from(mtu.saturating_sub(48))
        .unwrap_or(u16::MAX)
        .clamp(ETHERNET_PAYLOAD, MAX_UDP_PAYLOAD)
}

/// The congestion controller of the QUIC connections a dataplane opens and accepts. It governs
/// what this side sends, so each end picks its own (`quic_congestion` in weft-dp's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default: every loss is read as congestion and the window
    /// shrinks by 30 %, as TCP does.
    #[default]
    Cubic,
    /// BBR (quinn's, after Google's quiche): sends at the bandwidth and round-trip time it
    /// measures, so random loss does not slow it down — for lossy links, such as a zone
    /// ingress across a WAN. quinn calls its BBR experimental, and BBR (v1) is known to take
    /// more than its share from CUBIC flows on a shared bottleneck.
    Bbr,
}

impl Congestion {
    /// Its name in the config (`cubic`, `bbr`).
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
        }
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Congestion, String> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            _ => Err(format!(
                "{s:?} is not a congestion controller (cubic or bbr)"
            )),
        }
    }
}

/// Transport parameters for both ends: many concurrent streams, no datagrams, windows sized
/// for bulk transfers on a LAN while bounding what one peer can make the dataplane buffer,
/// packets up to [`packet_ceiling`] where the path allows, and `congestion` for what this end
/// sends.
pub fn transport_config(congestion: Congestion) -> Arc<quinn::TransportConfig> {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(packet_ceiling());
    let mut t = quinn::TransportConfig::default();
    t.mtu_discovery_config(Some(mtu));
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        // Nothing reads QUIC datagrams: take none (quinn would buffer ~1.25 MiB per connection).
        .datagram_receive_buffer_size(None)
        .stream_receive_window(VarInt::from_u32(2 * 1024 * 1024))
        .receive_window(VarInt::from_u32(32 * 1024 * 1024))
        .send_window(32 * 1024 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .max_idle_timeout(Some(VarInt::from_u32(30_000).into()))
        .initial_rtt(Duration::from_millis(10));
    if congestion == Congestion::Bbr {
        t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    Arc::new(t)
}

/// Encodes a stream header.
pub(crate) fn header(port: u16, service: &str) -> Option<Vec<u8>> {
    let len = u8::try_from(service.len()).ok()?;
    let mut h = Vec::with_capacity(4 + service.len());
    h.push(VERSION);
    h.extend_from_slice(&port.to_be_bytes());
    h.push(len);
    h.extend_from_slice(service.as_bytes());
    Some(h)
}

/// Reads a stream header: (port, service).
async fn read_header(recv: &mut RecvStream) -> Result<(u16, String), String> {
    let mut fixed = [0u8; 4];
    recv.read_exact(&mut fixed)
        .await
        .map_err(|e| format!("header: {e}"))?;
    if fixed[0] != VERSION {
        return Err(format!("header version {} (want {VERSION})", fixed[0]));
    }
    let port = u16::from_be_bytes([fixed[1], fixed[2]]);
    let mut name = vec![0u8; usize::from(fixed[3])];
    recv.read_exact(&mut name)
        .await
        .map_err(|e| format!("header: {e}"))?;
    let service = String::from_utf8(name).map_err(|_| "header: service is not UTF-8".to_owned())?;
    Ok((port, service))
}

/// A stream as one duplex byte stream.
type Duplex = tokio::io::Join<RecvStream, SendStream>;

/// Resets both halves of a stream with `c` (no-op on halves already closed).
fn reset(s: &mut Duplex, c: u32) {
    let _ = s.writer_mut().reset(VarInt::from_u32(c));
    let _ = s.reader_mut().stop(VarInt::from_u32(c));
}

/// Copies between a stream and the local service's TCP connection, mapping resets both ways;
/// returns (bytes to the service, bytes from it).
///
/// Once the copy is done, waits (at most [`FINISH_TIMEOUT`]) until the peer has acknowledged
/// all of the stream's data: quinn forgets unacknowledged stream data when its connection
/// closes, and a draining inbound closes its connection as soon as its last stream has ended,
/// which would cut the tail of that stream's last response.
async fn splice_stream(mut stream: Duplex, mut tcp: TcpStream) -> io::Result<(u64, u64)> {
    match splice(&mut stream, &mut tcp).await {
        Ok(n) => {
            let acked = stream.writer_mut().stopped();
            let _ = tokio::time::timeout(FINISH_TIMEOUT, acked).await;
            Ok(n)
        }
        Err(e) => {
            reset(&mut stream, code::RESET);
            // Close the TCP side with a RST, as a reset stream means the far side was reset.
            let _ = tcp.set_zero_linger();
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client side

/// Pool key: peer address, service (whose SPIFFE id the peer must hold) and TLS generation.
type Key = (SocketAddr, String, u64);

/// Opens streams to other dataplanes over pooled QUIC connections.
#[derive(Default)]
pub struct QuicClient {
    v4: OnceCell<quinn::Endpoint>,
    v6: OnceCell<quinn::Endpoint>,
    /// Each connection with its metrics handle (the pool entry is what keeps it tracked), or
    /// why its handshake failed (for the callers queued on that handshake; the next lookup
    /// starts afresh).
    pool: Shared<Key, Entry>,
}

/// A pool entry: a connection, or its handshake's failure (other than a timeout).
type Entry = Result<Arc<stats::Tracked>, QuicError>;

/// Why a QUIC stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// No answer to the handshake in time: UDP may be blocked, or the peer is down.
    #[error("no answer over QUIC")]
    Timeout,
    /// Any other failure.
    #[error(transparent)]
    Upstream(Upstream),
}

impl QuicError {
    /// The same failure, for another caller.
    fn again(&self) -> QuicError {
        match self {
            QuicError::Timeout => QuicError::Timeout,
            QuicError::Upstream(u) => QuicError::Upstream(u.again()),
        }
    }
}

impl QuicClient {
    async fn endpoint(&self, peer: &SocketAddr) -> io::Result<quinn::Endpoint> {
        let (cell, any) = match peer.ip() {
            IpAddr::V4(_) => (&self.v4, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            IpAddr::V6(_) => (&self.v6, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        cell.get_or_try_init(|| async { endpoint(SocketAddr::new(any, 0), None) })
            .await
            .cloned()
    }

    /// Connects to `peer` (or finds the pooled connection) without opening a stream.
    pub async fn connect_only(
        &self,
        peer: SocketAddr,
        service: &str,
        tls: &TlsState,
        timeout: Duration,
    ) -> Result<(), QuicError> {
        self.connection(peer, service, tls, timeout).await.map(drop)
    }

    /// Drops the connections no stream has asked for since `since` from the pool: each closes
    /// once its last stream has ended.
    pub fn release_unused(&self, since: std::time::Instant) {
        self.pool.release_unused(since);
    }

    /// Drops `conn` from the pool (it did not answer a stream, or its peer is draining): new
    /// streams go over a new connection (the old one lives while it has streams, or until its
    /// idle timeout).
    pub fn evict(&self, conn: &Connection) {
        self.pool.forget_where(|t| {
            t.as_ref()
                .is_ok_and(|t| t.conn().stable_id() == conn.stable_id())
        });
    }

    /// A pooled connection to `peer` for `service`, connecting if there is none (concurrent
    /// callers share one handshake).
    async fn connection(
        &self,
        peer: SocketAddr,
        service: &str,
        tls: &TlsState,
        timeout: Duration,
    ) -> Result<Arc<stats::Tracked>, QuicError> {
        let key: Key = (peer, service.to_owned(), tls.generation);
        // One deadline for the caller, however many handshakes it waits on: callers that
        // queued on a handshake that timed out would otherwise each start the next one, a
        // `timeout` apiece, one after another.
        let deadline = tokio::time::Instant::now() + timeout;
        for _ in 0..2 {
            // Connections of older TLS generations take no new streams; they close when
            // their last stream ends. A failed handshake's entry is for those who waited on it.
            let cell = self.pool.slot(&key, |k, t| {
                k.2 == tls.generation && t.as_ref().is_ok_and(|t| t.conn().close_reason().is_none())
            });
            let init = cell.get_or_try_init(|| async {
                // A caller that queued on a handshake which was given up has little of its
                // time left: the peer did not answer that one, a new one is not worth it (ten
                // requests 5 ms apart sent ten Initials, each abandoned within milliseconds).
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left < timeout / 2 {
                    return Err(QuicError::Timeout);
                }
                match self.handshake(peer, service, tls, left).await {
                    Ok(c) => Ok(Ok(stats::QUIC.track(stats::Side::Client, &c))),
                    // Not kept: a queued caller with time left tries a handshake of its own.
                    Err(QuicError::Timeout) => Err(QuicError::Timeout),
                    // Kept, so that every caller queued on this handshake gets its failure
                    // (a refusal or a certificate the peer or this side rejected) rather than
                    // a timeout of its own — which `auto` would take for UDP blocked.
                    Err(e) => Ok(Err(e)),
                }
            });
            // The deadline first: a caller past it starts nothing.
            let tracked = tokio::select! {
                biased;
                () = tokio::time::sleep_until(deadline) => return Err(QuicError::Timeout),
                t = init => t,
            };
            let tracked = match tracked? {
                Ok(t) => t.clone(),
                Err(e) => return Err(e.again()),
            };
            if tracked.conn().close_reason().is_none() {
                return Ok(tracked);
            }
            self.pool.forget(&key, &cell);
        }
        Err(QuicError::Upstream(Upstream::Connect(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "QUIC connection closed",
        ))))
    }

    async fn handshake(
        &self,
        peer: SocketAddr,
        service: &str,
        tls: &TlsState,
        timeout: Duration,
    ) -> Result<Connection, QuicError> {
        let config = tls
            .quic_client_for(service)
            .map_err(|e| QuicError::Upstream(Upstream::Tls(io::Error::other(e.to_string()))))?;
        let endpoint = self
            .endpoint(&peer)
            .await
            .map_err(|e| QuicError::Upstream(Upstream::Connect(e)))?;
        // SNI carries the service, as over TLS.
        let name = if service.is_empty() || service.len() > 253 {
            "mesh.invalid"
        } else {
            service
        };
        let connecting = match endpoint.connect_with(config.clone(), peer, name) {
            Err(quinn::ConnectError::InvalidServerName(_)) => {
                endpoint.connect_with(config, peer, "mesh.invalid")
            }
            other => other,
        }
        .map_err(|e| QuicError::Upstream(Upstream::Connect(io::Error::other(e))))?;
        match tokio::time::timeout(timeout, connecting).await {
            Err(_) => Err(QuicError::Timeout),
            Ok(Err(e)) => Err(QuicError::Upstream(Upstream::Tls(io::Error::other(e)))),
            Ok(Ok(c)) => {
                debug!(%peer, service, "QUIC connection established");
                Ok(c)
            }
        }
    }

    /// Opens a stream to the inbound `peer` serving `service`: connects (or reuses the pooled
    /// connection) and sends the header. The server's answer is read by the stream's first
    /// read; the client's bytes may follow the header at once.
    pub async fn open(
        &self,
        peer: SocketAddr,
        service: &str,
        tls: &TlsState,
        timeout: Duration,
    ) -> Result<BoxStream, QuicError> {
        let tracked = self.connection(peer, service, tls, timeout).await?;
        let conn = tracked.conn().clone();
        let fail = |e: String| QuicError::Upstream(Upstream::Connect(io::Error::other(e)));
        let hdr =
            header(peer.port(), service).ok_or_else(|| fail("service name too long".into()))?;
        // The client's bytes follow the header at once; the stream's first read waits for the
        // answer, until the same deadline (extended once if the peer has sent anything).
        let answer = Awaiting::new(conn);
        let deadline = answer.deadline.deadline();
        let opened = async {
            let (mut send, recv) = answer
                .conn
                .open_bi()
                .await
                .map_err(|e| fail(e.to_string()))?;
            send.write_all(&hdr)
                .await
                .map_err(|e| fail(e.to_string()))?;
            Ok(tokio::io::join(recv, send))
        };
        let stream = match tokio::time::timeout_at(deadline, opened).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                self.evict(&answer.conn);
                return Err(QuicError::Timeout);
            }
        };
        Ok(Box::pin(QuicStream {
            inner: stream,
            answer: Some(answer),
            finished: false,
            _tracked: tracked,
        }) as BoxStream)
    }
}

/// The refusal a reset code means, if it is one: a server resets with these before it
/// accepts, never after ([`code::RESET`] comes only after an acceptance).
pub(crate) fn refused(c: VarInt) -> Option<Refusal> {
    match u32::try_from(c.into_inner()).ok()? {
        code::DENIED => Some(Refusal::Denied),
        code::DRAINING => Some(Refusal::Draining),
        code::UNAVAILABLE => Some(Refusal::Unavailable),
        code::BAD_HEADER => Some(Refusal::Other(code::BAD_HEADER)),
        _ => None,
    }
}

/// A server's refusal of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not authorized: no other endpoint will say otherwise.
    Denied,
    /// The inbound is draining.
    Draining,
    /// The local service is down.
    Unavailable,
    /// Another code.
    Other(u32),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Denied => f.write_str("denied by the peer's traffic permissions"),
            Refusal::Draining => f.write_str("the peer is draining"),
            Refusal::Unavailable => f.write_str("the peer's local service is unavailable"),
            Refusal::Other(c) => write!(f, "refused with code {c}"),
        }
    }
}

/// The client end of a stream: a reset on error paths is the caller's (`splice` reports the
/// error and drops the stream; an unfinished send half is then reset, not finished).
struct QuicStream {
    inner: Duplex,
    /// Until the server's answer has been read. Writes go ahead meanwhile.
    answer: Option<Awaiting>,
    finished: bool,
    /// Keeps the connection in the QUIC metrics while the stream lives, also once the pool
    /// has let go of it (evicted, released unused, older TLS generation).
    _tracked: Arc<stats::Tracked>,
}

/// A stream's wait for the server's answer.
struct Awaiting {
    /// When to give up: first [`ANSWER_TIMEOUT`] and a few round trips, then — if the peer
    /// has sent anything meanwhile — its connect timeout later.
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The connection: to evict it if the answer does not come, and to see whether its peer
    /// is sending.
    conn: Connection,
    /// The UDP datagrams received on `conn` when the stream was opened; `None` once the
    /// deadline has been extended.
    heard: Option<u64>,
}

impl Awaiting {
    fn new(conn: Connection) -> Self {
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT + conn.rtt() * 4;
        Awaiting {
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            heard: Some(conn.stats().udp_rx.datagrams),
            conn,
        }
    }

    /// Ready once the wait is over. At the first deadline, a peer that has sent nothing since
    /// the stream was opened — not even the acknowledgement of its first packet, due within
    /// milliseconds — is silent (UDP blocked, or the peer gone). One that has sent something
    /// is taken as alive and its service slow to accept: it refuses the stream itself once
    /// its own connect timeout ([`super::CONNECT_TIMEOUT`]) is up, so the wait is extended by
    /// that much, once. (Any datagram counts: with only our direction blocked, a keep-alive
    /// or retransmission from the peer inside the first window delays the verdict to the
    /// extended deadline.)
    fn poll_given_up(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        ready!(self.deadline.as_mut().poll(cx));
        let Some(heard) = self.heard.take() else {
            return Poll::Ready(());
        };
        if self.conn.stats().udp_rx.datagrams == heard {
            return Poll::Ready(());
        }
        let later = self.deadline.deadline() + super::CONNECT_TIMEOUT;
        self.deadline.as_mut().reset(later);
        ready!(self.deadline.as_mut().poll(cx));
        Poll::Ready(())
    }
}

impl QuicStream {
    /// Reads the server's answer (a no-op once read): [`ACCEPTED`], or why not as an
    /// [`Unanswered`] error.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(awaiting) = self.answer.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut byte = [0u8; 1];
        let why = match self.inner.reader_mut().poll_read(cx, &mut byte) {
            Poll::Ready(Ok(1)) if byte[0] == ACCEPTED => {
                self.answer = None;
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(1)) => {
                return Poll::Ready(Err(io::Error::other(format!(
                    "unexpected answer {}",
                    byte[0]
                ))));
            }
            Poll::Ready(Ok(_)) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream finished without an answer",
                )));
            }
            Poll::Ready(Err(quinn::ReadError::Reset(c))) => match refused(c) {
                Some(r) => Upstream::Refused(r),
                // A reset after an acceptance it overtook (quinn drops unread data on a
                // reset): bytes may have been forwarded, no replay.
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("stream reset with code {c}"),
                    )));
                }
            },
            // The connection was lost before any answer.
            Poll::Ready(Err(e)) => Upstream::Connect(io::Error::other(e)),
            Poll::Pending => {
                ready!(awaiting.poll_given_up(cx));
                Upstream::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer over QUIC",
                ))
            }
        };
        // The answer stays awaited: a refused stream was not accepted (`answered` says so).
        Poll::Ready(Err(Unanswered::io(why, Conn::Quic(awaiting.conn.clone()))))
    }
}

impl super::transport::Stream for QuicStream {
    fn answered(&self) -> bool {
        self.answer.is_none()
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        if !self.finished {
            // Dropped before a clean shutdown of our half (the TCP side failed): reset, so
            // the far end does not mistake it for a complete response.
            let _ = self.inner.writer_mut().reset(VarInt::from_u32(code::RESET));
            return;
        }
        // Finished: the stream's last bytes and FIN may not be acknowledged yet, and if this
        // was the connection's last handle (evicted from the pool, or of an older TLS
        // generation) quinn would close it now and forget them. The wait holds a handle, so
        // the connection lives until the peer has them (at most `FINISH_TIMEOUT`).
        let mut acked = Box::pin(self.inner.writer_mut().stopped());
        if acked
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()))
            .is_pending()
        {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = tokio::time::timeout(FINISH_TIMEOUT, acked).await;
                });
            }
        }
    }
}

impl tokio::io::AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_answer(cx))?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        let Poll::Ready(Err(e)) = r else { return r };
        if self.answer.is_some() {
            // Refused before the answer was read (a refusal stops our half too): the answer
            // says why, and that nothing was forwarded; or the stop's code, if it came first.
            if let Poll::Ready(Err(answer)) = self.poll_answer(cx) {
                return Poll::Ready(Err(answer));
            }
            let stopped = match e
                .get_ref()
                .and_then(|i| i.downcast_ref::<quinn::WriteError>())
            {
                Some(quinn::WriteError::Stopped(c)) => refused(*c),
                _ => None,
            };
            // (Stopped with a refusal's code, and not accepted meanwhile.)
            if let (Some(r), Some(awaiting)) = (stopped, &self.answer) {
                let conn = Conn::Quic(awaiting.conn.clone());
                return Poll::Ready(Err(Unanswered::io(Upstream::Refused(r), conn)));
            }
        }
        Poll::Ready(Err(e))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.finished = true;
        }
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Server side

/// Whether an inbound in `state` serves QUIC.
pub(crate) fn wanted(state: &InboundState) -> bool {
    state.mode.needs_certificate() && matches!(state.transport, Transport::Quic | Transport::Auto)
}

/// The QUIC side of an inbound listener: binds `bind` over UDP once the mesh wants QUIC,
/// follows the TLS state and the transport setting, serves streams until `stop`.
pub(crate) struct QuicInbound {
    pub(crate) bind: SocketAddr,
    pub(crate) settings: watch::Receiver<Arc<InboundState>>,
    pub(crate) tls: watch::Receiver<Option<Arc<TlsState>>>,
    pub(crate) metrics: ListenerMetrics,
    pub(crate) tracker: Arc<Tracker>,
}

impl QuicInbound {
    pub(crate) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        // Wait until QUIC is wanted and a certificate exists.
        let endpoint = loop {
            let want = wanted(&self.settings.borrow_and_update());
            let tls = self.tls.borrow_and_update().clone();
            if let (true, Some(tls)) = (want, tls) {
                match endpoint(self.bind, Some(tls.quic_server.clone())) {
                    Ok(e) => break e,
                    Err(e) => {
                        warn!(addr = %self.bind, error = %e, "cannot bind QUIC; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(super::REBIND_AFTER) => continue,
                            () = crate::shutdown::stopped(&mut stop) => return,
                        }
                    }
                }
            }
            tokio::select! {
                r = self.settings.changed() => if r.is_err() { return },
                r = self.tls.changed() => if r.is_err() { return },
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        };
        info!(addr = %self.bind, "listening (QUIC)");
        let this = Arc::new(self);
        let mut settings = this.settings.clone();
        let mut tls = this.tls.clone();
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let this = this.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move { this.connection(incoming, stop).await });
                }
                r = settings.changed() => {
                    if r.is_err() { break }
                    let want = wanted(&settings.borrow_and_update());
                    let tls = tls.borrow().clone();
                    // Off: refuse new connections, keep established ones.
                    endpoint.set_server_config(want.then(|| tls.map(|t| t.quic_server.clone())).flatten());
                }
                r = tls.changed() => {
                    if r.is_err() { break }
                    let t = tls.borrow_and_update().clone();
                    if wanted(&settings.borrow()) {
                        if let Some(t) = t {
                            endpoint.set_server_config(Some(t.quic_server.clone()));
                        }
                    }
                }
                () = crate::shutdown::stopped(&mut stop) => break,
            }
        }
        endpoint.set_server_config(None);
        info!(addr = %this.bind, "stopped accepting (QUIC)");
    }

    async fn connection(
        self: Arc<Self>,
        incoming: quinn::Incoming,
        mut stop: watch::Receiver<bool>,
    ) {
        let peer = incoming.remote_address();
        let port = self.bind.port();
        let conn = match tokio::time::timeout(super::HANDSHAKE_TIMEOUT, incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) if tls_refusal(&e) => {
                self.metrics.tls_failures.inc();
                warn!(%peer, port, error = %e, "QUIC handshake failed");
                return;
            }
            // Not a TLS failure: the client gave up, or our answers do not reach it (UDP
            // dropped on the way back: an `auto` client falls back to TLS and says so).
            Ok(Err(e)) => {
                debug!(%peer, port, error = %e, "QUIC handshake abandoned");
                return;
            }
            Err(_) => {
                debug!(%peer, port, "QUIC handshake timed out");
                return;
            }
        };
        let mesh = self
            .tls
            .borrow()
            .as_ref()
            .map(|t| t.mesh.clone())
            .unwrap_or_default();
        let services: Arc<Vec<String>> = Arc::new(
            conn.peer_identity()
                .and_then(|i| {
                    i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                        .ok()
                })
                .and_then(|certs| certs.first().map(|leaf| tls::peer_services(leaf, &mesh)))
                .unwrap_or_default(),
        );
        debug!(%peer, port, client = ?services, "QUIC connection accepted");
        // Counted until this task lets go of the connection.
        let _tracked = stats::QUIC.track(stats::Side::Server, &conn);
        let streams = Arc::new(Tracker::default());
        // Once the mesh no longer wants QUIC (switched to `tls` or `pooled`), the connection
        // takes streams for a grace period — clients that have not heard of the switch yet
        // keep working — then drains like a stopping inbound: without it, the client's
        // keep-alives would hold an idle connection open for good.
        let mut settings = self.settings.clone();
        let unwanted_since = |s: &InboundState| (!wanted(s)).then(tokio::time::Instant::now);
        let mut leave_at = unwanted_since(&settings.borrow_and_update()).map(|t| t + SWITCH_GRACE);
        loop {
            let accepted = tokio::select! {
                s = conn.accept_bi() => s,
                () = crate::shutdown::stopped(&mut stop) => break,
                r = settings.changed() => {
                    if r.is_err() {
                        break;
                    }
                    let now_unwanted = unwanted_since(&settings.borrow_and_update());
                    leave_at = match (leave_at, now_unwanted) {
                        (Some(t), Some(_)) => Some(t),
                        (_, t) => t.map(|t| t + SWITCH_GRACE),
                    };
                    continue;
                }
                () = tokio::time::sleep_until(leave_at.unwrap_or_else(tokio::time::Instant::now)),
                    if leave_at.is_some() => {
                    debug!(%peer, port, "the mesh no longer uses QUIC: closing the connection");
                    break;
                }
            };
            let Ok((send, recv)) = accepted else { return };
            let this = self.clone();
            let services = services.clone();
            let guard = (self.tracker.enter(), streams.enter());
            tokio::spawn(async move {
                this.metrics.opened.inc();
                this.metrics.quic_streams.inc();
                this.metrics.active.inc();
                this.stream(peer, &services, tokio::io::join(recv, send))
                    .await;
                this.metrics.active.dec();
                drop(guard);
            });
        }
        // Draining or removed: refuse new streams (the client tries another endpoint) until
        // the ones in flight end, then close.
        loop {
            tokio::select! {
                s = conn.accept_bi() => match s {
                    Ok((mut send, mut recv)) => {
                        let _ = send.reset(VarInt::from_u32(code::DRAINING));
                        let _ = recv.stop(VarInt::from_u32(code::DRAINING));
                    }
                    Err(_) => return,
                },
                () = streams.idle() => break,
            }
        }
        conn.close(VarInt::from_u32(code::DRAINING), b"draining");
    }

    async fn stream(&self, peer: SocketAddr, services: &[String], mut s: Duplex) {
        let state = self.settings.borrow().clone();
        let ib = &state.inbound;
        let header = tokio::time::timeout(HEADER_TIMEOUT, read_header(s.reader_mut())).await;
        let (port, service) = match header {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                warn!(%peer, port = ib.port, error = %e, "bad QUIC stream header");
                return reset(&mut s, code::BAD_HEADER);
            }
            Err(_) => return reset(&mut s, code::BAD_HEADER),
        };
        let own = ib
            .tags
            .get("kuma.io/service")
            .map(String::as_str)
            .unwrap_or_default();
        if port != ib.port || service != own {
            warn!(%peer, port = ib.port, asked_port = port, asked = %service, "QUIC stream for another inbound");
            return reset(&mut s, code::BAD_HEADER);
        }
        if !authorize(ib, services, peer, &self.metrics) {
            return reset(&mut s, code::DENIED);
        }
        let target = SocketAddr::new(ib.service_address, ib.service_port);
        let Ok(up) = connect_local(target, &self.metrics).await else {
            return reset(&mut s, code::UNAVAILABLE);
        };
        if s.writer_mut().write_all(&[ACCEPTED]).await.is_err() {
            return;
        }
        match splice_stream(s, up).await {
            Ok((to, from)) => {
                self.metrics.bytes_to_upstream.inc_by(to);
                self.metrics.bytes_from_upstream.inc_by(from);
            }
            Err(e) => debug!(%peer, port = ib.port, error = %e, "QUIC stream ended with an error"),
        }
    }
}

/// Whether a failed handshake was refused over TLS — a certificate either end did not accept,
/// or no protocol in common (a TLS alert, as a QUIC crypto error) — rather than abandoned.
fn tls_refusal(e: &quinn::ConnectionError) -> bool {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => t.code,
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
        _ => return false,
    };
    // Crypto errors are 0x100 + the TLS alert (RFC 9001, 4.8).
    (0x100..0x200).contains(&u64::from(code))
}

/// Binds an endpoint on `addr` (UDP): a server endpoint with `config`, else a client one.
fn endpoint(addr: SocketAddr, config: Option<quinn::ServerConfig>) -> io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket_buffers(&socket);
    let runtime =
        quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime for QUIC"))?;
    let mut ec = quinn::EndpointConfig::default();
    // What the peer may send us (a transport parameter): its path MTU discovery stops here.
    ec.max_udp_payload_size(packet_ceiling())
        .map_err(|e| io::Error::other(e.to_string()))?;
    quinn::Endpoint::new(ec, config, socket, runtime)
}

/// What a QUIC socket asks for as its receive and send buffers. With Linux's default
/// (208 KiB) one bulk stream overflows the receiver's socket: the kernel drops datagrams the
/// dataplane has not read yet and each drop is a loss to the sender's congestion control
/// (measured: 700–900 drops in a 4 s, 3 Gbit/s transfer between two veth hosts; none at
/// 4 MiB). The kernel caps the size at `net.core.rmem_max` / `wmem_max`. It is a limit, not
/// an allocation: an idle socket holds nothing.
pub(crate) const UDP_BUFFER: usize = 4 << 20;

/// Sets the socket's buffers to [`UDP_BUFFER`], warning once if the kernel grants less.
pub(crate) fn socket_buffers(socket: &std::net::UdpSocket) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let state = match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot set the QUIC socket's buffers");
            return;
        }
    };
    // Linux reports twice what was set (the other half is its bookkeeping).
    let _ = state.set_recv_buffer_size(socket.into(), UDP_BUFFER);
    let _ = state.set_send_buffer_size(socket.into(), UDP_BUFFER);
    let got = |r: io::Result<usize>| r.map_or(0, |n| n / 2);
    let (recv, send) = (
        got(state.recv_buffer_size(socket.into())),
        got(state.send_buffer_size(socket.into())),
    );
    if recv < UDP_BUFFER || send < UDP_BUFFER {
        WARNED.call_once(|| {
            warn!(
                recv_kib = recv >> 10,
                send_kib = send >> 10,
                want_kib = UDP_BUFFER >> 10,
                "QUIC socket buffers are smaller than wanted, so bulk transfers over QUIC lose \
                 datagrams and slow down: raise net.core.rmem_max and net.core.wmem_max \
                 (sysctl) to at least {UDP_BUFFER}"
            )
        });
    }
}
