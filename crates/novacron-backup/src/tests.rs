//! The datastore end to end: backups of byte arrays standing for disks.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::gc::collect_garbage;
use crate::restore::restore_disk;
use crate::verify::verify_backup;
use crate::*;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A disk of `chunks` chunks (and a short tail), chunk i filled with byte `fill(i)`.
fn disk(chunks: usize, fill: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut d = Vec::new();
    for i in 0..chunks {
        d.extend(std::iter::repeat_n(fill(i), CHUNK_SIZE as usize));
    }
    d.extend(std::iter::repeat_n(7u8, 4096));
    d
}

/// Backs `disks` up as backup `id`, reading every chunk (a full backup).
fn back_up(store: &Datastore, id: &BackupId, disks: &[(&str, &[u8])]) -> Manifest {
    let mut w = store.begin(id).unwrap();
    for (name, bytes) in disks {
        let mut stats = DiskStats::default();
        let mut digests = Vec::new();
        for c in bytes.chunks(CHUNK_SIZE as usize) {
            let (d, new) = store.insert_chunk(c).unwrap();
            stats.bytes_read += c.len() as u64;
            if let Some(n) = new {
                stats.chunks_new += 1;
                stats.stored_bytes += n;
            }
            digests.push(d);
        }
        let index = FixedIndex {
            size: bytes.len() as u64,
            chunk_size: CHUNK_SIZE,
            digests,
        };
        w.add_disk(name, &index, stats).unwrap();
    }
    w.finish(BackupInfo {
        vm_id: "vm-id-1".into(),
        full_reason: Some("first backup".into()),
        duration_ms: 1,
        ..Default::default()
    })
    .unwrap()
}

fn id(vm: &str, time: &str) -> BackupId {
    BackupId {
        vm: vm.into(),
        time: at(time),
    }
}

fn restored(store: &Datastore, id: &BackupId, disk: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.raw");
    let mut f = std::fs::File::create(&path).unwrap();
    restore_disk(store, id, disk, &mut f, |_, _| {}).unwrap();
    std::fs::read(&path).unwrap()
}

#[test]
fn chunks_are_stored_once_across_disks_vms_and_backups() {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create(dir.path()).unwrap();
    let root = disk(3, |i| i as u8 + 1);
    let data = disk(2, |_| 0);
    let first = back_up(
        &store,
        &id("web-1", "2026-12-01T00:00:00Z"),
        &[("root", &root), ("data", &data)],
    );
    // 3 + tail for root, 1 zero chunk + the same tail for data.
    assert_eq!(first.disks[0].chunks_new, 4);
    assert_eq!(first.disks[1].chunks_new, 1);
    assert!(first.disks[1].stored_bytes < 4096, "zeros compress");

    // The same root again, one chunk changed; another VM from the same image.
    let mut root2 = root.clone();
    root2[CHUNK_SIZE as usize + 10] ^= 0xff;
    let second = back_up(&store, &id("web-1", "2026-12-02T00:00:00Z"), &[("root", &root2)]);
    assert_eq!(second.disks[0].chunks_new, 1);
    let other = back_up(&store, &id("db-1", "2026-12-02T00:00:00Z"), &[("root", &root)]);
    assert_eq!(other.disks[0].chunks_new, 0);

    let all = store.list(None).unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(store.list(Some("web-1")).unwrap().len(), 2);
    assert_eq!(restored(&store, &second.id, "root"), root2);
    assert_eq!(restored(&store, &first.id, "data"), data);
    assert!(matches!(store.begin(&first.id), Err(StoreError::Exists(_))));
}

