//! Envelopes to and from AMQP: properties, headers, and RabbitMQ's `x-death`
//! read back into the typed death history.
//!
//! | postbox | AMQP |
//! |---|---|
//! | id | `message-id` (the UUID, hyphenated) |
//! | timestamp (ms) | `timestamp` (seconds) and header `x-postbox-ts` (ms) |
//! | priority, correlation id, reply-to, content type | the same properties |
//! | expiration | `expiration` (milliseconds, as text) |
//! | persistent | `delivery-mode` 2 |
//! | headers | headers: `Str` → longstr, `Int` → long long, `Bool`, `Float` → double, `Bytes` → byte array, `Void` |
//! | deaths | `x-death` (read only: RabbitMQ writes it when it dead-letters) |

use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::envelope::{Death, DeathReason, Envelope, HeaderValue, MessageId};
use crate::error::BrokerError;

/// The header carrying the timestamp in milliseconds (AMQP's own is in
/// seconds).
pub(crate) const TIMESTAMP_HEADER: &str = "x-postbox-ts";

/// The header carrying a message's own routing key when it is published to
/// a queue by name (RabbitMQ's default exchange replaces it with the
/// queue's name; postbox keeps a partition or ordering key there).
pub(crate) const KEY_HEADER: &str = "x-postbox-key";

/// A short string (at most 255 bytes), or a typed refusal naming the field.
pub(crate) fn short(value: &str, field: &'static str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(value).map_err(|_| BrokerError::Unsupported {
        operation: field,
        backend: "rabbitmq (longer than 255 bytes)",
    })
}

/// A header value as AMQP carries it.
pub(crate) fn to_amqp_value(value: &HeaderValue) -> AMQPValue {
    match value {
        HeaderValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::Bytes(b) => AMQPValue::ByteArray(b.to_vec().into()),
        HeaderValue::Float(f) => AMQPValue::Double(*f),
        HeaderValue::Void => AMQPValue::Void,
    }
}

/// An AMQP value as a header value; `None` for tables and arrays, which
/// postbox headers do not hold (they are left out).
pub(crate) fn from_amqp_value(value: &AMQPValue) -> Option<HeaderValue> {
    Some(match value {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(i) => HeaderValue::Int((*i).into()),
        AMQPValue::ShortShortUInt(i) => HeaderValue::Int((*i).into()),
        AMQPValue::ShortInt(i) => HeaderValue::Int((*i).into()),
        AMQPValue::ShortUInt(i) => HeaderValue::Int((*i).into()),
        AMQPValue::LongInt(i) => HeaderValue::Int((*i).into()),
        AMQPValue::LongUInt(i) => HeaderValue::Int((*i).into()),
        AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
        AMQPValue::Timestamp(t) => HeaderValue::Int(i64::try_from(*t).unwrap_or(i64::MAX)),
        AMQPValue::Float(f) => HeaderValue::Float((*f).into()),
        AMQPValue::Double(f) => HeaderValue::Float(*f),
        AMQPValue::ShortString(s) => HeaderValue::Str(s.as_str().into()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => HeaderValue::Str(text.into()),
            Err(_) => HeaderValue::Bytes(Bytes::copy_from_slice(s.as_bytes())),
        },
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(Bytes::copy_from_slice(b.as_slice())),
        AMQPValue::Void => HeaderValue::Void,
        AMQPValue::DecimalValue(_) | AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => {
            return None;
        }
    })
}

/// Headers (or binding and declaration arguments) as an AMQP table.
pub(crate) fn to_table<'a>(
    headers: impl IntoIterator<Item = (&'a ByteString, &'a HeaderValue)>,
) -> Result<FieldTable, BrokerError> {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(short(name, "a header name")?, to_amqp_value(value));
    }
    Ok(table)
}

