//! One SQL surface over the store's two backends: SQLite (embedded, the
//! default) and PostgreSQL (several brokers on one database).
//!
//! The doors write their statements once, in the SQL both dialects share
//! (`?1`-style parameters, `ON CONFLICT`, `RETURNING`, `CASE` instead of
//! two-argument `MAX`, `"user"` quoted), and run them through a [`Db`]: the
//! writer's connection inside its transaction, or a reader's. Arguments are
//! [`Value`]s (`args![a, b]`) and rows are read as tuples of [`Column`]s, so
//! no door names a backend's types. Both backends prepare each statement
//! once per connection and reuse it.
//!
//! Integers are 64-bit on both sides (`INTEGER` in SQLite, `BIGINT` in
//! PostgreSQL). Reading is lenient where PostgreSQL's types are narrower or
//! wider than the door's (an `int4` expression read as `i64`, a `numeric`
//! sum read as `i64`), so a statement does not need casts only one dialect
//! wants.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::error::Error as StdError;

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type};

use super::StoreError;

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> StoreError {
        StoreError::Postgres(pg_detail(&e))
    }
}

/// A PostgreSQL error with what the server said (its `Display` alone is
/// only "db error").
pub(crate) fn pg_detail(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                s.push_str(&format!("; {detail}"));
            }
            s
        }
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// One argument of a statement.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// What can be an argument of a statement.
pub(crate) trait ToValue {
    fn to_value(&self) -> Value<'_>;
}

macro_rules! int_value {
    ($($t:ty),+) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value<'_> {
                Value::Int(i64::from(*self))
            }
        }
    )+};
}

int_value!(i64, i32, u32, u16, u8, bool);

impl ToValue for str {
    fn to_value(&self) -> Value<'_> {
        Value::Text(self)
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value<'_> {
        Value::Text(self)
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> Value<'_> {
        Value::Blob(self)
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value<'_> {
        Value::Blob(self)
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value<'_> {
        (**self).to_value()
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value<'_> {
        match self {
            Some(v) => v.to_value(),
            None => Value::Null,
        }
    }
}

/// The arguments of a statement: `args![resource.as_str(), at.0]`.
macro_rules! args {
    () => { &[] as &[$crate::store::sql::Value<'_>] };
    ($($e:expr),+ $(,)?) => {
        &[$($crate::store::sql::ToValue::to_value(&$e)),+] as &[$crate::store::sql::Value<'_>]
    };
}
pub(crate) use args;

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(v),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

type PgError = Box<dyn StdError + Sync + Send>;

impl ToSql for Value<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, PgError> {
        match *self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
                Type::BOOL => (v != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => v.to_string().to_sql(ty, out),
                _ => Err(format!("an integer cannot be written as {ty}").into()),
            },
            Value::Text(s) => s.to_sql(ty, out),
            Value::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Each value checks the parameter's type itself (`to_sql`).
        true
    }

    postgres::types::to_sql_checked!();
}

/// A column value a door reads.
pub(crate) trait Column: Sized {
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError>;
    fn pg(row: &postgres::Row, i: usize) -> Result<Self, StoreError>;
}

fn pg_column_error(row: &postgres::Row, i: usize, want: &str) -> StoreError {
    let ty = row
        .columns()
        .get(i)
        .map(|c| c.type_().to_string())
        .unwrap_or_else(|| "no column".into());
    StoreError::Corrupt(format!("column {i} is {ty}, read as {want}"))
}

/// An integer column of PostgreSQL, whatever its width (`numeric` of a
/// `SUM` included); `None` for NULL.
fn pg_int(row: &postgres::Row, i: usize) -> Result<Option<i64>, StoreError> {
    let ty = row
        .columns()
        .get(i)
        .map(|c| c.type_().clone())
        .ok_or_else(|| StoreError::Corrupt(format!("no column {i}")))?;
    let get = |e: postgres::Error| StoreError::Postgres(e.to_string());
    match ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i).map_err(get),
        Type::INT4 => Ok(row
            .try_get::<_, Option<i32>>(i)
            .map_err(get)?
            .map(i64::from)),
        Type::INT2 => Ok(row
            .try_get::<_, Option<i16>>(i)
            .map_err(get)?
            .map(i64::from)),
        Type::BOOL => Ok(row
            .try_get::<_, Option<bool>>(i)
            .map_err(get)?
            .map(i64::from)),
        Type::NUMERIC => match row.try_get::<_, Option<PgNumeric>>(i).map_err(get)? {
            None => Ok(None),
            Some(PgNumeric(v)) => Ok(Some(v)),
        },
        _ => Err(pg_column_error(row, i, "an integer")),
    }
}

