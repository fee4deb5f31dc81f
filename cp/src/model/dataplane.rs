//! The `Dataplane` resource: one proxy, its inbounds (the service it fronts) and outbounds.
//!
//! Tags are kept as written (for an exact round trip); their normalised form, with `weft.io/`
//! keys spelled `kuma.io/`, is computed at parse time and served by [`Inbound::tags`],
//! [`Outbound::tags`] and [`DataplaneSpec::inbound_tags`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::validate::{
    Errors, SERVICE_TAG, check_address, check_ip, check_object, check_port,
    check_positive_duration, check_tags,
};

/// The flat fields of a `Dataplane`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataplaneSpec {
    /// Addresses, inbounds, outbounds.
    pub networking: Networking,
    /// Kuma's virtual probes (kept opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<serde_json::Value>,
    /// Kuma's per-dataplane metrics (kept opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
}

/// `networking`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Networking {
    /// The dataplane's address (IP or hostname).
    pub address: String,
    /// The address other dataplanes use, when NAT is in the way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_address: Option<String>,
    /// The port other dataplanes use, when NAT is in the way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_port: Option<i64>,
    /// Services this dataplane fronts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Vec<Inbound>>,
    /// Services this dataplane's application calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<Vec<Outbound>>,
    /// Transparent proxying (iptables redirection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transparent_proxying: Option<TransparentProxying>,
    /// The proxy's admin listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    /// Gateways are not supported by weft; accepted by the parser only to refuse them clearly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<serde_json::Value>,
}

/// One inbound: a port of the local service exposed to the mesh.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Inbound {
    /// The port the proxy listens on.
    pub port: i64,
    /// The application's port (defaults to `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_port: Option<i64>,
    /// The application's address (defaults to 127.0.0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_address: Option<String>,
    /// The address the proxy listens on (defaults to `networking.address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Optional inbound name, usable as a `sectionName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tags as written; must contain `kuma.io/service` (or `weft.io/service`).
    #[serde(default, rename = "tags", skip_serializing_if = "Option::is_none")]
    pub raw_tags: Option<BTreeMap<String, String>>,
    /// Health checking of the application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_probe: Option<ServiceProbe>,
    /// Readiness set by the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<InboundState>,
    /// Kuma's deprecated `health` (kept opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<serde_json::Value>,
    #[serde(skip)]
    tags: BTreeMap<String, String>,
}

/// `serviceProbe`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceProbe {
    /// Time between probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Time a probe may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Failures before unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<i64>,
    /// Successes before healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<i64>,
    /// TCP probe (the only kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
}

/// `serviceProbe.tcp`: no fields.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {}

/// Inbound readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InboundState {
    /// Serving.
    Ready,
    /// Not serving (not load-balanced to).
    NotReady,
    /// Ignored entirely.
    Ignored,
}

/// One outbound: a local port forwarding to a mesh service.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Outbound {
    /// Local port.
    pub port: i64,
    /// Local address (defaults to 127.0.0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Destination by tags as written (must contain `kuma.io/service`).
    #[serde(default, rename = "tags", skip_serializing_if = "Option::is_none")]
    pub raw_tags: Option<BTreeMap<String, String>>,
    /// Destination by reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_ref: Option<BackendRef>,
    #[serde(skip)]
    tags: BTreeMap<String, String>,
}

/// `backendRef` of an outbound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    /// Kind of the referenced resource.
    pub kind: BackendRefKind,
    /// Its name.
    pub name: String,
    /// Its port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
}

/// Kinds an outbound `backendRef` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendRefKind {
    /// A `MeshService`.
    MeshService,
}

/// `transparentProxying`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TransparentProxying {
    /// Port inbound traffic is redirected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_port_inbound: Option<i64>,
    /// Port outbound traffic is redirected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_port_outbound: Option<i64>,
    /// Deprecated IPv6 inbound port.
    #[serde(
        default,
        rename = "redirectPortInboundV6",
        skip_serializing_if = "Option::is_none"
    )]
    pub redirect_port_inbound_v6: Option<i64>,
    /// IP families redirected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_family_mode: Option<IpFamilyMode>,
    /// Services reachable from this dataplane (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable_services: Option<Vec<String>>,
    /// Kuma's reachable backends (kept opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable_backends: Option<serde_json::Value>,
    /// Services reached directly, bypassing the proxy's listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_access_services: Option<Vec<String>>,
}

