//! The Redis idempotency store against a real server: `REDIS_URL`, or
//! `redis://127.0.0.1:6379` (started if installed and not running; the tests
//! that need a server skip without one). The storm of 10,000 orders published three
//! times with crashes, one winner among concurrent claims, an expired claim
//! taken over, an unreachable or silent server as a typed error within the
//! timeout, bad keys refused, credentials never shown. Each test uses a key
//! prefix of its own and deletes its keys at the end.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use postbox::Runtime;
use postbox_actors::idempotency::redis::RedisStore;
use postbox_actors::idempotency::{
    Claim, ClaimToken, IdempotencyError, IdempotencyStore, MAX_KEY_LEN,
};

mod common;
use common::orders::exactly_once_orders;

/// The server's URL: `REDIS_URL`, or a server on 127.0.0.1:6379, started
/// (as the machine's notes say) if it is installed and not running. `None`:
/// no server, and none to start: the tests that need one skip (this file is
/// also built by the plain `cargo test --workspace`, where the benchmarks'
/// dependency turns the `redis` feature on, on machines without Redis).
fn server() -> Option<&'static str> {
    static URL: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("REDIS_URL") {
            return Some(url);
        }
        let up = || std::net::TcpStream::connect(("127.0.0.1", 6379)).is_ok();
        if !up() {
            let started = std::process::Command::new("redis-server")
                .args([
                    "--daemonize",
                    "yes",
                    "--bind",
                    "127.0.0.1",
                    "-::1",
                    "--port",
                    "6379",
                ])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !started {
                eprintln!("no Redis server (set REDIS_URL, or install redis-server): skipped");
                return None;
            }
            for _ in 0..100 {
                if up() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        Some("redis://127.0.0.1:6379".to_owned())
    })
    .as_deref()
}

/// Returns from the test when there is no server.
macro_rules! need_server {
    () => {
        if server().is_none() {
            return;
        }
    };
}

fn url() -> String {
    server().unwrap_or("redis://127.0.0.1:6379").to_owned()
}

/// A key prefix no other test run shares.
fn unique_prefix(test: &str) -> String {
    format!("postbox:test:{test}:{}:", uuid::Uuid::new_v4().simple())
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Deletes every key under `prefix`; returns how many there were.
async fn delete_prefix(prefix: &str) -> usize {
    let mut con = raw().await;
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await
            .unwrap();
        if !keys.is_empty() {
            deleted += keys.len();
            let _: usize = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut con)
                .await
                .unwrap();
        }
        if next == 0 {
            return deleted;
        }
        cursor = next;
    }
}

