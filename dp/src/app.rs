//! Wiring: builds every part of the dataplane from a checked [`Config`] and runs them until
//! shutdown.
//!
//! Startup order: read the Dataplane file and the CP's CA (errors here are the caller's to
//! report as bad config), load or create the key, load the persisted config and any reusable
//! certificate, bind the admin listener and write its address to `<state-dir>/admin-address`,
//! then start the inbound probes, the identity manager and the discovery client.
//!
//! Files in the state directory: `key.pem` (0600), `cert.pem`, `bundle.pem`, `config.json`,
//! `admin-address`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::cp::CpEndpoint;
use crate::dataplane::Dataplane;
use crate::discovery::{self, ack::AckState};
use crate::identity::{
    self,
    manager::{self, GrpcCertifier, Manager},
};
use crate::metrics::Metrics;
use crate::probe;
use crate::proxy;

/// File in the state directory holding the admin server's actual `host:port`.
pub const ADMIN_ADDRESS_FILE: &str = "admin-address";

/// How long a drain keeps accepting after reporting unready, so that other dataplanes learn
/// it (through the CP) before connections are refused.
pub const DRAIN_PROPAGATION: Duration = Duration::from_secs(1);

/// How long shutdown waits for the tasks to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the dataplane could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Dataplane file is unusable.
    #[error(transparent)]
    Dataplane(#[from] crate::dataplane::Error),
    /// The CA file could not be read.
    #[error("cannot read --ca-cert-file {path}: {source}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("--ca-cert-file {path}: {source}")]
    CaPem {
        /// The file.
        path: PathBuf,
        /// Why.
        source: crate::model::Error,
    },
    /// The CP address is unusable.
    #[error(transparent)]
    Cp(#[from] crate::cp::Error),
    /// The key or a state file could not be read or written.
    #[error(transparent)]
    Identity(#[from] identity::Error),
    /// The admin listener could not be bound.
    #[error("cannot bind the admin listener on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything checked before anything is bound: what `weft-dp validate` checks too.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The configuration.
    pub config: Config,
    /// The Dataplane file after substitution.
    pub dataplane: Arc<Dataplane>,
    /// The control plane endpoint.
    pub cp: CpEndpoint,
}

/// Reads and checks the Dataplane file, the CA file and the CP address.
pub fn check(config: Config) -> Result<Checked> {
    let dataplane = Dataplane::load(&config.dataplane_file, &config.dataplane_vars)?;
    let ca_pem = std::fs::read_to_string(&config.ca_cert_file).map_err(|source| Error::CaFile {
        path: config.ca_cert_file.clone(),
        source,
    })?;
    crate::model::check_certificates("certificates", &ca_pem).map_err(|source| Error::CaPem {
        path: config.ca_cert_file.clone(),
        source,
    })?;
    let cp = CpEndpoint::new(&config.cp_address, ca_pem)?;
    Ok(Checked {
        config,
        dataplane: Arc::new(dataplane),
        cp,
    })
}

/// The version of the first applied config (`None` if the channel closed first).
async fn first_version(
    cfg: &mut watch::Receiver<Option<Arc<crate::model::Applied>>>,
) -> Option<String> {
    let applied = cfg.wait_for(Option::is_some).await.ok()?;
    applied.as_ref().map(|a| a.version.clone())
}

/// Runs the dataplane until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_checked(check(config)?, shutdown).await
}

/// Runs an already checked dataplane until `shutdown` completes.
pub async fn run_checked(
    checked: Checked,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let Checked {
        config,
        dataplane,
        cp,
    } = checked;
    let state_dir = config.state_dir.clone();
    let key_pem = identity::load_or_create_key(&state_dir)?;
    let metrics = Arc::new(Metrics::new());

    let persisted = discovery::load_persisted(&state_dir);
    let ack = AckState::new(&dataplane.mesh, &dataplane.name, persisted);
    let (config_tx, config_rx) = watch::channel(ack.current().cloned());
    if let Some(a) = ack.current() {
        info!(
            version = a.version,
            "serving the persisted config until the control plane answers"
        );
    }
    let existing = manager::load_existing(
        &state_dir,
        &key_pem,
        &dataplane.spiffe_ids(),
        manager::now_unix(),
    );
    let (creds_tx, creds_rx) = watch::channel(existing.map(Arc::new));
    let (attempted_tx, attempted_rx) = watch::channel(false);
    let targets: Vec<probe::Target> = dataplane.inbounds.iter().map(Into::into).collect();
    let (health_tx, health_rx) = watch::channel(probe::initial(&targets));
    let health_tx = Arc::new(health_tx);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Draining stops the probes first (so they do not report the inbounds ready again), then,
    // after DRAIN_PROPAGATION, the listeners; everything else last.
    let (drain_tx, drain_rx) = watch::channel(false);
    let (stop_accepting_tx, stop_accepting_rx) = watch::channel(false);

    let listener = tokio::net::TcpListener::bind(config.admin_address)
        .await
        .map_err(|source| Error::Bind {
            address: config.admin_address,
            source,
        })?;
    let admin_address = listener.local_addr().map_err(|source| Error::Bind {
        address: config.admin_address,
        source,
    })?;
    identity::write_private(
        &state_dir.join(ADMIN_ADDRESS_FILE),
        &format!("{admin_address}\n"),
    )?;
    info!(%admin_address, dataplane = dataplane.name, mesh = dataplane.mesh, "admin server listening");

    let mut tasks = tokio::task::JoinSet::new();
    {
        let state = AdminState {
            config: config_rx.clone(),
            creds: creds_rx.clone(),
            metrics: metrics.clone(),
        };
        let mut stop = shutdown_rx.clone();
        tasks.spawn(async move {
            let stop = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = admin::serve(listener, state, stop).await {
                warn!(error = %e, "admin server failed");
            }
        });
    }
    tasks.spawn(probe::run(
        targets.clone(),
        health_tx.clone(),
        probe::PERIOD,
        drain_rx,
    ));
    let (tls_tx, tls_rx) = watch::channel(None);
    tasks.spawn(proxy::tls_task(
        dataplane.mesh.clone(),
        config.tls_resumption,
        config.quic_congestion,
        creds_rx.clone(),
        config_rx.clone(),
        tls_tx,
        shutdown_rx.clone(),
    ));
    let tracker = Arc::new(proxy::Tracker::default());
    let proxy = proxy::Proxy {
        dataplane: dataplane.clone(),
        config: config_rx.clone(),
        tls: tls_rx,
        metrics: metrics.proxy.clone(),
        dialer: Arc::new(proxy::transport::Dialer::default()),
        tracker: tracker.clone(),
    };
    let proxy_task = tokio::spawn(proxy.run(stop_accepting_rx));
    let manager = Manager::new(
        GrpcCertifier::new(cp.clone()),
        dataplane.clone(),
        manager::Settings {
            state_dir: state_dir.clone(),
            token_file: config.dataplane_token_file.clone(),
            key_pem,
            max_backoff: config.reconnect_max_backoff,
        },
        creds_tx,
        attempted_tx,
        metrics.clone(),
    );
    // SIGHUP (systemctl reload): renew the certificate at once (re-reading the token file if
    // the certificate no longer authenticates); listeners swap it in, open connections stay.
    let (renew_tx, renew_rx) = watch::channel(0u64);
    tasks.spawn(manager.run(config_rx.clone(), renew_rx, shutdown_rx.clone()));
    {
        let mut stop = shutdown_rx.clone();
        tasks.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                warn!("cannot listen for SIGHUP; reload is unavailable");
                return;
            };
            loop {
                tokio::select! {
                    r = hup.recv() => if r.is_none() { return },
                    () = crate::shutdown::stopped(&mut stop) => return,
                }
                weft_systemd::reloading();
                renew_tx.send_modify(|n| *n += 1);
                weft_systemd::ready("reloaded: renewing the certificate");
            }
        });
    }
    // READY=1 once the first config is applied (listeners follow it), then the watchdog.
    {
        let mut cfg = config_rx.clone();
        let mut stop = shutdown_rx.clone();
        let name = dataplane.name.clone();
        tasks.spawn(async move {
            tokio::select! {
                version = first_version(&mut cfg) => {
                    weft_systemd::ready(&format!(
                        "dataplane {name}: config {}",
                        version.unwrap_or_default()
                    ));
                }
                () = crate::shutdown::stopped(&mut stop) => return,
            }
            tokio::select! {
                () = weft_systemd::watchdog() => {}
                () = crate::shutdown::stopped(&mut stop) => {}
            }
        });
    }
    let client = discovery::Client::new(
        cp,
        dataplane,
        discovery::Settings {
            state_dir,
            token_file: config.dataplane_token_file.clone(),
            admin_address: admin_address.to_string(),
            max_backoff: config.reconnect_max_backoff,
            status_interval: config.status_interval,
        },
        discovery::Channels {
            creds: creds_rx,
            cert_attempted: attempted_rx,
            health: health_rx,
            config: config_tx,
            shutdown: shutdown_rx,
        },
        metrics,
        ack,
    );
    tasks.spawn(client.run());

    shutdown.await;
    weft_systemd::stopping("draining");
    // Drain: report every inbound unready (the CP stops sending new traffic here), give that
    // a moment to reach the other dataplanes, stop accepting, let open connections finish.
    info!(drain_timeout = ?config.drain_timeout, "draining");
    drain_tx.send_replace(true);
    health_tx.send_replace(probe::draining(&targets));
    let propagate = config.drain_timeout.min(DRAIN_PROPAGATION);
    tokio::time::sleep(propagate).await;
    stop_accepting_tx.send_replace(true);
    let _ = proxy_task.await;
    let rest = config.drain_timeout.saturating_sub(propagate);
    if tokio::time::timeout(rest, tracker.idle()).await.is_err() {
        warn!(
            open = tracker.active(),
            "drain timeout: closing the remaining connections"
        );
    }
    info!("shutting down");
    shutdown_tx.send_replace(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("tasks did not stop within {SHUTDOWN_GRACE:?}; aborting them");
        tasks.abort_all();
    }
    Ok(())
}
