//! Where a real step's GPU time goes, per kernel (`PUNICA_PROFILE_OPS=1`): an event is recorded
//! on the main stream after every launch there, and once the step's tokens are back the time
//! between consecutive events is charged to the kernel that ended the interval. Every
//! [`OpProfile::WINDOW`] steps the totals are logged at info level, largest first.
//!
//! The events sit between kernels, so programmatic dependent launch cannot overlap them: the
//! profiled step is slower than a real one, and each interval also holds the launch gap and,
//! for a kernel after a side-stream join, the wait for the side stream. Side-stream kernels are
//! not timed on their own; their cost shows in the joins.

use std::collections::HashMap;

use cudarc::driver::{result as drv, sys as drv_sys};

use crate::engine::backend::{BackendError, Result};

/// Recorded events of the current step and the totals of the window.
pub struct OpProfile {
    pool: Vec<drv_sys::CUevent>,
    /// Marks of this step, in stream order: index into `pool`, and the kernel it ends.
    marks: Vec<String>,
    totals: HashMap<String, (f64, u64)>,
    steps: u32,
}

// SAFETY: the events are only used under the backend's profile mutex.
unsafe impl Send for OpProfile {}

impl OpProfile {
    const WINDOW: u32 = 32;

    pub fn new() -> Self {
        OpProfile {
            pool: Vec::new(),
            marks: Vec::new(),
            totals: HashMap::new(),
            steps: 0,
        }
    }

    /// Record an event on `stream` after the kernel `name`.
    pub fn mark(&mut self, stream: drv_sys::CUstream, name: &str) -> Result<()> {
        let i = self.marks.len();
        if i == self.pool.len() {
            let e = drv::event::create(drv_sys::CUevent_flags::CU_EVENT_DEFAULT)
                .map_err(|e| BackendError::Device(format!("create event: {e:?}")))?;
            self.pool.push(e);
        }
        // SAFETY: the event was created above and lives as long as the profile.
        unsafe { drv::event::record(self.pool[i], stream) }
            .map_err(|e| BackendError::Device(format!("record event: {e:?}")))?;
        self.marks.push(name.to_string());
        Ok(())
    }

    /// The step's work is complete (the caller synchronised): charge the intervals.
    pub fn finish_step(&mut self) -> Result<()> {
        for i in 1..self.marks.len() {
            // SAFETY: both events were recorded this step and have completed.
            let ms = unsafe { drv::event::elapsed(self.pool[i - 1], self.pool[i]) }
                .map_err(|e| BackendError::Device(format!("event time: {e:?}")))?;
            let t = self.totals.entry(self.marks[i].clone()).or_default();
            t.0 += f64::from(ms);
            t.1 += 1;
        }
        self.marks.clear();
        self.steps += 1;
        if self.steps == Self::WINDOW {
            let n = f64::from(self.steps);
            let mut rows: Vec<_> = self.totals.drain().collect();
            rows.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
            let total: f64 = rows.iter().map(|r| r.1.0).sum();
            let mut table = format!("profiled step {:.3} ms:", total / n);
            for (name, (ms, count)) in rows.iter().take(24) {
                table.push_str(&format!(
                    "\n  {:>7.3} ms/step {:>5} launches/step {:>7.2} us each  {name}",
                    ms / n,
                    *count as f64 / n,
                    ms * 1e3 / *count as f64
                ));
            }
            tracing::info!("{table}");
            self.steps = 0;
        }
        Ok(())
    }
}

impl Drop for OpProfile {
    fn drop(&mut self) {
        for &e in &self.pool {
            // SAFETY: created in `mark`, destroyed once here.
            let _ = unsafe { drv::event::destroy(e) };
        }
    }
}
