//! The REST API (Kuma's paths) over the store. See `docs/rest-api.md` for the contract.
//!
//! Handlers only translate HTTP to store and model calls; every error becomes an [`ApiError`]
//! at this edge, which picks the status and the Kuma-shaped body. Store calls are synchronous
//! (sled flushes to disk before answering), so they run on the blocking pool.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use time::format_description::well_known::Rfc3339;

use crate::insight;
use crate::metrics::Metrics;
use crate::model::{FieldError, Kind, Resource, normalise_key};
use crate::store::{self, Precondition, ResourceKey, Store, StoredResource};

mod error;
#[cfg(test)]
mod tests;
mod tokens;

pub use error::ApiError;

/// Server-owned fields: added to what the API returns, stripped from what it is given.
pub const SERVER_FIELDS: [&str; 3] = ["creationTime", "modificationTime", "resourceVersion"];

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    /// The resource store.
    pub store: Arc<dyn Store>,
    /// Prometheus metrics of the control plane.
    pub metrics: Arc<Metrics>,
    /// The control plane's mode, reported by `GET /`.
    pub mode: &'static str,
}

/// The REST API's router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/meshes", get(list_meshes))
        .route("/mesh-insights", get(mesh_insights))
        .route("/tokens/dataplane", post(tokens::issue))
        .route("/tokens/dataplane/revocations", post(tokens::revoke))
        .route(
            "/meshes/{mesh}/signing-keys",
            get(tokens::list_signing_keys).post(tokens::rotate_signing_key),
        )
        .route(
            "/meshes/{mesh}",
            get(get_mesh).put(put_mesh).delete(delete_mesh),
        )
        .route("/meshes/{mesh}/{plural}", get(list_in_mesh))
        .route(
            "/meshes/{mesh}/{plural}/{name}",
            get(get_resource).put(put_resource).delete(delete_resource),
        )
        .route("/{plural}", get(list_all))
        .route("/{plural}/_overview", get(overview_all))
        .fallback(|| async { ApiError::NotFound("no such path".into()) })
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::count_requests,
        ))
        .with_state(state)
}

async fn index(State(st): State<ApiState>) -> Json<Value> {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    Json(json!({
        "product": "weft",
        "version": env!("CARGO_PKG_VERSION"),
        "mode": st.mode,
        "hostname": hostname,
        "tagline": "weft: a service mesh for virtual machines",
    }))
}

async fn blocking<T: Send + 'static>(
    st: &ApiState,
    f: impl FnOnce(&dyn Store) -> store::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let store = st.store.clone();
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
        .map_err(ApiError::from)
}

fn kind_of(plural: &str) -> Result<Kind, ApiError> {
    Kind::from_plural(plural).ok_or_else(|| {
        ApiError::NotFound(format!(
            "unknown resource type {plural:?}; known: {}",
            Kind::ALL.map(Kind::plural).join(", ")
        ))
    })
}

fn mesh_scoped(plural: &str) -> Result<Kind, ApiError> {
    let kind = kind_of(plural)?;
    if !kind.is_mesh_scoped() {
        return Err(ApiError::NotFound(format!(
            "{plural} are not inside a mesh: use /{plural}"
        )));
    }
    Ok(kind)
}

fn key(kind: Kind, mesh: &str, name: &str) -> ResourceKey {
    ResourceKey {
        kind: kind.type_name().to_owned(),
        mesh: if kind.is_mesh_scoped() {
            mesh.to_owned()
        } else {
            String::new()
        },
        name: name.to_owned(),
    }
}

// ---- reads ----

async fn get_mesh(
    State(st): State<ApiState>,
    Path(mesh): Path<String>,
) -> Result<Response, ApiError> {
    get_one(st, Kind::Mesh, String::new(), mesh).await
}

