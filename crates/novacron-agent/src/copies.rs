//! Long disk work for a VM in a task of its own — a full clone's root disk
//! copied from its image, disks restored from a backup — so that one large
//! disk does not hold up the reconciliation of every other VM of the node:
//! the reconciler asks on each pass and meanwhile reports the percentage
//! in the VM's status.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use novacron_api::error::chain;
use parking_lot::Mutex;

enum Job {
    Running(Arc<AtomicU8>, tokio::task::JoinHandle<()>),
    Finished(Result<(), String>),
}

/// Where a VM's job stands.
pub enum JobPoll {
    /// Done (told once; the next poll starts it again).
    Done,
    /// Running; percent done.
    Running(u8),
    /// It failed, saying why (told once; the next poll starts it again).
    Failed(String),
}

/// Background jobs by VM id, at most one per VM.
#[derive(Clone, Default)]
pub struct VmJobs {
    jobs: Arc<Mutex<HashMap<String, Job>>>,
    /// Told when a job ends, so its VM goes on without waiting for the
    /// reconciler's next tick.
    ended: Arc<tokio::sync::Notify>,
}

impl VmJobs {
    /// VM `vm_id`'s job: running, or its outcome once; when it has none,
    /// `start` (given where to put its percentage) is started now.
    pub fn poll<F, Fut>(&self, vm_id: &str, start: F) -> JobPoll
    where
        F: FnOnce(Arc<AtomicU8>) -> Fut,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let mut jobs = self.jobs.lock();
        match jobs.remove(vm_id) {
            Some(Job::Running(percent, task)) => {
                let now = percent.load(Ordering::Relaxed);
                jobs.insert(vm_id.to_string(), Job::Running(percent, task));
                JobPoll::Running(now)
            }
            Some(Job::Finished(Ok(()))) => JobPoll::Done,
            Some(Job::Finished(Err(why))) => JobPoll::Failed(why),
            None => {
                let percent = Arc::new(AtomicU8::new(0));
                let work = start(percent.clone());
                let (all, id) = (self.clone(), vm_id.to_string());
                let task = tokio::spawn(async move {
                    let result = work.await;
                    // Unless forgotten meanwhile.
                    if let Some(job @ Job::Running(..)) = all.jobs.lock().get_mut(&id) {
                        *job = Job::Finished(result);
                        all.ended.notify_one();
                    }
                });
                jobs.insert(vm_id.to_string(), Job::Running(percent, task));
                JobPoll::Running(0)
            }
        }
    }

    /// Stops and forgets a VM's job (the VM is gone from this node).
    pub fn forget(&self, vm_id: &str) {
        if let Some(Job::Running(_, task)) = self.jobs.lock().remove(vm_id) {
            task.abort();
        }
    }

    /// Returns once a job has ended since the last call.
    pub async fn ended(&self) {
        self.ended.notified().await;
    }
}

/// Full clones' root disks being copied from their image.
#[derive(Clone, Default)]
pub struct FullCopies(VmJobs);

impl FullCopies {
    /// The root disk `path` of VM `vm_id`, a full copy of `base` grown to
    /// `size_mib`: done, still copying (started now if it was not), or failed.
    pub fn poll(&self, vm_id: &str, path: &Path, base: &Path, size_mib: Option<u64>) -> JobPoll {
        if path.exists() {
            self.0.forget(vm_id);
            return JobPoll::Done;
        }
        let (path, base): (PathBuf, PathBuf) = (path.into(), base.into());
        self.0.poll(vm_id, move |percent| async move {
            crate::qemu::copy_disk(&path, &base, size_mib, &percent)
                .await
                .map_err(|e| chain(&e).to_string())
        })
    }

    pub fn forget(&self, vm_id: &str) {
        self.0.forget(vm_id);
    }

    /// Returns once a copy has ended since the last call.
    pub async fn ended(&self) {
        self.0.ended().await;
    }
}
