//! PID 1 duties.
//!
//! The initramfs hands over to `nullspace-agent` as the root filesystem's init. PID 1
//! must reap every orphan and must never exit (the kernel panics), while the agent itself
//! should be restartable. So PID 1 forks: the child becomes the agent, the parent stays a
//! minimal reaper that restarts the agent if it ever dies.

use std::time::Duration;

/// Forks the agent and turns this process into the reaper. Returns only in the child.
pub fn run_as_init() {
    loop {
        // SAFETY: called before any thread exists, so fork duplicates a single thread.
        let child = unsafe { libc::fork() };
        if child == 0 {
            return;
        }
        if child < 0 {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        reap_until(child);
        eprintln!("nullspace-agent: agent exited; restarting it");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reaps children until `agent` itself has exited.
fn reap_until(agent: libc::pid_t) {
    loop {
        let mut status = 0;
        // SAFETY: plain waitpid on any child with a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == agent {
            return;
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            return;
        }
    }
}
