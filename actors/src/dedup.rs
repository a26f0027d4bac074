//! Publisher-side duplicate windows, as JetStream's `Nats-Msg-Id` with
//! `duplicate_window`: a queue, an exchange or a stream that has one
//! remembers the ids of the messages published to it for a while, and a
//! second publish of an id it remembers is not enqueued. The publisher is
//! told (`BrokerError::Duplicate`, `StreamError::Duplicate`) and of which
//! original ([`Duplicate`]).
//!
//! The key is the message id ([`Envelope::id`](crate::Envelope::id)): a
//! producer that retries a publish sends the same envelope, or derives the
//! id from its business key with [`MessageId::for_key`](crate::MessageId::for_key).
//!
//! A window is bounded twice: by time (ids older than the window are
//! forgotten) and by count (past `max_ids`, the oldest are forgotten first),
//! so its memory is bounded whatever the traffic: about 60 bytes per id.
//!
//! ```
//! use std::time::Duration;
//! use postbox_actors::{Broker, BrokerError, DedupWindow, Envelope, MessageId, QueueOptions};
//! # postbox::testkit::run(async {
//! # let broker = Broker::new(&postbox::RuntimeHandle::local());
//! let window = DedupWindow::new(Duration::from_secs(120)).max_ids(100_000);
//! let orders = broker.declare_queue("orders", QueueOptions::default().dedup(window)).await?;
//! let order = Envelope::new("order 42").with_id(MessageId::for_key("order-42"));
//! orders.publish(order.clone()).await?;
//! // A retry of the same publish: not enqueued, and said so.
//! match orders.publish(order).await {
//!     Err(BrokerError::Duplicate(dup)) => assert_eq!(dup.id, MessageId::for_key("order-42")),
//!     other => panic!("{other:?}"),
//! }
//! assert_eq!(orders.snapshot().await?.stats.ready, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::envelope::MessageId;
use crate::store::Confirm;
use crate::store::keylog::KeyLog;

/// A duplicate window's bounds: how long ids are remembered, and how many at
/// most.
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::DedupWindow;
/// let w = DedupWindow::new(Duration::from_secs(60)).max_ids(10_000);
/// assert_eq!(w.window(), Duration::from_secs(60));
/// assert_eq!(w.max_ids_limit(), 10_000);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DedupWindow {
    window_ms: u64,
    max_ids: usize,
}

impl DedupWindow {
    /// The default count bound: 250,000 ids (about 15 MB).
    pub const DEFAULT_MAX_IDS: usize = 250_000;

    /// Remembers ids for `window` (at least 1 ms), at most
    /// [`DEFAULT_MAX_IDS`](Self::DEFAULT_MAX_IDS) of them.
    pub fn new(window: Duration) -> Self {
        DedupWindow {
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1),
            max_ids: Self::DEFAULT_MAX_IDS,
        }
    }

    /// Remembers at most `max_ids` ids (at least 1): past that, the oldest
    /// are forgotten before their time.
    pub fn max_ids(mut self, max_ids: usize) -> Self {
        self.max_ids = max_ids.max(1);
        self
    }

    /// How long an id is remembered.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// How many ids are remembered at most.
    pub fn max_ids_limit(&self) -> usize {
        self.max_ids
    }
}

/// Whose duplicate window refused a publish.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DedupTarget {
    /// A queue, by name.
    Queue(String),
    /// An exchange, by name.
    Exchange(String),
    /// A stream, by name.
    Stream(String),
}

/// A publish refused because its message id was published to the same
/// target within the target's [`DedupWindow`]: nothing was enqueued. A
/// producer retrying a publish can count this as success.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Duplicate {
    /// The message id.
    pub id: MessageId,
    /// The queue, exchange or stream whose window knew it.
    pub target: DedupTarget,
    /// When the original was accepted ([`postbox::clock`] epoch ms).
    pub first_published_ms: u64,
    /// Which original: for a stream its offset; for a queue or an exchange
    /// its rank among the messages the window accepted (from 0; the window
    /// of a durable queue counts again from 0 after a restart).
    pub original: u64,
}

impl std::fmt::Display for Duplicate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, name) = match &self.target {
            DedupTarget::Queue(n) => ("queue", n),
            DedupTarget::Exchange(n) => ("exchange", n),
            DedupTarget::Stream(n) => ("stream", n),
        };
        write!(
            f,
            "message {} is a duplicate: {kind} {name:?} accepted it at {} (#{})",
            self.id, self.first_published_ms, self.original
        )
    }
}

