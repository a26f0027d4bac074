//! The message envelope: a payload plus the metadata that routing, queues and consumers need.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::{Codec, CodecError, Json};

/// A message's unique id.
///
/// [`MessageId::new`] makes a version 7 UUID: ids created later sort later, which keeps indexes
/// keyed by id append-mostly. A publisher may also supply its own id (for deduplication)
/// through [`Envelope::with_id`].
///
/// ```
/// use postbox_actors::MessageId;
///
/// let a = MessageId::new();
/// let b = MessageId::new();
/// assert_ne!(a, b);
/// assert_eq!(a.to_string().len(), 36); // hyphenated UUID
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub Uuid);

impl MessageId {
    /// A fresh, time-ordered (version 7) UUID.
    #[must_use]
    pub fn new() -> Self {
        Self::at(now_ms())
    }

    /// The id of a business key: the same key always gives the same id (a
    /// version 5 UUID in postbox's namespace), so a producer that publishes
    /// "order 42" again, after a crash or a lost confirm, publishes the same
    /// id, and duplicate windows and idempotent consumers recognize it.
    ///
    /// ```
    /// use postbox_actors::MessageId;
    /// assert_eq!(MessageId::for_key("order-42"), MessageId::for_key("order-42"));
    /// assert_ne!(MessageId::for_key("order-42"), MessageId::for_key("order-43"));
    /// ```
    #[must_use]
    pub fn for_key(key: &str) -> Self {
        /// postbox's UUID namespace for business keys (fixed forever: ids
        /// derived from keys must not change between releases).
        const NAMESPACE: Uuid = Uuid::from_u128(0x8f0d_6c2e_5b1a_4e77_9a43_1c2d_7e5f_b0a9);
        MessageId(Uuid::new_v5(&NAMESPACE, key.as_bytes()))
    }

    /// A fresh version 7 UUID for the epoch-millisecond time `ms`.
    ///
    /// Ids made on one thread are strictly increasing: within a millisecond a
    /// 42-bit counter, started at a random value, orders them (RFC 9562,
    /// method 1), and an id's time is never earlier than the previous one's on
    /// that thread. Across threads they are ordered to the millisecond. The
    /// remaining 32 bits come from a fast per-thread generator: ids are unique,
    /// not secret (do not use them as capabilities).
    ///
    /// ```
    /// use postbox_actors::MessageId;
    ///
    /// let a = MessageId::at(1_700_000_000_000);
    /// let b = MessageId::at(1_700_000_000_000);
    /// assert!(a < b);
    /// assert_eq!(a.as_uuid().get_version_num(), 7);
    /// ```
    #[must_use]
    pub fn at(ms: u64) -> Self {
        thread_local! {
            /// The millisecond and counter of this thread's last id.
            static LAST: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
        }
        // A new millisecond starts the counter at a random value below half its
        // range, leaving at least 2^41 increments.
        let fresh = || fastrand::u64(..) >> (64 - ID_COUNTER_BITS + 1);
        let (ms, counter) = LAST.with(|last| {
            let next = next_id_time(last.get(), ms, fresh);
            last.set(next);
            next
        });
        // The builder sets the version over the top 4 bits of the first two
        // bytes and the variant over the top 2 bits of the third.
        let mut bytes = [0u8; 10];
        bytes[..2].copy_from_slice(&((counter >> 30) as u16 & 0x0fff).to_be_bytes());
        bytes[2..6].copy_from_slice(&((counter & 0x3fff_ffff) as u32).to_be_bytes());
        bytes[6..].copy_from_slice(&fastrand::u32(..).to_be_bytes());
        Self(uuid::Builder::from_unix_timestamp_millis(ms, &bytes).into_uuid())
    }

