//! Turning API JSON into what weftctl prints: kumactl-style tables, ages like `5m`, YAML and
//! JSON. Pure functions over `serde_json::Value`, tolerant of missing fields (shown as `-`),
//! so a server that adds or omits a field never breaks the CLI.

use std::collections::BTreeMap;

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};
use weft_api::kind::Kind;

use super::{CtlConfig, Format};

/// Shown for a value the server did not give.
const NONE: &str = "-";

/// Left-aligned columns separated by three spaces, kumactl's layout.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i].saturating_sub(cell.chars().count()) + 3;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `45s`, `5m`, `2h`, `3d`: the largest whole unit, as kumactl shows ages.
pub(crate) fn format_age(d: Duration) -> String {
    let secs = d.whole_seconds().max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Parses an RFC 3339 time.
fn parse_time(v: Option<&Value>) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(v?.as_str()?, &Rfc3339).ok()
}

/// The age of an RFC 3339 timestamp at `now`, `-` when absent or unparseable.
pub(crate) fn age(v: Option<&Value>, now: OffsetDateTime) -> String {
    parse_time(v).map_or_else(|| NONE.to_string(), |t| format_age(now - t))
}

fn str_field<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn text(v: &Value, path: &[&str]) -> String {
    str_field(v, path).unwrap_or(NONE).to_string()
}

/// A mesh's mTLS column: `<type>/<backend>` of the enabled backend, `off` without one.
pub(crate) fn mesh_mtls(mesh: &Value) -> String {
    let Some(enabled) = str_field(mesh, &["mtls", "enabledBackend"]).filter(|s| !s.is_empty())
    else {
        return "off".to_string();
    };
    let backend_type = mesh
        .pointer("/mtls/backends")
        .and_then(Value::as_array)
        .and_then(|bs| {
            bs.iter()
                .find(|b| b.get("name").and_then(Value::as_str) == Some(enabled))
        })
        .and_then(|b| b.get("type"))
        .and_then(Value::as_str);
    match backend_type {
        Some(t) => format!("{t}/{enabled}"),
        None => enabled.to_string(),
    }
}

/// A dataplane's tags (inbound and gateway), merged and sorted: `k=v,k2=v2`.
pub(crate) fn dataplane_tags(dp: &Value) -> String {
    let mut tags: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut add = |t: Option<&Value>| {
        if let Some(Value::Object(map)) = t {
            for (k, v) in map {
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                let vals = tags.entry(k.clone()).or_default();
                if !vals.contains(&v) {
                    vals.push(v);
                }
            }
        }
    };
    if let Some(inbounds) = dp.pointer("/networking/inbound").and_then(Value::as_array) {
        for inbound in inbounds {
            add(inbound.get("tags"));
        }
    }
    add(dp.pointer("/networking/gateway/tags"));
    if tags.is_empty() {
        return NONE.to_string();
    }
    tags.into_iter()
        .flat_map(|(k, vs)| vs.into_iter().map(move |v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(",")
}

/// A policy's top-level `targetRef`: `Mesh`, `MeshService/backend`, … (absent means `Mesh`).
pub(crate) fn target_ref(policy: &Value) -> String {
    let Some(tr) = policy.pointer("/spec/targetRef") else {
        return "Mesh".to_string();
    };
    let kind = tr.get("kind").and_then(Value::as_str).unwrap_or("Mesh");
    match tr.get("name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => format!("{kind}/{name}"),
        _ => kind.to_string(),
    }
}

/// The table of `weftctl get <kind>`.
pub(crate) fn resources_table(kind: Kind, items: &[Value], now: OffsetDateTime) -> String {
    let created = |v: &Value| age(v.get("creationTime"), now);
    match kind {
        Kind::Mesh => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|m| vec![text(m, &["name"]), mesh_mtls(m), created(m)])
                .collect();
            table(&["NAME", "MTLS", "AGE"], &rows)
        }
        Kind::Dataplane => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|d| {
                    vec![
                        text(d, &["mesh"]),
                        text(d, &["name"]),
                        dataplane_tags(d),
                        created(d),
                    ]
                })
                .collect();
            table(&["MESH", "NAME", "TAGS", "AGE"], &rows)
        }
        Kind::MeshTrafficPermission | Kind::MeshLoadBalancingStrategy => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|p| {
                    vec![
                        text(p, &["mesh"]),
                        text(p, &["name"]),
                        target_ref(p),
                        created(p),
                    ]
                })
                .collect();
            table(&["MESH", "NAME", "TARGETREF", "AGE"], &rows)
        }
    }
}

fn count(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Number(n) => n.as_u64(),
        Value::Object(m) => m.get("total").and_then(Value::as_u64),
        _ => None,
    }
}

/// The mTLS column of a mesh insight: a string, or an object naming the backend.
fn insight_mtls(item: &Value) -> String {
    let v = item.get("mtls").or_else(|| item.get("mTLS"));
    match v {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Object(_)) => {
            let v = v.unwrap_or(&Value::Null);
            ["enabledBackend", "backend", "type"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_str))
                .filter(|s| !s.is_empty())
                .map_or_else(|| mesh_mtls(item), str::to_string)
        }
        _ => "off".to_string(),
    }
}

