//! Which companies an instance serves: the ids from `company_ids` and `company_ids_file`, their
//! form, and the shard (`shard = "i/n"`) that takes its part of them.

/// One of `count` instances splitting a list of companies without editing it: instance
/// `index` serves the companies whose id hashes (FNV-1a, 64 bits) to `index` modulo `count`.
/// Every instance computes the same split from the same list, and a company stays on its
/// shard whatever else is added to or removed from the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// The whole list: one instance.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// `"i/n"`, with `0 <= i < n <= 4096`.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let (i, n) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not i/n (for example 0/3)"))?;
        let (index, count) = match (i.trim().parse::<u32>(), n.trim().parse::<u32>()) {
            (Ok(i), Ok(n)) => (i, n),
            _ => return Err(format!("{s:?} is not i/n with whole numbers")),
        };
        if count == 0 || count > 4096 {
            return Err(format!("{s:?}: n must be between 1 and 4096"));
        }
        if index >= count {
            return Err(format!(
                "{s:?}: i counts from 0, so it must be below {count}"
            ));
        }
        Ok(Shard { index, count })
    }

    /// The shard that serves `company`.
    pub fn of(company: &str, count: u32) -> u32 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in company.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        (h % u64::from(count.max(1))) as u32
    }

    pub fn serves(&self, company: &str) -> bool {
        Shard::of(company, self.count) == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Whether the database at `db` exists and has rows in `companies` (so a configuration
/// without `company_ids` still serves someone).
pub(crate) fn database_has_companies(db: &std::path::Path) -> bool {
    if !db.exists() {
        return false;
    }
    crate::store::Store::open_read_only(db)
        .ok()
        .and_then(|s| {
            s.conn()
                .query_row("SELECT EXISTS (SELECT 1 FROM companies)", [], |r| {
                    r.get::<_, bool>(0)
                })
                .ok()
        })
        .unwrap_or(false)
}

/// The form of a company id: a UUID, as Pleo's files type `company_id` (`format: uuid`); Pleo
/// answers 400 to a listing for anything else.
pub(crate) fn is_company_id(c: &str) -> bool {
    crate::wire::is_uuid(c)
}

/// The companies of a `company_ids_file`, each with its line number: one id a line (blank
/// lines and `#` comments ignored), or TOML with `company_ids = [...]` (a file with a `=`
/// outside a comment is read as TOML).
pub(crate) fn read_company_ids_file(path: &str) -> Result<Vec<(usize, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let toml = text
        .lines()
        .any(|l| l.split('#').next().unwrap_or("").contains('='));
    if toml {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| format!("{path} is not valid TOML: {}", e.message()))?;
        if let Some(k) = table.keys().find(|k| *k != "company_ids") {
            return Err(format!("{path}: unknown key {k:?} (only company_ids)"));
        }
        let list = table
            .get("company_ids")
            .and_then(toml::Value::as_array)
            .ok_or_else(|| format!("{path}: company_ids must be a list of strings"))?;
        return list
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(|s| (i + 1, s.trim().to_owned()))
                    .ok_or_else(|| format!("{path}: company_ids[{i}] is not a string"))
            })
            .collect();
    }
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim().to_owned()))
        .filter(|(_, id)| !id.is_empty())
        .collect())
}