impl Column for Option<i64> {
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self, StoreError> {
        pg_int(row, i)
    }
}

impl Column for i64 {
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self, StoreError> {
        pg_int(row, i)?.ok_or_else(|| pg_column_error(row, i, "a non-null integer"))
    }
}

impl Column for u32 {
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self, StoreError> {
        let v = <i64 as Column>::pg(row, i)?;
        u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{v} does not fit in 32 bits")))
    }
}

impl Column for bool {
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self, StoreError> {
        Ok(<i64 as Column>::pg(row, i)? != 0)
    }
}

impl Column for Option<String> {
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self, StoreError> {
        row.try_get(i).map_err(|_| pg_column_error(row, i, "text"))
    }
}

impl Column for String {
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self, StoreError> {
        <Option<String> as Column>::pg(row, i)?
            .ok_or_else(|| pg_column_error(row, i, "non-null text"))
    }
}

impl Column for Option<Vec<u8>> {
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self, StoreError> {
        row.try_get(i).map_err(|_| pg_column_error(row, i, "bytes"))
    }
}

impl Column for Vec<u8> {
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> Result<Self, StoreError> {
        Ok(row.get(i)?)
    }
    fn pg(row: &postgres::Row, i: usize) -> Result<Self, StoreError> {
        <Option<Vec<u8>> as Column>::pg(row, i)?
            .ok_or_else(|| pg_column_error(row, i, "non-null bytes"))
    }
}

/// A whole `numeric` (what PostgreSQL's `SUM` of integers gives), read
/// from its binary form: base-10000 digits with a weight.
struct PgNumeric(i64);

impl<'a> postgres::types::FromSql<'a> for PgNumeric {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, PgError> {
        let word = |i: usize| -> Result<i16, PgError> {
            let b = raw
                .get(i * 2..i * 2 + 2)
                .ok_or("numeric value is truncated")?;
            Ok(i16::from_be_bytes([b[0], b[1]]))
        };
        let ndigits = usize::try_from(word(0)?).map_err(|_| "numeric digit count is negative")?;
        let weight = i32::from(word(1)?);
        let sign = word(2)? as u16;
        if sign == 0xC000 {
            return Err("numeric value is NaN".into());
        }
        let mut v: i64 = 0;
        for d in 0..ndigits {
            let digit = i64::from(word(4 + d)?);
            // Digits after the decimal point must be zero for an integer.
            if i32::try_from(d)? > weight {
                if digit != 0 {
                    return Err("numeric value is not a whole number".into());
                }
                continue;
            }
            v = v
                .checked_mul(10_000)
                .and_then(|v| v.checked_add(digit))
                .ok_or("numeric value does not fit in 64 bits")?;
        }
        // Trailing zero groups are not sent.
        let shown = i32::try_from(ndigits)?;
        for _ in shown..=weight {
            v = v
                .checked_mul(10_000)
                .ok_or("numeric value does not fit in 64 bits")?;
        }
        Ok(PgNumeric(if sign == 0x4000 { -v } else { v }))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

/// A row read as the tuple of its columns, in order.
pub(crate) trait Columns: Sized {
    fn sqlite(row: &rusqlite::Row<'_>) -> Result<Self, StoreError>;
    fn pg(row: &postgres::Row) -> Result<Self, StoreError>;
}

macro_rules! scalar_columns {
    ($($t:ty),+) => {$(
        impl Columns for $t {
            fn sqlite(row: &rusqlite::Row<'_>) -> Result<Self, StoreError> {
                <$t as Column>::sqlite(row, 0)
            }
            fn pg(row: &postgres::Row) -> Result<Self, StoreError> {
                <$t as Column>::pg(row, 0)
            }
        }
    )+};
}

scalar_columns!(
    i64,
    Option<i64>,
    bool,
    String,
    Option<String>,
    Vec<u8>,
    Option<Vec<u8>>
);

macro_rules! columns_tuple {
    ($($t:ident $i:tt),+) => {
        impl<$($t: Column),+> Columns for ($($t,)+) {
            fn sqlite(row: &rusqlite::Row<'_>) -> Result<Self, StoreError> {
                Ok(($(<$t as Column>::sqlite(row, $i)?,)+))
            }
            fn pg(row: &postgres::Row) -> Result<Self, StoreError> {
                Ok(($(<$t as Column>::pg(row, $i)?,)+))
            }
        }
    };
}

columns_tuple!(A 0, B 1);
columns_tuple!(A 0, B 1, C 2);
columns_tuple!(A 0, B 1, C 2, D 3);
columns_tuple!(A 0, B 1, C 2, D 3, E 4);
columns_tuple!(A 0, B 1, C 2, D 3, E 4, F 5);
columns_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
columns_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
columns_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
columns_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);
columns_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10);
columns_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11);
columns_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12);
columns_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13);

