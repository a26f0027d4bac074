//! Streams on RabbitMQ: a postbox stream is a RabbitMQ stream queue
//! (`x-queue-type: stream`), read over AMQP 0-9-1 as RabbitMQ allows it.
//!
//! - declaring, binding and deleting one are those of a queue, with the
//!   stream's retention as arguments (`x-max-length-bytes`, `x-max-age`);
//!   what a RabbitMQ stream cannot do (retention by count, `block`
//!   overflow, duplicate windows) is refused with
//!   [`StreamError::Unsupported`];
//! - a publish goes through the default exchange with a publisher confirm:
//!   RabbitMQ does not say at which offset, so it returns
//!   [`UNKNOWN_OFFSET`](crate::StreamHandle::UNKNOWN_OFFSET);
//! - a subscriber's feed ([`AmqpStream`]'s side of
//!   [`StreamBackend`](crate::stream::remote::StreamBackend)) is a task that
//!   owns its channel: `basic.qos` (RabbitMQ requires a prefetch on a
//!   stream), then `basic.consume` with an `x-stream-offset`. Records come
//!   with their offset (RabbitMQ's `x-stream-offset` header).
//!
//! Positions are client-side, as they are for any stream reader, and kept
//! by `stream::remote` (AMQP has no offset tracking: that is RabbitMQ's
//! stream protocol); the feed consumes again from the position on a new
//! channel when asked, and after a reconnection.

use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use futures::StreamExt;
use futures::future::BoxFuture;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use postbox::Recipient;
use tokio::sync::oneshot;

use super::connection::{Remote, Session};
use super::convert::{envelope, short};
use super::topology::{Record as Declarations, Subject, refusal};
use crate::envelope::Envelope;
use crate::error::BrokerError;
use crate::stream::log::Record;
use crate::stream::remote::{Fed, RemoteReader, StreamBackend};
use crate::stream::{StreamError, StreamOptions, StreamOverflow, StreamStart};

/// A stream queue is durable on RabbitMQ, whatever its options say.
pub(crate) const STREAM_FLAGS: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

/// The header RabbitMQ puts each stream record's offset in.
pub(crate) const OFFSET_HEADER: &str = "x-stream-offset";

/// A stream's options as `queue.declare` arguments; what a RabbitMQ stream
/// cannot do is refused.
pub(crate) fn stream_args(options: &StreamOptions) -> Result<FieldTable, StreamError> {
    if options.max_len.is_some() {
        return Err(StreamError::Unsupported(
            "max_len (a RabbitMQ stream retains by max_bytes and max_age only)",
        ));
    }
    let limited = options.max_bytes.is_some() || options.max_age.is_some();
    if limited && options.overflow == StreamOverflow::Block {
        return Err(StreamError::Unsupported(
            "block overflow (a RabbitMQ stream trims regardless of its readers: StreamOverflow::DropOldest)",
        ));
    }
    if options.dedup.is_some() {
        return Err(StreamError::Unsupported("a duplicate window on a stream"));
    }
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("stream"));
    if let Some(bytes) = options.max_bytes {
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(bytes).unwrap_or(i64::MAX)),
        );
    }
    if let Some(age) = options.max_age {
        // RabbitMQ's finest unit is the second.
        let seconds = age.as_secs() + u64::from(age.subsec_nanos() > 0);
        args.insert("x-max-age".into(), text(&format!("{}s", seconds.max(1))));
    }
    Ok(args)
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The `x-stream-offset` argument for `start`.
fn offset_arg(start: StreamStart) -> AMQPValue {
    match start {
        StreamStart::First => text("first"),
        StreamStart::Last => text("last"),
        StreamStart::Next => text("next"),
        StreamStart::Offset(n) => AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX)),
        // Seconds, by RabbitMQ's clock, a second early for the clocks'
        // skew: the subscriber skips the records published before `ms`.
        StreamStart::Timestamp(ms) => AMQPValue::Timestamp((ms / 1000).saturating_sub(1)),
    }
}

