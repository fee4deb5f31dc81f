use std::time::Duration;

use time::OffsetDateTime;

use super::*;
use crate::insight::JoinRecord;
use crate::store::MemoryStore;

fn setup(store: &MemoryStore, name: &str, status: Status, gone_for: time::Duration) {
    let now = OffsetDateTime::now_utc();
    let dp = serde_json::json!({"type": "Dataplane", "mesh": "m", "name": name,
        "networking": {"address": "10.0.0.1",
        "inbound": [{"port": 1, "tags": {"kuma.io/service": "s"}}]}});
    store
        .put(
            &ResourceKey::new("Dataplane", "m", name),
            serde_json::to_vec(&dp).unwrap(),
            Precondition::None,
        )
        .unwrap();
    insight::record_join(
        store,
        "m",
        name,
        &JoinRecord {
            token_id: "t".into(),
            token_expiry: 0,
            joined_at: now,
        },
    )
    .unwrap();
    insight::update(store, "m", name, |i| {
        i.status = status;
        i.disconnected_at = Some(now - gone_for);
    })
    .unwrap();
}

#[test]
fn removes_only_dataplanes_offline_longer_than_the_age() {
    let store = MemoryStore::new();
    store
        .put(&ResourceKey::mesh("m"), b"{}".to_vec(), Precondition::None)
        .unwrap();
    setup(&store, "old", Status::Offline, time::Duration::hours(73));
    setup(&store, "recent", Status::Offline, time::Duration::hours(1));
    setup(&store, "online", Status::Online, time::Duration::hours(100));
    let removed = sweep(
        &store,
        Duration::from_secs(72 * 3600),
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    assert_eq!(removed, [("m".to_owned(), "old".to_owned())]);
    let dp = |n: &str| store.get(&ResourceKey::new("Dataplane", "m", n)).unwrap();
    assert!(dp("old").is_none());
    assert!(dp("recent").is_some() && dp("online").is_some());
    assert!(insight::load(&store, "m", "old").unwrap().is_none());
    assert!(insight::join_record(&store, "m", "old").unwrap().is_none());
    assert!(
        insight::join_record(&store, "m", "recent")
            .unwrap()
            .is_some()
    );
}
