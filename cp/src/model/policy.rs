//! `Mesh*` policies: the shared `targetRef` / `from[]` / `to[]` / `rules[]` machinery, its
//! validation, specificity ordering, and the matching and merging of MeshTrafficPermission.
//!
//! Everything here is plain data and functions: no I/O.
//!
//! Merge order: entries are sorted by (from-`targetRef` specificity, top-level `targetRef`
//! specificity, policy name ascending, position in `from[]`), and a later entry overrides an
//! earlier one. So on a full tie the policy whose name sorts last wins.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::validate::{Errors, SERVICE_TAG, check_name, check_tags};
use super::{FieldError, Resource, Spec};

/// What a `targetRef` points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TargetRefKind {
    /// Every dataplane (or client) in the mesh.
    Mesh,
    /// Dataplanes (or clients) with all the given tags.
    MeshSubset,
    /// The service with the given `kuma.io/service` name.
    MeshService,
    /// One dataplane by name.
    Dataplane,
}

/// A policy `targetRef`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    /// The kind of target.
    pub kind: TargetRefKind,
    /// Name, for `MeshService` and `Dataplane`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tags as written, for `MeshSubset`.
    #[serde(default, rename = "tags", skip_serializing_if = "Option::is_none")]
    pub raw_tags: Option<BTreeMap<String, String>>,
    /// Part of a `Dataplane` (an inbound name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    #[serde(skip)]
    tags: BTreeMap<String, String>,
}

/// Where a `targetRef` appears, which decides the kinds it may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetRefPlace {
    /// `spec.targetRef`.
    Top,
    /// `spec.from[].targetRef`.
    From,
    /// `spec.to[].targetRef`.
    To,
}

impl TargetRefPlace {
    fn allowed(self) -> &'static [TargetRefKind] {
        use TargetRefKind::*;
        match self {
            TargetRefPlace::Top => &[Mesh, MeshSubset, MeshService, Dataplane],
            TargetRefPlace::From => &[Mesh, MeshSubset, MeshService],
            TargetRefPlace::To => &[Mesh, MeshService],
        }
    }
}

impl TargetRef {
    /// A `targetRef` of kind `Mesh`.
    pub fn mesh() -> TargetRef {
        TargetRef {
            kind: TargetRefKind::Mesh,
            name: None,
            raw_tags: None,
            section_name: None,
            tags: BTreeMap::new(),
        }
    }

    /// Normalised tags (`weft.io/x` spelled `kuma.io/x`).
    pub fn tags(&self) -> &BTreeMap<String, String> {
        &self.tags
    }

    /// Specificity: Mesh < MeshSubset (more tags = more specific) < MeshService < Dataplane.
    pub fn specificity(&self) -> (u8, usize) {
        match self.kind {
            TargetRefKind::Mesh => (0, 0),
            TargetRefKind::MeshSubset => (1, self.tags.len()),
            TargetRefKind::MeshService => (2, 0),
            TargetRefKind::Dataplane => (3, usize::from(self.section_name.is_some())),
        }
    }

    /// Whether this targetRef selects a dataplane with the given name and inbound tags.
    pub fn selects_dataplane(
        &self,
        dp_name: &str,
        dp_inbound_tags: &[&BTreeMap<String, String>],
    ) -> bool {
        match self.kind {
            TargetRefKind::Mesh => true,
            TargetRefKind::MeshSubset => {
                dp_inbound_tags.iter().any(|t| contains_all(t, &self.tags))
            }
            TargetRefKind::MeshService => dp_inbound_tags
                .iter()
                .any(|t| t.get(SERVICE_TAG).map(String::as_str) == self.name.as_deref()),
            TargetRefKind::Dataplane => self.name.as_deref() == Some(dp_name),
        }
    }

    /// Whether this targetRef (from a `from[]` entry) matches a client with these tags.
    /// `Dataplane` never matches a client.
    pub fn selects_tags(&self, tags: &BTreeMap<String, String>) -> bool {
        match self.kind {
            TargetRefKind::Mesh => true,
            TargetRefKind::MeshSubset => contains_all(tags, &self.tags),
            TargetRefKind::MeshService => {
                tags.get(SERVICE_TAG).map(String::as_str) == self.name.as_deref()
            }
            TargetRefKind::Dataplane => false,
        }
    }

