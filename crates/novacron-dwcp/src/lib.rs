//! DWCP (Distributed WAN Communication Protocol), NovaCron's WAN data plane
//! for migrations.
//!
//! * [`session`] (AMST, adaptive multi-stream transport): channels over N parallel TLS 1.3 streams with
//!   ordered delivery, rate limiting, BBR, acks for delivery-rate estimates;
//! * [`inflight`]: the cap on what the streams hold in the network, so that
//!   the switchover does not wait behind a standing queue;
//! * [`codec`] and [`scan`] (HDE, hierarchical delta encoding): pages found in QEMU and NBD streams travel
//!   as cache references, small deltas or zstd-compressed literals;
//! * [`nbd`]: the disk mirror's NBD requests answered on the source and
//!   replayed on the target, so that none waits a round trip;
//! * [`cache`]: the chunk cache both ends keep in step across migrations;
//! * [`plan`] (PBA, predictive bandwidth allocation): predictions of time, downtime and bytes from measured
//!   link rate, compression and dirty rate.

pub mod cache;
pub mod codec;
pub mod frame;
pub mod inflight;
pub mod nbd;
pub mod plan;
pub mod scan;
pub mod session;

pub use cache::CacheStore;
pub use scan::Role;
pub use session::{Hello, Receiver, Routes, Sender, SessionConfig, StatsSnapshot};

#[derive(Debug, thiserror::Error)]
pub enum DwcpError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("codec: {0}")]
    Codec(String),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("{0}")]
    Session(String),
}
