//! One statement interface over both backends: a statement is written once, in the SQL both
//! SQLite and PostgreSQL read, with SQLite's `?N` placeholders; on PostgreSQL it is translated
//! ([`pg_sql`]: `?N` to `$N`, `INSERT OR IGNORE` to `ON CONFLICT DO NOTHING`, the two-argument
//! scalar `max`/`min` to `greatest`/`least`) and prepared once per connection.
//!
//! Values cross as [`Val`] (null, integer, real, text, boolean), so a parameter list is the same
//! slice for both; rows are read through [`Row`], which widens PostgreSQL's `int4` and `bool`
//! to the `i64` SQLite gives. What the translation cannot express (a `PRAGMA`, the backup API)
//! stays with the SQLite store.

use std::cell::RefCell;
use std::collections::HashMap;

use super::StoreError;

/// A statement parameter, as either backend takes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Val<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
    Bool(bool),
}

pub trait ToVal {
    fn to_val(&self) -> Val<'_>;
}

impl ToVal for i64 {
    fn to_val(&self) -> Val<'_> {
        Val::Int(*self)
    }
}
impl ToVal for u32 {
    fn to_val(&self) -> Val<'_> {
        Val::Int(i64::from(*self))
    }
}
impl ToVal for f64 {
    fn to_val(&self) -> Val<'_> {
        Val::Real(*self)
    }
}
impl ToVal for bool {
    fn to_val(&self) -> Val<'_> {
        Val::Bool(*self)
    }
}
impl ToVal for str {
    fn to_val(&self) -> Val<'_> {
        Val::Text(self)
    }
}
impl ToVal for String {
    fn to_val(&self) -> Val<'_> {
        Val::Text(self)
    }
}
impl ToVal for crate::clock::Millis {
    fn to_val(&self) -> Val<'_> {
        Val::Int(self.0)
    }
}
impl<T: ToVal + ?Sized> ToVal for &T {
    fn to_val(&self) -> Val<'_> {
        (**self).to_val()
    }
}
impl<T: ToVal> ToVal for Option<T> {
    fn to_val(&self) -> Val<'_> {
        self.as_ref().map_or(Val::Null, ToVal::to_val)
    }
}

impl rusqlite::ToSql for Val<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match *self {
            Val::Null => ToSqlOutput::Owned(Value::Null),
            Val::Int(i) => ToSqlOutput::Owned(Value::Integer(i)),
            Val::Real(f) => ToSqlOutput::Owned(Value::Real(f)),
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Val::Bool(b) => ToSqlOutput::Owned(Value::Integer(i64::from(b))),
        })
    }
}