    /// The underlying UUID.
    #[must_use]
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

/// Bits of the per-millisecond counter in a [`MessageId`].
const ID_COUNTER_BITS: u32 = 42;

/// The (millisecond, counter) of the next id, after `last`, for the time `ms`.
fn next_id_time(last: (u64, u64), ms: u64, fresh: impl FnOnce() -> u64) -> (u64, u64) {
    let (last_ms, last_counter) = last;
    if ms > last_ms {
        (ms, fresh())
    } else if last_counter + 1 < 1 << ID_COUNTER_BITS {
        // Same millisecond, or a clock behind this thread's last id.
        (last_ms, last_counter + 1)
    } else {
        (last_ms + 1, fresh())
    }
}

impl Default for MessageId {
    /// Same as [`MessageId::new`]: a fresh id, never the nil UUID.
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for MessageId {
    fn from(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The value of a message header.
///
/// ```
/// use postbox_actors::HeaderValue;
///
/// assert_eq!(HeaderValue::from("eu-west"), HeaderValue::Str("eu-west".into()));
/// assert_eq!(HeaderValue::from(3_i64).as_int(), Some(3));
/// assert_eq!(HeaderValue::from(true).as_str(), None);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum HeaderValue {
    /// A UTF-8 string.
    Str(ByteString),
    /// A signed integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// Raw bytes.
    Bytes(Bytes),
    /// A floating-point number.
    Float(f64),
    /// No value (AMQP's void). In a headers-exchange binding: "present, with
    /// any value".
    Void,
}

impl HeaderValue {
    /// The string, if this is a [`HeaderValue::Str`].
    #[must_use]
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is a [`HeaderValue::Int`].
    #[must_use]
    pub const fn as_int(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The boolean, if this is a [`HeaderValue::Bool`].
    #[must_use]
    pub const fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The bytes, if this is a [`HeaderValue::Bytes`].
    #[must_use]
    pub const fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Self::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The number, if this is a [`HeaderValue::Float`].
    #[must_use]
    pub const fn as_float(&self) -> Option<f64> {
        match self {
            Self::Float(f) => Some(*f),
            _ => None,
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(value: &str) -> Self {
        Self::Str(value.into())
    }
}

impl From<String> for HeaderValue {
    fn from(value: String) -> Self {
        Self::Str(value.into())
    }
}

impl From<ByteString> for HeaderValue {
    fn from(value: ByteString) -> Self {
        Self::Str(value)
    }
}

impl From<i64> for HeaderValue {
    fn from(value: i64) -> Self {
        Self::Int(value)
    }
}

impl From<bool> for HeaderValue {
    fn from(value: bool) -> Self {
        Self::Bool(value)
    }
}

impl From<Bytes> for HeaderValue {
    fn from(value: Bytes) -> Self {
        Self::Bytes(value)
    }
}

impl From<f64> for HeaderValue {
    fn from(value: f64) -> Self {
        Self::Float(value)
    }
}

/// The bytes a header value takes, for [`Envelope::total_size`].
fn header_value_size(value: &HeaderValue) -> usize {
    match value {
        HeaderValue::Str(s) => s.len(),
        HeaderValue::Bytes(b) => b.len(),
        HeaderValue::Int(_) | HeaderValue::Float(_) => 8,
        HeaderValue::Void => 0,
        HeaderValue::Bool(_) => 1,
    }
}

/// Message headers, ordered by name so that their iteration (and serialization) order is
/// deterministic.
pub type Headers = BTreeMap<ByteString, HeaderValue>;

/// Returned by [`Envelope::headers`] when the envelope has none: `BTreeMap::new` does not
/// allocate, so this costs nothing.
static NO_HEADERS: Headers = Headers::new();

/// The rarely-set message properties, kept out of line (see [`Envelope`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Properties {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: Headers,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<ByteString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<ByteString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply_to: Option<ByteString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expiration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    deaths: Vec<Death>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    first_death: Option<Death>,
}

/// Why a message left a queue other than by being consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeathReason {
    /// Nacked or rejected without requeue.
    Rejected,
    /// Its TTL ran out.
    Expired,
    /// Dropped from the head for a length limit.
    MaxLen,
    /// Returned once too often.
    DeliveryLimit,
    /// Shed by the queue's load-shedding policy (a low-priority message
    /// published while the queue was overloaded). postbox's own: RabbitMQ
    /// sheds no load.
    Shed,
}

impl DeathReason {
    /// RabbitMQ's name for the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::MaxLen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
            DeathReason::Shed => "shed",
        }
    }
}

impl fmt::Display for DeathReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a message's death history: it left `queue` for `reason`,
/// `count` times (RabbitMQ's `x-death`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Death {
    /// The queue it left.
    pub queue: ByteString,
    /// Why.
    pub reason: DeathReason,
    /// How many times it left this queue for this reason.
    pub count: u64,
    /// When it first did (epoch ms).
    pub time_ms: u64,
    /// The exchange it had been published to.
    pub exchange: ByteString,
    /// The routing keys it had been published with.
    pub routing_keys: Vec<ByteString>,
}

/// A message: payload, routing key and metadata.
///
/// Cloning only bumps reference counts (payload, routing key, properties); it never copies
/// the payload. (The one exception is inside `bytes`: the first clone of a buffer built
/// from a `Vec` or `String` turns it into a shared one, a single small allocation made
/// once.) Setting a property on an envelope whose properties are shared with a clone
/// copies the (small) property block first, so clones never affect each other.
///
/// Fields are private so that invariants such as "the delivery count only changes when a
/// queue delivers" hold; build envelopes with [`Envelope::new`] (or [`Envelope::encode`])
/// and the `with_*` methods.
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::Envelope;
///
/// let request = Envelope::new(&b"\x01\x02"[..])
///     .with_routing_key("rpc.sum")
///     .with_reply_to("replies")
///     .with_correlation_id("req-1")
///     .with_expiration(Duration::from_secs(5));
/// let copy = request.clone();
/// assert_eq!(copy.reply_to(), Some("replies"));
/// assert_eq!(copy.correlation_id(), Some("req-1"));
/// assert_eq!(copy.expiration(), Some(Duration::from_secs(5)));
/// assert_eq!(copy.size(), 2);
/// assert_eq!(copy.delivery_count(), 0);
/// ```
///
/// An [`Envelope`] is what publishers hand to the broker, what queues store and what
/// consumers receive. It is passed around by value and cloned freely (a queue keeps a copy
/// of every unacknowledged delivery so that it can redeliver it), so it is built to be
/// cheap to clone: the payload and strings are reference-counted [`Bytes`] /
/// [`ByteString`]s, and the rarely-used AMQP-style properties (headers, content type,
/// correlation id, reply-to, expiration) sit behind a single shared, copy-on-write
/// pointer, so that an envelope which does not use them stays small.
///
/// ```
/// use postbox_actors::{Envelope, HeaderValue};
///
/// let envelope = Envelope::new("hello")
///     .with_routing_key("greetings.en")
///     .with_header("attempt", 1) // integer literals become `HeaderValue::Int`
///     .with_priority(5);
/// assert_eq!(envelope.routing_key(), "greetings.en");
/// assert_eq!(envelope.payload().as_ref(), b"hello");
/// assert_eq!(envelope.header("attempt"), Some(&HeaderValue::Int(1)));
///
/// // Typed payloads go through a codec (JSON by default).
/// let order = Envelope::encode(&("order-17", 3))?;
/// let (id, quantity): (String, u32) = order.decode()?;
/// assert_eq!((id.as_str(), quantity), ("order-17", 3));
/// # Ok::<(), postbox_actors::CodecError>(())
/// ```
#[derive(Clone, Serialize, Deserialize)]
pub struct Envelope {
    id: MessageId,
    /// `None` is the empty key: no allocation for the common default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    routing_key: Option<Arc<str>>,
    payload: Bytes,
    timestamp_ms: u64,
    priority: u8,
    delivery_count: u32,
    redelivered: bool,
    /// Kept on disk in a durable queue (AMQP's delivery mode 2).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    persistent: bool,
    /// The exchange it was last published to (`None`: the default exchange).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exchange: Option<Arc<str>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "shared_properties"
    )]
    properties: Option<Arc<Properties>>,
}

