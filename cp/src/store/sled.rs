//! Durable [`Store`] on sled.
//!
//! Layout, all in sled's default tree so that every write is one atomic [`::sled::Batch`]:
//!
//! | key                                 | value                                     |
//! |-------------------------------------|-------------------------------------------|
//! | `kind \0 mesh \0 name`              | record: header + body (see [`encode`])    |
//! | `\0 m \0 mesh \0 kind \0 name`      | empty; index of the resources of a mesh   |
//! | `\0 r`                              | store revision, u64 big-endian            |
//!
//! Resource keys never start with NUL (kinds are non-empty and NUL-free), so the reserved
//! keys cannot collide with them, and byte order of resource keys is (kind, mesh, name)
//! order because NUL sorts before every other byte.
//!
//! Writers are serialized by a mutex: the check (preconditions, mesh existence, mesh
//! emptiness) and the batch that follows it are atomic with respect to every other writer,
//! and change-feed entries go out in revision order. Each write is flushed before it
//! returns. Readers do not take the mutex.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use time::OffsetDateTime;
use tokio::sync::broadcast;

use super::{
    CHANGE_FEED_CAPACITY, Change, ChangeOp, Error, MESH_KIND, Precondition, PutOutcome,
    ResourceKey, Result, Store, StoredResource,
};

/// Key holding the persisted store revision.
const REVISION_KEY: &[u8] = b"\0r";
/// Prefix of the per-mesh index keys.
const MESH_INDEX_PREFIX: &[u8] = b"\0m\0";
/// Format byte of the record header; bump when the encoding changes.
const RECORD_FORMAT: u8 = 1;
/// Header: format (1) + version (8) + creation nanos (16) + modification nanos (16).
const HEADER_LEN: usize = 1 + 8 + 16 + 16;

/// A store persisted in a sled database directory.
pub struct SledStore {
    db: ::sled::Db,
    /// Serializes writers; guards no data of its own.
    write_lock: Mutex<()>,
    /// Cached copy of the persisted revision; only changed under `write_lock`.
    revision: AtomicU64,
    changes: broadcast::Sender<Change>,
}

impl From<::sled::Error> for Error {
    fn from(e: ::sled::Error) -> Self {
        Error::Backend(e.to_string())
    }
}

impl SledStore {
    /// Opens (creating if needed) the store in directory `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = ::sled::open(path)?;
        let revision = match db.get(REVISION_KEY)? {
            None => 0,
            Some(raw) => {
                let bytes: [u8; 8] = raw.as_ref().try_into().map_err(|_| Error::Corrupt {
                    key: "store revision".to_owned(),
                    reason: format!("expected 8 bytes, found {}", raw.len()),
                })?;
                u64::from_be_bytes(bytes)
            }
        };
        let (changes, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        Ok(Self {
            db,
            write_lock: Mutex::new(()),
            revision: AtomicU64::new(revision),
            changes,
        })
    }

    fn read(&self, key: &ResourceKey) -> Result<Option<StoredResource>> {
        self.db
            .get(resource_key(key))?
            .map(|raw| decode(key.clone(), &raw))
            .transpose()
    }

    /// Applies `batch` (plus the revision bump for `changes`), flushes, then publishes.
    /// Must be called with `write_lock` held.
    fn commit(
        &self,
        mut batch: ::sled::Batch,
        changes: Vec<(ResourceKey, ChangeOp, u64)>,
    ) -> Result<()> {
        let base = self.revision.load(Ordering::SeqCst);
        let last = base + changes.len() as u64;
        batch.insert(REVISION_KEY, &last.to_be_bytes());
        self.db.apply_batch(batch)?;
        self.revision.store(last, Ordering::SeqCst);
        self.db.flush()?;
        for (revision, (key, op, version)) in (base + 1..).zip(changes) {
            // No subscribers is not an error.
            let _ = self.changes.send(Change {
                key,
                op,
                version,
                revision,
            });
        }
        Ok(())
    }
}

impl Store for SledStore {
    fn get(&self, key: &ResourceKey) -> Result<Option<StoredResource>> {
        key.validate()?;
        self.read(key)
    }

