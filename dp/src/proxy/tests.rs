use super::*;

/// Accepted sockets inherit TCP_NODELAY from the listener (the proxy no longer sets it per
/// connection), on IPv4 and IPv6.
#[tokio::test]
async fn accepted_sockets_have_nodelay() {
    for addr in ["127.0.0.1:0", "[::1]:0"] {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = match listen(addr) {
            Ok(l) => l,
            // A host without IPv6 on loopback.
            Err(e) if addr.is_ipv6() => {
                eprintln!("skipping {addr}: {e}");
                continue;
            }
            Err(e) => panic!("listen {addr}: {e}"),
        };
        let at = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(at), listener.accept());
        let _client = client.unwrap();
        let (accepted, _) = accepted.unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "{addr}: accepted socket without TCP_NODELAY"
        );
    }
}

/// A proxied connection's task holds only what lives as long as the connection: the set-up
/// (peek, TLS handshake, HTTP/2 server, dialing) is boxed and freed once done, and no future
/// is stored twice. It was 16 KiB per inbound connection and 5.9 KiB per outbound one before.
#[tokio::test]
async fn connection_futures_stay_small() {
    const MOST: usize = 1024;
    let metrics = crate::metrics::Metrics::new();
    let (_stop_tx, stop) = watch::channel(false);
    let (_tls_tx, tls) = watch::channel(None);
    let inbound = InboundState {
        inbound: Inbound {
            port: 1,
            service_address: IpAddr::from([127, 0, 0, 1]),
            service_port: 2,
            tags: BTreeMap::new(),
            rules: Vec::new(),
        },
        mode: MtlsMode::Strict,
        transport: Transport::Tls,
    };
    let (_settings_tx, settings) = watch::channel(Arc::new(inbound));
    let inbound = InboundListener {
        bind: "127.0.0.1:1".parse().unwrap(),
        stop: stop.clone(),
        settings,
        tls: tls.clone(),
        metrics: metrics.proxy.listener("inbound", 1, "svc"),
        tracker: Arc::new(Tracker::default()),
    };
    let outbound = OutboundListener {
        bind: "127.0.0.1:3".parse().unwrap(),
        settings: watch::channel(Arc::new(OutboundState {
            service: "svc".into(),
            lb: LoadBalancer::RoundRobin,
            mode: MtlsMode::Strict,
            transport: Transport::Tls,
            endpoints: Vec::new(),
            slots: Vec::new(),
        }))
        .1,
        tls,
        metrics: metrics.proxy.listener("outbound", 3, "svc"),
        tracker: Arc::new(Tracker::default()),
        dialer: Arc::new(Dialer::default()),
        balancer: Arc::new(Balancer::default()),
    };

    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(at), l.accept());
    let (a, (b, peer)) = (a.unwrap(), b.unwrap());
    let fut = inbound.serve(a, peer);
    let size = size_of_val(&fut);
    assert!(
        size <= MOST,
        "an inbound connection's future is {size} bytes"
    );
    drop(fut);
    let fut = outbound.serve(b);
    let size = size_of_val(&fut);
    assert!(
        size <= MOST,
        "an outbound connection's future is {size} bytes"
    );
}

/// Only the codes a QUIC server resets with before it accepts a stream are refusals (and so
/// replayable elsewhere); a reset after an acceptance (`RESET`) or an unknown code is not.
#[test]
fn only_codes_sent_before_acceptance_are_refusals() {
    use quic::{Refusal, code, refused};
    use quinn::VarInt;
    let r = |c: u32| refused(VarInt::from_u32(c));
    assert_eq!(r(code::DENIED), Some(Refusal::Denied));
    assert_eq!(r(code::UNAVAILABLE), Some(Refusal::Unavailable));
    assert_eq!(r(code::DRAINING), Some(Refusal::Draining));
    assert_eq!(r(code::BAD_HEADER), Some(Refusal::Other(code::BAD_HEADER)));
    assert_eq!(r(code::RESET), None);
    assert_eq!(r(77), None);
}

/// QUIC sockets get the buffers they ask for, up to what the kernel allows.
#[test]
fn quic_sockets_ask_for_big_buffers() {
    let max = |name: &str| -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .expect("sysctl")
            .trim()
            .parse()
            .expect("number")
    };
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let state = quinn::udp::UdpSocketState::new((&socket).into()).expect("state");
    quic::socket_buffers(&socket);
    // Linux reports twice the size set (its bookkeeping), the size capped at the sysctl.
    let recv = state.recv_buffer_size((&socket).into()).expect("size") / 2;
    let send = state.send_buffer_size((&socket).into()).expect("size") / 2;
    assert_eq!(
        recv,
        quic::UDP_BUFFER.min(max("rmem_max")),
        "receive buffer"
    );
    assert_eq!(send, quic::UDP_BUFFER.min(max("wmem_max")), "send buffer");
}

