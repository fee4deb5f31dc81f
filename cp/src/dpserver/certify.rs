//! `Identity.Certify`: signs a dataplane's CSR for the services both its credentials and its
//! Dataplane allow. The dataplane's key never reaches the CP: only the CSR does.

use std::collections::BTreeSet;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_api::v1::{CertifyRequest, CertifyResponse, certify_request, identity_server::Identity};

use crate::insight;
use crate::metrics::ReasonLabels;
use crate::model::Kind;
use crate::store::ResourceKey;

use super::DpServer;
use super::auth;

/// A gRPC code's name, for the refusal metric.
pub(crate) fn reason_of(s: &Status) -> String {
    format!("{:?}", s.code()).to_lowercase()
}

#[tonic::async_trait]
impl Identity for DpServer {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.remote_addr();
        let certs = request.peer_certs();
        let req = request.into_inner();
        let result = self.certify_inner(req.clone(), certs).await;
        match &result {
            Ok(r) => tracing::info!(mesh = %req.mesh, dataplane = %req.dataplane_name, ?peer,
                ids = ?r.get_ref().spiffe_ids, "issued a certificate"),
            Err(s) => {
                self.metrics
                    .dp_refused
                    .get_or_create(&ReasonLabels {
                        reason: reason_of(s),
                    })
                    .inc();
                tracing::warn!(mesh = %req.mesh, dataplane = %req.dataplane_name, ?peer,
                    reason = %s.message(), "refused a certificate");
            }
        }
        result
    }
}

impl DpServer {
    async fn certify_inner(
        &self,
        req: CertifyRequest,
        certs: Option<Arc<Vec<rustls_pki_types::CertificateDer<'static>>>>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let (mesh, name) = (req.mesh.clone(), req.dataplane_name.clone());
        if mesh.is_empty() || name.is_empty() {
            return Err(Status::invalid_argument(
                "mesh and dataplane_name are required",
            ));
        }
        let view = auth::view(self, &mesh)?;
        let token = match &req.auth {
            Some(certify_request::Auth::Token(t)) => t.as_str(),
            None => "",
        };
        let caller = auth::authenticate(self, &view, &mesh, &name, token, certs).await?;
        let dataplane = if req.dataplane_yaml.trim().is_empty() {
            let key = ResourceKey::new(Kind::Dataplane.type_name(), &mesh, &name);
            let stored = self
                .blocking(move |s| s.get(&key))
                .await?
                .map_err(|e| Status::unavailable(e.to_string()))?
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "dataplane {name:?} is not registered in mesh {mesh:?}: send dataplane_yaml"
                    ))
                })?;
            let v: serde_json::Value = serde_json::from_slice(&stored.body)
                .map_err(|e| Status::internal(format!("stored dataplane: {e}")))?;
            crate::model::Resource::from_json(&v)
                .map_err(|e| Status::internal(format!("stored dataplane: {e}")))?
        } else {
            auth::parse_dataplane(&req.dataplane_yaml, &mesh, &name)?
        };
        let Some(cas) = view.cas.clone() else {
            return Err(Status::failed_precondition(format!(
                "mesh {mesh:?} has mTLS disabled: it issues no certificates"
            )));
        };
        let dp_services: BTreeSet<String> = dataplane
            .dataplane()
            .map(|d| d.services().into_iter().collect())
            .unwrap_or_default();
        let allowed: BTreeSet<String> = caller
            .allowed_services(&mesh)
            .intersection(&dp_services)
            .cloned()
            .collect();
        let _permit = self
            .signing
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let leaf = cas
            .signing
            .sign_dataplane_csr(
                &req.csr_pem,
                &mesh,
                Some(&name),
                &allowed,
                cas.leaf_lifetime,
            )
            .map_err(|e| {
                let why = match &e {
                    crate::ca::Error::UnknownService { service, .. } => {
                        if dp_services.contains(service) {
                            format!("{e} (the {} does not allow it)", caller.method())
                        } else {
                            format!("{e} (no inbound of the Dataplane declares it)")
                        }
                    }
                    _ => e.to_string(),
                };
                Status::permission_denied(why)
            })?;
        let spiffe_ids = crate::ca::spiffe_ids_of(&leaf.cert_pem)
            .map_err(|e| Status::internal(e.to_string()))?;
        let not_after = leaf.not_after;
        let join = caller.join_record();
        let (m, n) = (mesh.clone(), name.clone());
        self.blocking(move |s| -> Result<(), insight::Error> {
            if let Some(j) = &join {
                insight::record_join(s, &m, &n, j)?;
            }
            insight::update(s, &m, &n, |i| {
                i.certs_issued += 1;
                i.cert_expiry = Some(not_after);
            })?;
            Ok(())
        })
        .await?
        .map_err(|e| Status::unavailable(e.to_string()))?;
        self.metrics.certs_issued.inc();
        Ok(Response::new(CertifyResponse {
            cert_chain_pem: leaf.cert_pem,
            trust_bundle_pem: cas.bundle_pem.clone(),
            not_after_unix: not_after.unix_timestamp(),
            spiffe_ids,
        }))
    }
}