/// What a window has done (in [`QueueStats`](crate::QueueStats),
/// [`StreamStats`](crate::StreamStats), and
/// [`Broker::exchange_dedup_stats`](crate::Broker::exchange_dedup_stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DedupStats {
    /// Ids remembered now.
    pub ids: usize,
    /// Publishes refused as duplicates.
    pub duplicates: u64,
}

/// When and as what an id was accepted.
#[derive(Clone, Copy, Debug)]
struct Seen {
    at: u64,
    original: u64,
}

/// A window's ids, oldest first. Not synchronized: its owner locks it.
#[derive(Debug)]
pub(crate) struct Window {
    config: DedupWindow,
    target: DedupTarget,
    ids: FxHashMap<u128, Seen>,
    /// Ids in the order accepted, with their time; an id forgotten early
    /// (see [`forget`](Self::forget)) leaves a stale entry here, skipped.
    order: VecDeque<(u128, u64)>,
    next: u64,
    duplicates: u64,
}

impl Window {
    pub(crate) fn new(config: DedupWindow, target: DedupTarget) -> Self {
        Window {
            config,
            target,
            ids: FxHashMap::default(),
            order: VecDeque::new(),
            next: 0,
            duplicates: 0,
        }
    }

    /// Accepts `id` at `now` (as `original`, or the window's next rank), or
    /// refuses it as a duplicate of the one it remembers.
    pub(crate) fn admit(
        &mut self,
        id: MessageId,
        now: u64,
        original: Option<u64>,
    ) -> Result<(), Box<Duplicate>> {
        self.expire(now);
        let key = id.0.as_u128();
        if let Some(seen) = self.ids.get(&key) {
            self.duplicates += 1;
            return Err(Box::new(Duplicate {
                id,
                target: self.target.clone(),
                first_published_ms: seen.at,
                original: seen.original,
            }));
        }
        let original = original.unwrap_or(self.next);
        self.next = self.next.max(original + 1);
        self.remember(key, now, original);
        Ok(())
    }

    /// Remembers `id` as accepted at `at` (recovery), unless it is expired.
    pub(crate) fn restore(&mut self, id: MessageId, at: u64, original: u64, now: u64) {
        if at.saturating_add(self.config.window_ms) > now {
            self.remember(id.0.as_u128(), at, original);
            self.next = self.next.max(original + 1);
        }
    }

    fn remember(&mut self, key: u128, at: u64, original: u64) {
        self.ids.insert(key, Seen { at, original });
        self.order.push_back((key, at));
        while self.ids.len() > self.config.max_ids {
            self.pop_oldest();
        }
    }

    /// Forgets `id`: its publish failed after all (the target refused it or
    /// is gone), so a retry must be accepted.
    pub(crate) fn forget(&mut self, id: MessageId) {
        self.ids.remove(&id.0.as_u128());
    }

    /// Forgets ids older than the window.
    pub(crate) fn expire(&mut self, now: u64) {
        let horizon = now.saturating_sub(self.config.window_ms);
        while self.order.front().is_some_and(|&(_, at)| at <= horizon) {
            self.pop_oldest();
        }
        // Stale entries (forgotten ids) pile up only with failed publishes.
        if self.order.len() > 2 * self.ids.len() + 64 {
            let ids = &self.ids;
            self.order
                .retain(|(k, at)| ids.get(k).is_some_and(|s| s.at == *at));
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((key, at)) = self.order.pop_front()
            && self.ids.get(&key).is_some_and(|s| s.at == at)
        {
            self.ids.remove(&key);
        }
    }

    pub(crate) fn stats(&self) -> DedupStats {
        DedupStats {
            ids: self.ids.len(),
            duplicates: self.duplicates,
        }
    }
}

/// A window shared by the publishers of one queue or exchange; a durable
/// queue's keeps the ids of its persistent messages in a key log.
#[derive(Debug)]
pub(crate) struct SharedWindow {
    window: parking_lot::Mutex<Window>,
    log: Option<KeyLog>,
}

impl SharedWindow {
    pub(crate) fn new(config: DedupWindow, target: DedupTarget) -> Self {
        SharedWindow {
            window: parking_lot::Mutex::new(Window::new(config, target)),
            log: None,
        }
    }

