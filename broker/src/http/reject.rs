//! [`Reject`]: every refusal the front door answers, as JSON with its code.
//!
//! SPEC: errors are JSON `{"error": "...", ...}` with the fitting code. Each
//! handler returns `Result<_, Reject>`, so no error path can answer plain text.

use std::collections::BTreeMap;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::wire::ErrorBody;
use crate::handle::ApiError;

/// A refused request: the code and the JSON body.
#[derive(Debug)]
pub struct Reject {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// Close the connection after answering (the request body was left unread).
    pub close: bool,
}

impl Reject {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Reject {
        Reject { status, body: ErrorBody { error: error.into(), param: None, params: None, scope: None }, close: false }
    }

    /// A 401: no token, or one this front door does not know. Answered with `WWW-Authenticate: Bearer`.
    pub fn unauthorized(error: impl Into<String>) -> Reject {
        Reject::new(StatusCode::UNAUTHORIZED, error)
    }

    /// A 403: the token is known but lacks `scope`.
    pub fn forbidden(scope: &str, error: impl Into<String>) -> Reject {
        let mut reject = Reject::new(StatusCode::FORBIDDEN, error);
        reject.body.scope = Some(scope.to_owned());
        reject
    }

    /// A 400 about one query or body field.
    pub fn param(param: &str, error: impl Into<String>) -> Reject {
        let mut reject = Reject::new(StatusCode::BAD_REQUEST, error);
        reject.body.param = Some(param.to_owned());
        reject
    }

    pub fn not_found(error: impl Into<String>) -> Reject {
        Reject::new(StatusCode::NOT_FOUND, error)
    }

    pub fn closing(mut self) -> Reject {
        self.close = true;
        self
    }
}

impl From<ApiError> for Reject {
    fn from(error: ApiError) -> Reject {
        let status = match &error {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadParams(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Busy => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut reject = Reject::new(status, error.to_string());
        if let ApiError::BadParams(problems) = &error {
            // One problem per param (config::params::validate), so a map loses nothing.
            let by_param: BTreeMap<String, String> =
                problems.iter().map(|p| (p.param.clone(), p.problem.to_string())).collect();
            reject.body.params = Some(by_param);
        }
        reject
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        let headers = response.headers_mut();
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"jobz\""));
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.status == StatusCode::SERVICE_UNAVAILABLE {
            // A hint for well-behaved clients (curl --retry honours it).
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
