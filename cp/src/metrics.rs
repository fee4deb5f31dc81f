//! The control plane's Prometheus metrics (served on the diagnostics port).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of `weft_cp_api_requests`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP method.
    pub method: String,
    /// Status class: 2xx, 4xx, 5xx.
    pub status: String,
}

/// All metrics of one control plane.
pub struct Metrics {
    registry: Registry,
    /// REST requests by method and status class.
    pub api_requests: Family<RequestLabels, Counter>,
    /// Store changes seen on the change feed.
    pub store_changes: Counter,
    /// 1 once the control plane serves.
    pub up: Gauge,
    /// Dataplane streams open now.
    pub dp_streams: Gauge,
    /// Certificates issued to dataplanes.
    pub certs_issued: Counter,
    /// Certify and stream requests refused, by reason class.
    pub dp_refused: Family<ReasonLabels, Counter>,
    /// Configs (complete or delta) sent to dataplanes.
    pub configs_sent: Family<BodyLabels, Counter>,
    /// ACKs received.
    pub acks: Counter,
    /// NACKs received.
    pub nacks: Counter,
    /// Streams closed by the control plane, by reason class.
    pub streams_closed: Family<ReasonLabels, Counter>,
}

/// Labels naming why something was refused or closed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// e.g. `unauthenticated`, `revoked`, `deleted`.
    pub reason: String,
}

/// Labels of `weft_cp_dp_configs_sent`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BodyLabels {
    /// `full` or `delta`.
    pub kind: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("weft_cp");
        let api_requests = Family::<RequestLabels, Counter>::default();
        registry.register("api_requests", "REST API requests", api_requests.clone());
        let store_changes = Counter::default();
        registry.register(
            "store_changes",
            "Resource changes committed to the store",
            store_changes.clone(),
        );
        let up = Gauge::default();
        registry.register("up", "1 once the control plane serves", up.clone());
        let dp_streams = Gauge::default();
        registry.register(
            "dp_streams",
            "Dataplane streams open now",
            dp_streams.clone(),
        );
        let certs_issued = Counter::default();
        registry.register(
            "dp_certs_issued",
            "Certificates issued to dataplanes",
            certs_issued.clone(),
        );
        let dp_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "dp_refused",
            "Dataplane requests refused, by reason",
            dp_refused.clone(),
        );
        let configs_sent = Family::<BodyLabels, Counter>::default();
        registry.register(
            "dp_configs_sent",
            "Configs sent to dataplanes, complete or delta",
            configs_sent.clone(),
        );
        let acks = Counter::default();
        registry.register(
            "dp_acks",
            "Config versions ACKed by dataplanes",
            acks.clone(),
        );
        let nacks = Counter::default();
        registry.register(
            "dp_nacks",
            "Config versions NACKed by dataplanes",
            nacks.clone(),
        );
        let streams_closed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "dp_streams_closed",
            "Dataplane streams closed by the control plane, by reason",
            streams_closed.clone(),
        );
        Metrics {
            registry,
            api_requests,
            store_changes,
            up,
            dp_streams,
            certs_issued,
            dp_refused,
            configs_sent,
            acks,
            nacks,
            streams_closed,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// axum middleware counting requests by method and status class.
pub async fn count_requests(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let resp = next.run(req).await;
    let status = format!("{}xx", resp.status().as_u16() / 100);
    m.api_requests
        .get_or_create(&RequestLabels { method, status })
        .inc();
    resp
}
