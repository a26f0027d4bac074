//! Publishing to RabbitMQ with publisher confirms.
//!
//! Every publish is `mandatory`: RabbitMQ returns a message that reaches no
//! queue, which is how a publish to a missing queue fails with
//! `QueueNotFound` (and an exchange publish reports 0 targets, or
//! `Unroutable` when the caller asked for `mandatory`). A nack is a full
//! queue refusing it (reject-publish): `QueueFull`, except for the overflows
//! RabbitMQ lacks, provided here on top of reject-publish: `block` publishes
//! again after a pause until the queue takes it, `drop-new` counts the
//! refusal as done (RabbitMQ dead-lettered it, with `reject-publish-dlx`).
//! A confirm lost with the connection is [`BrokerError::Unconfirmed`].

use std::time::Duration;

use futures::FutureExt;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};

use super::connection::Remote;
use super::convert::{properties, short};
use super::topology::{Subject, refusal};
use crate::envelope::Envelope;
use crate::error::{BrokerError, PublishError};
use crate::queue::policy::Overflow;

/// How RabbitMQ answered one publish.
pub(crate) enum Answer {
    Routed,
    /// Mandatory and routed nowhere: returned.
    Returned,
    /// Nacked: a full queue refused it (reject-publish).
    Refused,
}

/// The longest pause between attempts of a publish waiting on a `block`
/// queue.
const BLOCK_PAUSE_MAX: Duration = Duration::from_millis(100);

/// What a publish is about, for its errors: the queue (default exchange)
/// or the exchange.
fn subject<'a>(exchange: &'a str, routing_key: &'a str) -> Subject<'a> {
    if exchange.is_empty() {
        Subject::Queue(routing_key)
    } else {
        Subject::Exchange(exchange)
    }
}

/// `MessageTooLarge` if `message` is over `limit`.
fn fits(message: &Envelope, target: &str, limit: usize) -> Result<(), BrokerError> {
    let size = message.total_size();
    if size > limit {
        return Err(BrokerError::MessageTooLarge {
            queue: target.into(),
            size,
            limit,
        });
    }
    Ok(())
}

impl Remote {
    /// Sends one message, `mandatory`, on `channel` (in confirm mode);
    /// returns its confirm to await with [`answer`](Self::answer).
    pub(crate) async fn publish_on(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<PublisherConfirm, BrokerError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        self.check_exchange(exchange).await?;
        channel
            .basic_publish(
                short(exchange, "an exchange name")?,
                short(routing_key, "a routing key")?,
                options,
                payload,
                props,
            )
            .await
            .map_err(|err| match err.kind() {
                lapin::ErrorKind::ProtocolError(_) => {
                    refusal(self, &err, subject(exchange, routing_key))
                }
                // The connection went as it was sent: it may have arrived.
                _ => BrokerError::Unconfirmed(self.scrub(&err)),
            })
    }

    /// What a confirm says. A confirm that failed means RabbitMQ closed the
    /// channel: if it did for this publish (its exchange is missing), that
    /// is the error; if for another publish sharing the channel, or the
    /// connection went, this one may or may not have been enqueued.
    pub(crate) async fn answer(
        &self,
        confirm: PublisherConfirm,
        exchange: &str,
        routing_key: &str,
    ) -> Result<Answer, BrokerError> {
        match confirm.await {
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(Answer::Routed),
            Ok(Confirmation::Ack(Some(_))) => Ok(Answer::Returned),
            Ok(Confirmation::Nack(_)) => Ok(Answer::Refused),
            Err(err) => match refusal(self, &err, subject(exchange, routing_key)) {
                BrokerError::ExchangeNotFound(name) if name == exchange => {
                    self.exchanges_known.write().remove(exchange);
                    Err(BrokerError::ExchangeNotFound(name))
                }
                _ => Err(BrokerError::Unconfirmed(self.scrub(&err))),
            },
        }
    }

