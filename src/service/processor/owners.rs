//! Who holds each company's work inside this process: one lane at a time.
//!
//! Invariant: a lane looks at a company's jobs (picks, claims, runs the handler, tends the job
//! in hand) only while it holds the company here; it takes the company only when no other
//! lane holds it, and lets it go only when the company has no job in hand. So a company whose
//! lane changes (a reload, `companies pause` then `resume`, `remove` then `add`) is never
//! served by two lanes at once: the new lane waits until the old one has finished or handed
//! back the job. The record is structural, not a consequence of how lanes are assigned.

use std::collections::HashMap;
use std::sync::Mutex;

/// Companies and the lane that holds each (only companies with work in hand, or being looked
/// at, are here).
#[derive(Debug, Default)]
pub struct Owners {
    held: Mutex<HashMap<String, usize>>,
}

impl Owners {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `company` for `lane`: true when it was free or already the lane's.
    pub fn take(&self, company: &str, lane: usize) -> bool {
        let mut m = self.map();
        match m.get(company) {
            Some(l) => *l == lane,
            None => {
                m.insert(company.to_owned(), lane);
                true
            }
        }
    }

    /// `lane` lets `company` go (nothing happens if another lane holds it).
    pub fn release(&self, company: &str, lane: usize) {
        let mut m = self.map();
        if m.get(company) == Some(&lane) {
            m.remove(company);
        }
    }

    /// The lane holding `company`, if any.
    pub fn holder(&self, company: &str) -> Option<usize> {
        self.map().get(company).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_company_held_by_one_lane_is_refused_to_another_until_released() {
        let o = Owners::default();
        assert!(o.take("x", 1));
        assert!(o.take("x", 1), "the holder takes it again");
        assert!(!o.take("x", 0), "another lane is refused");
        o.release("x", 0);
        assert_eq!(o.holder("x"), Some(1), "only the holder releases");
        o.release("x", 1);
        assert!(o.take("x", 0));
        assert_eq!(o.holder("x"), Some(0));
    }
}
