//! `jobmirror run`: the service under systemd. It starts the workers ([`crate::service`]),
//! tells systemd it is ready and how it is doing (`READY=1`, `STATUS=`, `WATCHDOG=1` while
//! every worker makes progress), and waits on signals: SIGTERM or SIGINT stop it within the
//! configured bound, SIGUSR1 runs detection now, SIGHUP reloads the configuration (checked
//! first: a broken one is refused, said in `STATUS=` and a metric, and the service goes on).

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::bounded;

use crate::clock::{SharedClock, monotonic};
use crate::config::Config;
use crate::service::Service;
use crate::store::Store;

/// A one-line status for systemd (`systemctl status` shows it).
fn status_line(store: &Store, companies: usize) -> String {
    let held = store.in_flight().map(|v| v.len()).unwrap_or(0);
    let queued: i64 = store
        .state_counts()
        .unwrap_or_default()
        .into_iter()
        .filter(|(s, _)| s == "new")
        .map(|(_, n)| n)
        .sum();
    format!("{companies} companies; {held} jobs in hand, {queued} waiting")
}

/// What ended `run`'s wait for signals.
enum Stop {
    Terminate,
    Reload,
}

/// `jobmirror run`: the service until SIGTERM or SIGINT; SIGUSR1 runs detection now; SIGHUP
/// reloads the configuration (checked first; a broken one is refused and the service goes on).
pub fn run(
    cfg: Config,
    config_file: Option<&std::path::Path>,
    clock: SharedClock,
) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])?;
    let notifier = crate::service::notify::Notifier::from_env().map(Arc::new);
    let mut service = Service::start(&cfg, clock, None)?;
    let status_store = crate::service::shared::open(&cfg, crate::service::shared::Open::ReadOnly)?;
    // Only these are needed from here on; the rest (every company id and key) is let go, so a
    // configuration of 50,000 companies is not held twice while the service runs.
    let shutdown_timeout = cfg.shutdown_timeout;
    drop(cfg);
    // The company count changes with a reload or `jobmirror companies`.
    let companies = service.metrics.clone();
    // A refused reload stays in the STATUS line (and `jobmirror_config_reload_refused`) until
    // a reload is taken, which restarts the process in place.
    let refused_reload: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let status = {
        let (refused, companies) = (refused_reload.clone(), companies.clone());
        move |store: &Store| {
            let n = companies
                .companies_served
                .load(std::sync::atomic::Ordering::Relaxed) as usize;
            let line = status_line(store, n);
            match refused.lock().unwrap_or_else(|p| p.into_inner()).as_deref() {
                Some(e) => format!("reload refused ({e}); {line}"),
                None => line,
            }
        }
    };
    if let Some(n) = &notifier {
        n.send(&format!("READY=1\nSTATUS={}", status(&status_store)));
    }
    // The watchdog thread: pings only while every worker thread makes progress.
    let (wd_stop_tx, wd_stop_rx) = bounded::<()>(0);
    let watchdog = {
        let (notifier, progress) = (notifier.clone(), service.progress.clone());
        let status = status.clone();
        let every = crate::service::notify::watchdog_interval();
        std::thread::Builder::new()
            .name("jm-watchdog".into())
            .spawn(move || {
                let tick = every
                    .unwrap_or(Duration::from_secs(30))
                    .min(Duration::from_secs(30));
                let mut was_stale = false;
                loop {
                    match wd_stop_rx.recv_timeout(tick) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    let stale = progress.stale(monotonic());
                    let Some(n) = &notifier else { continue };
                    if stale.is_empty() {
                        if every.is_some() {
                            n.send("WATCHDOG=1");
                        }
                        n.send(&format!("STATUS={}", status(&status_store)));
                        was_stale = false;
                    } else if !was_stale {
                        log::error!(
                            "threads not making progress: {}; withholding the watchdog ping",
                            stale.join(", ")
                        );
                        n.send(&format!("STATUS=stalled: {}", stale.join(", ")));
                        was_stale = true;
                    }
                }
            })?
    };
    let mut stop = Stop::Terminate;
    for sig in signals.forever() {
        match sig {
            SIGUSR1 => {
                log::info!("SIGUSR1: running detection now");
                service.trigger();
            }
            SIGHUP => match Config::load(config_file)
                .map(|new| (service.apply_companies(&new), new))
            {
                Ok((Ok(Some(changed)), _)) => {
                    log::info!(
                        "SIGHUP: the configuration changes the companies alone; applied in place ({} added, {} removed; jobs in hand go on)",
                        changed.added.len(),
                        changed.removed.len()
                    );
                    service
                        .metrics
                        .reload_refused
                        .store(0, std::sync::atomic::Ordering::Relaxed);
                    // The watchdog thread's next STATUS= line shows the new count.
                    *refused_reload.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                Ok((Err(e), _)) => {
                    log::error!(
                        "SIGHUP: applying the new companies failed ({e}); restarting in place to apply them"
                    );
                    stop = Stop::Reload;
                    break;
                }
                Ok((Ok(None), _)) => {
                    log::info!(
                        "SIGHUP: the configuration is valid; restarting in place to apply it"
                    );
                    stop = Stop::Reload;
                    break;
                }
                Err(e) => {
                    log::error!(
                        "SIGHUP: the new configuration is refused, going on with the old one: {e}"
                    );
                    service
                        .metrics
                        .reload_refused
                        .store(1, std::sync::atomic::Ordering::Relaxed);
                    *refused_reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    if let Some(n) = &notifier {
                        n.send(&format!("STATUS=reload refused: {e}"));
                    }
                }
            },
            _ => {
                log::info!("signal {sig}: stopping");
                break;
            }
        }
    }
    drop(wd_stop_tx);
    let _ = watchdog.join();
    if let Some(n) = &notifier {
        n.send(match stop {
            Stop::Reload => "RELOADING=1",
            Stop::Terminate => "STOPPING=1",
        });
    }
    // A restart in place keeps the listening sockets: clients wait in the backlog meanwhile.
    let listeners = match stop {
        Stop::Reload => service.take_listeners(),
        Stop::Terminate => Vec::new(),
    };
    let clean = service.stop(shutdown_timeout);
    if !clean {
        anyhow::bail!(
            "some threads did not stop within {} s",
            shutdown_timeout.as_secs()
        );
    }
    log::info!("stopped cleanly");
    if let Stop::Reload = stop {
        super::sockets::pass_on(listeners);
        reexec()?;
    }
    Ok(())
}

/// Replaces this process with a fresh start of the same command line (same pid, so systemd
/// keeps tracking it), which reads the configuration again.
fn reexec() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe()?;
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .exec();
        anyhow::bail!("cannot restart in place: {err}")
    }
    #[cfg(not(unix))]
    anyhow::bail!("reload needs Unix; restart the service instead")
}
