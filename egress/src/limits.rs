//! What keeps one hostile guest from spending the host's descriptors, memory and CPU
//! through its proxy: a cap on open connections, backoff when the host is short of
//! something, logs that cannot flood, and the process's open-file limit.

use std::time::{Duration, Instant};

/// Most connections one sandbox's proxy holds open at once, from accept to close (each
/// costs the host two descriptors and up to [`crate::sniff::MAX_SNIFF_BYTES`] plus two
/// copy buffers of memory). Far above what a program's own use needs (a browser opens
/// tens), far below what would starve the daemon: a guest is root in its VM and can
/// open connections as fast as it likes, and every sandbox on the host shares one
/// process's descriptors. Connections over the cap are reset at once.
pub const MAX_CONNECTIONS: usize = 256;

/// The first wait after a failed accept or receive.
const BACKOFF_FIRST: Duration = Duration::from_millis(1);
/// The longest wait: short enough that a recovered host serves again within a second.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Waits that double after each failure (from 1 ms to 1 s) and start over after a
/// success: an `accept` that fails with `EMFILE` leaves the connection in the backlog,
/// so retrying at once would spin a core until a descriptor is free.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self {
            next: BACKOFF_FIRST,
        }
    }

    /// The wait after one more failure.
    pub(crate) fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }

    /// After a success the next failure waits the shortest time again.
    pub(crate) fn succeeded(&mut self) {
        self.next = BACKOFF_FIRST;
    }
}

/// Lets an event be logged at most once per [`Throttle::EVERY`], counting the ones in
/// between: a guest can cause an event per packet, and a log line each would fill the
/// host's disk.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    last: Option<Instant>,
    since: u64,
}

impl Throttle {
    /// The shortest time between two log lines.
    pub(crate) const EVERY: Duration = Duration::from_secs(1);

    /// Records one event at `now`; `Some(n)` when it should be logged, `n` being the
    /// events since the last line (this one included).
    pub(crate) fn hit(&mut self, now: Instant) -> Option<u64> {
        self.since += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its hard limit,
/// and returns the new `(soft, hard)`. The daemon holds descriptors for every VM and
/// every proxied connection of every sandbox; the usual soft limit (1024) is a few
/// sandboxes' worth. An unlimited hard limit counts as the kernel's `fs.nr_open`, the
/// most a process may have.
// `rlim_t` is u64 here, not on every target.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut want = limit.rlim_max;
    if want == libc::RLIM_INFINITY {
        want = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if limit.rlim_cur < want {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: a valid rlimit; raising the soft limit up to the hard one needs no
        // privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok((limit.rlim_cur as u64, limit.rlim_max as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_second_and_starts_over_after_a_success() {
        let mut b = Backoff::new();
        let waits: Vec<_> = (0..12).map(|_| b.failed().as_millis()).collect();
        assert_eq!(
            waits,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1000],
            "{waits:?}"
        );
        b.succeeded();
        assert_eq!(b.failed(), BACKOFF_FIRST);
    }

    #[test]
    fn the_throttle_logs_once_a_second_and_counts_the_rest() {
        let mut t = Throttle::default();
        let start = Instant::now();
        assert_eq!(t.hit(start), Some(1));
        for ms in 1..1000 {
            assert_eq!(t.hit(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(t.hit(start + Duration::from_millis(1000)), Some(1000));
        assert_eq!(t.hit(start + Duration::from_millis(1001)), None);
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let (soft, hard) = raise_nofile_limit().unwrap();
        assert!(soft == hard || hard == u64::MAX, "{soft} {hard}");
        // Again: nothing left to raise, the same answer.
        assert_eq!(raise_nofile_limit().unwrap(), (soft, hard));
    }
}
