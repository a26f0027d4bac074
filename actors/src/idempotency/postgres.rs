//! [`PostgresStore`]: claims and done keys in an inbox table in PostgreSQL
//! (feature `postgres`), and the [`TransactionalInbox`], where a handler's
//! own writes commit in the same transaction as its key.
//!
//! # The table
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS postbox_inbox (
//!     key        text PRIMARY KEY,
//!     token      uuid,                  -- the claimant's token; NULL once done
//!     done       boolean NOT NULL,
//!     expires_at timestamptz NOT NULL   -- the lease's end, or the retention's
//! )
//! ```
//!
//! Created when the store connects (its name is
//! [configurable](PostgresOptions::table)). Expiry is the database's clock
//! (`now()`), the same for every process. A row whose `expires_at` passed is
//! free; [`PostgresStore::purge_expired`] deletes such rows (run it now and
//! then: nothing else does).
//!
//! # As an [`IdempotencyStore`]
//!
//! - **claim**: one statement, `INSERT … ON CONFLICT (key) DO UPDATE … WHERE
//!   expires_at <= now() RETURNING …`: it inserts a free key, or takes over an
//!   expired row (then [`Claim::Acquired`]` { expired: true }` if that row was
//!   a claim); when it returns nothing, a read tells done from busy.
//! - **complete**: the same upsert, setting `done` where the token still
//!   holds the claim (or the row expired, or there is none).
//! - **release**: `DELETE … WHERE key = $1 AND token = $2 AND NOT done`.
//!
//! # The transactional inbox
//!
//! With a store (Redis, memory, or this one used through
//! [`Idempotent`](super::Idempotent)), a crash *between* the handler's side
//! effect and the record of its key reruns the handler on redelivery. When
//! the side effect is a write to the same PostgreSQL database, the
//! [`TransactionalInbox`] closes that gap: for each delivery it begins a
//! transaction, inserts the key as done, runs the handler **with that
//! transaction**, and commits both together, then acknowledges the delivery.
//!
//! | what happens | the outcome |
//! |---|---|
//! | the key is new | the handler runs; `Ok`: commit, then ack; `Err`: roll back, and the consumer's [`OnError`](crate::OnError) policy settles the delivery |
//! | the key is done (committed before) | roll back, ack without running the handler (a duplicate) |
//! | another consumer is inside its transaction for the key | the insert waits for it (PostgreSQL's row lock on the uncommitted key): if it commits, this is a duplicate; if it rolls back, this one runs. Past the [wait](TransactionalInbox::wait), the delivery is requeued |
//! | the handler panics (the consumer crashes) | the transaction is dropped and rolled back: neither the side effect nor the key stays; the delivery is redelivered |
//! | the process dies, anywhere | whatever was not committed is rolled back by the server; what was committed is a duplicate on redelivery |
//! | the database fails | `Err`: the delivery is never acked unprocessed |
//!
//! ```no_run
//! use postbox::Failure;
//! use postbox_actors::{Broker, ConsumeOptions, Delivery};
//! use postbox_actors::idempotency::postgres::PostgresStore;
//! use postbox_actors::idempotency::postgres::tokio_postgres::Transaction;
//! # async fn example(broker: Broker) -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresStore::connect("host=127.0.0.1 user=app dbname=shop").await?;
//! let inbox = store
//!     .inbox(async |d: &Delivery, tx: &Transaction<'_>| -> Result<(), Failure> {
//!         let order: i64 = d.decode()?;
//!         // Commits together with the message's key, or not at all.
//!         tx.execute("INSERT INTO charges (order_id) VALUES ($1)", &[&order])
//!             .await?;
//!         Ok(())
//!     })
//!     .by_key(|d: &Delivery| d.header("order-id").and_then(|v| v.as_str()).map(str::to_owned));
//! let consumer = broker
//!     .consume("orders", ConsumeOptions::manual(16), inbox.clone())
//!     .await?;
//! # let _ = consumer;
//! # Ok(()) }
//! ```

/// The PostgreSQL client this store is built on, re-exported so that a
/// handler of the [`TransactionalInbox`] names the same
/// [`Transaction`] type without a dependency of
/// its own that could drift to another version.
pub use tokio_postgres;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use postbox::Failure;
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::{CancelToken, Client, Config, NoTls, Statement, Transaction};

use crate::consumer::{Consumer, ConsumerFactory};
use crate::idempotency::{
    Claim, ClaimToken, Counters, IdempotencyError, IdempotencyStats, IdempotencyStore, KeyFn,
    validate_key,
};
use crate::queue::ack::AckMode;
use crate::queue::delivery::{AckError, Delivery, Outcome};
use crate::secret::scrub;

const STORE: &str = "postgres";

/// The inbox table a [`PostgresStore`] uses unless told otherwise.
pub const DEFAULT_TABLE: &str = "postbox_inbox";

/// How long a [`PostgresStore`] waits for a connection, or for a statement's
/// reply, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How many connections a [`PostgresStore`] opens at most, unless told
/// otherwise.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// The longest lease or retention given to the database (about 100 years),
/// in milliseconds: `now()` plus more would leave `timestamptz`'s range.
const MAX_TTL_MS: f64 = 100.0 * 365.0 * 24.0 * 3600.0 * 1000.0;

/// The longest PostgreSQL identifier, in bytes (`NAMEDATALEN - 1`).
const MAX_IDENTIFIER_LEN: usize = 63;

/// How a [`PostgresStore`] connects: its table, pool and timeout.
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::idempotency::postgres::PostgresOptions;
/// let options = PostgresOptions::new()
///     .table("billing.inbox")?
///     .pool_size(8)
///     .timeout(Duration::from_secs(2));
/// assert!(PostgresOptions::new().table("inbox; DROP TABLE users").is_err());
/// # let _ = options;
/// # Ok::<(), postbox_actors::idempotency::postgres::InvalidTableName>(())
/// ```
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    table: String,
    pool_size: usize,
    timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            table: DEFAULT_TABLE.to_owned(),
            pool_size: DEFAULT_POOL_SIZE,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl PostgresOptions {
    /// The defaults: table [`DEFAULT_TABLE`], [`DEFAULT_POOL_SIZE`]
    /// connections, [`DEFAULT_TIMEOUT`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The inbox table: `name` or `schema.name`, each part lowercase ASCII
    /// letters, digits and underscores, not starting with a digit, at most 63
    /// bytes (an SQL identifier that needs no quoting, so that it is the same
    /// table in your own SQL). Anything else is refused.
    pub fn table(mut self, name: &str) -> Result<Self, InvalidTableName> {
        check_table_name(name)?;
        self.table = name.to_owned();
        Ok(self)
    }

    /// At most `size` connections (at least 1; default
    /// [`DEFAULT_POOL_SIZE`]). Each claim, completion, release or inbox
    /// delivery holds one while it runs.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How long to wait for a connection (opening one, or a free one from
    /// the pool) and for each statement's reply (default
    /// [`DEFAULT_TIMEOUT`]). Past it, the operation fails with
    /// [`IdempotencyError::Unavailable`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }
}

/// A table name that [`PostgresOptions::table`] refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not a table name the PostgreSQL store accepts: {reason}")]
pub struct InvalidTableName {
    name: String,
    reason: &'static str,
}

impl InvalidTableName {
    /// The name refused.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Why.
    pub fn reason(&self) -> &str {
        self.reason
    }
}

fn check_table_name(name: &str) -> Result<(), InvalidTableName> {
    let refuse = |reason| {
        Err(InvalidTableName {
            name: name.to_owned(),
            reason,
        })
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 {
        return refuse("at most one dot (schema.table)");
    }
    for part in parts {
        let Some(first) = part.bytes().next() else {
            return refuse("an empty name");
        };
        if part.len() > MAX_IDENTIFIER_LEN {
            return refuse("a name longer than 63 bytes");
        }
        if !(first.is_ascii_lowercase() || first == b'_') {
            return refuse("a name must start with a lowercase letter or an underscore");
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return refuse("only lowercase ASCII letters, digits and underscores");
        }
    }
    Ok(())
}

/// An idempotency store in a PostgreSQL table (see the [module
/// docs](self)), and the maker of [transactional inboxes](Self::inbox).
///
/// Connections are pooled (opened as needed, up to
/// [`pool_size`](PostgresOptions::pool_size)) and driven on the tokio runtime
/// the store was connected in, whatever runtime uses them: connect it in a
/// runtime that outlives its use, such as the application's main one. Plain
/// TCP or Unix sockets: no TLS (`sslmode=require` fails to connect).
///
/// The password never appears in its `Debug` output or in its errors.
/// Clones share the pool.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.inner.target)
            .field("table", &self.inner.table)
            .field("pool_size", &self.inner.pool_size)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

struct Inner {
    config: Config,
    /// Drives the connections.
    runtime: Handle,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
    pool_size: usize,
    timeout: Duration,
    table: String,
    sql: Arc<Sql>,
    /// `user@host:port/dbname`, without the password.
    target: String,
    /// The password, to scrub from error messages.
    secrets: Vec<String>,
}

/// The statements, for one table.
struct Sql {
    create: String,
    claim: String,
    read: String,
    complete: String,
    release: String,
    inbox: String,
    purge: String,
}

impl Sql {
    fn new(table: &str) -> Self {
        // `table` passed check_table_name: safe to splice, no quoting needed.
        let expires = "now() + $3::float8 * interval '1 millisecond'";
        Sql {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {table} (\
                 key text PRIMARY KEY, \
                 token uuid, \
                 done boolean NOT NULL DEFAULT false, \
                 expires_at timestamptz NOT NULL)"
            ),
            // Whether it took over an expired claim (rather than inserting,
            // or taking over an expired done key): the row was updated
            // (`xmax` is set on a row that ON CONFLICT updated, 0 on one it
            // inserted), and `old`, the row as the statement's snapshot saw
            // it, was a claim. (`old` alone could be a claim released just
            // before the insert.)
            claim: format!(
                "WITH old AS (SELECT done FROM {table} WHERE key = $1) \
                 INSERT INTO {table} AS i (key, token, done, expires_at) \
                 VALUES ($1, $2, false, {expires}) \
                 ON CONFLICT (key) DO UPDATE \
                 SET token = EXCLUDED.token, done = false, expires_at = EXCLUDED.expires_at \
                 WHERE i.expires_at <= now() \
                 RETURNING xmax::text <> '0' AND COALESCE((SELECT NOT done FROM old), false)"
            ),
            read: format!("SELECT done, expires_at > now() AS live FROM {table} WHERE key = $1"),
            complete: format!(
                "INSERT INTO {table} AS i (key, token, done, expires_at) \
                 VALUES ($1, NULL, true, {expires}) \
                 ON CONFLICT (key) DO UPDATE \
                 SET token = NULL, done = true, expires_at = EXCLUDED.expires_at \
                 WHERE (i.token = $2 AND NOT i.done) OR i.expires_at <= now() \
                 RETURNING true"
            ),
            release: format!("DELETE FROM {table} WHERE key = $1 AND token = $2 AND NOT done"),
            inbox: format!(
                "WITH old AS (SELECT done FROM {table} WHERE key = $1) \
                 INSERT INTO {table} AS i (key, token, done, expires_at) \
                 VALUES ($1, NULL, true, now() + $2::float8 * interval '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE \
                 SET token = NULL, done = true, expires_at = EXCLUDED.expires_at \
                 WHERE i.expires_at <= now() \
                 RETURNING xmax::text <> '0' AND COALESCE((SELECT NOT done FROM old), false)"
            ),
            purge: format!("DELETE FROM {table} WHERE expires_at <= now()"),
        }
    }
}

/// A connection with its statements prepared.
struct Conn {
    client: Client,
    claim: Statement,
    read: Statement,
    complete: Statement,
    release: Statement,
    inbox: Statement,
}

/// A connection taken from the pool: back to it when dropped, unless
/// [discarded](Self::discard) or closed.
struct Pooled {
    conn: Option<Conn>,
    home: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
}

impl Pooled {
    fn conn(&mut self) -> Result<&mut Conn, IdempotencyError> {
        self.conn
            .as_mut()
            .ok_or_else(|| IdempotencyError::unavailable(STORE, "connection already discarded"))
    }

    /// Closes the connection instead of pooling it (its state is unknown: a
    /// statement timed out, or the connection failed).
    fn discard(&mut self) {
        self.conn = None;
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && !conn.client.is_closed()
        {
            self.home.idle.lock().push(conn);
        }
    }
}

impl PostgresStore {
    /// Connects with `config` (`host=… user=… dbname=…`, or a
    /// `postgresql://` URL) and the default [options](PostgresOptions),
    /// creating the table if there is none. Must be called within a tokio
    /// runtime: the connections are driven there.
    pub async fn connect(config: &str) -> Result<Self, IdempotencyError> {
        Self::connect_with(config, PostgresOptions::default()).await
    }

    /// Connects as [`connect`](Self::connect), with `options`. Fails with
    /// [`IdempotencyError::Unavailable`] if `config` does not parse, the
    /// server cannot be reached within the timeout or refuses, or the table
    /// cannot be created or is not an inbox table.
    pub async fn connect_with(
        config: &str,
        options: PostgresOptions,
    ) -> Result<Self, IdempotencyError> {
        let mut config = Config::from_str(config).map_err(|err| {
            IdempotencyError::unavailable(
                STORE,
                format!("bad connection string: {}", describe(&err)),
            )
        })?;
        let secrets: Vec<String> = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("postbox");
        }
        let runtime = Handle::try_current().map_err(|_| {
            IdempotencyError::unavailable(
                STORE,
                "PostgresStore::connect must be called within a tokio runtime",
            )
        })?;
        let target = target_of(&config);
        let inner = Arc::new(Inner {
            config,
            runtime,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(options.pool_size)),
            pool_size: options.pool_size,
            timeout: options.timeout,
            sql: Arc::new(Sql::new(&options.table)),
            table: options.table,
            target,
            secrets,
        });
        inner.create_table().await?;
        // A first connection prepares the statements: a table that is not an
        // inbox table fails here.
        drop(inner.get().await?);
        Ok(PostgresStore { inner })
    }

    /// The inbox table's name.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// Deletes the rows whose lease or retention has ended (they are free
    /// already, and only take room); returns how many.
    pub async fn purge_expired(&self) -> Result<u64, IdempotencyError> {
        let inner = &self.inner;
        let mut pooled = inner.get().await?;
        let conn = pooled.conn()?;
        let result = tokio::time::timeout(
            inner.timeout,
            conn.client.execute(inner.sql.purge.as_str(), &[]),
        )
        .await;
        inner.finish(&mut pooled, result)
    }

    /// A [transactional inbox](TransactionalInbox) on this store's table that
    /// runs `handler` with each new delivery and the transaction its key is
    /// recorded in. Keyed by the message id; see
    /// [`by_key`](TransactionalInbox::by_key).
    pub fn inbox<H>(&self, handler: H) -> TransactionalInbox<H>
    where
        H: for<'a, 'b, 'c> AsyncFnMut(&'a Delivery, &'b Transaction<'c>) -> Result<(), Failure>
            + 'static,
    {
        TransactionalInbox {
            store: self.clone(),
            handler,
            key: None,
            namespace: None,
            retain: Duration::from_secs(24 * 3600),
            wait: Duration::from_secs(30),
            busy_delay: Duration::from_millis(100),
            counters: Arc::default(),
        }
    }
}