async fn store(prefix: &str) -> RedisStore {
    RedisStore::connect(&url()).await.unwrap().prefix(prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_orders_three_times_with_crashes_redis_store() {
    need_server!();
    let prefix = unique_prefix("storm");
    let rt = Runtime::with_arbiters(2).unwrap();
    let queue = format!("orders-redis-{}", uuid::Uuid::new_v4().simple());
    let started = Instant::now();
    let storm = exactly_once_orders(&rt.handle(), &queue, store(&prefix).await, 10_000, 11).await;
    eprintln!("redis storm: {:?} in {:?}", storm, started.elapsed());
    assert!(storm.panics > 0 && storm.errors > 0, "{storm:?}");
    assert!(storm.stats.released > 0, "{storm:?}");
    // Redis cannot tell an expired claim from a free key.
    assert_eq!(storm.stats.expired, 0, "{storm:?}");
    rt.shutdown();
    assert_eq!(
        delete_prefix(&prefix).await,
        10_000,
        "one done key per order"
    );
}

#[test]
fn concurrent_claims_of_one_key_from_many_threads_have_one_winner() {
    need_server!();
    // The store lives on this runtime; the claimants are threads with
    // runtimes of their own.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let prefix = unique_prefix("race");
    let store = Arc::new(rt.block_on(store(&prefix)));
    for round in 0..50 {
        let key = format!("key-{round}");
        let outcomes: Vec<Claim> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let (store, key) = (store.clone(), key.clone());
                    s.spawn(move || {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap()
                            .block_on(store.claim(&key, ClaimToken::new(), Duration::from_secs(60)))
                            .unwrap()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let winners = outcomes
            .iter()
            .filter(|c| matches!(c, Claim::Acquired { .. }))
            .count();
        assert_eq!(winners, 1, "round {round}: {outcomes:?}");
        assert!(
            outcomes
                .iter()
                .all(|c| matches!(c, Claim::Acquired { .. } | Claim::Busy))
        );
    }
    // And from tasks of one runtime.
    let winners = rt.block_on(async {
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .claim("tasks", ClaimToken::new(), Duration::from_secs(60))
                        .await
                })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            if matches!(task.await.unwrap(), Ok(Claim::Acquired { .. })) {
                winners += 1;
            }
        }
        winners
    });
    assert_eq!(winners, 1);
    rt.block_on(async { assert_eq!(delete_prefix(&prefix).await, 51) });
}

#[tokio::test]
async fn an_expired_claim_is_taken_over_and_the_old_token_can_neither_complete_nor_release() {
    need_server!();
    let prefix = unique_prefix("expiry");
    let store = store(&prefix).await;
    let (a, b, c) = (ClaimToken::new(), ClaimToken::new(), ClaimToken::new());
    // Real time on the server's clock: wide margins, so that a loaded machine
    // does not see a lease run out between two calls.
    let short = Duration::from_secs(1);
    let long = Duration::from_secs(60);
    assert_eq!(
        store.claim("k", a, short).await,
        Ok(Claim::Acquired { expired: false })
    );
    assert_eq!(store.claim("k", b, long).await, Ok(Claim::Busy));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // a's lease ran out: b takes over (Redis cannot say it expired).
    assert_eq!(
        store.claim("k", b, long).await,
        Ok(Claim::Acquired { expired: false })
    );
    assert_eq!(store.release("k", a).await, Ok(false));
    assert_eq!(store.complete("k", a, long).await, Ok(false));
    assert_eq!(
        store.claim("k", c, long).await,
        Ok(Claim::Busy),
        "b still holds it"
    );
    assert_eq!(
        store.complete("k", b, Duration::from_secs(1)).await,
        Ok(true)
    );
    assert_eq!(store.claim("k", c, long).await, Ok(Claim::Done));
    // Done keys are neither released nor completed again.
    assert_eq!(store.release("k", b).await, Ok(false));
    assert_eq!(store.complete("k", c, long).await, Ok(false));
    // The retention ends: the key is free again.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        store.claim("k", c, long).await,
        Ok(Claim::Acquired { expired: false })
    );
    assert_eq!(store.release("k", c).await, Ok(true));
    // Completing a key nobody holds (its claim expired unseen) records it.
    assert_eq!(store.complete("other", a, long).await, Ok(true));
    assert_eq!(store.claim("other", b, long).await, Ok(Claim::Done));
    assert_eq!(delete_prefix(&prefix).await, 1);
}

#[tokio::test]
async fn bad_keys_are_typed_errors() {
    need_server!();
    let prefix = unique_prefix("keys");
    let store = store(&prefix).await;
    let t = ClaimToken::new();
    let lease = Duration::from_secs(1);
    let long = "x".repeat(MAX_KEY_LEN + 1);
    assert_eq!(
        store.claim("", t, lease).await,
        Err(IdempotencyError::EmptyKey)
    );
    assert_eq!(
        store.complete("", t, lease).await,
        Err(IdempotencyError::EmptyKey)
    );
    assert_eq!(store.release("", t).await, Err(IdempotencyError::EmptyKey));
    let too_long = IdempotencyError::KeyTooLong {
        len: MAX_KEY_LEN + 1,
        limit: MAX_KEY_LEN,
    };
    assert_eq!(store.claim(&long, t, lease).await, Err(too_long.clone()));
    assert_eq!(store.complete(&long, t, lease).await, Err(too_long.clone()));
    assert_eq!(store.release(&long, t).await, Err(too_long));
    // The longest key is fine, and so is any byte in it.
    let longest = "é".repeat(MAX_KEY_LEN / 2);
    assert_eq!(
        store.claim(&longest, t, lease).await,
        Ok(Claim::Acquired { expired: false })
    );
    assert_eq!(
        store.claim("a key\nwith * [glob] chars", t, lease).await,
        Ok(Claim::Acquired { expired: false })
    );
    assert_eq!(delete_prefix(&prefix).await, 2);
}

