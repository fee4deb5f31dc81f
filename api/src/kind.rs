//! Resource kinds: their `type` name (as in Kuma's universal YAML) and their REST plural.

use std::fmt;

/// A resource kind that the REST API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `Mesh`: a trust domain and its mTLS settings. Not mesh-scoped.
    Mesh,
    /// `Dataplane`: one proxy beside one service instance.
    Dataplane,
    /// `MeshTrafficPermission`: which clients may reach which services.
    MeshTrafficPermission,
    /// `MeshLoadBalancingStrategy`: how outbound traffic is spread over a service's instances.
    MeshLoadBalancingStrategy,
}

impl Kind {
    /// Every kind, in the order `weftctl` lists them.
    pub const ALL: [Kind; 4] = [
        Kind::Mesh,
        Kind::Dataplane,
        Kind::MeshTrafficPermission,
        Kind::MeshLoadBalancingStrategy,
    ];

    /// The `type` field of the resource, e.g. `MeshTrafficPermission`.
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Mesh => "Mesh",
            Kind::Dataplane => "Dataplane",
            Kind::MeshTrafficPermission => "MeshTrafficPermission",
            Kind::MeshLoadBalancingStrategy => "MeshLoadBalancingStrategy",
        }
    }

    /// The REST path segment, e.g. `meshtrafficpermissions`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Mesh => "meshes",
            Kind::Dataplane => "dataplanes",
            Kind::MeshTrafficPermission => "meshtrafficpermissions",
            Kind::MeshLoadBalancingStrategy => "meshloadbalancingstrategies",
        }
    }

    /// Whether resources of this kind live inside a mesh (everything but `Mesh`).
    pub fn is_mesh_scoped(self) -> bool {
        !matches!(self, Kind::Mesh)
    }

    /// Whether this kind is a `Mesh*` policy with a `spec` (as opposed to Kuma's flat fields).
    pub fn is_policy(self) -> bool {
        matches!(
            self,
            Kind::MeshTrafficPermission | Kind::MeshLoadBalancingStrategy
        )
    }

    /// Looks a kind up by its `type` name (case-sensitive, as Kuma is).
    pub fn from_type_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_name() == s)
    }

    /// Looks a kind up by its plural, singular or type name, case-insensitively
    /// (what a user types after `weftctl get`).
    pub fn from_user_input(s: &str) -> Option<Kind> {
        let s = s.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|k| {
            let t = k.type_name().to_ascii_lowercase();
            k.plural() == s || t == s
        })
    }

    /// Looks a kind up by its REST plural.
    pub fn from_plural(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.plural() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.type_name())
    }
}

#[cfg(test)]
mod tests {
    use super::Kind;

    #[test]
    fn names_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_type_name(k.type_name()), Some(k));
            assert_eq!(Kind::from_plural(k.plural()), Some(k));
            assert_eq!(Kind::from_user_input(&k.plural().to_uppercase()), Some(k));
        }
        assert_eq!(Kind::from_user_input("dataplane"), Some(Kind::Dataplane));
        assert_eq!(Kind::from_type_name("mesh"), None);
    }
}
