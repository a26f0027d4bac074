//! [`RedisStore`]: claims and done keys in Redis (feature `redis`).
//!
//! The usual Redis recipe for a lock with a lease, `SET key token NX PX
//! lease`, in three Lua scripts so that each step is atomic and tells the
//! states apart:
//!
//! | state | the value of `{prefix}{key}` | its TTL |
//! |---|---|---|
//! | free | (no key) | |
//! | claimed | `c:{token}` | the lease |
//! | done | `d` | the retention |
//!
//! - **claim**: no key → `SET c:{token} PX lease`, acquired; `d` → done;
//!   another claim → busy.
//! - **complete**: the value is our claim, or there is no key → `SET d PX
//!   retain`, `true`; another claim, or `d` already → `false`.
//! - **release**: the value is our claim → `DEL`, `true`; otherwise `false`.
//!
//! The scripts run with `EVALSHA`, and are loaded with `SCRIPT LOAD` when the
//! server does not know them (after a restart or a `SCRIPT FLUSH`).
//!
//! Redis forgets a key when its TTL ends, so an expired claim and a free key
//! look the same: a claim is always [`Claim::Acquired`]` { expired: false }`,
//! even when it takes over from a claimant whose lease ran out. (The layer's
//! [`expired`](super::IdempotencyStats::expired) count stays at 0 with this
//! store.)
//!
//! Every command has a timeout (5 s by default): a server that does not
//! answer, or cannot be reached, is an [`IdempotencyError::Unavailable`]
//! error, never a hang. The connection reconnects by itself after an I/O
//! error, and is replaced after a timeout.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Script};
use parking_lot::Mutex;
use tokio::runtime::Handle;

use crate::idempotency::{Claim, ClaimToken, IdempotencyError, IdempotencyStore, validate_key};
use crate::secret::{scrub, url_secrets};

const STORE: &str = "redis";

/// The key prefix a [`RedisStore`] uses unless told otherwise.
pub const DEFAULT_PREFIX: &str = "postbox:idem:";

/// How long a [`RedisStore`] waits for a connection or for a command's reply
/// unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest lease or retention given to Redis (about 100 years): `PX`
/// takes milliseconds, and a longer one would overflow the server's clock.
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// KEYS[1] the key, ARGV[1] `c:{token}`, ARGV[2] the lease in ms.
/// Returns 1 acquired, 2 done, 0 busy.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == 'd' then
  return 2
end
return 0
",
    )
});

/// KEYS[1] the key, ARGV[1] `c:{token}`, ARGV[2] the retention in ms.
/// Returns 1 recorded, 0 not ours.
static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] then
  redis.call('SET', KEYS[1], 'd', 'PX', ARGV[2])
  return 1
end
return 0
",
    )
});

/// KEYS[1] the key, ARGV[1] `c:{token}`. Returns 1 released, 0 not ours.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// An idempotency store in Redis: claims with a lease and done keys with a
/// retention, both as Redis TTLs, so that nothing needs cleaning up. Shared
/// by every process that connects to the same server with the same
/// [prefix](Self::prefix). See the [module docs](self) for the scripts.
///
/// Commands run on the tokio runtime the store was connected in (its
/// connection lives there), whatever runtime calls them: connect it in a
/// runtime that outlives its use, such as the application's main one.
///
/// Credentials in the URL never appear in its `Debug` output or in its
/// errors.
///
/// ```no_run
/// use std::time::Duration;
/// use postbox_actors::idempotency::Idempotent;
/// use postbox_actors::idempotency::redis::RedisStore;
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379")
///     .await?
///     .prefix("billing:idem:");
/// let layer = Idempotent::by_message_id(store).retain(Duration::from_secs(24 * 3600));
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    shared: Arc<Shared>,
    prefix: Arc<str>,
    timeout: Duration,
}

