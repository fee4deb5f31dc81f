use std::collections::BTreeMap;

use super::*;
use crate::test_util::TestCa;

fn ib(port: u32, service: &str) -> v1::Inbound {
    v1::Inbound {
        port,
        service_address: "127.0.0.1".into(),
        service_port: 8080,
        tags: BTreeMap::from([("kuma.io/service".into(), service.into())]),
        rules: vec![v1::PermissionRule {
            from: Some(v1::TargetRef {
                kind: "Mesh".into(),
                ..Default::default()
            }),
            action: v1::permission_rule::Action::Deny as i32,
            policy: "deny-all".into(),
        }],
    }
}

fn ob(address: &str, port: u32, service: &str) -> v1::Outbound {
    v1::Outbound {
        port,
        address: address.into(),
        service: service.into(),
        endpoints: vec![v1::Endpoint {
            address: "10.0.0.2".into(),
            port: 15000,
            healthy: true,
            zone: String::new(),
            tags: BTreeMap::new(),
        }],
        lb: v1::outbound::LoadBalancer::LeastRequest as i32,
    }
}

fn wire(bundle: &str) -> v1::DataplaneConfig {
    v1::DataplaneConfig {
        mesh: "default".into(),
        dataplane_name: "web-1".into(),
        mtls_mode: v1::dataplane_config::MtlsMode::Strict as i32,
        transport: v1::dataplane_config::Transport::Quic as i32,
        trust_bundle_pem: bundle.into(),
        inbounds: vec![ib(15001, "web-admin"), ib(15000, "web")],
        outbounds: vec![ob("127.0.0.1", 10001, "api")],
        policies_json: BTreeMap::from([("p".into(), "{\"a\":1}".into())]),
        signing_ca_pem: bundle.into(),
    }
}

fn field_of(e: Error) -> String {
    let Error::Invalid { field, .. } = e;
    field
}

#[test]
fn complete_config_converts_and_serialises_in_camel_case() {
    let ca = TestCa::new("root");
    let c = DataplaneConfig::try_from(wire(&ca.cert_pem)).unwrap();
    assert_eq!(
        c.inbounds.iter().map(|i| i.port).collect::<Vec<_>>(),
        vec![15000, 15001],
        "sorted by port"
    );
    assert_eq!(c.inbounds[0].rules[0].action, Action::Deny);
    assert_eq!(c.outbounds[0].lb, LoadBalancer::LeastRequest);
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["mtlsMode"], "STRICT");
    assert_eq!(json["dataplaneName"], "web-1");
    assert_eq!(json["inbounds"][0]["serviceAddress"], "127.0.0.1");
    assert_eq!(json["inbounds"][0]["servicePort"], 8080);
    assert_eq!(json["inbounds"][0]["rules"][0]["action"], "Deny");
    assert_eq!(json["inbounds"][0]["rules"][0]["from"]["kind"], "Mesh");
    assert_eq!(json["outbounds"][0]["lb"], "LeastRequest");
    assert_eq!(json["outbounds"][0]["endpoints"][0]["healthy"], true);
    assert_eq!(json["policies"]["p"]["a"], 1);
    assert!(
        json["trustBundlePem"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    // What config.json holds reads back identically.
    let back: DataplaneConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, c);
}

#[test]
fn bad_configs_name_the_field() {
    let ca = TestCa::new("root");
    type Mutation = Box<dyn Fn(&mut v1::DataplaneConfig)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("inbounds[0].port", Box::new(|c| c.inbounds[0].port = 0)),
        ("inbounds[1].port", Box::new(|c| c.inbounds[1].port = 70000)),
        (
            "inbounds[1].servicePort",
            Box::new(|c| c.inbounds[1].service_port = 65536),
        ),
        ("inbounds[1].port", Box::new(|c| c.inbounds[1].port = 15001)),
        (
            "inbounds[0].serviceAddress",
            Box::new(|c| c.inbounds[0].service_address = "web".into()),
        ),
        (
            "inbounds[0].rules[0].action",
            Box::new(|c| c.inbounds[0].rules[0].action = 9),
        ),
        ("outbounds[0].port", Box::new(|c| c.outbounds[0].port = 0)),
        (
            "outbounds[0].endpoints[0].port",
            Box::new(|c| c.outbounds[0].endpoints[0].port = 0),
        ),
        (
            "outbounds[1]",
            Box::new(|c| c.outbounds.push(ob("127.0.0.1", 10001, "x"))),
        ),
        (
            "trustBundlePem",
            Box::new(|c| c.trust_bundle_pem = "garbage".into()),
        ),
        (
            "trustBundlePem",
            Box::new(|c| {
                c.trust_bundle_pem =
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into();
            }),
        ),
        (
            "signingCaPem",
            Box::new(|c| c.signing_ca_pem = "nope".into()),
        ),
        ("mtlsMode", Box::new(|c| c.mtls_mode = 7)),
        ("transport", Box::new(|c| c.transport = 9)),
        (
            "policies.p",
            Box::new(|c| {
                c.policies_json.insert("p".into(), "{".into());
            }),
        ),
    ];
    for (field, mutate) in cases {
        let mut w = wire(&ca.cert_pem);
        mutate(&mut w);
        let err = DataplaneConfig::try_from(w).unwrap_err();
        assert_eq!(field_of(err), field);
    }
    // Without mTLS no bundle is needed; with it, one is.
    let mut w = wire("");
    w.mtls_mode = v1::dataplane_config::MtlsMode::Disabled as i32;
    DataplaneConfig::try_from(w).unwrap();
    let err = DataplaneConfig::try_from(wire("")).unwrap_err();
    assert_eq!(field_of(err), "trustBundlePem");
}

