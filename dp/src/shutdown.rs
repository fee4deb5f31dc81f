//! The shutdown signal shared by the dataplane's tasks: a `watch<bool>` that turns true once.

use tokio::sync::watch;

/// Completes once `rx` turns true, or its sender is gone (nobody can stop us any more, so
/// waiting would be forever: treat it as a stop).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
