//! A bidirectional copy that holds no buffer while the connection is idle.
//!
//! `tokio::io::copy_bidirectional_with_sizes` owns one buffer per direction for the whole life
//! of the connection: 128 KiB per proxied connection at the sizes the proxy wants, idle
//! keep-alive connections included. Here each direction reads into a per-thread scratch buffer
//! (borrowed only within one poll, never across an await), writes at once as much as the other
//! side accepts, and copies only the unwritten remainder into a buffer of its own, which is
//! freed as soon as it has been written. An idle connection holds nothing but this future's
//! few words of state.
//!
//! Semantics follow tokio's `copy_bidirectional`: EOF on one side shuts the other side's write
//! half down while the other direction keeps copying; the first error ends both; the result is
//! (bytes from `a` to `b`, bytes from `b` to `a`). A direction yields after [`BUDGET`] reads
//! in one poll, so a fast connection cannot starve the tasks sharing its worker.
//!
//! What an idle mTLS connection still holds, besides this copy's state, its task and the
//! sockets (rustls 0.23, tokio-rustls 0.26): rustls' deframer buffer, which rustls shrinks
//! back to 4 KiB (its read size) whenever it is empty but never frees, and cannot be told to
//! (no config knob: `max_fragment_size` only bounds the records we send, so at most how far
//! the peer's buffer grows under load); the record keys, handshake secrets and the peer's
//! certificate chain (~1–2 KiB). `sendable_tls` and `received_plaintext` are chunk queues whose
//! chunks are freed once written or read. The two TLS 1.3 tickets the server sends per
//! handshake (`send_tls13_tickets`) land in session caches bounded at 256 entries per
//! configuration, so they cost no memory per connection. Dropping the 4 KiB would need
//! rustls' unbuffered API, with the caller owning the buffers.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[cfg(test)]
mod tests;

/// Size of the per-thread scratch buffer: the most one read takes.
const SCRATCH: usize = 64 * 1024;
/// Reads a direction makes in one poll before it yields to the scheduler.
const BUDGET: usize = 16;

thread_local! {
    /// Allocated on a thread's first read, then reused by every copy on that thread.
    static SCRATCH_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with the thread's scratch buffer (a fresh one if it is in use further up the
/// stack, which only a reader that itself drives a copy could cause).
fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH_BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < SCRATCH {
                buf.resize(SCRATCH, 0);
            }
            f(&mut buf)
        }
        Err(_) => f(&mut vec![0; SCRATCH]),
    })
}

/// Copies between `a` and `b` in both directions until both have reached EOF and the
/// opposite write halves are shut down; returns (bytes `a` → `b`, bytes `b` → `a`).
///
/// `a` and `b` may be owned streams or `&mut` borrows of them. Owned, the future is the only
/// place the streams live: no `async fn` around it holding a second copy of a TLS stream's
/// state for the life of the connection.
pub(crate) fn copy_bidirectional<A, B>(a: A, b: B) -> CopyBidirectional<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    CopyBidirectional {
        a,
        b,
        a_to_b: Direction::default(),
        b_to_a: Direction::default(),
    }
}

/// The future of [`copy_bidirectional`].
pub(crate) struct CopyBidirectional<A, B> {
    a: A,
    b: B,
    a_to_b: Direction,
    b_to_a: Direction,
}

impl<A, B> Future for CopyBidirectional<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let ab = this.a_to_b.poll(cx, &mut this.a, &mut this.b)?;
        let ba = this.b_to_a.poll(cx, &mut this.b, &mut this.a)?;
        if ab.is_ready() && ba.is_ready() {
            Poll::Ready(Ok((this.a_to_b.copied, this.b_to_a.copied)))
        } else {
            Poll::Pending
        }
    }
}

/// One direction's state.
#[derive(Debug, Default)]
struct Direction {
    /// Bytes read but not yet accepted by the writer (empty, and unallocated, when idle).
    pending: Vec<u8>,
    /// How much of `pending` has been written.
    pos: usize,
    /// Bytes written since the last flush.
    unflushed: bool,
    /// The reader reached EOF.
    eof: bool,
    /// The writer has been shut down: this direction is finished.
    done: bool,
    /// Bytes written in total.
    copied: u64,
}

impl Direction {
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        let mut reads = 0;
        loop {
            ready!(self.drain(cx, w))?;
            if self.eof {
                if self.unflushed {
                    ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    self.unflushed = false;
                }
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if reads == BUDGET {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            reads += 1;
            let step = with_scratch(|scratch| self.pass(cx, r, w, scratch));
            match step {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if self.pending.is_empty() && self.unflushed => {
                    // The reader has nothing more for now: push out what was written.
                    ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    self.unflushed = false;
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Writes the owned remainder; frees it once written.
    fn drain<W>(&mut self, cx: &mut Context<'_>, w: &mut W) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        while self.pos < self.pending.len() {
            let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.pending[self.pos..]))?;
            self.wrote(n)?;
            self.pos += n;
        }
        if !self.pending.is_empty() {
            self.pending = Vec::new();
            self.pos = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// One read into `scratch` and as many writes of it as the writer accepts; keeps the
    /// remainder. Pending when the reader or the writer is.
    fn pass<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        scratch: &mut [u8],
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut buf = ReadBuf::new(scratch);
        ready!(Pin::new(&mut *r).poll_read(cx, &mut buf))?;
        let data = buf.filled();
        if data.is_empty() {
            self.eof = true;
            return Poll::Ready(Ok(()));
        }
        let mut off = 0;
        while off < data.len() {
            match Pin::new(&mut *w).poll_write(cx, &data[off..]) {
                Poll::Ready(Ok(n)) => {
                    self.wrote(n)?;
                    off += n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.pending = data[off..].to_vec();
                    self.pos = 0;
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn wrote(&mut self, n: usize) -> io::Result<()> {
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the writer accepted no bytes",
            ));
        }
        self.copied += n as u64;
        self.unflushed = true;
        Ok(())
    }
}
