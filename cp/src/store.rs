//! Model-agnostic resource store.
//!
//! The store knows nothing about resource schemas: a resource is a [`ResourceKey`] plus an
//! opaque body (JSON written by the caller) and bookkeeping (version, timestamps). The only
//! model knowledge it has is the one needed for integrity that cannot be enforced from
//! outside without races:
//!
//! - the kind named exactly [`MESH_KIND`] scopes every other resource: a resource with a
//!   non-empty `mesh` can only be written while `Mesh/""/<mesh>` exists, and a mesh can only
//!   be deleted once no user resource (kind not starting with `_`) remains in it;
//! - internal kinds (starting with `_`, e.g. `_ca`) are deleted together with their mesh, so
//!   they never leak into a re-created mesh of the same name.
//!
//! Writes use optimistic concurrency ([`Precondition`]), bump a store-wide monotonic
//! revision and are published on a broadcast change feed ([`Store::subscribe`]).
//!
//! Two implementations share these semantics and one test suite: [`SledStore`] (durable,
//! flushed before a write returns) and [`MemoryStore`] (for tests and ephemeral use).

use std::fmt;

use time::OffsetDateTime;

mod memory;
mod sled;
#[cfg(test)]
mod tests;

pub use self::memory::MemoryStore;
pub use self::sled::SledStore;

/// The kind whose resources scope all mesh-scoped resources.
pub const MESH_KIND: &str = "Mesh";

/// Capacity of the change feed; slow subscribers that fall further behind see `Lagged`.
pub const CHANGE_FEED_CAPACITY: usize = 4096;

/// Identity of a stored resource.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    /// Resource kind, e.g. `Mesh`, `Dataplane`, or an internal kind such as `_ca`.
    pub kind: String,
    /// Owning mesh; `""` for non-mesh-scoped kinds, including `Mesh` itself.
    pub mesh: String,
    /// Resource name, unique within (kind, mesh).
    pub name: String,
}

impl ResourceKey {
    /// Builds a key from its three parts.
    pub fn new(kind: impl Into<String>, mesh: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            mesh: mesh.into(),
            name: name.into(),
        }
    }

    /// The key of the `Mesh` resource named `name`.
    pub fn mesh(name: impl Into<String>) -> Self {
        Self::new(MESH_KIND, "", name)
    }

    /// Whether this key names an internal kind (deleted together with its mesh).
    pub fn is_internal(&self) -> bool {
        is_internal_kind(&self.kind)
    }

    /// Checks the key is storable: non-empty kind and name, no NUL bytes, and `Mesh`
    /// resources not themselves mesh-scoped.
    fn validate(&self) -> Result<()> {
        let invalid = |reason| {
            Err(Error::InvalidKey {
                key: self.clone(),
                reason,
            })
        };
        if self.kind.is_empty() {
            return invalid("empty kind");
        }
        if self.name.is_empty() {
            return invalid("empty name");
        }
        if [&self.kind, &self.mesh, &self.name]
            .iter()
            .any(|part| part.contains('\0'))
        {
            return invalid("contains a NUL byte");
        }
        if self.kind == MESH_KIND && !self.mesh.is_empty() {
            return invalid("a Mesh cannot belong to a mesh");
        }
        Ok(())
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mesh.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.mesh, self.name)
        }
    }
}

fn is_internal_kind(kind: &str) -> bool {
    kind.starts_with('_')
}

/// A resource as stored, with its bookkeeping.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResource {
    /// Identity.
    pub key: ResourceKey,
    /// 1 on create, +1 on every put.
    pub version: u64,
    /// When the resource was first created; kept across updates.
    pub creation_time: OffsetDateTime,
    /// When the resource was last written.
    pub modification_time: OffsetDateTime,
    /// Opaque body written by the caller (JSON by convention).
    pub body: Vec<u8>,
}

/// Condition on the current state of a resource for a write to proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// No condition: create or replace (or delete whatever version exists).
    None,
    /// The resource must not exist (create only).
    Absent,
    /// The resource must currently be at this version.
    Version(u64),
}

/// Result of a successful put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    /// Version of the resource after the put.
    pub version: u64,
    /// Whether the put created the resource.
    pub created: bool,
}

/// What happened to a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeOp {
    /// Created or updated.
    Put,
    /// Deleted (explicitly, or with its mesh for internal kinds).
    Delete,
}

