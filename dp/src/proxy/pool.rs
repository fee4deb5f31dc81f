//! Pooled TLS between dataplanes: one mTLS connection per peer inbound carrying HTTP/2, one
//! `CONNECT` stream per proxied TCP connection — for peers UDP does not reach (the fallback
//! of `auto`) and for meshes that ask for it (`pooled`).
//!
//! - The client offers the ALPN `weft-pool/1`; an inbound that negotiates it serves HTTP/2 on
//!   that connection instead of forwarding its bytes. Clients without ALPN get the plain
//!   TLS-tunnel behaviour, so both share the inbound's TCP port.
//! - A stream is `CONNECT <service>:<inbound port>`; the server checks both against the
//!   inbound, authorizes the *connection's* certificate, connects to the local service and
//!   answers 200, or 403 (denied), 503 (local service down or draining) or 421 (another
//!   inbound). The client sends the proxied connection's bytes right behind the request,
//!   without waiting for the answer; the server forwards them only once it accepted, and a
//!   refused stream's bytes go to another endpoint ([`super::replay`]).
//! - Half-close is END_STREAM; a failed side resets the stream (`CANCEL`), a reset stream
//!   resets the TCP connection.
//! - Draining sends GOAWAY: streams in flight finish, new ones go elsewhere.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use h2::client::ResponseFuture;
use h2::{Reason, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::quic::Refusal;
use super::shared::{Shared, Slot};
use super::tls::TlsState;
use super::transport::{BoxStream, Conn, Unanswered, Upstream, tcp_tls};
use super::{InboundState, authorize, connect_local, splice};
use crate::metrics::ListenerMetrics;

#[cfg(test)]
mod tests;

/// ALPN of the pooled transport.
pub const ALPN: &[u8] = b"weft-pool/1";
/// Concurrent proxied connections per pooled connection.
const MAX_STREAMS: u32 = 4096;
/// Flow-control window of a stream, and of the whole connection.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Largest frame.
const MAX_FRAME: u32 = 64 * 1024;
/// How long a client waits for the server to answer a CONNECT.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a client pings its pooled connection (HTTP/2 PING), and how long it waits for the
/// answer before closing it: a peer that went away without a word (powered off, partitioned)
/// is noticed, and its connection's streams end, within these 15 s instead of at TCP's
/// retransmission timeout; middleboxes keep the idle connection's state.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = match e.reason() {
        Some(Reason::CANCEL | Reason::STREAM_CLOSED) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// A client's awaited answer to its CONNECT, with the deadline.
type Answer = Pin<Box<tokio::time::Timeout<ResponseFuture>>>;

/// An HTTP/2 stream as a byte stream.
pub(crate) struct H2Stream {
    send: SendStream<Bytes>,
    /// `None` on a client's stream until the server's answer (or for good if it refused).
    recv: Option<RecvStream>,
    /// A client's stream until the answer: its first read waits for it, writes go ahead.
    /// Its connection's slot in the pool rides along, to evict that connection if the stream
    /// goes unanswered.
    answer: Option<(Answer, Slot<Sender>)>,
    pending: Bytes,
    finished: bool,
}

impl H2Stream {
    fn new(
        send: SendStream<Bytes>,
        recv: Option<RecvStream>,
        answer: Option<(Answer, Slot<Sender>)>,
    ) -> H2Stream {
        H2Stream {
            send,
            recv,
            answer,
            pending: Bytes::new(),
            finished: false,
        }
    }

    /// Waits for the server's answer (a no-op once it came): 200, or the refusal as an
    /// [`Unanswered`] error.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some((mut answer, slot)) = self.answer.take() else {
            return Poll::Ready(match self.recv {
                Some(_) => Ok(()),
                None => Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the stream was refused",
                )),
            });
        };
        let Poll::Ready(r) = answer.as_mut().poll(cx) else {
            self.answer = Some((answer, slot));
            return Poll::Pending;
        };
        let why = match r {
            Ok(Ok(response)) if response.status() == StatusCode::OK => {
                self.recv = Some(response.into_body());
                return Poll::Ready(Ok(()));
            }
            Ok(Ok(response)) => Upstream::Refused(match response.status() {
                StatusCode::FORBIDDEN => Refusal::Denied,
                StatusCode::SERVICE_UNAVAILABLE => Refusal::Unavailable,
                other => Refusal::Other(u32::from(other.as_u16())),
            }),
            // Not taken (refused, or above a graceful GOAWAY's last stream), or the connection
            // was lost before any answer.
            Ok(Err(e))
                if e.reason() == Some(Reason::REFUSED_STREAM)
                    || (e.is_go_away() && e.reason() == Some(Reason::NO_ERROR))
                    || e.is_io() =>
            {
                Upstream::Connect(h2_io(e))
            }
            // Reset: possibly after an acceptance whose 200 it overtook; not replayable.
            Ok(Err(e)) => return Poll::Ready(Err(h2_io(e))),
            Err(_) => Upstream::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer to CONNECT",
            )),
        };
        Poll::Ready(Err(Unanswered::io(why, Conn::Pooled(slot))))
    }

    /// A write or shutdown failed with `e`: if the answer is still awaited and has come (a
    /// refusal closes the stream), the answer, which says whether anything was forwarded.
    fn failed(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        if self.answer.is_some()
            && let Poll::Ready(Err(answer)) = self.poll_answer(cx)
        {
            return answer;
        }
        e
    }
}

