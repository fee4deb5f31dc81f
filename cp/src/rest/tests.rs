//! Crate-level REST round trips through the real router over an in-memory store.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::{ApiState, router};
use crate::metrics::Metrics;
use crate::store::{MemoryStore, Store};

struct Api {
    store: Arc<dyn Store>,
}

impl Api {
    fn new() -> Api {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        Api { store }
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value, HeaderMap) {
        let app = router(ApiState {
            store: self.store.clone(),
            metrics: Arc::new(Metrics::default()),
            mode: "standalone",
        });
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, v, headers)
    }

    async fn put(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        let (s, v, _) = self.call("PUT", uri, Some(body), &[]).await;
        (s, v)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        let (s, v, _) = self.call("GET", uri, None, &[]).await;
        (s, v)
    }
}

fn mesh(name: &str) -> Value {
    json!({"type": "Mesh", "name": name})
}

fn dataplane(mesh: &str, name: &str, service: &str, port: u16) -> Value {
    json!({
        "type": "Dataplane", "mesh": mesh, "name": name,
        "networking": {"address": "10.0.0.1", "inbound": [{"port": port, "servicePort": 8080, "tags": {"kuma.io/service": service}}]}
    })
}

fn mtp(mesh: &str, name: &str) -> Value {
    json!({
        "type": "MeshTrafficPermission", "mesh": mesh, "name": name,
        "spec": {"targetRef": {"kind": "Mesh"}, "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Allow"}}]}
    })
}

fn strip_server_fields(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        for f in super::SERVER_FIELDS {
            o.remove(f);
        }
    }
    v
}