/// A PostgreSQL connection with its prepared statements.
pub(crate) struct PgConn {
    client: RefCell<postgres::Client>,
    /// The database, as errors name it.
    shown: String,
    statements: RefCell<HashMap<String, postgres::Statement>>,
    /// A transaction this side began is open (the server's own state is
    /// not reported by the client).
    in_tx: Cell<bool>,
}

impl PgConn {
    pub(crate) fn new(client: postgres::Client, shown: String) -> Box<PgConn> {
        Box::new(PgConn {
            client: RefCell::new(client),
            shown,
            statements: RefCell::new(HashMap::new()),
            in_tx: Cell::new(false),
        })
    }

    fn statement(&self, sql: &str) -> Result<postgres::Statement, StoreError> {
        if let Some(s) = self.statements.borrow().get(sql) {
            return Ok(s.clone());
        }
        let text = postgres_sql(sql);
        let stmt = self.run(|c| c.prepare(&text))?;
        self.statements
            .borrow_mut()
            .insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }

    /// Runs `f` on the client; its error said as [`PgConn::error`] does.
    fn run<T>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let result = f(&mut self.client.borrow_mut());
        result.map_err(|e| self.error(e))
    }

    /// An error of this connection: [`StoreError::Unreachable`] when the
    /// connection is what failed.
    fn error(&self, e: postgres::Error) -> StoreError {
        if e.is_closed() || (e.code().is_none() && self.client.borrow().is_closed()) {
            StoreError::Unreachable {
                database: self.shown.clone(),
                detail: pg_detail(&e),
            }
        } else {
            StoreError::Postgres(pg_detail(&e))
        }
    }

    fn params<'v>(args: &'v [Value<'v>]) -> Vec<&'v (dyn ToSql + Sync)> {
        args.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
    }
}

