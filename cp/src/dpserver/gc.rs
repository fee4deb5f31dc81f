//! Removes dataplanes that have been offline longer than a configured age, with what the CP
//! kept about them (insight, join record), as Kuma's dataplane cleanup does.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::insight::{self, Status};
use crate::model::Kind;
use crate::store::{self, Precondition, ResourceKey, Store};

#[cfg(test)]
mod tests;

/// Deletes every dataplane whose insight says Offline since before `now - max_age`; returns
/// the (mesh, name) of each one deleted.
pub fn sweep(
    store: &dyn Store,
    max_age: Duration,
    now: OffsetDateTime,
) -> Result<Vec<(String, String)>, insight::Error> {
    let cutoff = now - time::Duration::try_from(max_age).unwrap_or(time::Duration::MAX);
    let mut removed = Vec::new();
    for ((mesh, name), i) in insight::load_all(store, None)? {
        let stale = i.status == Status::Offline && i.disconnected_at.is_some_and(|t| t < cutoff);
        if !stale {
            continue;
        }
        let key = ResourceKey::new(Kind::Dataplane.type_name(), &mesh, &name);
        match store.delete(&key, Precondition::None) {
            Ok(()) | Err(store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        insight::forget(store, &mesh, &name)?;
        tracing::info!(%mesh, dataplane = %name, offline_since = ?i.disconnected_at, "removed a dataplane offline for too long");
        removed.push((mesh, name));
    }
    Ok(removed)
}

/// Forgets the insight and join record of every Dataplane deleted (by an operator, or with
/// its mesh), so that its certificate stops authenticating at once.
pub async fn forget_deleted(store: Arc<dyn Store>) {
    use tokio::sync::broadcast::error::RecvError;
    let mut feed = store.subscribe();
    loop {
        match feed.recv().await {
            Ok(c)
                if c.op == store::ChangeOp::Delete && c.key.kind == Kind::Dataplane.type_name() =>
            {
                let s = store.clone();
                let r = tokio::task::spawn_blocking(move || {
                    insight::forget(s.as_ref(), &c.key.mesh, &c.key.name)
                })
                .await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "cannot forget a deleted dataplane's records");
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "dataplane cleanup fell behind the change feed; sweeping orphans"
                );
                let s = store.clone();
                let _ = tokio::task::spawn_blocking(move || forget_orphans(s.as_ref())).await;
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Forgets join records whose Dataplane is gone, and that are older than a minute (a join
/// record is written just before its Dataplane registers).
fn forget_orphans(store: &dyn Store) -> Result<(), insight::Error> {
    let cutoff = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    for r in store.list(insight::IDENTITY_KIND, None)? {
        let Ok(j) = serde_json::from_slice::<insight::JoinRecord>(&r.body) else {
            continue;
        };
        let dp = ResourceKey::new(Kind::Dataplane.type_name(), &r.key.mesh, &r.key.name);
        if j.joined_at < cutoff && store.get(&dp)?.is_none() {
            insight::forget(store, &r.key.mesh, &r.key.name)?;
        }
    }
    Ok(())
}

/// Sweeps every `every` until the task is dropped.
pub async fn run(store: Arc<dyn Store>, max_age: Duration, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = store.clone();
        let r = tokio::task::spawn_blocking(move || {
            sweep(s.as_ref(), max_age, OffsetDateTime::now_utc())
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "dataplane cleanup failed");
        }
    }
}