impl Envelope {
    /// A new envelope carrying `payload`, with a fresh [`MessageId`], the current time as
    /// its timestamp, an empty routing key, priority 0 and no properties.
    ///
    /// `payload` can be anything that converts into [`Bytes`] (`&'static str`,
    /// `&'static [u8]`, `String`, `Vec<u8>`, `Bytes`...); owned buffers are taken over
    /// without copying.
    #[must_use]
    pub fn new(payload: impl Into<Bytes>) -> Self {
        // One clock read serves the id and the timestamp.
        let now = now_ms();
        Self {
            id: MessageId::at(now),
            routing_key: None,
            payload: payload.into(),
            timestamp_ms: now,
            priority: 0,
            delivery_count: 0,
            redelivered: false,
            persistent: false,
            exchange: None,
            properties: None,
        }
    }

    /// Serializes `value` as JSON into a new envelope whose content type is
    /// `application/json`.
    ///
    /// # Errors
    /// [`CodecError::Encode`] if `value` cannot be represented as JSON.
    ///
    /// ```
    /// use postbox_actors::Envelope;
    ///
    /// let envelope = Envelope::encode(&[1, 2])?;
    /// assert_eq!(envelope.payload().as_ref(), b"[1,2]");
    /// assert_eq!(envelope.content_type(), Some("application/json"));
    /// # Ok::<(), postbox_actors::CodecError>(())
    /// ```
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, CodecError> {
        Self::encode_with(&Json, value)
    }

