//! Connections to the control plane's dataplane server: gRPC over TLS, verified against
//! `--ca-cert-file`, presenting the dataplane's certificate once it has one.
//!
//! A new [`Channel`] is built for every connection attempt, so a renewed certificate is used
//! from the next connection on while streams on the old one carry on.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::identity::manager::Credentials;

/// A control plane address that cannot be used, or a failed connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address is not an https URL with a host.
    #[error("control plane address {address:?}: {message}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        message: String,
    },
    /// Connecting (TCP or TLS) failed.
    #[error("connecting to the control plane at {address}: {message}")]
    Connect {
        /// The address.
        address: String,
        /// Why, with every cause (tonic's own message is only "transport error").
        message: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long a TCP + TLS connect may take before the attempt counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the control plane is and how to verify it.
#[derive(Clone)]
pub struct CpEndpoint {
    address: String,
    domain: String,
    ca_pem: String,
}

impl std::fmt::Debug for CpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpEndpoint")
            .field("address", &self.address)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl CpEndpoint {
    /// `address` is `https://HOST:PORT`; `ca_pem` the CA that signed the CP's certificate.
    pub fn new(address: &str, ca_pem: String) -> Result<CpEndpoint> {
        let bad = |message: &str| Error::Address {
            address: address.to_owned(),
            message: message.to_owned(),
        };
        let uri: http::Uri = address.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must be https://"));
        }
        let host = uri.host().ok_or_else(|| bad("has no host"))?;
        let domain = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(CpEndpoint {
            address: address.to_owned(),
            domain,
            ca_pem,
        })
    }

    /// The address, for logs.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Connects, presenting `client`'s certificate when given.
    pub async fn connect(&self, client: Option<&Credentials>) -> Result<Channel> {
        let connect = |e: tonic::transport::Error| {
            let mut message = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                message = format!("{message}: {c}");
                cause = c.source();
            }
            Error::Connect {
                address: self.address.clone(),
                message,
            }
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(self.domain.clone());
        if let Some(c) = client {
            tls = tls.identity(Identity::from_pem(&c.cert_chain_pem, &c.key_pem));
        }
        Endpoint::from_shared(self.address.clone())
            .map_err(connect)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(10))
            .tls_config(tls)
            .map_err(connect)?
            .connect()
            .await
            .map_err(connect)
    }
}
