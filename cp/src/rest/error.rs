//! The one place where errors become HTTP: status and Kuma-shaped JSON body.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::model::FieldError;
use crate::store;

/// Every way a REST call can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed (not JSON, disagrees with its path, bad query parameter).
    #[error("{details}")]
    BadRequest {
        /// What is wrong, in a sentence.
        details: String,
        /// The fields at fault.
        causes: Vec<FieldError>,
    },
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 422: the resource fails validation.
    #[error("resource is not valid")]
    Invalid(Vec<FieldError>),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// 500: a bug or an I/O failure; logged.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// 422 with these causes.
    pub fn invalid(causes: Vec<FieldError>) -> ApiError {
        ApiError::Invalid(causes)
    }

    /// 400 naming a query parameter or header.
    pub fn bad_param(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            details: format!("invalid parameter {field}"),
            causes: vec![FieldError {
                field: field.to_owned(),
                message: message.into(),
            }],
        }
    }
}

fn cause(field: &str, message: String) -> Vec<FieldError> {
    vec![FieldError {
        field: field.to_owned(),
        message,
    }]
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, title, details, causes) = match self {
            ApiError::BadRequest { details, causes } => {
                (StatusCode::BAD_REQUEST, "Bad Request", details, causes)
            }
            ApiError::NotFound(d) => (StatusCode::NOT_FOUND, "Not Found", d, vec![]),
            ApiError::Invalid(causes) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "Could not process a resource",
                "Resource is not valid".to_owned(),
                causes,
            ),
            ApiError::Store(e) => match e {
                store::Error::NotFound { .. } => {
                    (StatusCode::NOT_FOUND, "Not Found", e.to_string(), vec![])
                }
                store::Error::Conflict { .. } => (
                    StatusCode::CONFLICT,
                    "Conflict",
                    e.to_string(),
                    cause(
                        "resourceVersion",
                        "the resource changed since it was read: get it again and retry".into(),
                    ),
                ),
                store::Error::MeshNotFound { ref mesh } => (
                    StatusCode::NOT_FOUND,
                    "Not Found",
                    e.to_string(),
                    cause(
                        "mesh",
                        format!("mesh {mesh:?} does not exist: create it first"),
                    ),
                ),
                store::Error::MeshNotEmpty { .. } => {
                    (StatusCode::CONFLICT, "Conflict", e.to_string(), vec![])
                }
                other => {
                    tracing::error!(error = %other, "store failure");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Internal Server Error",
                        other.to_string(),
                        vec![],
                    )
                }
            },
            ApiError::Internal(d) => {
                tracing::error!(error = %d, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal Server Error",
                    d,
                    vec![],
                )
            }
        };
        let body = json!({
            "status": status.as_u16(),
            "title": title,
            "details": details,
            "causes": causes,
        });
        (status, Json(body)).into_response()
    }
}