/// QUIC's packet ceiling follows the largest interface: quinn's 1452 on Ethernet (or smaller
/// links), the interface's MTU less IPv6 and UDP headers above it, capped at what a GSO batch
/// allows; the cap when the interfaces cannot be read.
#[test]
fn quic_packet_ceiling_follows_the_largest_interface() {
    use quic::{MAX_UDP_PAYLOAD, ceiling_for};
    assert_eq!(ceiling_for(Some(1500)), 1452);
    assert_eq!(ceiling_for(Some(1280)), 1452);
    assert_eq!(ceiling_for(Some(4000)), 3952);
    assert_eq!(ceiling_for(Some(9000)), MAX_UDP_PAYLOAD);
    assert_eq!(ceiling_for(Some(u32::MAX)), MAX_UDP_PAYLOAD);
    assert_eq!(ceiling_for(None), MAX_UDP_PAYLOAD);
}

/// Credentials of `spiffe://m/web`, and a peer whose UDP port never answers (a bound socket
/// nobody reads; keep it) and whose TCP port refuses at once: the socket and its address.
fn web_and_a_silent_peer() -> (Arc<TlsState>, std::net::UdpSocket, String) {
    use crate::test_util::{TestCa, now_unix};
    let ca = TestCa::new("ca");
    let creds = tls::tests::creds(&ca, &["spiffe://m/web"], now_unix() + 3600);
    let tls = Arc::new(TlsState::new(1, "m", &creds, &ca.cert_pem).unwrap());
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    (tls, silent, addr)
}

/// `auto` to a peer whose UDP port never answers: connections that arrive while the first
/// QUIC handshake is still waiting fall back within a second too, not one handshake timeout
/// after another; and they share one handshake (callers woken when it was given up do not
/// each start another past their deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_auto_connections_fall_back_within_a_second() {
    let (tls, silent, addr) = web_and_a_silent_peer();
    let dialer = Arc::new(Dialer::default());
    // Started 5 ms apart, as requests arrive.
    let tasks: Vec<_> = (0..5u32)
        .map(|i| {
            let (dialer, addr, tls) = (dialer.clone(), addr.clone(), tls.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(5) * i).await;
                let start = Instant::now();
                let r = dialer
                    .connect(
                        Transport::Auto,
                        &addr,
                        "backend",
                        Some(&tls),
                        Duration::from_secs(2),
                        Duration::from_secs(10),
                    )
                    .await;
                (start.elapsed(), r.is_ok())
            })
        })
        .collect();
    for t in tasks {
        let (took, ok) = t.await.unwrap();
        assert!(!ok, "nothing listens on TCP either");
        assert!(took < Duration::from_secs(1), "fell back after {took:?}");
    }
    // The handshakes are the distinct destination connection ids of the Initial packets
    // (long header: flags, version, id length, id) the silent peer received.
    silent.set_nonblocking(true).unwrap();
    let mut ids = std::collections::HashSet::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = silent.recv(&mut buf) {
        if n > 6 && buf[0] & 0x80 != 0 {
            let len = usize::from(buf[5]);
            ids.insert(buf[6..(6 + len).min(n)].to_vec());
        }
    }
    assert_eq!(ids.len(), 1, "handshakes started");
}

/// `quic` and `auto` keep their own record of silent peers: after a switch from `quic`, a peer
/// `quic` has just left alone is still tried over QUIC by `auto` (which then falls back, and
/// says so) rather than sent to pooled TLS unannounced — nor does `auto`'s 30 s fallback make
/// `quic` refuse a peer without trying.
#[tokio::test]
async fn quic_and_auto_keep_their_own_silent_peers() {
    let (tls, _silent, addr) = web_and_a_silent_peer();
    // Tries `t` on a dialer; how long it took (nothing answers: it fails).
    let connect = |dialer: &Arc<Dialer>, t: Transport| {
        let (dialer, addr, tls) = (dialer.clone(), addr.clone(), tls.clone());
        async move {
            let start = Instant::now();
            let r = dialer
                .connect(
                    t,
                    &addr,
                    "backend",
                    Some(&tls),
                    Duration::from_millis(300),
                    Duration::from_secs(10),
                )
                .await;
            assert!(r.is_err(), "nothing answers");
            start.elapsed()
        }
    };
    let tried = Duration::from_millis(250);
    let dialer = Arc::new(Dialer::default());
    assert!(
        connect(&dialer, Transport::Quic).await >= tried,
        "quic tries first"
    );
    assert!(
        connect(&dialer, Transport::Quic).await < tried,
        "then leaves the peer alone"
    );
    let took = connect(&dialer, Transport::Auto).await;
    assert!(
        took >= transport::AUTO_QUIC_TIMEOUT,
        "auto tried QUIC: {took:?}"
    );
    assert!(
        connect(&dialer, Transport::Auto).await < tried,
        "then uses pooled TLS"
    );
    // The other way round: `auto` gave up on the peer (for 30 s); `quic` still tries it.
    let dialer = Arc::new(Dialer::default());
    assert!(connect(&dialer, Transport::Auto).await >= transport::AUTO_QUIC_TIMEOUT);
    let took = connect(&dialer, Transport::Quic).await;
    assert!(
        took >= tried,
        "quic tried the peer auto gave up on: {took:?}"
    );
}