    /// Sends one message on the shared publishing channel and waits for its
    /// confirm; running out of time is `Unconfirmed` (it may have been
    /// sent), not a refusal.
    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Envelope,
    ) -> Result<Answer, BrokerError> {
        let props = properties(message, routing_key)?;
        self.timed_publish(async {
            let session = self.session().await?;
            let channel = session
                .publisher()
                .await
                .map_err(|e| refusal(self, &e, subject(exchange, routing_key)))?;
            let confirm = self
                .publish_on(&channel, exchange, routing_key, message.payload(), props)
                .await?;
            self.answer(confirm, exchange, routing_key).await
        })
        .await
    }

    /// [`Remote::timed`] for a publish: running out of time after the
    /// message may have been sent is `Unconfirmed`, not a refusal.
    pub(crate) fn timed_publish<T>(
        &self,
        op: impl Future<Output = Result<T, BrokerError>>,
    ) -> impl Future<Output = Result<T, BrokerError>> {
        // Not an `async fn`, as `Remote::timed`.
        let timeout = self.options.timeout;
        tokio::time::timeout(timeout, op).map(move |done| {
            done.unwrap_or_else(|_| {
                Err(BrokerError::Unconfirmed(format!(
                    "no confirm within {timeout:?}"
                )))
            })
        })
    }

    /// Publishes to `queue` through the default exchange, confirmed. The
    /// size limit is the queue's own, if this process declared it with
    /// one, else `default_limit`.
    pub(crate) async fn publish_to_queue(
        &self,
        queue: &str,
        message: Envelope,
        default_limit: usize,
    ) -> Result<(), BrokerError> {
        let declared = self.record.lock().queue(queue);
        let options = declared.as_ref().map(|d| &d.options);
        let limit = options
            .and_then(|o| o.max_message_bytes)
            .unwrap_or(default_limit);
        fits(&message, queue, limit)?;
        let overflow = options.map_or(Overflow::DropHead, |o| o.overflow);
        let Some(window) = declared.as_ref().and_then(|d| d.window.as_ref()) else {
            return self.publish_to_queue_now(queue, &message, overflow).await;
        };
        let id = message.id();
        window.admit(id)?;
        let result = self.publish_to_queue_now(queue, &message, overflow).await;
        if result.is_err() {
            window.forget(id);
        }
        result
    }

    async fn publish_to_queue_now(
        &self,
        queue: &str,
        message: &Envelope,
        overflow: Overflow,
    ) -> Result<(), BrokerError> {
        let mut pause = Duration::from_millis(1);
        loop {
            match (self.send("", queue, message).await?, overflow) {
                (Answer::Routed, _) => return Ok(()),
                (Answer::Returned, _) => return Err(BrokerError::QueueNotFound(queue.into())),
                (Answer::Refused, Overflow::DropNew) => return Ok(()),
                (Answer::Refused, Overflow::Block) => {
                    if self.is_closed() {
                        return Err(BrokerError::Stopped);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(BLOCK_PAUSE_MAX);
                }
                (Answer::Refused, _) => return Err(BrokerError::QueueFull(queue.into())),
            }
        }
    }

    /// Publishes through `exchange`; returns 1 if RabbitMQ routed it
    /// (RabbitMQ does not say to how many queues), 0 if not.
    pub(crate) async fn publish_to_exchange(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Envelope,
        mandatory: bool,
        max_bytes: usize,
    ) -> Result<usize, PublishError> {
        fits(&message, exchange, max_bytes)?;
        let window = if exchange.is_empty() {
            self.record
                .lock()
                .queue(routing_key)
                .and_then(|d| d.window.clone())
        } else {
            self.record
                .lock()
                .exchange(exchange)
                .and_then(|d| d.window.clone())
        };
        if let Some(window) = &window {
            window.admit(message.id()).map_err(BrokerError::from)?;
        }
        let answer = self.send(exchange, routing_key, &message).await;
        if !matches!(answer, Ok(Answer::Routed))
            && let Some(window) = &window
        {
            window.forget(message.id());
        }
        match answer? {
            Answer::Routed => Ok(1),
            Answer::Returned if mandatory => Err(PublishError::Unroutable {
                exchange: exchange.into(),
                routing_key: routing_key.into(),
                message: Box::new(message),
            }),
            Answer::Returned => Ok(0),
            Answer::Refused => {
                Err(BrokerError::QueueFull(format!("a queue bound to {exchange:?}")).into())
            }
        }
    }

    /// Publishes several messages to `queue` back to back, then waits for
    /// all their confirms: one round trip for the batch.
    pub(crate) async fn publish_batch(
        &self,
        queue: &str,
        messages: Vec<Envelope>,
        default_limit: usize,
    ) -> Result<(), BrokerError> {
        let declared = self.record.lock().queue(queue);
        if declared.as_ref().is_some_and(|d| {
            d.window.is_some() || matches!(d.options.overflow, Overflow::Block | Overflow::DropNew)
        }) {
            // Refusals to wait out or ignore, ids to admit: one at a time.
            for message in messages {
                self.publish_to_queue(queue, message, default_limit).await?;
            }
            return Ok(());
        }
        let limit = declared
            .and_then(|d| d.options.max_message_bytes)
            .unwrap_or(default_limit);
        // Every message is checked first: one that is too large, or that
        // RabbitMQ cannot carry, refuses the batch before any of it is sent.
        let props = messages
            .iter()
            .map(|m| {
                fits(m, queue, limit)?;
                properties(m, queue)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.timed_publish(async {
            let session = self.session().await?;
            let channel = session
                .publisher()
                .await
                .map_err(|e| refusal(self, &e, Subject::Queue(queue)))?;
            let mut confirms = Vec::with_capacity(messages.len());
            for (message, props) in messages.iter().zip(props) {
                confirms.push(
                    self.publish_on(&channel, "", queue, message.payload(), props)
                        .await?,
                );
            }
            let mut first_error = None;
            for confirm in confirms {
                let err = match self.answer(confirm, "", queue).await {
                    Ok(Answer::Routed) => continue,
                    Ok(Answer::Returned) => BrokerError::QueueNotFound(queue.into()),
                    Ok(Answer::Refused) => BrokerError::QueueFull(queue.into()),
                    Err(err) => err,
                };
                first_error.get_or_insert(err);
            }
            first_error.map_or(Ok(()), Err)
        })
        .await
    }
}
