//! Write-back disk channels: the disk mirror's NBD traffic crosses the link
//! without a round trip per request.
//!
//! On the source, QEMU's mirror talks NBD to [`serve_source`], which answers
//! every write, zero, trim and flush as soon as the request is handed to the
//! session. The requests travel in order to the target, where [`serve_target`]
//! replays them to the target QEMU's NBD export and checks every reply: one
//! failed reply fails the session, the migration rolls back, and the source
//! disk (which took every write itself) stays the one in use. The target VM
//! may only run once every disk channel has *settled*: the mirror closed it,
//! and each request it carried, plus a final flush, came back good from the
//! target's export (see `Receiver::disks_settled`).
//!
//! Why: answered end to end, each request waits a round trip, and when the
//! source VM stops, QEMU drains and flushes the mirror — round trips queued
//! behind everything else on the link, all inside the guest's pause.
//!
//! ```text
//! source QEMU ─NBD─▶ serve_source ──(export name, then requests)──▶ serve_target ─NBD─▶ target QEMU
//!             ◀reply (at once)     ◀──(export size and flags)──────            ◀reply (checked)
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{watch, Notify};

use crate::DwcpError;

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
const INFO_EXPORT: u16 = 0;

/// Transmission flags passed on to the source's QEMU: the commands this
/// module can answer on its own. Not fast-zero: its "fails if slow" answer
/// can only come from the target.
const FLAG_HAS_FLAGS: u16 = 1;
const PASSED_FLAGS: u16 = FLAG_HAS_FLAGS | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 6);

const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const EINVAL: u32 = 22;

/// The largest write payload accepted (QEMU's NBD server limit).
const MAX_PAYLOAD: u32 = 32 << 20;
/// Longest export name or option payload accepted.
const MAX_OPTION: u32 = 64 * 1024;

/// How the disk channels of one session stand on the target.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DiskTally {
    pub opened: usize,
    pub settled: usize,
    pub failed: Option<String>,
}

pub type Tally = Arc<watch::Sender<DiskTally>>;

/// The target's answer about an export: its size and transmission flags, or why not.
type TargetExport = Result<(u64, u16), String>;

fn corrupt(what: impl Into<String>) -> DwcpError {
    DwcpError::Corrupt(what.into())
}

fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_DISC => "disconnect",
        _ => "command",
    }
}

// ================================================================= source

