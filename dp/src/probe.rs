//! Inbound health: a TCP connect to each inbound's local service, published in a watch so the
//! discovery stream reports changes at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::dataplane::InboundSpec;

/// How often every inbound is probed.
pub const PERIOD: Duration = Duration::from_secs(5);
/// How long one connect may take.
pub const TIMEOUT: Duration = Duration::from_secs(1);

/// Whether one inbound's service accepts connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundHealth {
    /// The inbound's port on the dataplane.
    pub port: u16,
    /// Whether its service accepted a TCP connection.
    pub ready: bool,
}

/// What one inbound's probe connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The inbound's port.
    pub port: u16,
    /// The service's address.
    pub address: String,
    /// The service's port.
    pub service_port: u16,
}

impl From<&InboundSpec> for Target {
    fn from(i: &InboundSpec) -> Target {
        Target {
            port: i.port,
            address: i.service_address.clone(),
            service_port: i.service_port,
        }
    }
}

/// Every inbound unready: what a draining dataplane reports.
pub fn draining(targets: &[Target]) -> Arc<Vec<InboundHealth>> {
    initial(targets)
}

/// The state before any probe ran: nothing ready.
pub fn initial(targets: &[Target]) -> Arc<Vec<InboundHealth>> {
    Arc::new(
        targets
            .iter()
            .map(|t| InboundHealth {
                port: t.port,
                ready: false,
            })
            .collect(),
    )
}

/// Probes every target once, concurrently.
pub async fn probe_all(targets: &[Target], timeout: Duration) -> Vec<InboundHealth> {
    let probes = targets.iter().map(|t| async move {
        let connect = TcpStream::connect((t.address.as_str(), t.service_port));
        let ready = matches!(tokio::time::timeout(timeout, connect).await, Ok(Ok(_)));
        InboundHealth {
            port: t.port,
            ready,
        }
    });
    futures::future::join_all(probes).await
}

/// Probes every `period` until `shutdown`, publishing only changes.
pub async fn run(
    targets: Vec<Target>,
    health: Arc<watch::Sender<Arc<Vec<InboundHealth>>>>,
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    if targets.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::shutdown::stopped(&mut shutdown) => return,
        }
        let now = probe_all(&targets, TIMEOUT).await;
        health.send_if_modified(|h| {
            if **h == now {
                return false;
            }
            *h = Arc::new(now);
            true
        });
    }
}