    fn list(&self, kind: &str, mesh: Option<&str>) -> Result<Vec<StoredResource>> {
        if kind.is_empty() || kind.contains('\0') || mesh.is_some_and(|m| m.contains('\0')) {
            return Ok(Vec::new());
        }
        let mut prefix = Vec::with_capacity(kind.len() + 1);
        prefix.extend_from_slice(kind.as_bytes());
        prefix.push(0);
        if let Some(mesh) = mesh {
            prefix.extend_from_slice(mesh.as_bytes());
            prefix.push(0);
        }
        self.db
            .scan_prefix(prefix)
            .map(|entry| {
                let (raw_key, raw_value) = entry?;
                let key = parse_resource_key(&raw_key)?;
                decode(key, &raw_value)
            })
            .collect()
    }

    fn put(&self, key: &ResourceKey, body: Vec<u8>, pre: Precondition) -> Result<PutOutcome> {
        key.validate()?;
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.read(key)?;
        super::check_put(key, pre, current.as_ref().map(|r| r.version))?;
        if !key.mesh.is_empty()
            && !self
                .db
                .contains_key(resource_key(&ResourceKey::mesh(&key.mesh)))?
        {
            return Err(Error::MeshNotFound {
                mesh: key.mesh.clone(),
            });
        }
        let now = OffsetDateTime::now_utc();
        let record = match current {
            Some(old) => StoredResource {
                key: key.clone(),
                version: old.version + 1,
                creation_time: old.creation_time,
                modification_time: now,
                body,
            },
            None => StoredResource {
                key: key.clone(),
                version: 1,
                creation_time: now,
                modification_time: now,
                body,
            },
        };
        let mut batch = ::sled::Batch::default();
        batch.insert(resource_key(key), encode(&record));
        if !key.mesh.is_empty() {
            batch.insert(mesh_index_key(key), &[] as &[u8]);
        }
        self.commit(batch, vec![(key.clone(), ChangeOp::Put, record.version)])?;
        Ok(PutOutcome {
            version: record.version,
            created: record.version == 1,
        })
    }

    fn delete(&self, key: &ResourceKey, pre: Precondition) -> Result<()> {
        key.validate()?;
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.read(key)?.map(|r| r.version);
        let version = super::check_delete(key, pre, current)?;
        let mut batch = ::sled::Batch::default();
        let mut changes = Vec::new();
        if key.kind == MESH_KIND {
            let mut user_counts = BTreeMap::new();
            let mut cascade = Vec::new();
            for entry in self.db.scan_prefix(mesh_index_prefix(&key.name)) {
                let (raw, _) = entry?;
                let member = parse_mesh_index_key(&key.name, &raw)?;
                if member.is_internal() {
                    cascade.push(member);
                } else {
                    *user_counts.entry(member.kind).or_insert(0) += 1;
                }
            }
            super::check_mesh_empty(&key.name, &user_counts)?;
            for member in cascade {
                batch.remove(mesh_index_key(&member));
                batch.remove(resource_key(&member));
                // An index entry without its record is tolerated: removing both is harmless.
                if let Some(r) = self.read(&member)? {
                    changes.push((member, ChangeOp::Delete, r.version));
                }
            }
        }
        batch.remove(resource_key(key));
        if !key.mesh.is_empty() {
            batch.remove(mesh_index_key(key));
        }
        changes.push((key.clone(), ChangeOp::Delete, version));
        self.commit(batch, changes)
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    fn revision(&self) -> u64 {
        self.revision.load(Ordering::SeqCst)
    }
}

fn resource_key(key: &ResourceKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.kind.len() + key.mesh.len() + key.name.len() + 2);
    out.extend_from_slice(key.kind.as_bytes());
    out.push(0);
    out.extend_from_slice(key.mesh.as_bytes());
    out.push(0);
    out.extend_from_slice(key.name.as_bytes());
    out
}

