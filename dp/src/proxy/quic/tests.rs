//! A real QUIC connection on loopback between two `TlsState`s.

use tokio::io::{AsyncReadExt, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;
use crate::proxy::tls::tests::creds;
use crate::test_util::{TestCa, now_unix};

/// The drain path: the server side splices a stream to a local service that answers 8 MiB and
/// closes, and the connection is closed as soon as the splice returns. The client must still
/// get every byte and a clean end of stream; the splice counts bytes to and from the service.
/// The server takes no QUIC datagrams.
#[tokio::test]
async fn a_connection_closed_after_its_last_stream_delivers_the_whole_answer() {
    const N: usize = 8 << 20;
    let ca = TestCa::new("ca");
    let later = now_unix() + 3600;
    let srv = TlsState::new(1, "m", &creds(&ca, &["spiffe://m/b"], later), &ca.cert_pem).unwrap();
    let cli = TlsState::new(1, "m", &creds(&ca, &["spiffe://m/a"], later), &ca.cert_pem).unwrap();

    // The local service: reads the one-byte request, answers N bytes, closes.
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_addr = service.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = service.accept().await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        s.write_all(&vec![7u8; N]).await.unwrap();
    });

    let (server, addr) = listen(&srv);
    let served = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (send, recv) = conn.accept_bi().await.unwrap();
        let up = TcpStream::connect(service_addr).await.unwrap();
        let counted = splice_stream(tokio::io::join(recv, send), up).await;
        conn.close(VarInt::from_u32(code::DRAINING), b"draining");
        server.wait_idle().await;
        counted
    });

    let (_client, conn) = connect(&cli, addr).await;
    assert_eq!(
        conn.max_datagram_size(),
        None,
        "the server takes no datagrams"
    );
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[1]).await.unwrap();
    send.finish().unwrap();
    let mut got = Vec::new();
    let end = AsyncReadExt::read_to_end(&mut recv, &mut got).await;
    assert!(
        end.is_ok(),
        "stream ended with {end:?} after {} of {N} bytes",
        got.len()
    );
    assert_eq!(got.len(), N);
    assert!(got.iter().all(|&b| b == 7));
    let (to_service, from_service) = served.await.unwrap().unwrap();
    assert_eq!((to_service, from_service), (1, N as u64));
}

/// A server endpoint on loopback with `srv`'s QUIC configuration, and its address.
fn listen(srv: &TlsState) -> (quinn::Endpoint, SocketAddr) {
    let server = endpoint(
        "127.0.0.1:0".parse().unwrap(),
        Some(srv.quic_server.clone()),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    (server, addr)
}

/// A client endpoint on loopback connected with `cli`'s configuration to the server at `addr`
/// (serving `b`); keep the endpoint while the connection is used.
async fn connect(cli: &TlsState, addr: SocketAddr) -> (quinn::Endpoint, Connection) {
    let client = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let conn = client
        .connect_with(cli.quic_client_for("b").unwrap(), addr, "b")
        .unwrap()
        .await
        .unwrap();
    (client, conn)
}

/// Two `TlsState`s of one mesh: the server holds `spiffe://m/b`, the client `spiffe://m/a`.
fn pair() -> (TlsState, TlsState) {
    let ca = TestCa::new("ca");
    let later = now_unix() + 3600;
    let srv = TlsState::new(1, "m", &creds(&ca, &["spiffe://m/b"], later), &ca.cert_pem).unwrap();
    let cli = TlsState::new(1, "m", &creds(&ca, &["spiffe://m/a"], later), &ca.cert_pem).unwrap();
    (srv, cli)
}

/// The client side of the drain path: a stream that finishes its upload and is dropped at
/// once, while its connection is no longer pooled (evicted, or of an older TLS generation), is
/// the connection's last handle. The server must still read the whole upload and a clean end:
/// quinn closes a connection when its last handle goes and forgets unacknowledged data.
#[tokio::test]
async fn a_finished_stream_on_an_unpooled_connection_delivers_its_whole_upload() {
    const N: usize = 8 << 20;
    let (srv, cli) = pair();
    let (server, addr) = listen(&srv);
    let served = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        read_header(&mut recv).await.unwrap();
        send.write_all(&[ACCEPTED]).await.unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => got += n,
                Ok(None) => return Ok(got),
                Err(e) => return Err(format!("{e} after {got} of {N} bytes")),
            }
        }
    });

    let client = QuicClient::default();
    let mut stream = client
        .open(addr, "b", &cli, Duration::from_secs(2))
        .await
        .unwrap();
    stream.write_all(&vec![7u8; N]).await.unwrap();
    stream.shutdown().await.unwrap();
    // The pool lets go of the connection (as an eviction does); the stream was its last handle.
    drop(client);
    drop(stream);
    let got = tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the server reads to the end")
        .unwrap();
    assert_eq!(got, Ok(N));
}

