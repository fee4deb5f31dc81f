//! What the control plane knows about each dataplane at run time, kept in the store beside
//! the Dataplane so that REST, `weftctl inspect` and a restarted CP all see it.
//!
//! Two internal kinds, written by different parts of the dataplane server:
//! - `_dataplane-insight`: connection state, config versions ACKed or NACKed, certificate
//!   expiry and renewals, inbound health. Written by the dataplane's stream session.
//! - `_dataplane-identity`: how the dataplane joined (the token id), written by `Certify`, so
//!   that revoking the token also ends what the certificate it bought can do.
//!
//! Inbound health is kept apart from the connection state: a dataplane can be Online with an
//! unhealthy inbound, and an Offline dataplane's last known health still routes traffic
//! (static stability while a CP restarts).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::store::{self, Precondition, ResourceKey, Store};

/// Internal kind of [`Insight`] records, keyed like their Dataplane.
pub const INSIGHT_KIND: &str = "_dataplane-insight";
/// Internal kind of [`JoinRecord`]s, keyed like their Dataplane.
pub const IDENTITY_KIND: &str = "_dataplane-identity";

/// Online or not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// A stream is open.
    Online,
    /// No stream is open.
    #[default]
    Offline,
}

/// The config versions a dataplane was sent and answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigState {
    /// The last version sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<String>,
    /// The last version the dataplane ACKed: the config it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked: Option<String>,
    /// The last version the dataplane NACKed, if it has not ACKed a newer one since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nacked: Option<String>,
    /// The dataplane's reason for that NACK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nack_error: Option<String>,
    /// ACKs received since the CP first saw this dataplane.
    #[serde(default)]
    pub acks: u64,
    /// NACKs received.
    #[serde(default)]
    pub nacks: u64,
}

/// The run-time state of one dataplane.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Insight {
    /// Online while a stream is open.
    pub status: Status,
    /// When the current (or last) stream opened.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub connected_since: Option<OffsetDateTime>,
    /// When the last stream closed.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub disconnected_at: Option<OffsetDateTime>,
    /// The `weft-dp` version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_version: Option<String>,
    /// Where the dataplane's admin server listens (on the dataplane's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_address: Option<String>,
    /// Config versions.
    #[serde(default)]
    pub config: ConfigState,
    /// When the dataplane's certificate expires, as it reported or as last issued.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub cert_expiry: Option<OffsetDateTime>,
    /// Renewals the dataplane reported since it started.
    #[serde(default)]
    pub cert_renewals: u64,
    /// Certificates the CP issued to this dataplane.
    #[serde(default)]
    pub certs_issued: u64,
    /// Readiness of each inbound by port, as the dataplane last reported it.
    #[serde(default)]
    pub inbound_health: BTreeMap<u32, bool>,
    /// Identifies the stream that owns this record, so an old stream closing late does not
    /// mark a reconnected dataplane Offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// How a dataplane joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinRecord {
    /// The id (`jti`) of the token it joined with.
    pub token_id: String,
    /// When that token expires (unix seconds).
    pub token_expiry: i64,
    /// When it joined.
    #[serde(with = "time::serde::rfc3339")]
    pub joined_at: OffsetDateTime,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A record did not parse.
    #[error("{key}: stored record is unreadable: {reason}")]
    Corrupt {
        /// Its key.
        key: ResourceKey,
        /// Why.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn read<T: for<'de> Deserialize<'de>>(store: &dyn Store, key: &ResourceKey) -> Result<Option<T>> {
    match store.get(key)? {
        None => Ok(None),
        Some(r) => serde_json::from_slice(&r.body)
            .map(Some)
            .map_err(|e| Error::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            }),
    }
}

fn write<T: Serialize>(store: &dyn Store, key: &ResourceKey, value: &T) -> Result<()> {
    let body = serde_json::to_vec(value).map_err(|e| Error::Corrupt {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    match store.put(key, body, Precondition::None) {
        Ok(_) => Ok(()),
        // The mesh was deleted under us: there is nothing left to describe.
        Err(store::Error::MeshNotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The insight of `mesh`/`name`, if the dataplane ever connected.
pub fn load(store: &dyn Store, mesh: &str, name: &str) -> Result<Option<Insight>> {
    read(store, &ResourceKey::new(INSIGHT_KIND, mesh, name))
}

/// Every insight, by (mesh, name).
pub fn load_all(
    store: &dyn Store,
    mesh: Option<&str>,
) -> Result<BTreeMap<(String, String), Insight>> {
    let mut out = BTreeMap::new();
    for r in store.list(INSIGHT_KIND, mesh)? {
        let i: Insight = serde_json::from_slice(&r.body).map_err(|e| Error::Corrupt {
            key: r.key.clone(),
            reason: e.to_string(),
        })?;
        out.insert((r.key.mesh, r.key.name), i);
    }
    Ok(out)
}

/// Reads, changes and writes back the insight of `mesh`/`name` (created when absent).
pub fn update(
    store: &dyn Store,
    mesh: &str,
    name: &str,
    f: impl FnOnce(&mut Insight),
) -> Result<Insight> {
    let key = ResourceKey::new(INSIGHT_KIND, mesh, name);
    let mut insight: Insight = read(store, &key)?.unwrap_or_default();
    let before = insight.clone();
    f(&mut insight);
    if insight != before {
        write(store, &key, &insight)?;
    }
    Ok(insight)
}

/// The join record of `mesh`/`name`.
pub fn join_record(store: &dyn Store, mesh: &str, name: &str) -> Result<Option<JoinRecord>> {
    read(store, &ResourceKey::new(IDENTITY_KIND, mesh, name))
}

/// Records that `mesh`/`name` joined with a token.
pub fn record_join(store: &dyn Store, mesh: &str, name: &str, rec: &JoinRecord) -> Result<()> {
    write(store, &ResourceKey::new(IDENTITY_KIND, mesh, name), rec)
}

/// Deletes everything kept about `mesh`/`name` besides the Dataplane itself.
pub fn forget(store: &dyn Store, mesh: &str, name: &str) -> Result<()> {
    for kind in [INSIGHT_KIND, IDENTITY_KIND] {
        match store.delete(&ResourceKey::new(kind, mesh, name), Precondition::None) {
            Ok(())
            | Err(store::Error::NotFound { .. })
            | Err(store::Error::MeshNotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// At start-up no stream is open yet: marks every insight still saying Online as Offline.
pub fn mark_all_offline(store: &dyn Store, now: OffsetDateTime) -> Result<usize> {
    let mut n = 0;
    for ((mesh, name), i) in load_all(store, None)? {
        if i.status == Status::Online {
            update(store, &mesh, &name, |i| {
                i.status = Status::Offline;
                i.disconnected_at = Some(now);
                i.session = None;
            })?;
            n += 1;
        }
    }
    Ok(n)
}