/// `transparentProxying.ipFamilyMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IpFamilyMode {
    /// IPv4 and IPv6.
    DualStack,
    /// IPv4 only.
    #[serde(rename = "IPv4")]
    Ipv4,
    /// IPv6 only.
    #[serde(rename = "IPv6")]
    Ipv6,
}

/// `admin`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Admin {
    /// Admin port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
}

impl Inbound {
    /// Normalised tags (`weft.io/x` spelled `kuma.io/x`).
    pub fn tags(&self) -> &BTreeMap<String, String> {
        &self.tags
    }

    /// The `kuma.io/service` tag.
    pub fn service(&self) -> Option<&str> {
        self.tags.get(SERVICE_TAG).map(String::as_str)
    }
}

impl Outbound {
    /// Normalised tags (`weft.io/x` spelled `kuma.io/x`); empty for a `backendRef` outbound.
    pub fn tags(&self) -> &BTreeMap<String, String> {
        &self.tags
    }

    /// The effective local address.
    pub fn effective_address(&self) -> &str {
        self.address.as_deref().unwrap_or("127.0.0.1")
    }
}

impl DataplaneSpec {
    /// Every inbound's tags, normalised (`weft.io/x` keys become `kuma.io/x`).
    pub fn inbound_tags(&self) -> impl Iterator<Item = &BTreeMap<String, String>> {
        self.inbounds().iter().map(Inbound::tags)
    }

    /// The inbounds (empty when none).
    pub fn inbounds(&self) -> &[Inbound] {
        self.networking.inbound.as_deref().unwrap_or_default()
    }

    /// The outbounds (empty when none).
    pub fn outbounds(&self) -> &[Outbound] {
        self.networking.outbound.as_deref().unwrap_or_default()
    }

    /// The `kuma.io/service` of each inbound, deduplicated, in inbound order.
    pub fn services(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in self.inbounds().iter().filter_map(Inbound::service) {
            if !out.iter().any(|o| o == s) {
                out.push(s.to_owned());
            }
        }
        out
    }

