//! The edge: where the outside world talks to jobmirror over HTTP. The HTTP server
//! ([`httpd`]: hyper on a small runtime of the server's own, synchronous handlers) and the
//! webhook receiver on it ([`webhook`]: signature checking as a pure function, the receiver,
//! the event thread that commits deliveries).
//!
//! The invariant: nothing arriving here is acknowledged before it is committed; what a client
//! costs (connections, bytes read and held, time, HMACs) is bounded before anything about it is
//! verified; one bad request never delays another. Depends on the store, the wire model and
//! health; nothing below imports it.

pub mod exchange;
pub mod fuzzing;
pub mod httpd;
pub mod webhook;

/// Raises the soft limit on open files to the hard limit (idle sockets cost a descriptor each:
/// the connection caps, not the limit, should decide). Returns the (old, new) soft limits.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur))
}

/// [`raise_fd_limit`], with what happened logged.
pub fn raise_fd_limit_logged() {
    match raise_fd_limit() {
        Ok((old, new)) if new > old => log::info!("open files: soft limit raised {old} -> {new}"),
        Ok(_) => {}
        Err(e) => log::warn!("open files: the soft limit could not be raised: {e}"),
    }
}

/// Lets at most [`LogGate::PER_SECOND`] log lines through each second; the lines held back are
/// counted and said in one line when the next second's first line goes out. A flood of bad
/// requests costs a few log lines a second, never a line each.
#[derive(Debug, Default)]
pub struct LogGate {
    /// (second, lines let through in it, lines held back since the last one let through)
    state: std::sync::Mutex<(u64, u32, u64)>,
}

impl LogGate {
    pub const PER_SECOND: u32 = 5;

    /// Whether a line may go out now, and how many were held back before it.
    pub fn admit(&self) -> Option<u64> {
        let second = crate::clock::monotonic_secs();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 != second {
            s.0 = second;
            s.1 = 0;
        }
        if s.1 >= Self::PER_SECOND {
            s.2 += 1;
            return None;
        }
        s.1 += 1;
        Some(std::mem::take(&mut s.2))
    }

    /// Logs `line` at WARN if the gate admits it.
    pub fn warn(&self, line: impl FnOnce() -> String) {
        if let Some(held) = self.admit() {
            if held > 0 {
                log::warn!("{} (and {held} more like it not logged)", line());
            } else {
                log::warn!("{}", line());
            }
        }
    }
}