/// The AMQP properties of `message`, published with `routing_key`.
pub(crate) fn properties(
    message: &Envelope,
    routing_key: &str,
) -> Result<BasicProperties, BrokerError> {
    let mut headers = to_table(message.headers())?;
    let ms = message.timestamp_ms();
    // A postbox id is a version 7 UUID made at the envelope's creation: the
    // exact milliseconds travel in it, and only a timestamp set otherwise
    // needs the header.
    if id_ms(message.id()) != Some(ms) {
        headers.insert(
            TIMESTAMP_HEADER.into(),
            AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
        );
    }
    let own = message.routing_key();
    if !own.is_empty() && own != routing_key {
        headers.insert(
            KEY_HEADER.into(),
            AMQPValue::LongString(LongString::from(own.as_bytes().to_vec())),
        );
    }
    let mut props = BasicProperties::default()
        .with_message_id(message.id().to_string().into())
        .with_timestamp(ms / 1000);
    if !headers.inner().is_empty() {
        props = props.with_headers(headers);
    }
    if message.priority() > 0 {
        props = props.with_priority(message.priority());
    }
    if message.persistent() {
        props = props.with_delivery_mode(2);
    }
    if let Some(id) = message.correlation_id() {
        props = props.with_correlation_id(short(id, "a correlation id")?);
    }
    if let Some(to) = message.reply_to() {
        props = props.with_reply_to(short(to, "a reply-to")?);
    }
    if let Some(kind) = message.content_type() {
        props = props.with_content_type(short(kind, "a content type")?);
    }
    if let Some(ttl) = message.expiration() {
        props = props.with_expiration(ttl.as_millis().to_string().into());
    }
    Ok(props)
}

/// What RabbitMQ delivered, as an envelope: `redelivered` as RabbitMQ says,
/// the delivery count as far as it is known (RabbitMQ's `x-delivery-count`
/// where a queue keeps one, else 1 for a first delivery and 2 for a
/// redelivery).
pub(crate) fn envelope(
    payload: Vec<u8>,
    exchange: &str,
    routing_key: &str,
    redelivered: bool,
    props: &BasicProperties,
) -> Envelope {
    let mut message = Envelope::new(payload)
        .with_routing_key(routing_key)
        .with_exchange(exchange);
    let mut timestamp = props.timestamp().map(|s| s.saturating_mul(1000));
    if let Some(id) = props.message_id() {
        let id = parse_id(id.as_str());
        // The milliseconds the id carries, if they agree with the seconds.
        if let Some(ms) = id_ms(id).filter(|ms| timestamp.is_none_or(|t| t == ms / 1000 * 1000)) {
            timestamp = Some(ms);
        }
        message = message.with_id(id);
    }
    let mut delivery_count = None;
    let mut deaths = Vec::new();
    let mut first_death = None;
    if let Some(headers) = props.headers() {
        for (name, value) in headers.inner() {
            match (name.as_str(), value) {
                (TIMESTAMP_HEADER, AMQPValue::LongLongInt(ms)) => {
                    timestamp = u64::try_from(*ms).ok();
                }
                (KEY_HEADER, value) => {
                    if let Some(HeaderValue::Str(key)) = from_amqp_value(value) {
                        message = message.with_routing_key(&*key);
                    }
                }
                ("x-delivery-count", value) => {
                    delivery_count = from_amqp_value(value).and_then(|v| v.as_int());
                }
                ("x-death", AMQPValue::FieldArray(entries)) => {
                    deaths = entries.as_slice().iter().filter_map(death).collect();
                }
                // RabbitMQ's own: read by `streams`, not the publisher's.
                (
                    "x-first-death-reason"
                    | "x-first-death-queue"
                    | "x-first-death-exchange"
                    | super::streams::OFFSET_HEADER,
                    _,
                ) => {}
                (_, value) => {
                    if let Some(value) = from_amqp_value(value) {
                        message = message.with_header(name.as_str(), value);
                    }
                }
            }
        }
        first_death = first_death_of(headers, &deaths);
    }
    if let Some(ms) = timestamp {
        message = message.with_timestamp_ms(ms);
    }
    if let Some(priority) = props.priority() {
        message = message.with_priority(*priority);
    }
    if props.delivery_mode() == &Some(2) {
        message = message.with_persistent(true);
    }
    if let Some(id) = props.correlation_id() {
        message = message.with_correlation_id(id.as_str());
    }
    if let Some(to) = props.reply_to() {
        message = message.with_reply_to(to.as_str());
    }
    if let Some(kind) = props.content_type() {
        message = message.with_content_type(kind.as_str());
    }
    if let Some(ms) = props
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse().ok())
    {
        message = message.with_expiration(Duration::from_millis(ms));
    }
    message.set_deaths(deaths, first_death);
    // A classic queue does not count deliveries: a redelivery is at least
    // the second.
    let count = delivery_count
        .and_then(|n| u32::try_from(n).ok())
        .map_or(if redelivered { 2 } else { 1 }, |n| n.saturating_add(1));
    message.set_delivery(count, redelivered);
    message
}

