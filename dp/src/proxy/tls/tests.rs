//! Real TLS handshakes over in-memory pipes between two `TlsState`s.

use super::*;
use crate::test_util::{TestCa, now_unix};

pub(crate) fn creds(ca: &TestCa, ids: &[&str], not_after: i64) -> Credentials {
    let key = crate::identity::generate_key().unwrap();
    let ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    Credentials {
        cert_chain_pem: ca.leaf(&key, &ids, now_unix() - 60, not_after),
        key_pem: key,
        trust_bundle_pem: ca.cert_pem.clone(),
        not_before: now_unix() - 60,
        not_after,
        spiffe_ids: ids,
    }
}

/// Handshakes a client of `service` (from `client`) with `server`; returns the services the
/// server saw in the client's certificate, or the client's error.
async fn handshake(
    client: &TlsState,
    server: &TlsState,
    service: &str,
) -> Result<Vec<String>, String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server.clone());
    let mesh = server.mesh.clone();
    let srv = tokio::spawn(async move {
        let s = acceptor.accept(b).await.map_err(|e| e.to_string())?;
        let leaf = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first().cloned());
        Ok::<_, String>(leaf.map(|l| peer_services(&l, &mesh)).unwrap_or_default())
    });
    let connector = tokio_rustls::TlsConnector::from(client.client_for(service).unwrap());
    let name = ServerName::try_from(service.to_owned()).unwrap();
    let c = connector.connect(name, a).await.map_err(|e| e.to_string());
    let s = srv.await.unwrap();
    c?;
    s
}

#[tokio::test]
async fn outbound_checks_the_servers_spiffe_id_and_inbound_reads_the_clients() {
    let ca = TestCa::new("mesh CA");
    let later = now_unix() + 3600;
    let web = TlsState::new(
        1,
        "m",
        &creds(&ca, &["spiffe://m/web"], later),
        &ca.cert_pem,
    )
    .unwrap();
    let backend = TlsState::new(
        1,
        "m",
        &creds(&ca, &["spiffe://m/backend"], later),
        &ca.cert_pem,
    )
    .unwrap();
    assert_eq!(handshake(&web, &backend, "backend").await.unwrap(), ["web"]);
    let e = handshake(&web, &backend, "db").await.unwrap_err();
    assert!(
        e.contains("NotValidForName"),
        "a server without db's identity: {e}"
    );
}

#[tokio::test]
async fn foreign_and_expired_peers_fail_the_handshake() {
    let ca = TestCa::new("mesh CA");
    let other = TestCa::new("another CA");
    let later = now_unix() + 3600;
    let backend = TlsState::new(
        1,
        "m",
        &creds(&ca, &["spiffe://m/backend"], later),
        &ca.cert_pem,
    )
    .unwrap();
    let foreign = TlsState::new(
        1,
        "m",
        &creds(&other, &["spiffe://m/web"], later),
        &other.cert_pem,
    )
    .unwrap();
    assert!(handshake(&foreign, &backend, "backend").await.is_err());
    // A client whose own certificate expired: the server refuses it.
    let expired_client = TlsState::new(
        1,
        "m",
        &creds(&ca, &["spiffe://m/web"], now_unix() - 10),
        &ca.cert_pem,
    )
    .unwrap();
    assert!(
        handshake(&expired_client, &backend, "backend")
            .await
            .is_err()
    );
    // A server whose certificate expired: the client refuses it.
    let web = TlsState::new(
        1,
        "m",
        &creds(&ca, &["spiffe://m/web"], later),
        &ca.cert_pem,
    )
    .unwrap();
    let expired_server = TlsState::new(
        1,
        "m",
        &creds(&ca, &["spiffe://m/backend"], now_unix() - 10),
        &ca.cert_pem,
    )
    .unwrap();
    let e = handshake(&web, &expired_server, "backend")
        .await
        .unwrap_err();
    assert!(e.to_lowercase().contains("expired"), "{e}");
}

/// A client of `service` (from `client`) connected to `server` over an in-memory pipe: both
/// ends once their handshakes are done.
async fn connected(
    client: &TlsState,
    server: &TlsState,
    service: &str,
) -> (
    tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
    tokio_rustls::server::TlsStream<tokio::io::DuplexStream>,
) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server.clone());
    let srv = tokio::spawn(async move { acceptor.accept(b).await.unwrap() });
    let connector = tokio_rustls::TlsConnector::from(client.client_for(service).unwrap());
    let name = ServerName::try_from(service.to_owned()).unwrap();
    let c = connector.connect(name, a).await.unwrap();
    (c, srv.await.unwrap())
}

/// Connects like [`connected`] and says whether the client's handshake resumed a session
/// (the client waits for the server's first flight, which carries the tickets in TLS 1.3).
async fn resumed(client: &TlsState, server: &TlsState, service: &str) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut c, mut s) = connected(client, server, service).await;
    s.write_all(b"x").await.unwrap();
    s.flush().await.unwrap();
    let mut one = [0u8; 1];
    c.read_exact(&mut one).await.unwrap();
    let kind = c.get_ref().1.handshake_kind();
    c.shutdown().await.unwrap();
    kind == Some(rustls::HandshakeKind::Resumed)
}

#[tokio::test]
async fn sessions_resume_unless_resumption_is_off() {
    let ca = TestCa::new("mesh CA");
    let later = now_unix() + 3600;
    let state = |id: &str, on: bool| {
        TlsState::new(1, "m", &creds(&ca, &[id], later), &ca.cert_pem)
            .unwrap()
            .with_resumption(on)
    };
    let (web, backend) = (
        state("spiffe://m/web", true),
        state("spiffe://m/backend", true),
    );
    assert!(
        !resumed(&web, &backend, "backend").await,
        "the first handshake is full"
    );
    assert!(
        resumed(&web, &backend, "backend").await,
        "the second resumes"
    );
    let (web, backend) = (
        state("spiffe://m/web", false),
        state("spiffe://m/backend", false),
    );
    assert!(!resumed(&web, &backend, "backend").await);
    assert!(
        !resumed(&web, &backend, "backend").await,
        "resumption is off"
    );
}

#[tokio::test]
async fn dataplanes_agree_on_aes_128_gcm() {
    use tokio::io::AsyncWriteExt as _;
    let ca = TestCa::new("mesh CA");
    let later = now_unix() + 3600;
    let state = |id: &str| TlsState::new(1, "m", &creds(&ca, &[id], later), &ca.cert_pem).unwrap();
    let (web, backend) = (state("spiffe://m/web"), state("spiffe://m/backend"));
    let (mut c, s) = connected(&web, &backend, "backend").await;
    let suite = |c: &rustls::CommonState| c.negotiated_cipher_suite().map(|s| s.suite());
    let want = Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert_eq!(suite(c.get_ref().1), want, "client side");
    assert_eq!(suite(s.get_ref().1), want, "server side");
    // AES-256 and ChaCha20 stay on offer for peers that prefer them.
    let offered: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
    assert_eq!(
        offered.len(),
        rustls::crypto::ring::DEFAULT_CIPHER_SUITES.len()
    );
    assert!(offered.contains(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
    assert!(offered.contains(&rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256));
    c.shutdown().await.unwrap();
}
