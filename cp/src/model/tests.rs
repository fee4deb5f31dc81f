//! Unit tests for the resource model: accepted Kuma shapes, round trips, refusals with their
//! field paths, and MeshTrafficPermission merging.

use std::collections::BTreeMap;

use serde_json::Value;

use super::validate::{Errors, parse_duration};
use super::*;

fn yaml(s: &str) -> Value {
    serde_yaml_ng::from_str(s).unwrap()
}

fn parse(s: &str) -> Resource {
    let v = yaml(s);
    match Resource::from_json(&v) {
        Ok(r) => r,
        Err(e) => panic!("refused: {e}\n{s}"),
    }
}

fn causes(s: &str) -> Vec<FieldError> {
    match Resource::from_json(&yaml(s)) {
        Ok(r) => panic!("accepted: {r:?}\n{s}"),
        Err(e) => e.causes,
    }
}

/// Asserts that `s` is refused with a cause on exactly `field` whose message contains `msg`.
#[track_caller]
fn refused(s: &str, field: &str, msg: &str) {
    let c = causes(s);
    assert!(
        c.iter()
            .any(|c| c.field == field && c.message.contains(msg)),
        "expected {field}: ...{msg}..., got {c:?}"
    );
}

#[track_caller]
fn round_trip(s: &str) {
    let v = yaml(s);
    let r = parse(s);
    assert_eq!(r.to_json(), v, "round trip");
    assert_eq!(Resource::from_json(&r.to_json()).unwrap(), r);
}

const MESH: &str = r#"
type: Mesh
name: default
mtls:
  enabledBackend: ca-1
  backends:
    - name: ca-1
      type: builtin
      dpCert:
        rotation:
          expiration: 1d
      conf:
        caCert:
          RSAbits: 2048
          expiration: 10y
"#;

const MESH_OK: &str = r#"
type: Mesh
name: default
labels:
  team: core
mtls:
  enabledBackend: ca-1
  backends:
    - name: ca-1
      type: builtin
      mode: PERMISSIVE
      dpCert:
        rotation:
          expiration: 1d
      conf:
        caCert:
          RSAbits: 2048
          expiration: 8760h
    - name: ca-2
      type: provided
      conf:
        cert:
          secret: ca-cert
        key:
          file: /etc/ca.key
constraints:
  dataplaneProxy:
    requirements:
      - tags:
          kuma.io/zone: east
    restrictions:
      - tags:
          env: dev
logging:
  backends: []
skipCreatingInitialPolicies: ["*"]
"#;

const DP: &str = r#"
type: Dataplane
mesh: default
name: web-01
networking:
  address: 192.168.0.1
  advertisedAddress: web.example.com
  inbound:
    - port: 15000
      servicePort: 8080
      serviceAddress: 127.0.0.1
      tags:
        kuma.io/service: web
        weft.io/protocol: http
        version: v1
      serviceProbe:
        interval: 10s
        timeout: 2s
        unhealthyThreshold: 3
        healthyThreshold: 1
        tcp: {}
      state: Ready
    - port: 15001
      tags:
        weft.io/service: web-admin
  outbound:
    - port: 10001
      tags:
        kuma.io/service: backend
    - port: 10002
      address: 127.0.0.2
      backendRef:
        kind: MeshService
        name: db
        port: 5432
  transparentProxying:
    redirectPortInbound: 15006
    redirectPortOutbound: 15001
    ipFamilyMode: DualStack
    reachableServices: [backend, db]
  admin:
    port: 9901
"#;

const MTP_MESH: &str = r#"
type: MeshTrafficPermission
name: deny-all
mesh: default
spec:
  targetRef:
    kind: Mesh
  from:
    - targetRef:
        kind: Mesh
      default:
        action: Deny
"#;

const MTP_SVC: &str = r#"
type: MeshTrafficPermission
name: allow-frontend
mesh: default
creationTime: "2024-01-01T00:00:00Z"
resourceVersion: 4
spec:
  targetRef:
    kind: MeshService
    name: backend
  from:
    - targetRef:
        kind: MeshService
        name: frontend
      default:
        action: Allow
    - targetRef:
        kind: MeshSubset
        tags:
          weft.io/zone: east
      default:
        action: AllowWithShadowDeny
"#;