    /// Serializes `value` with `codec` into a new envelope whose content type is the
    /// codec's [`Codec::CONTENT_TYPE`]. See [`Codec`] for an example of a custom
    /// codec.
    ///
    /// # Errors
    /// [`CodecError::Encode`] if the codec cannot serialize `value`.
    pub fn encode_with<C: Codec, T: Serialize + ?Sized>(
        codec: &C,
        value: &T,
    ) -> Result<Self, CodecError> {
        let payload = codec.encode(value)?;
        // `from_static` keeps the content type a borrowed constant: no allocation.
        Ok(Self::new(payload).with_content_type(ByteString::from_static(C::CONTENT_TYPE)))
    }

    /// Deserializes the payload as JSON.
    ///
    /// The content type is not checked: a payload is decoded as JSON whatever it claims to
    /// be, exactly as an AMQP client would.
    ///
    /// # Errors
    /// [`CodecError::Decode`] if the payload is not JSON or does not describe a `T`.
    ///
    /// ```
    /// use postbox_actors::{CodecError, Envelope};
    ///
    /// let envelope = Envelope::new("not json");
    /// assert!(matches!(envelope.decode::<u32>(), Err(CodecError::Decode(_))));
    /// ```
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        self.decode_with(&Json)
    }

    /// Deserializes the payload with `codec` (the content type is not checked).
    ///
    /// # Errors
    /// [`CodecError::Decode`] if the codec cannot read the payload as a `T`.
    pub fn decode_with<C: Codec, T: DeserializeOwned>(&self, codec: &C) -> Result<T, CodecError> {
        codec.decode(&self.payload)
    }

    /// Sets the routing key, which exchanges match against their bindings.
    #[must_use]
    pub fn with_routing_key(mut self, routing_key: impl Into<Arc<str>>) -> Self {
        self.routing_key = non_empty(routing_key.into());
        self
    }

    /// Replaces the generated id, e.g. with a publisher-chosen id for deduplication.
    #[must_use]
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = id;
        self
    }

    /// Sets header `name` to `value`, replacing any previous value.
    #[must_use]
    pub fn with_header(
        mut self,
        name: impl Into<ByteString>,
        value: impl Into<HeaderValue>,
    ) -> Self {
        self.properties_mut()
            .headers
            .insert(name.into(), value.into());
        self
    }

    /// Sets the payload's MIME type (set automatically by [`Envelope::encode_with`]).
    #[must_use]
    pub fn with_content_type(mut self, content_type: impl Into<ByteString>) -> Self {
        self.properties_mut().content_type = Some(content_type.into());
        self
    }

    /// Sets the correlation id, which a reply carries back to match its request.
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: impl Into<ByteString>) -> Self {
        self.properties_mut().correlation_id = Some(correlation_id.into());
        self
    }

    /// Sets the name of the queue a reply should be sent to.
    #[must_use]
    pub fn with_reply_to(mut self, reply_to: impl Into<ByteString>) -> Self {
        self.properties_mut().reply_to = Some(reply_to.into());
        self
    }

    /// Sets the priority; higher is delivered first by priority queues (others ignore it).
    #[must_use]
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the per-message time to live, counted from the [timestamp](Self::timestamp_ms).
    /// A queue also has its own TTL; the smaller of the two applies.
    #[must_use]
    pub fn with_expiration(mut self, expiration: Duration) -> Self {
        self.properties_mut().expiration = Some(expiration);
        self
    }

    /// Overrides the creation timestamp (milliseconds since the UNIX epoch).
    #[must_use]
    pub fn with_timestamp_ms(mut self, timestamp_ms: u64) -> Self {
        self.timestamp_ms = timestamp_ms;
        self
    }

    /// Records a delivery: how many times the message has now been delivered and whether
    /// this delivery is a redelivery.
    ///
    /// Set by the queue when it delivers; publishers need not call it (a value set before
    /// publishing is counted on from, not reset).
    pub fn set_delivery(&mut self, delivery_count: u32, redelivered: bool) {
        self.delivery_count = delivery_count;
        self.redelivered = redelivered;
    }

    /// Marks it persistent (AMQP's delivery mode 2): a durable queue of a
    /// broker opened on a data directory keeps it on disk, and it survives a
    /// restart. Transient messages (the default, as in AMQP) live in memory
    /// only, in durable queues too.
    ///
    /// ```
    /// use postbox_actors::Envelope;
    /// let order = Envelope::new("order-17").with_persistent(true);
    /// assert!(order.persistent());
    /// assert!(!Envelope::new("tick").persistent());
    /// ```
    #[must_use]
    pub fn with_persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// Whether it is kept on disk by durable queues (see
    /// [`with_persistent`](Self::with_persistent)).
    #[must_use]
    pub const fn persistent(&self) -> bool {
        self.persistent
    }

    /// Sets the exchange it is published to; the broker does this when routing.
    #[must_use]
    pub fn with_exchange(mut self, exchange: impl Into<Arc<str>>) -> Self {
        self.exchange = non_empty(exchange.into());
        self
    }

    /// The exchange it was last published to (`""`: the default exchange).
    pub fn exchange(&self) -> &str {
        self.exchange.as_deref().unwrap_or("")
    }

    /// Its death history, most recent first: one entry per (queue, reason).
    pub fn deaths(&self) -> &[Death] {
        self.properties.as_deref().map_or(&[], |p| &p.deaths)
    }

    /// The first time it was dead-lettered; never changed afterwards.
    pub fn first_death(&self) -> Option<&Death> {
        self.properties
            .as_deref()
            .and_then(|p| p.first_death.as_ref())
    }

    /// Records that it left `queue` for `reason` at `now_ms`, as RabbitMQ does on
    /// dead-lettering: the (queue, reason) entry's count goes up and it moves to
    /// the front (or a new entry is put there). The message is then ready to be
    /// republished: its own expiration is removed (so it does not expire again
    /// wherever it goes) and its delivery count starts over.
    pub fn record_death(&mut self, queue: &str, reason: DeathReason, now_ms: u64) {
        let exchange = ByteString::from(self.exchange());
        let routing_key = ByteString::from(self.routing_key());
        let props = self.properties_mut();
        props.expiration = None;
        match props
            .deaths
            .iter()
            .position(|d| d.queue == queue && d.reason == reason)
        {
            Some(i) => {
                let mut death = props.deaths.remove(i);
                death.count += 1;
                props.deaths.insert(0, death);
            }
            None => {
                let death = Death {
                    queue: ByteString::from(queue),
                    reason,
                    count: 1,
                    time_ms: now_ms,
                    exchange,
                    routing_keys: vec![routing_key],
                };
                if props.first_death.is_none() {
                    props.first_death = Some(death.clone());
                }
                props.deaths.insert(0, death);
            }
        }
        self.delivery_count = 0;
        self.redelivered = false;
    }

    /// The message id.
    #[must_use]
    pub const fn id(&self) -> MessageId {
        self.id
    }

    /// The routing key (empty unless set).
    #[must_use]
    pub fn routing_key(&self) -> &str {
        self.routing_key.as_deref().unwrap_or("")
    }

    /// The payload bytes. Clone the returned [`Bytes`] to keep them without copying.
    #[must_use]
    pub const fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// When the envelope was created (or as set by [`Envelope::with_timestamp_ms`]), in
    /// milliseconds since the UNIX epoch.
    #[must_use]
    pub const fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }

    /// The priority (0 unless set).
    #[must_use]
    pub const fn priority(&self) -> u8 {
        self.priority
    }

    /// How many times a queue has delivered this message; 0 before the first delivery.
    #[must_use]
    pub const fn delivery_count(&self) -> u32 {
        self.delivery_count
    }

    /// Whether this delivery is a redelivery (the message was delivered and then requeued).
    #[must_use]
    pub const fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// All headers. An envelope without headers returns an empty map (a shared static, so
    /// no allocation happens).
    #[must_use]
    pub fn headers(&self) -> &Headers {
        self.properties
            .as_deref()
            .map_or(&NO_HEADERS, |p| &p.headers)
    }

    /// The value of header `name`, if set.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&HeaderValue> {
        self.properties.as_deref()?.headers.get(name)
    }

    /// The payload's MIME type, if set.
    #[must_use]
    pub fn content_type(&self) -> Option<&str> {
        self.properties.as_deref()?.content_type.as_deref()
    }

    /// The correlation id, if set.
    #[must_use]
    pub fn correlation_id(&self) -> Option<&str> {
        self.properties.as_deref()?.correlation_id.as_deref()
    }

    /// The reply-to queue name, if set.
    #[must_use]
    pub fn reply_to(&self) -> Option<&str> {
        self.properties.as_deref()?.reply_to.as_deref()
    }

    /// The per-message time to live, if set.
    #[must_use]
    pub fn expiration(&self) -> Option<Duration> {
        self.properties.as_deref()?.expiration
    }

    /// The payload length in bytes: what byte-based queue and stream limits
    /// (`max_length_bytes`, `max_bytes`) count, as RabbitMQ counts bodies.
    #[must_use]
    pub fn size(&self) -> usize {
        self.payload.len()
    }

    /// The whole message's size in bytes, as a message size limit
    /// (`max_message_bytes`) counts it: the payload plus the routing key, the
    /// exchange, every header (name and value), the content type, correlation
    /// id and reply-to, the death history, and 48 bytes for the fixed fields.
    /// A header can hold as much memory as a payload, so a limit that ignored
    /// them would not limit anything.
    ///
    /// ```
    /// use postbox_actors::Envelope;
    /// let small = Envelope::new("x");
    /// let padded = Envelope::new("x").with_header("pad", "y".repeat(1000));
    /// assert_eq!(small.size(), padded.size());
    /// assert!(padded.total_size() > small.total_size() + 1000);
    /// ```
    #[must_use]
    pub fn total_size(&self) -> usize {
        /// Id, timestamp, priority, delivery count and flags, rounded up.
        const FIXED: usize = 48;
        let mut size = FIXED
            .saturating_add(self.payload.len())
            .saturating_add(self.routing_key.as_deref().map_or(0, str::len))
            .saturating_add(self.exchange.as_deref().map_or(0, str::len));
        let Some(p) = self.properties.as_deref() else {
            return size;
        };
        let text = |s: &Option<ByteString>| s.as_deref().map_or(0, str::len);
        for (name, value) in &p.headers {
            size = size
                .saturating_add(name.len())
                .saturating_add(header_value_size(value));
        }
        size = size
            .saturating_add(text(&p.content_type))
            .saturating_add(text(&p.correlation_id))
            .saturating_add(text(&p.reply_to));
        for death in p.deaths.iter().chain(&p.first_death) {
            size = size
                .saturating_add(death.queue.len())
                .saturating_add(death.exchange.len())
                .saturating_add(24);
            for key in &death.routing_keys {
                size = size.saturating_add(key.len());
            }
        }
        size
    }

    /// The properties block, created on first use and un-shared (copied) if a clone
    /// still refers to it.
    /// Sets the death history as another broker recorded it (RabbitMQ's
    /// `x-death`, read back by the `amqp` backend).
    #[cfg(feature = "amqp")]
    pub(crate) fn set_deaths(&mut self, deaths: Vec<Death>, first: Option<Death>) {
        if deaths.is_empty() && first.is_none() {
            return;
        }
        let props = self.properties_mut();
        props.first_death = first.or_else(|| deaths.last().cloned());
        props.deaths = deaths;
    }

    fn properties_mut(&mut self) -> &mut Properties {
        Arc::make_mut(self.properties.get_or_insert_with(Arc::default))
    }
}

