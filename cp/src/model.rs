//! weft's resource model: Kuma 2.x universal resources, strictly parsed and validated.
//!
//! A document (YAML or JSON, already turned into a [`serde_json::Value`]) becomes a
//! [`Resource`] through [`Resource::from_json`], which refuses unknown fields and reports
//! every problem it finds with its field path (`networking.inbound[1].port`). Serde itself
//! stops at the first structural problem (unknown field, wrong type, unknown enum value), so
//! such a problem is reported alone; semantic problems are all collected.
//!
//! Tags: `weft.io/…` and `kuma.io/…` keys mean the same. Specs keep tags as written (so
//! [`Resource::to_json`] gives back exactly what was accepted) and also hold a normalised
//! copy, spelled `kuma.io/…`, which every accessor and all matching use.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

pub mod dataplane;
pub mod mesh;
pub mod policy;
mod validate;

pub use validate::{normalise_key, parse_duration};

#[cfg(test)]
mod tests;

pub use weft_api::kind::Kind;

pub use dataplane::{
    Admin, BackendRef, BackendRefKind, DataplaneSpec, Inbound, InboundState, IpFamilyMode,
    Networking, Outbound, ServiceProbe, TcpProbe, TransparentProxying,
};
pub use mesh::{
    BackendType, BuiltinConf, CaCert, Constraints, DataSource, DataplaneProxyConstraints, DpCert,
    MeshSpec, Mtls, MtlsBackend, MtlsMode, ProvidedConf, Rotation, TagsRule,
};
pub use policy::{
    Action, Decision, FromRule, InboundPermissions, LbType, LoadBalancerConf, MLBS_SECTIONS,
    MTP_SECTIONS, MlbsConf, MtpConf, MtpFrom, PermissionEntry, PolicyConf, PolicySpec, Rule,
    Sections, TargetRef, TargetRefKind, TargetRefPlace, ToRule, lb_for_outbound,
    mtp_rules_for_inbound,
};

use validate::{Errors, check_name, parse_at};

/// Fields the server adds to what it returns; ignored on input.
const SERVER_FIELDS: [&str; 3] = ["creationTime", "modificationTime", "resourceVersion"];

/// One problem in a resource, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// Path such as `networking.inbound[1].port`; empty for the document itself.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// A resource was refused; `causes` lists every problem found.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid resource: {}", list_causes(.causes))]
pub struct ValidationError {
    /// Every problem, in document order where possible.
    pub causes: Vec<FieldError>,
}

fn list_causes(causes: &[FieldError]) -> String {
    causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A validated resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// Its kind.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// Its mesh; `None` only for a `Mesh`.
    pub mesh: Option<String>,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// The kind-specific part.
    pub spec: Spec,
}

/// The kind-specific part of a resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// A `Mesh`'s flat fields.
    Mesh(MeshSpec),
    /// A `Dataplane`'s flat fields.
    Dataplane(DataplaneSpec),
    /// A `MeshTrafficPermission`'s `spec`.
    MeshTrafficPermission(PolicySpec<MtpConf>),
    /// A `MeshLoadBalancingStrategy`'s `spec`.
    MeshLoadBalancingStrategy(PolicySpec<MlbsConf>),
}

