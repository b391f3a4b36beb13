//! Full clones' root disks, copied from the image in the background: the
//! reconciler asks on each pass and meanwhile reports the percentage in
//! the VM's status, instead of blocking every VM of the node on one copy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use novacron_api::error::chain;
use parking_lot::Mutex;

enum Copy {
    Running(Arc<AtomicU8>),
    Failed(String),
}

/// Where a VM's full copy stands.
pub enum CopyPoll {
    /// The root disk is in place.
    Done,
    /// Copying; percent done.
    Running(u8),
    /// The copy failed (the next poll starts it again).
    Failed(String),
}

#[derive(Clone, Default)]
pub struct FullCopies(Arc<Mutex<HashMap<String, Copy>>>);

impl FullCopies {
    /// The root disk `path` of VM `vm_id`, a full copy of `base` grown to
    /// `size_mib`: done, still copying (started now if it was not), or failed.
    pub fn poll(&self, vm_id: &str, path: &Path, base: &Path, size_mib: Option<u64>) -> CopyPoll {
        let mut copies = self.0.lock();
        if path.exists() {
            copies.remove(vm_id);
            return CopyPoll::Done;
        }
        match copies.remove(vm_id) {
            Some(Copy::Running(percent)) => {
                let now = percent.load(Ordering::Relaxed);
                copies.insert(vm_id.to_string(), Copy::Running(percent));
                CopyPoll::Running(now)
            }
            Some(Copy::Failed(why)) => CopyPoll::Failed(why),
            None => {
                let percent = Arc::new(AtomicU8::new(0));
                copies.insert(vm_id.to_string(), Copy::Running(percent.clone()));
                let (copies, vm_id) = (self.clone(), vm_id.to_string());
                let (path, base): (PathBuf, PathBuf) = (path.into(), base.into());
                tokio::spawn(async move {
                    let result = crate::qemu::copy_disk(&path, &base, size_mib, &percent).await;
                    let mut all = copies.0.lock();
                    match result {
                        Ok(()) => {
                            all.remove(&vm_id);
                        }
                        Err(e) => {
                            all.insert(vm_id, Copy::Failed(chain(&e).to_string()));
                        }
                    }
                });
                CopyPoll::Running(0)
            }
        }
    }

    /// Forgets a VM's copy (the VM is gone from this node).
    pub fn forget(&self, vm_id: &str) {
        self.0.lock().remove(vm_id);
    }
}