    /// Validates for `place`, and fills in the normalised tags.
    pub(crate) fn validate(&mut self, path: &str, place: TargetRefPlace, errs: &mut Errors) {
        if !place.allowed().contains(&self.kind) {
            let allowed: Vec<String> = place.allowed().iter().map(|k| format!("{k:?}")).collect();
            errs.add(
                format!("{path}.kind"),
                format!(
                    "{:?} is not allowed here (allowed: {})",
                    self.kind,
                    allowed.join(", ")
                ),
            );
        }
        let needs_name = matches!(
            self.kind,
            TargetRefKind::MeshService | TargetRefKind::Dataplane
        );
        match (&self.name, needs_name) {
            (None, true) => errs.add(format!("{path}.name"), "is required for this kind"),
            (Some(n), true) => check_name(&format!("{path}.name"), n, errs),
            (Some(_), false) => errs.add(format!("{path}.name"), "is not allowed for this kind"),
            (None, false) => {}
        }
        match (&self.raw_tags, self.kind) {
            (Some(raw), TargetRefKind::MeshSubset) => {
                self.tags = check_tags(&format!("{path}.tags"), raw, errs);
            }
            (None, TargetRefKind::MeshSubset) => {}
            (Some(_), _) => errs.add(format!("{path}.tags"), "is only allowed for MeshSubset"),
            (None, _) => {}
        }
        if self.section_name.is_some() && self.kind != TargetRefKind::Dataplane {
            errs.add(
                format!("{path}.sectionName"),
                "is only allowed for Dataplane",
            );
        }
    }
}

fn contains_all(have: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// The configuration a policy kind carries in `default`.
pub trait PolicyConf: Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug {
    /// Validates the configuration at `path` (e.g. `spec.from[0].default`).
    fn validate(&self, path: &str, errs: &mut Vec<FieldError>);
}

/// One `from[]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", bound = "C: PolicyConf")]
pub struct FromRule<C> {
    /// Which clients this entry is about.
    pub target_ref: TargetRef,
    /// The configuration for them.
    pub default: C,
}

/// One `to[]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", bound = "C: PolicyConf")]
pub struct ToRule<C> {
    /// Which destinations this entry is about.
    pub target_ref: TargetRef,
    /// The configuration for them.
    pub default: C,
}

/// One `rules[]` entry (its matching part kept opaque until a kind needs it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", bound = "C: PolicyConf")]
pub struct Rule<C> {
    /// Kuma's `matches` (kept opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<serde_json::Value>,
    /// The configuration.
    pub default: C,
}

/// The `spec` of a `Mesh*` policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", bound = "C: PolicyConf")]
pub struct PolicySpec<C> {
    /// What the policy applies to (`Mesh` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    /// Inbound rules by client.
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<FromRule<C>>>,
    /// Outbound rules by destination.
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<ToRule<C>>>,
    /// Rules for the selected proxies' inbound traffic.
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule<C>>>,
}

fn none<T>() -> Option<T> {
    None
}

/// Which sections a policy kind allows.
#[derive(Debug, Clone, Copy)]
pub struct Sections {
    /// `from[]` allowed.
    pub from: bool,
    /// `to[]` allowed.
    pub to: bool,
    /// `rules[]` allowed.
    pub rules: bool,
}

impl<C: PolicyConf> PolicySpec<C> {
    /// The top-level targetRef (`Mesh` when absent).
    pub fn effective_target_ref(&self) -> TargetRef {
        self.target_ref.clone().unwrap_or_else(TargetRef::mesh)
    }

    /// The `from[]` entries (empty when none).
    pub fn from_rules(&self) -> &[FromRule<C>] {
        self.from.as_deref().unwrap_or_default()
    }

    /// Validates the spec (at path `spec`), and fills in normalised tags.
    pub(crate) fn validate(&mut self, sections: Sections, errs: &mut Errors) {
        if let Some(t) = &mut self.target_ref {
            t.validate("spec.targetRef", TargetRefPlace::Top, errs);
        }
        let present = [
            ("from", self.from.is_some(), sections.from),
            ("to", self.to.is_some(), sections.to),
            ("rules", self.rules.is_some(), sections.rules),
        ];
        for (name, is, allowed) in present {
            if is && !allowed {
                errs.add(
                    format!("spec.{name}"),
                    "is not allowed for this policy kind",
                );
            }
        }
        if !present.iter().any(|(_, is, allowed)| *is && *allowed) {
            let names: Vec<&str> = present
                .iter()
                .filter(|(_, _, allowed)| *allowed)
                .map(|(n, _, _)| *n)
                .collect();
            errs.add(
                "spec",
                format!("at least one of {} is required", names.join(", ")),
            );
        }
        for (i, r) in self.from.iter_mut().flatten().enumerate() {
            let p = format!("spec.from[{i}]");
            r.target_ref
                .validate(&format!("{p}.targetRef"), TargetRefPlace::From, errs);
            r.default.validate(&format!("{p}.default"), &mut errs.0);
        }
        for (i, r) in self.to.iter_mut().flatten().enumerate() {
            let p = format!("spec.to[{i}]");
            r.target_ref
                .validate(&format!("{p}.targetRef"), TargetRefPlace::To, errs);
            r.default.validate(&format!("{p}.default"), &mut errs.0);
        }
        for (i, r) in self.rules.iter().flatten().enumerate() {
            r.default
                .validate(&format!("spec.rules[{i}].default"), &mut errs.0);
        }
    }
}

/// MeshTrafficPermission's `default`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MtpConf {
    /// What to do with matching clients.
    pub action: Action,
}

