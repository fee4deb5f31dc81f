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

    let server = endpoint(
        "127.0.0.1:0".parse().unwrap(),
        Some(srv.quic_server.clone()),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let served = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (send, recv) = conn.accept_bi().await.unwrap();
        let up = TcpStream::connect(service_addr).await.unwrap();
        let counted = splice_stream(tokio::io::join(recv, send), up).await;
        conn.close(VarInt::from_u32(code::DRAINING), b"draining");
        server.wait_idle().await;
        counted
    });

    let client = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let conn = client
        .connect_with(cli.quic_client_for("b").unwrap(), addr, "b")
        .unwrap()
        .await
        .unwrap();
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
