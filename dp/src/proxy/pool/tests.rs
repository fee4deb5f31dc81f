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
    tokio::time::timeout(Duration::from_secs(60), drive(client, "frozen".into()))
        .await
        .expect("closed by the keep-alive");
    let took = start.elapsed();
    assert!(
        took >= KEEP_ALIVE + KEEP_ALIVE_TIMEOUT && took < KEEP_ALIVE * 2 + KEEP_ALIVE_TIMEOUT,
        "closed after {took:?}"
    );

    let ((_sender, client), mut live) = pair().await;
    tokio::spawn(async move { while live.accept().await.is_some() {} });
    let r = tokio::time::timeout(Duration::from_secs(120), drive(client, "live".into())).await;
    assert!(r.is_err(), "a peer answering pings stays connected");
}