/// A broker error as a stream's: a missing queue is the stream missing.
fn stream_error(name: &str, err: BrokerError) -> StreamError {
    match err {
        BrokerError::QueueNotFound(_) => StreamError::NotFound(name.to_string()),
        BrokerError::Stopped => StreamError::Stopped,
        other => StreamError::Remote(Box::new(other)),
    }
}

impl Remote {
    /// Declares stream `name` on RabbitMQ and records it (redeclared after
    /// a reconnection).
    pub(crate) async fn declare_stream(
        &self,
        name: &str,
        options: &StreamOptions,
    ) -> Result<(), StreamError> {
        let args = stream_args(options)?;
        let queue = short(name, "a stream name").map_err(|e| stream_error(name, e))?;
        self.timed("queue.declare", async {
            let session = self.session().await?;
            self.on_admin(&session, |channel| {
                let (queue, args) = (queue.clone(), args.clone());
                async move { channel.queue_declare(queue, STREAM_FLAGS, args).await }
            })
            .await
            .map_err(|e| refusal(self, &e, Subject::Queue(name)))
        })
        .await
        .map_err(|e| stream_error(name, e))?;
        let mut record = self.record.lock();
        let Declarations {
            declared, streams, ..
        } = &mut *record;
        Declarations::declare(declared, streams, name, options.clone(), |_| None);
        Ok(())
    }

    /// Deletes stream `name` on RabbitMQ (`NotFound` if it is missing).
    /// Forgotten here first, whatever RabbitMQ answers: a reconnection must
    /// not declare it again.
    pub(crate) async fn delete_stream(&self, name: &str) -> Result<(), StreamError> {
        self.record
            .lock()
            .forget(&crate::exchange::Destination::Stream(name.into()));
        let queue = short(name, "a stream name").map_err(|e| stream_error(name, e))?;
        // `queue.delete` of a missing queue succeeds: check first.
        self.passive(name)
            .await
            .map_err(|e| stream_error(name, e))?;
        self.timed("queue.delete", async {
            let session = self.session().await?;
            self.on_admin(&session, |channel| {
                let queue = queue.clone();
                async move { channel.queue_delete(queue, Default::default()).await }
            })
            .await
            .map_err(|e| refusal(self, &e, Subject::Queue(name)))
        })
        .await
        .map_err(|e| stream_error(name, e))?;
        Ok(())
    }
}

/// A stream on RabbitMQ, as the stream's backend.
pub(crate) struct AmqpStream {
    remote: Arc<Remote>,
    name: ByteString,
}

impl AmqpStream {
    pub(crate) fn new(remote: &Arc<Remote>, name: &str) -> Self {
        AmqpStream {
            remote: remote.clone(),
            name: ByteString::from(name),
        }
    }
}

impl StreamBackend for AmqpStream {
    fn publish(&self, message: Envelope) -> BoxFuture<'_, Result<(), StreamError>> {
        Box::pin(async move {
            self.remote
                .publish_to_queue(&self.name, message, usize::MAX)
                .await
                .map_err(|e| stream_error(&self.name, e))
        })
    }

    fn publish_batch(&self, messages: Vec<Envelope>) -> BoxFuture<'_, Result<(), StreamError>> {
        Box::pin(async move {
            self.remote
                .publish_batch(&self.name, messages, usize::MAX)
                .await
                .map_err(|e| stream_error(&self.name, e))
        })
    }

    fn feed(
        &self,
        reader: Arc<RemoteReader>,
        to: Recipient<Fed>,
        started: oneshot::Sender<Result<(), StreamError>>,
    ) {
        tokio::spawn(feed(self.remote.clone(), reader, to, started));
    }
}

/// How a channel's reading ended.
enum Ended {
    /// The subscriber stopped.
    Stopped,
    /// The handler failed: read again from the position.
    Reopen,
    /// RabbitMQ cancelled the consumer: the stream was deleted.
    Deleted,
    /// The channel or the connection was lost.
    Lost,
}

