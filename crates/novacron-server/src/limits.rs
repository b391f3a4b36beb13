//! Limits on what a caller keeps open: watch streams and console sessions
//! hold a connection and a task each for as long as the caller likes, so one
//! token must not be able to hold them without bound.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::ApiError;

/// Watch streams one token may hold open (an agent holds two or three; the
/// CLI one per `--wait`; a dashboard one per view).
pub const MAX_WATCHES_PER_TOKEN: u32 = 32;
/// Console sessions one token may hold open.
pub const MAX_CONSOLES_PER_TOKEN: u32 = 4;
/// Largest WebSocket message a console client may send (keystrokes and pastes).
pub const MAX_CONSOLE_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Held {
    Watch,
    Console,
}

impl Held {
    fn limit(self) -> u32 {
        match self {
            Held::Watch => MAX_WATCHES_PER_TOKEN,
            Held::Console => MAX_CONSOLES_PER_TOKEN,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Held::Watch => "watch streams",
            Held::Console => "console sessions",
        }
    }
}

/// Open streams per token and kind.
#[derive(Debug, Default)]
pub struct OpenStreams {
    held: Mutex<HashMap<(String, Held), u32>>,
}

/// One open stream; closing it (dropping the slot) frees its place.
#[derive(Debug)]
pub struct Slot {
    streams: Arc<OpenStreams>,
    key: (String, Held),
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.streams.held.lock();
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

impl OpenStreams {
    /// A place for one more stream of `kind` for `token`, or 429 when it holds
    /// its limit already.
    pub fn open(self: &Arc<Self>, token: &str, kind: Held) -> Result<Slot, ApiError> {
        let key = (token.to_string(), kind);
        let mut held = self.held.lock();
        let n = held.entry(key.clone()).or_default();
        if *n >= kind.limit() {
            return Err(ApiError::too_many(
                format!(
                    "token {token:?} holds {} {} open already, the most it may; close one first",
                    kind.limit(),
                    kind.what()
                ),
                1,
            ));
        }
        *n += 1;
        Ok(Slot {
            streams: self.clone(),
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_holds_at_most_its_limit_and_a_closed_stream_frees_its_place() {
        let streams = Arc::new(OpenStreams::default());
        let consoles: Vec<Slot> = (0..MAX_CONSOLES_PER_TOKEN)
            .map(|_| streams.open("t", Held::Console))
            .collect::<Result<_, _>>()
            .unwrap_or_default();
        assert_eq!(consoles.len() as u32, MAX_CONSOLES_PER_TOKEN);
        let refused = streams.open("t", Held::Console);
        assert!(matches!(&refused, Err(e) if e.status == axum::http::StatusCode::TOO_MANY_REQUESTS));
        // Other tokens and other kinds are counted apart.
        assert!(streams.open("u", Held::Console).is_ok());
        assert!(streams.open("t", Held::Watch).is_ok());
        drop(consoles);
        assert!(streams.open("t", Held::Console).is_ok());
        assert!(streams.held.lock().is_empty(), "every slot was dropped");
    }
}