impl Inner {
    /// A connection from the pool, or a new one: waits at most the timeout
    /// for a free one.
    async fn get(self: &Arc<Self>) -> Result<Pooled, IdempotencyError> {
        let permit =
            match tokio::time::timeout(self.timeout, self.permits.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(IdempotencyError::Closed),
                Err(_) => {
                    return Err(self.unavailable(format!(
                        "all {} connections to {} stayed busy for {:?}",
                        self.pool_size, self.target, self.timeout
                    )));
                }
            };
        loop {
            let idle = self.idle.lock().pop();
            match idle {
                Some(conn) if !conn.client.is_closed() => {
                    return Ok(Pooled {
                        conn: Some(conn),
                        home: self.clone(),
                        _permit: permit,
                    });
                }
                Some(_closed) => continue,
                None => break,
            }
        }
        let client = self.open().await?;
        let sql = &self.sql;
        let prepared = tokio::time::timeout(self.timeout, async {
            futures::try_join!(
                client.prepare(&sql.claim),
                client.prepare(&sql.read),
                client.prepare(&sql.complete),
                client.prepare(&sql.release),
                client.prepare(&sql.inbox),
            )
        })
        .await;
        let (claim, read, complete, release, inbox) = match prepared {
            Ok(Ok(statements)) => statements,
            Ok(Err(err)) => {
                return Err(self.unavailable(format!(
                    "table {} is not an inbox table of this store: {}",
                    self.table,
                    describe(&err)
                )));
            }
            Err(_) => {
                return Err(self.unavailable(format!(
                    "preparing statements on {}: no reply within {:?}",
                    self.target, self.timeout
                )));
            }
        };
        Ok(Pooled {
            conn: Some(Conn {
                client,
                claim,
                read,
                complete,
                release,
                inbox,
            }),
            home: self.clone(),
            _permit: permit,
        })
    }