impl fmt::Debug for Envelope {
    // Hand-written so that logging an envelope prints the payload's size, not a
    // possibly huge (or sensitive) payload.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Envelope");
        s.field("id", &self.id)
            .field("routing_key", &self.routing_key)
            .field("payload_len", &self.payload.len())
            .field("timestamp_ms", &self.timestamp_ms)
            .field("priority", &self.priority)
            .field("delivery_count", &self.delivery_count)
            .field("redelivered", &self.redelivered)
            .field("persistent", &self.persistent);
        if let Some(properties) = &self.properties {
            s.field("properties", properties);
        }
        s.finish()
    }
}

/// The empty string is stored as `None`, so that it costs nothing.
fn non_empty(s: Arc<str>) -> Option<Arc<str>> {
    (!s.is_empty()).then_some(s)
}

/// Milliseconds since the UNIX epoch, on tokio's clock so that TTLs and deadlines
/// follow virtual time in tests (see [`postbox::clock`]).
fn now_ms() -> u64 {
    postbox::clock::now_ms()
}

mod wire;
pub(crate) use wire::{WireError, WireReader, WireWriter};

/// Serde support for the shared properties block, without needing serde's `rc` feature:
/// it is written as the plain (optional) struct and read back into a fresh `Arc`.
mod shared_properties {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Properties;