/// Serves one NBD connection of the source's QEMU. `channel` is the local end
/// of a fresh disk channel of the session: requests go in, the target's
/// export size and flags (or why it has none) come back.
pub async fn serve_source<Q, C>(qemu: Q, channel: C) -> Result<(), DwcpError>
where
    Q: AsyncRead + AsyncWrite + Unpin,
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (qrd, mut qwr) = tokio::io::split(qemu);
    let mut qrd = BufReader::new(qrd);
    let (mut crd, mut cwr) = tokio::io::split(channel);

    let mut greeting = NBD_MAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    qwr.write_all(&greeting).await?;
    let client_flags = qrd.read_u32().await?;
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    // Option haggling, until QEMU names its export.
    let mut asked: Option<(Vec<u8>, TargetExport)> = None;
    let (size, flags, opt) = loop {
        if qrd.read_u64().await? != IHAVEOPT {
            return Err(corrupt("NBD client sent a bad option"));
        }
        let (opt, len) = (qrd.read_u32().await?, qrd.read_u32().await?);
        if len > MAX_OPTION {
            return Err(corrupt(format!("NBD option of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        qrd.read_exact(&mut data).await?;
        let name = match opt {
            OPT_EXPORT_NAME => data.clone(),
            OPT_INFO | OPT_GO => {
                let n = data
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
                match n.and_then(|n| data.get(4..4 + n)) {
                    Some(name) => name.to_vec(),
                    None => {
                        option_reply(&mut qwr, opt, REP_ERR_INVALID, &[]).await?;
                        continue;
                    }
                }
            }
            OPT_ABORT => {
                option_reply(&mut qwr, opt, REP_ACK, &[]).await?;
                return Ok(());
            }
            _ => {
                // Structured replies, extended headers, meta contexts, lists:
                // simple replies are all this channel needs.
                option_reply(&mut qwr, opt, REP_ERR_UNSUP, &[]).await?;
                continue;
            }
        };
        // The target's export, asked once per connection (one round trip).
        let found = match &asked {
            Some((n, answer)) if *n == name => answer.clone(),
            _ => {
                cwr.write_u32(name.len() as u32).await?;
                cwr.write_all(&name).await?;
                cwr.flush().await?;
                let answer = match crd.read_u8().await? {
                    0 => Ok((crd.read_u64().await?, crd.read_u16().await?)),
                    _ => {
                        let len = crd.read_u32().await?.min(MAX_OPTION);
                        let mut why = vec![0u8; len as usize];
                        crd.read_exact(&mut why).await?;
                        Err(String::from_utf8_lossy(&why).into_owned())
                    }
                };
                asked = Some((name.clone(), answer.clone()));
                answer
            }
        };
        let (size, flags) = match found {
            Ok((size, flags)) => (size, flags & PASSED_FLAGS),
            Err(why) => {
                tracing::warn!(export = %String::from_utf8_lossy(&name), error = %why, "the target has no such NBD export");
                if opt == OPT_EXPORT_NAME {
                    return Err(DwcpError::Session(why));
                }
                option_reply(&mut qwr, opt, REP_ERR_UNKNOWN, &[]).await?;
                continue;
            }
        };
        if opt == OPT_INFO {
            export_info(&mut qwr, opt, size, flags).await?;
            option_reply(&mut qwr, opt, REP_ACK, &[]).await?;
            continue;
        }
        break (size, flags, opt);
    };
    if opt == OPT_EXPORT_NAME {
        let mut reply = size.to_be_bytes().to_vec();
        reply.extend_from_slice(&flags.to_be_bytes());
        if !no_zeroes {
            reply.extend_from_slice(&[0u8; 124]);
        }
        qwr.write_all(&reply).await?;
    } else {
        export_info(&mut qwr, opt, size, flags).await?;
        option_reply(&mut qwr, opt, REP_ACK, &[]).await?;
    }

    // Transmission: pass each request on, then answer it.
    let mut header = [0u8; 28];
    loop {
        match qrd.read_exact(&mut header).await {
            Ok(_) => {}
            // QEMU went away without a disconnect: the channel closes unsettled.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let (magic, cmd, cookie, len) = parse_request(&header);
        if magic != REQUEST_MAGIC {
            return Err(corrupt("NBD client sent a bad request"));
        }
        let error = match cmd {
            CMD_WRITE if len > MAX_PAYLOAD => return Err(corrupt(format!("NBD write of {len} bytes"))),
            CMD_WRITE => {
                cwr.write_all(&header).await?;
                let copied = tokio::io::copy(&mut (&mut qrd).take(u64::from(len)), &mut cwr).await?;
                if copied != u64::from(len) {
                    return Err(corrupt("NBD write cut short"));
                }
                0
            }
            CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES => {
                cwr.write_all(&header).await?;
                0
            }
            CMD_DISC => {
                cwr.write_all(&header).await?;
                cwr.shutdown().await?;
                return Ok(());
            }
            // Reads and the rest would need the target's answer: the mirror never sends them.
            other => {
                tracing::warn!(command = other, "NBD command not carried over DWCP");
                EINVAL
            }
        };
        let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        reply.extend_from_slice(&error.to_be_bytes());
        reply.extend_from_slice(&cookie.to_be_bytes());
        qwr.write_all(&reply).await?;
    }
}

fn parse_request(h: &[u8; 28]) -> (u32, u16, u64, u32) {
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let cmd = u16::from_be_bytes([h[6], h[7]]);
    let cookie = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
    (magic, cmd, cookie, len)
}

/// A simple NBD request header (no payload).
pub fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

fn request_offset(h: &[u8; 28]) -> u64 {
    u64::from_be_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]])
}

async fn option_reply<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&opt.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    w.write_all(&r).await
}

async fn export_info<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, size: u64, flags: u16) -> std::io::Result<()> {
    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&size.to_be_bytes());
    info.extend_from_slice(&flags.to_be_bytes());
    option_reply(w, opt, REP_INFO, &info).await
}

