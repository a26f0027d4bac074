//! Queues, exchanges and bindings on RabbitMQ: postbox's options as
//! RabbitMQ's arguments, RabbitMQ's refusals as [`BrokerError`]s, and the
//! [`Record`] of what this process declared, replayed after a reconnection.

use std::collections::HashMap;
use std::sync::Arc;

use bytestring::ByteString;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, ExchangeUnbindOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};

use super::connection::{Remote, Session};
use super::consume::RemoteQueue;
use super::convert::{short, to_table};
use super::streams::{STREAM_FLAGS, stream_args};
use crate::dedup::{DedupTarget, SharedWindow};
use crate::error::BrokerError;
use crate::exchange::{
    BindingKey, Destination, ExchangeKind, ExchangeOptions, HashOn, HashProperty,
};
use crate::queue::actor::QueueSnapshot;
use crate::queue::options::{DeleteOptions, QueueOptions};
use crate::queue::policy::Overflow;
use crate::queue::stats::QueueStats;
use crate::stream::StreamOptions;

/// What a refusal was about, to name it in the error.
#[derive(Clone, Copy)]
pub(crate) enum Subject<'a> {
    Queue(&'a str),
    Exchange(&'a str),
    Other,
}

/// Exchanges remembered as existing, at most: past it the set starts over
/// (each is then asked about again).
const EXCHANGES_KNOWN: usize = 4096;

/// RabbitMQ's refusal (or a lost connection) as a broker error.
pub(crate) fn refusal(remote: &Remote, err: &lapin::Error, subject: Subject<'_>) -> BrokerError {
    if let lapin::ErrorKind::ProtocolError(amqp) = err.kind() {
        let text = amqp.get_message().as_str();
        let code = amqp.get_id();
        match (code, subject) {
            (404, _) if text.contains("no exchange") => {
                return BrokerError::ExchangeNotFound(quoted(text).unwrap_or_default());
            }
            (404, _) if text.contains("no queue") => {
                return BrokerError::QueueNotFound(quoted(text).unwrap_or_default());
            }
            (404, Subject::Queue(name)) => return BrokerError::QueueNotFound(name.into()),
            (404, Subject::Exchange(name)) => return BrokerError::ExchangeNotFound(name.into()),
            (403, Subject::Queue(name)) if text.contains("exclusive") => {
                return BrokerError::ExclusiveConsumer {
                    queue: name.into(),
                    consumers: 1,
                };
            }
            (406, Subject::Queue(name)) if text.contains("in use") => {
                return BrokerError::QueueInUse {
                    name: name.into(),
                    consumers: 1,
                };
            }
            (406, Subject::Queue(name)) if text.contains("not empty") => {
                return BrokerError::QueueNotEmpty {
                    name: name.into(),
                    messages: 1,
                };
            }
            (406, Subject::Exchange(name)) if text.contains("in use") => {
                return BrokerError::ExchangeInUse {
                    name: name.into(),
                    bindings: 1,
                };
            }
            _ => {}
        }
        return BrokerError::Backend(format!("{code} {}", remote.scrub(&text)));
    }
    BrokerError::Backend(remote.scrub(err))
}

/// The first `'...'`-quoted name in RabbitMQ's text.
fn quoted(text: &str) -> Option<String> {
    let start = text.find('\'')? + 1;
    let len = text[start..].find('\'')?;
    Some(text[start..start + len].to_string())
}

/// What this process declared: replayed on a new connection, in the order
/// it was declared, and read per publish (options, duplicate window).
#[derive(Clone, Default)]
pub(crate) struct Record {
    exchanges: HashMap<String, Arc<Declared<ExchangeOptions>>>,
    queues: HashMap<String, Arc<Declared<QueueOptions>>>,
    /// Streams: stream queues to RabbitMQ, in the queues' namespace.
    pub(crate) streams: HashMap<String, Arc<Declared<StreamOptions>>>,
    bindings: Vec<Bound>,
    /// Declarations made so far, to order the replay.
    pub(crate) declared: u64,
}

/// A queue or an exchange as this process declared it, and the duplicate
/// window kept on this side for it (RabbitMQ has none).
pub(crate) struct Declared<O> {
    seq: u64,
    pub(crate) options: O,
    pub(crate) window: Option<Arc<SharedWindow>>,
}

#[derive(Clone, PartialEq)]
struct Bound {
    destination: Destination,
    source: String,
    key: BindingKey,
}

/// `map`'s declarations in the order they were made.
fn in_order<O>(map: &HashMap<String, Arc<Declared<O>>>) -> Vec<(&String, &Arc<Declared<O>>)> {
    let mut all: Vec<_> = map.iter().collect();
    all.sort_by_key(|(_, d)| d.seq);
    all
}

impl Record {
    /// Declares everything recorded on `session`: exchanges, queues, then
    /// bindings.
    pub(crate) async fn redeclare(&self, session: &Session) -> Result<(), lapin::Error> {
        // Entry by entry: one that RabbitMQ now refuses (another process
        // redeclared the queue otherwise, deleted a bound exchange) is
        // logged and skipped, on a fresh channel, rather than keeping the
        // whole broker from reconnecting.
        let mut channel = session.create_channel().await?;
        let refused = |what: String, err: lapin::Error| {
            tracing::warn!(%what, error = %err, "not redeclared after reconnecting");
        };
        for (name, declared) in in_order(&self.exchanges) {
            let Ok((kind, flags, args)) = exchange_args(&declared.options) else {
                continue;
            };
            if let Err(err) = channel
                .exchange_declare(name.as_str().into(), kind, flags, args)
                .await
            {
                refused(format!("exchange {name:?}"), err);
                channel = session.create_channel().await?;
            }
        }
        for (name, declared) in in_order(&self.queues) {
            let Ok((flags, args)) = queue_args(name, &declared.options) else {
                continue;
            };
            if let Err(err) = channel
                .queue_declare(name.as_str().into(), flags, args)
                .await
            {
                refused(format!("queue {name:?}"), err);
                channel = session.create_channel().await?;
            }
        }
        for (name, declared) in in_order(&self.streams) {
            let Ok(args) = stream_args(&declared.options) else {
                continue;
            };
            if let Err(err) = channel
                .queue_declare(name.as_str().into(), STREAM_FLAGS, args)
                .await
            {
                refused(format!("stream {name:?}"), err);
                channel = session.create_channel().await?;
            }
        }
        for bound in &self.bindings {
            if let Err(err) = bind_on(&channel, bound, false).await {
                refused(format!("binding from {:?}", bound.source), err);
                channel = session.create_channel().await?;
            }
        }
        let _ = channel.close(200, "redeclared".into()).await;
        Ok(())
    }

    /// Queue `name`, if this process declared it.
    pub(crate) fn queue(&self, name: &str) -> Option<Arc<Declared<QueueOptions>>> {
        self.queues.get(name).cloned()
    }

    /// Exchange `name`, if this process declared it.
    pub(crate) fn exchange(&self, name: &str) -> Option<Arc<Declared<ExchangeOptions>>> {
        self.exchanges.get(name).cloned()
    }

    /// Records a declaration (the first one stands: a redeclaration with
    /// the same options changes nothing); returns it.
    pub(crate) fn declare<O>(
        declared: &mut u64,
        map: &mut HashMap<String, Arc<Declared<O>>>,
        name: &str,
        options: O,
        window: impl FnOnce(&O) -> Option<SharedWindow>,
    ) -> Arc<Declared<O>> {
        map.entry(name.to_string())
            .or_insert_with(|| {
                *declared += 1;
                Arc::new(Declared {
                    seq: *declared,
                    window: window(&options).map(Arc::new),
                    options,
                })
            })
            .clone()
    }

    pub(crate) fn forget(&mut self, destination: &Destination) {
        self.bindings
            .retain(|b| &b.destination != destination && !is_source(b, destination));
        match destination {
            Destination::Queue(name) => {
                self.queues.remove(&**name);
            }
            Destination::Exchange(name) => {
                self.exchanges.remove(&**name);
            }
            Destination::Stream(name) => {
                self.streams.remove(&**name);
            }
        }
    }

    /// The queues this process declared, sorted.
    pub(crate) fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.queues.keys().cloned().collect();
        names.sort();
        names
    }

    /// The exchanges this process declared, with their options, sorted.
    pub(crate) fn exchanges(&self) -> Vec<(String, ExchangeOptions)> {
        let mut all: Vec<(String, ExchangeOptions)> = self
            .exchanges
            .iter()
            .map(|(name, d)| (name.clone(), d.options.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The bindings this process made from `exchange`.
    pub(crate) fn bindings(&self, exchange: &str) -> Vec<crate::exchange::Binding> {
        self.bindings
            .iter()
            .filter(|b| b.source == exchange)
            .map(|b| crate::exchange::Binding {
                destination: b.destination.clone(),
                key: ByteString::from(b.key.key()),
                arguments: b.key.arguments().clone(),
            })
            .collect()
    }
}

fn is_source(bound: &Bound, destination: &Destination) -> bool {
    matches!(destination, Destination::Exchange(name) if bound.source == name.as_ref())
}

async fn bind_on(
    channel: &lapin::Channel,
    bound: &Bound,
    unbind: bool,
) -> Result<(), lapin::Error> {
    let args = to_table(bound.key.arguments()).unwrap_or_default();
    let key = bound.key.key();
    match (&bound.destination, unbind) {
        // A stream is a queue to RabbitMQ.
        (Destination::Queue(queue) | Destination::Stream(queue), false) => {
            channel
                .queue_bind(
                    (&**queue).into(),
                    bound.source.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    args,
                )
                .await
        }
        (Destination::Queue(queue) | Destination::Stream(queue), true) => {
            channel
                .queue_unbind(
                    (&**queue).into(),
                    bound.source.as_str().into(),
                    key.into(),
                    args,
                )
                .await
        }
        (Destination::Exchange(dest), false) => {
            channel
                .exchange_bind(
                    (&**dest).into(),
                    bound.source.as_str().into(),
                    key.into(),
                    ExchangeBindOptions::default(),
                    args,
                )
                .await
        }
        (Destination::Exchange(dest), true) => {
            channel
                .exchange_unbind(
                    (&**dest).into(),
                    bound.source.as_str().into(),
                    key.into(),
                    ExchangeUnbindOptions::default(),
                    args,
                )
                .await
        }
    }
}

fn long(n: impl TryInto<i64>) -> AMQPValue {
    AMQPValue::LongLongInt(n.try_into().unwrap_or(i64::MAX))
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// A queue's options as `queue.declare` flags and arguments; what RabbitMQ
/// cannot do is refused.
pub(crate) fn queue_args(
    name: &str,
    options: &QueueOptions,
) -> Result<(QueueDeclareOptions, FieldTable), BrokerError> {
    let unsupported = |operation| Err(BrokerError::unsupported(operation));
    if options.delivery_limit.is_some() {
        // Quorum queues only; classic queues do not count deliveries.
        return unsupported("delivery_limit (RabbitMQ counts deliveries on quorum queues only)");
    }
    if options.shed.is_some() {
        return unsupported("load shedding");
    }
    if options.max_priority == Some(0) {
        return Err(BrokerError::InvalidQueueOptions {
            name: name.into(),
            reason: "the maximum priority must be 1 to 255",
        });
    }
    let mut args = FieldTable::default();
    let mut set = |k: &str, v| {
        args.insert(k.into(), v);
    };
    if let Some(ttl) = options.message_ttl {
        set("x-message-ttl", long(ttl.as_millis()));
    }
    if let Some(expires) = options.expires {
        set("x-expires", long(expires.as_millis().max(1)));
    }
    if let Some(n) = options.max_length {
        set("x-max-length", long(n));
    }
    if let Some(n) = options.max_length_bytes {
        set("x-max-length-bytes", long(n));
    }
    let limited = options.max_length.is_some() || options.max_length_bytes.is_some();
    match options.overflow {
        Overflow::DropHead => {}
        // Block waits and drop-new discards on this side, from
        // reject-publish's nacks (see `publish`).
        Overflow::RejectPublish | Overflow::Block if limited => {
            set("x-overflow", text("reject-publish"));
        }
        Overflow::RejectPublishDlx | Overflow::DropNew if limited => {
            set("x-overflow", text("reject-publish-dlx"));
        }
        Overflow::RejectPublish
        | Overflow::Block
        | Overflow::RejectPublishDlx
        | Overflow::DropNew => {}
        Overflow::Spill => set("x-queue-mode", text("lazy")),
    }
    if let Some(dlx) = &options.dead_letter_exchange {
        set("x-dead-letter-exchange", text(dlx));
    }
    if let Some(key) = &options.dead_letter_routing_key {
        set("x-dead-letter-routing-key", text(key));
    }
    if options.single_active_consumer {
        set("x-single-active-consumer", AMQPValue::Boolean(true));
    }
    if let Some(max) = options.max_priority {
        set("x-max-priority", AMQPValue::ShortShortUInt(max));
    }
    let flags = QueueDeclareOptions {
        durable: options.durable,
        ..QueueDeclareOptions::default()
    };
    Ok((flags, args))
}

/// An exchange's options as its kind, flags and arguments.
pub(crate) fn exchange_args(
    options: &ExchangeOptions,
) -> Result<(lapin::ExchangeKind, ExchangeDeclareOptions, FieldTable), BrokerError> {
    let mut args = FieldTable::default();
    let kind = match options.kind {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        ExchangeKind::ConsistentHash => {
            match &options.hash_on {
                HashOn::RoutingKey => {}
                HashOn::Header(name) => {
                    args.insert("hash-header".into(), text(name));
                }
                HashOn::Property(property) => {
                    let name = match property {
                        HashProperty::MessageId => "message_id",
                        HashProperty::CorrelationId => "correlation_id",
                        HashProperty::Timestamp => "timestamp",
                    };
                    args.insert("hash-property".into(), text(name));
                }
            }
            lapin::ExchangeKind::Custom("x-consistent-hash".into())
        }
    };
    if let Some(ae) = &options.alternate_exchange {
        args.insert("alternate-exchange".into(), text(ae));
    }
    let flags = ExchangeDeclareOptions {
        durable: options.durable,
        ..ExchangeDeclareOptions::default()
    };
    Ok((kind, flags, args))
}

impl Remote {
    pub(crate) async fn declare_queue(
        self: &Arc<Self>,
        name: &str,
        options: QueueOptions,
    ) -> Result<RemoteQueue, BrokerError> {
        let (flags, args) = queue_args(name, &options)?;
        let queue = short(name, "a queue name")?;
        let declared = self
            .timed("queue.declare", async {
                let session = self.session().await?;
                self.on_admin(&session, |channel| {
                    let (queue, args) = (queue.clone(), args.clone());
                    async move { channel.queue_declare(queue, flags, args).await }
                })
                .await
                .map_err(|e| self.mismatch(&e, name, &options))
            })
            .await?;
        {
            let mut record = self.record.lock();
            let Record {
                declared: n,
                queues,
                ..
            } = &mut *record;
            Record::declare(n, queues, name, options, |o| {
                o.dedup
                    .map(|config| SharedWindow::new(config, DedupTarget::Queue(name.into())))
            });
        }
        Ok(RemoteQueue::new(
            self,
            name,
            declared.consumer_count() as usize,
        ))
    }

    /// A refused declaration: a mismatch with what this process declared
    /// is reported as such.
    fn mismatch(&self, err: &lapin::Error, name: &str, requested: &QueueOptions) -> BrokerError {
        let existing = self.record.lock().queue(name).map(|d| d.options.clone());
        match (err.kind(), existing) {
            (lapin::ErrorKind::ProtocolError(e), Some(existing)) if e.get_id() == 406 => {
                BrokerError::QueueMismatch {
                    name: name.into(),
                    existing: Box::new(existing),
                    requested: Box::new(requested.clone()),
                }
            }
            _ => refusal(self, err, Subject::Queue(name)),
        }
    }

    /// Ready messages and consumers of `name`, by a passive declaration.
    pub(crate) async fn passive(&self, name: &str) -> Result<(usize, usize), BrokerError> {
        let queue = short(name, "a queue name")?;
        self.timed("queue.declare", async {
            let channel = self.own_channel(Subject::Queue(name)).await?;
            let q = channel
                .queue_declare(
                    queue,
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| refusal(self, &e, Subject::Queue(name)))?;
            let _ = channel.close(200, "checked".into()).await;
            Ok((q.message_count() as usize, q.consumer_count() as usize))
        })
        .await
    }

    pub(crate) async fn queue_snapshot(&self, name: &str) -> Result<QueueSnapshot, BrokerError> {
        let (ready, consumers) = self.passive(name).await?;
        Ok(QueueSnapshot {
            name: name.into(),
            stats: QueueStats {
                ready,
                consumers,
                ..QueueStats::default()
            },
            consumers: Vec::new(),
            dead_lettered: 0,
            dead_letters_dropped: 0,
            auto_ack_lost: 0,
            waiting_publishes: 0,
            storage: None,
        })
    }

    pub(crate) async fn delete_queue(
        &self,
        name: &str,
        options: DeleteOptions,
    ) -> Result<QueueSnapshot, BrokerError> {
        let queue = short(name, "a queue name")?;
        // RabbitMQ answers with the count only: check the queue first, so a
        // missing one is `QueueNotFound` as embedded.
        let mut snapshot = self.queue_snapshot(name).await?;
        let deleted = self
            .timed("queue.delete", async {
                let session = self.session().await?;
                let delete = QueueDeleteOptions {
                    if_unused: options.if_unused,
                    if_empty: options.if_empty,
                    ..Default::default()
                };
                self.on_admin(&session, |channel| {
                    let queue = queue.clone();
                    async move { channel.queue_delete(queue, delete).await }
                })
                .await
                .map_err(|e| match refusal(self, &e, Subject::Queue(name)) {
                    // RabbitMQ's refusal has no counts: the check has.
                    BrokerError::QueueNotEmpty { name, .. } => BrokerError::QueueNotEmpty {
                        name,
                        messages: snapshot.stats.ready,
                    },
                    BrokerError::QueueInUse { name, .. } => BrokerError::QueueInUse {
                        name,
                        consumers: snapshot.stats.consumers,
                    },
                    other => other,
                })
            })
            .await?;
        self.record.lock().forget(&Destination::Queue(name.into()));
        snapshot.stats.ready = deleted as usize;
        Ok(snapshot)
    }

    pub(crate) async fn purge_queue(&self, name: &str) -> Result<usize, BrokerError> {
        let queue = short(name, "a queue name")?;
        self.timed("queue.purge", async {
            let session = self.session().await?;
            self.on_admin(&session, |channel| {
                let queue = queue.clone();
                async move {
                    channel
                        .queue_purge(queue, QueuePurgeOptions::default())
                        .await
                }
            })
            .await
            .map(|n| n as usize)
            .map_err(|e| refusal(self, &e, Subject::Queue(name)))
        })
        .await
    }

    pub(crate) async fn declare_exchange(
        &self,
        name: &str,
        options: ExchangeOptions,
    ) -> Result<(), BrokerError> {
        let (kind, flags, args) = exchange_args(&options)?;
        let exchange = short(name, "an exchange name")?;
        self.timed("exchange.declare", async {
            let session = self.session().await?;
            self.on_admin(&session, |channel| {
                let (exchange, kind, args) = (exchange.clone(), kind.clone(), args.clone());
                async move { channel.exchange_declare(exchange, kind, flags, args).await }
            })
            .await
            .map_err(|e| {
                let existing = self.record.lock().exchange(name).map(|d| d.options.clone());
                match (e.kind(), existing) {
                    (lapin::ErrorKind::ProtocolError(p), Some(existing)) if p.get_id() == 406 => {
                        BrokerError::ExchangeMismatch {
                            name: name.into(),
                            existing: Box::new(existing),
                            requested: Box::new(options.clone()),
                        }
                    }
                    _ => refusal(self, &e, Subject::Exchange(name)),
                }
            })
        })
        .await?;
        self.saw_exchange(name);
        let mut record = self.record.lock();
        let Record {
            declared: n,
            exchanges,
            ..
        } = &mut *record;
        Record::declare(n, exchanges, name, options, |o| {
            o.dedup
                .map(|config| SharedWindow::new(config, DedupTarget::Exchange(name.into())))
        });
        Ok(())
    }

    pub(crate) async fn delete_exchange(
        &self,
        name: &str,
        if_unused: bool,
    ) -> Result<(), BrokerError> {
        let exchange = short(name, "an exchange name")?;
        // `exchange.delete` of a missing exchange succeeds on RabbitMQ 3.10:
        // check first, so that it is `ExchangeNotFound` as embedded.
        self.timed("exchange.delete", async {
            let channel = self.exchange_exists(name).await?;
            channel
                .exchange_delete(
                    exchange,
                    ExchangeDeleteOptions {
                        if_unused,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| refusal(self, &e, Subject::Exchange(name)))?;
            let _ = channel.close(200, "deleted".into()).await;
            Ok(())
        })
        .await?;
        self.exchanges_known.write().remove(name);
        self.record
            .lock()
            .forget(&Destination::Exchange(name.into()));
        Ok(())
    }

    /// Runs `op` on the session's shared topology channel. RabbitMQ answers
    /// a refusal by closing the channel, which also fails whatever else was
    /// on it at the time: an operation that fails so runs once more on a
    /// channel of its own, and the error it then reports is its own. (Each
    /// of these operations is refused without effect, and one that failed
    /// for another's refusal never ran: running it again is safe.)
    pub(crate) async fn on_admin<T, F, Fut>(
        &self,
        session: &Session,
        op: F,
    ) -> Result<T, lapin::Error>
    where
        F: Fn(lapin::Channel) -> Fut,
        Fut: Future<Output = Result<T, lapin::Error>>,
    {
        let channel = session.admin().await?;
        match op(channel).await {
            Err(err)
                if matches!(
                    err.kind(),
                    lapin::ErrorKind::ProtocolError(_) | lapin::ErrorKind::InvalidChannelState(..)
                ) =>
            {
                let own = session.create_channel().await?;
                let done = op(own.clone()).await;
                if done.is_ok() {
                    let _ = own.close(200, "done".into()).await;
                }
                done
            }
            other => other,
        }
    }

    /// A channel of its own, for an operation RabbitMQ may refuse: a refusal
    /// closes the channel (a missing queue or exchange), and must not fail
    /// what shares one.
    pub(crate) async fn own_channel(
        &self,
        subject: Subject<'_>,
    ) -> Result<lapin::Channel, BrokerError> {
        loop {
            let session = self.session().await?;
            match self.channel_on(&session, subject).await {
                // Lost while opening: the next session (session() waits
                // for it, up to the timeout).
                Err(_) if session.is_lost() => continue,
                opened => return opened,
            }
        }
    }

    /// A new channel on `session`, its failure said of `subject`.
    pub(crate) async fn channel_on(
        &self,
        session: &Session,
        subject: Subject<'_>,
    ) -> Result<lapin::Channel, BrokerError> {
        session
            .create_channel()
            .await
            .map_err(|e| refusal(self, &e, subject))
    }

    /// A passive declaration of exchange `name` (`ExchangeNotFound` if it
    /// is missing), on a channel of its own, returned open.
    async fn exchange_exists(&self, name: &str) -> Result<lapin::Channel, BrokerError> {
        let exchange = short(name, "an exchange name")?;
        let channel = self.own_channel(Subject::Exchange(name)).await?;
        channel
            .exchange_declare(
                exchange,
                lapin::ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| refusal(self, &e, Subject::Exchange(name)))?;
        Ok(channel)
    }

    /// `ExchangeNotFound` unless exchange `name` exists (the default
    /// exchange always does), asked once per exchange and connection.
    ///
    /// A publish through a missing exchange makes RabbitMQ close the
    /// channel, and lapin sends its `channel.close-ok` ahead of the
    /// publishes still queued on that channel; RabbitMQ takes those for
    /// frames on an unopened channel and closes the whole connection
    /// (`CHANNEL_ERROR - expected 'channel.open'`), failing every publish,
    /// consumer and request on it. So a publish goes through an exchange on
    /// a shared channel only once the exchange is known to exist: declared
    /// or found here, and neither deleted by this process nor refused since.
    /// An exchange another process deletes can still do it, once.
    pub(crate) async fn check_exchange(&self, name: &str) -> Result<(), BrokerError> {
        if name.is_empty() || self.exchanges_known.read().contains(name) {
            return Ok(());
        }
        let channel = self.exchange_exists(name).await?;
        let _ = channel.close(200, "checked".into()).await;
        self.saw_exchange(name);
        Ok(())
    }

    /// Exchange `name` exists as of now.
    pub(crate) fn saw_exchange(&self, name: &str) {
        let mut known = self.exchanges_known.write();
        if known.len() >= EXCHANGES_KNOWN {
            known.clear();
        }
        known.insert(name.to_string());
    }

    /// Binds (or unbinds) `destination` to `source`; unbinding returns
    /// whether this process had made that binding.
    pub(crate) async fn bind(
        &self,
        destination: Destination,
        source: &str,
        key: BindingKey,
        unbind: bool,
    ) -> Result<bool, BrokerError> {
        short(source, "an exchange name")?;
        match &destination {
            Destination::Queue(name) => short(name, "a queue name")?,
            Destination::Exchange(name) => short(name, "an exchange name")?,
            Destination::Stream(name) => short(name, "a stream name")?,
        };
        short(key.key(), "a binding key")?;
        to_table(key.arguments())?;
        let bound = Bound {
            destination,
            source: source.to_string(),
            key,
        };
        let subject = match &bound.destination {
            Destination::Queue(q) | Destination::Stream(q) => Subject::Queue(q),
            _ => Subject::Other,
        };
        self.timed("bind", async {
            let session = self.session().await?;
            self.on_admin(&session, |channel| {
                let bound = &bound;
                async move { bind_on(&channel, bound, unbind).await }
            })
            .await
            .map_err(|e| refusal(self, &e, subject))
        })
        .await?;
        let mut record = self.record.lock();
        let known = record.bindings.iter().position(|b| *b == bound);
        match (unbind, known) {
            (false, None) => record.bindings.push(bound),
            (true, Some(i)) => {
                record.bindings.remove(i);
            }
            _ => {}
        }
        Ok(known.is_some())
    }
}