async fn get_resource(
    State(st): State<ApiState>,
    Path((mesh, plural, name)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let kind = mesh_scoped(&plural)?;
    if name == "_overview" && kind == Kind::Dataplane {
        return overview(st, Some(mesh), Vec::new()).await;
    }
    get_one(st, kind, mesh, name).await
}

async fn get_one(
    st: ApiState,
    kind: Kind,
    mesh: String,
    name: String,
) -> Result<Response, ApiError> {
    let k = key(kind, &mesh, &name);
    let found = blocking(&st, move |s| s.get(&k)).await?;
    let Some(r) = found else {
        return Err(not_found(kind, &mesh, &name));
    };
    let etag = etag(r.version);
    let mut resp = Json(render(&r)?).into_response();
    resp.headers_mut().insert(header::ETAG, etag);
    Ok(resp)
}

fn not_found(kind: Kind, mesh: &str, name: &str) -> ApiError {
    if kind.is_mesh_scoped() {
        ApiError::NotFound(format!("{kind} {name:?} not found in mesh {mesh:?}"))
    } else {
        ApiError::NotFound(format!("{kind} {name:?} not found"))
    }
}

fn etag(version: u64) -> HeaderValue {
    // A decimal number in quotes is always a valid header value.
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

fn timestamp(t: time::OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// The stored body with the server fields, in Kuma's field order.
fn render(r: &StoredResource) -> Result<Value, ApiError> {
    let body: Map<String, Value> = serde_json::from_slice(&r.body).map_err(|e| {
        ApiError::Internal(format!(
            "stored {} {:?} is not JSON: {e}",
            r.key.kind, r.key.name
        ))
    })?;
    let mut out = Map::new();
    for k in ["type", "mesh", "name"] {
        if let Some(v) = body.get(k) {
            out.insert(k.to_owned(), v.clone());
        }
    }
    out.insert("resourceVersion".into(), json!(r.version));
    out.insert("creationTime".into(), json!(timestamp(r.creation_time)));
    out.insert(
        "modificationTime".into(),
        json!(timestamp(r.modification_time)),
    );
    for (k, v) in body {
        out.entry(k).or_insert(v);
    }
    Ok(Value::Object(out))
}

#[derive(Debug, Default)]
struct ListQuery {
    size: usize,
    offset: usize,
    tags: Vec<(String, String)>,
    labels: Vec<(String, String)>,
}

impl ListQuery {
    fn parse(pairs: &[(String, String)]) -> Result<ListQuery, ApiError> {
        let mut q = ListQuery {
            size: DEFAULT_PAGE,
            ..Default::default()
        };
        for (k, v) in pairs {
            match k.as_str() {
                "size" => {
                    q.size = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or_else(|| {
                            ApiError::bad_param(
                                "size",
                                format!("must be a number from 1 to {MAX_PAGE}"),
                            )
                        })?
                }
                "offset" => {
                    q.offset = v.parse().map_err(|_| {
                        ApiError::bad_param("offset", "must be a non-negative number")
                    })?
                }
                "tag" | "label" => {
                    let (a, b) = v
                        .split_once(':')
                        .ok_or_else(|| ApiError::bad_param(k, "must be key:value"))?;
                    let pair = (normalise_key(a), b.to_owned());
                    if k == "tag" {
                        q.tags.push(pair)
                    } else {
                        q.labels.push((a.to_owned(), b.to_owned()))
                    }
                }
                other => return Err(ApiError::bad_param(other, "unknown query parameter")),
            }
        }
        Ok(q)
    }

    fn matches(&self, body: &Value) -> bool {
        let labels_ok = self.labels.iter().all(|(k, v)| {
            body.get("labels")
                .and_then(|l| l.get(k))
                .and_then(Value::as_str)
                == Some(v.as_str())
        });
        let tags_ok = self.tags.is_empty()
            || body
                .pointer("/networking/inbound")
                .and_then(Value::as_array)
                .is_some_and(|inbounds| {
                    self.tags.iter().all(|(k, v)| {
                        inbounds.iter().any(|ib| {
                            ib.get("tags")
                                .and_then(Value::as_object)
                                .is_some_and(|tags| {
                                    tags.iter().any(|(tk, tv)| {
                                        normalise_key(tk) == *k && tv.as_str() == Some(v.as_str())
                                    })
                                })
                        })
                    })
                });
        labels_ok && tags_ok
    }
}

async fn list_meshes(
    State(st): State<ApiState>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    list(st, Kind::Mesh, None, &q, &headers, "/meshes".into()).await
}

async fn list_in_mesh(
    State(st): State<ApiState>,
    Path((mesh, plural)): Path<(String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = mesh_scoped(&plural)?;
    list(
        st,
        kind,
        Some(mesh.clone()),
        &q,
        &headers,
        format!("/meshes/{mesh}/{plural}"),
    )
    .await
}

async fn list_all(
    State(st): State<ApiState>,
    Path(plural): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = kind_of(&plural)?;
    list(st, kind, None, &q, &headers, format!("/{plural}")).await
}

async fn list(
    st: ApiState,
    kind: Kind,
    mesh: Option<String>,
    pairs: &[(String, String)],
    headers: &HeaderMap,
    path: String,
) -> Result<Response, ApiError> {
    let q = ListQuery::parse(pairs)?;
    let (items, total) = select(&st, kind, mesh, &q).await?;
    let next = (q.offset + q.size < total).then(|| {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1");
        let mut query: Vec<String> = pairs
            .iter()
            .filter(|(k, _)| k != "offset" && k != "size")
            .map(|(k, v)| format!("{k}={}", url_escape(v)))
            .collect();
        query.push(format!("size={}", q.size));
        query.push(format!("offset={}", q.offset + q.size));
        format!("http://{host}{path}?{}", query.join("&"))
    });
    let rendered = items.iter().map(render).collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "total": total, "items": rendered, "next": next })).into_response())
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One page of the resources of `kind` (in `mesh`) that match the filters, and the total count.
async fn select(
    st: &ApiState,
    kind: Kind,
    mesh: Option<String>,
    q: &ListQuery,
) -> Result<(Vec<StoredResource>, usize), ApiError> {
    let all = blocking(st, move |s| s.list(kind.type_name(), mesh.as_deref())).await?;
    let mut matching = Vec::new();
    for r in all {
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        if q.matches(&body) {
            matching.push(r);
        }
    }
    let total = matching.len();
    let page = matching.into_iter().skip(q.offset).take(q.size).collect();
    Ok((page, total))
}

async fn overview_all(
    State(st): State<ApiState>,
    Path(plural): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    if kind_of(&plural)? != Kind::Dataplane {
        return Err(ApiError::NotFound(format!("no overview of {plural}")));
    }
    overview(st, None, q).await
}

async fn overview(
    st: ApiState,
    mesh: Option<String>,
    pairs: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let q = ListQuery::parse(&pairs)?;
    let (items, total) = select(&st, Kind::Dataplane, mesh.clone(), &q).await?;
    let insights = blocking(&st, move |s| {
        insight::load_all(s, mesh.as_deref()).map_err(|e| match e {
            insight::Error::Store(e) => e,
            other => store::Error::Backend(other.to_string()),
        })
    })
    .await?;
    let mut out = Vec::with_capacity(items.len());
    for r in &items {
        let dp = render(r)?;
        let mut o = Map::new();
        o.insert("type".into(), json!("DataplaneOverview"));
        o.insert("mesh".into(), json!(r.key.mesh));
        o.insert("name".into(), json!(r.key.name));
        o.insert("creationTime".into(), dp["creationTime"].clone());
        o.insert("modificationTime".into(), dp["modificationTime"].clone());
        o.insert("dataplane".into(), dp);
        // A dataplane that never connected has no insight: it is Offline.
        let i = insights
            .get(&(r.key.mesh.clone(), r.key.name.clone()))
            .cloned()
            .unwrap_or_default();
        o.insert("dataplaneInsight".into(), insight_json(&i));
        out.push(Value::Object(o));
    }
    Ok(Json(json!({ "total": total, "items": out, "next": null })).into_response())
}

/// An insight as the API shows it: without the CP's internal session id.
fn insight_json(i: &insight::Insight) -> Value {
    let mut v = serde_json::to_value(i).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("session");
    }
    v
}

