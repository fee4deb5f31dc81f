use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use weft_api::v1::{outbound::LoadBalancer, permission_rule::Action as PbAction};

use super::*;
use crate::index::{MeshView, endpoints_of};

fn res(v: serde_json::Value) -> Arc<Resource> {
    Arc::new(Resource::from_json(&v).unwrap())
}

fn view(dps: &[Arc<Resource>], policies: &[Arc<Resource>]) -> MeshView {
    let dataplanes: BTreeMap<String, Arc<Resource>> =
        dps.iter().map(|d| (d.name.clone(), d.clone())).collect();
    let endpoints = ["backend", "web"]
        .into_iter()
        .map(|s| {
            (
                s.to_owned(),
                Arc::new(endpoints_of(s, &dataplanes, &BTreeMap::new())),
            )
        })
        .collect();
    let (mtps, mlbs): (Vec<_>, Vec<_>) = policies
        .iter()
        .cloned()
        .partition(|p| p.kind == crate::model::Kind::MeshTrafficPermission);
    MeshView {
        mesh: res(json!({"type": "Mesh", "name": "default"})),
        cas: None,
        ca_error: None,
        dataplanes,
        mtps: Arc::new(mtps),
        mlbs: Arc::new(mlbs),
        endpoints,
    }
}

fn dp(
    name: &str,
    service: &str,
    version: &str,
    outbound: Option<serde_json::Value>,
) -> Arc<Resource> {
    let mut v = json!({"type": "Dataplane", "mesh": "default", "name": name, "networking": {
        "address": "10.0.0.1",
        "inbound": [{"port": 10001, "servicePort": 8080,
                     "tags": {"kuma.io/service": service, "version": version}}]}});
    if let Some(o) = outbound {
        v["networking"]["outbound"] = o;
    }
    res(v)
}

#[test]
fn compiles_rules_most_specific_first_endpoints_by_subset_and_the_balancer() {
    let web = dp(
        "web-1",
        "web",
        "v1",
        Some(json!([
            {"port": 20001, "tags": {"kuma.io/service": "backend"}},
            {"port": 20002, "tags": {"kuma.io/service": "backend", "version": "v2"}},
        ])),
    );
    let b1 = dp("backend-1", "backend", "v1", None);
    let b2 = dp("backend-2", "backend", "v2", None);
    let allow_mesh = res(
        json!({"type": "MeshTrafficPermission", "mesh": "default", "name": "all",
        "spec": {"targetRef": {"kind": "Mesh"}, "from": [
            {"targetRef": {"kind": "Mesh"}, "default": {"action": "Allow"}},
            {"targetRef": {"kind": "MeshService", "name": "attacker"}, "default": {"action": "Deny"}}]}}),
    );
    let least = res(
        json!({"type": "MeshLoadBalancingStrategy", "mesh": "default", "name": "lr",
        "spec": {"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "MeshService", "name": "backend"},
        "default": {"loadBalancer": {"type": "LeastRequest"}}}]}}),
    );
    let v = view(&[web.clone(), b1, b2], &[allow_mesh, least]);
    let c = compile(&v, &web);
    assert_eq!(c.mtls_mode, i32::from(MtlsMode::Disabled));
    let rules = &c.inbounds[0].rules;
    assert_eq!(rules.len(), 2);
    assert_eq!(
        rules[0].from.as_ref().unwrap().name,
        "attacker",
        "most specific first"
    );
    assert_eq!(rules[0].action, i32::from(PbAction::Deny));
    assert_eq!(rules[1].action, i32::from(PbAction::Allow));
    assert_eq!(c.outbounds.len(), 2);
    assert_eq!(c.outbounds[0].endpoints.len(), 2, "all backends");
    assert_eq!(c.outbounds[1].endpoints.len(), 1, "only version v2");
    assert_eq!(c.outbounds[1].endpoints[0].tags["version"], "v2");
    assert!(
        c.outbounds
            .iter()
            .all(|o| o.lb == i32::from(LoadBalancer::LeastRequest))
    );

    // Same input, same version; a change gives a new version and a delta that rebuilds it.
    assert_eq!(version_of(&c), version_of(&compile(&v, &web)));
    let v2 = view(&[web.clone(), dp("backend-1", "backend", "v1", None)], &[]);
    let c2 = compile(&v2, &web);
    assert_ne!(version_of(&c), version_of(&c2));
    let d = delta(&version_of(&c), &c, &c2);
    assert_eq!(apply_delta(&c, &d), c2);
    assert_eq!(d.upsert_inbounds.len(), 1, "the rules went away");
    assert_eq!(
        d.upsert_outbounds.len(),
        2,
        "endpoints and balancer changed on both"
    );
    assert!(d.remove_inbounds.is_empty() && d.remove_outbounds.is_empty());
}

#[test]
fn the_mesh_transport_reaches_the_config_and_its_delta() {
    let web = dp("web-1", "web", "v1", None);
    let mut v = view(std::slice::from_ref(&web), &[]);
    let tls = compile(&v, &web);
    assert_eq!(tls.transport(), Transport::Tls);
    v.mesh = res(json!({"type": "Mesh", "name": "default", "networking": {"transport": "auto"}}));
    let auto = compile(&v, &web);
    assert_eq!(auto.transport(), Transport::Auto);
    let d = delta("v1", &tls, &auto);
    assert_eq!(d.transport, Some(Transport::Auto as i32));
    assert_eq!(apply_delta(&tls, &d), auto);
    assert_eq!(delta("v2", &auto, &auto).transport, None);
}
