//! [`Idempotent`]: the consumer layer that claims a delivery's key before its
//! handler runs (see the [module docs](super)).

use std::sync::Arc;
use std::time::Duration;

use postbox::Failure;

use crate::consumer::{Consumer, Layer};
use crate::idempotency::{
    Claim, ClaimToken, Counters, IdempotencyError, IdempotencyStats, IdempotencyStore, validate_key,
};
use crate::queue::ack::AckMode;
use crate::queue::delivery::{AckError, Delivery, Outcome, Settler};

/// Extracts a business key from a delivery (`None`: it has none).
pub type KeyFn = Arc<dyn Fn(&Delivery) -> Option<String> + Send + Sync>;

/// How many times recording a key done is tried before the delivery is left
/// to the error policy (a store's brief hiccup should not rerun a handler).
const COMPLETE_ATTEMPTS: u32 = 3;

/// The idempotency layer: claims each delivery's key in a store before the
/// handler runs, records it done and acks after the handler succeeded, acks
/// duplicates without running the handler. See the [module docs](super).
///
/// Use it with manual acknowledgements and let the layer ack: it acks only
/// once the key is recorded, so that a crash in between is a redelivery that
/// finds the key done. (In auto-ack mode duplicates are still skipped, but a
/// delivery whose key another consumer holds cannot be requeued, and is
/// dropped with a warning.)
///
/// One layer value counts for every consumer built with it: see
/// [`stats`](Self::stats).
pub struct Idempotent<S> {
    store: Arc<S>,
    key: Option<KeyFn>,
    namespace: Option<Arc<str>>,
    lease: Duration,
    retain: Duration,
    busy_delay: Duration,
    counters: Arc<Counters>,
}

impl<S> Clone for Idempotent<S> {
    fn clone(&self) -> Self {
        Idempotent {
            store: self.store.clone(),
            key: self.key.clone(),
            namespace: self.namespace.clone(),
            lease: self.lease,
            retain: self.retain,
            busy_delay: self.busy_delay,
            counters: self.counters.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Idempotent<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotent")
            .field("store", &std::any::type_name::<S>())
            .field(
                "key",
                &if self.key.is_some() {
                    "custom"
                } else {
                    "message id"
                },
            )
            .field("namespace", &self.namespace)
            .field("lease", &self.lease)
            .field("retain", &self.retain)
            .finish()
    }
}

impl<S: IdempotencyStore> Idempotent<S> {
    /// Keyed by the message id ([`Envelope::id`](crate::Envelope::id)): a
    /// producer's retry of the same message, or a redelivery, is a duplicate.
    pub fn by_message_id(store: S) -> Self {
        Self::with(store, None)
    }

    /// Keyed by a business key that `key` extracts (an order id): two
    /// messages about the same order are duplicates, whatever their ids. A
    /// delivery without a key fails with [`IdempotencyError::NoKey`] (settled
    /// by the consumer's error policy).
    pub fn by_key(
        store: S,
        key: impl Fn(&Delivery) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self::with(store, Some(Arc::new(key)))
    }

    fn with(store: S, key: Option<KeyFn>) -> Self {
        Idempotent {
            store: Arc::new(store),
            key,
            namespace: None,
            lease: Duration::from_secs(60),
            retain: Duration::from_secs(24 * 3600),
            busy_delay: Duration::from_millis(100),
            counters: Arc::default(),
        }
    }

    /// Keys are stored as `namespace:key`. By default the namespace is the
    /// queue's name: the consumers of one queue share their keys, and
    /// another queue's consumers (another service receiving the same event)
    /// handle it on their own. Name it to share keys across queues.
    pub fn namespace(mut self, namespace: impl Into<Arc<str>>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// How long a claim holds without being completed or released (default
    /// 60 s): a claimant that died loses its claim after this, and a handler
    /// that runs longer may see its key claimed again.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(1));
        self
    }

    /// How long a done key is remembered (default 24 h).
    pub fn retain(mut self, retain: Duration) -> Self {
        self.retain = retain.max(Duration::from_millis(1));
        self
    }

    /// How long a delivery whose key another consumer holds waits in its
    /// queue before it is seen again (default 100 ms).
    pub fn busy_retry(mut self, delay: Duration) -> Self {
        self.busy_delay = delay;
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// What the consumers wrapped by this layer (and its clones) have done.
    pub fn stats(&self) -> IdempotencyStats {
        self.counters.snapshot()
    }

    fn key_of(&self, delivery: &Delivery) -> Result<String, IdempotencyError> {
        stored_key(self.key.as_ref(), self.namespace.as_deref(), delivery)
    }
}

impl<C: Consumer, S: IdempotencyStore> Layer<C> for Idempotent<S> {
    type Consumer = IdempotentConsumer<C, S>;