#[test]
fn delta_upserts_removes_and_replaces_optional_fields() {
    let ca = TestCa::new("root");
    let other = TestCa::new("new root");
    let base = DataplaneConfig::try_from(wire(&ca.cert_pem)).unwrap();
    let mut changed = ib(15000, "web");
    changed.service_port = 9090;
    let bundle = format!("{}{}", ca.cert_pem, other.cert_pem);
    let next = base
        .apply_delta(v1::ConfigDelta {
            base_version: "1".into(),
            mtls_mode: Some(v1::dataplane_config::MtlsMode::Permissive as i32),
            trust_bundle_pem: Some(bundle.clone()),
            signing_ca_pem: None,
            transport: Some(v1::dataplane_config::Transport::Auto as i32),
            upsert_inbounds: vec![changed, ib(15002, "web-metrics")],
            remove_inbounds: vec![15001],
            upsert_outbounds: vec![ob("127.0.0.1", 10002, "db")],
            remove_outbounds: vec!["127.0.0.1:10001".into()],
            upsert_policies_json: BTreeMap::from([("q".into(), "[1]".into())]),
            remove_policies: vec!["p".into()],
        })
        .unwrap();
    assert_eq!(next.mtls_mode, MtlsMode::Permissive);
    assert_eq!(next.transport, Transport::Auto);
    assert_eq!(next.trust_bundle_pem, bundle);
    assert_eq!(next.signing_ca_pem, ca.cert_pem, "absent optional keeps");
    assert_eq!(
        next.inbounds
            .iter()
            .map(|i| (i.port, i.service_port))
            .collect::<Vec<_>>(),
        vec![(15000, 9090), (15002, 8080)]
    );
    assert_eq!(
        next.outbounds.iter().map(|o| o.port).collect::<Vec<_>>(),
        vec![10002]
    );
    assert_eq!(next.policies.keys().collect::<Vec<_>>(), vec!["q"]);
    assert_eq!(next.mesh, base.mesh);
    // An empty delta changes nothing.
    assert_eq!(base.apply_delta(v1::ConfigDelta::default()).unwrap(), base);
}

#[test]
fn bad_deltas_name_the_field_and_leave_the_base_alone() {
    let ca = TestCa::new("root");
    let base = DataplaneConfig::try_from(wire(&ca.cert_pem)).unwrap();
    let before = base.clone();
    let cases: Vec<(&str, v1::ConfigDelta)> = vec![
        (
            "removeInbounds[0]",
            v1::ConfigDelta {
                remove_inbounds: vec![1234],
                ..Default::default()
            },
        ),
        (
            "removeOutbounds[0]",
            v1::ConfigDelta {
                remove_outbounds: vec!["127.0.0.1:9".into()],
                ..Default::default()
            },
        ),
        (
            "removeOutbounds[0]",
            v1::ConfigDelta {
                remove_outbounds: vec!["nonsense".into()],
                ..Default::default()
            },
        ),
        (
            "upsertInbounds[0].port",
            v1::ConfigDelta {
                upsert_inbounds: vec![ib(0, "web")],
                ..Default::default()
            },
        ),
        (
            "upsertInbounds[1].port",
            v1::ConfigDelta {
                upsert_inbounds: vec![ib(15005, "a"), ib(15005, "b")],
                ..Default::default()
            },
        ),
        (
            "trustBundlePem",
            v1::ConfigDelta {
                trust_bundle_pem: Some("not pem".into()),
                ..Default::default()
            },
        ),
        (
            "removePolicies[0]",
            v1::ConfigDelta {
                remove_policies: vec!["zzz".into()],
                ..Default::default()
            },
        ),
    ];
    for (field, delta) in cases {
        let err = base.apply_delta(delta).unwrap_err();
        assert_eq!(field_of(err), field);
    }
    assert_eq!(base, before);
}