#[test]
fn verify_finds_corrupt_and_missing_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create(dir.path()).unwrap();
    let root = disk(2, |i| i as u8 + 1);
    let b = back_up(&store, &id("web-1", "2026-12-01T00:00:00Z"), &[("root", &root)]);
    let report = verify_backup(&store, &b.id, &mut HashSet::new()).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.chunks_checked, 3);

    let index = store.index(&b.id, "root").unwrap();
    let bad = store.chunk_path(&index.digests[1]);
    let mut bytes = std::fs::read(&bad).unwrap();
    let n = bytes.len() - 1;
    bytes[n] ^= 1;
    std::fs::write(&bad, bytes).unwrap();
    std::fs::remove_file(store.chunk_path(&index.digests[0])).unwrap();
    let report = verify_backup(&store, &b.id, &mut HashSet::new()).unwrap();
    assert_eq!(report.errors.len(), 2, "{report:?}");
    assert!(
        report.errors[0].contains("offset 0") && report.errors[0].contains("missing"),
        "{report:?}"
    );
    assert!(report.errors[1].contains(&format!("offset {CHUNK_SIZE}")), "{report:?}");

    // A client cannot store wrong content under a digest.
    let lie = chunk::encode(b"not what the digest says");
    assert!(store.insert_encoded(&Digest::of(b"something else"), &lie).is_err());
}

#[test]
fn gc_removes_only_what_no_backup_or_running_backup_needs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create(dir.path()).unwrap();
    let old = disk(2, |i| 10 + i as u8);
    let new = disk(2, |i| if i == 0 { 10 } else { 20 });
    let first = back_up(&store, &id("web-1", "2026-12-01T00:00:00Z"), &[("root", &old)]);
    let second = back_up(&store, &id("web-1", "2026-12-02T00:00:00Z"), &[("root", &new)]);

    // Nothing to collect while both exist.
    let r = collect_garbage(&store, Duration::ZERO).unwrap();
    assert_eq!((r.chunks_in_use, r.chunks_removed), (4, 0), "{r:?}");

    // A backup being written holds a chunk no finished backup names.
    let mut writer = store.begin(&id("web-1", "2026-12-03T00:00:00Z")).unwrap();
    let (pending, _) = store.insert_chunk(b"written by a backup not finished yet").unwrap();

    store.delete(&first.id).unwrap();
    assert!(matches!(store.manifest(&first.id), Err(StoreError::NotFound(_))));
    // first's own chunk was written an hour ago (file times are coarse:
    // the grace covers a jiffy).
    let only_first = Digest::of(&old[CHUNK_SIZE as usize..2 * CHUNK_SIZE as usize]);
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(store.chunk_path(&only_first))
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    let r = collect_garbage(&store, Duration::from_secs(1)).unwrap();
    // first's second chunk goes; the shared one, second's, and the pending one stay.
    assert_eq!((r.chunks_in_use, r.chunks_removed, r.chunks_recent), (3, 1, 1), "{r:?}");
    assert!(store.has_chunk(&pending) && !store.has_chunk(&only_first));
    assert_eq!(restored(&store, &second.id, "root"), new);
    assert!(verify_backup(&store, &second.id, &mut HashSet::new()).unwrap().ok());

    // The writer finishes with the pending chunk; then an abandoned one is cleared.
    let index = FixedIndex {
        size: 36,
        chunk_size: CHUNK_SIZE,
        digests: vec![pending],
    };
    writer.add_disk("root", &index, DiskStats::default()).unwrap();
    writer.finish(BackupInfo::default()).unwrap();
    let abandoned = store.begin(&id("web-1", "2026-12-04T00:00:00Z")).unwrap();
    let stale = dir.path().join("vm/web-1/.2026-12-04T00:00:00Z.partial/started");
    std::fs::write(&stale, "2026-01-01T00:00:00Z").unwrap();
    let r = collect_garbage(&store, Duration::ZERO).unwrap();
    assert_eq!(r.abandoned_removed, 1, "{r:?}");
    assert_eq!(store.list(None).unwrap().len(), 2);
    drop(abandoned);
}

#[test]
fn an_index_that_changed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create(dir.path()).unwrap();
    let b = back_up(
        &store,
        &id("web-1", "2026-12-01T00:00:00Z"),
        &[("root", &disk(1, |_| 3))],
    );
    let path = dir.path().join(b.id.rel_dir()).join("root.fidx");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len() - 1;
    bytes[n] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert!(matches!(
        store.index(&b.id, "root"),
        Err(StoreError::IndexDigest { .. })
    ));
    assert!(Datastore::open(&dir.path().join("nope")).is_err());
}
