//! The JSON error body every API error uses.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{ "error": { "code", "message", "field"? } }`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable code, e.g. `invalid`, `not_found`, `conflict`.
    pub code: String,
    pub message: String,
    /// The request field at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A validation failure on one field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An error and its sources on one line, "a: b: c": how NovaCron prints an
/// error anywhere (logs, the CLI, messages handed on to a caller). Messages
/// stay short and the cause is chained, never pasted in.
/// The message of an error answer: the `message` of an [`ErrorBody`], or
/// the text itself when it is not one (e.g. an older agent's plain text).
pub fn message_of(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .map(|b| b.error.message)
        .unwrap_or_else(|_| body.trim().to_string())
}

pub fn chain<'a>(e: &'a (dyn std::error::Error + 'a)) -> Chain<'a> {
    Chain(e)
}

/// See [`chain`].
pub struct Chain<'a>(&'a (dyn std::error::Error + 'a));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod chain_tests {
    use super::{chain, FieldError};

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot start VM")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_and_its_sources_on_one_line() {
        let inner = std::io::Error::other(FieldError::new("disk", "is full"));
        assert_eq!(chain(&Outer(inner)).to_string(), "Cannot start VM: disk: is full");
        assert_eq!(
            chain(&FieldError::new("name", "too long")).to_string(),
            "name: too long"
        );
    }
}
