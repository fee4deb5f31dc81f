//! Wiring: open the store, make sure the default mesh exists, serve the REST API and the
//! diagnostics endpoints until the shutdown signal.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use std::time::Duration;

use crate::config::{Config, Mode, StoreType};
use crate::dpserver::tls::{self, CertSource};
use crate::dpserver::{self, DpServer};
use crate::index::Index;
use crate::insight;
use crate::metrics::Metrics;
use crate::model::{Kind, Resource};
use crate::rest::{self, ApiState};
use crate::store::{self, MemoryStore, Precondition, ResourceKey, SledStore, Store};

/// Internal kind that records one-time bootstrap steps, so that a default mesh the operator
/// deleted is not created again on the next start.
const BOOTSTRAP_KIND: &str = "_bootstrap";

/// Opens the store the config names.
pub fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match config.store_type {
        StoreType::Sled => Arc::new(
            SledStore::open(&config.store_path)
                .with_context(|| format!("opening the store at {}", config.store_path.display()))?,
        ),
        StoreType::Memory => Arc::new(MemoryStore::new()),
    })
}

/// Creates the `default` mesh (mTLS on, builtin CA, STRICT) the first time a store is used.
pub fn ensure_default_mesh(store: &dyn Store) -> anyhow::Result<()> {
    let marker = ResourceKey {
        kind: BOOTSTRAP_KIND.into(),
        mesh: String::new(),
        name: "default-mesh".into(),
    };
    if store.get(&marker)?.is_some() {
        return Ok(());
    }
    let mesh = Resource::default_mesh();
    let key = ResourceKey {
        kind: Kind::Mesh.type_name().into(),
        mesh: String::new(),
        name: mesh.name.clone(),
    };
    let body = serde_json::to_vec(&mesh.to_json())?;
    match store.put(&key, body, Precondition::Absent) {
        Ok(_) => tracing::info!("created the default mesh (mTLS on, builtin CA, STRICT)"),
        Err(store::Error::Conflict { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    store.put(&marker, b"{}".to_vec(), Precondition::None)?;
    Ok(())
}

/// Bound listeners of a control plane, so that tests can bind port 0 and read the address.
pub struct Listeners {
    /// REST API.
    pub api: TcpListener,
    /// `/ready` and `/metrics`.
    pub diagnostics: TcpListener,
    /// The dataplane server (gRPC over TLS).
    pub dp_server: TcpListener,
}

impl Listeners {
    /// Binds every listener the config names; fails before anything serves.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let api = TcpListener::bind(config.api_address)
            .await
            .with_context(|| format!("binding the API on {}", config.api_address))?;
        let diagnostics = TcpListener::bind(config.diagnostics_address)
            .await
            .with_context(|| format!("binding diagnostics on {}", config.diagnostics_address))?;
        let dp_server = TcpListener::bind(config.dp_server_address)
            .await
            .with_context(|| {
                format!(
                    "binding the dataplane server on {}",
                    config.dp_server_address
                )
            })?;
        Ok(Listeners {
            api,
            diagnostics,
            dp_server,
        })
    }
}

#[derive(Clone)]
struct DiagState {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    store: Arc<dyn Store>,
}

fn diagnostics_router(state: DiagState) -> Router {
    Router::new()
        .route(
            "/ready",
            get(|State(s): State<DiagState>| async move {
                let store_ok = s.store.get(&ResourceKey {
                    kind: BOOTSTRAP_KIND.into(),
                    mesh: String::new(),
                    name: "ready-probe".into(),
                });
                if s.ready.load(Ordering::Acquire) && store_ok.is_ok() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<DiagState>| async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    s.metrics.encode(),
                )
                    .into_response()
            }),
        )
        .with_state(state)
}

/// Runs the control plane on already-bound listeners until `shutdown` resolves.
pub async fn run(
    config: Config,
    store: Arc<dyn Store>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if !config.skip_mesh_creation {
        let s = store.clone();
        tokio::task::spawn_blocking(move || ensure_default_mesh(s.as_ref())).await??;
    }
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));

    // The dataplane server's certificate, before anything serves: a bad one fails the start.
    let source = match &config.dp_server_tls_files {
        Some((cert, key)) => CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        None => CertSource::Generated {
            dir: config.dp_server_tls_dir.clone(),
            sans: tls::default_sans(config.dp_server_address.ip(), &config.dp_server_tls_sans),
        },
    };
    let load_tls = move || -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let (cert, key) = tls::serving_material(&source)?;
        Ok(tls::server_config(&cert, &key)?)
    };
    let reload_tls = load_tls.clone();
    let server_tls = tokio::task::spawn_blocking(load_tls).await??;
    let (tls_tx, tls_rx) = tokio::sync::watch::channel(server_tls);
    // SIGHUP (systemctl reload): the serving certificate is read (or re-issued) again; open
    // streams keep theirs. Other settings need a restart.
    let reload = tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload is unavailable");
            return;
        };
        while hup.recv().await.is_some() {
            weft_systemd::reloading();
            let f = reload_tls.clone();
            match tokio::task::spawn_blocking(f).await {
                Ok(Ok(c)) => {
                    tls_tx.send_replace(c);
                    tracing::info!("SIGHUP: reloaded the dataplane server's certificate");
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "SIGHUP: keeping the previous certificate")
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: reload task failed"),
            }
            weft_systemd::ready("serving");
        }
    });

    // No stream survives a restart: whatever the last run left Online is Offline now.
    let s = store.clone();
    let stale = tokio::task::spawn_blocking(move || {
        insight::mark_all_offline(s.as_ref(), time::OffsetDateTime::now_utc())
    })
    .await??;
    if stale > 0 {
        tracing::info!(
            dataplanes = stale,
            "marked dataplanes of the previous run offline"
        );
    }
    let index = Index::new(store.clone());
    let (index_ready, index_loaded) = tokio::sync::oneshot::channel();
    tokio::spawn(index.clone().run(index_ready));
    index_loaded.await.context("index stopped before loading")?;
    let cleanup_every =
        (config.dataplane_cleanup_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let gc = tokio::spawn(dpserver::gc::run(
        store.clone(),
        config.dataplane_cleanup_after,
        cleanup_every,
    ));
    let forget = tokio::spawn(dpserver::gc::forget_deleted(store.clone()));
    let dps = DpServer::new(
        store.clone(),
        index.clone(),
        metrics.clone(),
        dpserver::Settings {
            store_calls: config.dp_server_store_calls,
            ..dpserver::Settings::default()
        },
    );

    // Count committed changes; later parts of the CP (the index) subscribe the same way.
    let mut changes = store.subscribe();
    let m = metrics.clone();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match changes.recv().await {
                Ok(_) => {
                    m.store_changes.inc();
                }
                Err(RecvError::Lagged(n)) => {
                    m.store_changes.inc_by(n);
                }
                Err(RecvError::Closed) => break,
            }
        }
    });

    let mode = match config.mode {
        Mode::Standalone => "standalone",
    };
    let api = rest::router(ApiState {
        store: store.clone(),
        metrics: metrics.clone(),
        mode,
    });
    let diag = diagnostics_router(DiagState {
        metrics: metrics.clone(),
        ready: ready.clone(),
        store,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        weft_systemd::stopping("shutting down");
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    tracing::info!(
        api = %listeners.api.local_addr()?,
        diagnostics = %listeners.diagnostics.local_addr()?,
        dp_server = %listeners.dp_server.local_addr()?,
        "weft-cp serving"
    );
    let dp_addr = listeners.dp_server.local_addr()?;
    let dp_srv = dpserver::serve(dps, listeners.dp_server, tls_rx, stopped(stop_rx.clone()));
    let api_srv = axum::serve(listeners.api, api).with_graceful_shutdown(stopped(stop_rx.clone()));
    let diag_srv =
        axum::serve(listeners.diagnostics, diag).with_graceful_shutdown(stopped(stop_rx));
    ready.store(true, Ordering::Release);
    metrics.up.set(1);
    weft_systemd::ready(&format!("serving; dataplane server on {dp_addr}"));
    let watchdog = tokio::spawn(weft_systemd::watchdog());
    let (a, d, p) = tokio::join!(api_srv.into_future(), diag_srv.into_future(), dp_srv);
    gc.abort();
    forget.abort();
    reload.abort();
    watchdog.abort();
    a.context("REST API server")?;
    d.context("diagnostics server")?;
    p.context("dataplane server")?;
    tracing::info!("weft-cp stopped");
    Ok(())
}