impl PolicyConf for MtpConf {
    fn validate(&self, _path: &str, _errs: &mut Vec<FieldError>) {}
}

/// A MeshTrafficPermission `from[]` entry.
pub type MtpFrom = MtpConf;

/// The sections MeshTrafficPermission allows.
pub const MTP_SECTIONS: Sections = Sections {
    from: true,
    to: false,
    rules: false,
};

/// MeshLoadBalancingStrategy's `default` (per `to[]` destination).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MlbsConf {
    /// The algorithm and its settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerConf>,
    /// Kuma's locality-aware balancing (kept as written; not applied yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_awareness: Option<serde_json::Value>,
    /// Kuma's hash policies (kept as written; not applied yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_policies: Option<serde_json::Value>,
}

/// `loadBalancer` of a MeshLoadBalancingStrategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerConf {
    /// The algorithm.
    #[serde(rename = "type")]
    pub lb_type: LbType,
    /// `leastRequest` settings (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub least_request: Option<serde_json::Value>,
    /// `ringHash` settings (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash: Option<serde_json::Value>,
    /// `maglev` settings (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev: Option<serde_json::Value>,
}

/// Kuma's load-balancing algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LbType {
    /// Each endpoint in turn (weft's default).
    RoundRobin,
    /// The less loaded of two random endpoints.
    LeastRequest,
    /// Consistent hashing on a ring (not implemented by weft-dp yet: round robin).
    RingHash,
    /// Uniformly random (weft-dp: round robin, which spreads at least as evenly).
    Random,
    /// Maglev consistent hashing (not implemented by weft-dp yet: round robin).
    Maglev,
}

impl PolicyConf for MlbsConf {
    fn validate(&self, _path: &str, _errs: &mut Vec<FieldError>) {}
}

/// The sections MeshLoadBalancingStrategy allows.
pub const MLBS_SECTIONS: Sections = Sections {
    from: false,
    to: true,
    rules: false,
};

impl<C: PolicyConf> PolicySpec<C> {
    /// The `to[]` entries (empty when none).
    pub fn to_rules(&self) -> &[ToRule<C>] {
        self.to.as_deref().unwrap_or_default()
    }
}

