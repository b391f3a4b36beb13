//! Finds the pages inside a channel's byte stream, so that encoding can work
//! on guest pages (dedup, delta) instead of arbitrary byte runs.
//!
//! The scanner never changes bytes: it only splits the stream into segments,
//! "raw" or "page with a key". A stream it does not understand (or a part of
//! one, like QEMU's device state) is all raw; it then hunts for the next
//! record it recognises. Being wrong costs compression, never correctness:
//! the receiver rebuilds exactly the bytes that were read.
//!
//! * QEMU migration stream (RAM section): a page is `be64 offset|flags` with
//!   `RAM_SAVE_FLAG_PAGE` (plus the block name unless `CONTINUE`), then 4 KiB.
//! * NBD (disk mirror): a write request (simple or extended header) whose
//!   payload is split at 4 KiB boundaries of the disk offset.

use xxhash_rust::xxh3::xxh3_64;

pub const PAGE: usize = 4096;

/// What a channel carries; decides how it is scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// QEMU's migration stream.
    Migration = 0,
    /// NBD client → server (drive-mirror).
    Nbd = 1,
    /// Bytes the target throws away (link probes).
    Probe = 2,
    /// Guest pages sent ahead of QEMU, as RAM page records in QEMU's own
    /// format: the target keeps the pages in its cache and throws the bytes away.
    Prefill = 3,
}