/// The Unix milliseconds of a version 7 UUID (its first 48 bits).
fn id_ms(id: MessageId) -> Option<u64> {
    let uuid = id.0;
    (uuid.get_version_num() == 7).then(|| (uuid.as_u128() >> 80) as u64)
}

/// A message id: postbox's UUID as published, or (from another client) the
/// id of its text, so that the same text always gives the same id.
fn parse_id(text: &str) -> MessageId {
    uuid::Uuid::parse_str(text).map_or_else(|_| MessageId::for_key(text), MessageId)
}

fn reason(text: &[u8]) -> Option<DeathReason> {
    Some(match text {
        b"rejected" => DeathReason::Rejected,
        b"expired" => DeathReason::Expired,
        b"maxlen" => DeathReason::MaxLen,
        b"delivery_limit" => DeathReason::DeliveryLimit,
        b"shed" => DeathReason::Shed,
        _ => return None,
    })
}

fn text(value: Option<&AMQPValue>) -> Option<ByteString> {
    match value? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(ByteString::from),
        AMQPValue::ShortString(s) => Some(ByteString::from(s.as_str())),
        _ => None,
    }
}

/// One `x-death` entry (a table: queue, reason, count, time, exchange,
/// routing-keys); `None` if it is not one RabbitMQ would write.
fn death(entry: &AMQPValue) -> Option<Death> {
    let AMQPValue::FieldTable(table) = entry else {
        return None;
    };
    let fields = table.inner();
    let reason = match fields.get("reason")? {
        AMQPValue::LongString(s) => reason(s.as_bytes())?,
        AMQPValue::ShortString(s) => reason(s.as_str().as_bytes())?,
        _ => return None,
    };
    let count = fields
        .get("count")
        .and_then(from_amqp_value)
        .and_then(|v| v.as_int())
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(1);
    let time_ms = match fields.get("time") {
        Some(AMQPValue::Timestamp(s)) => s.saturating_mul(1000),
        _ => 0,
    };
    let routing_keys = match fields.get("routing-keys") {
        Some(AMQPValue::FieldArray(keys)) => keys
            .as_slice()
            .iter()
            .filter_map(|k| text(Some(k)))
            .collect(),
        _ => Vec::new(),
    };
    Some(Death {
        queue: text(fields.get("queue"))?,
        reason,
        count,
        time_ms,
        exchange: text(fields.get("exchange")).unwrap_or_default(),
        routing_keys,
    })
}