    /// Opens a connection, on the store's runtime (where it is then driven),
    /// within the timeout.
    async fn open(&self) -> Result<Client, IdempotencyError> {
        let config = self.config.clone();
        let mut task = self.runtime.spawn(async move {
            let (client, connection) = config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::debug!(err = %describe(&err), "a PostgreSQL connection ended");
                }
            });
            Ok::<_, tokio_postgres::Error>(client)
        });
        match tokio::time::timeout(self.timeout, &mut task).await {
            Ok(Ok(Ok(client))) => Ok(client),
            Ok(Ok(Err(err))) => Err(self.unavailable(format!(
                "cannot connect to {}: {}",
                self.target,
                describe(&err)
            ))),
            Ok(Err(err)) => Err(self.unavailable(format!(
                "connecting to {} did not finish: {err}",
                self.target
            ))),
            Err(_) => {
                task.abort();
                Err(self.unavailable(format!(
                    "no connection to {} within {:?}",
                    self.target, self.timeout
                )))
            }
        }
    }

    /// `CREATE TABLE IF NOT EXISTS`, on a connection of its own (the pooled
    /// ones prepare statements against the table).
    async fn create_table(&self) -> Result<(), IdempotencyError> {
        let client = self.open().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match tokio::time::timeout(self.timeout, client.batch_execute(&self.sql.create)).await {
                Ok(Ok(())) => return Ok(()),
                // Two stores creating the table at once: one of them loses
                // on the catalog's unique index. The table is there now.
                Ok(Err(err))
                    if attempt < 3
                        && matches!(
                            err.code(),
                            Some(&SqlState::UNIQUE_VIOLATION | &SqlState::DUPLICATE_TABLE)
                        ) => {}
                Ok(Err(err)) => {
                    return Err(self.unavailable(format!(
                        "creating table {}: {}",
                        self.table,
                        describe(&err)
                    )));
                }
                Err(_) => {
                    return Err(self.unavailable(format!(
                        "creating table {}: no reply within {:?}",
                        self.table, self.timeout
                    )));
                }
            }
        }
    }

    /// The result of a statement run with `pooled`'s connection under the
    /// timeout; a connection that timed out or failed is not pooled again.
    fn finish<T>(
        &self,
        pooled: &mut Pooled,
        result: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, IdempotencyError> {
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                // Closed, or its prepared statements no longer fit the table
                // (dropped and created again): a fresh one next time.
                pooled.discard();
                Err(self.unavailable(describe(&err)))
            }
            Err(_) => {
                if let Some(conn) = &pooled.conn {
                    self.cancel(conn.client.cancel_token());
                }
                pooled.discard();
                Err(self.unavailable(format!(
                    "no reply from {} within {:?}",
                    self.target, self.timeout
                )))
            }
        }
    }

    /// Asks the server to cancel the statement running on a connection
    /// that timed out (in the background, within the timeout): closing the
    /// connection alone does not stop a statement waiting for a lock, which
    /// would take effect once it gets it.
    fn cancel(&self, token: CancelToken) {
        let timeout = self.timeout;
        self.runtime.spawn(async move {
            if let Ok(Err(err)) = tokio::time::timeout(timeout, token.cancel_query(NoTls)).await {
                tracing::debug!(err = %describe(&err), "cancelling a statement that timed out failed");
            }
        });
    }

    fn unavailable(&self, message: impl Into<String>) -> IdempotencyError {
        IdempotencyError::unavailable(STORE, scrub(message.into(), &self.secrets))
    }
}