impl super::transport::Stream for H2Stream {
    /// Accepted: the answer came and was a 200 (a refusal also ends the wait, but leaves no
    /// body to read).
    fn answered(&self) -> bool {
        self.answer.is_none() && self.recv.is_some()
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if !self.finished {
            // Ended without a clean shutdown of our half: the far end must not take what it
            // got for a complete response.
            self.send.send_reset(Reason::CANCEL);
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_answer(cx))?;
        loop {
            if !self.pending.is_empty() {
                let n = buf.remaining().min(self.pending.len());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            let Some(recv) = self.recv.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.as_mut().write_data(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.failed(cx, e))),
            r => r,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.finished {
            if let Err(e) = self.send.send_data(Bytes::new(), true) {
                return Poll::Ready(Err(self.failed(cx, h2_io(e))));
            }
            self.finished = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl H2Stream {
    fn write_data(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) if n > 0 => {
                let n = n.min(buf.len());
                self.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_io)?;
                Poll::Ready(Ok(n))
            }
            Some(Ok(_)) | None => Poll::Ready(Err(match ready!(self.send.poll_reset(cx)) {
                Ok(reason) => io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("stream reset: {reason}"),
                ),
                Err(e) => h2_io(e),
            })),
            Some(Err(e)) => Poll::Ready(Err(h2_io(e))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client side

type Key = (String, String, u64);
pub(crate) type Sender = h2::client::SendRequest<Bytes>;

/// Opens streams to other dataplanes over pooled HTTP/2-over-mTLS connections.
#[derive(Default)]
pub struct PoolClient {
    pool: Shared<Key, Sender>,
}

impl PoolClient {
    async fn connect(
        address: &str,
        service: &str,
        tls: &TlsState,
        connect_timeout: Duration,
        handshake_timeout: Duration,
    ) -> Result<Sender, Upstream> {
        let config = tls
            .pooled_client_for(service)
            .map_err(|e| Upstream::Tls(io::Error::other(e.to_string())))?;
        let (stream, _) = tcp_tls(
            address,
            service,
            Some(config),
            connect_timeout,
            handshake_timeout,
        )
        .await?;
        let reads = Arc::new(AtomicU64::new(0));
        let stream = Counted {
            inner: stream,
            reads: reads.clone(),
        };
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(MAX_STREAMS)
            .enable_push(false)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| Upstream::Tls(h2_io(e)))?;
        tokio::spawn(drive(conn, reads, address.to_owned()));
        debug!(peer = address, service, "pooled connection established");
        Ok(sender)
    }

    /// Opens a stream to the inbound at `address` serving `service`.
    pub async fn open(
        &self,
        address: &str,
        service: &str,
        tls: &TlsState,
        connect_timeout: Duration,
        handshake_timeout: Duration,
    ) -> Result<BoxStream, Upstream> {
        let port = address.rsplit(':').next().unwrap_or_default();
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{service}:{port}"))
            .body(())
            .map_err(|e| Upstream::Connect(io::Error::other(e)))?;
        let key: Key = (address.to_owned(), service.to_owned(), tls.generation);
        let mut last = None;
        // A pooled connection may have gone away (GOAWAY, peer restart): one fresh retry. (Once
        // the request is out, failures come back through the stream: `Dialer::unanswered`.)
        for _ in 0..2 {
            let cell = self.pool.slot(&key, |k, _| k.2 == tls.generation);
            let sender = cell
                .get_or_try_init(|| {
                    Self::connect(address, service, tls, connect_timeout, handshake_timeout)
                })
                .await?
                .clone();
            let sent = async {
                let mut sender = sender.ready().await?;
                sender.send_request(request.clone(), false)
            };
            // The client's bytes follow the request at once; the stream's first read waits
            // for the answer.
            match tokio::time::timeout(ANSWER_TIMEOUT, sent).await {
                Ok(Ok((response, send))) => {
                    let answer = Box::pin(tokio::time::timeout(ANSWER_TIMEOUT, response));
                    let answer = Some((answer, cell));
                    return Ok(Box::pin(H2Stream::new(send, None, answer)));
                }
                Ok(Err(e)) => last = Some(h2_io(e)),
                Err(_) => {
                    last = Some(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no room for a stream",
                    ))
                }
            }
            self.pool.forget(&key, &cell);
        }
        Err(Upstream::Connect(last.unwrap_or_else(|| {
            io::Error::other("pooled connection failed")
        })))
    }

    /// Drops the connections no stream has asked for since `since` from the pool: each closes
    /// once its last stream has ended.
    pub fn release_unused(&self, since: std::time::Instant) {
        self.pool.release_unused(since);
    }

    /// Drops the pooled connection in `slot` to `address` for `service` (it did not answer a
    /// stream) if it is still pooled: the next stream connects afresh.
    pub(crate) fn forget(&self, address: &str, service: &str, tls: &TlsState, slot: &Slot<Sender>) {
        let key = (address.to_owned(), service.to_owned(), tls.generation);
        self.pool.forget(&key, slot);
    }
}

/// A pooled connection's byte stream, counting the reads that brought data: a peer that
/// is sending is alive, however long its answer to a ping waits behind the data.
struct Counted<S> {
    inner: S,
    reads: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs a client connection until it ends, or until its peer neither answers a keep-alive
/// ping nor sends anything (`reads`: see [`Counted`]).
async fn drive<T>(mut conn: h2::client::Connection<T, Bytes>, reads: Arc<AtomicU64>, peer: String)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let pings = conn.ping_pong();
    tokio::select! {
        r = conn => if let Err(e) = r {
            debug!(peer, error = %e, "pooled connection ended");
        },
        () = keep_alive(pings, &reads) => {
            // Dropping the connection closes it: its streams fail, the pool reconnects.
            warn!(peer, "pooled connection: no answer to a keep-alive ping and nothing \
                received in {}s; closed", KEEP_ALIVE_TIMEOUT.as_secs());
        }
    }
}

/// What the keep-alive pings (an HTTP/2 connection's [`h2::PingPong`]).
trait Pinger {
    /// One ping; whether the answer came (false: the connection ended).
    fn round_trip(&mut self) -> impl Future<Output = bool> + Send + '_;
}

impl Pinger for h2::PingPong {
    async fn round_trip(&mut self) -> bool {
        self.ping(h2::Ping::opaque()).await.is_ok()
    }
}

/// Pings every [`KEEP_ALIVE`]; returns when an answer has not come within
/// [`KEEP_ALIVE_TIMEOUT`] and nothing else came either (`reads` did not move): a busy
/// connection's answer may wait behind its data in the peer's send buffer. Never returns
/// without `pings`, or once a ping failed (the connection ended).
async fn keep_alive(pings: Option<impl Pinger>, reads: &AtomicU64) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEP_ALIVE).await;
        let answer = pings.round_trip();
        tokio::pin!(answer);
        loop {
            let before = reads.load(Ordering::Relaxed);
            match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, &mut answer).await {
                Ok(true) => break,
                Ok(false) => return std::future::pending().await,
                Err(_) if reads.load(Ordering::Relaxed) != before => {}
                Err(_) => return,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server side

/// Serves an inbound's pooled connection (ALPN `weft-pool/1` negotiated): each CONNECT stream
/// is authorized against the connection's `services`, then carried to the local service.
pub(crate) async fn serve<S>(
    io: S,
    peer: SocketAddr,
    services: Arc<Vec<String>>,
    settings: watch::Receiver<Arc<InboundState>>,
    metrics: ListenerMetrics,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .handshake::<_, Bytes>(io);
    // Bounded like the TLS handshake before it: a client that never sends its preface must
    // not hold the task (nor delay a drain) for good.
    let mut conn = tokio::time::timeout(super::HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "HTTP/2 handshake timed out"))?
        .map_err(h2_io)?;
    let mut draining = false;
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            () = crate::shutdown::stopped(&mut stop), if !draining => {
                // GOAWAY: streams in flight finish; the client opens new ones elsewhere.
                conn.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        let Some(next) = next else { return Ok(()) };
        let (request, respond) = next.map_err(h2_io)?;
        let state = settings.borrow().clone();
        let services = services.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            metrics.opened.inc();
            metrics.active.inc();
            stream(peer, &services, &state, &metrics, request, respond).await;
            metrics.active.dec();
        });
    }
}

