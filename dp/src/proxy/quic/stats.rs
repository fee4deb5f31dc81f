//! What the dataplane's QUIC connections report about their paths, as Prometheus metrics
//! (`weft_dp_quic_*` on `/metrics`), per side (`client`: connections this dataplane opened for
//! its outbounds; `server`: connections its inbounds accepted).
//!
//! quinn keeps the counts per connection; they are read at scrape time, not on the data path.
//! What tracks a connection is a [`Tracked`] handle held by the connection's owners (the
//! client's pool entry and each of its streams, the server's connection task); the list here
//! only has weak references to them, so it never keeps a connection open (quinn closes a
//! connection once its last handle is gone: a pooled connection evicted, released unused or
//! of an older TLS generation closes when its last stream ends). When the last owner lets go,
//! the handle's final counts go into per-side totals, so the counters never go back (what
//! the connection still sends after that — a finished stream's last acknowledgements — is
//! not counted).

use std::sync::{Arc, Mutex, MutexGuard, Weak};

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

    fn add(&mut self, p: &quinn::PathStats) {
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
    live: Vec<Weak<Tracked>>,
    closed: [Totals; 2],
}

impl State {
    /// Forgets the handles their owners let go of (each folded itself into `closed`).
    fn prune(&mut self) {
        self.live.retain(|w| w.strong_count() > 0);
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

/// A tracked connection; its owner keeps it (and the connection) for as long as it uses the
/// connection.
#[derive(Debug)]
pub struct Tracked {
    side: Side,
    conn: Connection,
}

impl Tracked {
    /// The connection.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let path = self.conn.stats().path;
        QUIC.lock().closed[self.side as usize].add(&path);
    }
}

impl QuicStats {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is counts and weak handles: consistent whatever a panicking holder did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking an established connection: counted while the handle lives.
    pub fn track(&self, side: Side, conn: &Connection) -> Arc<Tracked> {
        let t = Arc::new(Tracked {
            side,
            conn: conn.clone(),
        });
        let mut s = self.lock();
        s.prune();
        s.closed[side as usize].opened += 1;
        s.live.push(Arc::downgrade(&t));
        t
    }

    /// Both sides' figures now.
    pub fn snapshot(&self) -> [Snapshot; 2] {
        let mut out = [Snapshot::default(); 2];
        // Under the lock: the totals and strong handles to the live connections, so none of
        // them is folded into the totals (its `Drop`) before it has been read below.
        let live: Vec<Arc<Tracked>> = {
            let mut s = self.lock();
            s.prune();
            for (i, o) in out.iter_mut().enumerate() {
                o.totals = s.closed[i];
            }
            s.live.iter().filter_map(Weak::upgrade).collect()
        };
        for t in &live {
            let path = t.conn.stats().path;
            let o = &mut out[t.side as usize];
            o.totals.add(&path);
            // Closed but not yet let go of (a pool entry is dropped at the next lookup):
            // counted, not open.
            if t.conn.close_reason().is_some() {
                continue;
            }
            o.live += 1;
            o.min_mtu = match o.min_mtu {
                0 => path.current_mtu,
                m => m.min(path.current_mtu),
            };
        }
        // Dropped after the lock is released: a handle dropped last here folds itself in.
        drop(live);
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
                "Black holes detected by QUIC path MTU discovery (packets fall back to 1200 bytes until a re-search)",
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