    fn layer(&self, inner: C) -> IdempotentConsumer<C, S> {
        IdempotentConsumer {
            inner,
            config: self.clone(),
        }
    }
}

/// A consumer wrapped by [`Idempotent`].
#[derive(Debug)]
pub struct IdempotentConsumer<C, S> {
    inner: C,
    config: Idempotent<S>,
}

impl<C: Consumer, S: IdempotencyStore> Consumer for IdempotentConsumer<C, S> {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let config = &self.config;
        let counters = &config.counters;
        let key = config.key_of(&delivery)?;
        let token = ClaimToken::new();
        let manual = delivery.ack_mode() == AckMode::Manual;
        match config.store.claim(&key, token, config.lease).await {
            Err(err) => {
                Counters::add(&counters.store_errors);
                tracing::warn!(%key, %err, "idempotency claim failed");
                return Err(Failure::from(err));
            }
            Ok(Claim::Done) => {
                Counters::add(&counters.skipped);
                tracing::debug!(%key, message_id = %delivery.id(), "duplicate skipped");
                if manual {
                    settle(&delivery.settler(), Outcome::Ack).await?;
                }
                return Ok(());
            }
            Ok(Claim::Busy) => {
                Counters::add(&counters.busy);
                tracing::debug!(%key, message_id = %delivery.id(), "key busy: requeued");
                if manual {
                    settle(
                        &delivery.settler(),
                        Outcome::RequeueAfter(config.busy_delay),
                    )
                    .await?;
                } else {
                    tracing::warn!(%key, "auto-ack delivery whose key is busy: dropped");
                }
                return Ok(());
            }
            Ok(Claim::Acquired { expired }) => {
                Counters::add(&counters.claimed);
                if expired {
                    Counters::add(&counters.expired);
                    tracing::info!(%key, "took over an expired claim");
                }
            }
        }
        let settler = manual.then(|| delivery.settler());
        // Released if the handler panics (the consumer crashes): this future
        // is dropped mid-way.
        let mut claim = Held {
            store: &config.store,
            key: Some(key),
            token,
            counters,
        };
        match self.inner.handle(delivery).await {
            Ok(()) => {
                let Some(key) = claim.key.take() else {
                    return Ok(());
                };
                complete(config, &key, token).await?;
                if let Some(settler) = settler {
                    settle(&settler, Outcome::Ack).await?;
                }
                Ok(())
            }
            Err(failure) => {
                claim.release().await;
                Err(failure)
            }
        }
    }

    async fn cancelled(&mut self) {
        self.inner.cancelled().await
    }
}

/// The stored key of a delivery: `namespace:key` (the namespace defaults to
/// the queue's name), the key extracted by `key` or the message id. Built in
/// one allocation: this is on every delivery's path. Shared with the
/// transactional inbox, so that both agree on one key.
pub(crate) fn stored_key(
    key: Option<&KeyFn>,
    namespace: Option<&str>,
    delivery: &Delivery,
) -> Result<String, IdempotencyError> {
    let namespace = namespace.unwrap_or(delivery.queue());
    let mut id_buf = uuid::Uuid::encode_buffer();
    let key: std::borrow::Cow<'_, str> = match key {
        Some(extract) => {
            let key = extract(delivery)
                .ok_or_else(|| IdempotencyError::NoKey(format!("message {}", delivery.id())))?;
            validate_key(&key)?;
            key.into()
        }
        None => (&*delivery.id().0.hyphenated().encode_lower(&mut id_buf)).into(),
    };
    let mut full = String::with_capacity(namespace.len() + 1 + key.len());
    full.push_str(namespace);
    full.push(':');
    full.push_str(&key);
    validate_key(&full)?;
    Ok(full)
}

/// Records `key` done, trying a few times: a handler that succeeded should
/// not run again for a store's brief failure.
async fn complete<S: IdempotencyStore>(
    config: &Idempotent<S>,
    key: &str,
    token: ClaimToken,
) -> Result<(), Failure> {
    let mut attempt = 1;
    loop {
        match config.store.complete(key, token, config.retain).await {
            Ok(ours) => {
                Counters::add(&config.counters.completed);
                if !ours {
                    tracing::warn!(
                        %key,
                        lease = ?config.lease,
                        "the handler outlived its claim's lease: another claimant may have run it too"
                    );
                }
                return Ok(());
            }
            Err(err) if attempt < COMPLETE_ATTEMPTS => {
                tracing::warn!(%key, %err, attempt, "recording the key done failed: retrying");
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                attempt += 1;
            }
            Err(err) => {
                // The claim stays (until its lease ends): a redelivery waits
                // for it rather than rerunning the handler at once.
                Counters::add(&config.counters.store_errors);
                tracing::error!(%key, %err, "the handler succeeded but its key could not be recorded done");
                return Err(Failure::from(err));
            }
        }
    }
}

/// Settles a delivery the layer decided on, unless its handler settled it
/// already or its registration ended (the queue requeued it).
pub(crate) async fn settle(settler: &Settler, outcome: Outcome) -> Result<(), AckError> {
    match settler.settle(outcome, false).await {
        Ok(_) | Err(AckError::AlreadySettled { .. } | AckError::ConsumerGone { .. }) => Ok(()),
        Err(err) => Err(err),
    }
}

/// A claim held while the handler runs: released when dropped unreleased
/// (the handler panicked), from a task of its own.
struct Held<'a, S: IdempotencyStore> {
    store: &'a Arc<S>,
    key: Option<String>,
    token: ClaimToken,
    counters: &'a Arc<Counters>,
}

impl<S: IdempotencyStore> Held<'_, S> {
    async fn release(&mut self) {
        if let Some(key) = self.key.take() {
            release(self.store, &key, self.token, self.counters).await;
        }
    }
}

async fn release<S: IdempotencyStore>(
    store: &S,
    key: &str,
    token: ClaimToken,
    counters: &Counters,
) {
    match store.release(key, token).await {
        Ok(true) => Counters::add(&counters.released),
        Ok(false) => {}
        Err(err) => {
            // It expires with its lease instead.
            Counters::add(&counters.store_errors);
            tracing::warn!(%key, %err, "releasing a claim failed: it will expire");
        }
    }
}

impl<S: IdempotencyStore> Drop for Held<'_, S> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(%key, "no runtime to release a claim: it will expire");
            return;
        };
        let (store, token, counters) = (self.store.clone(), self.token, self.counters.clone());
        runtime.spawn(async move {
            release(&*store, &key, token, &counters).await;
        });
    }
}