impl Resource {
    /// Strict parse + full validation of one resource document (already converted to JSON).
    /// Ignores the server fields `creationTime`, `modificationTime`, `resourceVersion`.
    /// Collects all problems, each with a field path like `networking.inbound[1].port`.
    pub fn from_json(value: &Value) -> Result<Resource, ValidationError> {
        let mut errs = Errors::default();
        let Some(obj) = value.as_object() else {
            errs.add("", "a resource must be an object");
            return Err(ValidationError { causes: errs.0 });
        };
        let mut rest: Map<String, Value> = obj.clone();
        for f in SERVER_FIELDS {
            rest.remove(f);
        }

        let kind = match rest.remove("type") {
            None => {
                errs.add("type", "is required");
                None
            }
            Some(Value::String(t)) => {
                let k = Kind::from_type_name(&t);
                if k.is_none() {
                    let known: Vec<&str> = Kind::ALL.iter().map(|k| k.type_name()).collect();
                    errs.add(
                        "type",
                        format!("unknown type '{t}' (known: {})", known.join(", ")),
                    );
                }
                k
            }
            Some(_) => {
                errs.add("type", "must be a string");
                None
            }
        };

        let name = match rest.remove("name") {
            Some(Value::String(n)) => {
                check_name("name", &n, &mut errs);
                n
            }
            Some(_) => {
                errs.add("name", "must be a string");
                String::new()
            }
            None => {
                errs.add("name", "is required");
                String::new()
            }
        };

        let mesh = match (rest.remove("mesh"), kind) {
            (Some(_), Some(Kind::Mesh)) => {
                errs.add("mesh", "must not be set on a Mesh");
                None
            }
            (None, Some(k)) if k.is_mesh_scoped() => {
                errs.add("mesh", "is required");
                None
            }
            (Some(Value::String(m)), _) => {
                check_name("mesh", &m, &mut errs);
                Some(m)
            }
            (Some(_), _) => {
                errs.add("mesh", "must be a string");
                None
            }
            (None, _) => None,
        };

        let labels = match rest.remove("labels") {
            None => BTreeMap::new(),
            Some(v) => match parse_at::<BTreeMap<String, String>>(&v, "labels") {
                Ok(l) => {
                    for k in l.keys() {
                        if k.is_empty() || k.chars().any(char::is_whitespace) {
                            errs.add(
                                format!("labels[\"{k}\"]"),
                                "label key must be non-empty and contain no whitespace",
                            );
                        }
                    }
                    l
                }
                Err(e) => {
                    errs.0.push(e);
                    BTreeMap::new()
                }
            },
        };

        let spec = match kind {
            None => None,
            Some(k) if k.is_policy() => {
                let spec_value = rest.remove("spec");
                for key in rest.keys() {
                    errs.add(key.clone(), "unknown field");
                }
                match spec_value {
                    None => {
                        errs.add("spec", "is required");
                        None
                    }
                    Some(v) => parse_policy(k, &v, &mut errs),
                }
            }
            Some(k) => parse_flat(k, Value::Object(rest), &mut errs),
        };

        match (kind, spec) {
            (Some(kind), Some(spec)) if errs.0.is_empty() => Ok(Resource {
                kind,
                name,
                mesh,
                labels,
                spec,
            }),
            _ => Err(ValidationError { causes: errs.0 }),
        }
    }