async fn stream(
    peer: SocketAddr,
    services: &[String],
    state: &InboundState,
    metrics: &ListenerMetrics,
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let ib = &state.inbound;
    let answer = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode| {
        let response = Response::builder()
            .status(status)
            .body(())
            .expect("a valid response");
        respond.send_response(response, status != StatusCode::OK)
    };
    let own = ib
        .tags
        .get("kuma.io/service")
        .map(String::as_str)
        .unwrap_or_default();
    let wanted = format!("{own}:{}", ib.port);
    let authority = request.uri().authority().map(|a| a.as_str().to_owned());
    if request.method() != Method::CONNECT || authority.as_deref() != Some(wanted.as_str()) {
        warn!(%peer, port = ib.port, asked = ?authority, "pooled stream for another inbound");
        let _ = answer(&mut respond, StatusCode::MISDIRECTED_REQUEST);
        return;
    }
    if !authorize(ib, services, peer, metrics) {
        let _ = answer(&mut respond, StatusCode::FORBIDDEN);
        return;
    }
    let target = SocketAddr::new(ib.service_address, ib.service_port);
    let Ok(mut up) = connect_local(target, metrics).await else {
        let _ = answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    let Ok(send) = answer(&mut respond, StatusCode::OK) else {
        return;
    };
    metrics.pooled_streams.inc();
    let mut s = H2Stream::new(send, Some(request.into_body()), None);
    match splice(&mut s, &mut up).await {
        Ok((from_client, to_client)) => {
            metrics.bytes_to_upstream.inc_by(from_client);
            metrics.bytes_from_upstream.inc_by(to_client);
        }
        Err(e) => {
            let _ = up.set_zero_linger();
            debug!(%peer, port = ib.port, error = %e, "pooled stream ended with an error");
        }
    }
}

/// Whether a TLS connection negotiated the pooled transport.
pub(crate) fn negotiated(conn: &rustls::ServerConnection) -> bool {
    conn.alpn_protocol() == Some(ALPN)
}
