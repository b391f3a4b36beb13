//! HDE: hierarchical delta encoding of a channel's bytes into blocks.
//!
//! Each page found by the scanner travels as one of
//! * `REF`   — the receiver's cache already holds this content (any earlier
//!   page of this or an earlier migration between the same two agents);
//! * `DELTA` — the receiver holds the previous version of this page and only
//!   a few byte runs changed (a counter, a timestamp);
//! * `PAGE`  — the content itself, in the block's zstd-compressed literals.
//!
//! Everything else is literal bytes. The zstd level follows the link: a slow
//! link gets stronger compression as long as the codec keeps ahead of it.
//!
//! Block layout: `version u8 | level u8 | decoded_len u32 | decoded_xxh3 u64 |
//! ops_len u32 | lit_len u32 | lit_wire_len u32 | ops | literals`.
//! The receiver rebuilds the bytes, checks length and XXH3, and only then
//! hands them on: a bad block fails the session, it never reaches QEMU.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use xxhash_rust::xxh3::xxh3_64;

use crate::cache::{chunk_hash, ChunkCache, ChunkHash};
use crate::scan::{Segment, PAGE};
use crate::DwcpError;

const VERSION: u8 = 1;
const BLOCK_HEADER: usize = 26;
const OP_LIT: u8 = 0;
const OP_PAGE: u8 = 1;
const OP_REF: u8 = 2;
const OP_DELTA: u8 = 3;
/// A delta is used when its runs take less than this share of a page.
const DELTA_MAX_BYTES: usize = PAGE / 4;
/// Equal bytes shorter than this between two changed runs are sent as part of one run.
const DELTA_GAP: usize = 16;

/// Counters of what encoding did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EncodeStats {
    pub raw_bytes: u64,
    pub encoded_bytes: u64,
    pub pages: u64,
    pub pages_ref: u64,
    pub pages_delta: u64,
}

/// zstd levels we choose between; 0 stores literals uncompressed.
const LEVELS: [i32; 5] = [0, 1, 3, 6, 12];

/// Picks the zstd level that moves raw bytes fastest: a level is limited by
/// its own speed and by the link carrying its output (link / ratio).
#[derive(Debug, Clone)]
pub struct LevelChooser {
    /// Bytes/s of input per level, and output/input ratio (EWMAs).
    speed: [f64; LEVELS.len()],
    ratio: [f64; LEVELS.len()],
    observed: [bool; LEVELS.len()],
    link_bytes_s: Option<f64>,
    current: usize,
    blocks: u64,
}

impl Default for LevelChooser {
    fn default() -> Self {
        LevelChooser {
            // Starting guesses, replaced by measurements as blocks go by.
            speed: [4e9, 4e8, 2e8, 8e7, 2e7],
            ratio: [1.0, 0.5, 0.45, 0.42, 0.4],
            observed: [false; LEVELS.len()],
            link_bytes_s: None,
            current: 2,
            blocks: 0,
        }
    }
}

impl LevelChooser {
    /// A fixed level (benchmarks, tests).
    pub fn fixed(level: i32) -> LevelChooser {
        let current = LEVELS.iter().position(|&l| l >= level).unwrap_or(LEVELS.len() - 1);
        LevelChooser {
            link_bytes_s: Some(f64::NAN),
            current,
            ..Default::default()
        }
    }

    pub fn set_link(&mut self, bytes_s: f64) {
        if self.link_bytes_s.is_some_and(|l| l.is_nan()) {
            return;
        }
        if bytes_s > 0.0 {
            self.link_bytes_s = Some(bytes_s);
        }
    }

    pub fn level(&self) -> i32 {
        LEVELS[self.current]
    }

    /// Level for the next block; every 4th block tries a neighbour to keep
    /// its figures current.
    fn next(&mut self) -> usize {
        self.blocks += 1;
        let Some(link) = self.link_bytes_s.filter(|l| !l.is_nan()) else {
            return self.current;
        };
        // A level not measured yet is assumed a little better than the
        // measured one below it, so that stronger levels get tried.
        let ratio = |i: usize| match (0..=i).rev().find(|&j| self.observed[j]) {
            Some(j) if j < i => self.ratio[j] * 0.93f64.powi((i - j) as i32),
            _ => self.ratio[i],
        };
        let rate = |i: usize| self.speed[i].min(link / ratio(i).max(1e-3));
        // The cheapest level within 2% of the best: when the link, not the
        // codec, limits (fast links, incompressible pages) every level moves
        // bytes alike, and compressing only takes CPU from the guests.
        let best = (0..LEVELS.len()).map(rate).fold(0.0, f64::max);
        self.current = (0..LEVELS.len())
            .find(|&i| rate(i) >= best * 0.98)
            .unwrap_or(self.current);
        if self.blocks.is_multiple_of(4) {
            let up = self.blocks.is_multiple_of(8);
            return if up {
                (self.current + 1).min(LEVELS.len() - 1)
            } else {
                self.current.saturating_sub(1)
            };
        }
        self.current
    }