/// A door's statement as PostgreSQL reads it. The doors write SQLite's
/// spelling where the two differ only in words, and this is the one place
/// those words are translated:
/// - `?1` parameters become `$1`;
/// - the column `user` (a reserved word in PostgreSQL, where unquoted it
///   means the session's role) is quoted;
/// - two-argument `MAX`/`MIN` (SQLite's scalar forms) become
///   `GREATEST`/`LEAST`; `group_concat` becomes `string_agg`;
/// - `INDEXED BY name` (a SQLite planner hint) is dropped;
/// - `INSERT OR IGNORE` becomes `INSERT ... ON CONFLICT DO NOTHING`.
///
/// Quoted text and quoted identifiers are left as they are.
pub(crate) fn postgres_sql(sql: &str) -> String {
    let (sql, ignore) = match sql.find("INSERT OR IGNORE INTO") {
        Some(i) => (
            format!(
                "{}INSERT INTO{}",
                &sql[..i],
                &sql[i + "INSERT OR IGNORE INTO".len()..]
            ),
            true,
        ),
        None => (sql.to_owned(), false),
    };
    let chars: Vec<char> = sql.chars().collect();
    let mut out = String::with_capacity(sql.len() + 16);
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        if ch == '\'' || ch == '"' {
            // Copy the quoted text whole ('' and "" escape their quote).
            out.push(ch);
            i += 1;
            while i < chars.len() {
                out.push(chars[i]);
                i += 1;
                if chars[i - 1] == ch {
                    break;
                }
            }
            continue;
        }
        if ch == '?' {
            out.push('$');
            i += 1;
            continue;
        }
        if ch.is_ascii_alphabetic() || ch == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            match word.as_str() {
                "user" => out.push_str("\"user\""),
                "group_concat" => out.push_str("string_agg"),
                "INDEXED" => {
                    // `INDEXED BY name`: skip the two words after it.
                    let mut words = 0;
                    while i < chars.len() && words < 2 {
                        while i < chars.len() && chars[i].is_whitespace() {
                            i += 1;
                        }
                        while i < chars.len()
                            && (chars[i].is_ascii_alphanumeric() || chars[i] == '_')
                        {
                            i += 1;
                        }
                        words += 1;
                    }
                }
                w if (w.eq_ignore_ascii_case("max") || w.eq_ignore_ascii_case("min"))
                    && has_two_arguments(&chars, i) =>
                {
                    out.push_str(if w.eq_ignore_ascii_case("max") {
                        "GREATEST"
                    } else {
                        "LEAST"
                    });
                }
                _ => out.push_str(&word),
            }
            continue;
        }
        out.push(ch);
        i += 1;
    }
    if ignore {
        let end = out.trim_end().trim_end_matches(';').len();
        out.truncate(end);
        out.push_str(" ON CONFLICT DO NOTHING");
    }
    out
}

/// Whether the call whose name ends before `at` has a comma at its own
/// level (`MAX(a, b)`, not `MAX(a)`).
fn has_two_arguments(chars: &[char], at: usize) -> bool {
    let mut i = at;
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    if chars.get(i) != Some(&'(') {
        return false;
    }
    let mut depth = 0;
    let mut quoted: Option<char> = None;
    for &ch in &chars[i..] {
        match quoted {
            Some(q) if ch == q => quoted = None,
            Some(_) => {}
            None => match ch {
                '\'' | '"' => quoted = Some(ch),
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return false;
                    }
                }
                ',' if depth == 1 => return true,
                _ => {}
            },
        }
    }
    false
}

/// A connection of either backend.
pub(crate) enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(Box<PgConn>),
}

