//! `backup_fill DIR VM MIB SEED`: adds to the datastore in DIR (made if
//! missing) a backup of VM VM with one disk of MIB MiB of random
//! (incompressible) data, for bench/backup-sync.sh.
//! Written with the datastore library directly: the sync bench measures
//! copying between stores, not taking backups.

use anyhow::{bail, Context, Result};
use chrono::Timelike;
use novacron_backup::{BackupId, BackupInfo, Datastore, DiskStats, FixedIndex, CHUNK_SIZE};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, vm, mib, seed] = args.as_slice() else {
        bail!("usage: backup_fill DIR VM MIB SEED");
    };
    let mib: u64 = mib.parse().context("MIB")?;
    let mut state: u64 = seed.parse().context("SEED")?;
    let ds = Datastore::create(std::path::Path::new(dir))?;
    let size = mib << 20;
    let mut digests = Vec::new();
    let mut chunk = vec![0u8; CHUNK_SIZE as usize];
    for _ in 0..FixedIndex::chunks_for(size, CHUNK_SIZE) {
        for word in chunk.chunks_mut(8) {
            // splitmix64: fast, and random enough that zstd cannot shrink it.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes()[..word.len()]);
        }
        digests.push(ds.insert_chunk(&chunk)?.0);
    }
    let id = BackupId {
        vm: vm.clone(),
        time: chrono::Utc::now().with_nanosecond(0).context("a time to the second")?,
    };
    let index = FixedIndex {
        size,
        chunk_size: CHUNK_SIZE,
        digests,
    };
    let info = BackupInfo {
        vm_id: vm.clone(),
        project: "default".into(),
        full_reason: Some("bench data".into()),
        duration_ms: 0,
        config: None,
        key_id: None,
    };
    ds.write_backup(&id, &[("root".into(), index, DiskStats::default())], info)?;
    println!("{id}");
    Ok(())
}
