//! Endpoint selection for an outbound: round robin (default) or least request (the fewer
//! active connections of two random healthy endpoints: "power of two choices"). Pure code
//! over the endpoints' shared counters; no locks.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::model::LoadBalancer;

#[cfg(test)]
mod tests;

/// An endpoint as the balancer sees it.
#[derive(Debug)]
pub struct Slot {
    /// `host:port`.
    pub address: String,
    /// Whether its inbound reports ready.
    pub healthy: bool,
    /// Connections open to it now.
    pub active: Arc<AtomicUsize>,
}

/// Picks endpoints for one outbound.
#[derive(Debug, Default)]
pub struct Balancer {
    next: AtomicUsize,
}

impl Balancer {
    /// The order in which to try `slots` for one connection: the chosen one first, then the
    /// other healthy ones (for retries on connect failure), at most `max` in all. Unhealthy
    /// endpoints are never chosen.
    pub fn order(&self, lb: LoadBalancer, slots: &[Slot], max: usize) -> Vec<usize> {
        let healthy: Vec<usize> = (0..slots.len()).filter(|i| slots[*i].healthy).collect();
        if healthy.is_empty() || max == 0 {
            return Vec::new();
        }
        let n = healthy.len();
        let first = match lb {
            LoadBalancer::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            LoadBalancer::LeastRequest => {
                let a = fastrand::usize(..n);
                let b = fastrand::usize(..n);
                let load = |i: usize| slots[healthy[i]].active.load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
        };
        (0..n.min(max)).map(|k| healthy[(first + k) % n]).collect()
    }
}
