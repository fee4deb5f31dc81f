//! HTTP/2 connections over in-memory pipes, on paused time.

use super::*;

/// A client connection (with its sender: the connection ends when the last one is gone) and
/// the server end of its pipe, through the HTTP/2 handshakes.
async fn pair() -> (
    (
        Sender,
        h2::client::Connection<tokio::io::DuplexStream, Bytes>,
    ),
    h2::server::Connection<tokio::io::DuplexStream, Bytes>,
) {
    let (a, b) = tokio::io::duplex(64 << 10);
    let (client, server) = tokio::join!(h2::client::handshake(a), h2::server::handshake(b));
    (client.unwrap(), server.unwrap())
}

/// A pooled connection whose peer stops answering (its HTTP/2 side no longer runs, the
/// socket stays open) is closed by the keep-alive within 15 s; one whose peer answers pings
/// stays up, idle.
#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    let ((_sender, client), _frozen) = pair().await;
    let start = tokio::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(60),
        drive(client, Arc::default(), "frozen".into()),
    )
    .await
    .expect("closed by the keep-alive");
    let took = start.elapsed();
    assert!(
        took >= KEEP_ALIVE + KEEP_ALIVE_TIMEOUT && took < KEEP_ALIVE * 2 + KEEP_ALIVE_TIMEOUT,
        "closed after {took:?}"
    );

    let ((_sender, client), mut live) = pair().await;
    tokio::spawn(async move { while live.accept().await.is_some() {} });
    let r = tokio::time::timeout(
        Duration::from_secs(120),
        drive(client, Arc::default(), "live".into()),
    )
    .await;
    assert!(r.is_err(), "a peer answering pings stays connected");
}

/// A peer that keeps sending but whose answer to the ping does not come (it waits behind the
/// peer's data) is kept; once it has sent nothing for the timeout either, it is dropped.
#[tokio::test(start_paused = true)]
async fn a_busy_peer_is_kept_though_its_answer_is_late() {
    struct Unanswered;
    impl Pinger for Unanswered {
        fn round_trip(&mut self) -> impl Future<Output = bool> + Send + '_ {
            std::future::pending()
        }
    }
    let reads = Arc::new(AtomicU64::new(0));
    let busy_for = Duration::from_secs(40);
    let sender = reads.clone();
    tokio::spawn(async move {
        let end = tokio::time::Instant::now() + busy_for;
        while tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(1)).await;
            sender.fetch_add(1, Ordering::Relaxed);
        }
    });
    let start = tokio::time::Instant::now();
    keep_alive(Some(Unanswered), &reads).await;
    let took = start.elapsed();
    assert!(
        took >= busy_for && took <= busy_for + KEEP_ALIVE_TIMEOUT * 2,
        "dropped after {took:?}"
    );
}

/// An inbound's pooled connection whose client never sends the HTTP/2 preface (after a
/// completed TLS handshake) is given up on after the handshake timeout, not held for good.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_sends_its_preface_is_given_up_on() {
    use std::collections::BTreeMap;

    use crate::model::{Inbound, MtlsMode, Transport};
    let (_silent, io) = tokio::io::duplex(64 << 10);
    let state = InboundState {
        inbound: Inbound {
            port: 1,
            service_address: std::net::IpAddr::from([127, 0, 0, 1]),
            service_port: 2,
            tags: BTreeMap::new(),
            rules: Vec::new(),
        },
        mode: MtlsMode::Strict,
        transport: Transport::Pooled,
    };
    let metrics = crate::metrics::Metrics::new();
    let (_stop_tx, stop) = watch::channel(false);
    let start = tokio::time::Instant::now();
    let served = tokio::time::timeout(
        Duration::from_secs(60),
        serve(
            io,
            "127.0.0.1:9".parse().unwrap(),
            Arc::default(),
            watch::channel(Arc::new(state)).1,
            metrics.proxy.listener("inbound", 1, "svc"),
            stop,
        ),
    )
    .await
    .expect("serve returns");
    let e = served.expect_err("no preface");
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert_eq!(start.elapsed(), super::super::HANDSHAKE_TIMEOUT);
}
