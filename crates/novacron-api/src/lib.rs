//! NovaCron API: object types, validation, the error body and a typed HTTP client.
//! No I/O except in [`client`].

pub mod client;
pub mod error;
pub mod identity;
pub mod scheduling;
pub mod selector;
pub mod types;
pub mod units;
pub mod validate;

pub use error::{ErrorBody, ErrorDetail, FieldError};
pub use identity::*;
pub use scheduling::*;
pub use types::*;

/// Header an agent uses to authenticate the server's calls.
pub const AGENT_SECRET_HEADER: &str = "x-novacron-agent-secret";