/// A server whose local service is slow to accept still acknowledges the stream: the client
/// waits for its answer (here 1.5 s, past the silence deadline) rather than read it as a dead
/// peer or blocked UDP. One that never answers is given up on once the server's own connect
/// timeout is past too, not waited for forever.
#[tokio::test]
async fn a_slow_service_is_waited_for_and_a_stuck_one_given_up_on() {
    let (srv, cli) = pair();
    let (server, addr) = listen(&srv);
    tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        // First stream: accepted after 1.5 s, then echoes. Second: never answered.
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        read_header(&mut recv).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        send.write_all(&[ACCEPTED]).await.unwrap();
        let mut b = [0u8; 4];
        recv.read_exact(&mut b).await.unwrap();
        send.write_all(&b).await.unwrap();
        let (_send, _recv) = conn.accept_bi().await.unwrap();
        std::future::pending::<()>().await;
    });

    let client = QuicClient::default();
    let timeout = Duration::from_secs(2);
    let start = std::time::Instant::now();
    let mut slow = client.open(addr, "b", &cli, timeout).await.unwrap();
    slow.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    let r = slow.read_exact(&mut b).await;
    assert!(r.is_ok(), "slow service: {r:?} after {:?}", start.elapsed());
    assert_eq!(&b, b"ping");
    assert!(start.elapsed() >= Duration::from_millis(1400));

    let start = std::time::Instant::now();
    let mut stuck = client.open(addr, "b", &cli, timeout).await.unwrap();
    stuck.write_all(b"ping").await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), stuck.read_exact(&mut b))
        .await
        .expect("given up on")
        .unwrap_err();
    let took = start.elapsed();
    let u = crate::proxy::transport::unanswered(&e).expect("unanswered");
    assert!(
        matches!(&u.why, Upstream::Connect(e) if e.kind() == io::ErrorKind::TimedOut),
        "{e}"
    );
    assert!(
        took >= ANSWER_TIMEOUT + super::super::CONNECT_TIMEOUT,
        "gave up after {took:?}"
    );
}

/// Only a handshake refused over TLS (a crypto error: a TLS alert, from either end) counts as
/// a TLS failure on the server; a client that gave up or timed out does not.
#[tokio::test]
async fn only_crypto_errors_are_tls_refusals() {
    use quinn::{ApplicationClose, ConnectionClose, ConnectionError, TransportErrorCode};
    let closed = |error_code| {
        ConnectionError::ConnectionClosed(ConnectionClose {
            error_code,
            frame_type: None,
            reason: bytes::Bytes::new(),
        })
    };
    assert!(tls_refusal(&closed(TransportErrorCode::crypto(42))));
    assert!(!tls_refusal(&closed(TransportErrorCode::APPLICATION_ERROR)));
    assert!(!tls_refusal(&ConnectionError::ApplicationClosed(
        ApplicationClose {
            error_code: VarInt::from_u32(0),
            reason: bytes::Bytes::new(),
        }
    )));
    assert!(!tls_refusal(&ConnectionError::TimedOut));
    assert!(!tls_refusal(&ConnectionError::LocallyClosed));

    // For real: a client of another mesh is refused by the server's certificate check. (A
    // client giving up on a handshake is the e2e test
    // `j_auto_falls_back_for_concurrent_first_connections_when_only_answers_are_dropped`.)
    let (srv, _) = pair();
    let other = TestCa::new("other");
    let foreign = creds(&other, &["spiffe://m/a"], now_unix() + 3600);
    let foreign = TlsState::new(1, "m", &foreign, &other.cert_pem).unwrap();
    let (server, addr) = listen(&srv);
    let client = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let connecting = client
        .connect_with(foreign.quic_client_for("b").unwrap(), addr, "b")
        .unwrap();
    let (accepted, _) = tokio::join!(async { server.accept().await.unwrap().await }, connecting);
    let e = accepted.expect_err("a foreign client is refused");
    assert!(tls_refusal(&e), "{e:?}");
}