fn mesh_index_prefix(mesh: &str) -> Vec<u8> {
    let mut out = MESH_INDEX_PREFIX.to_vec();
    out.extend_from_slice(mesh.as_bytes());
    out.push(0);
    out
}

fn mesh_index_key(key: &ResourceKey) -> Vec<u8> {
    let mut out = mesh_index_prefix(&key.mesh);
    out.extend_from_slice(key.kind.as_bytes());
    out.push(0);
    out.extend_from_slice(key.name.as_bytes());
    out
}

fn escaped(raw: &[u8]) -> String {
    raw.escape_ascii().to_string()
}

fn corrupt(raw: &[u8], reason: impl Into<String>) -> Error {
    Error::Corrupt {
        key: escaped(raw),
        reason: reason.into(),
    }
}

fn utf8(raw_key: &[u8], part: &[u8]) -> Result<String> {
    String::from_utf8(part.to_vec()).map_err(|_| corrupt(raw_key, "key is not UTF-8"))
}

fn parse_resource_key(raw: &[u8]) -> Result<ResourceKey> {
    let parts: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    let [kind, mesh, name] = parts[..] else {
        return Err(corrupt(raw, "resource key does not have three parts"));
    };
    Ok(ResourceKey {
        kind: utf8(raw, kind)?,
        mesh: utf8(raw, mesh)?,
        name: utf8(raw, name)?,
    })
}

fn parse_mesh_index_key(mesh: &str, raw: &[u8]) -> Result<ResourceKey> {
    let rest = raw
        .get(mesh_index_prefix(mesh).len()..)
        .ok_or_else(|| corrupt(raw, "truncated mesh index key"))?;
    let parts: Vec<&[u8]> = rest.split(|b| *b == 0).collect();
    let [kind, name] = parts[..] else {
        return Err(corrupt(raw, "mesh index key does not have kind and name"));
    };
    Ok(ResourceKey {
        kind: utf8(raw, kind)?,
        mesh: mesh.to_owned(),
        name: utf8(raw, name)?,
    })
}

/// Encodes a record: format byte, version (u64 BE), creation and modification times as unix
/// nanoseconds (i128 BE), then the body.
fn encode(r: &StoredResource) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + r.body.len());
    out.push(RECORD_FORMAT);
    out.extend_from_slice(&r.version.to_be_bytes());
    out.extend_from_slice(&r.creation_time.unix_timestamp_nanos().to_be_bytes());
    out.extend_from_slice(&r.modification_time.unix_timestamp_nanos().to_be_bytes());
    out.extend_from_slice(&r.body);
    out
}

/// Decodes a record written by [`encode`]; any malformation is [`Error::Corrupt`].
fn decode(key: ResourceKey, raw: &[u8]) -> Result<StoredResource> {
    let bad = |reason: String| Error::Corrupt {
        key: key.to_string(),
        reason,
    };
    if raw.len() < HEADER_LEN {
        return Err(bad(format!(
            "record is {} bytes, shorter than the {HEADER_LEN}-byte header",
            raw.len()
        )));
    }
    let (header, body) = raw.split_at(HEADER_LEN);
    if header[0] != RECORD_FORMAT {
        return Err(bad(format!("unknown record format {}", header[0])));
    }
    let mut version = [0; 8];
    version.copy_from_slice(&header[1..9]);
    let mut ctime = [0; 16];
    ctime.copy_from_slice(&header[9..25]);
    let mut mtime = [0; 16];
    mtime.copy_from_slice(&header[25..41]);
    let time = |nanos: [u8; 16], what: &str| {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from_be_bytes(nanos))
            .map_err(|e| bad(format!("{what} time out of range: {e}")))
    };
    Ok(StoredResource {
        creation_time: time(ctime, "creation")?,
        modification_time: time(mtime, "modification")?,
        version: u64::from_be_bytes(version),
        body: body.to_vec(),
        key,
    })
}

#[cfg(test)]
pub(super) fn corrupt_record_for_test(store: &SledStore, key: &ResourceKey, raw: &[u8]) {
    store
        .db
        .insert(resource_key(key), raw)
        .expect("test insert");
}