    fn observe(&mut self, idx: usize, raw: usize, wire: usize, secs: f64) {
        if raw < 4096 {
            return;
        }
        let a = if self.observed[idx] { 0.3 } else { 1.0 };
        self.observed[idx] = true;
        let speed = raw as f64 / secs.max(1e-6);
        let ratio = wire as f64 / raw as f64;
        self.speed[idx] = self.speed[idx] * (1.0 - a) + speed * a;
        self.ratio[idx] = self.ratio[idx] * (1.0 - a) + ratio * a;
    }
}

/// Sender side: turns scanned bytes into blocks.
#[derive(Default)]
pub struct Encoder {
    /// Hash of the last content sent for each (key space, page key).
    last: HashMap<(u32, u64), ChunkHash>,
    pub levels: LevelChooser,
    pub stats: EncodeStats,
}

impl Encoder {
    pub fn new(levels: LevelChooser) -> Encoder {
        Encoder {
            levels,
            ..Default::default()
        }
    }

    /// Encodes `data` (covered exactly by `segments`) into one block,
    /// updating `cache` as the decoder will. Page keys are unique within
    /// `space`: a page re-sent in the same space travels as a delta against
    /// its last content. Without `compress` the literals are stored (link
    /// probes: their random bytes would mislead the level choice).
    pub fn encode(
        &mut self,
        cache: &mut ChunkCache,
        space: u32,
        data: &[u8],
        segments: &[Segment],
        compress: bool,
    ) -> Result<Vec<u8>, DwcpError> {
        let mut ops = Vec::with_capacity(64);
        let mut lit = Vec::with_capacity(data.len());
        let mut pos = 0usize;
        for seg in segments {
            match *seg {
                Segment::Raw(n) => {
                    let bytes = data
                        .get(pos..pos + n)
                        .ok_or_else(|| DwcpError::Corrupt("segments exceed the data".into()))?;
                    ops.push(OP_LIT);
                    put_varint(&mut ops, n as u64);
                    lit.extend_from_slice(bytes);
                    pos += n;
                }
                Segment::Page { key } => {
                    let page = data
                        .get(pos..pos + PAGE)
                        .ok_or_else(|| DwcpError::Corrupt("segments exceed the data".into()))?;
                    pos += PAGE;
                    self.page(cache, space, key, page, &mut ops, &mut lit);
                }
            }
        }
        if pos != data.len() {
            return Err(DwcpError::Corrupt("segments do not cover the data".into()));
        }
        let idx = if compress { self.levels.next() } else { 0 };
        let level = LEVELS[idx];
        let started = Instant::now();
        let mut lit_wire = if level > 0 && !lit.is_empty() {
            zstd::bulk::compress(&lit, level).map_err(|e| DwcpError::Codec(e.to_string()))?
        } else {
            Vec::new()
        };
        let stored = level == 0 || lit_wire.len() >= lit.len();
        if stored {
            lit_wire = lit.clone();
        }
        if compress {
            self.levels
                .observe(idx, lit.len(), lit_wire.len(), started.elapsed().as_secs_f64());
        }
        let mut out = Vec::with_capacity(BLOCK_HEADER + ops.len() + lit_wire.len());
        out.push(VERSION);
        out.push(if stored { 0 } else { level as u8 });
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&xxh3_64(data).to_be_bytes());
        out.extend_from_slice(&(ops.len() as u32).to_be_bytes());
        out.extend_from_slice(&(lit.len() as u32).to_be_bytes());
        out.extend_from_slice(&(lit_wire.len() as u32).to_be_bytes());
        out.extend_from_slice(&ops);
        out.extend_from_slice(&lit_wire);
        self.stats.raw_bytes += data.len() as u64;
        self.stats.encoded_bytes += out.len() as u64;
        Ok(out)
    }

    fn page(
        &mut self,
        cache: &mut ChunkCache,
        space: u32,
        key: u64,
        page: &[u8],
        ops: &mut Vec<u8>,
        lit: &mut Vec<u8>,
    ) {
        self.stats.pages += 1;
        let h = chunk_hash(page);
        let previous = self.last.insert((space, key), h);
        if cache.contains(&h) {
            cache.touch(&h);
            ops.push(OP_REF);
            ops.extend_from_slice(&h);
            self.stats.pages_ref += 1;
            return;
        }
        if let Some(base_hash) = previous {
            if let Some(base) = cache.get(&base_hash) {
                if let Some(runs) = diff_runs(base, page) {
                    ops.push(OP_DELTA);
                    ops.extend_from_slice(&base_hash);
                    put_varint(ops, runs.len() as u64);
                    let mut at = 0;
                    for (start, end) in runs {
                        put_varint(ops, (start - at) as u64);
                        put_varint(ops, (end - start) as u64);
                        lit.extend_from_slice(&page[start..end]);
                        at = end;
                    }
                    cache.insert(h, page.into());
                    self.stats.pages_delta += 1;
                    return;
                }
            }
        }
        ops.push(OP_PAGE);
        lit.extend_from_slice(page);
        cache.insert(h, page.into());
    }
}

