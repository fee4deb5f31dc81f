use std::time::Duration;

use serde_json::json;

use super::*;
use crate::model::Resource;
use crate::store::{MemoryStore, Precondition};

fn put(store: &dyn Store, doc: serde_json::Value) {
    let r = Resource::from_json(&doc).unwrap();
    let key = match &r.mesh {
        None => ResourceKey::mesh(&r.name),
        Some(m) => ResourceKey::new(r.kind.type_name(), m, &r.name),
    };
    store
        .put(
            &key,
            serde_json::to_vec(&r.to_json()).unwrap(),
            Precondition::None,
        )
        .unwrap();
}

fn dp(name: &str, service: &str, port: u16) -> serde_json::Value {
    json!({"type": "Dataplane", "mesh": "m", "name": name, "networking": {
        "address": "10.0.0.2",
        "inbound": [{"port": port, "servicePort": 8080, "tags": {"kuma.io/service": service}}],
        "outbound": [{"port": 10001, "tags": {"kuma.io/service": "backend"}}]}})
}

async fn wait_view(
    rx: &mut watch::Receiver<Option<Arc<MeshView>>>,
    what: &str,
    f: impl Fn(&MeshView) -> bool,
) -> Arc<MeshView> {
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|v| v.as_deref().is_some_and(&f)),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
    r.unwrap().clone().unwrap()
}

#[tokio::test]
async fn views_follow_the_store_and_keep_untouched_endpoint_lists() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    put(
        store.as_ref(),
        json!({"type": "Mesh", "name": "m",
        "mtls": {"enabledBackend": "ca-1", "backends": [{"name": "ca-1", "type": "builtin"}]}}),
    );
    put(store.as_ref(), dp("web-1", "web", 20001));
    let index = Index::new(store.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(index.clone().run(tx));
    rx.await.unwrap();
    let mut views = index.subscribe("m");
    let v1 = wait_view(&mut views, "web-1", |v| v.dataplanes.contains_key("web-1")).await;
    assert!(
        v1.cas.is_some(),
        "the builtin CA is loaded (and generated) with the mesh"
    );
    assert_eq!(v1.endpoints["web"].len(), 1);

    put(store.as_ref(), dp("backend-1", "backend", 20002));
    let v2 = wait_view(&mut views, "backend endpoints", |v| {
        v.endpoints.contains_key("backend")
    })
    .await;
    assert_eq!(
        *v2.endpoints["backend"],
        [EndpointInfo {
            dataplane: "backend-1".into(),
            address: "10.0.0.2".into(),
            port: 20002,
            tags: [("kuma.io/service".to_owned(), "backend".to_owned())].into(),
            healthy: true,
            zone: String::new(),
        }]
    );
    assert!(
        Arc::ptr_eq(&v1.endpoints["web"], &v2.endpoints["web"]),
        "a change to backend leaves web's endpoint list as it was"
    );
    assert!(Arc::ptr_eq(&v1.mtps, &v2.mtps));

    // An unready inbound reported in the insight makes the endpoint unhealthy.
    insight::update(store.as_ref(), "m", "backend-1", |i| {
        i.inbound_health.insert(20002, false);
    })
    .unwrap();
    wait_view(&mut views, "unhealthy backend", |v| {
        v.endpoints.get("backend").is_some_and(|e| !e[0].healthy)
    })
    .await;

    store
        .delete(
            &ResourceKey::new("Dataplane", "m", "backend-1"),
            Precondition::None,
        )
        .unwrap();
    wait_view(&mut views, "backend gone", |v| {
        !v.endpoints.contains_key("backend")
    })
    .await;

    put(
        store.as_ref(),
        json!({"type": "MeshTrafficPermission", "mesh": "m", "name": "allow-all",
        "spec": {"targetRef": {"kind": "Mesh"}, "from": [{"targetRef": {"kind": "Mesh"},
        "default": {"action": "Allow"}}]}}),
    );
    let v = wait_view(&mut views, "policy", |v| v.mtps.len() == 1).await;
    assert_eq!(v.mtps[0].name, "allow-all");
}

#[test]
fn advertised_address_and_not_ready_inbounds() {
    let r = Resource::from_json(&json!({"type": "Dataplane", "mesh": "m", "name": "a",
        "networking": {"address": "10.0.0.2", "advertisedAddress": "192.0.2.7", "inbound": [
            {"port": 1, "tags": {"kuma.io/service": "s"}, "state": "NotReady"},
            {"port": 2, "tags": {"kuma.io/service": "s"}, "state": "Ignored"},
            {"port": 3, "tags": {"kuma.io/service": "s", "kuma.io/zone": "z1"}}]}}))
    .unwrap();
    let dps = BTreeMap::from([("a".to_owned(), Arc::new(r))]);
    let e = endpoints_of("s", &dps, &BTreeMap::new());
    assert_eq!(e.len(), 2, "Ignored inbounds are not endpoints");
    assert_eq!((e[0].port, e[0].healthy), (1, false));
    assert_eq!(
        (e[1].port, e[1].healthy, e[1].zone.as_str()),
        (3, true, "z1")
    );
    assert!(e.iter().all(|e| e.address == "192.0.2.7"));
}
