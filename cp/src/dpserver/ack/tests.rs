use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use weft_api::v1::{DataplaneConfig, Inbound};

use super::*;
use crate::dpserver::compile::{apply_delta, version_of};

const TIMEOUT: Duration = Duration::from_secs(30);

fn config(ports: &[u32]) -> (String, Arc<DataplaneConfig>) {
    let c = DataplaneConfig {
        mesh: "default".into(),
        dataplane_name: "web-1".into(),
        inbounds: ports
            .iter()
            .map(|p| Inbound {
                port: *p,
                service_address: "127.0.0.1".into(),
                service_port: p + 1000,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    (version_of(&c), Arc::new(c))
}

fn full(o: Option<Outgoing>) -> (String, Arc<DataplaneConfig>) {
    match o {
        Some(Outgoing {
            version,
            body: Body::Full(c),
        }) => (version, c),
        other => panic!("expected a complete config, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn first_is_complete_then_deltas_after_acks() {
    let mut s = AckState::new(TIMEOUT);
    let (v1, c1) = config(&[8080]);
    let (sent, _) = full(s.desire(v1.clone(), c1.clone(), Instant::now()));
    assert_eq!(sent, v1);
    // Nothing more while v1 is in flight; the latest desire wins when it is answered.
    let (v2, _) = config(&[8080, 8081]);
    let (v3, c3) = config(&[8081]);
    assert_eq!(s.desire(v2, config(&[8080, 8081]).1, Instant::now()), None);
    assert_eq!(s.desire(v3.clone(), c3.clone(), Instant::now()), None);
    let next = s.on_ack(&v1, Instant::now()).unwrap().unwrap();
    assert_eq!(next.version, v3);
    let Body::Delta(d) = &next.body else {
        panic!("expected a delta, got {next:?}")
    };
    assert_eq!(d.base_version, v1);
    assert_eq!(d.remove_inbounds, [8080]);
    assert_eq!(apply_delta(&c1, d), *c3);
    assert_eq!(s.on_ack(&v3, Instant::now()).unwrap(), None);
    assert_eq!(s.acked(), Some(v3.as_str()));
    // The same config again sends nothing.
    assert_eq!(s.desire(v3, c3, Instant::now()), None);
}

#[tokio::test(start_paused = true)]
async fn nacked_delta_is_followed_by_the_complete_config() {
    let mut s = AckState::new(TIMEOUT);
    let (v1, c1) = config(&[8080]);
    s.desire(v1.clone(), c1, Instant::now());
    s.on_ack(&v1, Instant::now()).unwrap();
    let (v2, c2) = config(&[9090]);
    let o = s.desire(v2.clone(), c2.clone(), Instant::now()).unwrap();
    assert!(matches!(o.body, Body::Delta(_)));
    let (again, c) = full(
        s.on_nack(&v2, "delta base mismatch", Instant::now())
            .unwrap(),
    );
    assert_eq!((again.as_str(), &*c), (v2.as_str(), &*c2));
    assert_eq!(
        s.acked(),
        Some(v1.as_str()),
        "a NACK keeps the previous config"
    );
}

#[tokio::test(start_paused = true)]
async fn nacked_complete_config_is_not_resent_until_the_config_changes() {
    let mut s = AckState::new(TIMEOUT);
    let (v1, c1) = config(&[8080]);
    s.desire(v1.clone(), c1.clone(), Instant::now());
    assert_eq!(s.on_nack(&v1, "port in use", Instant::now()).unwrap(), None);
    assert_eq!(s.nacked(), Some((v1.as_str(), "port in use")));
    assert_eq!(s.desire(v1.clone(), c1, Instant::now()), None);
    let (v2, c2) = config(&[8081]);
    let (sent, _) = full(s.desire(v2.clone(), c2, Instant::now()));
    assert_eq!(sent, v2, "never ACKed anything: still complete");
    s.on_ack(&v2, Instant::now()).unwrap();
    assert_eq!(s.nacked(), None, "an ACK clears the NACK");
}

#[tokio::test(start_paused = true)]
async fn unanswered_versions_are_resent_then_given_up() {
    let mut s = AckState::new(TIMEOUT);
    let (v1, c1) = config(&[8080]);
    s.desire(v1.clone(), c1, Instant::now());
    let deadline = s.deadline().unwrap();
    tokio::time::advance(TIMEOUT - Duration::from_millis(1)).await;
    assert_eq!(s.on_timeout(Instant::now()).unwrap(), None, "not yet");
    tokio::time::sleep_until(deadline).await;
    for _ in 1..MAX_ATTEMPTS {
        let (again, _) = full(s.on_timeout(Instant::now()).unwrap());
        assert_eq!(again, v1);
        tokio::time::sleep_until(s.deadline().unwrap()).await;
    }
    let e = s.on_timeout(Instant::now()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Unanswered {
                attempts: MAX_ATTEMPTS,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test(start_paused = true)]
async fn answers_for_versions_not_in_flight_are_refused() {
    let mut s = AckState::new(TIMEOUT);
    assert!(s.on_ack("nope", Instant::now()).is_err());
    let (v1, c1) = config(&[8080]);
    s.desire(v1.clone(), c1, Instant::now());
    let e = s.on_nack("other", "x", Instant::now()).unwrap_err();
    assert!(e.to_string().contains(&v1), "{e}");
    assert_eq!(
        s.in_flight(),
        Some(v1.as_str()),
        "a stray answer leaves the state alone"
    );
}
