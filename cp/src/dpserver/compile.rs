//! Compiles one dataplane's config from its mesh's view, names each config by the hash of its
//! content, and computes the delta between two configs. Pure functions.

use std::collections::BTreeMap;

use prost::Message as _;
use weft_api::v1::{
    self as pb, ConfigDelta, DataplaneConfig, dataplane_config::MtlsMode,
    dataplane_config::Transport, outbound::LoadBalancer, permission_rule::Action as PbAction,
};

use crate::index::{EndpointInfo, MeshView};
use crate::model::Resource;
use crate::model::mesh::{MtlsMode as MeshMode, Transport as MeshTransport};
use crate::model::policy::{Action, LbType, TargetRef, lb_for_outbound, mtp_rules_for_inbound};

#[cfg(test)]
mod tests;

/// The tag naming an inbound's or outbound's service (tags are normalised to `kuma.io/`).
const SERVICE_TAG: &str = "kuma.io/service";

/// The config of dataplane `dp` of the mesh `view` describes.
pub fn compile(view: &MeshView, dp: &Resource) -> DataplaneConfig {
    let mtls_mode = match view.cas.as_ref().map(|c| c.mode) {
        None => MtlsMode::Disabled,
        Some(MeshMode::Strict) => MtlsMode::Strict,
        Some(MeshMode::Permissive) => MtlsMode::Permissive,
    };
    let transport = match view
        .mesh
        .mesh_spec()
        .map(|m| m.transport())
        .unwrap_or_default()
    {
        MeshTransport::Tls => Transport::Tls,
        MeshTransport::Quic => Transport::Quic,
        MeshTransport::Auto => Transport::Auto,
        MeshTransport::Pooled => Transport::Pooled,
    };
    let mtps: Vec<&Resource> = view.mtps.iter().map(AsRef::as_ref).collect();
    let mlbs: Vec<&Resource> = view.mlbs.iter().map(AsRef::as_ref).collect();
    let spec = dp.dataplane();
    let mut inbounds: Vec<pb::Inbound> = spec
        .map(|d| d.inbounds())
        .unwrap_or_default()
        .iter()
        .filter_map(|ib| {
            let port = u32::try_from(ib.port).ok()?;
            let perms = mtp_rules_for_inbound(dp, ib.tags(), &mtps);
            Some(pb::Inbound {
                port,
                service_address: ib
                    .service_address
                    .clone()
                    .unwrap_or_else(|| "127.0.0.1".to_owned()),
                service_port: ib
                    .service_port
                    .and_then(|p| u32::try_from(p).ok())
                    .unwrap_or(port),
                tags: ib.tags().clone(),
                // The dataplane takes the first match: most specific first.
                rules: perms
                    .entries
                    .iter()
                    .rev()
                    .map(|e| pb::PermissionRule {
                        from: Some(target_ref(&e.from)),
                        action: match e.action {
                            Action::Allow => PbAction::Allow,
                            Action::Deny => PbAction::Deny,
                            Action::AllowWithShadowDeny => PbAction::AllowWithShadowDeny,
                        }
                        .into(),
                        policy: e.policy.clone(),
                    })
                    .collect(),
            })
        })
        .collect();
    let mut outbounds: Vec<pb::Outbound> = spec
        .map(|d| d.outbounds())
        .unwrap_or_default()
        .iter()
        .filter_map(|ob| {
            let port = u32::try_from(ob.port).ok()?;
            let (service, subset) = match (&ob.backend_ref, ob.tags().get(SERVICE_TAG)) {
                (Some(r), _) => (r.name.clone(), BTreeMap::new()),
                (None, Some(s)) => (s.clone(), ob.tags().clone()),
                (None, None) => return None,
            };
            let endpoints = view
                .endpoints
                .get(&service)
                .map(|list| {
                    list.iter()
                        .filter(|e| subset.iter().all(|(k, v)| e.tags.get(k) == Some(v)))
                        .map(endpoint)
                        .collect()
                })
                .unwrap_or_default();
            let lb = match lb_for_outbound(dp, &service, &mlbs) {
                Some(LbType::LeastRequest) => LoadBalancer::LeastRequest,
                // RingHash, Maglev and Random are not implemented yet (the policy warns).
                _ => LoadBalancer::RoundRobin,
            };
            Some(pb::Outbound {
                port,
                address: ob.effective_address().to_owned(),
                service,
                endpoints,
                lb: lb.into(),
            })
        })
        .collect();
    // Keyed order, the order the dataplane keeps them in after applying a delta.
    inbounds.sort_by_key(|i| i.port);
    inbounds.dedup_by_key(|i| i.port);
    outbounds.sort_by_key(outbound_key);
    outbounds.dedup_by_key(|o| outbound_key(o));
    DataplaneConfig {
        mesh: dp.mesh.clone().unwrap_or_default(),
        dataplane_name: dp.name.clone(),
        mtls_mode: mtls_mode.into(),
        transport: transport.into(),
        trust_bundle_pem: view
            .cas
            .as_ref()
            .map(|c| c.bundle_pem.clone())
            .unwrap_or_default(),
        inbounds,
        outbounds,
        policies_json: BTreeMap::new(),
        signing_ca_pem: view
            .cas
            .as_ref()
            .map(|c| c.signing.cert_pem().to_owned())
            .unwrap_or_default(),
    }
}