impl Db {
    /// Runs a statement; returns the rows it changed.
    pub(crate) fn execute(&self, sql: &str, args: &[Value<'_>]) -> Result<u64, StoreError> {
        match self {
            Db::Sqlite(c) => {
                let n = c
                    .prepare_cached(sql)?
                    .execute(rusqlite::params_from_iter(args.iter()))?;
                Ok(n as u64)
            }
            Db::Postgres(pg) => {
                let stmt = pg.statement(sql)?;
                Ok(pg.run(|c| c.execute(&stmt, &PgConn::params(args)))?)
            }
        }
    }

    /// Every row of a query.
    pub(crate) fn query<T: Columns>(
        &self,
        sql: &str,
        args: &[Value<'_>],
    ) -> Result<Vec<T>, StoreError> {
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    out.push(T::sqlite(row)?);
                }
                Ok(out)
            }
            Db::Postgres(pg) => {
                let stmt = pg.statement(sql)?;
                let rows = pg.run(|c| c.query(&stmt, &PgConn::params(args)))?;
                rows.iter().map(T::pg).collect()
            }
        }
    }

    /// The first row of a query, if there is one.
    pub(crate) fn query_opt<T: Columns>(
        &self,
        sql: &str,
        args: &[Value<'_>],
    ) -> Result<Option<T>, StoreError> {
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
                match rows.next()? {
                    Some(row) => Ok(Some(T::sqlite(row)?)),
                    None => Ok(None),
                }
            }
            Db::Postgres(pg) => {
                let stmt = pg.statement(sql)?;
                let rows = pg.run(|c| c.query(&stmt, &PgConn::params(args)))?;
                rows.first().map(T::pg).transpose()
            }
        }
    }

    /// The one row a query must give (an aggregate, a row just written).
    pub(crate) fn query_one<T: Columns>(
        &self,
        sql: &str,
        args: &[Value<'_>],
    ) -> Result<T, StoreError> {
        self.query_opt(sql, args)?
            .ok_or_else(|| StoreError::Corrupt(format!("no row from: {}", first_line(sql))))
    }

    /// Runs statements without arguments (the schema, transaction control).
    pub(crate) fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Db::Postgres(pg) => pg.run(|c| c.batch_execute(&postgres_sql(sql))),
        }
    }

    /// Runs one argument-less statement through the statement cache (the
    /// writer's `BEGIN`, `SAVEPOINT`, `COMMIT`).
    pub(crate) fn run_cached(&self, sql: &str) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(c) => {
                c.prepare_cached(sql)?.execute([])?;
            }
            Db::Postgres(pg) => {
                pg.run(|c| c.batch_execute(sql))?;
                match sql {
                    "BEGIN" => pg.in_tx.set(true),
                    "COMMIT" | "ROLLBACK" => pg.in_tx.set(false),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// A transaction is open (SQLite rolls one back by itself after an I/O
    /// error or a full disk; a PostgreSQL transaction ends with its
    /// connection).
    pub(crate) fn in_transaction(&self) -> bool {
        match self {
            Db::Sqlite(c) => !c.is_autocommit(),
            Db::Postgres(pg) => pg.in_tx.get() && !pg.client.borrow().is_closed(),
        }
    }

    /// The SQLite connection, for what only SQLite has (pragmas, the WAL).
    pub(crate) fn sqlite(&self) -> Option<&rusqlite::Connection> {
        match self {
            Db::Sqlite(c) => Some(c),
            Db::Postgres(_) => None,
        }
    }

    /// The connection is gone (PostgreSQL only: the server went away).
    pub(crate) fn is_broken(&self) -> bool {
        match self {
            Db::Sqlite(_) => false,
            Db::Postgres(pg) => pg.client.borrow().is_closed(),
        }
    }
}

/// A row being read: [`Row::get`] one column, or [`columns`] all.
pub(crate) enum Row<'r> {
    Sqlite(&'r rusqlite::Row<'r>),
    Pg(&'r postgres::Row),
}

impl Row<'_> {
    /// Column `i`.
    pub(crate) fn get<T: Column>(&self, i: usize) -> Result<T, StoreError> {
        match self {
            Row::Sqlite(r) => T::sqlite(r, i),
            Row::Pg(r) => T::pg(r, i),
        }
    }
}

/// A row read as the tuple of its columns, in order: `stmt.query_map(args,
/// columns::<(String, i64)>)`. Each door names the types where it reads.
pub(crate) fn columns<T: Columns>(r: &Row<'_>) -> Result<T, StoreError> {
    match r {
        Row::Sqlite(r) => T::sqlite(r),
        Row::Pg(r) => T::pg(r),
    }
}

/// A statement of a door, prepared on first use (through the connection's
/// statement cache) and run any number of times.
pub(crate) struct Stmt<'c> {
    db: &'c Db,
    sql: String,
}

