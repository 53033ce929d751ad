//! Our own sd_notify socket: how a detached systemd-nspawn tells us its machine is ready.

use crate::error::{Context, Error, Result};
use nix::sys::socket::{
    bind, recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::time::TimeVal;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// An abstract-namespace datagram socket: nothing to clean up on disk, gone with the process.
pub struct NotifySocket {
    fd: OwnedFd,
    name: String,
}

/// What nspawn reported once its machine was ready.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ready {
    pub leader_pid: Option<i32>,
}

/// How often to look whether nspawn died while we wait.
const POLL: Duration = Duration::from_millis(50);

impl NotifySocket {
    pub fn bind(machine: &str) -> Result<NotifySocket> {
        let name = format!("nspawn-runner/{}/{machine}", std::process::id());
        let fd = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
            .context("creating notify socket")?;
        let addr = UnixAddr::new_abstract(name.as_bytes()).context("notify socket address")?;
        bind(fd.as_raw_fd(), &addr).context("binding notify socket")?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, POLL.as_micros() as i64))
            .context("notify socket timeout")?;
        Ok(NotifySocket { fd, name })
    }

    /// The value for NOTIFY_SOCKET (`@` marks the abstract namespace for sd_notify).
    pub fn env_value(&self) -> String {
        format!("@{}", self.name)
    }

    /// Waits for READY=1 until `timeout`; `gone` is asked between messages and ends the wait
    /// with its error when the notifier died.
    pub fn wait_ready(&self, timeout: Duration, mut gone: impl FnMut() -> Option<Error>) -> Result<Ready> {
        let deadline = Instant::now() + timeout;
        let mut ready = Ready::default();
        let mut buffer = [0u8; 4096];
        loop {
            match recv(self.fd.as_raw_fd(), &mut buffer, MsgFlags::empty()) {
                Ok(len) => {
                    if parse_message(&String::from_utf8_lossy(&buffer[..len]), &mut ready) {
                        return Ok(ready);
                    }
                }
                Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(Error::from(e).context("reading notify socket")),
            }
            if let Some(error) = gone() {
                return Err(error);
            }
            if Instant::now() >= deadline {
                return Err(Error::new(format!("machine not ready after {} s", timeout.as_secs())));
            }
        }
    }
}

/// Folds one sd_notify message into `ready`; true once it says READY=1.
fn parse_message(message: &str, ready: &mut Ready) -> bool {
    let mut is_ready = false;
    for line in message.lines() {
        if line == "READY=1" {
            is_ready = true;
        } else if let Some(pid) = line.strip_prefix("X_NSPAWN_LEADER_PID=") {
            ready.leader_pid = pid.parse().ok();
        }
    }
    is_ready
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_as_nspawn_sends_them() {
        let mut ready = Ready::default();
        assert!(!parse_message("STATUS=Container running.\nX_NSPAWN_LEADER_PID=12044", &mut ready));
        assert_eq!(ready.leader_pid, Some(12044));
        assert!(parse_message("READY=1\n", &mut ready));
        assert_eq!(ready.leader_pid, Some(12044));
        assert!(!parse_message("READY=10\nSTOPPING=1", &mut Ready::default()));
    }

    #[test]
    fn a_real_datagram_is_received_and_a_dead_notifier_ends_the_wait() {
        let socket = NotifySocket::bind("unit-test").unwrap();
        let sender = socket_for_test();
        let addr = UnixAddr::new_abstract(socket.name.as_bytes()).unwrap();
        nix::sys::socket::sendto(sender.as_raw_fd(), b"X_NSPAWN_LEADER_PID=7\nREADY=1", &addr, MsgFlags::empty())
            .unwrap();
        let ready = socket.wait_ready(Duration::from_secs(5), || None).unwrap();
        assert_eq!(ready.leader_pid, Some(7));
        let err = socket.wait_ready(Duration::from_secs(5), || Some(Error::new("nspawn exited"))).unwrap_err();
        assert_eq!(err.to_string(), "nspawn exited");
        let err = socket.wait_ready(Duration::ZERO, || None).unwrap_err();
        assert!(err.to_string().contains("not ready"), "{err}");
    }

    fn socket_for_test() -> OwnedFd {
        socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).unwrap()
    }
}