struct Shared {
    /// Replaced by a fresh one after a command timed out (a connection that
    /// stopped answering without an I/O error is never reconnected).
    conn: Mutex<ConnectionManager>,
    client: Client,
    config: ConnectionManagerConfig,
    /// Where the connection lives.
    runtime: Handle,
    /// `host:port/db`, without credentials.
    address: String,
    /// Credentials to scrub from error messages.
    secrets: Vec<String>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("address", &self.shared.address)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisStore {
    /// Connects to the server at `url` (`redis://[user:password@]host[:port][/db]`,
    /// or `redis+unix:///path`), with the [default timeout](DEFAULT_TIMEOUT)
    /// and [prefix](DEFAULT_PREFIX). Fails with
    /// [`IdempotencyError::Unavailable`] if the URL is not one, or the server
    /// cannot be reached or refuses the credentials within the timeout.
    /// Must be called within a tokio runtime: the connection lives there.
    pub async fn connect(url: &str) -> Result<Self, IdempotencyError> {
        Self::connect_with_timeout(url, DEFAULT_TIMEOUT).await
    }

    /// Connects as [`connect`](Self::connect), waiting at most `timeout` for
    /// the connection and, afterwards, for each command's reply.
    pub async fn connect_with_timeout(
        url: &str,
        timeout: Duration,
    ) -> Result<Self, IdempotencyError> {
        let timeout = timeout.max(Duration::from_millis(1));
        let mut secrets = url_secrets(url);
        let client =
            Client::open(url).map_err(|err| unavailable(&secrets, format!("bad URL: {err}")))?;
        let info = client.get_connection_info();
        if let Some(password) = info.redis_settings().password() {
            secrets.push(password.to_owned());
        }
        let address = format!("{}/{}", info.addr(), info.redis_settings().db());
        let runtime = Handle::try_current().map_err(|_| {
            unavailable(
                &secrets,
                "RedisStore::connect must be called within a tokio runtime",
            )
        })?;
        // Few retries: an unreachable server should say why (connection
        // refused) within the timeout. Commands that find the connection
        // broken reconnect.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        // Connected on the store's runtime, so that its socket and driver
        // live there whichever runtime calls the store.
        let mut connecting = runtime.spawn(ConnectionManager::new_with_config(
            client.clone(),
            config.clone(),
        ));
        let conn = match tokio::time::timeout(timeout, &mut connecting).await {
            Ok(Ok(Ok(conn))) => conn,
            Ok(Ok(Err(err))) => {
                return Err(unavailable(
                    &secrets,
                    format!("cannot connect to {address}: {err}"),
                ));
            }
            Ok(Err(err)) => {
                return Err(unavailable(
                    &secrets,
                    format!("connecting to {address} failed: {err}"),
                ));
            }
            Err(_) => {
                connecting.abort();
                return Err(unavailable(
                    &secrets,
                    format!("no connection to {address} within {timeout:?}"),
                ));
            }
        };
        Ok(RedisStore {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                client,
                config,
                runtime,
                address,
                secrets,
            }),
            prefix: Arc::from(DEFAULT_PREFIX),
            timeout,
        })
    }

    /// Stores keys as `{prefix}{key}` (default [`DEFAULT_PREFIX`]): stores
    /// with different prefixes on one server do not see each other's keys.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self
    }

    /// Waits at most `timeout` for each command's reply (default: the
    /// connection's timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key of `key`.
    fn redis_key(&self, key: &str) -> String {
        let mut full = String::with_capacity(self.prefix.len() + key.len());
        full.push_str(&self.prefix);
        full.push_str(key);
        full
    }

    /// Runs `script` on the key of `key` with `args`, on the store's runtime,
    /// within the timeout.
    async fn eval(
        &self,
        script: &'static Script,
        key: &str,
        args: Vec<String>,
    ) -> Result<i64, IdempotencyError> {
        let shared = &self.shared;
        let mut conn = shared.conn.lock().clone();
        let redis_key = self.redis_key(key);
        let mut task = shared.runtime.spawn(async move {
            let mut invocation = script.prepare_invoke();
            invocation.key(redis_key);
            for arg in args {
                invocation.arg(arg);
            }
            invocation.invoke_async::<i64>(&mut conn).await
        });
        match tokio::time::timeout(self.timeout, &mut task).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(err))) => Err(unavailable(
                &shared.secrets,
                format!("{}: {err}", shared.address),
            )),
            Ok(Err(err)) => Err(unavailable(
                &shared.secrets,
                format!("a command to {} did not finish: {err}", shared.address),
            )),
            Err(_) => {
                task.abort();
                self.replace_connection();
                Err(unavailable(
                    &shared.secrets,
                    format!("no reply from {} within {:?}", shared.address, self.timeout),
                ))
            }
        }
    }

    /// Swaps in a fresh connection (made lazily, on the store's runtime): the
    /// one that timed out may be stuck without an error to reconnect on.
    fn replace_connection(&self) {
        let shared = &self.shared;
        let _runtime = shared.runtime.enter();
        match ConnectionManager::new_lazy_with_config(shared.client.clone(), shared.config.clone())
        {
            Ok(fresh) => *shared.conn.lock() = fresh,
            Err(err) => tracing::warn!(
                address = %shared.address,
                err = %scrub(err.to_string(), &shared.secrets),
                "could not replace a Redis connection that timed out"
            ),
        }
    }
}

impl IdempotencyStore for RedisStore {
    async fn claim(
        &self,
        key: &str,
        token: ClaimToken,
        lease: Duration,
    ) -> Result<Claim, IdempotencyError> {
        validate_key(key)?;
        let found = self
            .eval(&CLAIM, key, vec![claim_value(token), ttl_ms(lease)])
            .await?;
        match found {
            1 => Ok(Claim::Acquired { expired: false }),
            2 => Ok(Claim::Done),
            0 => Ok(Claim::Busy),
            other => Err(IdempotencyError::unavailable(
                STORE,
                format!("unexpected reply {other} to a claim"),
            )),
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        retain: Duration,
    ) -> Result<bool, IdempotencyError> {
        validate_key(key)?;
        let recorded = self
            .eval(&COMPLETE, key, vec![claim_value(token), ttl_ms(retain)])
            .await?;
        Ok(recorded == 1)
    }

    async fn release(&self, key: &str, token: ClaimToken) -> Result<bool, IdempotencyError> {
        validate_key(key)?;
        let released = self.eval(&RELEASE, key, vec![claim_value(token)]).await?;
        Ok(released == 1)
    }
}

/// The value of a key claimed with `token`: never `d`, a done key's.
fn claim_value(token: ClaimToken) -> String {
    format!("c:{}", token.0)
}

/// A TTL in milliseconds for `PX`: at least 1, at most [`MAX_TTL_MS`].
fn ttl_ms(ttl: Duration) -> String {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    ms.clamp(1, MAX_TTL_MS).to_string()
}

fn unavailable(secrets: &[String], message: impl Into<String>) -> IdempotencyError {
    IdempotencyError::unavailable(STORE, scrub(message.into(), secrets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_and_claim_values() {
        assert_eq!(ttl_ms(Duration::ZERO), "1");
        assert_eq!(ttl_ms(Duration::MAX), MAX_TTL_MS.to_string());
        assert_ne!(claim_value(ClaimToken::new()), "d");
    }
}