async fn mesh_insights(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let online = blocking(&st, |s| {
        insight::load_all(s, None).map_err(|e| match e {
            insight::Error::Store(e) => e,
            other => store::Error::Backend(other.to_string()),
        })
    })
    .await?;
    let (meshes, dataplanes, policies) = blocking(&st, |s| {
        let meshes = s.list(Kind::Mesh.type_name(), None)?;
        let dataplanes = s.list(Kind::Dataplane.type_name(), None)?;
        let mut policies = Vec::new();
        for k in Kind::ALL.into_iter().filter(|k| k.is_policy()) {
            policies.extend(s.list(k.type_name(), None)?);
        }
        Ok((meshes, dataplanes, policies))
    })
    .await?;
    let mut items = Vec::new();
    for m in &meshes {
        let body: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
        let name = &m.key.name;
        let total = dataplanes.iter().filter(|d| &d.key.mesh == name).count();
        let up = dataplanes
            .iter()
            .filter(|d| &d.key.mesh == name)
            .filter(|d| {
                online
                    .get(&(d.key.mesh.clone(), d.key.name.clone()))
                    .is_some_and(|i| i.status == insight::Status::Online)
            })
            .count();
        let mut by_type = Map::new();
        for p in policies.iter().filter(|p| &p.key.mesh == name) {
            let e = by_type
                .entry(p.key.kind.clone())
                .or_insert(json!({"total": 0}));
            e["total"] = json!(e["total"].as_u64().unwrap_or(0) + 1);
        }
        items.push(json!({
            "type": "MeshInsight",
            "name": name,
            "mtls": body.pointer("/mtls/enabledBackend").cloned().unwrap_or(Value::Null),
            "dataplanes": { "total": total, "online": up, "offline": total - up },
            "policies": by_type,
        }));
    }
    Ok(Json(json!({ "total": items.len(), "items": items, "next": null })).into_response())
}

