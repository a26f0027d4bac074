//! Direct replies: a responder hands its reply straight to the waiting
//! requester, without the reply queue (RabbitMQ's "direct reply-to").
//!
//! A [`Requester`](super::Requester) built with
//! [`RequesterOptions::direct_replies`](super::RequesterOptions::direct_replies)
//! registers its reply queue's name here. A [`Responder`](super::Responder) of
//! the same broker looks `reply_to` up before publishing: if that requester is
//! alive, the reply goes to its waiter at once, in the responder's task. That
//! saves the reply queue and the router actor, two of a round trip's four
//! hops. Anything else that replies (a plain consumer publishing to
//! `reply_to`, a responder on another broker) still goes through the reply
//! queue, which stays declared.
//!
//! What a direct reply skips: the reply queue's counters and the broker's
//! observers (the test kit's capture) do not see it.

use std::sync::{Arc, Weak};

use bytestring::ByteString;
use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashMap;

use super::requester::{Pending, forward_late};
use crate::broker::Broker;
use crate::envelope::Envelope;

/// Where a direct reply goes: the requester's table of waiters.
pub(crate) struct DirectSink {
    pub(crate) pending: Arc<Mutex<Pending>>,
    pub(crate) late_replies: Option<(Broker, String, String)>,
}

impl DirectSink {
    /// Hands `reply` to its waiter; a late one takes the requester's late path.
    pub(crate) async fn deliver(&self, reply: Envelope) {
        let late = self.pending.lock().route(reply);
        if let Some(reply) = late {
            forward_late(self.late_replies.as_ref(), reply).await;
        }
    }
}

/// A broker's requesters that take direct replies, by reply queue name.
#[derive(Default)]
pub(crate) struct DirectReplies {
    sinks: RwLock<FxHashMap<ByteString, Weak<DirectSink>>>,
}

impl DirectReplies {
    pub(crate) fn register(&self, reply_queue: ByteString, sink: &Arc<DirectSink>) {
        self.sinks.write().insert(reply_queue, Arc::downgrade(sink));
    }

    pub(crate) fn unregister(&self, reply_queue: &str) {
        self.sinks.write().remove(reply_queue);
    }

    /// The live requester whose reply queue is `reply_to`, if it takes direct replies.
    pub(crate) fn find(&self, reply_to: &str) -> Option<Arc<DirectSink>> {
        self.sinks.read().get(reply_to).and_then(Weak::upgrade)
    }
}
