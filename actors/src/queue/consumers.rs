//! What an embedded queue shares with its handles about its consumers: how
//! many are registered, and the registrations sent to it that it has not
//! taken yet (claims).
//!
//! A claim lets [`Broker::consume`](crate::Broker::consume) return without
//! waiting for the queue and still keep exclusivity exact: a consumer may
//! claim a place only while no exclusive consumer holds the queue, and an
//! exclusive consumer may take the queue only while no claim is in flight
//! (and, as before, no consumer is registered). Both checks are one
//! compare-and-swap on one word, so one of two racing consumers is always
//! refused, at once, by its own call. A claim also counts as a consumer for
//! readers of [`Consumers::count`] (a request's "no responders" check), so
//! a responder is answerable as soon as `respond` returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use postbox::Recipient;

use crate::queue::actor::{Cancelled, tell_cancelled};

/// The top bit of [`Consumers::claims`]: an exclusive consumer holds the
/// queue. The bits below count the claims in flight.
const EXCLUSIVE: u64 = 1 << 63;

/// A queue's consumers, as its handles see them without asking it.
#[derive(Debug, Default)]
pub(crate) struct Consumers {
    /// Registered consumers, kept up to date by the queue actor.
    registered: AtomicUsize,
    /// Registrations in flight, and [`EXCLUSIVE`].
    claims: AtomicU64,
}

impl Consumers {
    /// Registered consumers, and registrations on their way to the queue.
    pub(crate) fn count(&self) -> usize {
        let in_flight = self.claims.load(Ordering::Acquire) & !EXCLUSIVE;
        self.registered
            .load(Ordering::Relaxed)
            .saturating_add(usize::try_from(in_flight).unwrap_or(usize::MAX))
    }

    /// Registered consumers only (the queue's own view).
    pub(crate) fn registered(&self) -> usize {
        self.registered.load(Ordering::Relaxed)
    }

    /// Sets the registered count; returns the previous one.
    pub(crate) fn set_registered(&self, n: usize) -> usize {
        self.registered.swap(n, Ordering::Relaxed)
    }

    /// A place for a registration sent without waiting, unless an
    /// exclusive consumer holds the queue. If the queue never takes it (it
    /// stops first), `cancelled` is told.
    pub(crate) fn claim(self: &Arc<Self>, cancelled: Recipient<Cancelled>) -> Option<Claim> {
        self.claims
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |claims| {
                (claims & EXCLUSIVE == 0).then_some(claims + 1)
            })
            .ok()?;
        Some(Claim {
            consumers: self.clone(),
            cancelled: Some(cancelled),
        })
    }

    /// The queue takes exclusivity for a consumer: only with no claim in
    /// flight and no exclusive consumer already.
    pub(crate) fn take_exclusive(&self) -> bool {
        self.claims
            .compare_exchange(0, EXCLUSIVE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The exclusive consumer is gone (or was refused after all).
    pub(crate) fn release_exclusive(&self) {
        self.claims.fetch_and(!EXCLUSIVE, Ordering::AcqRel);
    }
}

/// A registration's place, held from `consume` until the queue takes it.
/// Dropped untaken (the queue stopped with it in its mailbox), it tells
/// the consumer that the queue is gone, as a deletion would.
#[derive(Debug)]
pub(crate) struct Claim {
    consumers: Arc<Consumers>,
    cancelled: Option<Recipient<Cancelled>>,
}

impl Claim {
    /// Gives the place back without telling the consumer anything: the
    /// queue registered it (and counts it), or it was never sent.
    pub(crate) fn release(mut self) {
        self.cancelled = None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.consumers.claims.fetch_sub(1, Ordering::AcqRel);
        if let Some(cancelled) = self.cancelled.take() {
            tell_cancelled(&cancelled, true);
        }
    }
}
