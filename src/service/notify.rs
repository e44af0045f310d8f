//! systemd's notify protocol (`sd_notify`): `READY=1`, `STATUS=...`, `WATCHDOG=1`,
//! `RELOADING=1`, `STOPPING=1`, sent as datagrams to `$NOTIFY_SOCKET`.
//!
//! Invariants: without `$NOTIFY_SOCKET` every call is a no-op; a failed send is logged once
//! and never stops the service; `WATCHDOG=1` is only ever sent by the caller after checking
//! progress (see `service::systemd::run`).

use std::time::Duration;

#[derive(Debug)]
pub struct Notifier {
    #[cfg(unix)]
    socket: std::os::unix::net::UnixDatagram,
    #[cfg(unix)]
    addr: std::os::unix::net::SocketAddr,
    warned: std::sync::atomic::AtomicBool,
}

impl Notifier {
    /// The notifier systemd asked for, if any.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        Notifier::connect(&path.to_string_lossy())
            .map_err(|e| log::warn!("NOTIFY_SOCKET {path:?} is unusable: {e}"))
            .ok()
    }

    #[cfg(unix)]
    fn connect(path: &str) -> std::io::Result<Notifier> {
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let addr = if let Some(name) = path.strip_prefix('@') {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = name;
                return Err(std::io::Error::other("abstract sockets need Linux"));
            }
        } else {
            SocketAddr::from_pathname(path)?
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            addr,
            warned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    #[cfg(not(unix))]
    fn connect(_path: &str) -> std::io::Result<Notifier> {
        Err(std::io::Error::other(
            "the notify protocol needs Unix sockets",
        ))
    }

    /// Sends newline-separated `KEY=value` assignments.
    pub fn send(&self, state: &str) {
        #[cfg(unix)]
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr)
            && !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            log::warn!("cannot notify systemd: {e}");
        }
    }
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, if it is meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
