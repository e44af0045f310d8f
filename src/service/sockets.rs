//! Listening sockets that outlive a restart in place: a SIGHUP that restarts the process
//! (`exec` of the same command line) hands its bound listeners to the new process, so a client
//! connecting meanwhile waits in the socket's backlog instead of being refused.
//!
//! Invariants: every listener the service binds is kept (a duplicate) for as long as the
//! [`Service`] lives; only a restart in place passes them on (their descriptors inherited,
//! named in `JOBMIRROR_LISTEN_FDS` as `addr=fd` pairs); the new process takes the one whose
//! configured address is unchanged and closes the others, and no handler ever inherits one
//! (close-on-exec is set again at once, and the variable is removed before any child starts).

use std::net::TcpListener;

use super::Service;

const VAR: &str = "JOBMIRROR_LISTEN_FDS";

/// The listener for `addr`: the one a restart in place handed over when its address is
/// unchanged, else a new bind. A duplicate is kept in `kept` for the next restart.
pub(super) fn bind(
    what: &str,
    addr: &str,
    kept: &mut Vec<(String, TcpListener)>,
) -> anyhow::Result<TcpListener> {
    let listener = match inherited(addr) {
        Some(l) => l,
        None => TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("cannot listen for {what} on {addr}: {e}"))?,
    };
    kept.push((addr.to_owned(), listener.try_clone()?));
    Ok(listener)
}

/// Takes the listener handed over for `addr`, if any (each at most once).
fn inherited(addr: &str) -> Option<TcpListener> {
    let mut all = handed_over().lock().unwrap_or_else(|p| p.into_inner());
    let i = all.iter().position(|(a, _)| a == addr)?;
    Some(all.swap_remove(i).1)
}

/// What the previous process handed over (read once; the variable is removed then).
fn handed_over() -> &'static std::sync::Mutex<Vec<(String, TcpListener)>> {
    static HANDED: std::sync::OnceLock<std::sync::Mutex<Vec<(String, TcpListener)>>> =
        std::sync::OnceLock::new();
    HANDED.get_or_init(|| {
        let mut out = Vec::new();
        #[cfg(unix)]
        if let Some(v) = std::env::var_os(VAR) {
            use std::os::fd::FromRawFd;
            // SAFETY: the service starts its threads after its listeners are bound, and no
            // other code reads or writes this variable.
            unsafe { std::env::remove_var(VAR) };
            for pair in v.to_string_lossy().split(';') {
                let Some((addr, fd)) = pair.rsplit_once('=') else {
                    continue;
                };
                let Ok(fd) = fd.parse::<i32>() else { continue };
                // Only a descriptor that is a listening TCP socket is taken.
                if !is_listening_socket(fd) {
                    continue;
                }
                // SAFETY: `fd` was handed over by our own previous process for this purpose and
                // is owned by nothing else in this one.
                let l = unsafe { TcpListener::from_raw_fd(fd) };
                set_cloexec(fd, true);
                out.push((addr.to_owned(), l));
            }
        }
        std::sync::Mutex::new(out)
    })
}

/// Closes whatever was handed over and not taken (an address that changed).
pub(super) fn close_unused() {
    handed_over()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
}

#[cfg(unix)]
fn is_listening_socket(fd: i32) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, which we own.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && v == 1
}

#[cfg(unix)]
fn set_cloexec(fd: i32, on: bool) {
    // SAFETY: fcntl on a descriptor we hold, with valid commands.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            let flags = if on {
                flags | libc::FD_CLOEXEC
            } else {
                flags & !libc::FD_CLOEXEC
            };
            libc::fcntl(fd, libc::F_SETFD, flags);
        }
    }
}

impl Service {
    /// The listeners, for a restart in place ([`pass_on`]); the service keeps serving on its
    /// own copies until it stops.
    pub fn take_listeners(&mut self) -> Vec<(String, TcpListener)> {
        std::mem::take(&mut self.listeners)
    }
}

/// Makes `listeners` survive the coming `exec` and names them for the new process.
pub fn pass_on(listeners: Vec<(String, TcpListener)>) {
    #[cfg(unix)]
    {
        use std::os::fd::IntoRawFd;
        let pairs: Vec<String> = listeners
            .into_iter()
            .map(|(addr, l)| {
                let fd = l.into_raw_fd();
                set_cloexec(fd, false);
                format!("{addr}={fd}")
            })
            .collect();
        if !pairs.is_empty() {
            // SAFETY: called on the main thread after every worker thread stopped, just
            // before `exec`.
            unsafe { std::env::set_var(VAR, pairs.join(";")) };
        }
    }
}