impl Stmt<'_> {
    /// Every row, each read by `f`.
    pub(crate) fn query_map<T>(
        &mut self,
        args: &[Value<'_>],
        f: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<std::vec::IntoIter<Result<T, StoreError>>, StoreError> {
        self.db.query_map(&self.sql, args, f)
    }

    /// The first row, read by `f`; [`StoreError::NoRows`] when there is none.
    pub(crate) fn query_row<T>(
        &mut self,
        args: &[Value<'_>],
        f: impl FnOnce(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.db.query_row(&self.sql, args, f)
    }
}

/// `Ok(None)` for a query that found no row.
pub(crate) trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>, StoreError>;
}

impl<T> OptionalExtension<T> for Result<T, StoreError> {
    fn optional(self) -> Result<Option<T>, StoreError> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(StoreError::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Db {
    /// A statement to run (prepared once per connection).
    pub(crate) fn prepare(&self, sql: &str) -> Result<Stmt<'_>, StoreError> {
        Ok(Stmt {
            db: self,
            sql: sql.to_owned(),
        })
    }

    /// The same as [`Db::prepare`]: both backends cache every statement.
    pub(crate) fn prepare_cached(&self, sql: &str) -> Result<Stmt<'_>, StoreError> {
        self.prepare(sql)
    }

    /// Every row of a query, each read by `f`.
    pub(crate) fn query_map<T>(
        &self,
        sql: &str,
        args: &[Value<'_>],
        mut f: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<std::vec::IntoIter<Result<T, StoreError>>, StoreError> {
        let mut out = Vec::new();
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
                while let Some(row) = rows.next()? {
                    out.push(f(&Row::Sqlite(row)));
                }
            }
            Db::Postgres(pg) => {
                let stmt = pg.statement(sql)?;
                let rows = pg.run(|c| c.query(&stmt, &PgConn::params(args)))?;
                for row in &rows {
                    out.push(f(&Row::Pg(row)));
                }
            }
        }
        Ok(out.into_iter())
    }

    /// The first row of a query, read by `f`; [`StoreError::NoRows`] when
    /// there is none.
    pub(crate) fn query_row<T>(
        &self,
        sql: &str,
        args: &[Value<'_>],
        f: impl FnOnce(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
                match rows.next()? {
                    Some(row) => f(&Row::Sqlite(row)),
                    None => Err(StoreError::NoRows),
                }
            }
            Db::Postgres(pg) => {
                let stmt = pg.statement(sql)?;
                let rows = pg.run(|c| c.query(&stmt, &PgConn::params(args)))?;
                match rows.first() {
                    Some(row) => f(&Row::Pg(row)),
                    None => Err(StoreError::NoRows),
                }
            }
        }
    }
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_said_in_postgres_words() {
        assert_eq!(
            postgres_sql("SELECT a FROM t WHERE b = ?1 AND c = '?' AND \"d?\" = ?12"),
            "SELECT a FROM t WHERE b = $1 AND c = '?' AND \"d?\" = $12"
        );
        assert_eq!(
            postgres_sql("SELECT s.user, users.id FROM sessions s INDEXED BY sessions_open, users"),
            "SELECT s.\"user\", users.id FROM sessions s , users"
        );
        assert_eq!(
            postgres_sql(
                "UPDATE t SET a = MAX(a, ?1), b = (SELECT MAX(c) FROM u), d = min(f(x, y), 2)"
            ),
            "UPDATE t SET a = GREATEST(a, $1), b = (SELECT MAX(c) FROM u), d = LEAST(f(x, y), 2)"
        );
        assert_eq!(
            postgres_sql("INSERT OR IGNORE INTO t (a) VALUES (?1)"),
            "INSERT INTO t (a) VALUES ($1) ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            postgres_sql("SELECT group_concat(name, ' ') FROM g WHERE n = 'user'"),
            "SELECT string_agg(name, ' ') FROM g WHERE n = 'user'"
        );
    }

    #[test]
    fn sqlite_rows_read_as_tuples() {
        let db = Db::Sqlite(rusqlite::Connection::open_in_memory().expect("open"));
        db.execute_batch("CREATE TABLE t (a INTEGER, b TEXT, c BLOB)")
            .expect("create");
        db.execute(
            "INSERT INTO t (a, b, c) VALUES (?1, ?2, ?3)",
            args![7i64, "x", vec![1u8, 2]],
        )
        .expect("insert");
        db.execute(
            "INSERT INTO t (a, b, c) VALUES (?1, ?2, ?3)",
            args![None::<i64>, None::<String>, None::<Vec<u8>>],
        )
        .expect("insert nulls");
        type Nullable = (Option<i64>, Option<String>, Option<Vec<u8>>);
        let rows: Vec<Nullable> = db
            .query("SELECT a, b, c FROM t ORDER BY a IS NULL", args![])
            .expect("query");
        assert_eq!(
            rows,
            vec![
                (Some(7), Some("x".into()), Some(vec![1, 2])),
                (None, None, None)
            ]
        );
        let n: i64 = db
            .query_one("SELECT COUNT(*) FROM t", args![])
            .expect("count");
        assert_eq!(n, 2);
        let none: Option<i64> = db
            .query_opt("SELECT a FROM t WHERE a = ?1", args![8])
            .expect("opt");
        assert_eq!(none, None);
    }
}
