//! A small NBD client (the protocol's fixed newstyle handshake and
//! structured replies), enough to pull a backup out of QEMU: read an
//! export, and ask which extents are allocated (`base:allocation`) or dirty
//! in a QEMU dirty bitmap (`qemu:dirty-bitmap:NAME`). One request at a
//! time over a Unix socket; QEMU (`block-export-add`, `qemu-nbd`,
//! `qemu-storage-daemon`) is the server.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERROR_BIT: u32 = 1 << 31;

const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_NONE: u16 = 0;
const REPLY_OFFSET_DATA: u16 = 1;
const REPLY_OFFSET_HOLE: u16 = 2;
const REPLY_BLOCK_STATUS: u16 = 5;
const REPLY_ERROR_BIT: u16 = 1 << 15;

/// The most a read or block-status request asks for (QEMU's limit is 32 MiB).
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD connection failed")]
    Io(#[from] std::io::Error),
    #[error("the server does not speak NBD as expected: {0}")]
    Protocol(String),
    #[error("the server refused option {option}: error {code:#x} {message}")]
    OptionRefused { option: u32, code: u32, message: String },
    #[error("the server has no meta context {0:?} (is the bitmap exported?)")]
    NoContext(String),
    #[error("the server failed the request: error {code} {message}")]
    Request { code: u32, message: String },
    #[error("request out of range: {offset}+{length} of an export of {size} bytes")]
    Range { offset: u64, length: u64, size: u64 },
}

/// An extent of an export and its status flags in one meta context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

/// `base:allocation` flags: a hole (reads as zeros unless also not ZERO).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flags: reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flags: changed since the bitmap was cleared.
pub const STATE_DIRTY: u32 = 1;

pub struct NbdClient {
    sock: UnixStream,
    size: u64,
    /// Meta context ids, in the order asked for.
    contexts: Vec<(String, u32)>,
    cookie: u64,
}

