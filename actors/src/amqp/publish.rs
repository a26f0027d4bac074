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

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Confirmation};

use super::connection::Remote;
use super::convert::{properties, short};
use super::topology::{Subject, refusal};
use crate::envelope::Envelope;
use crate::error::{BrokerError, PublishError};
use crate::queue::policy::Overflow;

/// How RabbitMQ answered one publish.
enum Answer {
    Routed,
    Returned,
    Refused,
}

/// The longest pause between attempts of a publish waiting on a `block`
/// queue.
const BLOCK_PAUSE_MAX: Duration = Duration::from_millis(100);

impl Remote {
    /// Sends one message and waits for its confirm.
    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<Answer, BrokerError> {
        let exchange_name = short(exchange, "an exchange name")?;
        let key = short(routing_key, "a routing key")?;
        let session = self.session().await?;
        let subject = if exchange.is_empty() {
            Subject::Queue(routing_key)
        } else {
            Subject::Exchange(exchange)
        };
        let channel = session
            .publisher()
            .await
            .map_err(|e| refusal(self, &e, subject))?;
        let confirm = channel
            .basic_publish(
                exchange_name,
                key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                props,
            )
            .await
            .map_err(|e| refusal(self, &e, subject))?;
        match confirm.await {
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(Answer::Routed),
            Ok(Confirmation::Ack(Some(_))) => Ok(Answer::Returned),
            Ok(Confirmation::Nack(_)) => Ok(Answer::Refused),
            Err(err) => Err(self.unconfirmed(&err, exchange, subject)),
        }
    }

    /// A confirm that failed: RabbitMQ closed the publishing channel. If it
    /// did for this publish (its exchange is missing), that is the error;
    /// if for another publish sharing the channel, or the connection went,
    /// this one may or may not have been enqueued.
    fn unconfirmed(&self, err: &lapin::Error, exchange: &str, subject: Subject<'_>) -> BrokerError {
        match refusal(self, err, subject) {
            BrokerError::ExchangeNotFound(name) if name == exchange => {
                BrokerError::ExchangeNotFound(name)
            }
            _ => BrokerError::Unconfirmed(self.scrub(err)),
        }
    }

    /// [`Remote::timed`] for a publish: running out of time after the
    /// message may have been sent is `Unconfirmed`, not a refusal.
    async fn timed_publish<T>(
        &self,
        op: impl Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        tokio::time::timeout(self.options.timeout, op)
            .await
            .unwrap_or_else(|_| {
                Err(BrokerError::Unconfirmed(format!(
                    "no confirm within {:?}",
                    self.options.timeout
                )))
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
        let meta = self.record.lock().meta(queue);
        let limit = meta.max_message_bytes.unwrap_or(default_limit);
        let size = message.total_size();
        if size > limit {
            return Err(BrokerError::MessageTooLarge {
                queue: queue.into(),
                size,
                limit,
            });
        }
        let Some(window) = meta.window else {
            return self
                .publish_to_queue_now(queue, message, meta.overflow)
                .await;
        };
        let id = message.id();
        window.admit(id)?;
        let result = self
            .publish_to_queue_now(queue, message, meta.overflow)
            .await;
        if result.is_err() {
            window.forget(id);
        }
        result
    }

    async fn publish_to_queue_now(
        &self,
        queue: &str,
        message: Envelope,
        overflow: Overflow,
    ) -> Result<(), BrokerError> {
        let mut pause = Duration::from_millis(1);
        loop {
            let props = properties(&message, queue)?;
            let answer = self
                .timed_publish(self.send("", queue, message.payload(), props))
                .await?;
            match (answer, overflow) {
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
        let size = message.total_size();
        if size > max_bytes {
            return Err(BrokerError::MessageTooLarge {
                queue: exchange.into(),
                size,
                limit: max_bytes,
            }
            .into());
        }
        let window = if exchange.is_empty() {
            self.record.lock().meta(routing_key).window
        } else {
            self.record.lock().exchange_window(exchange)
        };
        if let Some(window) = &window {
            window.admit(message.id()).map_err(BrokerError::from)?;
        }
        let props = properties(&message, routing_key)?;
        let answer = self
            .timed_publish(self.send(exchange, routing_key, message.payload(), props))
            .await;
        let forget = || {
            if let Some(window) = &window {
                window.forget(message.id());
            }
        };
        match answer {
            Ok(Answer::Routed) => Ok(1),
            Ok(Answer::Returned) => {
                forget();
                if mandatory {
                    return Err(PublishError::Unroutable {
                        exchange: exchange.into(),
                        routing_key: routing_key.into(),
                        message: Box::new(message),
                    });
                }
                Ok(0)
            }
            Ok(Answer::Refused) => {
                forget();
                Err(BrokerError::QueueFull(format!("a queue bound to {exchange:?}")).into())
            }
            Err(err) => {
                forget();
                Err(err.into())
            }
        }
    }

    /// Publishes several messages to `queue` back to back, then waits for
    /// all their confirms: one round trip for the batch.
    pub(crate) async fn publish_batch(
        &self,
        queue: &str,
        messages: Vec<Envelope>,
        max_bytes: usize,
    ) -> Result<(), BrokerError> {
        let meta = self.record.lock().meta(queue);
        let max_bytes = meta.max_message_bytes.unwrap_or(max_bytes);
        if matches!(meta.overflow, Overflow::Block | Overflow::DropNew) || meta.window.is_some() {
            // Refusals to wait out or ignore, ids to admit: one at a time.
            for message in messages {
                self.publish_to_queue(queue, message, max_bytes).await?;
            }
            return Ok(());
        }
        let mut confirms = Vec::with_capacity(messages.len());
        for message in &messages {
            let size = message.total_size();
            if size > max_bytes {
                return Err(BrokerError::MessageTooLarge {
                    queue: queue.into(),
                    size,
                    limit: max_bytes,
                });
            }
        }
        let key = short(queue, "a queue name")?;
        // Every message's properties first: one RabbitMQ cannot carry
        // refuses the batch before any of it is sent.
        let props = messages
            .iter()
            .map(|m| properties(m, queue))
            .collect::<Result<Vec<_>, _>>()?;
        self.timed_publish(async {
            let session = self.session().await?;
            let channel = session
                .publisher()
                .await
                .map_err(|e| refusal(self, &e, Subject::Queue(queue)))?;
            for (message, props) in messages.iter().zip(props) {
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        key.clone(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        message.payload(),
                        props,
                    )
                    .await
                    .map_err(|e| refusal(self, &e, Subject::Queue(queue)))?;
                confirms.push(confirm);
            }
            let mut first_error = None;
            for confirm in confirms {
                let err = match confirm.await {
                    Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => continue,
                    Ok(Confirmation::Ack(Some(_))) => BrokerError::QueueNotFound(queue.into()),
                    Ok(Confirmation::Nack(_)) => BrokerError::QueueFull(queue.into()),
                    Err(err) => BrokerError::Unconfirmed(self.scrub(&err)),
                };
                first_error.get_or_insert(err);
            }
            first_error.map_or(Ok(()), Err)
        })
        .await
    }
}
