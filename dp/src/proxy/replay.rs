//! Failover for streams opened without waiting for the peer's answer.
//!
//! Pooled-TLS and QUIC streams carry the client's first bytes right behind their header: the
//! peer's answer (accepted, or refused) comes back with, or just before, the service's reply,
//! and the connection costs no extra round trip between the dataplanes. If the peer refuses
//! the stream it forwarded nothing (it forwards only once it accepted), and the connection can
//! go to another endpoint — as long as what the client sent is still here. [`Replay`] keeps
//! it: every byte written upstream until the peer's answer (then nothing is kept any more), up
//! to [`REPLAY_MAX`] (past it a refusal resets the client, as any failure of an established
//! connection does). What counts as unanswered: [`Unanswered`](super::transport::Unanswered).
//!
//! Where a replay can deliver bytes twice: a peer that accepted and forwarded, and then went
//! silent past the answer timeout or lost its connection before its answer arrived (a crash,
//! a path cut right then) — as with TLS 1.3 early data. A refusal never does, nor does a peer
//! that resets a stream it accepted (that reset is not replayed).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::transport::{Stream, unanswered};

/// The most a client may send before the answer that is kept for a replay.
pub(crate) const REPLAY_MAX: usize = 64 * 1024;

/// An upstream stream that keeps what was written until its peer answers.
pub(crate) struct Replay<S> {
    up: S,
    sent: Vec<u8>,
    keeping: bool,
    /// The last write was pending: its bytes, still the writer's (it offers them again), are
    /// the last `held` of `sent` — kept, since a failure then drops them with the writer.
    held: usize,
}

impl<S> Replay<S> {
    /// Wraps `up`; `keep`: whether its peer may still refuse it (otherwise a pass-through).
    pub(crate) fn new(up: S, keep: bool) -> Self {
        Replay {
            up,
            sent: Vec::new(),
            keeping: keep,
            held: 0,
        }
    }

    /// Everything written so far (or offered by a write still pending), if it was all kept.
    pub(crate) fn into_replay(self) -> Option<Vec<u8>> {
        self.keeping.then_some(self.sent)
    }

    fn keep(&mut self, bytes: &[u8])
    where
        S: Stream,
    {
        if !self.keeping {
            return;
        }
        if self.up.answered() {
            // Accepted: nothing written from now on can be refused.
            self.stop();
            return;
        }
        if self.sent.len() + bytes.len() > REPLAY_MAX {
            self.stop();
        } else {
            self.sent.extend_from_slice(bytes);
        }
    }

    fn stop(&mut self) {
        self.keeping = false;
        self.held = 0;
        self.sent = Vec::new();
    }
}

impl<S: Stream> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.up).poll_read(cx, buf))?;
        // Data or EOF: the peer answered, nothing will be replayed.
        if self.keeping {
            self.stop();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: Stream> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // A pending write's bytes are offered again: drop the tentative copy first.
        if self.held > 0 {
            let len = self.sent.len() - self.held;
            self.sent.truncate(len);
            self.held = 0;
        }
        match Pin::new(&mut self.up).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                self.keep(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => {
                if unanswered(&e).is_some() {
                    // The copy drops what it could not write: keep it for the replay.
                    self.keep(buf);
                }
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                // Kept tentatively: if the stream fails before the write completes (a refusal
                // while HTTP/2 waits for send capacity), the writer drops these bytes.
                self.keep(buf);
                if self.keeping {
                    self.held = buf.len();
                }
                Poll::Pending
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.up).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.up).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::*;

    /// Never answered (as a pooled or QUIC stream before its answer).
    impl Stream for DuplexStream {
        fn answered(&self) -> bool {
            false
        }
    }

    #[tokio::test]
    async fn keeps_what_was_written_until_the_first_byte_back() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut r = Replay::new(a, true);
        r.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        r.write_all(b"\r\n").await.unwrap();
        assert_eq!(
            r.into_replay().as_deref(),
            Some(&b"GET / HTTP/1.1\r\n\r\n"[..])
        );

        let (a, mut c) = tokio::io::duplex(1 << 20);
        let mut r = Replay::new(a, true);
        r.write_all(b"request").await.unwrap();
        c.write_all(b"reply").await.unwrap();
        let mut got = [0u8; 5];
        r.read_exact(&mut got).await.unwrap();
        assert!(r.into_replay().is_none(), "answered: nothing to replay");
        b.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn keeps_nothing_past_the_limit_or_when_told_not_to() {
        let (a, _b) = tokio::io::duplex(4 * REPLAY_MAX);
        let mut r = Replay::new(a, true);
        r.write_all(&vec![1; REPLAY_MAX]).await.unwrap();
        r.write_all(b"x").await.unwrap();
        assert!(r.into_replay().is_none());

        let (a, _b) = tokio::io::duplex(1024);
        let mut r = Replay::new(a, false);
        r.write_all(b"x").await.unwrap();
        assert!(r.into_replay().is_none());
    }

    #[tokio::test]
    async fn a_pending_write_is_kept_once() {
        // The peer takes 4 bytes; the rest of a 10-byte write stays pending (offered again at
        // each poll): it is in the replay once, as the writer would drop it on a failure.
        let (a, _b) = tokio::io::duplex(4);
        let mut r = Replay::new(a, true);
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            r.write_all(b"0123456789"),
        )
        .await;
        assert!(blocked.is_err(), "the duplex should have filled up");
        assert_eq!(r.into_replay().as_deref(), Some(&b"0123456789"[..]));
    }

    /// A stream that is answered once `answered` is set.
    struct Answering {
        io: DuplexStream,
        answered: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Stream for Answering {
        fn answered(&self) -> bool {
            self.answered.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl AsyncRead for Answering {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Answering {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn keeps_nothing_once_the_peer_answered() {
        let (io, _b) = tokio::io::duplex(1024);
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut r = Replay::new(
            Answering {
                io,
                answered: answered.clone(),
            },
            true,
        );
        r.write_all(b"first").await.unwrap();
        answered.store(true, std::sync::atomic::Ordering::SeqCst);
        r.write_all(b"second").await.unwrap();
        assert!(r.into_replay().is_none(), "accepted: nothing to replay");
    }
}