/// The algorithm the MeshLoadBalancingStrategies in `policies` choose for traffic from
/// `dp` to `service`: the most specific match wins (top-level targetRef, then `to`), ties
/// going to the name that sorts last, as with other policies here. `None` means the default.
pub fn lb_for_outbound(dp: &Resource, service: &str, policies: &[&Resource]) -> Option<LbType> {
    let dp_spec = dp.dataplane()?;
    let tags: Vec<&BTreeMap<String, String>> = dp_spec.inbound_tags().collect();
    /// (top specificity, `to` specificity, policy name, choice): the greatest wins.
    type Candidate = ((u8, usize), (u8, usize), String, LbType);
    let mut best: Option<Candidate> = None;
    for p in policies {
        let Spec::MeshLoadBalancingStrategy(spec) = &p.spec else {
            continue;
        };
        if p.mesh != dp.mesh {
            continue;
        }
        let top = spec.effective_target_ref();
        let top_ok = match top.kind {
            TargetRefKind::Dataplane => top.name.as_deref() == Some(dp.name.as_str()),
            _ => top.selects_dataplane(&dp.name, &tags),
        };
        if !top_ok {
            continue;
        }
        for to in spec.to_rules() {
            let hit = match to.target_ref.kind {
                TargetRefKind::Mesh => true,
                TargetRefKind::MeshService => to.target_ref.name.as_deref() == Some(service),
                _ => false,
            };
            let Some(lb) = to.default.load_balancer.as_ref().map(|l| l.lb_type) else {
                continue;
            };
            if !hit {
                continue;
            }
            let key = (
                top.specificity(),
                to.target_ref.specificity(),
                p.name.clone(),
                lb,
            );
            if best
                .as_ref()
                .is_none_or(|b| (key.0, key.1, &key.2) >= (b.0, b.1, &b.2))
            {
                best = Some(key);
            }
        }
    }
    best.map(|b| b.3)
}

/// A traffic permission verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Let the client in.
    Allow,
    /// Refuse the client.
    Deny,
    /// Let the client in, but log that it would be denied.
    AllowWithShadowDeny,
}

/// One merged `from[]` entry: who, what, and which policy said so.
#[derive(Debug, Clone, PartialEq)]
pub struct PermissionEntry {
    /// The client selector.
    pub from: TargetRef,
    /// The verdict.
    pub action: Action,
    /// The policy name.
    pub policy: String,
}

/// The merged permissions of one inbound, ordered least to most specific.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InboundPermissions {
    /// Entries in merge order: a later entry overrides an earlier one.
    pub entries: Vec<PermissionEntry>,
}

/// The outcome of [`InboundPermissions::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The verdict.
    pub action: Action,
    /// The deciding policy; `None` when no policy matched (default deny).
    pub policy: Option<String>,
}

impl InboundPermissions {
    /// The verdict for a client with these (normalised) tags: the last matching entry wins;
    /// no match means `Deny`.
    pub fn decide(&self, client_tags: &BTreeMap<String, String>) -> Decision {
        self.entries
            .iter()
            .rev()
            .find(|e| e.from.selects_tags(client_tags))
            .map_or(
                Decision {
                    action: Action::Deny,
                    policy: None,
                },
                |e| Decision {
                    action: e.action,
                    policy: Some(e.policy.clone()),
                },
            )
    }
}

/// Whether a top-level targetRef selects one inbound of a dataplane.
fn selects_inbound(t: &TargetRef, dp_name: &str, inbound_tags: &BTreeMap<String, String>) -> bool {
    match t.kind {
        // sectionName is not resolved against inbound names here: a Dataplane targetRef
        // selects every inbound of the named dataplane.
        TargetRefKind::Dataplane => t.name.as_deref() == Some(dp_name),
        _ => t.selects_dataplane(dp_name, &[inbound_tags]),
    }
}

/// The MeshTrafficPermission entries that apply to one inbound of `dp`, merged in Kuma's
/// order. Policies of other kinds or other meshes are ignored.
pub fn mtp_rules_for_inbound(
    dp: &Resource,
    inbound_tags: &BTreeMap<String, String>,
    policies: &[&Resource],
) -> InboundPermissions {
    let mut keyed = Vec::new();
    for p in policies {
        let Spec::MeshTrafficPermission(spec) = &p.spec else {
            continue;
        };
        if p.mesh != dp.mesh {
            continue;
        }
        let top = spec.effective_target_ref();
        if !selects_inbound(&top, &dp.name, inbound_tags) {
            continue;
        }
        for (idx, rule) in spec.from_rules().iter().enumerate() {
            let key = (
                rule.target_ref.specificity(),
                top.specificity(),
                p.name.clone(),
                idx,
            );
            keyed.push((
                key,
                PermissionEntry {
                    from: rule.target_ref.clone(),
                    action: rule.default.action,
                    policy: p.name.clone(),
                },
            ));
        }
    }
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    InboundPermissions {
        entries: keyed.into_iter().map(|(_, e)| e).collect(),
    }
}