fn target_ref(t: &TargetRef) -> pb::TargetRef {
    pb::TargetRef {
        kind: serde_json::to_value(t.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        name: t.name.clone().unwrap_or_default(),
        tags: t.tags().clone(),
    }
}

fn endpoint(e: &EndpointInfo) -> pb::Endpoint {
    pb::Endpoint {
        address: e.address.clone(),
        port: e.port,
        healthy: e.healthy,
        zone: e.zone.clone(),
        tags: e.tags.clone(),
    }
}

/// The version of a config: a hash of its (deterministic) encoding, so that the same config
/// always has the same version, across reconnects and CP restarts.
pub fn version_of(config: &DataplaneConfig) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, &config.encode_to_vec());
    digest.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn outbound_key(o: &pb::Outbound) -> String {
    format!("{}:{}", o.address, o.port)
}

/// What changed from `base` (at `base_version`) to `next`.
pub fn delta(base_version: &str, base: &DataplaneConfig, next: &DataplaneConfig) -> ConfigDelta {
    let changed = |a: &String, b: &String| (a != b).then(|| b.clone());
    let base_in: BTreeMap<u32, &pb::Inbound> = base.inbounds.iter().map(|i| (i.port, i)).collect();
    let next_in: BTreeMap<u32, &pb::Inbound> = next.inbounds.iter().map(|i| (i.port, i)).collect();
    let base_out: BTreeMap<String, &pb::Outbound> = base
        .outbounds
        .iter()
        .map(|o| (outbound_key(o), o))
        .collect();
    let next_out: BTreeMap<String, &pb::Outbound> = next
        .outbounds
        .iter()
        .map(|o| (outbound_key(o), o))
        .collect();
    ConfigDelta {
        base_version: base_version.to_owned(),
        mtls_mode: (base.mtls_mode != next.mtls_mode).then_some(next.mtls_mode),
        transport: (base.transport != next.transport).then_some(next.transport),
        trust_bundle_pem: changed(&base.trust_bundle_pem, &next.trust_bundle_pem),
        signing_ca_pem: changed(&base.signing_ca_pem, &next.signing_ca_pem),
        upsert_inbounds: next_in
            .iter()
            .filter(|(p, i)| base_in.get(p) != Some(i))
            .map(|(_, i)| (*i).clone())
            .collect(),
        remove_inbounds: base_in
            .keys()
            .filter(|p| !next_in.contains_key(p))
            .copied()
            .collect(),
        upsert_outbounds: next_out
            .iter()
            .filter(|(k, o)| base_out.get(*k) != Some(o))
            .map(|(_, o)| (*o).clone())
            .collect(),
        remove_outbounds: base_out
            .keys()
            .filter(|k| !next_out.contains_key(*k))
            .cloned()
            .collect(),
        upsert_policies_json: next
            .policies_json
            .iter()
            .filter(|(k, v)| base.policies_json.get(*k) != Some(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        remove_policies: base
            .policies_json
            .keys()
            .filter(|k| !next.policies_json.contains_key(*k))
            .cloned()
            .collect(),
    }
}

/// Applies `d` to `base`: what the dataplane does, here to test `delta` against.
#[cfg(test)]
pub(crate) fn apply_delta(base: &DataplaneConfig, d: &ConfigDelta) -> DataplaneConfig {
    let mut out = base.clone();
    if let Some(m) = d.mtls_mode {
        out.mtls_mode = m;
    }
    if let Some(t) = d.transport {
        out.transport = t;
    }
    if let Some(b) = &d.trust_bundle_pem {
        out.trust_bundle_pem = b.clone();
    }
    if let Some(s) = &d.signing_ca_pem {
        out.signing_ca_pem = s.clone();
    }
    let mut ins: BTreeMap<u32, pb::Inbound> = out.inbounds.drain(..).map(|i| (i.port, i)).collect();
    for p in &d.remove_inbounds {
        ins.remove(p);
    }
    for i in &d.upsert_inbounds {
        ins.insert(i.port, i.clone());
    }
    let mut outs: BTreeMap<String, pb::Outbound> = out
        .outbounds
        .drain(..)
        .map(|o| (outbound_key(&o), o))
        .collect();
    for k in &d.remove_outbounds {
        outs.remove(k);
    }
    for o in &d.upsert_outbounds {
        outs.insert(outbound_key(o), o.clone());
    }
    for k in &d.remove_policies {
        out.policies_json.remove(k);
    }
    out.policies_json.extend(
        d.upsert_policies_json
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    out.inbounds = ins.into_values().collect();
    out.outbounds = outs.into_values().collect();
    out
}
