//! When each running sandbox last saw traffic, for idle timeouts (`lifecycle.idleTimeout`).
//!
//! Traffic is a data-plane call, preview traffic, or a foreground command, terminal,
//! watch or port tunnel still open: those hold a [`Busy`] guard, and a sandbox with one
//! is never idle. Kept in memory on the host that runs the sandbox (its data plane and
//! previews are routed there); a restarted pool manager starts every clock afresh,
//! which only ever delays an idle timeout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Last traffic per running sandbox.
#[derive(Default)]
pub struct Activity {
    by_sandbox: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    last: Instant,
    busy: u32,
}

impl Entry {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            busy: 0,
        }
    }
}

/// Holds a sandbox busy (not idle) until dropped; the drop counts as traffic.
pub struct Busy {
    activity: Arc<Activity>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut all = self.activity.by_sandbox.lock().unwrap();
        let e = all.entry(self.id.clone()).or_insert_with(Entry::new);
        e.busy = e.busy.saturating_sub(1);
        e.last = Instant::now();
    }
}

impl Activity {
    /// Traffic to `id` now.
    pub fn touch(&self, id: &str) {
        let mut all = self.by_sandbox.lock().unwrap();
        all.entry(id.to_string()).or_insert_with(Entry::new).last = Instant::now();
    }

    /// Holds `id` busy until the guard drops.
    pub fn busy(self: &Arc<Self>, id: &str) -> Busy {
        let mut all = self.by_sandbox.lock().unwrap();
        let e = all.entry(id.to_string()).or_insert_with(Entry::new);
        e.busy += 1;
        e.last = Instant::now();
        Busy {
            activity: self.clone(),
            id: id.to_string(),
        }
    }

    /// How long `id` has been idle: zero while busy; a sandbox never seen starts its
    /// clock now.
    pub fn idle_for(&self, id: &str) -> Duration {
        let mut all = self.by_sandbox.lock().unwrap();
        let e = all.entry(id.to_string()).or_insert_with(Entry::new);
        if e.busy > 0 {
            Duration::ZERO
        } else {
            e.last.elapsed()
        }
    }

    /// `id` stopped running: its next start begins a fresh clock. Guards still held
    /// write a fresh entry when they drop, which a start resets again.
    pub fn reset(&self, id: &str) {
        let mut all = self.by_sandbox.lock().unwrap();
        // Guards still held (a command that outlives a transition) keep counting: a
        // removed entry would let their drop zero a newer guard's count.
        match all.get_mut(id) {
            Some(e) if e.busy > 0 => e.last = Instant::now(),
            _ => {
                all.remove(id);
            }
        }
    }

    /// Drops the entries of sandboxes not in `running`.
    pub fn retain(&self, running: &std::collections::HashSet<String>) {
        self.by_sandbox
            .lock()
            .unwrap()
            .retain(|id, e| e.busy > 0 || running.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_sandbox_is_never_idle_and_its_end_counts_as_traffic() {
        let a = Arc::new(Activity::default());
        assert!(a.idle_for("s") < Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(30));
        let busy = a.busy("s");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(a.idle_for("s"), Duration::ZERO);
        drop(busy);
        assert!(a.idle_for("s") < Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        assert!(a.idle_for("s") >= Duration::from_millis(30));
        a.touch("s");
        assert!(a.idle_for("s") < Duration::from_millis(20));
        a.retain(&Default::default());
        assert!(a.by_sandbox.lock().unwrap().is_empty());
    }
}
