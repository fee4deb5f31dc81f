//! What the dataplane's QUIC connections report about their paths, as Prometheus metrics
//! (`weft_dp_quic_*` on `/metrics`), per side (`client`: connections this dataplane opened for
//! its outbounds; `server`: connections its inbounds accepted).
//!
//! quinn keeps the counts per connection; they are read at scrape time, not on the data path.
//! Live connections are listed here; a closed one is folded into per-side totals the next time
//! the list is touched (a new connection or a scrape), so the counters never go back. The
//! list is process-wide, like the UDP sockets the connections share.

use std::sync::{Mutex, MutexGuard};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use quinn::Connection;

/// Which end of the connection this dataplane is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Opened by this dataplane (outbound).
    Client = 0,
    /// Accepted by one of its inbounds.
    Server = 1,
}

const SIDES: [(Side, &str); 2] = [(Side::Client, "client"), (Side::Server, "server")];

/// Counts of one side's connections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Connections established.
    pub opened: u64,
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost (and resent, if they carried data).
    pub lost_packets: u64,
    /// Congestion events (the window cut after a loss).
    pub congestion_events: u64,
    /// Black holes detected by path MTU discovery (the packet size dropped back to 1200).
    pub black_holes: u64,
}

impl Totals {
    const ZERO: Totals = Totals {
        opened: 0,
        sent_packets: 0,
        lost_packets: 0,
        congestion_events: 0,
        black_holes: 0,
    };

    fn add(&mut self, c: &Connection) {
        let p = c.stats().path;
        self.sent_packets += p.sent_packets;
        self.lost_packets += p.lost_packets;
        self.congestion_events += p.congestion_events;
        self.black_holes += p.black_holes_detected;
    }
}

/// Per-side figures at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Counters over every connection since start, closed ones included.
    pub totals: Totals,
    /// Connections open now.
    pub live: u64,
    /// The smallest path MTU (largest UDP payload) among live connections; 0 without one.
    pub min_mtu: u16,
}

#[derive(Debug)]
struct State {
    live: Vec<(Side, Connection)>,
    closed: [Totals; 2],
}

impl State {
    /// Folds closed connections into the totals and forgets them.
    fn prune(&mut self) {
        let closed = &mut self.closed;
        self.live.retain(|(side, c)| {
            if c.close_reason().is_none() {
                return true;
            }
            closed[*side as usize].add(c);
            false
        });
    }
}

/// The process's QUIC connections.
#[derive(Debug)]
pub struct QuicStats {
    state: Mutex<State>,
}

/// The dataplane's: every connection either side establishes is tracked here.
pub static QUIC: QuicStats = QuicStats {
    state: Mutex::new(State {
        live: Vec::new(),
        closed: [Totals::ZERO; 2],
    }),
};

impl QuicStats {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is counts and handles: consistent whatever a panicking holder did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking an established connection.
    pub fn track(&self, side: Side, conn: &Connection) {
        let mut s = self.lock();
        s.prune();
        s.closed[side as usize].opened += 1;
        s.live.push((side, conn.clone()));
    }

    /// Both sides' figures now.
    pub fn snapshot(&self) -> [Snapshot; 2] {
        let mut s = self.lock();
        s.prune();
        let mut out = [Snapshot::default(); 2];
        for (i, o) in out.iter_mut().enumerate() {
            o.totals = s.closed[i];
        }
        for (side, c) in &s.live {
            let o = &mut out[*side as usize];
            o.totals.add(c);
            o.live += 1;
            let mtu = c.stats().path.current_mtu;
            o.min_mtu = if o.min_mtu == 0 {
                mtu
            } else {
                o.min_mtu.min(mtu)
            };
        }
        out
    }
}

/// A metric's name, help and value, read from a side's figures.
type Metric<T, V> = (&'static str, &'static str, fn(&T) -> V);

/// Encodes [`QUIC`] on each scrape.
#[derive(Debug)]
pub struct Exporter;

impl Collector for Exporter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = QUIC.snapshot();
        let counters: [Metric<Totals, u64>; 5] = [
            (
                "weft_dp_quic_connections_opened",
                "QUIC connections established with other dataplanes",
                |t| t.opened,
            ),
            ("weft_dp_quic_packets_sent", "QUIC packets sent", |t| {
                t.sent_packets
            }),
            (
                "weft_dp_quic_packets_lost",
                "QUIC packets declared lost",
                |t| t.lost_packets,
            ),
            (
                "weft_dp_quic_congestion_events",
                "QUIC congestion events (the congestion window cut after a loss)",
                |t| t.congestion_events,
            ),
            (
                "weft_dp_quic_mtu_black_holes",
                "QUIC paths where path MTU discovery found a black hole and fell back to 1200-byte packets",
                |t| t.black_holes,
            ),
        ];
        for (name, help, get) in counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (side, label) in SIDES {
                let v = get(&snap[side as usize].totals);
                ConstCounter::new(v).encode(m.encode_family(&[("side", label)])?)?;
            }
        }
        let gauges: [Metric<Snapshot, i64>; 2] = [
            (
                "weft_dp_quic_connections",
                "QUIC connections open now",
                |s| s.live as i64,
            ),
            (
                "weft_dp_quic_path_mtu_min_bytes",
                "The smallest path MTU (largest UDP payload) among open QUIC connections, 0 without one",
                |s| i64::from(s.min_mtu),
            ),
        ];
        for (name, help, get) in gauges {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (side, label) in SIDES {
                let v = get(&snap[side as usize]);
                ConstGauge::new(v).encode(m.encode_family(&[("side", label)])?)?;
            }
        }
        Ok(())
    }
}
