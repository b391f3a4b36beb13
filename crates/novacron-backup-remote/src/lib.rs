//! A backup datastore reached over HTTPS, and one handle over datastores
//! wherever they are.
//!
//! - [`serve`]: the routes of the `backup-store` role (`novacron
//!   backup-store serve`): one datastore directory, served over mTLS to
//!   the cluster's servers only (client certificates from the cluster CA
//!   whose name is `novacron-server`).
//! - [`RemoteStore`]: what the server reaches such a store with.
//! - [`StoreHandle`]: the datastore operations the server needs, on a
//!   directory of its own or on a remote store alike.
//! - [`sync`]: copies the backups one store has and another lacks, with
//!   many chunk transfers in flight so a long round trip does not throttle
//!   the copy.

mod client;
mod handle;
pub mod serve;
pub mod sync;
pub mod wire;

pub use client::RemoteStore;
pub use handle::{ErrorKind, HandleError, StoreHandle};
