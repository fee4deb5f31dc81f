use std::collections::BTreeMap;

use weft_api::v1::discovery_response::Close;

use super::*;

fn config(mesh: &str, name: &str, ports: &[u32]) -> v1::DataplaneConfig {
    v1::DataplaneConfig {
        mesh: mesh.into(),
        dataplane_name: name.into(),
        mtls_mode: v1::dataplane_config::MtlsMode::Disabled as i32,
        inbounds: ports
            .iter()
            .map(|p| v1::Inbound {
                port: *p,
                service_port: 8080,
                tags: BTreeMap::from([("kuma.io/service".into(), "web".into())]),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn complete(version: &str, c: v1::DataplaneConfig) -> v1::DiscoveryResponse {
    v1::DiscoveryResponse {
        version: version.into(),
        kind: Some(Resp::Config(c)),
    }
}

fn delta(version: &str, d: v1::ConfigDelta) -> v1::DiscoveryResponse {
    v1::DiscoveryResponse {
        version: version.into(),
        kind: Some(Resp::Delta(d)),
    }
}

fn acked(o: &Outcome) -> &str {
    match o {
        Outcome::Applied {
            reply:
                v1::DiscoveryRequest {
                    kind: Some(Req::Ack(Ack { version })),
                },
            ..
        } => version,
        other => panic!("expected an ACK, got {other:?}"),
    }
}

fn nacked(o: &Outcome) -> (&str, &str) {
    match o {
        Outcome::Rejected {
            reply:
                v1::DiscoveryRequest {
                    kind: Some(Req::Nack(Nack { version, error })),
                },
            reason,
        } => {
            assert_eq!(error, reason);
            (version, error)
        }
        other => panic!("expected a NACK, got {other:?}"),
    }
}

#[test]
fn complete_then_delta_are_acked_and_applied() {
    let mut s = AckState::new("default", "web-1", None);
    assert!(s.current().is_none());
    let o = s.handle(complete("v1", config("default", "web-1", &[15000])));
    assert_eq!(acked(&o), "v1");
    assert_eq!(s.current().unwrap().version, "v1");

    let o = s.handle(delta(
        "v2",
        v1::ConfigDelta {
            base_version: "v1".into(),
            upsert_inbounds: config("default", "web-1", &[15001]).inbounds,
            ..Default::default()
        },
    ));
    assert_eq!(acked(&o), "v2");
    let Outcome::Applied { applied, .. } = &o else {
        unreachable!()
    };
    assert_eq!(applied.version, "v2");
    let ports: Vec<u16> = applied.config.inbounds.iter().map(|i| i.port).collect();
    assert_eq!(ports, vec![15000, 15001]);
    assert_eq!(s.current().unwrap(), applied);
}

#[test]
fn delta_on_the_wrong_base_is_nacked_and_keeps_the_config() {
    let mut s = AckState::new("default", "web-1", None);
    let o = s.handle(delta(
        "v1",
        v1::ConfigDelta {
            base_version: "v0".into(),
            ..Default::default()
        },
    ));
    let (version, error) = nacked(&o);
    assert_eq!(version, "v1");
    assert!(error.contains("delta base v0"), "{error}");

    s.handle(complete("v5", config("default", "web-1", &[15000])));
    let o = s.handle(delta(
        "v7",
        v1::ConfigDelta {
            base_version: "v6".into(),
            remove_inbounds: vec![15000],
            ..Default::default()
        },
    ));
    let (version, error) = nacked(&o);
    assert_eq!(version, "v7");
    assert_eq!(error, "delta base v6 does not match current v5");
    assert_eq!(s.current().unwrap().version, "v5");
    assert_eq!(s.current().unwrap().config.inbounds.len(), 1);
}

#[test]
fn invalid_configs_are_nacked_with_the_reason() {
    let mut s = AckState::new("default", "web-1", None);
    s.handle(complete("v1", config("default", "web-1", &[15000])));
    for (c, needle) in [
        (config("other", "web-1", &[1]), "other/web-1"),
        (config("default", "web-2", &[1]), "web-2"),
        (config("default", "web-1", &[0]), "inbounds[0].port"),
        (config("default", "web-1", &[70000]), "inbounds[0].port"),
        (
            config("default", "web-1", &[5, 5]),
            "duplicate inbound port 5",
        ),
        (
            v1::DataplaneConfig {
                trust_bundle_pem: "junk".into(),
                ..config("default", "web-1", &[1])
            },
            "trustBundlePem",
        ),
    ] {
        let o = s.handle(complete("bad", c));
        let (version, error) = nacked(&o);
        assert_eq!(version, "bad");
        assert!(error.contains(needle), "{error} should mention {needle}");
        assert_eq!(
            s.current().unwrap().version,
            "v1",
            "a NACK keeps the config"
        );
    }
    let o = s.handle(v1::DiscoveryResponse {
        version: "empty".into(),
        kind: None,
    });
    assert_eq!(nacked(&o).0, "empty");
}

#[test]
fn close_reports_reason_and_code() {
    let mut s = AckState::new("default", "web-1", None);
    let o = s.handle(v1::DiscoveryResponse {
        version: String::new(),
        kind: Some(Resp::Close(Close {
            reason: "token revoked".into(),
            code: Code::Revoked as i32,
        })),
    });
    assert_eq!(
        o,
        Outcome::Closed {
            reason: "token revoked".into(),
            code: CloseCode::Revoked
        }
    );
    assert!(CloseCode::Revoked.is_final() && CloseCode::Deleted.is_final());
    assert!(!CloseCode::Draining.is_final() && !CloseCode::Replaced.is_final());
    assert_eq!(CloseCode::from(99), CloseCode::Unspecified);
}

#[test]
fn persisted_config_is_the_starting_point_only_for_this_dataplane() {
    let mut s = AckState::new("default", "web-1", None);
    let Outcome::Applied { applied, .. } =
        s.handle(complete("v3", config("default", "web-1", &[15000])))
    else {
        panic!("not applied")
    };
    let persisted: Applied =
        serde_json::from_str(&serde_json::to_string(&*applied).unwrap()).unwrap();
    let mut s = AckState::new("default", "web-1", Some(persisted.clone()));
    assert_eq!(s.current().unwrap().version, "v3");
    let o = s.handle(delta(
        "v4",
        v1::ConfigDelta {
            base_version: "v3".into(),
            ..Default::default()
        },
    ));
    assert_eq!(acked(&o), "v4");
    assert!(
        AckState::new("default", "api-1", Some(persisted))
            .current()
            .is_none()
    );
}