    /// The canonical JSON, in Kuma's shape: `type`, `name`, `mesh`, `labels` (omitted when
    /// empty), then the flat fields (Mesh, Dataplane) or `spec` (policies).
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("type".into(), Value::String(self.kind.type_name().into()));
        out.insert("name".into(), Value::String(self.name.clone()));
        if let Some(m) = &self.mesh {
            out.insert("mesh".into(), Value::String(m.clone()));
        }
        if !self.labels.is_empty() {
            let labels = self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            out.insert("labels".into(), Value::Object(labels));
        }
        let body = match &self.spec {
            Spec::Mesh(s) => serde_json::to_value(s),
            Spec::Dataplane(s) => serde_json::to_value(s),
            Spec::MeshTrafficPermission(s) => {
                serde_json::to_value(s).map(|v| serde_json::json!({ "spec": v }))
            }
            Spec::MeshLoadBalancingStrategy(s) => {
                serde_json::to_value(s).map(|v| serde_json::json!({ "spec": v }))
            }
        };
        // Serialising these plain structs (string keys, no custom serialisers) cannot fail.
        if let Ok(Value::Object(fields)) = body {
            out.extend(fields);
        }
        Value::Object(out)
    }

    /// Human-readable warnings about a valid but risky resource.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        match &self.spec {
            Spec::Mesh(m) => match m.enabled_backend() {
                None => w.push(format!(
                    "mesh '{}' has no mTLS: traffic between its dataplanes is plaintext and unauthenticated",
                    self.name
                )),
                Some(b) if b.effective_mode() == MtlsMode::Permissive => w.push(format!(
                    "mesh '{}' uses mTLS backend '{}' in PERMISSIVE mode: plaintext traffic is still accepted",
                    self.name, b.name
                )),
                Some(_) => {}
            },
            Spec::Dataplane(d) => {
                if d.inbounds().iter().any(|i| i.state == Some(InboundState::Ignored)) {
                    w.push(format!(
                        "dataplane '{}' has ignored inbounds: they receive no mesh traffic",
                        self.name
                    ));
                }
            }
            Spec::MeshTrafficPermission(p) => {
                if p.from_rules()
                    .iter()
                    .any(|r| r.default.action == Action::AllowWithShadowDeny)
                {
                    w.push(format!(
                        "MeshTrafficPermission '{}' uses AllowWithShadowDeny: traffic is allowed, denials are only logged",
                        self.name
                    ));
                }
            }
            Spec::MeshLoadBalancingStrategy(p) => {
                for (i, to) in p.to_rules().iter().enumerate() {
                    let d = &to.default;
                    if let Some(lb) = &d.load_balancer
                        && matches!(lb.lb_type, LbType::RingHash | LbType::Maglev | LbType::Random)
                    {
                        w.push(format!(
                            "MeshLoadBalancingStrategy '{}' spec.to[{i}]: {:?} is not implemented by weft-dp yet; it balances round robin",
                            self.name, lb.lb_type
                        ));
                    }
                    if d.locality_awareness.is_some() || d.hash_policies.is_some() {
                        w.push(format!(
                            "MeshLoadBalancingStrategy '{}' spec.to[{i}]: localityAwareness and hashPolicies are kept but not applied yet",
                            self.name
                        ));
                    }
                }
            }
        }
        w
    }

    /// The `default` mesh weft creates on first start: builtin CA backend `ca-1`, enabled,
    /// mode STRICT.
    pub fn default_mesh() -> Resource {
        Resource {
            kind: Kind::Mesh,
            name: "default".into(),
            mesh: None,
            labels: BTreeMap::new(),
            spec: Spec::Mesh(MeshSpec {
                mtls: Some(Mtls {
                    enabled_backend: Some("ca-1".into()),
                    backends: Some(vec![MtlsBackend {
                        name: "ca-1".into(),
                        backend_type: BackendType::Builtin,
                        dp_cert: None,
                        conf: None,
                        mode: Some(MtlsMode::Strict),
                    }]),
                    skip_validation: None,
                }),
                ..MeshSpec::default()
            }),
        }
    }

    /// The Dataplane spec, if this is a Dataplane.
    pub fn dataplane(&self) -> Option<&DataplaneSpec> {
        match &self.spec {
            Spec::Dataplane(d) => Some(d),
            _ => None,
        }
    }

    /// The Mesh spec, if this is a Mesh.
    pub fn mesh_spec(&self) -> Option<&MeshSpec> {
        match &self.spec {
            Spec::Mesh(m) => Some(m),
            _ => None,
        }
    }

    /// The MeshTrafficPermission spec, if this is one.
    pub fn mtp_spec(&self) -> Option<&PolicySpec<MtpConf>> {
        match &self.spec {
            Spec::MeshTrafficPermission(p) => Some(p),
            _ => None,
        }
    }
}

fn parse_flat(kind: Kind, body: Value, errs: &mut Errors) -> Option<Spec> {
    match kind {
        Kind::Mesh => match parse_at::<MeshSpec>(&body, "") {
            Ok(m) => {
                m.validate(errs);
                Some(Spec::Mesh(m))
            }
            Err(e) => {
                errs.0.push(e);
                None
            }
        },
        Kind::Dataplane => match parse_at::<DataplaneSpec>(&body, "") {
            Ok(mut d) => {
                d.validate(errs);
                Some(Spec::Dataplane(d))
            }
            Err(e) => {
                errs.0.push(e);
                None
            }
        },
        Kind::MeshTrafficPermission | Kind::MeshLoadBalancingStrategy => {
            parse_policy(kind, &body, errs)
        }
    }
}

fn parse_policy(kind: Kind, spec: &Value, errs: &mut Errors) -> Option<Spec> {
    match kind {
        Kind::MeshTrafficPermission => match parse_at::<PolicySpec<MtpConf>>(spec, "spec") {
            Ok(mut p) => {
                p.validate(MTP_SECTIONS, errs);
                Some(Spec::MeshTrafficPermission(p))
            }
            Err(e) => {
                errs.0.push(e);
                None
            }
        },
        Kind::MeshLoadBalancingStrategy => match parse_at::<PolicySpec<MlbsConf>>(spec, "spec") {
            Ok(mut p) => {
                p.validate(MLBS_SECTIONS, errs);
                Some(Spec::MeshLoadBalancingStrategy(p))
            }
            Err(e) => {
                errs.0.push(e);
                None
            }
        },
        Kind::Mesh | Kind::Dataplane => parse_flat(kind, spec.clone(), errs),
    }
}
