//! Time, injected. The only calls of `SystemTime::now` in the crate live here, so every
//! deadline, expiry and backoff decision can be driven by a [`ManualClock`] in tests and replays.

use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `d` in whole milliseconds, saturating at `i64::MAX`.
pub fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// A point in time as integer Unix milliseconds (UTC). This is how every time is stored in SQLite.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub i64);

impl Millis {
    pub fn from_secs(secs: i64) -> Millis {
        Millis(secs.saturating_mul(1000))
    }
    pub fn plus(self, d: Duration) -> Millis {
        Millis(self.0.saturating_add(ms(d)))
    }
    pub fn plus_secs(self, secs: i64) -> Millis {
        Millis(self.0.saturating_add(secs.saturating_mul(1000)))
    }
    /// Milliseconds from `self` until `later` (negative when `later` is in the past).
    pub fn until(self, later: Millis) -> i64 {
        later.0.saturating_sub(self.0)
    }
    /// RFC 3339 UTC with millisecond precision, as Pleo writes times.
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(t) => t
                .format(&time::macros::format_description!(
                    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
                ))
                .unwrap_or_else(|_| self.0.to_string()),
            Err(_) => self.0.to_string(),
        }
    }
    /// The HTTP date form (`Tue, 24 Nov 2026 09:00:00 GMT`, RFC 9110's IMF-fixdate).
    pub fn to_http_date(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| {
                t.format(&time::macros::format_description!(
                    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
                ))
                .ok()
            })
            .unwrap_or_default()
    }

    /// Parses an HTTP date (IMF-fixdate) into Unix milliseconds.
    pub fn parse_http_date(v: &str) -> Option<Millis> {
        let t = time::PrimitiveDateTime::parse(
            v.trim(),
            &time::macros::format_description!(
                "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
            ),
        )
        .ok()?
        .assume_utc();
        i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
            .ok()
            .map(Millis)
    }

    /// Parses an RFC 3339 time (any offset, optional fraction) into Unix milliseconds.
    pub fn parse_rfc3339(s: &str) -> Option<Millis> {
        Self::parse_rfc3339_fine(s).map(|(m, _)| m)
    }

    /// As [`Millis::parse_rfc3339`], with the nanoseconds past the millisecond (0..1,000,000)
    /// that the fraction carried: orders times that share a millisecond.
    pub fn parse_rfc3339_fine(s: &str) -> Option<(Millis, i64)> {
        let t =
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        let nanos = t.unix_timestamp_nanos();
        let ms = i64::try_from(nanos.div_euclid(1_000_000)).ok()?;
        Some((Millis(ms), nanos.rem_euclid(1_000_000) as i64))
    }
}

impl fmt::Debug for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_rfc3339())
    }
}

impl serde::Serialize for Millis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// The source of "now" and of waiting. Implementations must be cheap to call.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> Millis;
    /// Waits for `d`. A manual clock advances itself instead of blocking, so retry backoff
    /// in tests and replays costs no wall time and is recorded.
    fn sleep(&self, d: Duration);
}

pub type SharedClock = Arc<dyn Clock>;

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Millis(d.as_millis() as i64)
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// A clock that moves only when told to. `sleep` advances it and records the duration.
#[derive(Debug)]
pub struct ManualClock {
    inner: Mutex<ManualInner>,
}

#[derive(Debug)]
struct ManualInner {
    now: Millis,
    sleeps: Vec<Duration>,
}

impl ManualClock {
    pub fn new(start: Millis) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            inner: Mutex::new(ManualInner {
                now: start,
                sleeps: Vec::new(),
            }),
        })
    }
    pub fn set(&self, t: Millis) {
        self.lock().now = t;
    }
    pub fn advance(&self, d: Duration) {
        let mut g = self.lock();
        g.now = g.now.plus(d);
    }
    /// Every duration passed to `sleep` so far, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.lock().sleeps.clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, ManualInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.lock().now
    }
    fn sleep(&self, d: Duration) {
        let mut g = self.lock();
        g.now = g.now.plus(d);
        g.sleeps.push(d);
    }
}

/// Another clock plus an offset that can jump: the host clock of a replay stepping forwards
/// or backwards while Pleo's does not. Sleeping sleeps the inner clock.
#[derive(Debug)]
pub struct OffsetClock {
    inner: SharedClock,
    offset_ms: std::sync::atomic::AtomicI64,
}

impl OffsetClock {
    pub fn new(inner: SharedClock) -> Arc<OffsetClock> {
        Arc::new(OffsetClock {
            inner,
            offset_ms: std::sync::atomic::AtomicI64::new(0),
        })
    }
    /// Moves this clock by `ms` (negative: backwards) relative to the inner one.
    pub fn jump(&self, ms: i64) {
        self.offset_ms
            .fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Millis {
        Millis(self.inner.now().0.saturating_add(self.offset_ms()))
    }
    fn sleep(&self, d: Duration) {
        self.inner.sleep(d);
    }
}

/// Monotonic time for socket deadlines and measuring elapsed wall time. Never used for
/// business decisions (those take a [`Clock`]).
pub fn monotonic() -> std::time::Instant {
    std::time::Instant::now()
}

/// Whole seconds on the monotonic clock since the process first asked.
pub fn monotonic_secs() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip_keeps_millis() {
        let t = Millis::parse_rfc3339("2026-11-24T10:15:30.123456Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-24T10:15:30.123Z");
        let off = Millis::parse_rfc3339("2026-11-24T11:15:30+01:00").unwrap();
        assert_eq!(off, Millis::parse_rfc3339("2026-11-24T10:15:30Z").unwrap());
        assert!(Millis::parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn manual_clock_sleep_advances_and_records() {
        let c = ManualClock::new(Millis(1_000));
        c.sleep(Duration::from_millis(250));
        c.advance(Duration::from_secs(1));
        assert_eq!(c.now(), Millis(2_250));
        assert_eq!(c.sleeps(), vec![Duration::from_millis(250)]);
    }

    #[test]
    fn offset_clock_jumps_both_ways_and_sleeps_the_inner_clock() {
        let base = ManualClock::new(Millis(10_000));
        let skewed = OffsetClock::new(base.clone());
        skewed.jump(5_000);
        assert_eq!(skewed.now(), Millis(15_000));
        skewed.jump(-8_000);
        assert_eq!(skewed.now(), Millis(7_000));
        skewed.sleep(Duration::from_secs(1));
        assert_eq!(base.now(), Millis(11_000));
        assert_eq!(skewed.now(), Millis(8_000));
    }
}