impl IdempotencyStore for PostgresStore {
    async fn claim(
        &self,
        key: &str,
        token: ClaimToken,
        lease: Duration,
    ) -> Result<Claim, IdempotencyError> {
        validate_key(key)?;
        let inner = &self.inner;
        let lease = ttl_ms(lease);
        // A row that ends (expires, is released) between the upsert and the
        // read: try again, a few times.
        for _ in 0..3 {
            let mut pooled = inner.get().await?;
            let conn = pooled.conn()?;
            let result = tokio::time::timeout(inner.timeout, async {
                if let Some(row) = conn
                    .client
                    .query_opt(&conn.claim, &[&key, &token.0, &lease])
                    .await?
                {
                    return Ok(Some(Claim::Acquired {
                        expired: row.try_get(0)?,
                    }));
                }
                let Some(row) = conn.client.query_opt(&conn.read, &[&key]).await? else {
                    return Ok(None);
                };
                if !row.try_get::<_, bool>("live")? {
                    return Ok(None);
                }
                Ok(Some(if row.try_get("done")? {
                    Claim::Done
                } else {
                    Claim::Busy
                }))
            })
            .await;
            if let Some(claim) = inner.finish(&mut pooled, result)? {
                return Ok(claim);
            }
        }
        Ok(Claim::Busy)
    }

