//! A small read-only NBD server: one named export whose bytes an
//! [`Export`] produces however it likes (a live restore fetches them from
//! a backup store on demand). Fixed newstyle handshake with `NBD_OPT_GO`
//! (and the old `NBD_OPT_EXPORT_NAME`), simple replies only; QEMU's client
//! asks for structured replies and extended headers, is told they are not
//! supported, and goes on with simple ones. Requests on one connection are
//! answered as they complete, so a slow read does not hold up the others.

use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

use crate::{
    CMD_DISC, CMD_READ, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_EXPORT, MAX_REQUEST, NBDMAGIC, OPT_GO,
    OPT_REPLY_MAGIC, REP_ACK, REP_ERROR_BIT, REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const REP_ERR_UNSUP: u32 = REP_ERROR_BIT | 1;
const REP_ERR_INVALID: u32 = REP_ERROR_BIT | 3;
const REP_ERR_UNKNOWN: u32 = REP_ERROR_BIT | 6;

const CMD_WRITE: u16 = 1;

const TRANSMIT_HAS_FLAGS: u16 = 1;
const TRANSMIT_READ_ONLY: u16 = 2;
/// Read-only, so several connections see the same bytes.
const TRANSMIT_CAN_MULTI_CONN: u16 = 1 << 8;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// Options bigger than this are refused (names and info requests are small).
const MAX_OPTION: u32 = 4096;

/// The bytes of a read-only export.
pub trait Export: Send + Sync + 'static {
    /// Its size in bytes: whole 512-byte sectors, as disks are (QEMU's
    /// client reads the reply to a partial last sector padded to 512).
    fn size(&self) -> u64;
    /// `length` bytes at `offset` (within the size). An error reaches the
    /// client as EIO.
    fn read(&self, offset: u64, length: u32) -> impl Future<Output = io::Result<Vec<u8>>> + Send;
}

/// Serves `export` as `name` to every client of `listener`, until the
/// returned future is dropped (abort the task it runs in).
pub async fn serve<E: Export>(listener: UnixListener, name: String, export: Arc<E>) -> io::Result<()> {
    let name = Arc::new(name);
    loop {
        let (sock, _) = listener.accept().await?;
        let (name, export) = (name.clone(), export.clone());
        tokio::spawn(async move {
            // A client that goes away mid-handshake or mid-request is its own business.
            let _ = connection(sock, &name, export).await;
        });
    }
}

async fn connection<E: Export>(mut sock: UnixStream, name: &str, export: Arc<E>) -> io::Result<()> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    sock.write_all(&hello).await?;
    let client_flags = sock.read_u32().await?;
    if client_flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(io::Error::other("the client does not do fixed newstyle negotiation"));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    let flags = TRANSMIT_HAS_FLAGS | TRANSMIT_READ_ONLY | TRANSMIT_CAN_MULTI_CONN;
    loop {
        if sock.read_u64().await? != IHAVEOPT {
            return Err(io::Error::other("bad option magic"));
        }
        let option = sock.read_u32().await?;
        let len = sock.read_u32().await?;
        if len > MAX_OPTION {
            return Err(io::Error::other(format!("option of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        sock.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                if data != name.as_bytes() && !data.is_empty() {
                    return Err(io::Error::other("unknown export"));
                }
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&export.size().to_be_bytes());
                reply.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                sock.write_all(&reply).await?;
                break;
            }
            OPT_ABORT => {
                option_reply(&mut sock, option, REP_ACK, &[]).await?;
                return Ok(());
            }
            OPT_GO | OPT_INFO => {
                let Some(asked) = go_export_name(&data) else {
                    option_reply(&mut sock, option, REP_ERR_INVALID, &[]).await?;
                    continue;
                };
                if asked != name.as_bytes() && !asked.is_empty() {
                    option_reply(&mut sock, option, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.size().to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                option_reply(&mut sock, option, REP_INFO, &info).await?;
                option_reply(&mut sock, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    break;
                }
            }
            _ => option_reply(&mut sock, option, REP_ERR_UNSUP, &[]).await?,
        }
    }
    transmission(sock, export).await
}

/// The export name in an `NBD_OPT_GO`/`NBD_OPT_INFO` payload (u32 length,
/// name, u16 count of info requests, the requests).
fn go_export_name(data: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + len)?;
    let count = u16::from_be_bytes(data.get(4 + len..6 + len)?.try_into().ok()?);
    (data.len() == 6 + len + 2 * usize::from(count)).then_some(name)
}

async fn option_reply(sock: &mut UnixStream, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(20 + data.len());
    msg.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    sock.write_all(&msg).await
}

async fn transmission<E: Export>(sock: UnixStream, export: Arc<E>) -> io::Result<()> {
    let (mut rx, tx) = sock.into_split();
    let tx = Arc::new(Mutex::new(tx));
    let size = export.size();
    loop {
        let mut header = [0u8; 28];
        rx.read_exact(&mut header).await?;
        let field = |r: std::ops::Range<usize>| header[r].iter().fold(0u64, |a, b| a << 8 | u64::from(*b));
        if field(0..4) != u64::from(REQUEST_MAGIC) {
            return Err(io::Error::other("bad request magic"));
        }
        let (kind, cookie, offset, length) = (field(6..8) as u16, field(8..16), field(16..24), field(24..28) as u32);
        match kind {
            CMD_READ if length == 0 || length > MAX_REQUEST || offset.saturating_add(u64::from(length)) > size => {
                reply(&tx, cookie, EINVAL, &[]).await?;
            }
            CMD_READ => {
                let (tx, export) = (tx.clone(), export.clone());
                tokio::spawn(async move {
                    let _ = match export.read(offset, length).await {
                        Ok(data) if data.len() == length as usize => reply(&tx, cookie, 0, &data).await,
                        _ => reply(&tx, cookie, EIO, &[]).await,
                    };
                });
            }
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                // The payload follows the request; read past it, then refuse.
                let mut payload = (&mut rx).take(u64::from(length));
                tokio::io::copy(&mut payload, &mut tokio::io::sink()).await?;
                reply(&tx, cookie, EPERM, &[]).await?;
            }
            _ => reply(&tx, cookie, EINVAL, &[]).await?,
        }
    }
}

async fn reply(tx: &Mutex<OwnedWriteHalf>, cookie: u64, error: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    msg.extend_from_slice(&error.to_be_bytes());
    msg.extend_from_slice(&cookie.to_be_bytes());
    msg.extend_from_slice(data);
    tx.lock().await.write_all(&msg).await
}
