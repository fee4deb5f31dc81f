use axum::body::{Body, to_bytes};
use axum::http::Request;
use tower::ServiceExt as _;

use super::*;
use crate::model::{DataplaneConfig, MtlsMode};

async fn call(state: &AdminState, path: &str) -> (StatusCode, String) {
    let response = router(state.clone())
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

fn applied(mode: MtlsMode) -> Arc<Applied> {
    Arc::new(Applied {
        version: "v9".into(),
        config: DataplaneConfig {
            mesh: "default".into(),
            dataplane_name: "web-1".into(),
            mtls_mode: mode,
            transport: Default::default(),
            trust_bundle_pem: String::new(),
            signing_ca_pem: String::new(),
            inbounds: vec![],
            outbounds: vec![],
            policies: Default::default(),
        },
    })
}

#[tokio::test]
async fn routes_reflect_config_and_credentials() {
    let (config_tx, config) = watch::channel(None);
    let (creds_tx, creds) = watch::channel(None);
    let metrics = Arc::new(Metrics::new());
    let state = AdminState {
        config,
        creds,
        metrics: metrics.clone(),
    };

    let (status, body) = call(&state, "/config").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["version"],
        serde_json::Value::Null
    );
    let (status, body) = call(&state, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("no config"), "{body}");

    config_tx.send_replace(Some(applied(MtlsMode::Strict)));
    let (status, body) = call(&state, "/config").await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["version"], "v9");
    assert_eq!(json["config"]["mtlsMode"], "STRICT");
    assert_eq!(json["config"]["dataplaneName"], "web-1");
    let (status, body) = call(&state, "/ready").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "mTLS needs a certificate"
    );
    assert!(body.contains("certificate"), "{body}");

    let now = now_unix();
    creds_tx.send_replace(Some(Arc::new(Credentials {
        cert_chain_pem: String::new(),
        key_pem: String::new(),
        trust_bundle_pem: String::new(),
        not_before: now - 10,
        not_after: now + 3600,
        spiffe_ids: vec![],
    })));
    assert_eq!(
        call(&state, "/ready").await,
        (StatusCode::OK, "ready\n".into())
    );

    creds_tx.send_replace(None);
    config_tx.send_replace(Some(applied(MtlsMode::Disabled)));
    assert_eq!(
        call(&state, "/ready").await.0,
        StatusCode::OK,
        "no mTLS, no cert needed"
    );

    metrics.configs_applied.inc();
    metrics.cert_expiry.set(1234);
    let (status, body) = call(&state, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for needle in [
        "weft_dp_cp_connected 0",
        "weft_dp_cp_reconnects_total 0",
        "weft_dp_configs_applied_total 1",
        "weft_dp_configs_rejected_total 0",
        "weft_dp_cert_renewals_total 0",
        "weft_dp_cert_expiry_timestamp_seconds 1234",
    ] {
        assert!(body.contains(needle), "{needle} missing in\n{body}");
    }
}
