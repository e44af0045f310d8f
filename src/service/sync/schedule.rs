//! The poll schedule: when each company is next due for a listing pass, spread over the
//! interval so that many companies never poll at once.

/// When each company is next due for a listing pass. Each company gets its own offset within
/// the interval (from a hash of its id), and each pass lands within 5% of one interval after
/// the previous, so a thousand companies poll evenly spread instead of all at once. Times are
/// milliseconds on any monotonic scale the caller uses.
#[derive(Clone, Debug)]
pub struct PollSchedule {
    interval_ms: i64,
    due: std::collections::BTreeMap<String, (i64, u64)>,
}

fn mix(company: &str, n: u64) -> u64 {
    // FNV-1a then a splitmix finaliser: a stable, well-spread number per (company, pass).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in company.bytes().chain(n.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

impl PollSchedule {
    /// First polls spread over `[start, start + interval)`.
    pub fn new(companies: &[String], interval: std::time::Duration, start_ms: i64) -> Self {
        let interval_ms = (interval.as_millis() as i64).max(1);
        let due = companies
            .iter()
            .map(|c| {
                let offset = (mix(c, 0) % interval_ms as u64) as i64;
                (c.clone(), (start_ms + offset, 0))
            })
            .collect();
        PollSchedule { interval_ms, due }
    }

    /// Companies due at `now_ms`, in due order.
    pub fn due(&self, now_ms: i64) -> Vec<String> {
        let mut d: Vec<(&i64, &String)> = self
            .due
            .iter()
            .filter(|(_, (t, _))| *t <= now_ms)
            .map(|(c, (t, _))| (t, c))
            .collect();
        d.sort();
        d.into_iter().map(|(_, c)| c.clone()).collect()
    }

    /// The company was polled at `now_ms`: its next pass is one interval (±5%) after its due time.
    pub fn done(&mut self, company: &str, now_ms: i64) {
        let interval = self.interval_ms;
        if let Some((t, n)) = self.due.get_mut(company) {
            *n += 1;
            let span = (interval / 10).max(1) as u64;
            let jitter = (mix(company, *n) % span) as i64 - span as i64 / 2;
            // Never in the past: a late pass (a long outage) does not cause a burst of catch-ups.
            *t = (*t + interval + jitter).max(now_ms + interval / 2);
        }
    }

    /// The companies change (a reload): those gone leave the schedule, new ones get their
    /// offset within one interval from `now_ms`, and the others keep their times.
    pub fn set_keys(&mut self, companies: &[String], now_ms: i64) {
        let keep: std::collections::HashSet<&String> = companies.iter().collect();
        self.due.retain(|c, _| keep.contains(c));
        let interval_ms = self.interval_ms;
        for c in companies {
            self.due.entry(c.clone()).or_insert_with(|| {
                let offset = (mix(c, 0) % interval_ms as u64) as i64;
                (now_ms + offset, 0)
            });
        }
    }

    /// A failed poll of `company` is tried again at `at_ms` (or sooner if it was due sooner).
    pub fn retry_at(&mut self, company: &str, at_ms: i64) {
        if let Some((t, _)) = self.due.get_mut(company) {
            *t = (*t).min(at_ms);
        }
    }

    pub fn contains(&self, company: &str) -> bool {
        self.due.contains_key(company)
    }

    /// The company due first, due or not.
    pub fn earliest(&self) -> Option<String> {
        self.due
            .iter()
            .min_by_key(|(_, (t, _))| *t)
            .map(|(c, _)| c.clone())
    }

    pub fn interval_ms(&self) -> i64 {
        self.interval_ms
    }

    pub fn next_due(&self) -> Option<i64> {
        self.due.values().map(|(t, _)| *t).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_companies_are_spread_over_the_interval_and_stay_spread() {
        let companies: Vec<String> = (0..1000).map(|i| format!("company-{i:04}")).collect();
        let interval = std::time::Duration::from_secs(300);
        let mut s = PollSchedule::new(&companies, interval, 0);
        // Count passes per 10 s bucket over an hour, polling every second.
        let mut buckets = vec![0u32; 360];
        let mut per_company = std::collections::HashMap::new();
        for now in (0..3_600_000).step_by(1000) {
            let due = s.due(now);
            buckets[(now / 10_000) as usize] += due.len() as u32;
            for c in due {
                *per_company.entry(c.clone()).or_insert(0) += 1;
                s.done(&c, now);
            }
        }
        // Even spread: 1000 companies / 300 s = 33 per 10 s.
        let max = *buckets.iter().max().unwrap();
        let min = *buckets.iter().min().unwrap();
        assert!(max <= 66 && min >= 10, "min {min}, max {max} per 10 s");
        assert_eq!(per_company.len(), 1000);
        assert!(
            per_company.values().all(|n| (11..=13).contains(n)),
            "about 12 passes each"
        );
    }
}