/// Callers queued on a handshake that fails late for another reason than silence (here the
/// peer refuses the connection after 400 ms, when a queued caller has less than half its
/// 700 ms left) get that failure, not a timeout of their own — `auto` takes a timeout for
/// blocked UDP and moves the peer to pooled TLS for 30 s. They share the one handshake: the
/// peer sees one connection attempt (one original destination connection id; a resent
/// Initial that arrives after the refusal comes in again under the same id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_queued_on_a_failed_handshake_get_its_failure() {
    let (srv, cli) = pair();
    let (server, addr) = listen(&srv);
    let attempts = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let seen = attempts.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            seen.lock().unwrap().insert(incoming.orig_dst_cid());
            tokio::time::sleep(Duration::from_millis(400)).await;
            incoming.refuse();
        }
    });
    let client = Arc::new(QuicClient::default());
    let cli = Arc::new(cli);
    let tasks: Vec<_> = (0..3u32)
        .map(|i| {
            let (client, cli) = (client.clone(), cli.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20) * i).await;
                client
                    .connect_only(addr, "b", &cli, Duration::from_millis(700))
                    .await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert!(
            matches!(r, Err(QuicError::Upstream(Upstream::Tls(_)))),
            "caller {i}: {r:?}"
        );
    }
    assert_eq!(attempts.lock().unwrap().len(), 1, "connection attempts");
    // The failure is not kept for later callers: the next one tries again.
    let r = client
        .connect_only(addr, "b", &cli, Duration::from_millis(700))
        .await;
    assert!(r.is_err());
    assert_eq!(attempts.lock().unwrap().len(), 2, "connection attempts");
}

/// A bulk upload goes out in GSO sends of more than 10 packets (the vendored quinn fills each
/// send up to 64 KiB; upstream stops at 10 packets, so its average can never exceed 10).
/// Linux: elsewhere quinn-udp may have no segmentation offload.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn bulk_data_goes_out_in_big_gso_batches() {
    const N: usize = 16 << 20;
    let (srv, cli) = pair();
    let (server, addr) = listen(&srv);
    let served = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (_send, mut recv) = conn.accept_bi().await.unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        while let Some(n) = recv.read(&mut buf).await.unwrap() {
            got += n;
        }
        got
    });
    let (_client, conn) = connect(&cli, addr).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let chunk = vec![7u8; 256 << 10];
    for _ in 0..N / chunk.len() {
        send.write_all(&chunk).await.unwrap();
    }
    send.finish().unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("the server reads to the end")
        .unwrap();
    assert_eq!(got, N);
    let tx = conn.stats().udp_tx;
    let per_send = tx.datagrams as f64 / tx.ios.max(1) as f64;
    assert!(
        per_send > 10.0,
        "{} packets in {} sends: {per_send:.1} per send",
        tx.datagrams,
        tx.ios
    );
}

/// `quic_congestion` reaches both ends: the connection the client opens (`quic_client_for`)
/// and the one the server accepts (`quic_server`) run the configured controller.
#[tokio::test]
async fn both_ends_run_the_configured_congestion_controller() {
    for (c, want_bbr) in [(Congestion::Cubic, false), (Congestion::Bbr, true)] {
        let (srv, cli) = pair();
        let (srv, cli) = (srv.with_quic_congestion(c), cli.with_quic_congestion(c));
        let (server, addr) = listen(&srv);
        let accepted = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            (server, conn)
        });
        let (_client, conn) = connect(&cli, addr).await;
        let (_server, accepted) = accepted.await.unwrap();
        for (side, conn) in [("client", &conn), ("server", &accepted)] {
            let any = conn.congestion_state().into_any();
            assert_eq!(
                any.is::<quinn::congestion::Bbr>(),
                want_bbr,
                "{side} of a {c:?} pair"
            );
            assert_eq!(any.is::<quinn::congestion::Cubic>(), !want_bbr, "{side}");
        }
    }
}