/// The pause before consuming again on a live connection whose channel
/// RabbitMQ closed, doubled per failure in a row up to the maximum.
const REOPEN_PAUSE: Duration = Duration::from_millis(100);
const REOPEN_PAUSE_MAX: Duration = Duration::from_secs(5);

/// Feeds the subscriber: consumes from its position, on a new channel after
/// each failure or reconnection, until it stops. `started` hears how the
/// first `basic.consume` went.
async fn feed(
    remote: Arc<Remote>,
    reader: Arc<RemoteReader>,
    to: Recipient<Fed>,
    started: oneshot::Sender<Result<(), StreamError>>,
) {
    let name = reader.stream().clone();
    let mut started = Some(started);
    let mut session = match remote.session().await {
        Ok(session) => session,
        Err(err) => {
            if let Some(started) = started.take() {
                let _ = started.send(Err(stream_error(&name, err)));
            }
            return;
        }
    };
    // Attempts in a row that failed to consume, for the pause.
    let mut failures = 0u32;
    loop {
        if reader.is_stopped() {
            break;
        }
        // The epoch first, then the position: a record the actor handles
        // in between moves the position before it is read here.
        let epoch = reader.next_epoch();
        let from = reader.resume();
        let ended = match open(&remote, &session, &reader, from).await {
            Ok((channel, mut consumer)) => {
                if let Some(started) = started.take() {
                    let _ = started.send(Ok(()));
                }
                failures = 0;
                let ended = pump(&remote, &reader, &to, epoch, &channel, &mut consumer).await;
                // Closed before the consumer is dropped: see `consume`.
                let _ = channel.close(200, "subscriber done".into()).await;
                drop(consumer);
                ended
            }
            Err(err) => {
                if let Some(started) = started.take() {
                    let _ = started.send(Err(stream_error(&name, err)));
                    return;
                }
                match err {
                    BrokerError::QueueNotFound(_) => Ended::Deleted,
                    BrokerError::Stopped => Ended::Stopped,
                    _ => {
                        // A refusal that may last (permissions, another
                        // kind of queue under the name): said, and tried
                        // again less and less often.
                        failures = failures.saturating_add(1);
                        tracing::warn!(stream = %name, %err, failures, "reading the stream again failed; retrying");
                        Ended::Lost
                    }
                }
            }
        };
        let ended = match ended {
            // RabbitMQ cancels a consumer for other reasons than a deletion
            // (a replica restarting): only a missing stream ends it.
            Ended::Deleted => match remote.passive(&name).await {
                Err(BrokerError::QueueNotFound(_)) => Ended::Deleted,
                Err(BrokerError::Stopped) => Ended::Stopped,
                _ => Ended::Lost,
            },
            other => other,
        };
        match ended {
            Ended::Stopped => break,
            Ended::Reopen => {}
            Ended::Deleted => {
                tracing::warn!(stream = %name, "the stream is gone: its subscriber stops");
                let _ = to.send(Fed::Gone).await;
                break;
            }
            Ended::Lost => {
                let pause = REOPEN_PAUSE
                    .saturating_mul(1 << failures.min(6))
                    .min(REOPEN_PAUSE_MAX);
                let next = async {
                    if session.connection.status().connected() {
                        tokio::time::sleep(pause).await;
                        if session.connection.status().connected() {
                            return Some(session.clone());
                        }
                    }
                    remote.next_session(session.generation).await
                };
                tokio::select! {
                    next = next => match next {
                        Some(next) => session = next,
                        None => break,
                    },
                    () = reader.stopping() => break,
                }
            }
        }
    }
}

