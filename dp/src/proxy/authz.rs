//! Authorization of an inbound connection by the MeshTrafficPermission rules the control
//! plane compiled for that inbound (most specific first; the first match decides; with mTLS
//! on and nothing matching, Kuma's default applies: deny).

use std::collections::BTreeMap;

use crate::model::{Action, PermissionRule, TargetRef};

#[cfg(test)]
mod tests;

/// The verdict on one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the connection goes through.
    pub allow: bool,
    /// The rule's action, when a rule matched.
    pub action: Option<Action>,
    /// The policy that decided; `None` when no rule matched (default deny).
    pub policy: Option<String>,
}

/// Whether `target` (a rule's `from`) selects a client with `tags`.
fn selects(target: &TargetRef, tags: &BTreeMap<String, String>) -> bool {
    match target.kind.as_str() {
        "Mesh" => true,
        "MeshService" => tags.get("kuma.io/service") == Some(&target.name),
        "MeshSubset" => target.tags.iter().all(|(k, v)| tags.get(k) == Some(v)),
        // Unknown kinds select nobody: a rule this dataplane does not understand never allows.
        _ => false,
    }
}

/// Decides for a client whose certificate proves `services` (one client may hold several).
pub fn decide(rules: &[PermissionRule], services: &[String]) -> Verdict {
    for rule in rules {
        let hit = services.iter().any(|s| {
            let tags = BTreeMap::from([("kuma.io/service".to_owned(), s.clone())]);
            selects(&rule.from, &tags)
        });
        if hit {
            return Verdict {
                allow: rule.action != Action::Deny,
                action: Some(rule.action),
                policy: Some(rule.policy.clone()),
            };
        }
    }
    Verdict {
        allow: false,
        action: None,
        policy: None,
    }
}