impl NbdClient {
    /// Connects to export `export` at `path`, asking for the meta contexts
    /// `contexts` (e.g. `base:allocation`, `qemu:dirty-bitmap:cbt`); each
    /// must be there.
    pub async fn connect(path: &Path, export: &str, contexts: &[&str]) -> Result<NbdClient, NbdError> {
        let mut sock = UnixStream::connect(path).await?;
        if sock.read_u64().await? != NBDMAGIC || sock.read_u64().await? != IHAVEOPT {
            return Err(NbdError::Protocol("not a newstyle NBD server".into()));
        }
        let flags = sock.read_u16().await?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Protocol("no fixed newstyle negotiation".into()));
        }
        sock.write_u32(u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)))
            .await?;
        let mut c = NbdClient {
            sock,
            size: 0,
            contexts: Vec::new(),
            cookie: 0,
        };
        c.option(OPT_STRUCTURED_REPLY, &[]).await?;
        c.expect_ack(OPT_STRUCTURED_REPLY).await?;
        if !contexts.is_empty() {
            let mut data = name_field(export);
            data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                data.extend(name_field(q));
            }
            c.option(OPT_SET_META_CONTEXT, &data).await?;
            loop {
                let (kind, payload) = c.option_reply(OPT_SET_META_CONTEXT).await?;
                match kind {
                    REP_ACK => break,
                    REP_META_CONTEXT if payload.len() >= 4 => {
                        let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                        let name = String::from_utf8_lossy(&payload[4..]).into_owned();
                        c.contexts.push((name, id));
                    }
                    other => return Err(NbdError::Protocol(format!("meta context reply {other}"))),
                }
            }
            for q in contexts {
                if !c.contexts.iter().any(|(n, _)| n == q) {
                    return Err(NbdError::NoContext(q.to_string()));
                }
            }
        }
        let mut go = name_field(export);
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        c.option(OPT_GO, &go).await?;
        let mut got_size = false;
        loop {
            let (kind, payload) = c.option_reply(OPT_GO).await?;
            match kind {
                REP_ACK => break,
                REP_INFO if payload.len() >= 12 && payload[..2] == INFO_EXPORT.to_be_bytes() => {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&payload[2..10]);
                    c.size = u64::from_be_bytes(s);
                    got_size = true;
                }
                REP_INFO => {}
                other => return Err(NbdError::Protocol(format!("go reply {other}"))),
            }
        }
        if !got_size {
            return Err(NbdError::Protocol("the server did not give the export's size".into()));
        }
        Ok(c)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    async fn option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.sock.write_all(&msg).await?;
        Ok(())
    }

    /// One reply to `option`: its type and payload; an error reply is an error.
    async fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        if self.sock.read_u64().await? != OPT_REPLY_MAGIC {
            return Err(NbdError::Protocol("bad option reply magic".into()));
        }
        let for_option = self.sock.read_u32().await?;
        let kind = self.sock.read_u32().await?;
        let len = self.sock.read_u32().await?;
        if len > 64 * 1024 {
            return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
        }
        let mut payload = vec![0u8; len as usize];
        self.sock.read_exact(&mut payload).await?;
        if for_option != option {
            return Err(NbdError::Protocol(format!(
                "reply to option {for_option}, not {option}"
            )));
        }
        if kind & REP_ERROR_BIT != 0 {
            return Err(NbdError::OptionRefused {
                option,
                code: kind,
                message: String::from_utf8_lossy(&payload).into_owned(),
            });
        }
        Ok((kind, payload))
    }

    async fn expect_ack(&mut self, option: u32) -> Result<(), NbdError> {
        match self.option_reply(option).await? {
            (REP_ACK, _) => Ok(()),
            (other, _) => Err(NbdError::Protocol(format!("reply {other} where an ack was due"))),
        }
    }

    fn check_range(&self, offset: u64, length: u32) -> Result<(), NbdError> {
        if length == 0 || length > MAX_REQUEST || offset.saturating_add(u64::from(length)) > self.size {
            return Err(NbdError::Range {
                offset,
                length: u64::from(length),
                size: self.size,
            });
        }
        Ok(())
    }

    async fn request(&mut self, kind: u16, offset: u64, length: u32) -> Result<u64, NbdError> {
        self.cookie += 1;
        let mut msg = [0u8; 28];
        msg[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg[6..8].copy_from_slice(&kind.to_be_bytes());
        msg[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        msg[16..24].copy_from_slice(&offset.to_be_bytes());
        msg[24..28].copy_from_slice(&length.to_be_bytes());
        self.sock.write_all(&msg).await?;
        Ok(self.cookie)
    }

    /// Reads `buf.len()` bytes at `offset` (holes come back as zeros).
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let length = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        self.check_range(offset, length)?;
        let cookie = self.request(CMD_READ, offset, length).await?;
        let mut filled = 0u64;
        loop {
            let chunk = self.reply_chunk(cookie).await?;
            let Some((flags, kind, len)) = chunk else {
                // A simple reply: the data follows.
                self.sock.read_exact(buf).await?;
                return Ok(());
            };
            match kind {
                REPLY_NONE => {}
                REPLY_OFFSET_DATA => {
                    let at = self.sock.read_u64().await?;
                    let n = len
                        .checked_sub(8)
                        .ok_or_else(|| NbdError::Protocol("short data chunk".into()))?;
                    let start = at
                        .checked_sub(offset)
                        .filter(|s| s + u64::from(n) <= buf.len() as u64)
                        .ok_or_else(|| NbdError::Protocol(format!("data at {at} outside the read")))?;
                    self.sock
                        .read_exact(&mut buf[start as usize..start as usize + n as usize])
                        .await?;
                    filled += u64::from(n);
                }
                REPLY_OFFSET_HOLE => {
                    let at = self.sock.read_u64().await?;
                    let n = self.sock.read_u32().await?;
                    let start = at
                        .checked_sub(offset)
                        .filter(|s| s + u64::from(n) <= buf.len() as u64)
                        .ok_or_else(|| NbdError::Protocol(format!("hole at {at} outside the read")))?;
                    buf[start as usize..start as usize + n as usize].fill(0);
                    filled += u64::from(n);
                }
                k if k & REPLY_ERROR_BIT != 0 => return Err(self.reply_error(len).await?),
                other => {
                    self.skip(len).await?;
                    return Err(NbdError::Protocol(format!("read reply type {other}")));
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if filled != buf.len() as u64 {
            return Err(NbdError::Protocol(format!(
                "read of {} bytes came back with {filled}",
                buf.len()
            )));
        }
        Ok(())
    }

    /// The extents from `offset` on (up to `length` bytes; the server may
    /// describe less) with their flags in meta context `context`.
    pub async fn block_status(&mut self, context: &str, offset: u64, length: u32) -> Result<Vec<Extent>, NbdError> {
        let length = length.min(u32::try_from(self.size - offset.min(self.size)).unwrap_or(u32::MAX));
        self.check_range(offset, length)?;
        let id = self
            .contexts
            .iter()
            .find(|(n, _)| n == context)
            .map(|(_, id)| *id)
            .ok_or_else(|| NbdError::NoContext(context.into()))?;
        let cookie = self.request(CMD_BLOCK_STATUS, offset, length).await?;
        let mut extents = Vec::new();
        loop {
            let Some((flags, kind, len)) = self.reply_chunk(cookie).await? else {
                return Err(NbdError::Protocol("simple reply to block status".into()));
            };
            match kind {
                REPLY_BLOCK_STATUS if len >= 4 && (len - 4) % 8 == 0 => {
                    let ctx = self.sock.read_u32().await?;
                    let mut at = offset;
                    for _ in 0..(len - 4) / 8 {
                        let n = u64::from(self.sock.read_u32().await?);
                        let f = self.sock.read_u32().await?;
                        if ctx == id {
                            extents.push(Extent {
                                offset: at,
                                length: n,
                                flags: f,
                            });
                        }
                        at += n;
                    }
                }
                REPLY_NONE => {}
                k if k & REPLY_ERROR_BIT != 0 => return Err(self.reply_error(len).await?),
                other => {
                    self.skip(len).await?;
                    return Err(NbdError::Protocol(format!("block status reply type {other}")));
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if extents.is_empty() {
            return Err(NbdError::Protocol(format!("no extents for {context}")));
        }
        Ok(extents)
    }

    /// The next reply chunk's header for `cookie`: `None` for a simple
    /// reply without error (whose data, if any, follows).
    async fn reply_chunk(&mut self, cookie: u64) -> Result<Option<(u16, u16, u32)>, NbdError> {
        let magic = self.sock.read_u32().await?;
        if magic == SIMPLE_REPLY_MAGIC {
            let error = self.sock.read_u32().await?;
            let got = self.sock.read_u64().await?;
            if got != cookie {
                return Err(NbdError::Protocol(format!("reply for request {got}, not {cookie}")));
            }
            if error != 0 {
                return Err(NbdError::Request {
                    code: error,
                    message: String::new(),
                });
            }
            return Ok(None);
        }
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(NbdError::Protocol(format!("bad reply magic {magic:#x}")));
        }
        let flags = self.sock.read_u16().await?;
        let kind = self.sock.read_u16().await?;
        let got = self.sock.read_u64().await?;
        let len = self.sock.read_u32().await?;
        if got != cookie {
            return Err(NbdError::Protocol(format!("reply for request {got}, not {cookie}")));
        }
        Ok(Some((flags, kind, len)))
    }

    async fn reply_error(&mut self, len: u32) -> Result<NbdError, NbdError> {
        if len < 6 {
            return Err(NbdError::Protocol("short error chunk".into()));
        }
        let code = self.sock.read_u32().await?;
        let msg_len = self.sock.read_u16().await?;
        let mut msg = vec![0u8; usize::from(msg_len)];
        self.sock.read_exact(&mut msg).await?;
        let rest = (len - 6)
            .checked_sub(u32::from(msg_len))
            .ok_or_else(|| NbdError::Protocol("error message longer than its chunk".into()))?;
        self.skip(rest).await?;
        Ok(NbdError::Request {
            code,
            message: String::from_utf8_lossy(&msg).into_owned(),
        })
    }

    async fn skip(&mut self, n: u32) -> Result<(), NbdError> {
        let mut rest = vec![0u8; n as usize];
        self.sock.read_exact(&mut rest).await?;
        Ok(())
    }

    /// Ends the session politely.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        self.request(CMD_DISC, 0, 0).await?;
        self.sock.shutdown().await?;
        Ok(())
    }
}

/// A u32 length and the bytes of `s`.
fn name_field(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

pub mod server;

#[cfg(test)]
mod server_tests;
#[cfg(test)]
mod tests;