#[test]
fn kuma_mesh_accepted_and_round_trips() {
    let r = parse(MESH);
    assert_eq!(r.kind, Kind::Mesh);
    assert_eq!(r.mesh, None);
    let m = r.mesh_spec().unwrap();
    let b = m.enabled_backend().unwrap();
    assert_eq!(b.name, "ca-1");
    assert_eq!(b.effective_mode(), MtlsMode::Strict);
    assert_eq!(
        b.builtin_conf().unwrap().ca_cert.unwrap().rsa_bits,
        Some(2048)
    );
    assert!(r.warnings().is_empty());
    round_trip(MESH);
    round_trip(MESH_OK);
    let full = parse(MESH_OK);
    let m = full.mesh_spec().unwrap();
    let provided = &m.mtls.as_ref().unwrap().backends.as_ref().unwrap()[1];
    assert_eq!(
        provided.provided_conf().unwrap().cert.secret.as_deref(),
        Some("ca-cert")
    );
    assert!(full.warnings()[0].contains("PERMISSIVE"));
}

#[test]
fn mesh_without_mtls_warns() {
    let r = parse("type: Mesh\nname: plain\n");
    assert_eq!(
        r.warnings(),
        vec![
            "mesh 'plain' has no mTLS: traffic between its dataplanes is plaintext and unauthenticated"
        ]
    );
    round_trip("type: Mesh\nname: plain\n");
}

#[test]
fn mesh_transport_is_read_and_checked() {
    let tls = parse("type: Mesh\nname: m\n");
    assert_eq!(tls.mesh_spec().unwrap().transport(), mesh::Transport::Tls);
    for (word, want) in [
        ("quic", mesh::Transport::Quic),
        ("auto", mesh::Transport::Auto),
        ("pooled", mesh::Transport::Pooled),
    ] {
        let s = format!(
            "type: Mesh\nname: m\nnetworking:\n  transport: {word}\n  outbound:\n    passthrough: false\n"
        );
        assert_eq!(parse(&s).mesh_spec().unwrap().transport(), want);
        round_trip(&s);
    }
    refused(
        "type: Mesh\nname: m\nnetworking:\n  transport: udp\n",
        "networking.transport",
        "one of tls, pooled, quic, auto",
    );
}

#[test]
fn default_mesh_is_valid_strict_builtin() {
    let r = Resource::default_mesh();
    assert_eq!(r.name, "default");
    let again = Resource::from_json(&r.to_json()).unwrap();
    assert_eq!(again, r);
    let b = r.mesh_spec().unwrap().enabled_backend().unwrap();
    assert_eq!(
        (b.name.as_str(), b.backend_type),
        ("ca-1", BackendType::Builtin)
    );
    assert_eq!(b.mode, Some(MtlsMode::Strict));
    assert!(r.warnings().is_empty());
}

#[test]
fn kuma_dataplane_accepted_normalised_and_round_trips() {
    let r = parse(DP);
    let dp = r.dataplane().unwrap();
    assert_eq!(
        dp.services(),
        vec!["web".to_owned(), "web-admin".to_owned()]
    );
    let tags: Vec<_> = dp.inbound_tags().collect();
    assert_eq!(
        tags[0].get("kuma.io/protocol").map(String::as_str),
        Some("http")
    );
    assert!(tags[0].get("weft.io/protocol").is_none());
    assert_eq!(
        tags[1].get("kuma.io/service").map(String::as_str),
        Some("web-admin")
    );
    assert_eq!(dp.outbounds()[0].tags().len(), 1);
    assert_eq!(dp.outbounds()[0].effective_address(), "127.0.0.1");
    round_trip(DP);
    // The original spelling survives.
    assert!(r.to_json().to_string().contains("weft.io/service"));
}

#[test]
fn kuma_mtps_accepted_and_round_trip() {
    let r = parse(MTP_MESH);
    let p = r.mtp_spec().unwrap();
    assert_eq!(p.from_rules()[0].default.action, Action::Deny);
    round_trip(MTP_MESH);
    let r = parse(MTP_SVC);
    assert_eq!(r.mesh.as_deref(), Some("default"));
    let p = r.mtp_spec().unwrap();
    assert_eq!(
        p.from_rules()[1]
            .target_ref
            .tags()
            .get("kuma.io/zone")
            .map(String::as_str),
        Some("east")
    );
    // Server fields are dropped.
    let j = r.to_json();
    assert!(j.get("creationTime").is_none() && j.get("resourceVersion").is_none());
    let mut v = yaml(MTP_SVC);
    let o = v.as_object_mut().unwrap();
    o.remove("creationTime");
    o.remove("resourceVersion");
    assert_eq!(j, v);
    assert_eq!(r.warnings().len(), 1);
}

