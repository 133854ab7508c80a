//! Errors as OpenAI's API writes them: an HTTP status and
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tilt_engine::{EngineError, ErrorKind};

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for people.
    pub message: String,
    /// The request field it concerns, when there is one (OpenAI's name).
    pub param: Option<String>,
    /// A short code (`invalid_value`, `model_not_found`, …).
    pub code: Option<&'static str>,
    /// Seconds after which to try again (429, 503).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

impl ApiError {
    /// An error with a status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A 400 naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        let message = format!("{param}: {}", message.into());
        ApiError {
            param: Some(param),
            code: Some("invalid_value"),
            ..ApiError::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// With a code.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// An engine error as HTTP: invalid input 400 (its parameter named as the request field
    /// that sets it, by `field`), unavailable 503, internal 500, cancelled 499.
    pub fn from_engine(e: &EngineError, field: impl Fn(&str) -> String) -> Self {
        let status = match e.kind() {
            ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Cancelled => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::REQUEST_TIMEOUT)
            }
        };
        let param = e.param().map(&field);
        let message = match (e, &param) {
            (EngineError::Invalid { problem, .. }, Some(p)) => format!("{p}: {problem}"),
            _ => e.to_string(),
        };
        ApiError {
            status,
            message,
            param,
            code: match e.kind() {
                ErrorKind::InvalidInput => Some("invalid_value"),
                ErrorKind::Unavailable => Some("backend_unavailable"),
                ErrorKind::Internal => Some("internal_error"),
                ErrorKind::Cancelled => Some("cancelled"),
            },
            retry_after: (status == StatusCode::SERVICE_UNAVAILABLE).then_some(1),
        }
    }

    /// OpenAI's `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            413 | 400 | 422 => "invalid_request_error",
            429 => "rate_limit_error",
            503 => "service_unavailable",
            504 => "timeout_error",
            _ => "server_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::to_string(&Body {
            error: Inner {
                message: &self.message,
                kind: self.kind(),
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_else(|_| "{\"error\":{\"message\":\"error\"}}".into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}
