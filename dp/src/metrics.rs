//! The dataplane's Prometheus metrics, served on the admin listener's `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
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
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