// ---- writes ----

#[derive(Debug, Default, serde::Deserialize)]
struct WriteQuery {
    #[serde(default, rename = "dryRun")]
    dry_run: bool,
}

async fn put_mesh(
    State(st): State<ApiState>,
    Path(mesh): Path<String>,
    Query(q): Query<WriteQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    put(st, Kind::Mesh, String::new(), mesh, q, headers, body).await
}

async fn put_resource(
    State(st): State<ApiState>,
    Path((mesh, plural, name)): Path<(String, String, String)>,
    Query(q): Query<WriteQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind = mesh_scoped(&plural)?;
    put(st, kind, mesh, name, q, headers, body).await
}

/// Checks the body against the path, strips server fields, validates, and returns the
/// canonical resource with the precondition the body carried (`resourceVersion`).
fn accept_body(
    kind: Kind,
    mesh: &str,
    name: &str,
    body: &[u8],
) -> Result<(Resource, Option<u64>), ApiError> {
    let mut value: Value = serde_json::from_slice(body).map_err(|e| ApiError::BadRequest {
        details: format!("body is not valid JSON: {e}"),
        causes: vec![],
    })?;
    let Some(obj) = value.as_object_mut() else {
        return Err(ApiError::BadRequest {
            details: "body must be a JSON object".into(),
            causes: vec![],
        });
    };
    let version = match obj.get("resourceVersion") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            ApiError::invalid(vec![FieldError {
                field: "resourceVersion".into(),
                message: "must be a positive integer".into(),
            }])
        })?),
    };
    for f in SERVER_FIELDS {
        obj.remove(f);
    }
    let mut causes = Vec::new();
    match obj.get("type").and_then(Value::as_str) {
        Some(t) if t == kind.type_name() => {}
        Some(t) => causes.push(FieldError {
            field: "type".into(),
            message: format!("is {t:?} but the path is for {kind}"),
        }),
        None => {
            obj.insert("type".into(), json!(kind.type_name()));
        }
    }
    match obj.get("name").and_then(Value::as_str) {
        Some(n) if n == name => {}
        Some(n) => causes.push(FieldError {
            field: "name".into(),
            message: format!("is {n:?} but the path names {name:?}"),
        }),
        None => {
            obj.insert("name".into(), json!(name));
        }
    }
    if kind.is_mesh_scoped() {
        match obj.get("mesh").and_then(Value::as_str) {
            Some(m) if m == mesh => {}
            Some(m) => causes.push(FieldError {
                field: "mesh".into(),
                message: format!("is {m:?} but the path is in mesh {mesh:?}"),
            }),
            None => {
                obj.insert("mesh".into(), json!(mesh));
            }
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::BadRequest {
            details: "resource does not match its path".into(),
            causes,
        });
    }
    let resource = Resource::from_json(&value).map_err(|e| ApiError::invalid(e.causes))?;
    Ok((resource, version))
}

