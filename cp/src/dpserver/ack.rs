//! The ACK/NACK state of one dataplane stream: what to send next, given what the dataplane
//! runs (its last ACK), what is in flight, and what it should run. Plain data, no I/O.
//!
//! - One version is in flight at a time; newer configs wait and coalesce, so a dataplane is
//!   never flooded and always ends on the latest config.
//! - The first config on a stream is complete; later ones are deltas against the last ACKed
//!   config. A NACKed delta is followed by the complete config of the same version; a NACKed
//!   complete config is not sent again until the desired config changes (the dataplane keeps
//!   running its previous one, and the NACK shows in its insight).
//! - A version not answered within the ACK timeout is sent again, complete; after
//!   [`MAX_ATTEMPTS`] unanswered sends the stream is given up.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use weft_api::v1::{ConfigDelta, DataplaneConfig};

use super::compile::delta;

#[cfg(test)]
mod tests;

/// Unanswered sends of one version after which the stream is closed.
pub const MAX_ATTEMPTS: u32 = 3;

/// What to send.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// The complete config.
    Full(Arc<DataplaneConfig>),
    /// The changes since the last ACKed version.
    Delta(Box<ConfigDelta>),
}

/// One message for the dataplane.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Its version.
    pub version: String,
    /// Its content.
    pub body: Body,
}

/// The dataplane broke the protocol or stopped answering.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An ACK or NACK for a version that is not in flight.
    #[error("{what} for version {version:?}, which is not in flight (in flight: {in_flight:?})")]
    Unexpected {
        /// `ACK` or `NACK`.
        what: &'static str,
        /// The version it named.
        version: String,
        /// The version in flight.
        in_flight: Option<String>,
    },
    /// The in-flight version went unanswered too many times.
    #[error("version {version} unanswered after {attempts} sends")]
    Unanswered {
        /// The version.
        version: String,
        /// How many times it was sent.
        attempts: u32,
    },
}

#[derive(Debug, Clone)]
struct InFlight {
    version: String,
    config: Arc<DataplaneConfig>,
    full: bool,
    deadline: Instant,
    attempts: u32,
}

/// The state machine.
#[derive(Debug, Clone)]
pub struct AckState {
    timeout: Duration,
    desired: Option<(String, Arc<DataplaneConfig>)>,
    acked: Option<(String, Arc<DataplaneConfig>)>,
    in_flight: Option<InFlight>,
    nacked: Option<(String, String)>,
    force_full: bool,
}

impl AckState {
    /// A fresh stream; unanswered versions are resent after `timeout`.
    pub fn new(timeout: Duration) -> AckState {
        AckState {
            timeout,
            desired: None,
            acked: None,
            in_flight: None,
            nacked: None,
            force_full: false,
        }
    }

    /// The version the dataplane runs, by its last ACK on this stream.
    pub fn acked(&self) -> Option<&str> {
        self.acked.as_ref().map(|(v, _)| v.as_str())
    }

    /// The last NACKed version and its error, until a newer version is ACKed.
    pub fn nacked(&self) -> Option<(&str, &str)> {
        self.nacked.as_ref().map(|(v, e)| (v.as_str(), e.as_str()))
    }

    /// The version in flight.
    pub fn in_flight(&self) -> Option<&str> {
        self.in_flight.as_ref().map(|f| f.version.as_str())
    }

    /// When the in-flight version times out.
    pub fn deadline(&self) -> Option<Instant> {
        self.in_flight.as_ref().map(|f| f.deadline)
    }

    /// The dataplane should run `config` (at `version`): what to send now, if anything.
    pub fn desire(
        &mut self,
        version: String,
        config: Arc<DataplaneConfig>,
        now: Instant,
    ) -> Option<Outgoing> {
        self.desired = Some((version, config));
        self.next(now)
    }

    /// The dataplane ACKed `version`.
    pub fn on_ack(&mut self, version: &str, now: Instant) -> Result<Option<Outgoing>, Error> {
        let f = self.take_in_flight("ACK", version)?;
        if f.full {
            self.force_full = false;
        }
        self.nacked = None;
        self.acked = Some((f.version, f.config));
        Ok(self.next(now))
    }

    /// The dataplane NACKed `version` with `error`; it keeps running its previous config.
    pub fn on_nack(
        &mut self,
        version: &str,
        error: &str,
        now: Instant,
    ) -> Result<Option<Outgoing>, Error> {
        let f = self.take_in_flight("NACK", version)?;
        if f.full {
            self.nacked = Some((f.version, error.to_owned()));
        } else {
            // A delta may fail only because the dataplane's base differs: send it complete.
            self.force_full = true;
        }
        Ok(self.next(now))
    }

    /// Time passed: resend an unanswered version, complete, or give up on the stream.
    pub fn on_timeout(&mut self, now: Instant) -> Result<Option<Outgoing>, Error> {
        let Some(f) = self.in_flight.as_mut() else {
            return Ok(None);
        };
        if now < f.deadline {
            return Ok(None);
        }
        if f.attempts >= MAX_ATTEMPTS {
            return Err(Error::Unanswered {
                version: f.version.clone(),
                attempts: f.attempts,
            });
        }
        f.attempts += 1;
        f.full = true;
        f.deadline = now + self.timeout;
        Ok(Some(Outgoing {
            version: f.version.clone(),
            body: Body::Full(f.config.clone()),
        }))
    }

    fn take_in_flight(&mut self, what: &'static str, version: &str) -> Result<InFlight, Error> {
        match self.in_flight.take() {
            Some(f) if f.version == version => Ok(f),
            other => {
                let in_flight = other.as_ref().map(|f| f.version.clone());
                self.in_flight = other;
                Err(Error::Unexpected {
                    what,
                    version: version.to_owned(),
                    in_flight,
                })
            }
        }
    }

    fn next(&mut self, now: Instant) -> Option<Outgoing> {
        if self.in_flight.is_some() {
            return None;
        }
        let (version, config) = self.desired.clone()?;
        if self.acked.as_ref().is_some_and(|(v, _)| *v == version) {
            return None;
        }
        if self.nacked.as_ref().is_some_and(|(v, _)| *v == version) {
            return None;
        }
        let (full, body) = match &self.acked {
            Some((base_version, base)) if !self.force_full => (
                false,
                Body::Delta(Box::new(delta(base_version, base, &config))),
            ),
            _ => (true, Body::Full(config.clone())),
        };
        self.in_flight = Some(InFlight {
            version: version.clone(),
            config,
            full,
            deadline: now + self.timeout,
            attempts: 1,
        });
        Some(Outgoing { version, body })
    }
}
