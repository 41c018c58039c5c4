//! `spool.postgres`: cluster mode's database, checked once here so that the store can trust it.

use std::fmt;
use std::str::FromStr;

use super::raw::RawPostgres;

/// Connections per instance when `pool` is not set.
pub const DEFAULT_POOL: usize = 16;

/// Where the cluster keeps its state: a PostgreSQL URL (it may hold a password) and the size of
/// this instance's connection pool.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresStore {
    pub url: String,
    pub pool: usize,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: never print it, not even in debug output.
        f.debug_struct("PostgresStore")
            .field("url", &"<redacted>")
            .field("pool", &self.pool)
            .finish()
    }
}

impl PostgresStore {
    pub(super) fn from_raw(raw: &RawPostgres) -> Result<PostgresStore, String> {
        let url = raw
            .url
            .as_deref()
            .ok_or("`url` is required, e.g. postgresql://actiongate:${PG_PASSWORD}@db1:5432,db2:5432/actiongate?target_session_attrs=read-write")?;
        // The driver's own parser, so that what passes `-t` is what the store connects with.
        // Its message never repeats the URL, which may hold a password.
        let parsed = tokio_postgres::Config::from_str(url)
            .map_err(|e| format!("url does not parse as a PostgreSQL URL: {e}"))?;
        if parsed.get_hosts().is_empty() {
            return Err("url names no host".into());
        }
        let pool = match raw.pool {
            None => DEFAULT_POOL,
            Some(n @ 2..=1000) => n as usize,
            Some(n) => {
                return Err(format!(
                    "pool: {n} is outside 2..1000 (one connection is busy committing while \
                     others claim and record deliveries)"
                ))
            }
        };
        Ok(PostgresStore {
            url: url.to_string(),
            pool,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(url: Option<&str>, pool: Option<u64>) -> RawPostgres {
        RawPostgres {
            url: url.map(str::to_string),
            pool,
        }
    }

    #[test]
    fn a_multi_host_url_is_taken_and_its_password_never_printed() {
        let store = PostgresStore::from_raw(&raw(
            Some("postgresql://ag:hunter2@db1:5432,db2:5433/ag?target_session_attrs=read-write"),
            None,
        ))
        .unwrap();
        assert_eq!(store.pool, DEFAULT_POOL);
        assert!(!format!("{store:?}").contains("hunter2"));
    }

    #[test]
    fn mistakes_are_explained_without_the_url() {
        let missing = PostgresStore::from_raw(&raw(None, None)).unwrap_err();
        assert!(missing.starts_with("`url` is required"), "{missing}");
        let bad =
            PostgresStore::from_raw(&raw(Some("postgresql://ag:hunter2@db1:notaport/ag"), None))
                .unwrap_err();
        assert!(bad.starts_with("url does not parse"), "{bad}");
        assert!(!bad.contains("hunter2"), "{bad}");
        let pool = PostgresStore::from_raw(&raw(Some("postgresql://db1/ag"), Some(1))).unwrap_err();
        assert!(pool.starts_with("pool: 1 is outside 2..1000"), "{pool}");
    }
}