    /// A durable queue's window, kept in the key log at `path` and loaded
    /// from it. A log that cannot be opened leaves the window in memory
    /// only, with an `error!` event.
    pub(crate) fn durable(
        config: DedupWindow,
        target: DedupTarget,
        path: &Path,
        sync: bool,
    ) -> Self {
        let mut window = Window::new(config, target);
        let log = match KeyLog::open(path, config.window_ms, sync) {
            Ok((log, live)) => {
                let now = postbox::clock::now_ms();
                for (key, at) in live {
                    if let Ok(uuid) = uuid::Uuid::from_slice(&key) {
                        let original = window.next;
                        window.restore(MessageId(uuid), at, original, now);
                    }
                }
                Some(log)
            }
            Err(err) => {
                tracing::error!(path = %path.display(), %err, "a durable queue's duplicate window could not be opened: it is kept in memory only");
                None
            }
        };
        SharedWindow {
            window: parking_lot::Mutex::new(window),
            log,
        }
    }

    /// Accepts `id` now, or refuses it as a duplicate.
    pub(crate) fn admit(&self, id: MessageId) -> Result<(), Box<Duplicate>> {
        self.admit_at(id).map(|_| ())
    }

    fn admit_at(&self, id: MessageId) -> Result<u64, Box<Duplicate>> {
        let now = postbox::clock::now_ms();
        self.window.lock().admit(id, now, None).map(|()| now)
    }

    /// Accepts `id` now, or refuses it; for a persistent message of a
    /// durable queue, also writes it to the window's log and returns the
    /// confirmation to wait for with the message's own.
    pub(crate) fn admit_persistent(
        &self,
        id: MessageId,
    ) -> Result<Option<Confirm>, Box<Duplicate>> {
        let at = self.admit_at(id)?;
        Ok(self.log.as_ref().map(|log| log.append(id.0.as_bytes(), at)))
    }

    /// Forgets `id`, whose publish failed.
    pub(crate) fn forget(&self, id: MessageId) {
        self.window.lock().forget(id);
    }

    pub(crate) fn stats(&self) -> DedupStats {
        let mut window = self.window.lock();
        window.expire(postbox::clock::now_ms());
        window.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(ms: u64, max: usize) -> Window {
        Window::new(
            DedupWindow::new(Duration::from_millis(ms)).max_ids(max),
            DedupTarget::Queue("q".into()),
        )
    }

    #[test]
    fn duplicates_inside_the_window_refused_outside_accepted() {
        let mut w = window(1000, 100);
        let a = MessageId::new();
        assert!(w.admit(a, 10_000, None).is_ok());
        let dup = w.admit(a, 10_999, None).unwrap_err();
        assert_eq!((dup.first_published_ms, dup.original), (10_000, 0));
        assert!(w.admit(a, 11_000, None).is_ok(), "the window has passed");
        assert_eq!(
            w.stats(),
            DedupStats {
                ids: 1,
                duplicates: 1
            }
        );
    }

    #[test]
    fn a_million_distinct_ids_stay_within_the_count_bound() {
        let mut w = window(u64::MAX / 4, 10_000);
        let ids: Vec<MessageId> = (0..1_000_000).map(|_| MessageId::new()).collect();
        for (i, id) in ids.iter().enumerate() {
            assert!(w.admit(*id, 1_000 + i as u64 / 1000, None).is_ok());
            assert!(w.ids.len() <= 10_000);
        }
        assert!(w.order.len() <= 2 * 10_000 + 64);
        // The newest are remembered, the oldest forgotten.
        assert!(w.admit(ids[999_999], 5_000, None).is_err());
        assert!(w.admit(ids[0], 5_000, None).is_ok());
    }

    #[test]
    fn forgotten_ids_are_accepted_again() {
        let mut w = window(1000, 10);
        let a = MessageId::new();
        w.admit(a, 1, None).unwrap();
        w.forget(a);
        assert!(w.admit(a, 2, None).is_ok());
        for _ in 0..1000 {
            let b = MessageId::new();
            w.admit(b, 3, None).unwrap();
            w.forget(b);
        }
        assert!(w.order.len() <= 2 * w.ids.len() + 64 + 1);
    }
}