#[test]
fn mtp_without_top_target_ref_means_mesh() {
    let r = parse(
        "type: MeshTrafficPermission\nname: a\nmesh: m\nspec:\n  from:\n    - targetRef: {kind: Mesh}\n      default: {action: Allow}\n",
    );
    assert_eq!(
        r.mtp_spec().unwrap().effective_target_ref().kind,
        TargetRefKind::Mesh
    );
}

#[test]
fn durations_parse_go_style() {
    use std::time::Duration;
    assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
    assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    for bad in ["", "-1s", "10", "1x", "h", "1h-3m", "s1"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

// ---- refusals: each asserts the field path and a fragment of the message ----

fn dp_with(inbound: &str) -> String {
    format!(
        "type: Dataplane\nmesh: default\nname: dp\nnetworking:\n  address: 10.0.0.1\n  inbound:\n{inbound}"
    )
}

#[test]
fn refuses_inbound_port_out_of_range() {
    let s = dp_with(
        "    - port: 8080\n      tags: {kuma.io/service: a}\n    - port: 70000\n      tags: {kuma.io/service: b}\n",
    );
    refused(&s, "networking.inbound[1].port", "between 1 and 65535");
}

#[test]
fn refuses_inbound_port_zero() {
    refused(
        &dp_with("    - port: 0\n      tags: {kuma.io/service: a}\n"),
        "networking.inbound[0].port",
        "between 1 and 65535",
    );
}

#[test]
fn refuses_duplicate_inbound_port() {
    let s = dp_with(
        "    - port: 8080\n      tags: {kuma.io/service: a}\n    - port: 8080\n      tags: {kuma.io/service: b}\n",
    );
    refused(&s, "networking.inbound[1].port", "already used");
}

#[test]
fn refuses_missing_service_tag() {
    refused(
        &dp_with("    - port: 8080\n      tags: {version: v1}\n"),
        "networking.inbound[0].tags",
        "kuma.io/service",
    );
}

#[test]
fn refuses_missing_tags() {
    refused(
        &dp_with("    - port: 8080\n"),
        "networking.inbound[0].tags",
        "required",
    );
}

#[test]
fn refuses_bad_protocol() {
    refused(
        &dp_with("    - port: 8080\n      tags: {kuma.io/service: a, kuma.io/protocol: smtp}\n"),
        "networking.inbound[0].tags[\"kuma.io/protocol\"]",
        "protocol must be one of",
    );
}

#[test]
fn refuses_whitespace_in_tag_value() {
    refused(
        &dp_with("    - port: 8080\n      tags: {kuma.io/service: 'a b'}\n"),
        "networking.inbound[0].tags[\"kuma.io/service\"]",
        "no whitespace",
    );
}

#[test]
fn refuses_bad_address() {
    let s = "type: Dataplane\nmesh: default\nname: dp\nnetworking:\n  address: 'not an address!'\n  inbound:\n    - port: 1\n      tags: {kuma.io/service: a}\n";
    refused(
        s,
        "networking.address",
        "not a valid IP address or hostname",
    );
}

#[test]
fn refuses_bad_service_address() {
    refused(
        &dp_with(
            "    - port: 8080\n      serviceAddress: 300.1.1.1\n      tags: {kuma.io/service: a}\n",
        ),
        "networking.inbound[0].serviceAddress",
        "not a valid IP",
    );
}

#[test]
fn refuses_unknown_field_with_path() {
    refused(
        &dp_with("    - portt: 8080\n      tags: {kuma.io/service: a}\n"),
        "networking.inbound[0].portt",
        "unknown field",
    );
}

#[test]
fn refuses_unknown_top_level_field() {
    refused("type: Mesh\nname: m\nmtlss: {}\n", "mtlss", "unknown field");
    refused(
        "type: MeshTrafficPermission\nname: a\nmesh: m\nextra: 1\nspec:\n  from:\n    - targetRef: {kind: Mesh}\n      default: {action: Allow}\n",
        "extra",
        "unknown field",
    );
}

#[test]
fn refuses_wrong_type_for_port() {
    refused(
        &dp_with("    - port: eighty\n      tags: {kuma.io/service: a}\n"),
        "networking.inbound[0].port",
        "invalid type",
    );
}

#[test]
fn refuses_no_inbound() {
    refused(
        "type: Dataplane\nmesh: default\nname: dp\nnetworking:\n  address: 10.0.0.1\n",
        "networking.inbound",
        "at least one inbound",
    );
}

#[test]
fn refuses_gateway() {
    let s = "type: Dataplane\nmesh: default\nname: dp\nnetworking:\n  address: 10.0.0.1\n  gateway:\n    tags: {kuma.io/service: gw}\n";
    refused(s, "networking.gateway", "not supported");
}

#[test]
fn refuses_outbound_with_tags_and_backend_ref() {
    let s = format!(
        "{}  outbound:\n    - port: 10001\n      tags: {{kuma.io/service: b}}\n      backendRef: {{kind: MeshService, name: b}}\n",
        dp_with("    - port: 8080\n      tags: {kuma.io/service: a}\n")
    );
    refused(&s, "networking.outbound[0]", "not both");
}

#[test]
fn refuses_outbound_with_neither() {
    let s = format!(
        "{}  outbound:\n    - port: 10001\n",
        dp_with("    - port: 8080\n      tags: {kuma.io/service: a}\n")
    );
    refused(&s, "networking.outbound[0]", "one of tags or backendRef");
}

#[test]
fn refuses_duplicate_outbound_port() {
    let s = format!(
        "{}  outbound:\n    - port: 10001\n      tags: {{kuma.io/service: b}}\n    - port: 10001\n      tags: {{kuma.io/service: c}}\n",
        dp_with("    - port: 8080\n      tags: {kuma.io/service: a}\n")
    );
    refused(&s, "networking.outbound[1].port", "another outbound");
}

#[test]
fn refuses_outbound_clashing_with_inbound() {
    let s = format!(
        "{}  outbound:\n    - port: 8080\n      address: 10.0.0.1\n      tags: {{kuma.io/service: b}}\n",
        dp_with("    - port: 8080\n      tags: {kuma.io/service: a}\n")
    );
    refused(&s, "networking.outbound[0].port", "used by an inbound");
}

#[test]
fn refuses_bad_probe_duration() {
    refused(
        &dp_with(
            "    - port: 8080\n      tags: {kuma.io/service: a}\n      serviceProbe: {interval: 10 seconds}\n",
        ),
        "networking.inbound[0].serviceProbe.interval",
        "not a duration",
    );
}

#[test]
fn refuses_unknown_inbound_state() {
    refused(
        &dp_with("    - port: 8080\n      tags: {kuma.io/service: a}\n      state: Sleepy\n"),
        "networking.inbound[0].state",
        "unknown variant",
    );
}

#[test]
fn refuses_bad_dp_cert_duration() {
    let s = MESH.replace("expiration: 1d", "expiration: 1 day");
    refused(
        &s,
        "mtls.backends[0].dpCert.rotation.expiration",
        "not a duration",
    );
    let s = MESH.replace("expiration: 1d", "expiration: 0s");
    refused(
        &s,
        "mtls.backends[0].dpCert.rotation.expiration",
        "greater than zero",
    );
}

#[test]
fn refuses_negative_duration() {
    let s = MESH.replace("expiration: 10y", "expiration: -1h");
    refused(&s, "mtls.backends[0].conf.caCert.expiration", "sign");
}

#[test]
fn refuses_unknown_mode() {
    let s = "type: Mesh\nname: m\nmtls:\n  enabledBackend: ca-1\n  backends:\n    - name: ca-1\n      type: builtin\n      mode: STRICTER\n";
    refused(s, "mtls.backends[0].mode", "unknown variant `STRICTER`");
}

#[test]
fn refuses_unknown_backend_type() {
    let s = "type: Mesh\nname: m\nmtls:\n  backends:\n    - name: ca-1\n      type: vault\n";
    refused(s, "mtls.backends[0].type", "unknown variant");
}

#[test]
fn refuses_enabled_backend_naming_nothing() {
    let s = "type: Mesh\nname: m\nmtls:\n  enabledBackend: ca-9\n  backends:\n    - name: ca-1\n      type: builtin\n";
    refused(s, "mtls.enabledBackend", "does not name a backend");
}

#[test]
fn refuses_duplicate_backend_names() {
    let s = "type: Mesh\nname: m\nmtls:\n  backends:\n    - name: ca-1\n      type: builtin\n    - name: ca-1\n      type: builtin\n";
    refused(s, "mtls.backends[1].name", "more than once");
}

#[test]
fn refuses_unknown_field_in_builtin_conf() {
    let s = "type: Mesh\nname: m\nmtls:\n  backends:\n    - name: ca-1\n      type: builtin\n      conf:\n        caCertt: {}\n";
    refused(s, "mtls.backends[0].conf.caCertt", "unknown field");
}

#[test]
fn refuses_provided_source_with_two_kinds() {
    let s = "type: Mesh\nname: m\nmtls:\n  backends:\n    - name: ca-1\n      type: provided\n      conf:\n        cert: {secret: a, file: /b}\n        key: {secret: k}\n";
    refused(s, "mtls.backends[0].conf.cert", "exactly one of");
}

#[test]
fn refuses_bad_constraint_tag() {
    let s = "type: Mesh\nname: m\nconstraints:\n  dataplaneProxy:\n    requirements:\n      - tags: {'': x}\n";
    refused(
        s,
        "constraints.dataplaneProxy.requirements[0].tags[\"\"]",
        "tag key",
    );
}

#[test]
fn refuses_bad_name() {
    refused(
        "type: Mesh\nname: Bad_Name!\n",
        "name",
        "lower case alphanumerics",
    );
    refused("type: Mesh\nname: -abc\n", "name", "start and end");
    refused(
        &format!("type: Mesh\nname: {}\n", "a".repeat(254)),
        "name",
        "253",
    );
    refused("type: Mesh\n", "name", "is required");
}

#[test]
fn refuses_mesh_missing_on_dataplane() {
    let s = "type: Dataplane\nname: dp\nnetworking:\n  address: 10.0.0.1\n  inbound:\n    - port: 1\n      tags: {kuma.io/service: a}\n";
    refused(s, "mesh", "is required");
}

#[test]
fn refuses_mesh_present_on_mesh() {
    refused(
        "type: Mesh\nname: m\nmesh: other\n",
        "mesh",
        "must not be set",
    );
}

#[test]
fn refuses_bad_mesh_name() {
    refused(
        "type: MeshTrafficPermission\nname: a\nmesh: Not/Ok\nspec:\n  from:\n    - targetRef: {kind: Mesh}\n      default: {action: Allow}\n",
        "mesh",
        "lower case",
    );
}

#[test]
fn refuses_unknown_type() {
    refused(
        "type: MeshGateway\nname: gw\n",
        "type",
        "unknown type 'MeshGateway'",
    );
    refused("name: gw\n", "type", "is required");
}

#[test]
fn refuses_non_object() {
    let e = Resource::from_json(&Value::from(3)).unwrap_err();
    assert_eq!(e.causes[0].field, "");
}

fn mtp(spec: &str) -> String {
    format!("type: MeshTrafficPermission\nname: p\nmesh: default\nspec:\n{spec}")
}

#[test]
fn refuses_wrong_target_ref_kind_in_from() {
    let s = mtp(
        "  from:\n    - targetRef: {kind: Dataplane, name: dp}\n      default: {action: Allow}\n",
    );
    refused(&s, "spec.from[0].targetRef.kind", "not allowed here");
}

#[test]
fn refuses_unknown_target_ref_kind() {
    let s = mtp(
        "  targetRef: {kind: MeshGateway, name: gw}\n  from:\n    - targetRef: {kind: Mesh}\n      default: {action: Allow}\n",
    );
    refused(&s, "spec.targetRef.kind", "unknown variant");
}

#[test]
fn refuses_mtp_with_to() {
    let s = mtp(
        "  from:\n    - targetRef: {kind: Mesh}\n      default: {action: Allow}\n  to:\n    - targetRef: {kind: Mesh}\n      default: {action: Allow}\n",
    );
    refused(&s, "spec.to", "not allowed for this policy kind");
}

#[test]
fn refuses_mtp_with_rules() {
    let s = mtp("  rules:\n    - default: {action: Allow}\n");
    refused(&s, "spec.rules", "not allowed");
}

#[test]
fn refuses_mtp_without_from() {
    refused(
        &mtp("  targetRef: {kind: Mesh}\n"),
        "spec",
        "at least one of from",
    );
}

#[test]
fn refuses_action_missing() {
    let s = mtp("  from:\n    - targetRef: {kind: Mesh}\n      default: {}\n");
    refused(&s, "spec.from[0].default.action", "is required");
}

#[test]
fn refuses_unknown_action() {
    let s = mtp("  from:\n    - targetRef: {kind: Mesh}\n      default: {action: Maybe}\n");
    refused(&s, "spec.from[0].default.action", "unknown variant `Maybe`");
}

#[test]
fn refuses_mesh_service_without_name() {
    let s = mtp(
        "  targetRef: {kind: MeshService}\n  from:\n    - targetRef: {kind: Mesh}\n      default: {action: Allow}\n",
    );
    refused(&s, "spec.targetRef.name", "is required");
}

#[test]
fn refuses_tags_on_mesh_target() {
    let s = mtp(
        "  from:\n    - targetRef: {kind: Mesh, tags: {a: b}}\n      default: {action: Allow}\n",
    );
    refused(
        &s,
        "spec.from[0].targetRef.tags",
        "only allowed for MeshSubset",
    );
}

#[test]
fn refuses_missing_spec() {
    refused(
        "type: MeshTrafficPermission\nname: p\nmesh: default\n",
        "spec",
        "is required",
    );
}

#[test]
fn reports_all_errors_in_one_document() {
    let s = "type: Dataplane\nname: BAD\nnetworking:\n  address: 10.0.0.1\n  inbound:\n    - port: 0\n      tags: {kuma.io/service: a}\n    - port: 8080\n      tags: {version: v1}\n";
    let c = causes(s);
    let fields: Vec<&str> = c.iter().map(|c| c.field.as_str()).collect();
    for f in [
        "name",
        "mesh",
        "networking.inbound[0].port",
        "networking.inbound[1].tags",
    ] {
        assert!(fields.contains(&f), "{f} missing from {fields:?}");
    }
    let e = Resource::from_json(&yaml(s)).unwrap_err();
    assert!(
        e.to_string()
            .contains("networking.inbound[0].port: must be between")
    );
}

// ---- policy matching and merging ----

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn svc(name: &str) -> BTreeMap<String, String> {
    tags(&[("kuma.io/service", name)])
}

fn backend_dp() -> Resource {
    parse(
        "type: Dataplane\nmesh: default\nname: backend-1\nnetworking:\n  address: 10.0.0.2\n  inbound:\n    - port: 8080\n      tags: {kuma.io/service: backend, zone: east}\n",
    )
}

fn policy(name: &str, top: &str, from: &[(&str, &str)]) -> Resource {
    let mut s = format!(
        "type: MeshTrafficPermission\nname: {name}\nmesh: default\nspec:\n  targetRef: {top}\n  from:\n"
    );
    for (t, a) in from {
        s.push_str(&format!(
            "    - targetRef: {t}\n      default: {{action: {a}}}\n"
        ));
    }
    parse(&s)
}

fn decide(policies: &[&Resource], client: &BTreeMap<String, String>) -> Decision {
    let dp = backend_dp();
    let inbound = dp
        .dataplane()
        .unwrap()
        .inbound_tags()
        .next()
        .unwrap()
        .clone();
    mtp_rules_for_inbound(&dp, &inbound, policies).decide(client)
}

#[test]
fn selects_dataplane_by_kind() {
    let dp = backend_dp();
    let t: Vec<_> = dp.dataplane().unwrap().inbound_tags().collect();
    let sel = |p: &Resource| {
        p.mtp_spec()
            .unwrap()
            .effective_target_ref()
            .selects_dataplane(&dp.name, &t)
    };
    assert!(sel(&policy(
        "a",
        "{kind: Mesh}",
        &[("{kind: Mesh}", "Allow")]
    )));
    assert!(sel(&policy(
        "a",
        "{kind: MeshService, name: backend}",
        &[("{kind: Mesh}", "Allow")]
    )));
    assert!(!sel(&policy(
        "a",
        "{kind: MeshService, name: web}",
        &[("{kind: Mesh}", "Allow")]
    )));
    assert!(sel(&policy(
        "a",
        "{kind: MeshSubset, tags: {weft.io/service: backend, zone: east}}",
        &[("{kind: Mesh}", "Allow")]
    )));
    assert!(!sel(&policy(
        "a",
        "{kind: MeshSubset, tags: {zone: west}}",
        &[("{kind: Mesh}", "Allow")]
    )));
    assert!(sel(&policy(
        "a",
        "{kind: Dataplane, name: backend-1}",
        &[("{kind: Mesh}", "Allow")]
    )));
    assert!(!sel(&policy(
        "a",
        "{kind: Dataplane, name: backend-2}",
        &[("{kind: Mesh}", "Allow")]
    )));
}

#[test]
fn no_policy_denies() {
    let d = decide(&[], &svc("frontend"));
    assert_eq!(
        d,
        Decision {
            action: Action::Deny,
            policy: None
        }
    );
}

#[test]
fn mesh_deny_plus_service_allow() {
    let deny = policy("deny-all", "{kind: Mesh}", &[("{kind: Mesh}", "Deny")]);
    let allow = policy(
        "allow-fe",
        "{kind: MeshService, name: backend}",
        &[("{kind: MeshService, name: frontend}", "Allow")],
    );
    let ps = [&deny, &allow];
    let d = decide(&ps, &svc("frontend"));
    assert_eq!(
        (d.action, d.policy.as_deref()),
        (Action::Allow, Some("allow-fe"))
    );
    let d = decide(&ps, &svc("other"));
    assert_eq!(
        (d.action, d.policy.as_deref()),
        (Action::Deny, Some("deny-all"))
    );
}

#[test]
fn policy_for_other_service_does_not_apply() {
    let allow = policy(
        "allow-web",
        "{kind: MeshService, name: web}",
        &[("{kind: Mesh}", "Allow")],
    );
    assert_eq!(decide(&[&allow], &svc("frontend")).action, Action::Deny);
}

#[test]
fn more_specific_from_beats_less_specific() {
    // A Mesh-wide Allow in a Dataplane-targeted policy loses to a MeshService Deny in a
    // Mesh-targeted policy: from-specificity comes first.
    let a = policy(
        "a",
        "{kind: Dataplane, name: backend-1}",
        &[("{kind: Mesh}", "Allow")],
    );
    let b = policy(
        "b",
        "{kind: Mesh}",
        &[("{kind: MeshService, name: frontend}", "Deny")],
    );
    let d = decide(&[&a, &b], &svc("frontend"));
    assert_eq!((d.action, d.policy.as_deref()), (Action::Deny, Some("b")));
    assert_eq!(decide(&[&a, &b], &svc("x")).action, Action::Allow);
    // Subsets: more tags win.
    let c = policy(
        "c",
        "{kind: Mesh}",
        &[
            ("{kind: MeshSubset, tags: {zone: east, env: prod}}", "Allow"),
            ("{kind: MeshSubset, tags: {zone: east}}", "Deny"),
        ],
    );
    let d = decide(
        &[&c],
        &tags(&[("kuma.io/service", "fe"), ("zone", "east"), ("env", "prod")]),
    );
    assert_eq!(d.action, Action::Allow);
    let d = decide(&[&c], &tags(&[("kuma.io/service", "fe"), ("zone", "east")]));
    assert_eq!(d.action, Action::Deny);
}

#[test]
fn top_level_specificity_breaks_from_ties() {
    let a = policy("z-mesh", "{kind: Mesh}", &[("{kind: Mesh}", "Allow")]);
    let b = policy(
        "a-svc",
        "{kind: MeshService, name: backend}",
        &[("{kind: Mesh}", "Deny")],
    );
    let d = decide(&[&a, &b], &svc("x"));
    assert_eq!(
        (d.action, d.policy.as_deref()),
        (Action::Deny, Some("a-svc"))
    );
}

#[test]
fn name_breaks_full_ties() {
    let a = policy("aaa", "{kind: Mesh}", &[("{kind: Mesh}", "Deny")]);
    let b = policy("bbb", "{kind: Mesh}", &[("{kind: Mesh}", "Allow")]);
    for ps in [[&a, &b], [&b, &a]] {
        let d = decide(&ps, &svc("x"));
        assert_eq!(
            (d.action, d.policy.as_deref()),
            (Action::Allow, Some("bbb"))
        );
    }
}

#[test]
fn shadow_deny_and_other_meshes() {
    let a = policy(
        "a",
        "{kind: Mesh}",
        &[("{kind: Mesh}", "AllowWithShadowDeny")],
    );
    assert_eq!(decide(&[&a], &svc("x")).action, Action::AllowWithShadowDeny);
    let mut other = policy("o", "{kind: Mesh}", &[("{kind: Mesh}", "Allow")]);
    other.mesh = Some("other".into());
    assert_eq!(decide(&[&other], &svc("x")).action, Action::Deny);
}

#[test]
fn weft_prefix_in_client_selector_matches() {
    let a = policy(
        "a",
        "{kind: Mesh}",
        &[("{kind: MeshSubset, tags: {weft.io/zone: east}}", "Allow")],
    );
    let d = decide(
        &[&a],
        &tags(&[("kuma.io/service", "fe"), ("kuma.io/zone", "east")]),
    );
    assert_eq!(d.action, Action::Allow);
}

#[test]
fn specificity_order() {
    let t = |s: &str| -> TargetRef {
        let mut r: TargetRef = serde_json::from_value(yaml(s)).unwrap();
        let mut errs = Errors::default();
        r.validate("t", TargetRefPlace::Top, &mut errs);
        r
    };
    let order = [
        t("{kind: Mesh}"),
        t("{kind: MeshSubset, tags: {a: b}}"),
        t("{kind: MeshSubset, tags: {a: b, c: d}}"),
        t("{kind: MeshService, name: s}"),
        t("{kind: Dataplane, name: d}"),
    ];
    for w in order.windows(2) {
        assert!(w[0].specificity() < w[1].specificity(), "{w:?}");
    }
}

#[test]
fn refuses_missing_required_fields_with_their_path() {
    let s = "type: Mesh\nname: m\nmtls:\n  backends:\n    - type: builtin\n";
    refused(s, "mtls.backends[0].name", "is required");
    let s = "type: Dataplane\nmesh: default\nname: dp\nnetworking:\n  inbound: []\n";
    refused(s, "networking.address", "is required");
    // An unknown field names the field and what was expected.
    refused(
        "type: Mesh\nname: m\nmtls: {mtls: 1}\n",
        "mtls.mtls",
        "expected one of `enabledBackend`",
    );
}

const WEB_DP: &str = "type: Dataplane\nmesh: default\nname: web-1\nnetworking:\n  address: 10.0.0.1\n  inbound:\n  - port: 1\n    tags:\n      kuma.io/service: web\n  outbound:\n  - port: 2\n    tags:\n      kuma.io/service: backend\n";

fn mlbs(name: &str, top: &str, to: &str, lb: &str) -> Resource {
    parse(&format!(
        "type: MeshLoadBalancingStrategy\nmesh: default\nname: {name}\nspec:\n  targetRef:\n{top}  to:\n  - targetRef:\n{to}    default:\n      loadBalancer:\n        type: {lb}\n"
    ))
}

#[test]
fn mesh_load_balancing_strategy_round_trips_warns_and_refuses_from() {
    let doc = "type: MeshLoadBalancingStrategy\nmesh: default\nname: lb\nspec:\n  targetRef:\n    kind: Mesh\n  to:\n  - targetRef:\n      kind: MeshService\n      name: backend\n    default:\n      loadBalancer:\n        type: LeastRequest\n        leastRequest:\n          choiceCount: 2\n";
    let r = parse(doc);
    assert_eq!(r.to_json(), yaml(doc));
    assert!(r.warnings().is_empty(), "{:?}", r.warnings());
    let ring = mlbs("ring", "    kind: Mesh\n", "      kind: Mesh\n", "RingHash");
    assert!(
        ring.warnings()[0].contains("RingHash"),
        "{:?}",
        ring.warnings()
    );
    refused(
        "type: MeshLoadBalancingStrategy\nmesh: default\nname: lb\nspec:\n  from:\n  - targetRef:\n      kind: Mesh\n    default: {}\n",
        "spec.from",
        "not allowed",
    );
    refused(
        "type: MeshLoadBalancingStrategy\nmesh: default\nname: lb\nspec:\n  to:\n  - targetRef:\n      kind: Mesh\n    default:\n      loadBalancer:\n        type: Fastest\n",
        "spec.to[0].default.loadBalancer.type",
        "Fastest",
    );
}

#[test]
fn the_most_specific_load_balancing_strategy_wins() {
    let dp = parse(WEB_DP);
    let mesh_wide = mlbs(
        "a-mesh",
        "    kind: Mesh\n",
        "      kind: Mesh\n",
        "LeastRequest",
    );
    let for_backend = mlbs(
        "b-backend",
        "    kind: Mesh\n",
        "      kind: MeshService\n      name: backend\n",
        "RoundRobin",
    );
    let for_other = mlbs(
        "c-other",
        "    kind: Mesh\n",
        "      kind: MeshService\n      name: other\n",
        "LeastRequest",
    );
    let for_db_clients = mlbs(
        "d-db",
        "    kind: MeshService\n    name: db\n",
        "      kind: Mesh\n",
        "RoundRobin",
    );
    assert_eq!(lb_for_outbound(&dp, "backend", &[]), None);
    assert_eq!(
        lb_for_outbound(&dp, "backend", &[&mesh_wide, &for_other, &for_db_clients]),
        Some(LbType::LeastRequest)
    );
    assert_eq!(
        lb_for_outbound(&dp, "backend", &[&for_backend, &mesh_wide]),
        Some(LbType::RoundRobin),
        "a MeshService destination is more specific than Mesh"
    );
}
