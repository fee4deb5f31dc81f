//! The dataplane's side of the ACK/NACK protocol as a plain struct: which version is applied,
//! and what to answer to each message from the control plane. No I/O, so it is tested
//! synchronously.

use std::sync::Arc;

use weft_api::v1;
use weft_api::v1::discovery_request::{Ack, Kind as Req, Nack};
use weft_api::v1::discovery_response::{Kind as Resp, close::Code};

use crate::model::{Applied, DataplaneConfig};

#[cfg(test)]
mod tests;

/// Why the control plane closed the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// No reason given: reconnect with backoff.
    Unspecified,
    /// The CP is shutting down: reconnect with backoff.
    Draining,
    /// Our token or certificate was revoked: wait before trying again.
    Revoked,
    /// Our Dataplane was deleted: wait before trying again.
    Deleted,
    /// Another stream replaced this one.
    Replaced,
}

impl CloseCode {
    /// Whether the dataplane should wait the longest backoff before reconnecting.
    pub fn is_final(self) -> bool {
        matches!(self, CloseCode::Revoked | CloseCode::Deleted)
    }
}

impl From<i32> for CloseCode {
    fn from(raw: i32) -> CloseCode {
        match Code::try_from(raw) {
            Ok(Code::Draining) => CloseCode::Draining,
            Ok(Code::Revoked) => CloseCode::Revoked,
            Ok(Code::Deleted) => CloseCode::Deleted,
            Ok(Code::Replaced) => CloseCode::Replaced,
            Ok(Code::Unspecified) | Err(_) => CloseCode::Unspecified,
        }
    }
}

/// What to do after one message from the control plane.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A new version was applied: send `reply` (an ACK) and publish `applied`.
    Applied {
        /// The ACK.
        reply: v1::DiscoveryRequest,
        /// The new config.
        applied: Arc<Applied>,
    },
    /// The version was rejected and the previous config kept: send `reply` (a NACK).
    Rejected {
        /// The NACK.
        reply: v1::DiscoveryRequest,
        /// Why, as sent in the NACK.
        reason: String,
    },
    /// The control plane closed the stream.
    Closed {
        /// Its reason, for logs.
        reason: String,
        /// Its code.
        code: CloseCode,
    },
}

/// The applied version and the identity configs must match.
#[derive(Debug, Clone)]
pub struct AckState {
    mesh: String,
    dataplane_name: String,
    applied: Option<Arc<Applied>>,
}

fn ack(version: String) -> v1::DiscoveryRequest {
    v1::DiscoveryRequest {
        kind: Some(Req::Ack(Ack { version })),
    }
}

fn nack(version: String, error: String) -> v1::DiscoveryRequest {
    v1::DiscoveryRequest {
        kind: Some(Req::Nack(Nack { version, error })),
    }
}

impl AckState {
    /// The state of dataplane `mesh`/`dataplane_name`, starting from `persisted` (the config
    /// saved by an earlier run) when it belongs to this dataplane.
    pub fn new(mesh: &str, dataplane_name: &str, persisted: Option<Applied>) -> AckState {
        let applied = persisted
            .filter(|a| a.config.mesh == mesh && a.config.dataplane_name == dataplane_name)
            .map(Arc::new);
        AckState {
            mesh: mesh.to_owned(),
            dataplane_name: dataplane_name.to_owned(),
            applied,
        }
    }

    /// The applied config, if any.
    pub fn current(&self) -> Option<&Arc<Applied>> {
        self.applied.as_ref()
    }

    /// Handles one message and says what to answer.
    pub fn handle(&mut self, response: v1::DiscoveryResponse) -> Outcome {
        let version = response.version;
        let result = match response.kind {
            Some(Resp::Close(c)) => {
                return Outcome::Closed {
                    reason: c.reason,
                    code: CloseCode::from(c.code),
                };
            }
            Some(Resp::Config(config)) => self.complete(config),
            Some(Resp::Delta(delta)) => self.delta(delta),
            None => Err("the message carries neither a config nor a delta".to_owned()),
        };
        match result {
            Ok(config) => {
                let applied = Arc::new(Applied {
                    version: version.clone(),
                    config,
                });
                self.applied = Some(applied.clone());
                Outcome::Applied {
                    reply: ack(version),
                    applied,
                }
            }
            Err(reason) => Outcome::Rejected {
                reply: nack(version, reason.clone()),
                reason,
            },
        }
    }

    fn complete(&self, config: v1::DataplaneConfig) -> Result<DataplaneConfig, String> {
        if config.mesh != self.mesh || config.dataplane_name != self.dataplane_name {
            return Err(format!(
                "config is for dataplane {}/{}, this is {}/{}",
                config.mesh, config.dataplane_name, self.mesh, self.dataplane_name
            ));
        }
        DataplaneConfig::try_from(config).map_err(|e| e.to_string())
    }

    fn delta(&self, delta: v1::ConfigDelta) -> Result<DataplaneConfig, String> {
        let Some(current) = &self.applied else {
            return Err(format!(
                "delta base {} does not match current (none applied)",
                delta.base_version
            ));
        };
        if delta.base_version != current.version {
            return Err(format!(
                "delta base {} does not match current {}",
                delta.base_version, current.version
            ));
        }
        current.config.apply_delta(delta).map_err(|e| e.to_string())
    }
}
