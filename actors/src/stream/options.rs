//! What a stream is declared with ([`StreamOptions`], [`StreamOverflow`]), where
//! a subscriber starts reading ([`StreamStart`]), and how a subscriber runs
//! ([`SubscribeOptions`]).
//!
//! Redeclaring a stream with equal options is a no-op; with different options it
//! is [`StreamError::Mismatch`](crate::stream::StreamError::Mismatch), as for
//! queues.

use std::time::Duration;

use postbox::Backoff;
use serde::{Deserialize, Serialize};

use crate::supervision::Supervision;

/// What happens when retention would trim a record that a live subscriber has
/// not read yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StreamOverflow {
    /// Backpressure: the publisher waits until the slowest live subscriber has
    /// moved past the record that must go ([`try_publish`] fails with `Full`
    /// and hands the message back). Nothing a live subscriber has not read is
    /// ever trimmed, by length, bytes or age.
    ///
    /// [`try_publish`]: crate::stream::StreamHandle::try_publish
    #[default]
    Block,
    /// Kafka's way: trim anyway. A subscriber that fell behind skips to the
    /// oldest retained record; the first delivery after the gap says how many
    /// it missed ([`StreamDelivery::skipped`]), and its stats count them.
    ///
    /// [`StreamDelivery::skipped`]: crate::stream::StreamDelivery::skipped
    DropOldest,
}

/// How a stream is declared.
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::{StreamOptions, StreamOverflow};
/// let events = StreamOptions::default()
///     .max_len(100_000)
///     .max_bytes(64 << 20)
///     .max_age(Duration::from_secs(3600))
///     .overflow(StreamOverflow::DropOldest);
/// assert_eq!(events.max_len, Some(100_000));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StreamOptions {
    /// Most records retained (at least 1); `None`: no limit by count.
    pub max_len: Option<usize>,
    /// Most payload bytes retained (at least 1); `None`: no limit by size. A
    /// message larger than this is refused as too large.
    pub max_bytes: Option<usize>,
    /// Records older than this (since they were appended, on
    /// [`postbox::clock`]) are trimmed; `None`: kept regardless of age.
    pub max_age: Option<Duration>,
    /// What retention does to records a live subscriber has not read.
    pub overflow: StreamOverflow,
    /// Largest message accepted, in bytes, payload, headers and properties
    /// counted; `None` uses the broker's limit
    /// ([`BrokerConfig::max_message_bytes`](crate::BrokerConfig)).
    pub max_message_bytes: Option<usize>,
    /// Survives a restart, with its records and its named subscribers'
    /// positions, on a broker opened on a data directory
    /// ([`Broker::open`](crate::Broker::open)): records are appended to the
    /// stream's own segmented log on disk, and
    /// [`publish`](crate::StreamHandle::publish) returns once its record is
    /// stored (per the [`SyncPolicy`](crate::SyncPolicy)). On an in-memory
    /// broker it is accepted and changes nothing.
    #[serde(default)]
    pub durable: bool,
    /// A publisher duplicate window: a message whose id was appended within
    /// the window is not appended again, and the publish fails with
    /// [`StreamError::Duplicate`](crate::StreamError::Duplicate), which
    /// names the original's offset (see [`DedupWindow`](crate::DedupWindow)).
    /// A durable stream rebuilds its window from the records it retains
    /// when the broker reopens, as JetStream does: an id whose record
    /// retention has trimmed is forgotten then.
    #[serde(default)]
    pub dedup: Option<crate::dedup::DedupWindow>,
}

impl Default for StreamOptions {
    /// 1024 records, no byte or age limit, [`StreamOverflow::Block`], not
    /// durable.
    fn default() -> Self {
        StreamOptions {
            max_len: Some(1024),
            max_bytes: None,
            max_age: None,
            overflow: StreamOverflow::Block,
            max_message_bytes: None,
            durable: false,
            dedup: None,
        }
    }
}

impl StreamOptions {
    /// No retention limit: records are never trimmed, and memory grows with
    /// every publish. Add limits with the setters.
    pub fn unbounded() -> Self {
        StreamOptions {
            max_len: None,
            ..StreamOptions::default()
        }
    }