// ================================================================= target

/// Requests sent to the target's export and not yet answered, by our cookie.
#[derive(Default)]
struct InFlight {
    requests: Mutex<HashMap<u64, (u16, u64, u32)>>,
    emptied: Notify,
}

impl InFlight {
    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<u64, (u16, u64, u32)>> {
        self.requests.lock()
    }

    async fn drained(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

/// Replays one disk channel (`channel`: what the source sent; answers go back
/// through it) to the target QEMU's NBD server `export`, and counts it in
/// `tally` as opened, then settled once the source's disconnect arrived and
/// everything before it, plus a flush, is answered without error.
pub async fn serve_target<C, E>(channel: C, export: E, tally: &Tally) -> Result<(), DwcpError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    E: AsyncRead + AsyncWrite + Unpin,
{
    tally.send_modify(|t| t.opened += 1);
    let (crd, mut cwr) = tokio::io::split(channel);
    let mut crd = BufReader::new(crd);
    let (erd, mut ewr) = tokio::io::split(export);
    let mut erd = BufReader::new(erd);

    let len = crd.read_u32().await?;
    if len > MAX_OPTION {
        return Err(corrupt(format!("disk channel names an export of {len} bytes")));
    }
    let mut name = vec![0u8; len as usize];
    crd.read_exact(&mut name).await?;
    let export_name = String::from_utf8_lossy(&name).into_owned();
    let (size, flags) = match client_handshake(&mut erd, &mut ewr, &name).await {
        Ok(found) => found,
        Err(e) => {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            let why = format!("target NBD export {export_name:?}: {e}{cause}");
            let mut answer = vec![1u8];
            answer.extend_from_slice(&(why.len() as u32).to_be_bytes());
            answer.extend_from_slice(why.as_bytes());
            let _ = cwr.write_all(&answer).await;
            let _ = cwr.flush().await;
            return Err(DwcpError::Session(why));
        }
    };
    let mut answer = vec![0u8];
    answer.extend_from_slice(&size.to_be_bytes());
    answer.extend_from_slice(&flags.to_be_bytes());
    cwr.write_all(&answer).await?;
    cwr.flush().await?;

    let in_flight = InFlight::default();
    let replay = async {
        let mut header = [0u8; 28];
        let mut next_cookie = 0u64;
        loop {
            match crd.read_exact(&mut header).await {
                Ok(_) => {}
                // The source closed without a disconnect: its mirror did not finish.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(DwcpError::from(e)),
            }
            let (magic, cmd, _, len) = parse_request(&header);
            if magic != REQUEST_MAGIC || !matches!(cmd, CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES | CMD_DISC)
            {
                return Err(corrupt(format!("disk channel {export_name:?} carries a bad request")));
            }
            if cmd == CMD_DISC {
                // Everything before it, made durable, then settled.
                let mut flush = request(CMD_FLUSH, 0, 0, 0);
                send_request(&mut ewr, &in_flight, &mut flush, &mut next_cookie).await?;
                ewr.flush().await?;
                in_flight.drained().await;
                return Ok(true);
            }
            send_request(&mut ewr, &in_flight, &mut header, &mut next_cookie).await?;
            if cmd == CMD_WRITE {
                if len > MAX_PAYLOAD {
                    return Err(corrupt(format!("disk channel carries a write of {len} bytes")));
                }
                let copied = tokio::io::copy(&mut (&mut crd).take(u64::from(len)), &mut ewr).await?;
                if copied != u64::from(len) {
                    return Err(corrupt("disk channel ended inside a write"));
                }
            }
            ewr.flush().await?;
        }
    };
    let replies = async {
        let mut reply = [0u8; 16];
        loop {
            erd.read_exact(&mut reply).await?;
            let magic = u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]);
            let error = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
            let cookie = u64::from_be_bytes([
                reply[8], reply[9], reply[10], reply[11], reply[12], reply[13], reply[14], reply[15],
            ]);
            if magic != SIMPLE_REPLY_MAGIC {
                return Err::<(), _>(corrupt(format!("target NBD export {export_name:?} sent a bad reply")));
            }
            let Some((cmd, offset, len)) = in_flight.lock().remove(&cookie) else {
                return Err(corrupt(format!(
                    "target NBD export {export_name:?} answered an unknown request"
                )));
            };
            if error != 0 {
                return Err(DwcpError::Session(format!(
                    "disk {export_name:?} on the target: {} of {len} bytes at offset {offset} failed (errno {error})",
                    command_name(cmd)
                )));
            }
            if in_flight.lock().is_empty() {
                in_flight.emptied.notify_waiters();
            }
        }
    };
    tokio::pin!(replies);
    let settled = tokio::select! {
        r = replay => r?,
        r = &mut replies => return Err(match r {
            Err(e) => e,
            Ok(()) => corrupt(format!("target NBD export {export_name:?} stopped answering")),
        }),
    };
    if !settled {
        return Ok(());
    }
    tally.send_modify(|t| t.settled += 1);
    tracing::debug!(export = %export_name, "disk channel settled");
    let disc = request(CMD_DISC, 0, 0, 0);
    let _ = ewr.write_all(&disc).await;
    let _ = ewr.flush().await;
    Ok(())
}

