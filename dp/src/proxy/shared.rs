//! A pool of connections to peers, keyed by (peer, service, TLS generation): concurrent callers
//! share one handshake (a `OnceCell` per key), entries of older TLS generations and entries the
//! caller says are dead are dropped when the next connection is looked up, and entries no
//! stream has asked for lately when [`Shared::release_unused`] is called. What is pooled (a
//! QUIC connection, an HTTP/2 sender) is the caller's: dropping it from the pool closes the
//! connection once the streams it still carries have ended.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::OnceCell;

/// One entry: filled by the first caller's handshake.
pub(crate) type Slot<T> = Arc<OnceCell<T>>;

/// Connections by key, each with when a stream last asked for it.
pub(crate) struct Shared<K, T> {
    map: Mutex<HashMap<K, (Slot<T>, Instant)>>,
}

impl<K, T> Default for Shared<K, T> {
    fn default() -> Self {
        Shared {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, T> Shared<K, T> {
    /// The slot for `key`, after dropping every entry `keep` refuses (older generations, dead
    /// connections; an empty slot is always kept: its handshake may be running).
    pub(crate) fn slot(&self, key: &K, keep: impl Fn(&K, &T) -> bool) -> Slot<T> {
        // The lock guards map operations only, never an await.
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, (c, _)| c.get().is_none_or(|t| keep(k, t)));
        let now = Instant::now();
        let (slot, used) = map
            .entry(key.clone())
            .or_insert_with(|| (Slot::default(), now));
        *used = now;
        slot.clone()
    }

    /// Forgets `slot` under `key` (if it is still the one there), so that the next caller
    /// connects afresh.
    pub(crate) fn forget(&self, key: &K, slot: &Slot<T>) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|(c, _)| Arc::ptr_eq(c, slot)) {
            map.remove(key);
        }
    }

    /// Forgets every filled slot `matches` picks.
    pub(crate) fn forget_where(&self, matches: impl Fn(&T) -> bool) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (c, _)| c.get().is_none_or(|t| !matches(t)));
    }

    /// Forgets every slot no stream has asked for since `since`: filled ones, and empty ones
    /// nobody holds (left by a failed handshake, for an address or TLS generation perhaps
    /// never asked for again; one held has its handshake running).
    pub(crate) fn release_unused(&self, since: Instant) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (c, used)| {
            *used >= since || (c.get().is_none() && Arc::strong_count(c) > 1)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two streams of one connection fail: the first eviction's replacement survives the
    /// second eviction, which names the old connection.
    #[tokio::test]
    async fn forgetting_a_replaced_connection_keeps_its_replacement() {
        let pool: Shared<&str, u32> = Shared::default();
        let keep = |_: &&str, _: &u32| true;
        let old = pool.slot(&"peer", keep);
        old.get_or_init(|| async { 1 }).await;
        pool.forget(&"peer", &old);
        let new = pool.slot(&"peer", keep);
        assert_eq!(new.get(), None, "a fresh slot after the first eviction");
        new.get_or_init(|| async { 2 }).await;
        pool.forget(&"peer", &old);
        let now = pool.slot(&"peer", keep);
        assert!(Arc::ptr_eq(&now, &new), "the replacement is still pooled");
        assert_eq!(now.get(), Some(&2));
    }

    /// Releasing unused entries keeps the ones asked for since, and empty ones someone holds
    /// (a handshake running); an empty one nobody holds (a handshake failed) goes.
    #[tokio::test]
    async fn only_entries_unused_since_are_released() {
        let pool: Shared<&str, u32> = Shared::default();
        let keep = |_: &&str, _: &u32| true;
        pool.slot(&"idle", keep).get_or_init(|| async { 1 }).await;
        let pending = pool.slot(&"connecting", keep);
        drop(pool.slot(&"failed", keep));
        let since = Instant::now();
        let busy = pool.slot(&"busy", keep);
        busy.get_or_init(|| async { 2 }).await;
        pool.release_unused(since);
        let keys = pool.map.lock().unwrap().len();
        assert_eq!(
            keys, 2,
            "busy and connecting kept, idle and failed released"
        );
        assert_eq!(pool.slot(&"idle", keep).get(), None, "released");
        assert!(Arc::ptr_eq(&pool.slot(&"busy", keep), &busy), "kept");
        assert!(
            Arc::ptr_eq(&pool.slot(&"connecting", keep), &pending),
            "kept"
        );
    }
}
