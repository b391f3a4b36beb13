//! The timeline of a migration: when each step began and how long it took,
//! reported in the Migration's status so that an operator (and the WAN
//! benchmark) sees where the time went.

use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_api::{MigrationStep, MigrationStepKind};
use parking_lot::Mutex;

#[derive(Clone)]
pub(super) struct Timeline {
    started: Instant,
    steps: Arc<Mutex<Vec<MigrationStep>>>,
    /// How many of `steps` (at their end) another node measured.
    remote: Arc<Mutex<Vec<usize>>>,
    /// Wakes whoever reports the status (see `driver::StatusReport`).
    changed: Arc<tokio::sync::Notify>,
}

/// A step begun and not yet ended.
#[must_use]
pub(super) struct Running {
    index: usize,
    at: Instant,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline::new(Instant::now())
    }
}

impl Timeline {
    pub(super) fn new(started: Instant) -> Timeline {
        Timeline {
            started,
            steps: Arc::default(),
            remote: Arc::default(),
            changed: Arc::default(),
        }
    }

    pub(super) fn changed(&self) -> Arc<tokio::sync::Notify> {
        self.changed.clone()
    }

    fn offset_ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_millis() as u64
    }

    pub(super) fn begin(&self, step: MigrationStepKind) -> Running {
        let at = Instant::now();
        let mut steps = self.steps.lock();
        steps.push(MigrationStep {
            step,
            start_ms: self.offset_ms(at),
            duration_ms: None,
            detail: None,
        });
        self.changed.notify_one();
        Running {
            index: steps.len() - 1,
            at,
        }
    }

    pub(super) fn end(&self, running: Running, detail: Option<String>) {
        if let Some(s) = self.steps.lock().get_mut(running.index) {
            s.duration_ms = Some(running.at.elapsed().as_millis() as u64);
            s.detail = detail;
        }
        self.changed.notify_one();
    }

    /// Runs `work` as one step.
    pub(super) async fn time<T>(&self, step: MigrationStepKind, work: impl std::future::Future<Output = T>) -> T {
        let running = self.begin(step);
        let out = work.await;
        self.end(running, None);
        out
    }

    /// Adds steps another node measured (the target's), which began `offset`
    /// after `at` on this node's clock: the call that ran them started at
    /// `at`, and each step's place is the target's measure from there.
    pub(super) fn add_remote(&self, at: Instant, remote: &[MigrationStep]) {
        let base = self.offset_ms(at);
        let mut steps = self.steps.lock();
        let first = steps.len();
        steps.extend(remote.iter().map(|s| MigrationStep {
            start_ms: base + s.start_ms,
            ..s.clone()
        }));
        self.remote.lock().extend(first..steps.len());
        self.changed.notify_one();
    }

    /// Adds a step known by its wall-clock ends (Unix ms), such as the guest's
    /// pause from QEMU's STOP event on this node to the resume the target reports.
    pub(super) fn add_wall(&self, step: MigrationStepKind, from_unix_ms: f64, to_unix_ms: f64) {
        let now_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3);
        let ago = Duration::from_secs_f64(((now_unix_ms - from_unix_ms) / 1e3).max(0.0));
        let start = Instant::now().checked_sub(ago).unwrap_or(self.started);
        self.steps.lock().push(MigrationStep {
            step,
            start_ms: self.offset_ms(start),
            duration_ms: Some((to_unix_ms - from_unix_ms).max(0.0).round() as u64),
            detail: None,
        });
        self.changed.notify_one();
    }

    /// This node's own steps, ended ones only, as spans of a trace (wall
    /// clock), inside one span `name` from the timeline's start to now.
    pub(super) fn as_span(&self, name: &str) -> novacron_trace::Finished {
        let now = std::time::SystemTime::now();
        // One reading of the start on the wall clock, so every step is placed from the same base.
        let base = now.checked_sub(self.started.elapsed()).unwrap_or(now);
        let wall = |offset_ms: u64| base.checked_add(Duration::from_millis(offset_ms)).unwrap_or(now);
        let remote = self.remote.lock().clone();
        let mut span = novacron_trace::Finished::new(name, wall(0), now);
        for (i, s) in self.steps.lock().iter().enumerate() {
            let (Some(d), false) = (s.duration_ms, remote.contains(&i)) else {
                continue;
            };
            let mut step = novacron_trace::Finished::new(s.step.as_str(), wall(s.start_ms), wall(s.start_ms + d));
            if let Some(detail) = &s.detail {
                step = step.attribute("detail", detail.clone());
            }
            span.children.push(step);
        }
        span
    }

    /// The steps in the order they began.
    pub(super) fn steps(&self) -> Vec<MigrationStep> {
        let mut steps = self.steps.lock().clone();
        steps.sort_by_key(|s| s.start_ms);
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_become_spans_within_the_run_and_remote_ones_are_left_out() {
        let t = Timeline::new(Instant::now());
        let quick = t.begin(MigrationStepKind::SessionOpen);
        t.end(quick, None);
        let slow = t.begin(MigrationStepKind::MemoryPasses);
        std::thread::sleep(Duration::from_millis(20));
        t.end(slow, Some("2 passes".into()));
        t.add_remote(
            Instant::now(),
            &[MigrationStep {
                step: MigrationStepKind::QemuStart,
                start_ms: 0,
                duration_ms: Some(5),
                detail: None,
            }],
        );
        let unfinished = t.begin(MigrationStepKind::Switchover);
        let span = t.as_span("migration.source");
        drop(unfinished);
        let names: Vec<&str> = span.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["session_open", "memory_passes"]);
        for c in &span.children {
            assert!(
                span.start <= c.start && c.start <= c.end && c.end <= span.end,
                "{c:?} outside {span:?}"
            );
        }
        assert_eq!(
            span.children[1].attributes,
            [("detail".to_string(), "2 passes".to_string())]
        );
    }
}
