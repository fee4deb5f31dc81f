//! How one dataplane reaches another: the seam where QUIC slots in beside TLS over TCP.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A connected byte stream to another dataplane.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A boxed [`Stream`].
pub type BoxStream = Pin<Box<dyn Stream>>;

/// Why an upstream connection failed.
#[derive(Debug, thiserror::Error)]
pub enum Upstream {
    /// TCP connect failed or timed out.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// The TLS handshake failed (the server's identity, chain or validity) or timed out.
    #[error("TLS: {0}")]
    Tls(io::Error),
}

/// Opens streams to other dataplanes.
pub trait Transport: Send + Sync + 'static {
    /// Connects to `address` (`host:port`) serving `service`; with `tls`, over mutual TLS
    /// that verifies the server holds `service`'s SPIFFE id.
    fn connect<'a>(
        &'a self,
        address: &'a str,
        service: &'a str,
        tls: Option<Arc<ClientConfig>>,
        connect_timeout: Duration,
        handshake_timeout: Duration,
    ) -> BoxFuture<'a, Result<BoxStream, Upstream>>;
}

/// TLS over TCP (or plain TCP when the mesh has mTLS off).
#[derive(Debug, Default)]
pub struct TcpTls;

impl Transport for TcpTls {
    fn connect<'a>(
        &'a self,
        address: &'a str,
        service: &'a str,
        tls: Option<Arc<ClientConfig>>,
        connect_timeout: Duration,
        handshake_timeout: Duration,
    ) -> BoxFuture<'a, Result<BoxStream, Upstream>> {
        Box::pin(async move {
            let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(address))
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
                })
                .map_err(Upstream::Connect)?;
            let _ = tcp.set_nodelay(true);
            let Some(config) = tls else {
                return Ok(Box::pin(tcp) as BoxStream);
            };
            // SNI carries the service (what a zone ingress routes on); the certificate check
            // is by SPIFFE id, not by this name.
            let name = ServerName::try_from(service.to_owned()).unwrap_or_else(|_| {
                ServerName::try_from("mesh.invalid").expect("a valid DNS name")
            });
            let connector = tokio_rustls::TlsConnector::from(config);
            let s = tokio::time::timeout(handshake_timeout, connector.connect(name, tcp))
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "handshake timed out",
                    ))
                })
                .map_err(Upstream::Tls)?;
            Ok(Box::pin(s) as BoxStream)
        })
    }
}