    /// Validates, and fills in the normalised tags.
    pub(crate) fn validate(&mut self, errs: &mut Errors) {
        let net = &mut self.networking;
        if net.address.is_empty() {
            errs.add("networking.address", "is required");
        } else {
            check_address("networking.address", &net.address, errs);
        }
        if let Some(a) = &net.advertised_address {
            check_address("networking.advertisedAddress", a, errs);
        }
        if let Some(p) = net.advertised_port {
            check_port("networking.advertisedPort", p, errs);
        }
        if net.gateway.is_some() {
            errs.add("networking.gateway", "gateways are not supported by weft");
        }
        let inbounds = net.inbound.as_deref_mut().unwrap_or_default();
        if inbounds.is_empty() {
            errs.add("networking.inbound", "at least one inbound is required");
        }
        let default_addr = net.address.clone();
        let mut used: BTreeSet<(String, i64)> = BTreeSet::new();
        for (i, ib) in inbounds.iter_mut().enumerate() {
            let base = format!("networking.inbound[{i}]");
            check_port(&format!("{base}.port"), ib.port, errs);
            if let Some(p) = ib.service_port {
                check_port(&format!("{base}.servicePort"), p, errs);
            }
            if let Some(a) = &ib.service_address {
                check_ip(&format!("{base}.serviceAddress"), a, errs);
            }
            if let Some(a) = &ib.address {
                check_ip(&format!("{base}.address"), a, errs);
            }
            let addr = ib.address.clone().unwrap_or_else(|| default_addr.clone());
            if !used.insert((addr, ib.port)) {
                errs.add(
                    format!("{base}.port"),
                    format!("port {} is already used by another inbound", ib.port),
                );
            }
            let tag_path = format!("{base}.tags");
            match &ib.raw_tags {
                None => errs.add(&tag_path, "is required"),
                Some(raw) => {
                    ib.tags = check_tags(&tag_path, raw, errs);
                    if !ib.tags.contains_key(SERVICE_TAG) {
                        errs.add(&tag_path, "tag kuma.io/service is required");
                    }
                }
            }
            if let Some(p) = &ib.service_probe {
                let pb = format!("{base}.serviceProbe");
                if let Some(d) = &p.interval {
                    check_positive_duration(&format!("{pb}.interval"), d, errs);
                }
                if let Some(d) = &p.timeout {
                    check_positive_duration(&format!("{pb}.timeout"), d, errs);
                }
                for (n, v) in [
                    ("unhealthyThreshold", p.unhealthy_threshold),
                    ("healthyThreshold", p.healthy_threshold),
                ] {
                    if v.is_some_and(|v| v < 1) {
                        errs.add(format!("{pb}.{n}"), "must be at least 1");
                    }
                }
            }
            if let Some(h) = &ib.health {
                check_object(&format!("{base}.health"), h, errs);
            }
        }
        let inbound_ports: BTreeSet<(String, i64)> = used;
        let mut out_used: BTreeSet<(String, i64)> = BTreeSet::new();
        for (i, ob) in net
            .outbound
            .as_deref_mut()
            .unwrap_or_default()
            .iter_mut()
            .enumerate()
        {
            let base = format!("networking.outbound[{i}]");
            check_port(&format!("{base}.port"), ob.port, errs);
            if let Some(a) = &ob.address {
                check_ip(&format!("{base}.address"), a, errs);
            }
            let addr = ob.effective_address().to_owned();
            if !out_used.insert((addr.clone(), ob.port)) {
                errs.add(
                    format!("{base}.port"),
                    format!(
                        "port {} on {addr} is already used by another outbound",
                        ob.port
                    ),
                );
            } else if inbound_ports.contains(&(addr.clone(), ob.port)) {
                errs.add(
                    format!("{base}.port"),
                    format!("port {} on {addr} is already used by an inbound", ob.port),
                );
            }
            match (&ob.raw_tags, &ob.backend_ref) {
                (Some(_), Some(_)) => errs.add(
                    base.clone(),
                    "exactly one of tags and backendRef must be set, not both",
                ),
                (None, None) => errs.add(base.clone(), "one of tags or backendRef is required"),
                (Some(raw), None) => {
                    let tag_path = format!("{base}.tags");
                    ob.tags = check_tags(&tag_path, raw, errs);
                    if !ob.tags.contains_key(SERVICE_TAG) {
                        errs.add(&tag_path, "tag kuma.io/service is required");
                    }
                }
                (None, Some(r)) => {
                    if r.name.is_empty() {
                        errs.add(format!("{base}.backendRef.name"), "is required");
                    }
                    if let Some(p) = r.port {
                        check_port(&format!("{base}.backendRef.port"), p, errs);
                    }
                }
            }
        }
        if let Some(tp) = &net.transparent_proxying {
            let b = "networking.transparentProxying";
            for (n, v) in [
                ("redirectPortInbound", tp.redirect_port_inbound),
                ("redirectPortOutbound", tp.redirect_port_outbound),
                ("redirectPortInboundV6", tp.redirect_port_inbound_v6),
            ] {
                if let Some(p) = v {
                    check_port(&format!("{b}.{n}"), p, errs);
                }
            }
            if let (Some(i), Some(o)) = (tp.redirect_port_inbound, tp.redirect_port_outbound) {
                if i == o {
                    errs.add(
                        format!("{b}.redirectPortOutbound"),
                        "must differ from redirectPortInbound",
                    );
                }
            }
            for (j, s) in tp.reachable_services.iter().flatten().enumerate() {
                if s.is_empty() {
                    errs.add(format!("{b}.reachableServices[{j}]"), "must not be empty");
                }
            }
        }
        if let Some(p) = net.admin.as_ref().and_then(|a| a.port) {
            check_port("networking.admin.port", p, errs);
        }
        for (n, v) in [("probes", &self.probes), ("metrics", &self.metrics)] {
            if let Some(v) = v {
                check_object(n, v, errs);
            }
        }
    }
}