/// One entry of the change feed.
#[derive(Debug, Clone)]
pub struct Change {
    /// Resource that changed.
    pub key: ResourceKey,
    /// What happened.
    pub op: ChangeOp,
    /// Resource version after a put, or the deleted version for a delete.
    pub version: u64,
    /// Store revision of this change; strictly increasing along the feed.
    pub revision: u64,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The resource does not exist.
    #[error("{key} not found")]
    NotFound {
        /// Missing resource.
        key: ResourceKey,
    },
    /// A precondition did not hold.
    #[error(
        "conflict on {key}: expected {}, found {}",
        version_text(.expected),
        version_text(.actual)
    )]
    Conflict {
        /// Resource written.
        key: ResourceKey,
        /// Expected version; `None` means expected absent.
        expected: Option<u64>,
        /// Actual version; `None` means absent.
        actual: Option<u64>,
    },
    /// A mesh-scoped write named a mesh that does not exist.
    #[error("mesh {mesh:?} not found")]
    MeshNotFound {
        /// Missing mesh.
        mesh: String,
    },
    /// A mesh still holds user resources and cannot be deleted.
    #[error("mesh {mesh:?} is not empty: {summary}")]
    MeshNotEmpty {
        /// Mesh whose deletion was refused.
        mesh: String,
        /// User kinds still present, sorted.
        kinds: Vec<String>,
        /// Human-readable `Kind: count` list.
        summary: String,
    },
    /// The key cannot be stored.
    #[error("invalid resource key {key:?}: {reason}")]
    InvalidKey {
        /// Offending key.
        key: ResourceKey,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The storage backend failed (sled or I/O error text).
    #[error("store backend: {0}")]
    Backend(String),
    /// A stored record could not be decoded.
    #[error("corrupt record {key}: {reason}")]
    Corrupt {
        /// The record's key (decoded if possible, else escaped raw bytes).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn version_text(v: &Option<u64>) -> String {
    match v {
        Some(v) => format!("version {v}"),
        None => "absent".to_owned(),
    }
}

/// Store result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A resource store. Implementations are synchronous and cheap enough to call from async
/// code for control-plane sized data; no lock is held across calls.
pub trait Store: Send + Sync + 'static {
    /// The resource at `key`, if any.
    fn get(&self, key: &ResourceKey) -> Result<Option<StoredResource>>;
    /// All resources of `kind`, in `mesh` if given; sorted by (mesh, name).
    fn list(&self, kind: &str, mesh: Option<&str>) -> Result<Vec<StoredResource>>;
    /// Creates or replaces the resource at `key` if `pre` holds.
    fn put(&self, key: &ResourceKey, body: Vec<u8>, pre: Precondition) -> Result<PutOutcome>;
    /// Deletes the resource at `key` if `pre` holds. Deleting a `Mesh` also deletes the
    /// internal-kind resources in it, and is refused while user resources remain.
    fn delete(&self, key: &ResourceKey, pre: Precondition) -> Result<()>;
    /// A receiver of every change made after this call.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change>;
    /// Monotonic revision of the whole store (bumped on each successful put/delete).
    fn revision(&self) -> u64;
}

/// Checks `pre` against the current version of `key` (`None` = absent) for a put.
/// Both stores use it, and so does the REST API's dry run.
pub fn check_put(key: &ResourceKey, pre: Precondition, current: Option<u64>) -> Result<()> {
    match (pre, current) {
        (Precondition::None, _) | (Precondition::Absent, None) => Ok(()),
        (Precondition::Version(want), Some(have)) if want == have => Ok(()),
        (Precondition::Absent, actual) => Err(Error::Conflict {
            key: key.clone(),
            expected: None,
            actual,
        }),
        (Precondition::Version(want), actual) => Err(Error::Conflict {
            key: key.clone(),
            expected: Some(want),
            actual,
        }),
    }
}

/// Checks `pre` against the current version of an existing `key` for a delete.
fn check_delete(key: &ResourceKey, pre: Precondition, current: Option<u64>) -> Result<u64> {
    let Some(have) = current else {
        return Err(Error::NotFound { key: key.clone() });
    };
    match pre {
        Precondition::None => Ok(have),
        Precondition::Version(want) if want == have => Ok(have),
        Precondition::Version(want) => Err(Error::Conflict {
            key: key.clone(),
            expected: Some(want),
            actual: Some(have),
        }),
        Precondition::Absent => Err(Error::Conflict {
            key: key.clone(),
            expected: None,
            actual: Some(have),
        }),
    }
}

/// Builds the `MeshNotEmpty` error from per-kind counts of user resources, or `Ok` if none.
fn check_mesh_empty(
    mesh: &str,
    user_counts: &std::collections::BTreeMap<String, usize>,
) -> Result<()> {
    if user_counts.is_empty() {
        return Ok(());
    }
    let summary = user_counts
        .iter()
        .map(|(kind, n)| format!("{kind}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::MeshNotEmpty {
        mesh: mesh.to_owned(),
        kinds: user_counts.keys().cloned().collect(),
        summary,
    })
}