    /// Sets [`max_len`](Self::max_len) (at least 1).
    pub fn max_len(mut self, records: usize) -> Self {
        self.max_len = Some(records.max(1));
        self
    }

    /// Sets [`max_bytes`](Self::max_bytes) (at least 1).
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = Some(bytes.max(1));
        self
    }

    /// Sets [`max_age`](Self::max_age).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Sets [`overflow`](Self::overflow).
    pub fn overflow(mut self, overflow: StreamOverflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// Sets [`max_message_bytes`](Self::max_message_bytes).
    pub fn max_message_bytes(mut self, limit: usize) -> Self {
        self.max_message_bytes = Some(limit);
        self
    }

    /// Makes the stream [`durable`](Self::durable).
    ///
    /// ```
    /// use postbox_actors::StreamOptions;
    /// let audit = StreamOptions::default().max_len(1_000_000).durable();
    /// assert!(audit.durable);
    /// ```
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// Sets [`dedup`](Self::dedup).
    pub fn dedup(mut self, window: crate::dedup::DedupWindow) -> Self {
        self.dedup = Some(window);
        self
    }
}

/// Where a new subscriber starts reading. Positions outside the retained
/// records are clamped to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StreamStart {
    /// The oldest retained record.
    First,
    /// The newest record (or the next one, if the stream is empty).
    Last,
    /// Only records appended from now on (on a durable stream, also those
    /// appended earlier whose publishers still wait for the disk: they are
    /// not readable yet).
    #[default]
    Next,
    /// This offset, clamped to `[oldest retained, next]`.
    Offset(u64),
    /// The first record appended at or after this epoch-millisecond time (on
    /// [`postbox::clock`]); the next one if there is none yet.
    Timestamp(u64),
}

/// How a subscriber receives and is supervised.
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::SubscribeOptions;
/// let options = SubscribeOptions::default()
///     .batch(128)
///     .restarts(10, Duration::from_secs(60))
///     .named("billing");
/// # let _ = options;
/// ```
#[derive(Clone, Debug)]
pub struct SubscribeOptions {
    pub(crate) mailbox: usize,
    pub(crate) batch: usize,
    pub(crate) supervision: Supervision,
    pub(crate) name: Option<String>,
}

impl Default for SubscribeOptions {
    /// Batches of 64, mailbox of 16, 5 restarts in 10 s, backoff 10 ms to 1 s,
    /// anonymous.
    fn default() -> Self {
        SubscribeOptions {
            mailbox: 16,
            batch: 64,
            supervision: Supervision::default(),
            name: None,
        }
    }
}

impl SubscribeOptions {
    /// The subscriber actor's mailbox capacity (at least 4). It only ever holds
    /// wake-ups (at most two or three) and control messages: records are read
    /// from the log. On RabbitMQ it holds records, one per slot, as they
    /// come from the channel.
    pub fn mailbox(mut self, capacity: usize) -> Self {
        self.mailbox = capacity.max(4);
        self
    }

    /// Most records read from the log per lock, and handled per mailbox
    /// message (at least 1). On RabbitMQ, the channel's prefetch
    /// (`basic.qos`): records delivered and not yet in the mailbox.
    pub fn batch(mut self, records: usize) -> Self {
        self.batch = records.max(1);
        self
    }

    /// At most `max` restarts within `window`; past that the subscriber stays
    /// down and its position is released.
    pub fn restarts(mut self, max: usize, window: Duration) -> Self {
        self.supervision.max_restarts = max;
        self.supervision.window = window;
        self
    }

    /// Delay between restarts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.supervision.backoff = backoff;
        self
    }

    /// A named subscriber: the stream stores its position when it stops, and a
    /// later subscriber with the same name resumes there (as RabbitMQ's
    /// offset tracking does), whatever [`StreamStart`] it asks for. At most
    /// one live subscriber per name. On RabbitMQ the position is stored by
    /// this process, for its later subscribers.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}