impl Role {
    pub fn from_u8(v: u8) -> Option<Role> {
        match v {
            0 => Some(Role::Migration),
            1 => Some(Role::Nbd),
            2 => Some(Role::Probe),
            3 => Some(Role::Prefill),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    Raw(usize),
    /// A 4 KiB page; `key` names its place (RAM block and offset, or disk offset).
    Page {
        key: u64,
    },
}

const FLAG_ZERO: u64 = 0x02;
const FLAG_PAGE: u64 = 0x08;
const FLAG_CONTINUE: u64 = 0x20;
/// Offsets beyond 1 TiB are not guest RAM: a sign we are out of sync.
const MAX_RAM_OFFSET: u64 = 1 << 40;

const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

pub struct Scanner {
    role: Role,
    in_sync: bool,
    /// Bytes that must pass raw before the next record (a record split at a flush).
    raw_pending: usize,
    /// NBD write payload still to come: (disk offset of its next byte, bytes left).
    payload: Option<(u64, u64)>,
    block: Option<u64>,
}

impl Scanner {
    pub fn new(role: Role) -> Scanner {
        Scanner {
            role,
            in_sync: true,
            raw_pending: 0,
            payload: None,
            block: None,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Splits a prefix of `data` into segments and returns them with the
    /// length of that prefix. With `more_coming`, an incomplete record at the
    /// end is left for the next call; without, everything is consumed.
    pub fn scan(&mut self, data: &[u8], more_coming: bool) -> (Vec<Segment>, usize) {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            let rest = &data[pos..];
            if self.raw_pending > 0 {
                let n = self.raw_pending.min(rest.len());
                self.raw_pending -= n;
                push_raw(&mut out, n);
                pos += n;
                continue;
            }
            let step = match self.role {
                Role::Migration | Role::Prefill => self.step_qemu(rest, more_coming),
                Role::Nbd => self.step_nbd(rest, more_coming),
                Role::Probe => Step::Raw(rest.len()),
            };
            match step {
                Step::Raw(n) => {
                    push_raw(&mut out, n);
                    pos += n;
                }
                Step::RawThenPage(n, key) => {
                    push_raw(&mut out, n);
                    out.push(Segment::Page { key });
                    pos += n + PAGE;
                }
                Step::Wait => break,
            }
        }
        (out, pos)
    }

    fn step_qemu(&mut self, rest: &[u8], more_coming: bool) -> Step {
        if !self.in_sync {
            return self.hunt_qemu(rest, more_coming);
        }
        let Some(h) = be64(rest, 0) else {
            return self.incomplete(rest.len(), None, more_coming);
        };
        let flags = h & 0xfff;
        let offset = h & !0xfff;
        if offset >= MAX_RAM_OFFSET {
            self.in_sync = false;
            return self.hunt_qemu(rest, more_coming);
        }
        if flags == FLAG_PAGE | FLAG_CONTINUE {
            if let Some(block) = self.block {
                if rest.len() < 8 + PAGE {
                    return self.incomplete(rest.len(), Some(8 + PAGE), more_coming);
                }
                return Step::RawThenPage(8, page_key(block, offset));
            }
        } else if flags == FLAG_ZERO | FLAG_CONTINUE && self.block.is_some() {
            if rest.len() < 9 {
                return self.incomplete(rest.len(), Some(9), more_coming);
            }
            return Step::Raw(9);
        } else if flags == FLAG_PAGE || flags == FLAG_ZERO {
            let Some(&len) = rest.get(8) else {
                return self.incomplete(rest.len(), None, more_coming);
            };
            let len = len as usize;
            let body = if flags == FLAG_PAGE { PAGE } else { 1 };
            if rest.len() < 9 + len + body {
                return self.incomplete(rest.len(), None, more_coming);
            }
            let name = &rest[9..9 + len];
            if plausible_block_name(name) {
                // Named by the name itself, so that every channel (QEMU's and
                // a prefill) gives a guest page the same key.
                let block = xxh3_64(name) & 0xffff;
                self.block = Some(block);
                return if flags == FLAG_PAGE {
                    Step::RawThenPage(9 + len, page_key(block, offset))
                } else {
                    Step::Raw(9 + len + 1)
                };
            }
        }
        self.in_sync = false;
        self.hunt_qemu(rest, more_coming)
    }

    /// Looks for the next page record; everything before it is raw.
    fn hunt_qemu(&mut self, rest: &[u8], more_coming: bool) -> Step {
        // A page header needs 8 bytes, one with a block name up to 9 + 255.
        let mut i = 0;
        while i + 8 <= rest.len() {
            // Flags live in the low bits of the last byte pair: cheap pre-check.
            let b7 = rest[i + 7];
            if b7 == (FLAG_PAGE | FLAG_CONTINUE) as u8 || b7 == FLAG_PAGE as u8 {
                if let Some(h) = be64(rest, i) {
                    let (flags, offset) = (h & 0xfff, h & !0xfff);
                    if offset < MAX_RAM_OFFSET {
                        if flags == FLAG_PAGE | FLAG_CONTINUE && self.block.is_some() {
                            self.in_sync = true;
                            return raw_or_resync(i);
                        }
                        if flags == FLAG_PAGE {
                            match rest.get(i + 8) {
                                None => break,
                                Some(&len) => {
                                    let len = len as usize;
                                    if rest.len() < i + 9 + len {
                                        break;
                                    }
                                    if plausible_block_name(&rest[i + 9..i + 9 + len]) {
                                        self.in_sync = true;
                                        return raw_or_resync(i);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            i += 1;
        }
        if more_coming {
            // Keep a tail that could be the start of a header.
            let keep = (rest.len() - i).min(9 + 255);
            let n = rest.len() - keep;
            if n == 0 {
                Step::Wait
            } else {
                Step::Raw(n)
            }
        } else {
            Step::Raw(rest.len())
        }
    }

    fn step_nbd(&mut self, rest: &[u8], more_coming: bool) -> Step {
        if let Some((offset, left)) = self.payload {
            let avail = (rest.len() as u64).min(left);
            if offset % PAGE as u64 == 0 && left >= PAGE as u64 {
                if rest.len() < PAGE {
                    return if more_coming {
                        Step::Wait
                    } else {
                        self.advance_payload(avail);
                        Step::Raw(avail as usize)
                    };
                }
                self.advance_payload(PAGE as u64);
                return Step::RawThenPage(0, offset / PAGE as u64);
            }
            // Up to the next page boundary (or the end of the payload) raw.
            let to_boundary = (PAGE as u64 - offset % PAGE as u64).min(left).min(avail);
            self.advance_payload(to_boundary);
            return Step::Raw(to_boundary as usize);
        }
        if !self.in_sync {
            return self.hunt_nbd(rest, more_coming);
        }
        let Some(magic) = be32(rest, 0) else {
            return self.incomplete(rest.len(), None, more_coming);
        };
        let (header, flags, kind, offset, len) = match magic {
            NBD_REQUEST_MAGIC => {
                if rest.len() < 28 {
                    return self.incomplete(rest.len(), None, more_coming);
                }
                (
                    28,
                    be16(rest, 4).unwrap_or(0),
                    be16(rest, 6).unwrap_or(0),
                    be64(rest, 16).unwrap_or(0),
                    be32(rest, 24).unwrap_or(0) as u64,
                )
            }
            NBD_EXTENDED_REQUEST_MAGIC => {
                if rest.len() < 32 {
                    return self.incomplete(rest.len(), None, more_coming);
                }
                (
                    32,
                    be16(rest, 4).unwrap_or(0),
                    be16(rest, 6).unwrap_or(0),
                    be64(rest, 16).unwrap_or(0),
                    be64(rest, 24).unwrap_or(0),
                )
            }
            _ => {
                self.in_sync = false;
                return self.hunt_nbd(rest, more_coming);
            }
        };
        let has_payload =
            kind == NBD_CMD_WRITE || (magic == NBD_EXTENDED_REQUEST_MAGIC && flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0);
        if has_payload && len > 0 {
            if kind == NBD_CMD_WRITE {
                self.payload = Some((offset, len));
            } else {
                self.raw_pending = usize::try_from(len).unwrap_or(usize::MAX);
            }
        }
        Step::Raw(header)
    }

    fn advance_payload(&mut self, n: u64) {
        if let Some((offset, left)) = self.payload {
            self.payload = if left > n { Some((offset + n, left - n)) } else { None };
        }
    }

    fn hunt_nbd(&mut self, rest: &[u8], more_coming: bool) -> Step {
        let found = rest.windows(4).position(|w| {
            matches!(
                u32::from_be_bytes([w[0], w[1], w[2], w[3]]),
                NBD_REQUEST_MAGIC | NBD_EXTENDED_REQUEST_MAGIC
            )
        });
        match found {
            Some(i) => {
                self.in_sync = true;
                raw_or_resync(i)
            }
            None if more_coming && rest.len() > 3 => Step::Raw(rest.len() - 3),
            None if more_coming => Step::Wait,
            None => Step::Raw(rest.len()),
        }
    }

    /// A record that does not fit in what we have: wait for more, or pass
    /// what we have raw and (when its length is known) the rest of it too.
    fn incomplete(&mut self, have: usize, record_len: Option<usize>, more_coming: bool) -> Step {
        if more_coming {
            return Step::Wait;
        }
        match record_len {
            Some(len) => self.raw_pending = len - have,
            None => self.in_sync = false,
        }
        Step::Raw(have)
    }
}

enum Step {
    Raw(usize),
    /// `n` raw bytes, then a page of 4 KiB.
    RawThenPage(usize, u64),
    Wait,
}

/// Resynchronised at `i`: the bytes before it are raw (none: go on parsing).
fn raw_or_resync(i: usize) -> Step {
    Step::Raw(i)
}

fn push_raw(out: &mut Vec<Segment>, n: usize) {
    if n == 0 {
        return;
    }
    if let Some(Segment::Raw(prev)) = out.last_mut() {
        *prev += n;
    } else {
        out.push(Segment::Raw(n));
    }
}

/// Appends one RAM page record in QEMU's format (what `Role::Prefill`
/// channels carry): the first record of a block names it, later ones continue it.
pub fn push_ram_page(out: &mut Vec<u8>, block: &[u8], first: bool, offset: u64, page: &[u8]) {
    if first {
        out.extend_from_slice(&(offset | FLAG_PAGE).to_be_bytes());
        out.push(block.len() as u8);
        out.extend_from_slice(block);
    } else {
        out.extend_from_slice(&(offset | FLAG_PAGE | FLAG_CONTINUE).to_be_bytes());
    }
    out.extend_from_slice(page);
}

fn page_key(block: u64, offset: u64) -> u64 {
    (block << 48) | (offset >> 12)
}

fn plausible_block_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/' | b':'))
}

fn be16(d: &[u8], i: usize) -> Option<u16> {
    d.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

fn be32(d: &[u8], i: usize) -> Option<u32> {
    d.get(i..i + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be64(d: &[u8], i: usize) -> Option<u64> {
    d.get(i..i + 8).map(|b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_be_bytes(a)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A QEMU-like RAM stream: a section header, pages of block "pc.ram"
    /// (the first without CONTINUE), a zero page, then opaque device state.
    pub fn qemu_stream(pages: &[Vec<u8>]) -> Vec<u8> {
        let mut s = b"QEVM\0\0\0\x03\x01\0\0\0\x02\x03ram".to_vec();
        for (i, p) in pages.iter().enumerate() {
            let off = (i as u64) << 12;
            if i == 0 {
                s.extend_from_slice(&(off | FLAG_PAGE).to_be_bytes());
                s.push(6);
                s.extend_from_slice(b"pc.ram");
            } else {
                s.extend_from_slice(&(off | FLAG_PAGE | FLAG_CONTINUE).to_be_bytes());
            }
            s.extend_from_slice(p);
        }
        s.extend_from_slice(&((99u64 << 12) | FLAG_ZERO | FLAG_CONTINUE).to_be_bytes());
        s.push(0);
        s.extend_from_slice(&0x10u64.to_be_bytes());
        s.extend_from_slice(b"\x04device state that is not parsed\x7e\0\0\0\x02");
        s
    }

    fn pages_found(s: &mut Scanner, data: &[u8]) -> (usize, usize) {
        let (segs, used) = s.scan(data, false);
        assert_eq!(used, data.len());
        let total: usize = segs
            .iter()
            .map(|g| match g {
                Segment::Raw(n) => *n,
                Segment::Page { .. } => PAGE,
            })
            .sum();
        assert_eq!(total, data.len(), "segments cover the input exactly");
        (segs.iter().filter(|g| matches!(g, Segment::Page { .. })).count(), total)
    }

    #[test]
    fn prefill_records_are_pages_with_qemu_s_keys() {
        let mut records = Vec::new();
        for i in 0..5u64 {
            push_ram_page(&mut records, b"pc.ram", i == 0, (i * 3) << 12, &[i as u8 + 1; PAGE]);
        }
        let (n, _) = pages_found(&mut Scanner::new(Role::Prefill), &records);
        assert_eq!(n, 5);
        let (segs, _) = Scanner::new(Role::Prefill).scan(&records, false);
        let keys: Vec<u64> = segs
            .iter()
            .filter_map(|g| match g {
                Segment::Page { key } => Some(*key),
                Segment::Raw(_) => None,
            })
            .collect();
        let block = xxh3_64(b"pc.ram") & 0xffff;
        let want: Vec<u64> = (0..5).map(|i| page_key(block, (i * 3) << 12)).collect();
        assert_eq!(keys, want, "keyed by block name and offset, as QEMU's pages are");
    }

    #[test]
    fn finds_every_page_of_a_qemu_stream() {
        let pages: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; PAGE]).collect();
        let stream = qemu_stream(&pages);
        let (n, _) = pages_found(&mut Scanner::new(Role::Migration), &stream);
        assert_eq!(n, 5);
    }

    #[test]
    fn waits_for_a_split_page_when_more_is_coming() {
        let pages: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; PAGE]).collect();
        let stream = qemu_stream(&pages);
        let mut s = Scanner::new(Role::Migration);
        let cut = 100 + PAGE;
        let (segs, used) = s.scan(&stream[..cut], true);
        assert!(used < cut);
        let (segs2, used2) = s.scan(&stream[used..], false);
        assert_eq!(used + used2, stream.len());
        let pages = segs
            .iter()
            .chain(&segs2)
            .filter(|g| matches!(g, Segment::Page { .. }))
            .count();
        assert_eq!(pages, 3);
    }

    #[test]
    fn nbd_write_payload_becomes_pages() {
        let mut s = b"NBDMAGICIHAVEOPT\0\0\0\x07\0\0\0\0".to_vec();
        s.extend_from_slice(&NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes());
        s.extend_from_slice(&0u16.to_be_bytes());
        s.extend_from_slice(&NBD_CMD_WRITE.to_be_bytes());
        s.extend_from_slice(&7u64.to_be_bytes());
        s.extend_from_slice(&(8192u64 * 3).to_be_bytes());
        s.extend_from_slice(&(3 * PAGE as u64).to_be_bytes());
        s.extend(std::iter::repeat_n(0xab, 3 * PAGE));
        s.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        s.extend_from_slice(&[0, 0, 0, 3]);
        s.extend_from_slice(&[0; 20]);
        let (n, _) = pages_found(&mut Scanner::new(Role::Nbd), &s);
        assert_eq!(n, 3);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_covered_exactly(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20000), cut in 0usize..20000) {
            for role in [Role::Migration, Role::Nbd, Role::Probe, Role::Prefill] {
                let mut s = Scanner::new(role);
                let cut = cut.min(data.len());
                let (segs, used) = s.scan(&data[..cut], true);
                let (segs2, used2) = s.scan(&data[used..], false);
                proptest::prop_assert_eq!(used + used2, data.len());
                let total: usize = segs.iter().chain(&segs2).map(|g| match g { Segment::Raw(n) => *n, Segment::Page { .. } => PAGE }).sum();
                proptest::prop_assert_eq!(total, data.len());
            }
        }
    }
}
