//! The copy between in-memory pipes: large random data both ways through small pipes and a
//! writer that accepts a few bytes at a time, half-close each way, errors, budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

use super::*;

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.u8(..)).collect()
}

/// Wraps a stream: every other write is refused (Pending, woken at once), the others take at
/// most `max` bytes.
struct Trickle<T> {
    inner: T,
    max: usize,
    refuse: bool,
}

impl<T: AsyncRead + Unpin> AsyncRead for Trickle<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Trickle<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.refuse = !self.refuse;
        if self.refuse {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = buf.len().min(self.max);
        Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Writes `data` and shuts down while reading everything the other side sends.
async fn exchange(mut end: DuplexStream, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(&mut end);
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let recv = r.read_to_end(&mut got);
    let ((), n) = tokio::join!(send, recv);
    n.unwrap();
    got
}

#[tokio::test]
async fn large_random_data_both_ways_through_small_pipes() {
    let up_data = random(3 << 20, 1);
    let down_data = random((2 << 20) + 12345, 2);
    let (client, mut a) = duplex(1000);
    let (mut b, server) = duplex(777);
    let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
    let (at_server, at_client) = tokio::join!(
        exchange(server, down_data.clone()),
        exchange(client, up_data.clone())
    );
    let (to, from) = copy.await.unwrap().unwrap();
    assert_eq!(at_server, up_data);
    assert_eq!(at_client, down_data);
    assert_eq!(to, up_data.len() as u64);
    assert_eq!(from, down_data.len() as u64);
}

#[tokio::test]
async fn partial_and_refused_writes_keep_order_and_counts() {
    let up_data = random(1 << 20, 3);
    let down_data = random(700_001, 4);
    let (client, a) = duplex(64 * 1024);
    let (b, server) = duplex(64 * 1024);
    let mut a = Trickle {
        inner: a,
        max: 4093,
        refuse: false,
    };
    let mut b = Trickle {
        inner: b,
        max: 1500,
        refuse: false,
    };
    let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
    let (at_server, at_client) = tokio::join!(
        exchange(server, down_data.clone()),
        exchange(client, up_data.clone())
    );
    assert_eq!(at_server, up_data);
    assert_eq!(at_client, down_data);
    assert_eq!(
        copy.await.unwrap().unwrap(),
        (up_data.len() as u64, down_data.len() as u64)
    );
}

#[tokio::test]
async fn client_half_close_leaves_the_other_direction_open() {
    let (mut client, mut a) = duplex(64);
    let (mut b, mut server) = duplex(64);
    let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"request");
    // The server still answers after the client's EOF, in several writes.
    let answer = async {
        for _ in 0..100 {
            server.write_all(b"response ").await.unwrap();
        }
        server.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let ((), n) = tokio::join!(answer, client.read_to_end(&mut got));
    n.unwrap();
    assert_eq!(got, b"response ".repeat(100));
    assert_eq!(copy.await.unwrap().unwrap(), (7, 900));
}

#[tokio::test]
async fn server_half_close_leaves_the_other_direction_open() {
    let (mut client, mut a) = duplex(64);
    let (mut b, mut server) = duplex(64);
    let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
    server.write_all(b"banner").await.unwrap();
    server.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"banner");
    let send = async {
        client.write_all(&[9; 5000]).await.unwrap();
        client.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let ((), n) = tokio::join!(send, server.read_to_end(&mut got));
    n.unwrap();
    assert_eq!(got, vec![9; 5000]);
    assert_eq!(copy.await.unwrap().unwrap(), (5000, 6));
}

/// A stream whose reads fail after `ok` reads of one byte; writes are swallowed.
struct Failing {
    ok: usize,
}

impl AsyncRead for Failing {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.ok == 0 {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")));
        }
        self.ok -= 1;
        buf.put_slice(b"x");
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Failing {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_read_error_on_one_side_ends_both_directions() {
    // The other side stays open and silent: the copy still ends, with the error.
    let (_server, mut b) = duplex(64);
    let mut a = Failing { ok: 3 };
    let e = tokio::time::timeout(Duration::from_secs(5), copy_bidirectional(&mut a, &mut b))
        .await
        .expect("the copy ended")
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn a_write_error_ends_the_copy() {
    let (mut client, mut a) = duplex(64);
    let (mut b, server) = duplex(64);
    drop(server);
    let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
    client.write_all(b"to nowhere").await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), copy)
        .await
        .expect("the copy ended")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
}

#[tokio::test]
async fn an_idle_copy_holds_no_buffer() {
    let (mut client, a) = duplex(64 * 1024);
    let (b, mut server) = duplex(64 * 1024);
    // A writer refusing often leaves remainders to keep.
    let mut a = Trickle {
        inner: a,
        max: 10,
        refuse: false,
    };
    let mut b = Trickle {
        inner: b,
        max: 10,
        refuse: false,
    };
    let mut copy = Box::pin(copy_bidirectional(&mut a, &mut b));
    client.write_all(&[1; 50_000]).await.unwrap();
    let mut got = vec![0; 50_000];
    let read = server.read_exact(&mut got);
    tokio::select! {
        r = read => { r.unwrap(); }
        r = &mut copy => panic!("the copy ended: {r:?}"),
    }
    // Poll once more so the copy sees the reader go idle.
    assert!(futures::poll!(&mut copy).is_pending());
    assert_eq!(copy.a_to_b.pending.capacity(), 0);
    assert_eq!(copy.b_to_a.pending.capacity(), 0);
    assert_eq!(copy.a_to_b.copied, 50_000);
    assert!(!copy.a_to_b.unflushed);
}

/// Always ready with data; counts reads.
struct Firehose(Arc<AtomicU64>);

impl AsyncRead for Firehose {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        buf.put_slice(&[0; 100]);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Firehose {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_busy_copy_yields_to_other_tasks() {
    // Neither side ever blocks, nor uses tokio's budget: only the copy's own yields let the
    // rest of this one-thread runtime run.
    let reads = Arc::new(AtomicU64::new(0));
    let (mut a, mut b) = (Firehose(reads.clone()), Firehose(reads.clone()));
    let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    tokio::task::yield_now().await;
    assert!(reads.load(Ordering::Relaxed) > 0);
    copy.abort();
}

#[test]
fn the_scratch_buffer_is_not_shared_when_in_use() {
    with_scratch(|outer| {
        outer[0] = 1;
        with_scratch(|inner| {
            assert_eq!(inner.len(), SCRATCH);
            inner[0] = 2;
        });
        assert_eq!(outer[0], 1);
    });
}