    async fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        retain: Duration,
    ) -> Result<bool, IdempotencyError> {
        validate_key(key)?;
        let inner = &self.inner;
        let retain = ttl_ms(retain);
        let mut pooled = inner.get().await?;
        let conn = pooled.conn()?;
        let result = tokio::time::timeout(
            inner.timeout,
            conn.client
                .query_opt(&conn.complete, &[&key, &token.0, &retain]),
        )
        .await;
        Ok(inner.finish(&mut pooled, result)?.is_some())
    }

    async fn release(&self, key: &str, token: ClaimToken) -> Result<bool, IdempotencyError> {
        validate_key(key)?;
        let inner = &self.inner;
        let mut pooled = inner.get().await?;
        let conn = pooled.conn()?;
        let result = tokio::time::timeout(
            inner.timeout,
            conn.client.execute(&conn.release, &[&key, &token.0]),
        )
        .await;
        Ok(inner.finish(&mut pooled, result)? == 1)
    }
}

/// A consumer that records each delivery's key in the same PostgreSQL
/// transaction as its handler's writes (see the [module docs](self)): made
/// by [`PostgresStore::inbox`].
///
/// The handler is an async closure `async |delivery: &Delivery, tx:
/// &Transaction<'_>| -> Result<(), Failure>`: run your writes with `tx`, and
/// leave the commit to the inbox (a handler that commits or rolls back the
/// transaction itself, with SQL, breaks the guarantee). The inbox checks that
/// the transaction is still sound before it commits: a handler that swallowed
/// one of its statements' errors (the transaction is then aborted) fails
/// instead of being acknowledged.
///
/// It is its own consumer factory (each consumer gets a clone of the
/// handler), so pass it (or a clone, to keep its [`stats`](Self::stats)) to
/// [`Broker::consume`](crate::Broker::consume). Use manual acknowledgements:
/// it acks once the transaction committed. (In auto-ack mode a delivery whose
/// key another consumer holds cannot be requeued: it fails.)
///
/// Its counts, shared by its clones ([`IdempotencyStats`]): `claimed`, keys
/// inserted and so handlers run; `completed`, transactions committed;
/// `skipped`, duplicates acked unrun; `busy`, deliveries requeued after
/// waiting for another consumer; `released`, transactions rolled back after
/// the handler failed or panicked; `expired`, expired claims taken over;
/// `store_errors`, database failures.
pub struct TransactionalInbox<H> {
    store: PostgresStore,
    handler: H,
    key: Option<KeyFn>,
    namespace: Option<Arc<str>>,
    retain: Duration,
    wait: Duration,
    busy_delay: Duration,
    counters: Arc<Counters>,
}

