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
        Metrics {
            registry,
            api_requests,
            store_changes,
            up,
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