async fn send_request<W: AsyncWrite + Unpin>(
    w: &mut W,
    in_flight: &InFlight,
    header: &mut [u8; 28],
    next_cookie: &mut u64,
) -> Result<(), DwcpError> {
    // Our own cookies: the source's QEMU reuses its cookies as soon as we
    // answered, while the target may still be working on the first use.
    let cookie = *next_cookie;
    *next_cookie += 1;
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    let (_, cmd, _, len) = parse_request(header);
    in_flight.lock().insert(cookie, (cmd, request_offset(header), len));
    w.write_all(header).await?;
    Ok(())
}

/// Why an NBD client handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("NBD handshake I/O")]
    Io(#[from] std::io::Error),
    #[error("Not a newstyle NBD server")]
    NotNewstyle,
    #[error("The NBD server does not speak fixed newstyle")]
    NotFixedNewstyle,
    #[error("Bad NBD option reply")]
    BadReply,
    #[error("NBD option reply of {0} bytes")]
    ReplyTooLong(u32),
    #[error("The NBD server named no export size")]
    NoExportSize,
    #[error("The NBD server refused the export ({why}{detail})")]
    Refused { why: &'static str, detail: String },
}

/// Fixed-newstyle handshake as a client: `NBD_OPT_GO` for `name`, simple
/// replies only. Returns the export's size and transmission flags.
pub async fn client_handshake<R, W>(rd: &mut R, wr: &mut W, name: &[u8]) -> Result<(u64, u16), HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if rd.read_u64().await? != NBD_MAGIC || rd.read_u64().await? != IHAVEOPT {
        return Err(HandshakeError::NotNewstyle);
    }
    let server_flags = rd.read_u16().await?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle);
    }
    let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    let mut go = client_flags.to_be_bytes().to_vec();
    go.extend_from_slice(&IHAVEOPT.to_be_bytes());
    go.extend_from_slice(&OPT_GO.to_be_bytes());
    go.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&0u16.to_be_bytes());
    wr.write_all(&go).await?;
    wr.flush().await?;
    let mut export = None;
    loop {
        if rd.read_u64().await? != OPTION_REPLY_MAGIC {
            return Err(HandshakeError::BadReply);
        }
        let (_opt, kind, len) = (rd.read_u32().await?, rd.read_u32().await?, rd.read_u32().await?);
        if len > MAX_OPTION {
            return Err(HandshakeError::ReplyTooLong(len));
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        match kind {
            REP_ACK => return export.ok_or(HandshakeError::NoExportSize),
            REP_INFO if data.len() >= 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                let size = u64::from_be_bytes([data[2], data[3], data[4], data[5], data[6], data[7], data[8], data[9]]);
                export = Some((size, u16::from_be_bytes([data[10], data[11]])));
            }
            k if k & (1 << 31) != 0 => {
                return Err(HandshakeError::Refused {
                    why: if k == REP_ERR_UNKNOWN {
                        "no such export"
                    } else {
                        "error"
                    },
                    detail: if data.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", String::from_utf8_lossy(&data))
                    },
                })
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::io::{duplex, DuplexStream};

    const SIZE: u64 = 1 << 20;

    /// A target NBD export: a disk in memory that starts on requests only
    /// once `gate` opens, and fails writes at `fail_at` with ENOSPC.
    async fn export(
        io: DuplexStream,
        gate: Arc<Notify>,
        handled: Arc<AtomicUsize>,
        fail_at: Option<u64>,
    ) -> (Vec<u8>, Vec<u16>) {
        let (rd, mut wr) = tokio::io::split(io);
        let mut rd = BufReader::new(rd);
        let mut hello = NBD_MAGIC.to_be_bytes().to_vec();
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        wr.write_all(&hello).await.unwrap();
        rd.read_u32().await.unwrap();
        assert_eq!(rd.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(rd.read_u32().await.unwrap(), OPT_GO);
        let mut go = vec![0u8; rd.read_u32().await.unwrap() as usize];
        rd.read_exact(&mut go).await.unwrap();
        assert_eq!(&go[4..8], b"root");
        export_info(&mut wr, OPT_GO, SIZE, FLAG_HAS_FLAGS | (1 << 2) | (1 << 11))
            .await
            .unwrap();
        option_reply(&mut wr, OPT_GO, REP_ACK, &[]).await.unwrap();
        gate.notified().await;
        let (mut disk, mut commands) = (vec![0u8; SIZE as usize], Vec::new());
        let mut h = [0u8; 28];
        while rd.read_exact(&mut h).await.is_ok() {
            let (_, cmd, cookie, len) = parse_request(&h);
            let offset = request_offset(&h) as usize;
            commands.push(cmd);
            handled.fetch_add(1, Ordering::SeqCst);
            let mut error = 0u32;
            if cmd == CMD_WRITE {
                let mut data = vec![0u8; len as usize];
                rd.read_exact(&mut data).await.unwrap();
                if fail_at == Some(offset as u64) {
                    error = 28;
                } else {
                    disk[offset..offset + len as usize].copy_from_slice(&data);
                }
            }
            if cmd == CMD_DISC {
                break;
            }
            let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            reply.extend_from_slice(&error.to_be_bytes());
            reply.extend_from_slice(&cookie.to_be_bytes());
            wr.write_all(&reply).await.unwrap();
        }
        (disk, commands)
    }

    struct Relay {
        qemu: DuplexStream,
        tally: Tally,
        target: tokio::task::JoinHandle<Result<(), DwcpError>>,
        export: tokio::task::JoinHandle<(Vec<u8>, Vec<u16>)>,
        gate: Arc<Notify>,
        handled: Arc<AtomicUsize>,
    }

    /// source QEMU ⇄ serve_source ⇄ (the session's channel) ⇄ serve_target ⇄ export
    fn relay(fail_at: Option<u64>) -> Relay {
        let (qemu, source_end) = duplex(4 << 20);
        let (channel_a, channel_b) = duplex(4 << 20);
        let (target_end, export_end) = duplex(4 << 20);
        let tally: Tally = Arc::default();
        let (gate, handled) = (Arc::new(Notify::new()), Arc::new(AtomicUsize::new(0)));
        tokio::spawn(serve_source(source_end, channel_a));
        let t = tally.clone();
        let target = tokio::spawn(async move { serve_target(channel_b, target_end, &t).await });
        let export = tokio::spawn(export(export_end, gate.clone(), handled.clone(), fail_at));
        Relay {
            qemu,
            tally,
            target,
            export,
            gate,
            handled,
        }
    }

    async fn reply_to(rd: &mut (impl AsyncRead + Unpin)) -> (u32, u64) {
        let mut r = [0u8; 16];
        rd.read_exact(&mut r).await.unwrap();
        assert_eq!(r[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes([r[4], r[5], r[6], r[7]]);
        (error, u64::from_be_bytes(r[8..16].try_into().unwrap()))
    }

    #[tokio::test]
    async fn writes_are_answered_at_once_and_settle_after_the_targets_flush() {
        let r = relay(None);
        let (mut rd, mut wr) = tokio::io::split(r.qemu);
        let (size, flags) = client_handshake(&mut rd, &mut wr, b"root").await.unwrap();
        assert_eq!(size, SIZE);
        assert_eq!(flags & (1 << 2), 1 << 2, "flush passes on");
        assert_eq!(flags & (1 << 11), 0, "fast zero is the target's to answer");
        let mut msg = request(CMD_WRITE, 7, 0, 8192).to_vec();
        msg.extend_from_slice(&[1u8; 8192]);
        msg.extend(request(CMD_WRITE, 7, 4096, 4096));
        msg.extend_from_slice(&[2u8; 4096]);
        msg.extend(request(CMD_FLUSH, 8, 0, 0));
        wr.write_all(&msg).await.unwrap();
        for cookie in [7, 7, 8] {
            assert_eq!(reply_to(&mut rd).await, (0, cookie));
        }
        assert_eq!(
            r.handled.load(Ordering::SeqCst),
            0,
            "answered before the target saw anything"
        );
        assert_eq!(r.tally.borrow().settled, 0);

        r.gate.notify_one();
        wr.write_all(&request(CMD_DISC, 9, 0, 0)).await.unwrap();
        let mut watch = r.tally.subscribe();
        tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|t| t.settled == 1))
            .await
            .expect("settles")
            .unwrap();
        r.target.await.unwrap().unwrap();
        let (disk, commands) = r.export.await.unwrap();
        assert_eq!(commands, [CMD_WRITE, CMD_WRITE, CMD_FLUSH, CMD_FLUSH, CMD_DISC]);
        assert!(disk[..4096].iter().all(|&b| b == 1));
        assert!(disk[4096..8192].iter().all(|&b| b == 2), "replayed in order");
        assert!(disk[8192..].iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn a_write_failing_on_the_target_fails_the_channel_unsettled() {
        let r = relay(Some(4096));
        let (mut rd, mut wr) = tokio::io::split(r.qemu);
        client_handshake(&mut rd, &mut wr, b"root").await.unwrap();
        r.gate.notify_one();
        let mut msg = request(CMD_WRITE, 1, 4096, 4096).to_vec();
        msg.extend_from_slice(&[3u8; 4096]);
        msg.extend(request(CMD_DISC, 2, 0, 0));
        wr.write_all(&msg).await.unwrap();
        let err = r.target.await.unwrap().unwrap_err().to_string();
        assert!(
            err.contains("write of 4096 bytes at offset 4096 failed (errno 28)"),
            "{err}"
        );
        assert_eq!(r.tally.borrow().settled, 0);
    }

    #[tokio::test]
    async fn a_missing_export_is_refused_to_the_source() {
        let (qemu, source_end) = duplex(1 << 16);
        let (channel_a, channel_b) = duplex(1 << 16);
        let (target_end, export_end) = duplex(1 << 16);
        tokio::spawn(serve_source(source_end, channel_a));
        tokio::spawn(async move { serve_target(channel_b, target_end, &Tally::default()).await });
        // An export that refuses every name.
        tokio::spawn(async move {
            let (rd, mut wr) = tokio::io::split(export_end);
            let mut rd = BufReader::new(rd);
            let mut hello = NBD_MAGIC.to_be_bytes().to_vec();
            hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
            hello.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
            wr.write_all(&hello).await.unwrap();
            let mut opt = [0u8; 4 + 16];
            rd.read_exact(&mut opt).await.unwrap();
            let mut data = vec![0u8; u32::from_be_bytes(opt[16..20].try_into().unwrap()) as usize];
            rd.read_exact(&mut data).await.unwrap();
            option_reply(&mut wr, OPT_GO, REP_ERR_UNKNOWN, &[]).await.unwrap();
            std::future::pending::<()>().await;
        });
        let (mut rd, mut wr) = tokio::io::split(qemu);
        let err = client_handshake(&mut rd, &mut wr, b"data").await.unwrap_err();
        assert!(err.to_string().contains("no such export"), "{err}");
    }
}