impl<H: Clone> Clone for TransactionalInbox<H> {
    fn clone(&self) -> Self {
        TransactionalInbox {
            store: self.store.clone(),
            handler: self.handler.clone(),
            key: self.key.clone(),
            namespace: self.namespace.clone(),
            retain: self.retain,
            wait: self.wait,
            busy_delay: self.busy_delay,
            counters: self.counters.clone(),
        }
    }
}

impl<H> std::fmt::Debug for TransactionalInbox<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalInbox")
            .field("store", &self.store)
            .field(
                "key",
                &if self.key.is_some() {
                    "custom"
                } else {
                    "message id"
                },
            )
            .field("namespace", &self.namespace)
            .field("retain", &self.retain)
            .field("wait", &self.wait)
            .finish()
    }
}

impl<H> TransactionalInbox<H> {
    /// Keyed by a business key that `key` extracts (an order id) instead of
    /// the message id. A delivery without a key fails with
    /// [`IdempotencyError::NoKey`] (settled by the consumer's error policy).
    pub fn by_key(
        mut self,
        key: impl Fn(&Delivery) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.key = Some(Arc::new(key));
        self
    }

    /// Keys are stored as `namespace:key`; by default the namespace is the
    /// queue's name (as with [`Idempotent`](super::Idempotent), so that both
    /// agree on one table).
    pub fn namespace(mut self, namespace: impl Into<Arc<str>>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// How long a key is remembered once committed (default 24 h): a
    /// duplicate arriving later runs again. (Expired rows stay until
    /// [`PostgresStore::purge_expired`].)
    pub fn retain(mut self, retain: Duration) -> Self {
        self.retain = retain.max(Duration::from_millis(1));
        self
    }

    /// How long a delivery waits for another consumer that is inside its
    /// transaction for the same key (default 30 s; PostgreSQL's
    /// `lock_timeout` on the insert). Past it, the delivery is requeued.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait.max(Duration::from_millis(1));
        self
    }

    /// How long a delivery requeued after waiting stays in its queue before
    /// it is seen again (default 100 ms).
    pub fn busy_retry(mut self, delay: Duration) -> Self {
        self.busy_delay = delay;
        self
    }

    /// The store.
    pub fn store(&self) -> &PostgresStore {
        &self.store
    }

    /// What this inbox and its clones have done.
    pub fn stats(&self) -> IdempotencyStats {
        self.counters.snapshot()
    }

    /// The stored key of a delivery: `namespace:key`, as [`Idempotent`]'s.
    ///
    /// [`Idempotent`]: super::Idempotent
    fn key_of(&self, delivery: &Delivery) -> Result<String, IdempotencyError> {
        super::layer::stored_key(self.key.as_ref(), self.namespace.as_deref(), delivery)
    }
}

impl<H> ConsumerFactory<TransactionalInbox<H>> for TransactionalInbox<H>
where
    H: for<'a, 'b, 'c> AsyncFnMut(&'a Delivery, &'b Transaction<'c>) -> Result<(), Failure>
        + Clone
        + Send
        + Sync
        + 'static,
{
    fn build(&self) -> TransactionalInbox<H> {
        self.clone()
    }
}

/// What one delivery came to, inside its transaction.
enum Step {
    /// The handler ran and the transaction committed.
    Committed,
    /// The key was committed before: rolled back, the handler did not run.
    Duplicate,
    /// Another consumer holds the key (waited past the limit, or a claim
    /// through the store): rolled back.
    Busy,
    /// The handler failed: rolled back.
    HandlerFailed(Failure),
    /// The database failed.
    StoreFailed(IdempotencyError),
}