fn precondition(headers: &HeaderMap, body_version: Option<u64>) -> Result<Precondition, ApiError> {
    if let Some(v) = headers.get(header::IF_MATCH) {
        let s = v.to_str().unwrap_or_default().trim().trim_matches('"');
        let n = s.parse().map_err(|_| {
            ApiError::bad_param("If-Match", "must be a resource version such as \"3\"")
        })?;
        return Ok(Precondition::Version(n));
    }
    if headers.get(header::IF_NONE_MATCH).is_some_and(|v| v == "*") {
        return Ok(Precondition::Absent);
    }
    Ok(body_version.map_or(Precondition::None, Precondition::Version))
}

async fn put(
    st: ApiState,
    kind: Kind,
    mesh: String,
    name: String,
    q: WriteQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (resource, body_version) = accept_body(kind, &mesh, &name, &body)?;
    let pre = precondition(&headers, body_version)?;
    let warnings = resource.warnings();
    let canonical = serde_json::to_vec(&resource.to_json())
        .map_err(|e| ApiError::Internal(format!("cannot encode resource: {e}")))?;
    let k = key(kind, &mesh, &name);
    let dry_run = q.dry_run;
    let (status, version, unchanged) = blocking(&st, move |s| {
        let current = s.get(&k)?;
        store::check_put(&k, pre, current.as_ref().map(|c| c.version))?;
        if let Some(cur) = &current {
            if cur.body == canonical {
                return Ok((StatusCode::OK, cur.version, true));
            }
        }
        if dry_run {
            if kind.is_mesh_scoped() {
                let mk = ResourceKey {
                    kind: Kind::Mesh.type_name().into(),
                    mesh: String::new(),
                    name: k.mesh.clone(),
                };
                if s.get(&mk)?.is_none() {
                    return Err(store::Error::MeshNotFound {
                        mesh: k.mesh.clone(),
                    });
                }
            }
            let code = if current.is_some() {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            return Ok((code, current.map_or(1, |c| c.version + 1), false));
        }
        let out = s.put(&k, canonical, pre)?;
        Ok((
            if out.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            out.version,
            false,
        ))
    })
    .await?;
    let mut resp = (
        status,
        Json(json!({
            "resourceVersion": version,
            "unchanged": unchanged,
            "warnings": warnings,
            "dryRun": dry_run,
        })),
    )
        .into_response();
    resp.headers_mut().insert(header::ETAG, etag(version));
    Ok(resp)
}

async fn delete_mesh(
    State(st): State<ApiState>,
    Path(mesh): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    delete(st, Kind::Mesh, String::new(), mesh, headers).await
}

async fn delete_resource(
    State(st): State<ApiState>,
    Path((mesh, plural, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let kind = mesh_scoped(&plural)?;
    delete(st, kind, mesh, name, headers).await
}

async fn delete(
    st: ApiState,
    kind: Kind,
    mesh: String,
    name: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pre = precondition(&headers, None)?;
    let k = key(kind, &mesh, &name);
    let result = blocking(&st, move |s| s.delete(&k, pre)).await;
    match result {
        Ok(()) => Ok(Json(json!({})).into_response()),
        Err(ApiError::Store(store::Error::NotFound { .. })) => Err(not_found(kind, &mesh, &name)),
        Err(e) => Err(e),
    }
}