/// What a page re-sent as `new` after `base` costs before compression: the
/// DELTA op and its runs, or None when it would travel whole.
pub fn delta_bytes(base: &[u8], new: &[u8]) -> Option<usize> {
    let runs = diff_runs(base, new)?;
    let changed: usize = runs.iter().map(|(s, e)| e - s).sum();
    // Op, base hash, run count, and two varints (at most 2 bytes each) per run.
    Some(1 + std::mem::size_of::<ChunkHash>() + 2 + 4 * runs.len() + changed)
}

/// Byte runs where `new` differs from `base`, or None when too much changed.
fn diff_runs(base: &[u8], new: &[u8]) -> Option<Vec<(usize, usize)>> {
    if base.len() != new.len() {
        return None;
    }
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut changed = 0;
    let mut i = 0;
    while i < new.len() {
        let end = (i + 8).min(new.len());
        if base[i..end] != new[i..end] {
            match runs.last_mut() {
                Some(last) if i - last.1 < DELTA_GAP => {
                    changed += end - last.1;
                    last.1 = end;
                }
                _ => {
                    changed += end - i;
                    runs.push((i, end));
                }
            }
            if changed + 4 * runs.len() > DELTA_MAX_BYTES {
                return None;
            }
        }
        i = end;
    }
    Some(runs)
}

/// Receiver side: rebuilds a block's bytes into `out`, updating `cache`.
pub fn decode(cache: &mut ChunkCache, block: &[u8], out: &mut Vec<u8>) -> Result<(), DwcpError> {
    let bad = |what: &str| DwcpError::Corrupt(format!("bad block: {what}"));
    if block.len() < BLOCK_HEADER || block[0] != VERSION {
        return Err(bad("header"));
    }
    let level = block[1];
    let u32_at = |i: usize| u32::from_be_bytes([block[i], block[i + 1], block[i + 2], block[i + 3]]) as usize;
    let decoded_len = u32_at(2);
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&block[6..14]);
    let expected_sum = u64::from_be_bytes(sum);
    let (ops_len, lit_len, lit_wire_len) = (u32_at(14), u32_at(18), u32_at(22));
    if decoded_len > crate::frame::MAX_PAYLOAD * 4 || lit_len > decoded_len {
        return Err(bad("lengths"));
    }
    let ops = block
        .get(BLOCK_HEADER..BLOCK_HEADER + ops_len)
        .ok_or_else(|| bad("ops"))?;
    let lit_wire = block
        .get(BLOCK_HEADER + ops_len..BLOCK_HEADER + ops_len + lit_wire_len)
        .ok_or_else(|| bad("literals"))?;
    if BLOCK_HEADER + ops_len + lit_wire_len != block.len() {
        return Err(bad("trailing bytes"));
    }
    let lit = if level == 0 {
        lit_wire.to_vec()
    } else {
        zstd::bulk::decompress(lit_wire, lit_len).map_err(|e| bad(&format!("zstd: {e}")))?
    };
    if lit.len() != lit_len {
        return Err(bad("literal length"));
    }
    let start = out.len();
    out.reserve(decoded_len);
    let mut ops = OpReader { data: ops, pos: 0 };
    let mut lit_pos = 0usize;
    let mut take_lit = |n: usize| -> Result<&[u8], DwcpError> {
        let s = lit.get(lit_pos..lit_pos + n).ok_or_else(|| bad("literals run out"))?;
        lit_pos += n;
        Ok(s)
    };
    while !ops.done() {
        match ops.u8()? {
            OP_LIT => {
                let n = ops.varint()? as usize;
                out.extend_from_slice(take_lit(n)?);
            }
            OP_PAGE => {
                let page = take_lit(PAGE)?;
                out.extend_from_slice(page);
                cache.insert(chunk_hash(page), page.into());
            }
            OP_REF => {
                let h = ops.hash()?;
                let data = cache
                    .get(&h)
                    .ok_or_else(|| DwcpError::Corrupt("reference to a chunk the cache does not hold".into()))?;
                out.extend_from_slice(data);
                cache.touch(&h);
            }
            OP_DELTA => {
                let base_hash = ops.hash()?;
                let base = cache
                    .get(&base_hash)
                    .ok_or_else(|| DwcpError::Corrupt("delta against a chunk the cache does not hold".into()))?;
                let mut page = base.to_vec();
                let runs = ops.varint()?;
                let mut at = 0usize;
                for _ in 0..runs {
                    let skip = ops.varint()? as usize;
                    let len = ops.varint()? as usize;
                    let from = at.checked_add(skip).ok_or_else(|| bad("delta run"))?;
                    let to = from
                        .checked_add(len)
                        .filter(|&t| t <= page.len())
                        .ok_or_else(|| bad("delta run"))?;
                    page[from..to].copy_from_slice(take_lit(len)?);
                    at = to;
                }
                out.extend_from_slice(&page);
                let page: Arc<[u8]> = page.into();
                cache.insert(chunk_hash(&page), page);
            }
            other => return Err(bad(&format!("unknown op {other}"))),
        }
        if out.len() - start > decoded_len {
            return Err(bad("longer than declared"));
        }
    }
    let decoded = &out[start..];
    if decoded.len() != decoded_len || xxh3_64(decoded) != expected_sum {
        out.truncate(start);
        return Err(DwcpError::Corrupt("decoded block does not match its checksum".into()));
    }
    Ok(())
}

