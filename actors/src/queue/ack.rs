//! The vocabulary of acknowledgements: how a consumer settles ([`AckMode`]),
//! and the ids that name a consumer ([`ConsumerId`]) and a delivery
//! ([`DeliveryTag`]) within one queue.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies a consumer within a queue. Chosen by the caller (the queue actor), which
/// must not register the same id twice at once.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConsumerId(pub u64);

impl fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Identifies one delivery for settling it. Issued by the queue, strictly increasing
/// from 1; a redelivery gets a new tag. Tag 0 is never issued.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeliveryTag(pub u64);

impl fmt::Display for DeliveryTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// How a consumer's deliveries are settled.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Settled as soon as it is delivered: at-most-once, no prefetch limit.
    Auto,
    /// Settled by an ack or a nack ([`Delivery::ack`](crate::Delivery::ack)):
    /// at-least-once, bounded by
    /// the consumer's prefetch.
    #[default]
    Manual,
}
