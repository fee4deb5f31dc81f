use std::collections::BTreeMap;

use super::*;

fn rule(
    kind: &str,
    name: &str,
    tags: &[(&str, &str)],
    action: Action,
    policy: &str,
) -> PermissionRule {
    PermissionRule {
        from: TargetRef {
            kind: kind.into(),
            name: name.into(),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
        },
        action,
        policy: policy.into(),
    }
}

fn svc(s: &str) -> Vec<String> {
    vec![s.to_owned()]
}

#[test]
fn no_rule_means_deny() {
    let v = decide(&[], &svc("web"));
    assert!(!v.allow);
    assert_eq!(v.policy, None);
}

#[test]
fn first_matching_rule_decides() {
    let rules = [
        rule(
            "MeshService",
            "attacker",
            &[],
            Action::Deny,
            "deny-attacker",
        ),
        rule(
            "MeshSubset",
            "",
            &[("kuma.io/service", "web")],
            Action::Allow,
            "allow-web",
        ),
        rule("Mesh", "", &[], Action::Deny, "deny-all"),
    ];
    let v = decide(&rules, &svc("web"));
    assert!(v.allow);
    assert_eq!(v.policy.as_deref(), Some("allow-web"));
    let v = decide(&rules, &svc("attacker"));
    assert!(!v.allow);
    assert_eq!(v.policy.as_deref(), Some("deny-attacker"));
    let v = decide(&rules, &svc("other"));
    assert_eq!((v.allow, v.policy.as_deref()), (false, Some("deny-all")));
}

#[test]
fn shadow_deny_lets_through_and_unknown_kinds_select_nobody() {
    let rules = [
        rule("Dataplane", "web-1", &[], Action::Allow, "odd"),
        rule("Mesh", "", &[], Action::AllowWithShadowDeny, "shadow"),
    ];
    let v = decide(&rules, &svc("web"));
    assert!(v.allow);
    assert_eq!(v.action, Some(Action::AllowWithShadowDeny));
    assert_eq!(v.policy.as_deref(), Some("shadow"));
}

#[test]
fn a_subset_needing_tags_the_certificate_does_not_prove_does_not_match() {
    let rules = [rule(
        "MeshSubset",
        "",
        &[("kuma.io/service", "web"), ("version", "v2")],
        Action::Allow,
        "v2-only",
    )];
    assert!(!decide(&rules, &svc("web")).allow);
}