/// The policies column of a mesh insight: a number, or an object of per-kind counts (numbers
/// or `{total}`), summed.
fn insight_policies(item: &Value) -> String {
    match item.get("policies") {
        Some(Value::Object(m)) if m.get("total").is_none() => m
            .values()
            .filter_map(|v| count(Some(v)))
            .sum::<u64>()
            .to_string(),
        v => count(v).map_or_else(|| NONE.to_string(), |n| n.to_string()),
    }
}

/// The table of `weftctl inspect meshes`.
pub(crate) fn mesh_insights_table(items: &[Value]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|m| {
            let name = str_field(m, &["name"]).or_else(|| str_field(m, &["mesh"]));
            let dps = m.get("dataplanes");
            let total = count(dps);
            let online = dps.and_then(|d| d.get("online")).and_then(Value::as_u64);
            let dataplanes = match (online, total) {
                (Some(o), Some(t)) => format!("{o}/{t}"),
                (None, Some(t)) => format!("0/{t}"),
                _ => NONE.to_string(),
            };
            vec![
                name.unwrap_or(NONE).to_string(),
                insight_mtls(m),
                dataplanes,
                insight_policies(m),
            ]
        })
        .collect();
    table(&["NAME", "MTLS", "DATAPLANES", "POLICIES"], &rows)
}

/// The table of `weftctl inspect dataplanes`: an absent insight means the dataplane never
/// connected, shown as `Offline`. Inbound health is its own column, apart from the connection
/// status; the last column is the config the dataplane runs, or the NACK it last sent.
pub(crate) fn dataplane_overview_table(items: &[Value], now: OffsetDateTime) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| {
            let dp = item.get("dataplane").unwrap_or(item);
            let insight = item.get("dataplaneInsight").filter(|v| !v.is_null());
            let field = |k: &str| insight.and_then(|i| i.get(k));
            let status = field("status")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .unwrap_or("Offline");
            let connected = parse_time(field("connectedSince")).map_or_else(
                || NONE.to_string(),
                |t| format!("{} ago", format_age(now - t)),
            );
            let expiry = match field("certExpiry") {
                Some(v @ Value::String(s)) => {
                    parse_time(Some(v)).map_or_else(|| s.clone(), format_timestamp)
                }
                _ => NONE.to_string(),
            };
            let renewals = field("certRenewals")
                .and_then(Value::as_u64)
                .map_or_else(|| NONE.to_string(), |n| n.to_string());
            let health = match field("inboundHealth").and_then(Value::as_object) {
                Some(h) if !h.is_empty() => {
                    let ready = h.values().filter(|v| v.as_bool() == Some(true)).count();
                    format!("{ready}/{} ready", h.len())
                }
                _ => NONE.to_string(),
            };
            let version = field("dpVersion")
                .and_then(Value::as_str)
                .unwrap_or(NONE)
                .to_string();
            let config = field("config");
            let cfg = |k: &str| config.and_then(|c| c.get(k)).and_then(Value::as_str);
            let short = |v: &str| v.chars().take(12).collect::<String>();
            let config = match (cfg("nacked"), cfg("acked")) {
                (Some(n), _) => format!(
                    "NACKED {}: {}",
                    short(n),
                    cfg("nackError").unwrap_or("no reason given")
                ),
                (None, Some(a)) => short(a),
                (None, None) => NONE.to_string(),
            };
            let mesh = str_field(item, &["mesh"]).or_else(|| str_field(dp, &["mesh"]));
            let name = str_field(item, &["name"]).or_else(|| str_field(dp, &["name"]));
            vec![
                mesh.unwrap_or(NONE).to_string(),
                name.unwrap_or(NONE).to_string(),
                dataplane_tags(dp),
                status.to_string(),
                connected,
                health,
                expiry,
                renewals,
                version,
                config,
            ]
        })
        .collect();
    table(
        &[
            "MESH",
            "NAME",
            "TAGS",
            "STATUS",
            "LAST-CONNECTED",
            "INBOUNDS",
            "CERT-EXPIRY",
            "CERT-RENEWALS",
            "DP-VERSION",
            "CONFIG",
        ],
        &rows,
    )
}

/// `2025-01-31 12:00:00` (UTC).
fn format_timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The table of `weftctl config control-planes list`, `*` marking the current one.
pub(crate) fn control_planes_table(cfg: &CtlConfig) -> String {
    let rows: Vec<Vec<String>> = cfg
        .control_planes
        .iter()
        .map(|cp| {
            let active = if cfg.current.as_deref() == Some(cp.name.as_str()) {
                "*"
            } else {
                ""
            };
            vec![active.to_string(), cp.name.clone(), cp.address.clone()]
        })
        .collect();
    table(&["ACTIVE", "NAME", "ADDRESS"], &rows)
}

/// `weft 0.1.0 (standalone)` from the answer of `GET /`.
pub(crate) fn server_version(v: &Value) -> String {
    let product = str_field(v, &["product"]).unwrap_or("unknown");
    let version = str_field(v, &["version"]).unwrap_or("unknown");
    match str_field(v, &["mode"]) {
        Some(mode) => format!("{product} {version} ({mode})"),
        None => format!("{product} {version}"),
    }
}

/// A value as YAML or JSON text ending in a newline.
pub(crate) fn structured(v: &Value, format: Format) -> Result<String, std::io::Error> {
    let mut s = match format {
        Format::Yaml => serde_yaml_ng::to_string(v).map_err(std::io::Error::other)?,
        _ => serde_json::to_string_pretty(v).map_err(std::io::Error::other)?,
    };
    if !s.ends_with('\n') {
        s.push('\n');
    }
    Ok(s)
}
