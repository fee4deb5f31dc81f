//! The admin server on 127.0.0.1: `/ready`, `/config` (the applied config and its version) and
//! `/metrics` (Prometheus). It reads the same watches the listeners will, so it shows what the
//! dataplane is actually using.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::manager::{Credentials, now_unix};
use crate::metrics::Metrics;
use crate::model::Applied;

#[cfg(test)]
mod tests;

/// What the admin handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The applied config.
    pub config: watch::Receiver<Option<Arc<Applied>>>,
    /// The credentials.
    pub creds: watch::Receiver<Option<Arc<Credentials>>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/config", get(config))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves the admin routes on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Why the dataplane is not ready, if it is not.
pub fn not_ready_reason(state: &AdminState) -> Option<&'static str> {
    let config = state.config.borrow().clone();
    let Some(applied) = config else {
        return Some("no config applied yet");
    };
    if applied.config.mtls_mode.needs_certificate() {
        let valid = state
            .creds
            .borrow()
            .as_ref()
            .is_some_and(|c| c.is_valid_at(now_unix()));
        if !valid {
            return Some("no valid certificate yet");
        }
    }
    None
}

async fn ready(State(state): State<AdminState>) -> Response {
    match not_ready_reason(&state) {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn config(State(state): State<AdminState>) -> Response {
    let applied = state.config.borrow().clone();
    match applied {
        Some(a) => axum::Json(&*a).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "version": null })),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        )
            .into_response(),
    }
}