/// The first death, from RabbitMQ's `x-first-death-*` headers, as it was
/// when it happened: a count of 1, with the time and keys of the entry of
/// `deaths` they name (which counts later deaths too).
fn first_death_of(headers: &FieldTable, deaths: &[Death]) -> Option<Death> {
    let fields = headers.inner();
    let queue = text(fields.get("x-first-death-queue"))?;
    let reason = text(fields.get("x-first-death-reason")).and_then(|r| reason(r.as_bytes()))?;
    let exchange = text(fields.get("x-first-death-exchange")).unwrap_or_default();
    let entry = deaths
        .iter()
        .find(|d| d.queue == queue && d.reason == reason);
    Some(Death {
        queue,
        reason,
        count: 1,
        time_ms: entry.map_or(0, |d| d.time_ms),
        exchange,
        routing_keys: entry.map(|d| d.routing_keys.clone()).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_survives_the_trip_through_amqp_properties() {
        let sent = Envelope::new("body")
            .with_header("region", "eu")
            .with_header("attempt", 3)
            .with_header("ok", true)
            .with_header("ratio", 0.5)
            .with_header("raw", Bytes::from_static(&[0xff, 0]))
            .with_correlation_id("c-1")
            .with_reply_to("replies")
            .with_content_type("text/plain")
            .with_priority(4)
            .with_persistent(true)
            .with_expiration(Duration::from_millis(1500));
        let props = properties(&sent, "key").unwrap();
        // The id carries the milliseconds: no header for them.
        assert!(
            !props
                .headers()
                .as_ref()
                .unwrap()
                .contains_key(TIMESTAMP_HEADER)
        );
        let got = envelope(b"body".to_vec(), "ex", "key", false, &props);
        assert_eq!(got.id(), sent.id());
        assert_eq!(got.timestamp_ms(), sent.timestamp_ms());
        assert_eq!(got.headers(), sent.headers());
        assert_eq!(got.correlation_id(), Some("c-1"));
        assert_eq!(got.reply_to(), Some("replies"));
        assert_eq!(got.content_type(), Some("text/plain"));
        assert_eq!(got.priority(), 4);
        assert!(got.persistent());
        assert_eq!(got.expiration(), Some(Duration::from_millis(1500)));
        assert_eq!((got.exchange(), got.routing_key()), ("ex", "key"));
        assert_eq!((got.delivery_count(), got.redelivered()), (1, false));
    }

    #[test]
    fn a_timestamp_set_apart_from_the_id_travels_in_a_header() {
        let sent = Envelope::new("x").with_timestamp_ms(1_700_000_000_123);
        let props = properties(&sent, "q").unwrap();
        let got = envelope(b"x".to_vec(), "", "q", false, &props);
        assert_eq!(got.timestamp_ms(), 1_700_000_000_123);
        let plain = Envelope::new("x");
        let props = properties(&plain, "q").unwrap();
        assert!(props.headers().is_none());
        let got = envelope(b"x".to_vec(), "", "q", false, &props);
        assert_eq!(got.timestamp_ms(), plain.timestamp_ms());
    }

    #[test]
    fn a_message_keeps_its_own_key_through_a_queue_publish() {
        let sent = Envelope::new("x").with_routing_key("user-7");
        let props = properties(&sent, "events.3").unwrap();
        let got = envelope(b"x".to_vec(), "", "events.3", false, &props);
        assert_eq!(got.routing_key(), "user-7");
        assert!(got.header(KEY_HEADER).is_none());
        // Published with its own key as the routing key: nothing to carry.
        let props = properties(&sent, "user-7").unwrap();
        assert!(props.headers().is_none());
    }

    #[test]
    fn a_long_correlation_id_is_refused_not_a_panic() {
        let long = "x".repeat(256);
        let err = properties(&Envelope::new("x").with_correlation_id(long), "").unwrap_err();
        assert!(matches!(err, BrokerError::Unsupported { .. }), "{err}");
    }

    #[test]
    fn x_death_is_read_back_into_the_typed_history() {
        let entry = |queue: &str, reason: &str, count: i64| {
            let mut t = FieldTable::default();
            t.insert("queue".into(), AMQPValue::LongString(queue.into()));
            t.insert("reason".into(), AMQPValue::LongString(reason.into()));
            t.insert("count".into(), AMQPValue::LongLongInt(count));
            t.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
            t.insert("exchange".into(), AMQPValue::LongString("".into()));
            t.insert(
                "routing-keys".into(),
                AMQPValue::FieldArray(vec![AMQPValue::LongString(queue.into())].into()),
            );
            AMQPValue::FieldTable(t)
        };
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(
                vec![entry("work", "rejected", 2), entry("wait", "expired", 1)].into(),
            ),
        );
        headers.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString("wait".into()),
        );
        headers.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("expired".into()),
        );
        headers.insert(
            "x-first-death-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        let props = BasicProperties::default().with_headers(headers);
        let got = envelope(Vec::new(), "", "work", true, &props);
        let deaths = got.deaths();
        assert_eq!(deaths.len(), 2);
        assert_eq!(
            (deaths[0].queue.as_ref(), deaths[0].reason, deaths[0].count),
            ("work", DeathReason::Rejected, 2)
        );
        assert_eq!(deaths[1].time_ms, 1_700_000_000_000);
        let first = got.first_death().unwrap();
        assert_eq!(
            (first.queue.as_ref(), first.reason),
            ("wait", DeathReason::Expired)
        );
        assert!(got.header("x-death").is_none());
        assert_eq!((got.delivery_count(), got.redelivered()), (2, true));
    }
}
