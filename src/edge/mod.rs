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
