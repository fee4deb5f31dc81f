//! In-memory [`Store`]: a `BTreeMap` behind one mutex, for tests and ephemeral use.
//!
//! Every operation takes the mutex for its whole duration, so mesh checks, cascades and the
//! change feed are trivially atomic and ordered by revision.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use time::OffsetDateTime;
use tokio::sync::broadcast;

use super::{
    CHANGE_FEED_CAPACITY, Change, ChangeOp, MESH_KIND, Precondition, PutOutcome, ResourceKey,
    Result, Store, StoredResource,
};

/// A non-durable store holding everything in memory.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
}

#[derive(Default)]
struct Inner {
    resources: BTreeMap<ResourceKey, StoredResource>,
    revision: u64,
}

impl MemoryStore {
    /// An empty store at revision 0.
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        Self {
            inner: Mutex::new(Inner::default()),
            changes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-written: every mutation
        // is a single map insert/remove plus a counter bump, so the data is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, inner: &mut Inner, key: ResourceKey, op: ChangeOp, version: u64) {
        inner.revision += 1;
        // No subscribers is not an error.
        let _ = self.changes.send(Change {
            key,
            op,
            version,
            revision: inner.revision,
        });
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &ResourceKey) -> Result<Option<StoredResource>> {
        Ok(self.lock().resources.get(key).cloned())
    }

    fn list(&self, kind: &str, mesh: Option<&str>) -> Result<Vec<StoredResource>> {
        // BTreeMap order is (kind, mesh, name), hence sorted by (mesh, name) within a kind.
        Ok(self
            .lock()
            .resources
            .values()
            .filter(|r| r.key.kind == kind && mesh.is_none_or(|m| r.key.mesh == m))
            .cloned()
            .collect())
    }

    fn put(&self, key: &ResourceKey, body: Vec<u8>, pre: Precondition) -> Result<PutOutcome> {
        key.validate()?;
        let mut inner = self.lock();
        let current = inner.resources.get(key);
        super::check_put(key, pre, current.map(|r| r.version))?;
        if !key.mesh.is_empty() && !inner.resources.contains_key(&ResourceKey::mesh(&key.mesh)) {
            return Err(super::Error::MeshNotFound {
                mesh: key.mesh.clone(),
            });
        }
        let now = OffsetDateTime::now_utc();
        let (version, creation_time) = match current {
            Some(r) => (r.version + 1, r.creation_time),
            None => (1, now),
        };
        let created = version == 1;
        inner.resources.insert(
            key.clone(),
            StoredResource {
                key: key.clone(),
                version,
                creation_time,
                modification_time: now,
                body,
            },
        );
        self.publish(&mut inner, key.clone(), ChangeOp::Put, version);
        Ok(PutOutcome { version, created })
    }

    fn delete(&self, key: &ResourceKey, pre: Precondition) -> Result<()> {
        key.validate()?;
        let mut inner = self.lock();
        let version = super::check_delete(key, pre, inner.resources.get(key).map(|r| r.version))?;
        let mut cascade = Vec::new();
        if key.kind == MESH_KIND {
            let mut user_counts = BTreeMap::new();
            for (k, r) in inner.resources.iter().filter(|(k, _)| k.mesh == key.name) {
                if k.is_internal() {
                    cascade.push((k.clone(), r.version));
                } else {
                    *user_counts.entry(k.kind.clone()).or_insert(0) += 1;
                }
            }
            super::check_mesh_empty(&key.name, &user_counts)?;
        }
        for (k, v) in cascade {
            inner.resources.remove(&k);
            self.publish(&mut inner, k, ChangeOp::Delete, v);
        }
        inner.resources.remove(key);
        self.publish(&mut inner, key.clone(), ChangeOp::Delete, version);
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    fn revision(&self) -> u64 {
        self.lock().revision
    }
}
