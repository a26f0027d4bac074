//! Queues: ready messages waiting for consumers, and deliveries waiting to be
//! settled. Everything a queue does lives here; the broker above only creates
//! queues, routes to them and hands them what they need (a `QueueHost`).
//!
//! - [`state`]: the queue itself, as a pure, deterministic state machine: FIFO
//!   order, round-robin dispatch within prefetch, acknowledgements, requeues,
//!   TTL, length and delivery limits. The documented entry point for using the
//!   rules without actors (simulations, replays, other drivers);
//! - `actor`: the actor that owns a state machine, dispatches to consumers and
//!   hands dead letters to its host;
//! - `delivery`: what a consumer receives and how it settles it, validated on
//!   the consumer's link before the queue sees it;
//! - `handle`: typed access to one queue for publishers and consumers;
//! - `by_id`: what the queue keeps per consumer, found by id (a list of the
//!   few, a hash map of the many);
//! - `consumers`: the consumer count a queue shares with its handles, and
//!   the registrations on their way to it;
//! - `inbox`: where publishes wait for the queue, many to a mailbox entry;
//! - `budget`: the broker-wide memory budget the queues charge, and whose
//!   excess makes the publishers of the queues causing it wait;
//! - `observe`: observers of every queue's traffic (the test kit's capture,
//!   metrics);
//! - `spill`: the tail of a long queue paged out to disk (overflow `spill`);
//! - `options`, `policy`, `ack`, `stats`: what a queue is declared with, the
//!   limits it enforces, the ids of consumers and deliveries, what it reports.

pub(crate) mod ack;
pub(crate) mod actor;
pub(crate) mod budget;
pub(crate) mod by_id;
pub(crate) mod consumers;
pub(crate) mod delivery;
pub(crate) mod handle;
pub(crate) mod inbox;
pub(crate) mod observe;
pub(crate) mod options;
pub(crate) mod policy;
pub(crate) mod spill;
pub mod state;
pub(crate) mod stats;