#[tokio::test]
async fn create_read_update_delete() {
    let api = Api::new();
    let (s, body) = api.put("/meshes/m1", mesh("m1")).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert!(
        body["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("mTLS")),
        "{body}"
    );

    let dp = dataplane("m1", "web-1", "web", 10001);
    let (s, body) = api.put("/meshes/m1/dataplanes/web-1", dp.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["resourceVersion"], 1);

    let (s, got) = api.get("/meshes/m1/dataplanes/web-1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["resourceVersion"], 1);
    assert!(got["creationTime"].as_str().unwrap().ends_with('Z'));
    assert_eq!(strip_server_fields(got), dp);

    // Same body again: nothing changes, not even the version.
    let (s, body) = api.put("/meshes/m1/dataplanes/web-1", dp.clone()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["resourceVersion"], 1);
    assert_eq!(body["unchanged"], true);

    let dp2 = dataplane("m1", "web-1", "web", 10002);
    let (s, body) = api.put("/meshes/m1/dataplanes/web-1", dp2.clone()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["resourceVersion"], 2);
    let (_, got) = api.get("/meshes/m1/dataplanes/web-1").await;
    assert_eq!(got["networking"]["inbound"][0]["port"], 10002);

    let (s, _, _) = api
        .call("DELETE", "/meshes/m1/dataplanes/web-1", None, &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = api.get("/meshes/m1/dataplanes/web-1").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        body["details"].as_str().unwrap().contains("web-1"),
        "{body}"
    );
    let (s, _, _) = api
        .call("DELETE", "/meshes/m1/dataplanes/web-1", None, &[])
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn stale_version_is_a_conflict() {
    let api = Api::new();
    api.put("/meshes/m1", mesh("m1")).await;
    api.put(
        "/meshes/m1/dataplanes/a",
        dataplane("m1", "a", "web", 10001),
    )
    .await;
    api.put(
        "/meshes/m1/dataplanes/a",
        dataplane("m1", "a", "web", 10002),
    )
    .await;

    // Version in the body.
    let mut stale = dataplane("m1", "a", "web", 10003);
    stale["resourceVersion"] = json!(1);
    let (s, body) = api.put("/meshes/m1/dataplanes/a", stale).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["causes"][0]["field"], "resourceVersion");

    // Version in If-Match.
    let (s, _, _) = api
        .call(
            "PUT",
            "/meshes/m1/dataplanes/a",
            Some(dataplane("m1", "a", "web", 10004)),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _, h) = api
        .call(
            "PUT",
            "/meshes/m1/dataplanes/a",
            Some(dataplane("m1", "a", "web", 10004)),
            &[("if-match", "\"2\"")],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["etag"], "\"3\"");

    // Create-only on an existing resource.
    let (s, _, _) = api
        .call(
            "PUT",
            "/meshes/m1/dataplanes/a",
            Some(dataplane("m1", "a", "web", 10005)),
            &[("if-none-match", "*")],
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (_, got) = api.get("/meshes/m1/dataplanes/a").await;
    assert_eq!(
        got["networking"]["inbound"][0]["port"], 10004,
        "refused writes changed nothing"
    );
}

#[tokio::test]
async fn invalid_resource_is_422_with_causes_and_nothing_stored() {
    let api = Api::new();
    api.put("/meshes/m1", mesh("m1")).await;
    let mut bad = dataplane("m1", "a", "web", 10001);
    bad["networking"]["inbound"][0]["port"] = json!(70000);
    bad["networking"]["inbound"][0]["tags"] = json!({});
    let (s, body) = api.put("/meshes/m1/dataplanes/a", bad).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let fields: Vec<&str> = body["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert!(fields.contains(&"networking.inbound[0].port"), "{body}");
    assert!(
        fields
            .iter()
            .any(|f| f.starts_with("networking.inbound[0].tags")),
        "{body}"
    );
    assert_eq!(body["title"], "Could not process a resource");
    let (s, _) = api.get("/meshes/m1/dataplanes/a").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn body_must_match_path_and_be_json() {
    let api = Api::new();
    api.put("/meshes/m1", mesh("m1")).await;
    let (s, body) = api
        .put(
            "/meshes/m1/dataplanes/other",
            dataplane("m1", "a", "web", 10001),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["causes"][0]["field"], "name");
    let (s, body) = api
        .put(
            "/meshes/m1/meshtrafficpermissions/a",
            dataplane("m1", "a", "web", 10001),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["causes"][0]["field"], "type");
    let (s, body) = api
        .put(
            "/meshes/m1/dataplanes/a",
            dataplane("m2", "a", "web", 10001),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["causes"][0]["field"], "mesh");
    let app = router(ApiState {
        store: api.store.clone(),
        metrics: Arc::new(Metrics::default()),
        mode: "standalone",
    });
    let resp = app
        .oneshot(
            Request::put("/meshes/m1/dataplanes/a")
                .body(Body::from("{not json"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (s, _) = api.get("/meshes/m1/unicorns").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn resource_in_missing_mesh_is_refused() {
    let api = Api::new();
    let (s, body) = api
        .put(
            "/meshes/nope/dataplanes/a",
            dataplane("nope", "a", "web", 10001),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["causes"][0]["field"], "mesh");
}

#[tokio::test]
async fn mesh_with_resources_cannot_be_deleted() {
    let api = Api::new();
    api.put("/meshes/m1", mesh("m1")).await;
    api.put(
        "/meshes/m1/meshtrafficpermissions/allow",
        mtp("m1", "allow"),
    )
    .await;
    let (s, body, _) = api.call("DELETE", "/meshes/m1", None, &[]).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        body["details"]
            .as_str()
            .unwrap()
            .contains("MeshTrafficPermission"),
        "{body}"
    );
    api.call(
        "DELETE",
        "/meshes/m1/meshtrafficpermissions/allow",
        None,
        &[],
    )
    .await;
    let (s, _, _) = api.call("DELETE", "/meshes/m1", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn list_paginates_and_filters() {
    let api = Api::new();
    api.put("/meshes/m1", mesh("m1")).await;
    api.put("/meshes/m2", mesh("m2")).await;
    for i in 0..5u16 {
        let svc = if i % 2 == 0 { "web" } else { "backend" };
        let name = format!("dp-{i}");
        let mut dp = dataplane("m1", &name, svc, 10000 + i);
        dp["labels"] = json!({"team": if i < 2 { "a" } else { "b" }});
        let (s, b) = api.put(&format!("/meshes/m1/dataplanes/{name}"), dp).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
    api.put(
        "/meshes/m2/dataplanes/x",
        dataplane("m2", "x", "web", 10000),
    )
    .await;

    let (_, page1) = api.get("/meshes/m1/dataplanes?size=2").await;
    assert_eq!(page1["total"], 5);
    let names: Vec<&str> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dp-0", "dp-1"]);
    let next = page1["next"].as_str().unwrap();
    assert!(next.contains("offset=2"), "{next}");
    let (_, page3) = api.get("/meshes/m1/dataplanes?size=2&offset=4").await;
    assert_eq!(page3["items"].as_array().unwrap().len(), 1);
    assert!(page3["next"].is_null());

    let (_, web) = api
        .get("/meshes/m1/dataplanes?tag=kuma.io/service:web")
        .await;
    assert_eq!(web["total"], 3);
    let (_, web2) = api
        .get("/meshes/m1/dataplanes?tag=weft.io/service:web")
        .await;
    assert_eq!(
        web2["total"], 3,
        "weft.io/ and kuma.io/ prefixes are the same tag"
    );
    let (_, team) = api
        .get("/meshes/m1/dataplanes?label=team:b&tag=kuma.io/service:web")
        .await;
    assert_eq!(team["total"], 2);

    let (_, all) = api.get("/dataplanes").await;
    assert_eq!(all["total"], 6);
    let (_, meshes) = api.get("/meshes").await;
    assert_eq!(meshes["total"], 2);

    let (s, body) = api.get("/meshes/m1/dataplanes?size=0").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["causes"][0]["field"], "size");
}

#[tokio::test]
async fn dry_run_writes_nothing() {
    let api = Api::new();
    api.put("/meshes/m1", mesh("m1")).await;
    let (s, _) = api
        .put(
            "/meshes/m1/dataplanes/a?dryRun=true",
            dataplane("m1", "a", "web", 10001),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = api.get("/meshes/m1/dataplanes/a").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = api
        .put(
            "/meshes/m9/dataplanes/a?dryRun=true",
            dataplane("m9", "a", "web", 10001),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "dry run still checks the mesh");
}

#[tokio::test]
async fn overview_and_insights() {
    let api = Api::new();
    api.put("/meshes/m1", mesh("m1")).await;
    api.put(
        "/meshes/m1/dataplanes/a",
        dataplane("m1", "a", "web", 10001),
    )
    .await;
    api.put("/meshes/m1/meshtrafficpermissions/p", mtp("m1", "p"))
        .await;
    let (s, ov) = api.get("/meshes/m1/dataplanes/_overview").await;
    assert_eq!(s, StatusCode::OK, "{ov}");
    assert_eq!(ov["items"][0]["dataplane"]["name"], "a");
    let (_, ins) = api.get("/mesh-insights").await;
    assert_eq!(ins["items"][0]["dataplanes"]["total"], 1);
    assert_eq!(
        ins["items"][0]["policies"]["MeshTrafficPermission"]["total"],
        1
    );
    let (_, root) = api.get("/").await;
    assert_eq!(root["product"], "weft");
}

#[tokio::test]
async fn dataplane_tokens_issue_rotate_revoke() {
    use crate::keys;
    let api = Api::new();
    api.put("/meshes/m1", mesh("m1")).await;
    let req = json!({"mesh": "m1", "tags": {"kuma.io/service": ["web"]}, "validFor": "2h"});
    let (s, t1, _) = api
        .call("POST", "/tokens/dataplane", Some(req.clone()), &[])
        .await;
    assert_eq!(s, StatusCode::OK, "{t1}");
    let token1 = t1["token"].as_str().unwrap().to_owned();
    let claims = keys::verify(api.store.as_ref(), "m1", &token1).unwrap();
    assert_eq!(
        claims.allowed_services().into_iter().collect::<Vec<_>>(),
        ["web"]
    );
    assert_eq!(claims.exp - claims.iat, 2 * 3600);
    assert!(
        keys::verify(api.store.as_ref(), "default", &token1).is_err(),
        "bound to its mesh"
    );

    // Rotation: new tokens use the new key; the old token still verifies.
    let (s, k2, _) = api.call("POST", "/meshes/m1/signing-keys", None, &[]).await;
    assert_eq!(s, StatusCode::OK, "{k2}");
    let (_, t2, _) = api
        .call("POST", "/tokens/dataplane", Some(req.clone()), &[])
        .await;
    let token2 = t2["token"].as_str().unwrap();
    let header = |t: &str| -> Value {
        use base64::Engine as _;
        let h = t.split('.').next().unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(header(token2)["kid"], k2["kid"]);
    assert_ne!(header(&token1)["kid"], k2["kid"]);
    keys::verify(api.store.as_ref(), "m1", &token1).unwrap();
    let (_, listed) = api.get("/meshes/m1/signing-keys").await;
    assert_eq!(listed["total"], 2);
    assert!(
        !listed.to_string().contains("PRIVATE"),
        "private keys are never served: {listed}"
    );

    // Revocation by token and by id.
    let (s, r, _) = api
        .call(
            "POST",
            "/tokens/dataplane/revocations",
            Some(json!({"mesh": "m1", "token": token1})),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert!(keys::verify(api.store.as_ref(), "m1", &token1).is_err());
    keys::verify(api.store.as_ref(), "m1", token2).unwrap();
    let id2 = t2["id"].as_str().unwrap();
    api.call(
        "POST",
        "/tokens/dataplane/revocations",
        Some(json!({"mesh": "m1", "id": id2})),
        &[],
    )
    .await;
    assert!(keys::verify(api.store.as_ref(), "m1", token2).is_err());

    // Bad requests name the field; missing mesh is 404.
    let (s, b, _) = api
        .call(
            "POST",
            "/tokens/dataplane",
            Some(json!({"mesh": "m1", "tags": {}})),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["causes"][0]["field"], "tags");
    let bad_validity =
        json!({"mesh": "m1", "tags": {"kuma.io/service": ["web"]}, "validFor": "20y"});
    let (s, b, _) = api
        .call("POST", "/tokens/dataplane", Some(bad_validity), &[])
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(b["causes"][0]["field"], "validFor");
    let (s, _, _) = api
        .call(
            "POST",
            "/tokens/dataplane",
            Some(json!({"mesh": "nope", "tags": {"kuma.io/service": ["web"]}})),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Keys and revocations are internal: deleting the mesh takes them along.
    let (s, _, _) = api.call("DELETE", "/meshes/m1", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        api.store
            .list(keys::SIGNING_KEY_KIND, Some("m1"))
            .unwrap()
            .is_empty()
    );
}