impl postgres::types::ToSql for Val<'_> {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        match *self {
            Val::Null => Ok(postgres::types::IsNull::Yes),
            Val::Int(i) if *ty == Type::INT4 => i32::try_from(i)?.to_sql(ty, out),
            Val::Int(i) if *ty == Type::INT2 => i16::try_from(i)?.to_sql(ty, out),
            Val::Int(i) if *ty == Type::FLOAT8 => (i as f64).to_sql(ty, out),
            Val::Int(i) if *ty == Type::BOOL => (i != 0).to_sql(ty, out),
            Val::Int(i) if *ty == Type::TEXT => i.to_string().to_sql(ty, out),
            Val::Int(i) => i.to_sql(ty, out),
            Val::Real(f) => f.to_sql(ty, out),
            Val::Text(s) => s.to_sql(ty, out),
            Val::Bool(b) if *ty == Type::INT8 => i64::from(b).to_sql(ty, out),
            Val::Bool(b) if *ty == Type::INT4 => i32::from(b).to_sql(ty, out),
            Val::Bool(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// A value read from a row, from either backend.
pub trait FromVal: Sized {
    fn from_lite(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self>;
    fn from_pg(r: &postgres::Row, i: usize) -> Result<Self, postgres::Error>;
}

fn pg_int(r: &postgres::Row, i: usize) -> Result<Option<i64>, postgres::Error> {
    use postgres::types::Type;
    let ty = r.columns()[i].type_().clone();
    Ok(if ty == Type::INT4 {
        r.try_get::<_, Option<i32>>(i)?.map(i64::from)
    } else if ty == Type::INT2 {
        r.try_get::<_, Option<i16>>(i)?.map(i64::from)
    } else if ty == Type::BOOL {
        r.try_get::<_, Option<bool>>(i)?.map(i64::from)
    } else {
        r.try_get::<_, Option<i64>>(i)?
    })
}

impl FromVal for Option<i64> {
    fn from_lite(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self> {
        r.get(i)
    }
    fn from_pg(r: &postgres::Row, i: usize) -> Result<Self, postgres::Error> {
        pg_int(r, i)
    }
}
impl FromVal for i64 {
    fn from_lite(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self> {
        r.get(i)
    }
    fn from_pg(r: &postgres::Row, i: usize) -> Result<Self, postgres::Error> {
        // A NULL where a number is expected is the same error as on SQLite.
        match pg_int(r, i)? {
            Some(v) => Ok(v),
            None => r.try_get::<_, i64>(i),
        }
    }
}
impl FromVal for bool {
    fn from_lite(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self> {
        r.get(i)
    }
    fn from_pg(r: &postgres::Row, i: usize) -> Result<Self, postgres::Error> {
        Ok(i64::from_pg(r, i)? != 0)
    }
}
impl FromVal for Option<String> {
    fn from_lite(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self> {
        r.get(i)
    }
    fn from_pg(r: &postgres::Row, i: usize) -> Result<Self, postgres::Error> {
        r.try_get(i)
    }
}
impl FromVal for String {
    fn from_lite(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self> {
        r.get(i)
    }
    fn from_pg(r: &postgres::Row, i: usize) -> Result<Self, postgres::Error> {
        r.try_get(i)
    }
}
impl FromVal for f64 {
    fn from_lite(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self> {
        r.get(i)
    }
    fn from_pg(r: &postgres::Row, i: usize) -> Result<Self, postgres::Error> {
        use postgres::types::Type;
        if *r.columns()[i].type_() == Type::FLOAT8 {
            r.try_get(i)
        } else {
            Ok(i64::from_pg(r, i)? as f64)
        }
    }
}

/// A row of either backend.
pub enum Row<'r> {
    Lite(&'r rusqlite::Row<'r>),
    Pg(&'r postgres::Row),
}

impl Row<'_> {
    pub fn get<T: FromVal>(&self, i: usize) -> Result<T, StoreError> {
        match self {
            Row::Lite(r) => Ok(T::from_lite(r, i)?),
            Row::Pg(r) => Ok(T::from_pg(r, i)?),
        }
    }
}

/// A PostgreSQL connection as the store uses it: statements prepared once, by their SQLite text.
pub struct PgConn {
    client: RefCell<postgres::Client>,
    prepared: RefCell<HashMap<String, postgres::Statement>>,
    /// The leases of this instance, when it shares the database with others.
    pub(super) fence: Option<std::sync::Arc<super::pg::keeper::LeaseView>>,
}

impl PgConn {
    pub fn new(client: postgres::Client) -> PgConn {
        PgConn {
            client: RefCell::new(client),
            prepared: RefCell::new(HashMap::new()),
            fence: None,
        }
    }

    fn statement(&self, sql: &str) -> Result<postgres::Statement, postgres::Error> {
        if let Some(s) = self.prepared.borrow().get(sql) {
            return Ok(s.clone());
        }
        let st = self.client.borrow_mut().prepare(&pg_sql(sql))?;
        self.prepared
            .borrow_mut()
            .insert(sql.to_owned(), st.clone());
        Ok(st)
    }

    pub fn client(&self) -> std::cell::RefMut<'_, postgres::Client> {
        self.client.borrow_mut()
    }
}

/// Either backend's connection.
pub enum Db {
    Lite(rusqlite::Connection),
    Pg(Box<PgConn>),
}

fn lite_params<'a>(p: &'a [&'a dyn ToVal]) -> Vec<Val<'a>> {
    p.iter().map(|v| v.to_val()).collect()
}

impl Db {
    /// Runs a statement; returns the rows it changed.
    pub fn exec(&self, sql: &str, p: &[&dyn ToVal]) -> Result<u64, StoreError> {
        let vals = lite_params(p);
        match self {
            Db::Lite(c) => {
                Ok(c.prepare_cached(sql)?
                    .execute(rusqlite::params_from_iter(vals.iter()))? as u64)
            }
            Db::Pg(c) => {
                let st = c.statement(sql)?;
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    vals.iter().map(|v| v as _).collect();
                Ok(c.client.borrow_mut().execute(&st, &refs)?)
            }
        }
    }

    /// Every row of a query, each read by `f`.
    pub fn rows<T>(
        &self,
        sql: &str,
        p: &[&dyn ToVal],
        mut f: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let vals = lite_params(p);
        match self {
            Db::Lite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let mut rows = st.query(rusqlite::params_from_iter(vals.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    out.push(f(&Row::Lite(r))?);
                }
                Ok(out)
            }
            Db::Pg(c) => {
                let st = c.statement(sql)?;
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    vals.iter().map(|v| v as _).collect();
                let rows = c.client.borrow_mut().query(&st, &refs)?;
                rows.iter().map(|r| f(&Row::Pg(r))).collect()
            }
        }
    }

    /// The first row of a query, if any.
    pub fn row<T>(
        &self,
        sql: &str,
        p: &[&dyn ToVal],
        f: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        Ok(self.rows(sql, p, f)?.into_iter().next())
    }

    /// One value of the first row (None when there is no row).
    pub fn value<T: FromVal>(&self, sql: &str, p: &[&dyn ToVal]) -> Result<Option<T>, StoreError> {
        self.row(sql, p, |r| r.get(0))
    }

    /// Starts a write transaction: SQLite takes its write lock at BEGIN (a deferred one could
    /// fail at its first write with SQLITE_BUSY_SNAPSHOT); PostgreSQL begins READ COMMITTED.
    /// Rolled back when dropped uncommitted.
    pub fn write_tx(&self) -> Result<Tx<'_>, StoreError> {
        match self {
            Db::Lite(c) => c.execute_batch("BEGIN IMMEDIATE")?,
            Db::Pg(c) => c.client.borrow_mut().batch_execute("BEGIN")?,
        }
        Ok(Tx {
            db: self,
            open: true,
        })
    }

    pub fn is_pg(&self) -> bool {
        matches!(self, Db::Pg(_))
    }
}

/// An open transaction on a [`Db`]: statements run through it (it derefs to the `Db`).
pub struct Tx<'a> {
    db: &'a Db,
    open: bool,
}

impl std::ops::Deref for Tx<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        self.db
    }
}

impl Tx<'_> {
    pub fn commit(mut self) -> Result<(), StoreError> {
        self.open = false;
        match self.db {
            Db::Lite(c) => c.execute_batch("COMMIT")?,
            Db::Pg(c) => c.client.borrow_mut().batch_execute("COMMIT")?,
        }
        Ok(())
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = match self.db {
                Db::Lite(c) => c.execute_batch("ROLLBACK").map_err(|_| ()),
                Db::Pg(c) => c
                    .client
                    .borrow_mut()
                    .batch_execute("ROLLBACK")
                    .map_err(|_| ()),
            };
        }
    }
}

impl super::Store {
    /// The SQLite connection, for what only SQLite has (pragmas, the backup API) and for the
    /// statements not yet written against [`Db`].
    pub(super) fn lite(&self) -> Result<&rusqlite::Connection, StoreError> {
        match &self.db {
            Db::Lite(c) => Ok(c),
            Db::Pg(_) => Err(StoreError::SqliteOnly("this operation")),
        }
    }

    /// The SQLite connection of a store opened from a file (the demo, replays, benches and
    /// their audits open files only; a PostgreSQL store is never handed to them).
    pub fn conn(&self) -> &rusqlite::Connection {
        match &self.db {
            Db::Lite(c) => c,
            Db::Pg(_) => {
                panic!("Store::conn on a PostgreSQL store: SQLite-only callers open files")
            }
        }
    }

    /// Both backends' statement interface.
    pub fn db(&self) -> &Db {
        &self.db
    }
}

/// SQLite's statement text as PostgreSQL reads it (see the module's documentation). String
/// literals and quoted names are copied as they are.
pub fn pg_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let chars: Vec<char> = sql.chars().collect();
    let mut i = 0;
    let mut bare = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' || c == '"' {
            let end = chars[i + 1..]
                .iter()
                .position(|&d| d == c)
                .map_or(chars.len(), |p| i + 1 + p + 1);
            out.extend(&chars[i..end]);
            i = end;
            continue;
        }
        if c == '?' {
            let digits: String = chars[i + 1..]
                .iter()
                .take_while(|d| d.is_ascii_digit())
                .collect();
            if digits.is_empty() {
                bare += 1;
                out.push_str(&format!("${bare}"));
            } else {
                out.push('$');
                out.push_str(&digits);
            }
            i += 1 + digits.len();
            continue;
        }
        let word_start = i == 0 || !(chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '_');
        if word_start && let Some(name) = scalar_extreme(&chars, i) {
            out.push_str(name);
            i += 3;
            continue;
        }
        out.push(c);
        i += 1;
    }
    let upper = out.to_ascii_uppercase();
    if let Some(at) = upper.find("INSERT OR IGNORE INTO") {
        out.replace_range(at..at + "INSERT OR IGNORE INTO".len(), "INSERT INTO");
        let upper = out.to_ascii_uppercase();
        match upper.rfind(" RETURNING ") {
            Some(r) => out.insert_str(r, " ON CONFLICT DO NOTHING"),
            None => out.push_str(" ON CONFLICT DO NOTHING"),
        }
    }
    out
}

