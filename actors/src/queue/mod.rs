//! Queues: ready messages waiting for consumers, and deliveries waiting to be settled.
//!
//! - [`state`]: the queue itself, as a pure, deterministic state machine;
//! - [`actor`]: the actor that owns a state machine and talks to consumers;
//! - [`handle`]: typed access to one queue for publishers and consumers;
//! - `inbox`: where publishes wait for the queue, many to a mailbox entry;
//! - [`options`]: what a queue is declared with.

pub mod actor;
pub mod handle;
pub(crate) mod inbox;
pub mod options;
pub mod state;
