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
