//! Helpers of the backup tests.

use std::time::Duration;

use novacron_api::Backup;

use super::{ok, Cluster};

/// Takes a backup of `vm` (into `store`, or the default) with the CLI.
pub fn backup(c: &Cluster, vm: &str, store: Option<&str>) -> Backup {
    let mut args = vec!["-o", "json", "backup", "create", vm];
    if let Some(s) = store {
        args.extend(["--store", s]);
    }
    let out = ok(c.cli(&args).output().expect("cli"));
    let mut list: Vec<Backup> = serde_json::from_str(&out).expect("backup json");
    // Backups are named by the second they start in.
    std::thread::sleep(Duration::from_millis(1100));
    list.remove(0)
}
