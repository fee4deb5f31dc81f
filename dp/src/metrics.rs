//! The dataplane's Prometheus metrics, served on the admin listener's `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Every metric the dataplane exports, and the registry they are encoded from.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `weft_dp_cp_connected`: 1 while a discovery stream is open.
    pub cp_connected: Gauge,
    /// `weft_dp_cp_reconnects_total`: stream attempts after the first.
    pub cp_reconnects: Counter,
    /// `weft_dp_configs_applied_total`: configs and deltas ACKed.
    pub configs_applied: Counter,
    /// `weft_dp_configs_rejected_total`: configs and deltas NACKed.
    pub configs_rejected: Counter,
    /// `weft_dp_cert_renewals_total`: certificates replaced since start.
    pub cert_renewals: Counter,
    /// `weft_dp_cert_expiry_timestamp_seconds`: the current leaf's notAfter (0: none).
    pub cert_expiry: Gauge,
    /// Per-listener traffic metrics of the data path.
    pub proxy: ProxyMetrics,
}

/// Labels of the data path's metrics: one listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ListenerLabels {
    /// `inbound` or `outbound`.
    pub direction: String,
    /// The listener's port.
    pub port: String,
    /// The inbound's service, or the outbound's destination service.
    pub service: String,
}

/// Buckets of the upstream connect latency histogram, in seconds.
fn connect_buckets() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ])
}

type HistogramFamily = Family<
    ListenerLabels,
    prometheus_client::metrics::histogram::Histogram,
    fn() -> prometheus_client::metrics::histogram::Histogram,
>;

/// The data path's metric families, labelled by listener.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    /// Connections accepted.
    pub opened: Family<ListenerLabels, Counter>,
    /// Connections open now.
    pub active: Family<ListenerLabels, Gauge>,
    /// Connections refused by authorization (or plaintext in STRICT mode).
    pub denied: Family<ListenerLabels, Counter>,
    /// Bytes from the downstream client towards the upstream.
    pub bytes_to_upstream: Family<ListenerLabels, Counter>,
    /// Bytes from the upstream back to the downstream client.
    pub bytes_from_upstream: Family<ListenerLabels, Counter>,
    /// TLS handshakes that failed (bad, expired, foreign or missing certificate; over TCP,
    /// timeouts too). Over QUIC only handshakes refused over TLS count: one the client gave up
    /// on or that timed out is a UDP path problem, logged at debug.
    pub tls_failures: Family<ListenerLabels, Counter>,
    /// Upstream connects that failed, or streams the peer refused or did not answer (each
    /// attempt).
    pub connect_failures: Family<ListenerLabels, Counter>,
    /// Time to connect to the upstream (TCP, plus TLS for outbounds; for pooled and QUIC
    /// streams, until the stream is open, not until the peer's answer), seconds.
    pub connect_seconds: HistogramFamily,
    /// Proxied connections carried as QUIC streams (outbound: streams opened, a refused one
    /// included).
    pub quic_streams: Family<ListenerLabels, Counter>,
    /// TLS handshakes that resumed an earlier session.
    pub tls_resumed: Family<ListenerLabels, Counter>,
    /// Proxied connections carried as HTTP/2 streams of a pooled TLS connection (outbound:
    /// streams opened, a refused one included).
    pub pooled_streams: Family<ListenerLabels, Counter>,
}

/// The metric handles of one listener, resolved once so that a connection only touches atomics.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    /// See [`ProxyMetrics::opened`].
    pub opened: Counter,
    /// See [`ProxyMetrics::active`].
    pub active: Gauge,
    /// See [`ProxyMetrics::denied`].
    pub denied: Counter,
    /// See [`ProxyMetrics::bytes_to_upstream`].
    pub bytes_to_upstream: Counter,
    /// See [`ProxyMetrics::bytes_from_upstream`].
    pub bytes_from_upstream: Counter,
    /// See [`ProxyMetrics::tls_failures`].
    pub tls_failures: Counter,
    /// See [`ProxyMetrics::connect_failures`].
    pub connect_failures: Counter,
    /// See [`ProxyMetrics::connect_seconds`].
    pub connect_seconds: prometheus_client::metrics::histogram::Histogram,
    /// See [`ProxyMetrics::quic_streams`].
    pub quic_streams: Counter,
    /// See [`ProxyMetrics::tls_resumed`].
    pub tls_resumed: Counter,
    /// See [`ProxyMetrics::pooled_streams`].
    pub pooled_streams: Counter,
}

