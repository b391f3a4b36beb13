//! NovaCron API: object types, validation and the error body. No I/O: the
//! HTTP client is `novacron-client`.

pub mod agent;
pub mod error;
pub mod identity;
pub mod migration;
pub mod scheduling;
pub mod selector;
pub mod types;
pub mod units;
pub mod validate;

pub use error::{ErrorBody, ErrorDetail, FieldError};
pub use identity::*;
pub use migration::*;
pub use scheduling::*;
pub use types::*;

/// Header an agent uses to authenticate the server's calls.
pub const AGENT_SECRET_HEADER: &str = "x-novacron-agent-secret";