struct OpReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl OpReader<'_> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn u8(&mut self) -> Result<u8, DwcpError> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or_else(|| DwcpError::Corrupt("bad block: ops end early".into()))?;
        self.pos += 1;
        Ok(b)
    }

    fn hash(&mut self) -> Result<ChunkHash, DwcpError> {
        let s = self
            .data
            .get(self.pos..self.pos + 16)
            .ok_or_else(|| DwcpError::Corrupt("bad block: ops end early".into()))?;
        self.pos += 16;
        let mut h = [0u8; 16];
        h.copy_from_slice(s);
        Ok(h)
    }

    fn varint(&mut self) -> Result<u64, DwcpError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DwcpError::Corrupt("bad block: varint".into()))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::{tests::qemu_stream, Role, Scanner};

    fn text_page(i: u32, variant: u32) -> Vec<u8> {
        // A counter at the top, the same markup below it.
        let mut p = format!("views={variant:08}\n").into_bytes();
        while p.len() < PAGE {
            p.extend_from_slice(format!("<tr><td>item {i}</td><td>price {}</td></tr>\n", p.len() % 97).as_bytes());
        }
        p.truncate(PAGE);
        p
    }

    /// `n` pages of xorshift bytes (incompressible), continuing from `seed`.
    fn random_pages(n: usize, seed: &mut u64) -> Vec<Vec<u8>> {
        (0..n)
            .map(|_| {
                (0..PAGE)
                    .map(|_| {
                        *seed ^= *seed << 13;
                        *seed ^= *seed >> 7;
                        *seed ^= *seed << 17;
                        *seed as u8
                    })
                    .collect()
            })
            .collect()
    }

    fn round_trip(enc: &mut Encoder, tx: &mut ChunkCache, rx: &mut ChunkCache, data: &[u8]) -> usize {
        let mut scanner = Scanner::new(Role::Migration);
        let (segs, used) = scanner.scan(data, false);
        assert_eq!(used, data.len());
        let block = enc.encode(tx, 1, data, &segs, true).unwrap_or_default();
        let mut out = Vec::new();
        let decoded = decode(rx, &block, &mut out);
        assert!(decoded.is_ok(), "{decoded:?}");
        assert_eq!(out, data);
        assert_eq!(tx.ops, rx.ops);
        block.len()
    }

    #[test]
    fn dedup_delta_and_compression() {
        let (mut tx, mut rx) = (ChunkCache::new(1 << 30), ChunkCache::new(1 << 30));
        let mut enc = Encoder::new(LevelChooser::fixed(3));
        let pages: Vec<Vec<u8>> = (0..64).map(|i| text_page(i, 0)).collect();
        let first = round_trip(&mut enc, &mut tx, &mut rx, &qemu_stream(&pages));
        assert!(first < 64 * PAGE / 4, "text compresses: {first} bytes");
        // The same pages again (a second VM from the same image): references only.
        let again = round_trip(&mut enc, &mut tx, &mut rx, &qemu_stream(&pages));
        assert!(again < 64 * 20 + 200, "{again} bytes for 64 known pages");
        assert_eq!(enc.stats.pages_ref, 64);
        // Small changes to known pages: deltas.
        let changed: Vec<Vec<u8>> = (0..64).map(|i| text_page(i, 1)).collect();
        round_trip(&mut enc, &mut tx, &mut rx, &qemu_stream(&changed));
        assert_eq!(enc.stats.pages_delta, 64);
    }

    #[test]
    fn random_pages_are_stored_not_inflated() {
        let (mut tx, mut rx) = (ChunkCache::new(1 << 30), ChunkCache::new(1 << 30));
        let mut enc = Encoder::new(LevelChooser::fixed(3));
        let data = qemu_stream(&random_pages(32, &mut 1));
        let n = round_trip(&mut enc, &mut tx, &mut rx, &data);
        assert!(n < data.len() + 64 * 32, "{n} vs {}", data.len());
    }

    #[test]
    fn corrupt_blocks_and_unknown_references_fail() {
        let (mut tx, mut rx) = (ChunkCache::new(1 << 30), ChunkCache::new(1 << 30));
        let mut enc = Encoder::new(LevelChooser::fixed(1));
        let pages: Vec<Vec<u8>> = (0..8).map(|i| text_page(i, 0)).collect();
        let data = qemu_stream(&pages);
        let mut scanner = Scanner::new(Role::Migration);
        let (segs, _) = scanner.scan(&data, false);
        let block = enc.encode(&mut tx, 1, &data, &segs, true).unwrap_or_default();
        for i in (0..block.len()).step_by(7) {
            let mut bad = block.clone();
            bad[i] ^= 0x01;
            let mut out = Vec::new();
            let mut fresh = ChunkCache::new(1 << 30);
            assert!(decode(&mut fresh, &bad, &mut out).is_err(), "flip at {i} not caught");
        }
        // References to pages a fresh receiver never saw.
        let block = enc.encode(&mut tx, 1, &data, &segs, true).unwrap_or_default();
        let mut out = Vec::new();
        let err = decode(&mut rx, &block, &mut out);
        assert!(matches!(err, Err(DwcpError::Corrupt(m)) if m.contains("does not hold")));
    }

    #[test]
    fn compressible_data_on_a_slow_link_gets_compressed() {
        let (mut tx, mut rx) = (ChunkCache::new(1 << 30), ChunkCache::new(1 << 30));
        let mut enc = Encoder::new(LevelChooser::default());
        enc.levels.set_link(10e6);
        for round in 0..40u32 {
            let pages: Vec<Vec<u8>> = (0..64).map(|i| text_page(i + round * 64, 0)).collect();
            round_trip(&mut enc, &mut tx, &mut rx, &qemu_stream(&pages));
        }
        assert!(enc.levels.level() > 0, "stored on a 10 MB/s link");
        assert!(enc.stats.encoded_bytes * 3 < enc.stats.raw_bytes, "{:?}", enc.stats);
    }

    #[test]
    fn incompressible_data_on_a_fast_link_is_stored() {
        let (mut tx, mut rx) = (ChunkCache::new(1 << 30), ChunkCache::new(1 << 30));
        let mut enc = Encoder::new(LevelChooser::default());
        enc.levels.set_link(100e6);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..40 {
            round_trip(&mut enc, &mut tx, &mut rx, &qemu_stream(&random_pages(64, &mut seed)));
        }
        assert_eq!(enc.levels.level(), 0, "random pages compressed on a 100 MB/s link");
    }

    #[test]
    fn level_follows_the_link() {
        let mut slow = LevelChooser::default();
        slow.set_link(1e6);
        let mut fast = LevelChooser::default();
        fast.set_link(1e10);
        slow.next();
        fast.next();
        assert!(slow.level() > fast.level(), "{} vs {}", slow.level(), fast.level());
    }

    proptest::proptest! {
        #[test]
        fn any_input_round_trips(chunks in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..9000), 1..5)) {
            let (mut tx, mut rx) = (ChunkCache::new(64 * PAGE), ChunkCache::new(64 * PAGE));
            let mut enc = Encoder::new(LevelChooser::fixed(1));
            let mut scanner = Scanner::new(Role::Nbd);
            for data in chunks {
                let (segs, used) = scanner.scan(&data, false);
                proptest::prop_assert_eq!(used, data.len());
                let block = enc.encode(&mut tx, 3, &data, &segs, true).unwrap_or_default();
                let mut out = Vec::new();
                proptest::prop_assert!(decode(&mut rx, &block, &mut out).is_ok());
                proptest::prop_assert_eq!(out, data);
            }
        }
    }
}
