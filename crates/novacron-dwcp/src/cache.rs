//! The chunk cache both ends of a session keep in step.
//!
//! The sender decides "the receiver holds this chunk" from its own copy of the
//! cache, so both copies must evolve identically: they see the same inserts
//! and touches in the same (frame sequence) order and evict by the same rule
//! (least recently inserted or referenced first, by bytes). `ops` counts every
//! change; a session starts by comparing `(id, ops)` on both sides and clears
//! both caches when they differ (say after a session that broke half-way).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

/// BLAKE3 of a chunk, first 128 bits: a guest cannot forge a collision.
pub type ChunkHash = [u8; 16];

pub fn chunk_hash(data: &[u8]) -> ChunkHash {
    let full = blake3::hash(data);
    let mut h = [0u8; 16];
    h.copy_from_slice(&full.as_bytes()[..16]);
    h
}

pub struct ChunkCache {
    /// Changes whenever the cache is cleared; random, so two fresh caches differ.
    pub id: u64,
    /// Number of inserts and touches since the last clear.
    pub ops: u64,
    capacity: usize,
    used: usize,
    entries: HashMap<ChunkHash, (Arc<[u8]>, u64)>,
    order: VecDeque<(ChunkHash, u64)>,
    clock: u64,
}

impl ChunkCache {
    pub fn new(capacity: usize) -> ChunkCache {
        ChunkCache {
            id: fresh_id(),
            ops: 0,
            capacity,
            used: 0,
            entries: HashMap::new(),
            order: VecDeque::new(),
            clock: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.used
    }

    /// Empties the cache and gives it a new identity (and capacity).
    pub fn clear(&mut self, id: u64, capacity: usize) {
        self.entries.clear();
        self.order.clear();
        self.used = 0;
        self.ops = 0;
        self.id = id;
        self.capacity = capacity;
    }

    pub fn get(&self, h: &ChunkHash) -> Option<&Arc<[u8]>> {
        self.entries.get(h).map(|(d, _)| d)
    }

    pub fn contains(&self, h: &ChunkHash) -> bool {
        self.entries.contains_key(h)
    }

    /// Marks `h` as just used (it moves to the back of the eviction order).
    pub fn touch(&mut self, h: &ChunkHash) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) = self.entries.get_mut(h) {
            e.1 = clock;
            self.order.push_back((*h, clock));
            self.ops += 1;
            self.compact();
        }
    }

    /// Adds a chunk (or touches it when present), evicting the oldest as needed.
    pub fn insert(&mut self, h: ChunkHash, data: Arc<[u8]>) {
        if self.entries.contains_key(&h) {
            self.touch(&h);
            return;
        }
        if data.len() > self.capacity {
            return;
        }
        self.clock += 1;
        self.ops += 1;
        self.used += data.len();
        self.entries.insert(h, (data, self.clock));
        self.order.push_back((h, self.clock));
        while self.used > self.capacity {
            let Some((old, stamp)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&old).is_some_and(|(_, s)| *s == stamp) {
                if let Some((d, _)) = self.entries.remove(&old) {
                    self.used -= d.len();
                }
            }
        }
        self.compact();
    }

    /// Drops stale order entries (left by touches) once they dominate.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.entries.len() + 1024 {
            let entries = &self.entries;
            self.order
                .retain(|(h, s)| entries.get(h).is_some_and(|(_, cur)| cur == s));
        }
    }
}

fn fresh_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish() | 1
}

pub fn new_cache_id() -> u64 {
    fresh_id()
}

/// The caches an agent keeps, one per peer and direction, so that the next
/// migration between the same two agents finds what the last one sent.
/// A session takes its cache out and puts it back when it ends well; a
/// session that fails leaves it out (it may disagree with the peer's copy).
#[derive(Clone)]
pub struct CacheStore {
    capacity: usize,
    caches: Arc<Mutex<HashMap<String, ChunkCache>>>,
}

impl CacheStore {
    pub fn new(capacity: usize) -> CacheStore {
        CacheStore {
            capacity,
            caches: Arc::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The cache kept under `key`, or a new empty one.
    pub fn take(&self, key: &str) -> ChunkCache {
        let mut map = self.caches.lock();
        map.remove(key).unwrap_or_else(|| ChunkCache::new(self.capacity))
    }

    pub fn put(&self, key: &str, cache: ChunkCache) {
        let mut map = self.caches.lock();
        map.insert(key.to_string(), cache);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u8) -> Arc<[u8]> {
        vec![i; 100].into()
    }

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let mut c = ChunkCache::new(300);
        let (a, b, d) = (chunk_hash(&[1]), chunk_hash(&[2]), chunk_hash(&[3]));
        c.insert(a, chunk(1));
        c.insert(b, chunk(2));
        c.insert(d, chunk(3));
        c.touch(&a);
        c.insert(chunk_hash(&[4]), chunk(4));
        assert!(c.contains(&a), "touched entry survives");
        assert!(!c.contains(&b), "oldest untouched entry goes");
        assert_eq!(c.bytes(), 300);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn same_operations_give_same_state() {
        let mut x = ChunkCache::new(1000);
        let mut y = ChunkCache::new(1000);
        for i in 0..200u32 {
            let h = chunk_hash(&(i % 37).to_be_bytes());
            let d: Arc<[u8]> = vec![0u8; 10 + (i % 50) as usize].into();
            if i % 3 == 0 {
                x.touch(&h);
                y.touch(&h);
            } else {
                x.insert(h, d.clone());
                y.insert(h, d);
            }
        }
        assert_eq!(x.ops, y.ops);
        let mut kx: Vec<_> = x.entries.keys().collect();
        let mut ky: Vec<_> = y.entries.keys().collect();
        kx.sort();
        ky.sort();
        assert_eq!(kx, ky);
    }
}