fn assert_unavailable(
    result: Result<RedisStore, IdempotencyError>,
    secret: Option<&str>,
) -> String {
    match result {
        Err(IdempotencyError::Unavailable {
            store: "redis",
            message,
        }) => {
            if let Some(secret) = secret {
                assert!(!message.contains(secret), "the password leaked: {message}");
            }
            message
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_or_silent_server_is_a_typed_error_within_the_timeout() {
    // Nothing listens: refused at once.
    let started = Instant::now();
    let timeout = Duration::from_secs(2);
    let refused =
        RedisStore::connect_with_timeout("redis://postbox:s3cr3t-pa55@127.0.0.1:1", timeout).await;
    let message = assert_unavailable(refused, Some("s3cr3t-pa55"));
    assert!(
        started.elapsed() < timeout + Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    eprintln!("refused: {message}");
    // Something listens and never answers: the timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let started = Instant::now();
    let timeout = Duration::from_millis(500);
    let hung =
        RedisStore::connect_with_timeout(&format!("redis://127.0.0.1:{port}"), timeout).await;
    let message = assert_unavailable(hung, None);
    assert!(
        started.elapsed() < timeout + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    eprintln!("silent: {message}");
    // Not a URL.
    assert_unavailable(RedisStore::connect("http://example.invalid").await, None);
    assert_unavailable(
        RedisStore::connect("redis://127.0.0.1:notaport").await,
        None,
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_is_a_timeout_and_the_store_recovers() {
    need_server!();
    let prefix = unique_prefix("pause");
    let timeout = Duration::from_millis(300);
    let store = RedisStore::connect_with_timeout(&url(), timeout)
        .await
        .unwrap()
        .prefix(&prefix);
    assert!(matches!(
        store
            .claim("before", ClaimToken::new(), Duration::from_secs(60))
            .await,
        Ok(Claim::Acquired { .. })
    ));
    // Writes (scripts included) wait while the server is paused.
    let mut con = raw().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("WRITE")
        .query_async(&mut con)
        .await
        .unwrap();
    let started = Instant::now();
    let paused = store
        .claim("during", ClaimToken::new(), Duration::from_secs(60))
        .await;
    let waited = started.elapsed();
    assert!(
        matches!(&paused, Err(IdempotencyError::Unavailable { store: "redis", message }) if message.contains("within")),
        "{paused:?}"
    );
    assert!(
        waited >= timeout && waited < timeout + Duration::from_secs(1),
        "{waited:?}"
    );
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut con)
        .await
        .unwrap();
    // A fresh connection answers again.
    let mut recovered = None;
    for _ in 0..20 {
        match store
            .claim("after", ClaimToken::new(), Duration::from_secs(60))
            .await
        {
            Ok(claim) => {
                recovered = Some(claim);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(recovered, Some(Claim::Acquired { expired: false }));
    delete_prefix(&prefix).await;
}

#[tokio::test]
async fn credentials_never_show_in_debug_output_or_errors() {
    need_server!();
    let base = url();
    let Some(rest) = base.strip_prefix("redis://").filter(|r| !r.contains('@')) else {
        eprintln!("REDIS_URL has credentials of its own: skipped");
        return;
    };
    let user = format!("postbox-test-{}", uuid::Uuid::new_v4().simple());
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let prefix = unique_prefix("acl");
    let mut con = raw().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg(format!("~{prefix}*"))
        .arg("+@all")
        .query_async(&mut con)
        .await
        .unwrap();
    let with_password = format!("redis://{user}:{password}@{rest}");
    let store = RedisStore::connect(&with_password)
        .await
        .unwrap()
        .prefix(&prefix);
    let shown = format!("{store:?}");
    assert!(!shown.contains(&password), "{shown}");
    assert!(shown.contains("RedisStore"), "{shown}");
    assert_eq!(
        store
            .claim("k", ClaimToken::new(), Duration::from_secs(5))
            .await,
        Ok(Claim::Acquired { expired: false })
    );
    // A key outside what the user may touch: a server error, without the
    // password.
    let outside = store.clone().prefix("elsewhere:");
    match outside
        .claim("k", ClaimToken::new(), Duration::from_secs(5))
        .await
    {
        Err(IdempotencyError::Unavailable {
            store: "redis",
            message,
        }) => {
            assert!(!message.contains(&password), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A wrong password: refused, not shown.
    let wrong = RedisStore::connect(&format!("redis://{user}:wrong-{password}@{rest}")).await;
    assert_unavailable(wrong, Some(&password));
    let _: usize = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut con)
        .await
        .unwrap();
    delete_prefix(&prefix).await;
}