/// Counts a transaction rolled back because its handler panicked: the
/// transaction is dropped (and so rolled back) with the handler's future.
struct Running<'a> {
    counters: &'a Counters,
    armed: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.armed {
            Counters::add(&self.counters.released);
        }
    }
}

impl<H> Consumer for TransactionalInbox<H>
where
    H: for<'a, 'b, 'c> AsyncFnMut(&'a Delivery, &'b Transaction<'c>) -> Result<(), Failure>
        + 'static,
{
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let key = self.key_of(&delivery)?;
        let manual = delivery.ack_mode() == AckMode::Manual;
        let inner = self.store.inner.clone();
        let step = match inner.get().await {
            Ok(mut pooled) => {
                let (step, broken) = self.transact(&inner, &mut pooled, &delivery, &key).await;
                if broken {
                    pooled.discard();
                }
                step
            }
            Err(err) => Step::StoreFailed(err),
        };
        let counters = &self.counters;
        match step {
            Step::Committed => {
                Counters::add(&counters.completed);
                if manual {
                    settle(&delivery, Outcome::Ack).await?;
                }
                Ok(())
            }
            Step::Duplicate => {
                Counters::add(&counters.skipped);
                tracing::debug!(%key, message_id = %delivery.id(), "duplicate skipped");
                if manual {
                    settle(&delivery, Outcome::Ack).await?;
                }
                Ok(())
            }
            Step::Busy => {
                Counters::add(&counters.busy);
                tracing::debug!(%key, message_id = %delivery.id(), "key busy: requeued");
                if manual {
                    settle(&delivery, Outcome::RequeueAfter(self.busy_delay)).await?;
                    Ok(())
                } else {
                    Err(Failure::msg(format!(
                        "key {key} is busy, and an auto-ack delivery cannot be requeued"
                    )))
                }
            }
            Step::HandlerFailed(failure) => {
                Counters::add(&counters.released);
                Err(failure)
            }
            Step::StoreFailed(err) => {
                Counters::add(&counters.store_errors);
                tracing::warn!(%key, %err, "transactional inbox failed");
                Err(Failure::from(err))
            }
        }
    }
}

impl<H> TransactionalInbox<H>
where
    H: for<'a, 'b, 'c> AsyncFnMut(&'a Delivery, &'b Transaction<'c>) -> Result<(), Failure>
        + 'static,
{
    /// Runs one delivery in a transaction on `pooled`; also says whether the
    /// connection is to be closed rather than pooled again (its state is
    /// unknown).
    async fn transact(
        &mut self,
        inner: &Inner,
        pooled: &mut Pooled,
        delivery: &Delivery,
        key: &str,
    ) -> (Step, bool) {
        let timeout = inner.timeout;
        let store_failed =
            |message: String, broken: bool| (Step::StoreFailed(inner.unavailable(message)), broken);
        let conn = match pooled.conn() {
            Ok(conn) => conn,
            Err(err) => return (Step::StoreFailed(err), true),
        };
        // Cancels the statement running when a step times out.
        let cancel = conn.client.cancel_token();
        let timed_out = |message: String| {
            inner.cancel(cancel.clone());
            (Step::StoreFailed(inner.unavailable(message)), true)
        };
        let tx = match tokio::time::timeout(timeout, conn.client.transaction()).await {
            Ok(Ok(tx)) => tx,
            Ok(Err(err)) => return store_failed(describe(&err), true),
            Err(_) => return timed_out(format!("BEGIN: no reply within {timeout:?}")),
        };
        let entered = tokio::time::timeout(
            self.wait + timeout,
            enter(&tx, &conn.inbox, &conn.read, key, self.retain, self.wait),
        )
        .await;
        let expired = match entered {
            Ok(Ok(Entry::Run { expired })) => expired,
            Ok(Ok(entry)) => {
                let rolled_back = tokio::time::timeout(timeout, tx.rollback()).await;
                let broken = !matches!(rolled_back, Ok(Ok(())));
                return match entry {
                    Entry::Duplicate => (Step::Duplicate, broken),
                    _ => (Step::Busy, broken),
                };
            }
            Ok(Err(err)) => return store_failed(describe(&err), true),
            Err(_) => {
                return timed_out(format!(
                    "recording {key}: no reply within {:?}",
                    self.wait + timeout
                ));
            }
        };
        let counters = &self.counters;
        Counters::add(&counters.claimed);
        if expired {
            Counters::add(&counters.expired);
            tracing::info!(%key, "took over an expired claim");
        }
        let mut running = Running {
            counters,
            armed: true,
        };
        let result = (self.handler)(delivery, &tx).await;
        running.armed = false;
        if let Err(failure) = result {
            let rolled_back = tokio::time::timeout(timeout, tx.rollback()).await;
            return (
                Step::HandlerFailed(failure),
                !matches!(rolled_back, Ok(Ok(()))),
            );
        }
        // The transaction must still be sound, with our key in it: COMMIT of
        // an aborted transaction is a silent ROLLBACK.
        let committed = tokio::time::timeout(timeout, async {
            let row = tx.query_opt(&conn.read, &[&key]).await?;
            let ours = match row {
                Some(row) => row.try_get::<_, bool>("done")?,
                None => false,
            };
            if !ours {
                return Ok(false);
            }
            tx.commit().await.map(|()| true)
        })
        .await;
        match committed {
            Ok(Ok(true)) => (Step::Committed, false),
            Ok(Ok(false)) => (
                Step::HandlerFailed(Failure::msg(format!(
                    "the handler's transaction lost the key {key} (did it delete it?): rolled back"
                ))),
                false,
            ),
            Ok(Err(err)) if err.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => (
                Step::HandlerFailed(Failure::msg(format!(
                    "a statement of the handler failed, and so its transaction: rolled back ({})",
                    describe(&err)
                ))),
                false,
            ),
            Ok(Err(err)) => store_failed(
                format!("COMMIT: {}", describe(&err)),
                err.as_db_error().is_none(),
            ),
            // The commit's outcome is unknown: a redelivery finds the key
            // done if it committed.
            Err(_) => timed_out(format!("COMMIT: no reply within {timeout:?}")),
        }
    }
}