/// A channel with the prefetch, consuming the stream from `from`.
async fn open(
    remote: &Remote,
    session: &Session,
    reader: &RemoteReader,
    from: StreamStart,
) -> Result<(lapin::Channel, lapin::Consumer), BrokerError> {
    let name = &**reader.stream();
    let subject = Subject::Queue(name);
    remote
        .timed("basic.consume", async {
            let channel = remote.channel_on(session, subject).await?;
            channel
                .basic_qos(reader.prefetch().max(1), BasicQosOptions::default())
                .await
                .map_err(|e| refusal(remote, &e, subject))?;
            let mut args = FieldTable::default();
            args.insert(OFFSET_HEADER.into(), offset_arg(from));
            let consumer = channel
                .basic_consume(
                    short(name, "a stream name")?,
                    format!("postbox-stream-{}", remote.consumer_id()).into(),
                    BasicConsumeOptions::default(),
                    args,
                )
                .await
                .map_err(|e| refusal(remote, &e, subject))?;
            Ok((channel, consumer))
        })
        .await
}

/// Hands records to the actor, one mailbox slot each (the mailbox and the
/// prefetch bound what is in flight), acking each once it is in the
/// mailbox: a stream's acks only grant credit.
async fn pump(
    remote: &Remote,
    reader: &RemoteReader,
    to: &Recipient<Fed>,
    epoch: u64,
    channel: &lapin::Channel,
    consumer: &mut lapin::Consumer,
) -> Ended {
    loop {
        let next = tokio::select! {
            biased;
            () = reader.stopping() => return Ended::Stopped,
            () = reader.reopening() => return Ended::Reopen,
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(err)) => {
                tracing::debug!(stream = %reader.stream(), error = %remote.scrub(&err), "stream channel lost");
                return Ended::Lost;
            }
            None if channel.status().connected() => return Ended::Deleted,
            None => return Ended::Lost,
        };
        let Some(offset) = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(OFFSET_HEADER))
            .and_then(|v| match v {
                AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
                _ => None,
            })
        else {
            // Not a stream's record (the name now holds another kind of
            // queue): acked, or its credit would be held for ever.
            tracing::warn!(stream = %reader.stream(), "a record without its offset: skipped");
            let _ = channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await;
            continue;
        };
        reader.delivered(offset);
        let message = envelope(
            delivery.data,
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            false,
            &delivery.properties,
        );
        let record = Arc::new(Record {
            offset,
            timestamp_ms: message.timestamp_ms(),
            envelope: message,
        });
        tokio::select! {
            biased;
            () = reader.stopping() => return Ended::Stopped,
            sent = to.send(Fed::Record { epoch, record }) => {
                if sent.is_err() {
                    return Ended::Stopped;
                }
            }
        }
        let _ = channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_rabbitmq_lacks_is_refused_and_the_rest_maps_to_arguments() {
        assert!(matches!(
            stream_args(&StreamOptions::default()),
            Err(StreamError::Unsupported(what)) if what.starts_with("max_len")
        ));
        let blocking = StreamOptions::unbounded().max_bytes(1 << 20);
        assert!(matches!(
            stream_args(&blocking),
            Err(StreamError::Unsupported(what)) if what.starts_with("block")
        ));
        // Nothing is trimmed: block has nothing to wait for.
        assert!(stream_args(&StreamOptions::unbounded()).is_ok());
        let options = StreamOptions::unbounded()
            .max_bytes(1 << 20)
            .max_age(Duration::from_millis(1500))
            .overflow(StreamOverflow::DropOldest);
        let args = stream_args(&options).unwrap();
        let args = args.inner();
        assert_eq!(args.get("x-queue-type"), Some(&text("stream")));
        assert_eq!(
            args.get("x-max-length-bytes"),
            Some(&AMQPValue::LongLongInt(1 << 20))
        );
        assert_eq!(args.get("x-max-age"), Some(&text("2s")));
    }

    #[test]
    fn start_positions_become_x_stream_offset() {
        assert_eq!(offset_arg(StreamStart::First), text("first"));
        assert_eq!(offset_arg(StreamStart::Next), text("next"));
        assert_eq!(offset_arg(StreamStart::Last), text("last"));
        assert_eq!(
            offset_arg(StreamStart::Offset(42)),
            AMQPValue::LongLongInt(42)
        );
        assert_eq!(
            offset_arg(StreamStart::Timestamp(1_700_000_000_999)),
            AMQPValue::Timestamp(1_699_999_999)
        );
    }
}