    // Serde's `with` hands over `&Option<..>`, so the signature is fixed.
    #[allow(clippy::ref_option)]
    pub(super) fn serialize<S: Serializer>(
        value: &Option<Arc<Properties>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.as_deref().serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Arc<Properties>>, D::Error> {
        Ok(Option::<Properties>::deserialize(deserializer)?.map(Arc::new))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn ids_of_one_thread_strictly_increase_and_are_version_7() {
        let base = 1_700_000_000_000;
        let mut last = MessageId::at(base);
        // Same millisecond, later ones, and a clock that went back.
        for ms in (0..50_000)
            .map(|i| base + i / 1000)
            .chain([base - 5, base + 100, base])
        {
            let id = MessageId::at(ms);
            assert!(id > last, "{id} after {last}");
            assert_eq!(id.as_uuid().get_version_num(), 7);
            assert_eq!(id.as_uuid().get_variant(), uuid::Variant::RFC4122);
            let (secs, nanos) = id.as_uuid().get_timestamp().unwrap().to_unix();
            assert!(secs * 1000 + u64::from(nanos / 1_000_000) >= ms.min(base + 100));
            last = id;
        }
    }

    #[test]
    fn a_full_counter_moves_to_the_next_millisecond() {
        let full = (1u64 << ID_COUNTER_BITS) - 1;
        assert_eq!(next_id_time((5, 7), 6, || 1), (6, 1));
        assert_eq!(next_id_time((5, 7), 5, || 1), (5, 8));
        assert_eq!(next_id_time((5, 7), 3, || 1), (5, 8));
        assert_eq!(next_id_time((5, full), 5, || 1), (6, 1));
    }
    use super::*;

    #[test]
    fn clone_shares_payload_and_properties() {
        let original = Envelope::new(vec![7u8; 1024])
            .with_routing_key("rk")
            .with_header("h", "v");
        let copy = original.clone();
        assert_eq!(original.payload().as_ptr(), copy.payload().as_ptr());
        assert_eq!(original.routing_key().as_ptr(), copy.routing_key().as_ptr());
        let (Some(a), Some(b)) = (&original.properties, &copy.properties) else {
            panic!("both envelopes carry properties");
        };
        assert!(Arc::ptr_eq(a, b));
    }

    #[test]
    fn setting_a_property_on_a_clone_does_not_affect_the_original() {
        let original = Envelope::new("p").with_header("a", 1_i64);
        let changed = original.clone().with_header("b", 2_i64).with_reply_to("r");
        assert_eq!(original.headers().len(), 1);
        assert_eq!(original.reply_to(), None);
        assert_eq!(changed.headers().len(), 2);
        assert_eq!(changed.reply_to(), Some("r"));
        // The payload is still shared.
        assert_eq!(original.payload().as_ptr(), changed.payload().as_ptr());
    }

    #[test]
    fn builders_and_getters_round_trip() {
        let id = MessageId::new();
        let envelope = Envelope::new("payload")
            .with_id(id)
            .with_routing_key(String::from("a.b.c"))
            .with_header("s", "text")
            .with_header("i", -4_i64)
            .with_header("b", true)
            .with_header("f", 1.5)
            .with_header("raw", Bytes::from_static(b"\0\x01"))
            .with_header("i", 5_i64)
            .with_content_type("text/plain")
            .with_correlation_id("corr")
            .with_reply_to("replies")
            .with_priority(9)
            .with_expiration(Duration::from_millis(1500))
            .with_timestamp_ms(42);
        assert_eq!(envelope.id(), id);
        assert_eq!(envelope.routing_key(), "a.b.c");
        assert_eq!(envelope.payload().as_ref(), b"payload");
        assert_eq!(envelope.size(), 7);
        assert_eq!(envelope.timestamp_ms(), 42);
        assert_eq!(envelope.priority(), 9);
        assert_eq!(
            envelope.header("s").and_then(HeaderValue::as_str),
            Some("text")
        );
        assert_eq!(envelope.header("i"), Some(&HeaderValue::Int(5)));
        assert_eq!(
            envelope.header("b").and_then(HeaderValue::as_bool),
            Some(true)
        );
        assert_eq!(
            envelope.header("f").and_then(HeaderValue::as_float),
            Some(1.5)
        );
        assert_eq!(
            envelope.header("raw").and_then(HeaderValue::as_bytes),
            Some(&Bytes::from_static(b"\0\x01"))
        );
        assert_eq!(envelope.header("missing"), None);
        let names: Vec<&str> = envelope.headers().keys().map(|k| &**k).collect();
        assert_eq!(names, ["b", "f", "i", "raw", "s"]);
        assert_eq!(envelope.content_type(), Some("text/plain"));
        assert_eq!(envelope.correlation_id(), Some("corr"));
        assert_eq!(envelope.reply_to(), Some("replies"));
        assert_eq!(envelope.expiration(), Some(Duration::from_millis(1500)));
        assert_eq!(envelope.delivery_count(), 0);
        assert!(!envelope.redelivered());
    }

    #[test]
    fn defaults() {
        let before = now_ms();
        let envelope = Envelope::new(Bytes::new());
        assert!(envelope.timestamp_ms() >= before);
        assert_eq!(envelope.routing_key(), "");
        assert_eq!(envelope.size(), 0);
        assert_eq!(envelope.priority(), 0);
        assert!(envelope.headers().is_empty());
        assert_eq!(envelope.header("x"), None);
        assert_eq!(envelope.content_type(), None);
        assert_eq!(envelope.correlation_id(), None);
        assert_eq!(envelope.reply_to(), None);
        assert_eq!(envelope.expiration(), None);
        assert!(
            envelope.properties.is_none(),
            "no properties block until one is set"
        );
        assert_ne!(envelope.id(), Envelope::new("").id());
    }

    #[test]
    fn set_delivery() {
        let mut envelope = Envelope::new("x");
        envelope.set_delivery(2, true);
        assert_eq!(envelope.delivery_count(), 2);
        assert!(envelope.redelivered());
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Order {
        id: u64,
        sku: String,
    }

    #[test]
    fn encode_decode_round_trip() {
        let order = Order {
            id: 7,
            sku: "abc".into(),
        };
        let envelope = Envelope::encode(&order).unwrap();
        assert_eq!(envelope.content_type(), Some("application/json"));
        assert_eq!(envelope.decode::<Order>().unwrap(), order);
        assert_eq!(envelope.decode_with::<_, Order>(&Json).unwrap(), order);
        let again = Envelope::encode_with(&Json, &order).unwrap();
        assert_eq!(again.payload(), envelope.payload());
    }

    #[test]
    fn decode_error_is_typed() {
        let envelope = Envelope::encode(&"a string").unwrap();
        let err = envelope.decode::<Order>().unwrap_err();
        assert!(matches!(err, CodecError::Decode(_)), "{err:?}");
    }

    #[test]
    fn serde_round_trip() {
        let plain = Envelope::new("p").with_routing_key("k");
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("properties"), "{json}");
        let back: Envelope = serde_json::from_str(&json).unwrap();
        assert_eq!(back.id(), plain.id());
        assert_eq!(back.routing_key(), "k");
        assert_eq!(back.payload(), plain.payload());
        assert!(back.properties.is_none());

        let mut rich = Envelope::new("p")
            .with_header("n", 3_i64)
            .with_header("s", "v")
            .with_reply_to("r")
            .with_expiration(Duration::from_secs(2));
        rich.set_delivery(3, true);
        let back: Envelope = serde_json::from_slice(&serde_json::to_vec(&rich).unwrap()).unwrap();
        assert_eq!(back.headers(), rich.headers());
        assert_eq!(back.reply_to(), Some("r"));
        assert_eq!(back.expiration(), Some(Duration::from_secs(2)));
        assert_eq!(back.delivery_count(), 3);
        assert!(back.redelivered());
    }

    #[test]
    fn debug_does_not_print_the_payload() {
        let envelope = Envelope::new("top secret payload");
        let debug = format!("{envelope:?}");
        assert!(!debug.contains("secret"), "{debug}");
        assert!(debug.contains("payload_len: 18"), "{debug}");
    }

    #[test]
    fn message_id_display_and_serde() {
        let id = MessageId::new();
        assert_eq!(id.to_string(), id.as_uuid().to_string());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<MessageId>(&json).unwrap(), id);
        // v7 ids are time-ordered.
        let later = MessageId::new();
        assert!(later > id);
    }
}