/// Where a delivery's key stands once inserted (or not) in its transaction.
enum Entry {
    /// Inserted: run the handler. `expired`: it replaced an expired claim.
    Run { expired: bool },
    /// Committed before.
    Duplicate,
    /// Another consumer holds it.
    Busy,
}

/// Inserts `key` as done in `tx`, waiting at most `wait` for a concurrent
/// transaction that holds it (`SET LOCAL lock_timeout` around the insert,
/// sent in one round trip with it).
async fn enter(
    tx: &Transaction<'_>,
    insert: &Statement,
    read: &Statement,
    key: &str,
    retain: Duration,
    wait: Duration,
) -> Result<Entry, tokio_postgres::Error> {
    let retain = ttl_ms(retain);
    let wait_ms = u64::try_from(wait.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, i32::MAX as u64);
    let set = format!("SET LOCAL lock_timeout = {wait_ms}");
    // Polled in order, each sends its statement on its first poll: the
    // three are pipelined, in this order.
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&key, &retain];
    let (set, inserted, reset) = futures::join!(
        tx.batch_execute(&set),
        tx.query_opt(insert, &params),
        tx.batch_execute("SET LOCAL lock_timeout TO DEFAULT"),
    );
    let inserted = match inserted {
        Err(err) if err.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => return Ok(Entry::Busy),
        other => other,
    };
    set?;
    let inserted = inserted?;
    reset?;
    if let Some(row) = inserted {
        return Ok(Entry::Run {
            expired: row.try_get(0)?,
        });
    }
    let Some(row) = tx.query_opt(read, &[&key]).await? else {
        return Ok(Entry::Busy);
    };
    let (done, live): (bool, bool) = (row.try_get("done")?, row.try_get("live")?);
    Ok(if done && live {
        Entry::Duplicate
    } else {
        Entry::Busy
    })
}

/// Settles a delivery as the inbox decided (see the layer's `settle`).
async fn settle(delivery: &Delivery, outcome: Outcome) -> Result<(), AckError> {
    super::layer::settle(&delivery.settler(), outcome).await
}

/// A TTL in milliseconds: at least 1, at most [`MAX_TTL_MS`].
fn ttl_ms(ttl: Duration) -> f64 {
    (ttl.as_secs_f64() * 1000.0).clamp(1.0, MAX_TTL_MS)
}

/// An error with its causes (tokio-postgres's `Display` shows only its
/// kind).
fn describe(err: &tokio_postgres::Error) -> String {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// `user@host:port/dbname`, without the password.
fn target_of(config: &Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = config
                .get_ports()
                .get(i)
                .or(config.get_ports().first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                #[cfg(unix)]
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    format!(
        "{}@{}/{}",
        config.get_user().unwrap_or("?"),
        if hosts.is_empty() {
            "localhost".to_owned()
        } else {
            hosts.join(",")
        },
        config.get_dbname().unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for good in ["postbox_inbox", "_x", "s.t", "a1_b2", &"x".repeat(63)] {
            assert!(check_table_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1abc",
            "Inbox",
            "a-b",
            "a b",
            "a;drop table x",
            "a.b.c",
            ".a",
            "\"a\"",
            &"x".repeat(64),
        ] {
            assert!(check_table_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn targets_show_no_password() {
        let config = Config::from_str("host=db port=6543 user=app password=hunter2 dbname=shop")
            .unwrap_or_else(|_| Config::new());
        let target = target_of(&config);
        assert_eq!(target, "app@db:6543/shop");
    }
}
