//! Shared semantics suite, run against both [`MemoryStore`] and [`SledStore`], plus
//! sled-specific durability and corruption tests.

use std::sync::Arc;

use tokio::sync::broadcast::error::TryRecvError;

use super::*;

fn key(kind: &str, mesh: &str, name: &str) -> ResourceKey {
    ResourceKey::new(kind, mesh, name)
}

fn mesh(store: &dyn Store, name: &str) {
    store
        .put(
            &ResourceKey::mesh(name),
            b"{}".to_vec(),
            Precondition::Absent,
        )
        .unwrap();
}

/// Runs `check` against a fresh store of each implementation.
fn each(check: fn(&dyn Store)) {
    check(&MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    check(&SledStore::open(dir.path()).unwrap());
}

fn versions_and_times(s: &dyn Store) {
    let k = key("Thing", "", "a");
    assert_eq!(s.get(&k).unwrap(), None);
    let out = s.put(&k, b"1".to_vec(), Precondition::None).unwrap();
    assert_eq!(
        out,
        PutOutcome {
            version: 1,
            created: true
        }
    );
    let first = s.get(&k).unwrap().unwrap();
    assert_eq!(first.version, 1);
    assert_eq!(first.body, b"1");
    assert_eq!(first.creation_time, first.modification_time);
    let out = s.put(&k, b"2".to_vec(), Precondition::None).unwrap();
    assert_eq!(
        out,
        PutOutcome {
            version: 2,
            created: false
        }
    );
    let out = s.put(&k, b"3".to_vec(), Precondition::Version(2)).unwrap();
    assert_eq!(out.version, 3);
    let third = s.get(&k).unwrap().unwrap();
    assert_eq!(third.key, k);
    assert_eq!(third.body, b"3");
    assert_eq!(third.creation_time, first.creation_time);
    assert!(third.modification_time >= first.modification_time);
    // Delete then re-create starts again at version 1.
    s.delete(&k, Precondition::Version(3)).unwrap();
    assert_eq!(s.get(&k).unwrap(), None);
    assert_eq!(s.put(&k, vec![], Precondition::Absent).unwrap().version, 1);
}

fn preconditions(s: &dyn Store) {
    let k = key("Thing", "", "a");
    match s.put(&k, vec![], Precondition::Version(1)) {
        Err(Error::Conflict {
            expected: Some(1),
            actual: None,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    s.put(&k, vec![], Precondition::Absent).unwrap();
    match s.put(&k, vec![], Precondition::Absent) {
        Err(Error::Conflict {
            expected: None,
            actual: Some(1),
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    match s.put(&k, vec![], Precondition::Version(7)) {
        Err(Error::Conflict {
            expected: Some(7),
            actual: Some(1),
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    match s.delete(&k, Precondition::Version(2)) {
        Err(Error::Conflict {
            expected: Some(2),
            actual: Some(1),
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let missing = key("Thing", "", "b");
    match s.delete(&missing, Precondition::None) {
        Err(Error::NotFound { key }) => assert_eq!(key, missing),
        other => panic!("{other:?}"),
    }
    // Failed writes did not bump anything.
    assert_eq!(s.get(&k).unwrap().unwrap().version, 1);
    assert_eq!(s.revision(), 1);
    s.delete(&k, Precondition::None).unwrap();
    assert_eq!(s.revision(), 2);
}

fn list_sorted_and_filtered(s: &dyn Store) {
    mesh(s, "m2");
    mesh(s, "m1");
    mesh(s, "m10");
    for (m, n) in [
        ("m2", "b"),
        ("m1", "z"),
        ("m2", "a"),
        ("m10", "a"),
        ("m1", "a"),
    ] {
        s.put(&key("Svc", m, n), vec![], Precondition::None)
            .unwrap();
    }
    s.put(&key("Svcx", "m1", "a"), vec![], Precondition::None)
        .unwrap();
    s.put(&key("Sv", "m1", "q"), vec![], Precondition::None)
        .unwrap();
    let names = |v: Vec<StoredResource>| {
        v.into_iter()
            .map(|r| format!("{}/{}", r.key.mesh, r.key.name))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(s.list("Svc", None).unwrap()),
        ["m1/a", "m1/z", "m10/a", "m2/a", "m2/b"]
    );
    assert_eq!(names(s.list("Svc", Some("m1")).unwrap()), ["m1/a", "m1/z"]);
    assert_eq!(
        names(s.list("Svc", Some("m3")).unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(names(s.list("Mesh", None).unwrap()), ["/m1", "/m10", "/m2"]);
    assert_eq!(names(s.list("Mesh", Some("")).unwrap()).len(), 3);
    assert!(s.list("Nope", None).unwrap().is_empty());
}

fn mesh_scoping(s: &dyn Store) {
    let d = key("Dataplane", "demo", "dp1");
    match s.put(&d, vec![], Precondition::None) {
        Err(Error::MeshNotFound { mesh }) => assert_eq!(mesh, "demo"),
        other => panic!("{other:?}"),
    }
    match s.put(&key("_ca", "demo", "root"), vec![], Precondition::None) {
        Err(Error::MeshNotFound { .. }) => {}
        other => panic!("{other:?}"),
    }
    mesh(s, "demo");
    s.put(&d, vec![], Precondition::None).unwrap();
    s.put(&key("Dataplane", "demo", "dp2"), vec![], Precondition::None)
        .unwrap();
    s.put(
        &key("TrafficRoute", "demo", "r"),
        vec![],
        Precondition::None,
    )
    .unwrap();
    s.put(
        &key("_ca", "demo", "root"),
        b"secret".to_vec(),
        Precondition::None,
    )
    .unwrap();
    s.put(
        &key("_signing-key", "demo", "k"),
        vec![],
        Precondition::None,
    )
    .unwrap();
    // A resource with the same name in another mesh / non-mesh kind is unaffected.
    mesh(s, "other");
    s.put(&key("_ca", "other", "root"), vec![], Precondition::None)
        .unwrap();
    s.put(&key("Zone", "", "z"), vec![], Precondition::None)
        .unwrap();

    match s.delete(&ResourceKey::mesh("demo"), Precondition::None) {
        Err(Error::MeshNotEmpty {
            mesh,
            kinds,
            summary,
        }) => {
            assert_eq!(mesh, "demo");
            assert_eq!(kinds, ["Dataplane", "TrafficRoute"]);
            assert_eq!(summary, "Dataplane: 2, TrafficRoute: 1");
        }
        other => panic!("{other:?}"),
    }
    s.delete(&d, Precondition::None).unwrap();
    s.delete(&key("Dataplane", "demo", "dp2"), Precondition::None)
        .unwrap();
    match s.delete(&ResourceKey::mesh("demo"), Precondition::None) {
        Err(Error::MeshNotEmpty { kinds, .. }) => assert_eq!(kinds, ["TrafficRoute"]),
        other => panic!("{other:?}"),
    }
    s.delete(&key("TrafficRoute", "demo", "r"), Precondition::None)
        .unwrap();

    let mut feed = s.subscribe();
    s.delete(&ResourceKey::mesh("demo"), Precondition::Version(1))
        .unwrap();
    // Internal kinds went with the mesh, one Delete change each, the mesh last.
    let mut deleted = Vec::new();
    while let Ok(c) = feed.try_recv() {
        assert_eq!(c.op, ChangeOp::Delete);
        deleted.push(c.key.to_string());
    }
    assert_eq!(
        deleted,
        ["_ca/demo/root", "_signing-key/demo/k", "Mesh/demo"]
    );
    // Re-creating the mesh does not resurrect them.
    mesh(s, "demo");
    assert_eq!(s.get(&key("_ca", "demo", "root")).unwrap(), None);
    assert!(s.list("_signing-key", Some("demo")).unwrap().is_empty());
    assert!(s.get(&key("_ca", "other", "root")).unwrap().is_some());
    assert!(s.get(&key("Zone", "", "z")).unwrap().is_some());
    // And the re-created mesh is empty, so it can be deleted again.
    s.delete(&ResourceKey::mesh("demo"), Precondition::None)
        .unwrap();
}

fn invalid_keys(s: &dyn Store) {
    for bad in [
        key("Th\0ing", "", "a"),
        key("Thing", "", "a\0b"),
        key("Thing", "m\0", "a"),
        key("", "", "a"),
        key("Thing", "", ""),
        key("Mesh", "m", "a"),
    ] {
        match s.put(&bad, vec![], Precondition::None) {
            Err(Error::InvalidKey { key, .. }) => assert_eq!(key, bad),
            other => panic!("{bad:?}: {other:?}"),
        }
        assert!(matches!(
            s.delete(&bad, Precondition::None),
            Err(Error::InvalidKey { .. })
        ));
    }
    assert_eq!(s.revision(), 0);
}

fn change_feed(s: &dyn Store) {
    let mut feed = s.subscribe();
    let a = key("Thing", "", "a");
    let b = key("Thing", "", "b");
    s.put(&a, vec![], Precondition::None).unwrap();
    s.put(&b, vec![], Precondition::None).unwrap();
    s.put(&a, vec![], Precondition::None).unwrap();
    let _ = s.put(&a, vec![], Precondition::Absent).unwrap_err();
    s.delete(&b, Precondition::None).unwrap();
    let got: Vec<_> = std::iter::from_fn(|| feed.try_recv().ok()).collect();
    let summary: Vec<_> = got
        .iter()
        .map(|c| (c.key.name.as_str(), c.op.clone(), c.version))
        .collect();
    assert_eq!(
        summary,
        [
            ("a", ChangeOp::Put, 1),
            ("b", ChangeOp::Put, 1),
            ("a", ChangeOp::Put, 2),
            ("b", ChangeOp::Delete, 1),
        ]
    );
    let revisions: Vec<_> = got.iter().map(|c| c.revision).collect();
    assert_eq!(revisions, [1, 2, 3, 4]);
    assert_eq!(s.revision(), 4);
    assert!(matches!(feed.try_recv(), Err(TryRecvError::Empty)));
}

fn concurrent_increments(s: &dyn Store) {
    let k = key("Counter", "", "c");
    s.put(&k, b"0".to_vec(), Precondition::Absent).unwrap();
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                for _ in 0..50 {
                    loop {
                        let cur = s.get(&k).unwrap().unwrap();
                        let n: u64 = std::str::from_utf8(&cur.body).unwrap().parse().unwrap();
                        let next = (n + 1).to_string().into_bytes();
                        match s.put(&k, next, Precondition::Version(cur.version)) {
                            Ok(_) => break,
                            Err(Error::Conflict { .. }) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            });
        }
    });
    let end = s.get(&k).unwrap().unwrap();
    assert_eq!(end.body, b"400");
    assert_eq!(end.version, 401);
    assert_eq!(s.revision(), 401);
}

/// Concurrent mesh deletion and mesh-scoped creation: either the put fails with
/// MeshNotFound or the delete fails with MeshNotEmpty, never a resource in a missing mesh.
fn mesh_delete_races_put(s: &dyn Store) {
    for i in 0..20 {
        mesh(s, "race");
        let k = key("Dataplane", "race", &format!("dp{i}"));
        let (put, del) = std::thread::scope(|scope| {
            let put = scope.spawn(|| s.put(&k, vec![], Precondition::None));
            let del = scope.spawn(|| s.delete(&ResourceKey::mesh("race"), Precondition::None));
            (put.join().unwrap(), del.join().unwrap())
        });
        match (put, del) {
            (Ok(_), Err(Error::MeshNotEmpty { .. })) => {
                s.delete(&k, Precondition::None).unwrap();
                s.delete(&ResourceKey::mesh("race"), Precondition::None)
                    .unwrap();
            }
            (Err(Error::MeshNotFound { .. }), Ok(())) => {}
            other => panic!("{other:?}"),
        }
        assert!(s.list("Dataplane", Some("race")).unwrap().is_empty());
    }
}

#[test]
fn memory_and_sled_versions_and_times() {
    each(versions_and_times);
}

#[test]
fn memory_and_sled_preconditions() {
    each(preconditions);
}

#[test]
fn memory_and_sled_list() {
    each(list_sorted_and_filtered);
}

#[test]
fn memory_and_sled_mesh_scoping() {
    each(mesh_scoping);
}

#[test]
fn memory_and_sled_invalid_keys() {
    each(invalid_keys);
}

#[test]
fn memory_and_sled_change_feed() {
    each(change_feed);
}

#[test]
fn memory_and_sled_concurrent_increments() {
    each(concurrent_increments);
}

#[test]
fn memory_and_sled_mesh_delete_races_put() {
    each(mesh_delete_races_put);
}

#[test]
fn store_is_object_safe_and_shareable() {
    let s: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let s2 = Arc::clone(&s);
    std::thread::spawn(move || s2.put(&key("T", "", "a"), vec![], Precondition::None))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(s.revision(), 1);
}

#[test]
fn sled_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let k = key("Dataplane", "demo", "dp1");
    let before = {
        let s = SledStore::open(dir.path()).unwrap();
        mesh(&s, "demo");
        s.put(&k, b"{\"a\":1}".to_vec(), Precondition::None)
            .unwrap();
        s.put(&k, b"{\"a\":2}".to_vec(), Precondition::Version(1))
            .unwrap();
        s.put(&key("_ca", "demo", "root"), vec![], Precondition::None)
            .unwrap();
        assert_eq!(s.revision(), 4);
        s.get(&k).unwrap().unwrap()
    };
    let s = SledStore::open(dir.path()).unwrap();
    let after = s.get(&k).unwrap().unwrap();
    assert_eq!(after, before);
    assert_eq!(after.version, 2);
    assert_eq!(s.revision(), 4);
    let mut feed = s.subscribe();
    // The mesh index survived too: the mesh is still non-empty, and the cascade still works.
    assert!(matches!(
        s.delete(&ResourceKey::mesh("demo"), Precondition::None),
        Err(Error::MeshNotEmpty { .. })
    ));
    s.delete(&k, Precondition::Version(2)).unwrap();
    s.delete(&ResourceKey::mesh("demo"), Precondition::None)
        .unwrap();
    assert_eq!(feed.try_recv().unwrap().revision, 5);
    assert_eq!(s.revision(), 7);
    drop(s);
    let s = SledStore::open(dir.path()).unwrap();
    assert_eq!(s.revision(), 7);
    assert_eq!(s.get(&key("_ca", "demo", "root")).unwrap(), None);
    assert_eq!(
        s.put(&key("Zone", "", "z"), vec![], Precondition::None)
            .unwrap()
            .version,
        1
    );
    assert_eq!(s.revision(), 8);
}

#[test]
fn sled_corrupt_record_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let k = key("Thing", "", "a");
    for raw in [&b""[..], &[9; 60][..], &[1; 20][..]] {
        sled::corrupt_record_for_test(&s, &k, raw);
        match s.get(&k) {
            Err(Error::Corrupt { key, .. }) => assert_eq!(key, "Thing/a"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.list("Thing", None), Err(Error::Corrupt { .. })));
        assert!(matches!(
            s.put(&k, vec![], Precondition::None),
            Err(Error::Corrupt { .. })
        ));
    }
    // Out-of-range timestamps are reported, not panicked on.
    let mut raw = vec![1];
    raw.extend_from_slice(&1u64.to_be_bytes());
    raw.extend_from_slice(&i128::MAX.to_be_bytes());
    raw.extend_from_slice(&0i128.to_be_bytes());
    sled::corrupt_record_for_test(&s, &k, &raw);
    assert!(matches!(s.get(&k), Err(Error::Corrupt { .. })));
}

#[test]
fn error_messages_name_what_failed() {
    let e = Error::Conflict {
        key: key("Thing", "m", "a"),
        expected: None,
        actual: Some(3),
    };
    assert_eq!(
        e.to_string(),
        "conflict on Thing/m/a: expected absent, found version 3"
    );
}
