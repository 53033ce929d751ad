//! The signals that ask a stage to stop (gitlab-runner's SIGTERM to the stage's process group,
//! or a ^C by hand), blocked so that a stage can finish what it started before it exits.

use nix::sys::signal::{SigSet, Signal};

/// SIGTERM, SIGINT and SIGHUP.
pub fn stop_set() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(signal);
    }
    set
}

/// Blocks the stop signals in this (single-threaded) process until dropped; a stop request
/// then stays pending, for `stop_requested` to see.
pub struct Deferred {
    set: SigSet,
}

impl Deferred {
    pub fn block() -> Deferred {
        let set = stop_set();
        // Blocking a valid set on the calling thread cannot fail.
        let _ = set.thread_block();
        Deferred { set }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        // A stop request was honoured by whoever checked `stop_requested`; consume it, so that
        // unblocking does not kill the process before it reports how the stage ended.
        while stop_requested() {
            if self.set.wait().is_err() {
                break;
            }
        }
        let _ = self.set.thread_unblock();
    }
}

/// True when a stop signal is pending (it was blocked when it came).
pub fn stop_requested() -> bool {
    // SAFETY: sigpending fills a sigset_t we own; sigismember only reads it.
    unsafe {
        let mut pending = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        if libc::sigpending(pending.as_mut_ptr()) != 0 {
            return false;
        }
        let pending = pending.assume_init();
        [libc::SIGTERM, libc::SIGINT, libc::SIGHUP].iter().any(|&s| libc::sigismember(&pending, s) == 1)
    }
}

/// Makes `command`'s process get SIGTERM when this process dies, however it dies: work done
/// for a transaction (nspawn, mmdebstrap, cp, tar) must stop with it, because gc may delete
/// the transaction's tree as soon as its lock is free. SIGTERM, not SIGKILL: nspawn answers
/// it by killing the command it runs in the tree, while a SIGKILLed nspawn leaves it running.
pub fn terminate_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl with integer arguments is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_stop_signal_is_seen_as_pending() {
        let guard = Deferred::block();
        assert!(!stop_requested());
        nix::sys::signal::raise(Signal::SIGHUP).unwrap();
        assert!(stop_requested());
        // Dropping the guard consumes it rather than letting it kill the test process.
        drop(guard);
        assert!(!stop_requested());
    }
}
