//! The dataplane's configuration as domain types.
//!
//! Wire types stop here: a `weft.v1` config or delta is converted on arrival with `TryFrom`
//! (which is where the reasons for a NACK come from) and nothing past this module sees prost
//! types. The same types are served as JSON on `/config` and persisted to `config.json`, so
//! the dataplane can serve its last config before the control plane is reachable.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};
use weft_api::v1;

#[cfg(test)]
mod tests;

/// Why a config from the control plane cannot be applied (the text of the NACK).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A field has a value the dataplane cannot use.
    #[error("{field}: {message}")]
    Invalid {
        /// Path of the field, e.g. `inbounds[0].port`.
        field: String,
        /// Why.
        message: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A config version the dataplane applied: what `/config` serves and `config.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// The control plane's opaque version string.
    pub version: String,
    /// The config at that version.
    pub config: DataplaneConfig,
}

/// Everything the dataplane needs to serve its inbounds and outbounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneConfig {
    /// The mesh.
    pub mesh: String,
    /// The Dataplane resource's name.
    pub dataplane_name: String,
    /// How inbound traffic must be secured.
    pub mtls_mode: MtlsMode,
    /// How outbounds reach other dataplanes with mTLS on (inbounds accept QUIC unless `Tls`).
    #[serde(default)]
    pub transport: Transport,
    /// Every root trusted in the mesh (PEM); empty without mTLS.
    pub trust_bundle_pem: String,
    /// The root that signs new certificates (PEM); empty without mTLS.
    pub signing_ca_pem: String,
    /// Inbounds, sorted by port (unique).
    pub inbounds: Vec<Inbound>,
    /// Outbounds, sorted by address and port (unique).
    pub outbounds: Vec<Outbound>,
    /// Policies not modelled yet, by name.
    pub policies: BTreeMap<String, serde_json::Value>,
}

/// The mesh's mTLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Only mTLS from verified mesh identities.
    Strict,
    /// Inbounds also accept plain traffic; outbounds use mTLS.
    Permissive,
    /// No mTLS.
    Disabled,
}

/// The transport between dataplanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TLS over TCP, a connection per proxied connection.
    #[default]
    Tls,
    /// QUIC: one connection per peer, a stream per proxied connection.
    Quic,
    /// QUIC, with pooled TLS for peers UDP does not reach.
    Auto,
    /// TLS over TCP, one connection per peer carrying a stream per proxied connection.
    Pooled,
}

impl MtlsMode {
    /// Whether the dataplane needs a certificate in this mode.
    pub fn needs_certificate(self) -> bool {
        !matches!(self, MtlsMode::Disabled)
    }
}

/// A service instance the dataplane exposes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inbound {
    /// The dataplane's listening port.
    pub port: u16,
    /// The local service's address.
    pub service_address: IpAddr,
    /// The local service's port.
    pub service_port: u16,
    /// The inbound's tags.
    pub tags: BTreeMap<String, String>,
    /// Permission rules, most specific first.
    pub rules: Vec<PermissionRule>,
}

/// One traffic permission rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PermissionRule {
    /// Which clients it matches.
    pub from: TargetRef,
    /// What it does with them.
    pub action: Action,
    /// The MeshTrafficPermission it came from.
    pub policy: String,
}

/// A reference to a set of dataplanes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// `Mesh`, `MeshService`, `MeshSubset`, ...
    pub kind: String,
    /// The referenced resource, when the kind names one.
    pub name: String,
    /// Tags to match, when the kind selects by tags.
    pub tags: BTreeMap<String, String>,
}

/// What a permission rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Let the client through.
    Allow,
    /// Refuse the client.
    Deny,
    /// Let the client through, logging that a deny would have matched.
    AllowWithShadowDeny,
}

/// A service the dataplane may reach.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outbound {
    /// Local listening address.
    pub address: IpAddr,
    /// Local listening port.
    pub port: u16,
    /// The destination's `kuma.io/service`.
    pub service: String,
    /// How requests are spread over the endpoints.
    pub lb: LoadBalancer,
    /// The destination's instances.
    pub endpoints: Vec<Endpoint>,
}

impl Outbound {
    /// The outbound's key in deltas.
    pub fn key(&self) -> (IpAddr, u16) {
        (self.address, self.port)
    }
}

/// A load-balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoadBalancer {
    /// Each endpoint in turn.
    RoundRobin,
    /// Fewest outstanding requests among a random few.
    LeastRequest,
}

/// One instance of a destination service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Its dataplane's address (IP or host name).
    pub address: String,
    /// Its inbound port.
    pub port: u16,
    /// Whether its inbound reports ready.
    pub healthy: bool,
    /// Its zone; empty in a single zone.
    pub zone: String,
    /// Its inbound tags.
    pub tags: BTreeMap<String, String>,
}

fn port(field: impl Into<String>, p: u32) -> Result<u16> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field, format!("{p} is not a valid port (1-65535)")))
}

fn ip_or_loopback(field: impl Into<String>, s: &str) -> Result<IpAddr> {
    if s.is_empty() {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    s.parse()
        .map_err(|_| invalid(field, format!("{s:?} is not an IP address")))
}

/// Checks that `pem` is a non-empty sequence of PEM certificates.
pub fn check_certificates(field: &str, pem: &str) -> Result<()> {
    let mut count = 0;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| invalid(field, format!("not PEM: {e}")))?;
        if block.label != "CERTIFICATE" {
            return Err(invalid(
                field,
                format!("holds a {:?} block, not a CERTIFICATE", block.label),
            ));
        }
        block
            .parse_x509()
            .map_err(|e| invalid(field, format!("certificate {count} does not parse: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(invalid(field, "holds no PEM certificate"));
    }
    Ok(())
}

fn mtls_mode(field: &str, raw: i32) -> Result<MtlsMode> {
    use v1::dataplane_config::MtlsMode as W;
    match W::try_from(raw) {
        Ok(W::Strict) => Ok(MtlsMode::Strict),
        Ok(W::Permissive) => Ok(MtlsMode::Permissive),
        Ok(W::Disabled) => Ok(MtlsMode::Disabled),
        Err(_) => Err(invalid(field, format!("unknown mTLS mode {raw}"))),
    }
}

fn transport(field: &str, raw: i32) -> Result<Transport> {
    use v1::dataplane_config::Transport as W;
    match W::try_from(raw) {
        Ok(W::Tls) => Ok(Transport::Tls),
        Ok(W::Quic) => Ok(Transport::Quic),
        Ok(W::Auto) => Ok(Transport::Auto),
        Ok(W::Pooled) => Ok(Transport::Pooled),
        Err(_) => Err(invalid(field, format!("unknown transport {raw}"))),
    }
}

fn policy(field: &str, json: &str) -> Result<serde_json::Value> {
    serde_json::from_str(json).map_err(|e| invalid(field, format!("not JSON: {e}")))
}

fn outbound_key(field: &str, key: &str) -> Result<(IpAddr, u16)> {
    let bad = || invalid(field, format!("{key:?} is not an address:port key"));
    let (addr, p) = key.rsplit_once(':').ok_or_else(bad)?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    let p: u32 = p.parse().map_err(|_| bad())?;
    Ok((ip_or_loopback(field, addr)?, port(field, p)?))
}

/// Converts one inbound, naming fields under `base` (e.g. `inbounds[2]`).
pub fn inbound(base: &str, w: v1::Inbound) -> Result<Inbound> {
    let rules = w
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            use v1::permission_rule::Action as W;
            let action = match W::try_from(r.action) {
                Ok(W::Allow) => Action::Allow,
                Ok(W::Deny) => Action::Deny,
                Ok(W::AllowWithShadowDeny) => Action::AllowWithShadowDeny,
                Err(_) => {
                    return Err(invalid(
                        format!("{base}.rules[{i}].action"),
                        format!("unknown action {}", r.action),
                    ));
                }
            };
            let from = r
                .from
                .ok_or_else(|| invalid(format!("{base}.rules[{i}].from"), "is required"))?;
            Ok(PermissionRule {
                from: TargetRef {
                    kind: from.kind,
                    name: from.name,
                    tags: from.tags.into_iter().collect(),
                },
                action,
                policy: r.policy,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Inbound {
        port: port(format!("{base}.port"), w.port)?,
        service_address: ip_or_loopback(format!("{base}.serviceAddress"), &w.service_address)?,
        service_port: port(format!("{base}.servicePort"), w.service_port)?,
        tags: w.tags.into_iter().collect(),
        rules,
    })
}

/// Converts one outbound, naming fields under `base` (e.g. `outbounds[0]`).
pub fn outbound(base: &str, w: v1::Outbound) -> Result<Outbound> {
    use v1::outbound::LoadBalancer as W;
    let lb = match W::try_from(w.lb) {
        Ok(W::RoundRobin) => LoadBalancer::RoundRobin,
        Ok(W::LeastRequest) => LoadBalancer::LeastRequest,
        Err(_) => {
            return Err(invalid(
                format!("{base}.lb"),
                format!("unknown load balancer {}", w.lb),
            ));
        }
    };
    if w.service.is_empty() {
        return Err(invalid(format!("{base}.service"), "is required"));
    }
    let endpoints = w
        .endpoints
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            if e.address.is_empty() {
                return Err(invalid(
                    format!("{base}.endpoints[{i}].address"),
                    "is required",
                ));
            }
            Ok(Endpoint {
                port: port(format!("{base}.endpoints[{i}].port"), e.port)?,
                address: e.address,
                healthy: e.healthy,
                zone: e.zone,
                tags: e.tags.into_iter().collect(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Outbound {
        address: ip_or_loopback(format!("{base}.address"), &w.address)?,
        port: port(format!("{base}.port"), w.port)?,
        service: w.service,
        lb,
        endpoints,
    })
}

impl TryFrom<v1::DataplaneConfig> for DataplaneConfig {
    type Error = Error;

    fn try_from(w: v1::DataplaneConfig) -> Result<Self> {
        let mut inbounds = BTreeMap::new();
        for (i, raw) in w.inbounds.into_iter().enumerate() {
            let ib = inbound(&format!("inbounds[{i}]"), raw)?;
            if inbounds.contains_key(&ib.port) {
                return Err(invalid(
                    format!("inbounds[{i}].port"),
                    format!("duplicate inbound port {}", ib.port),
                ));
            }
            inbounds.insert(ib.port, ib);
        }
        let mut outbounds = BTreeMap::new();
        for (i, raw) in w.outbounds.into_iter().enumerate() {
            let ob = outbound(&format!("outbounds[{i}]"), raw)?;
            if outbounds.contains_key(&ob.key()) {
                return Err(invalid(
                    format!("outbounds[{i}]"),
                    format!("duplicate outbound {}:{}", ob.address, ob.port),
                ));
            }
            outbounds.insert(ob.key(), ob);
        }
        let policies = w
            .policies_json
            .into_iter()
            .map(|(name, json)| Ok((name.clone(), policy(&format!("policies.{name}"), &json)?)))
            .collect::<Result<_>>()?;
        let config = DataplaneConfig {
            mesh: w.mesh,
            dataplane_name: w.dataplane_name,
            mtls_mode: mtls_mode("mtlsMode", w.mtls_mode)?,
            transport: transport("transport", w.transport)?,
            trust_bundle_pem: w.trust_bundle_pem,
            signing_ca_pem: w.signing_ca_pem,
            inbounds: inbounds.into_values().collect(),
            outbounds: outbounds.into_values().collect(),
            policies,
        };
        config.check()?;
        Ok(config)
    }
}

impl DataplaneConfig {
    /// Checks what spans fields: the PEM material.
    fn check(&self) -> Result<()> {
        if !self.trust_bundle_pem.is_empty() {
            check_certificates("trustBundlePem", &self.trust_bundle_pem)?;
        }
        if !self.signing_ca_pem.is_empty() {
            check_certificates("signingCaPem", &self.signing_ca_pem)?;
        }
        if self.mtls_mode.needs_certificate() && self.trust_bundle_pem.is_empty() {
            return Err(invalid(
                "trustBundlePem",
                "is required when mTLS is on (mtlsMode STRICT or PERMISSIVE)",
            ));
        }
        Ok(())
    }

    /// The config after `delta`: removals first, then upserts, then optional fields that are
    /// present replace. The base version is the caller's to check.
    pub fn apply_delta(&self, delta: v1::ConfigDelta) -> Result<DataplaneConfig> {
        let mut inbounds: BTreeMap<u16, Inbound> =
            self.inbounds.iter().map(|i| (i.port, i.clone())).collect();
        let mut outbounds: BTreeMap<(IpAddr, u16), Outbound> = self
            .outbounds
            .iter()
            .map(|o| (o.key(), o.clone()))
            .collect();
        let mut policies = self.policies.clone();

        for (i, p) in delta.remove_inbounds.into_iter().enumerate() {
            let field = format!("removeInbounds[{i}]");
            let p = port(&field, p)?;
            if inbounds.remove(&p).is_none() {
                return Err(invalid(field, format!("no inbound on port {p} to remove")));
            }
        }
        for (i, key) in delta.remove_outbounds.into_iter().enumerate() {
            let field = format!("removeOutbounds[{i}]");
            let k = outbound_key(&field, &key)?;
            if outbounds.remove(&k).is_none() {
                return Err(invalid(field, format!("no outbound {key} to remove")));
            }
        }
        for (i, name) in delta.remove_policies.into_iter().enumerate() {
            if policies.remove(&name).is_none() {
                return Err(invalid(
                    format!("removePolicies[{i}]"),
                    format!("no policy {name:?} to remove"),
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, raw) in delta.upsert_inbounds.into_iter().enumerate() {
            let ib = inbound(&format!("upsertInbounds[{i}]"), raw)?;
            if !seen.insert(ib.port) {
                return Err(invalid(
                    format!("upsertInbounds[{i}].port"),
                    format!("duplicate inbound port {}", ib.port),
                ));
            }
            inbounds.insert(ib.port, ib);
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, raw) in delta.upsert_outbounds.into_iter().enumerate() {
            let ob = outbound(&format!("upsertOutbounds[{i}]"), raw)?;
            if !seen.insert(ob.key()) {
                return Err(invalid(
                    format!("upsertOutbounds[{i}]"),
                    format!("duplicate outbound {}:{}", ob.address, ob.port),
                ));
            }
            outbounds.insert(ob.key(), ob);
        }
        for (name, json) in delta.upsert_policies_json {
            let v = policy(&format!("upsertPoliciesJson.{name}"), &json)?;
            policies.insert(name, v);
        }
        let config = DataplaneConfig {
            mesh: self.mesh.clone(),
            dataplane_name: self.dataplane_name.clone(),
            mtls_mode: match delta.mtls_mode {
                Some(raw) => mtls_mode("mtlsMode", raw)?,
                None => self.mtls_mode,
            },
            transport: match delta.transport {
                Some(raw) => transport("transport", raw)?,
                None => self.transport,
            },
            trust_bundle_pem: delta
                .trust_bundle_pem
                .unwrap_or_else(|| self.trust_bundle_pem.clone()),
            signing_ca_pem: delta
                .signing_ca_pem
                .unwrap_or_else(|| self.signing_ca_pem.clone()),
            inbounds: inbounds.into_values().collect(),
            outbounds: outbounds.into_values().collect(),
            policies,
        };
        config.check()?;
        Ok(config)
    }
}
