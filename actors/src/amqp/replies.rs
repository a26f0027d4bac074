//! Request-reply on RabbitMQ through direct reply-to: a requester's channel
//! consumes the pseudo-queue `amq.rabbitmq.reply-to` and publishes its
//! requests itself, so replies come straight back to it with no reply queue
//! declared (RabbitMQ's recommended way).
//!
//! The channel is the requester's address: if the connection is lost, the
//! next request opens a new channel (a new address), and replies to requests
//! sent on the old one cannot arrive; those requests time out.

use std::sync::Arc;

use futures::StreamExt;
use futures::future::BoxFuture;
use lapin::Channel;
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;

use super::connection::Remote;
use super::convert::{envelope, properties};
use super::publish::Answer;
use super::topology::{Subject, refusal};
use crate::envelope::Envelope;
use crate::error::BrokerError;

/// The pseudo-queue RabbitMQ delivers direct replies from.
pub(crate) const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Where replies go once they arrive.
pub(crate) type Route = Arc<dyn Fn(Envelope) + Send + Sync>;

/// A requester's channel on RabbitMQ.
pub(crate) struct Replies {
    remote: Arc<Remote>,
    route: Route,
    current: tokio::sync::Mutex<Option<Open>>,
    /// Queues seen with consumers lately, and when: a request to one of
    /// them skips the check (a round trip) for [`ANSWERABLE_FOR`].
    answerable: parking_lot::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// How long a queue seen with consumers counts as answerable without
/// asking again.
const ANSWERABLE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

struct Open {
    channel: Channel,
    pump: tokio::task::JoinHandle<()>,
    /// How long to wait for the requests in flight before closing.
    timeout: std::time::Duration,
}

impl Drop for Open {
    fn drop(&mut self) {
        let (channel, timeout) = (self.channel.clone(), self.timeout);
        let pump = self.pump.abort_handle();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    // lapin sends a `channel.close` ahead of publishes still
                    // queued on the channel, and RabbitMQ closes the whole
                    // connection on a publish after a close: the requests in
                    // flight are confirmed (so sent) first.
                    let _ = tokio::time::timeout(timeout, channel.wait_for_confirms()).await;
                    let _ = channel.close(200, "requester gone".into()).await;
                    // Only now: the reply consumer the pump holds, dropped
                    // while lapin counts it active, makes lapin send a
                    // `basic.cancel` of its own, which could follow the
                    // close (a connection error too). Closed, it is
                    // cancelled, and its drop sends nothing.
                    pump.abort();
                });
            }
            Err(_) => pump.abort(),
        }
    }
}

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replies").finish_non_exhaustive()
    }
}

/// How RabbitMQ took a request.
pub(crate) enum Sent {
    Routed,
    /// It reached no queue (a mandatory publish, returned).
    Unroutable,
}

impl Replies {
    /// A requester's channel; replies are handed to `route`.
    pub(crate) async fn open(remote: &Arc<Remote>, route: Route) -> Result<Replies, BrokerError> {
        let replies = Replies {
            remote: remote.clone(),
            route,
            current: tokio::sync::Mutex::new(None),
            answerable: parking_lot::Mutex::default(),
        };
        replies.channel().await?;
        Ok(replies)
    }

    /// The channel, opened again (consuming replies) if it was lost.
    async fn channel(&self) -> Result<Channel, BrokerError> {
        let mut current = self.current.lock().await;
        if let Some(open) = current.as_ref().filter(|o| o.channel.status().connected()) {
            return Ok(open.channel.clone());
        }
        let remote = &self.remote;
        let open = remote
            .timed("opening the reply channel", async {
                let channel = remote.own_channel(Subject::Other).await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| refusal(remote, &e, Subject::Other))?;
                let mut consumer = channel
                    .basic_consume(
                        REPLY_TO.into(),
                        "".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| refusal(remote, &e, Subject::Other))?;
                let route = self.route.clone();
                let pump = tokio::spawn(async move {
                    while let Some(Ok(d)) = consumer.next().await {
                        route(envelope(
                            d.data,
                            d.exchange.as_str(),
                            d.routing_key.as_str(),
                            d.redelivered,
                            &d.properties,
                        ));
                    }
                });
                Ok(Open {
                    channel,
                    pump,
                    timeout: remote.options.timeout,
                })
            })
            .await?;
        let channel = open.channel.clone();
        *current = Some(open);
        Ok(channel)
    }

    /// Publishes a request (its `reply_to` set to [`REPLY_TO`]) on the
    /// requester's channel; returns once it is sent, with what RabbitMQ will
    /// say of it (its confirm) to await: a requester waiting for the reply
    /// races the two, since the reply says the request arrived.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Envelope,
    ) -> Result<BoxFuture<'static, Result<Sent, BrokerError>>, BrokerError> {
        let props = properties(message, routing_key)?;
        let remote = &self.remote;
        let confirm = remote
            .timed_publish(async {
                let channel = self.channel().await?;
                remote
                    .publish_on(&channel, exchange, routing_key, message.payload(), props)
                    .await
            })
            .await?;
        let (remote, exchange, routing_key) = (
            remote.clone(),
            exchange.to_string(),
            routing_key.to_string(),
        );
        Ok(Box::pin(async move {
            let answer = remote
                .timed_publish(remote.answer(confirm, &exchange, &routing_key))
                .await?;
            match answer {
                Answer::Routed => Ok(Sent::Routed),
                Answer::Returned => Ok(Sent::Unroutable),
                Answer::Refused => Err(BrokerError::QueueFull(routing_key)),
            }
        }))
    }

    /// Whether `queue` has consumers (false if it does not exist): whether
    /// a request to it can be answered. A queue that had some less than
    /// [`ANSWERABLE_FOR`] ago is not asked again.
    pub(crate) async fn answerable(&self, queue: &str) -> bool {
        if let Some(seen) = self.answerable.lock().get(queue)
            && seen.elapsed() < ANSWERABLE_FOR
        {
            return true;
        }
        let consumers = match self.remote.passive(queue).await {
            Ok((_, consumers)) => consumers,
            Err(_) => 0,
        };
        let mut answerable = self.answerable.lock();
        if consumers == 0 {
            answerable.remove(queue);
            return false;
        }
        if answerable.len() >= 1024 {
            answerable.retain(|_, seen| seen.elapsed() < ANSWERABLE_FOR);
        }
        answerable.insert(queue.to_string(), std::time::Instant::now());
        true
    }
}