/// `greatest`/`least` when `max(`/`min(` at `i` has two or more arguments (SQLite's scalar
/// form); None for the aggregate or anything else.
fn scalar_extreme(chars: &[char], i: usize) -> Option<&'static str> {
    let word: String = chars
        .get(i..i + 4)?
        .iter()
        .collect::<String>()
        .to_ascii_lowercase();
    let name = match word.as_str() {
        "max(" => "greatest",
        "min(" => "least",
        _ => return None,
    };
    let (mut depth, mut quote) = (0usize, None);
    for &c in &chars[i + 4..] {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') if depth == 0 => return None,
            (None, ')') => depth -= 1,
            (None, ',') if depth == 0 => return Some(name),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::pg_sql;

    #[test]
    fn placeholders_literals_extremes_and_insert_or_ignore_translate() {
        assert_eq!(
            pg_sql("SELECT a FROM t WHERE b = ?2 AND c = '?1' AND d = ?1"),
            "SELECT a FROM t WHERE b = $2 AND c = '?1' AND d = $1"
        );
        assert_eq!(pg_sql("IN (?, ?, ?)"), "IN ($1, $2, $3)");
        assert_eq!(
            pg_sql("SELECT max(a, coalesce(b, 0)), max(c), MIN(d, (e)), xmax(f, g) FROM t"),
            "SELECT greatest(a, coalesce(b, 0)), max(c), least(d, (e)), xmax(f, g) FROM t"
        );
        assert_eq!(
            pg_sql("INSERT OR IGNORE INTO t (a) VALUES (?1)"),
            "INSERT INTO t (a) VALUES ($1) ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            pg_sql("INSERT OR IGNORE INTO t (a) VALUES (?1) RETURNING a"),
            "INSERT INTO t (a) VALUES ($1) ON CONFLICT DO NOTHING RETURNING a"
        );
    }
}