impl ProxyMetrics {
    fn new(registry: &mut Registry) -> ProxyMetrics {
        let m = ProxyMetrics {
            opened: Family::default(),
            active: Family::default(),
            denied: Family::default(),
            bytes_to_upstream: Family::default(),
            bytes_from_upstream: Family::default(),
            tls_failures: Family::default(),
            connect_failures: Family::default(),
            connect_seconds: Family::new_with_constructor(connect_buckets as fn() -> _),
            quic_streams: Family::default(),
            tls_resumed: Family::default(),
            pooled_streams: Family::default(),
        };
        registry.register(
            "weft_dp_connections_opened",
            "Connections accepted: TCP connections, and each stream of a QUIC or pooled connection",
            m.opened.clone(),
        );
        registry.register(
            "weft_dp_connections_active",
            "Connections open now",
            m.active.clone(),
        );
        registry.register(
            "weft_dp_connections_denied",
            "Connections refused by traffic permissions, or plaintext refused in STRICT mode",
            m.denied.clone(),
        );
        registry.register(
            "weft_dp_bytes_to_upstream",
            "Bytes copied from the downstream client to the upstream (counted when a connection ends)",
            m.bytes_to_upstream.clone(),
        );
        registry.register(
            "weft_dp_bytes_from_upstream",
            "Bytes copied from the upstream to the downstream client (counted when a connection ends)",
            m.bytes_from_upstream.clone(),
        );
        registry.register(
            "weft_dp_tls_handshake_failures",
            "TLS handshakes that failed",
            m.tls_failures.clone(),
        );
        registry.register(
            "weft_dp_upstream_connect_failures",
            "Upstream connection attempts that failed, or whose stream the peer refused or did not answer",
            m.connect_failures.clone(),
        );
        registry.register(
            "weft_dp_upstream_connect_seconds",
            "Time to connect to the upstream (TCP, and TLS for outbounds)",
            m.connect_seconds.clone(),
        );
        registry.register(
            "weft_dp_quic_streams",
            "Proxied connections carried as streams of a QUIC connection between dataplanes (outbound: streams opened, refused ones included)",
            m.quic_streams.clone(),
        );
        registry.register(
            "weft_dp_tls_resumed",
            "TLS handshakes between dataplanes that resumed an earlier session",
            m.tls_resumed.clone(),
        );
        registry.register(
            "weft_dp_pooled_streams",
            "Proxied connections carried as HTTP/2 streams of a pooled TLS connection between dataplanes (outbound: streams opened, refused ones included)",
            m.pooled_streams.clone(),
        );
        m
    }

    /// The handles of one listener.
    pub fn listener(&self, direction: &str, port: u16, service: &str) -> ListenerMetrics {
        let l = ListenerLabels {
            direction: direction.to_owned(),
            port: port.to_string(),
            service: service.to_owned(),
        };
        ListenerMetrics {
            opened: self.opened.get_or_create(&l).clone(),
            active: self.active.get_or_create(&l).clone(),
            denied: self.denied.get_or_create(&l).clone(),
            bytes_to_upstream: self.bytes_to_upstream.get_or_create(&l).clone(),
            bytes_from_upstream: self.bytes_from_upstream.get_or_create(&l).clone(),
            tls_failures: self.tls_failures.get_or_create(&l).clone(),
            connect_failures: self.connect_failures.get_or_create(&l).clone(),
            connect_seconds: self.connect_seconds.get_or_create(&l).clone(),
            quic_streams: self.quic_streams.get_or_create(&l).clone(),
            tls_resumed: self.tls_resumed.get_or_create(&l).clone(),
            pooled_streams: self.pooled_streams.get_or_create(&l).clone(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            cp_connected: Gauge::default(),
            cp_reconnects: Counter::default(),
            configs_applied: Counter::default(),
            configs_rejected: Counter::default(),
            cert_renewals: Counter::default(),
            cert_expiry: Gauge::default(),
            proxy: ProxyMetrics::new(&mut registry),
        };
        registry.register(
            "weft_dp_cp_connected",
            "Whether the discovery stream to the control plane is open",
            m.cp_connected.clone(),
        );
        registry.register(
            "weft_dp_cp_reconnects",
            "Discovery stream attempts after the first",
            m.cp_reconnects.clone(),
        );
        registry.register(
            "weft_dp_configs_applied",
            "Config versions applied and ACKed",
            m.configs_applied.clone(),
        );
        registry.register(
            "weft_dp_configs_rejected",
            "Config versions rejected with a NACK",
            m.configs_rejected.clone(),
        );
        registry.register(
            "weft_dp_cert_renewals",
            "Certificates renewed since the dataplane started",
            m.cert_renewals.clone(),
        );
        registry.register(
            "weft_dp_cert_expiry_timestamp_seconds",
            "When the current certificate expires, in Unix seconds (0 without one)",
            m.cert_expiry.clone(),
        );
        registry.register_collector(Box::new(crate::proxy::quic::stats::Exporter));
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
