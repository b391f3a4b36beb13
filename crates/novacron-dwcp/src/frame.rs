//! Wire frames. Every frame carries an XXH3 checksum over its header and
//! payload, checked on receipt before anything else looks at it.
//!
//! ```text
//! magic u32 "DWCP" | kind u8 | 0 u8 | 0 u16 | channel u32 | seq u64 | len u32 | xxh3 u64 | payload
//! ```

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use xxhash_rust::xxh3::Xxh3;

use crate::DwcpError;

pub const MAGIC: u32 = 0x4457_4350;
pub const HEADER_LEN: usize = 32;
/// Largest payload accepted; an encoded block is at most a little over 1 MiB.
pub const MAX_PAYLOAD: usize = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source → target, first frame of each stream.
    Hello = 1,
    /// Target → source on stream 0: cache state and the agreed parameters.
    HelloAck = 2,
    /// A new channel (payload: role byte). Ordered by `seq`.
    Open = 3,
    /// Encoded bytes for a channel. Ordered by `seq`.
    Data = 4,
    /// The source side of a channel reached end of stream. Ordered by `seq`.
    Close = 5,
    /// Target → source bytes of a channel (QEMU's return path, NBD replies).
    Reverse = 6,
    /// The target side of a channel reached end of stream.
    ReverseClose = 7,
    /// Target → source: bytes received and decoded so far (payload: 2 × u64).
    Ack = 8,
    /// Either way: the session failed (payload: the reason, UTF-8).
    Abort = 9,
    Ping = 10,
    Pong = 11,
    /// Source → target, ordered: no more channels or data.
    End = 12,
    /// Target → source: everything up to `End` was delivered.
    EndAck = 13,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Open,
            4 => Data,
            5 => Close,
            6 => Reverse,
            7 => ReverseClose,
            8 => Ack,
            9 => Abort,
            10 => Ping,
            11 => Pong,
            12 => End,
            13 => EndAck,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub channel: u32,
    pub seq: u64,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: Kind, channel: u32, seq: u64, payload: Vec<u8>) -> Frame {
        Frame {
            kind,
            channel,
            seq,
            payload,
        }
    }

    /// Bytes this frame takes on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4] = self.kind as u8;
        h[8..12].copy_from_slice(&self.channel.to_be_bytes());
        h[12..20].copy_from_slice(&self.seq.to_be_bytes());
        h[20..24].copy_from_slice(&(self.payload.len() as u32).to_be_bytes());
        let sum = checksum(&h[..24], &self.payload);
        h[24..32].copy_from_slice(&sum.to_be_bytes());
        h
    }
}

fn checksum(header: &[u8], payload: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(header);
    h.update(payload);
    h.digest()
}

/// Writes one frame and flushes it: a TLS stream may otherwise keep the
/// tail in its buffer when the socket is full, until some later write that
/// may never come (the last ack, an NBD reply QEMU waits for).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), DwcpError> {
    w.write_all(&frame.header()).await?;
    w.write_all(&frame.payload).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` at a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, DwcpError> {
    let mut h = [0u8; HEADER_LEN];
    match r.read_exact(&mut h[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut h[1..]).await?;
    let (magic, kind, channel, seq, len, sum) = parse_header(&h);
    if magic != MAGIC {
        return Err(DwcpError::Corrupt(format!("bad frame magic {magic:#010x}")));
    }
    let kind = Kind::from_u8(kind).ok_or_else(|| DwcpError::Corrupt(format!("unknown frame kind {kind}")))?;
    if len > MAX_PAYLOAD {
        return Err(DwcpError::Corrupt(format!("frame payload of {len} bytes is too large")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    if checksum(&h[..24], &payload) != sum {
        return Err(DwcpError::Corrupt(format!(
            "frame seq {seq} on channel {channel} failed its checksum"
        )));
    }
    Ok(Some(Frame {
        kind,
        channel,
        seq,
        payload,
    }))
}

fn parse_header(h: &[u8; HEADER_LEN]) -> (u32, u8, u32, u64, usize, u64) {
    let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_be_bytes(b)
    };
    (u32_at(0), h[4], u32_at(8), u64_at(12), u32_at(20) as usize, u64_at(24))
}

/// Little helpers for the small payloads (hello, ack).
pub struct PayloadReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> PayloadReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        PayloadReader { data, pos: 0 }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DwcpError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| DwcpError::Corrupt("payload too short".into()))?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, DwcpError> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32, DwcpError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, DwcpError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_be_bytes(a))
    }

    pub fn string(&mut self) -> Result<String, DwcpError> {
        let n = self.u32()? as usize;
        String::from_utf8(self.bytes(n)?.to_vec()).map_err(|_| DwcpError::Corrupt("string is not UTF-8".into()))
    }
}

pub fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_a_flipped_bit_is_caught() -> Result<(), DwcpError> {
        let f = Frame::new(Kind::Data, 7, 42, b"hello world".to_vec());
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &f).await?;
        let back = read_frame(&mut &bytes[..]).await?;
        assert_eq!(back.as_ref(), Some(&f));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(
                read_frame(&mut &bad[..]).await.is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        assert_eq!(read_frame(&mut &[][..]).await?, None);
        assert!(read_frame(&mut &bytes[..10]).await.is_err());
        Ok(())
    }
}
