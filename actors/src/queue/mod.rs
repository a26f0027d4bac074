//! Queues: ready messages waiting for consumers, and deliveries waiting to be settled.
//!
//! - [`state`]: the queue itself, as a pure, deterministic state machine;
//! - [`actor`]: the actor that owns a state machine and talks to consumers;
//! - [`handle`]: typed access to one queue for publishers and consumers;
//! - [`options`]: what a queue is declared with.

pub mod actor;
pub mod handle;
pub mod options;
pub mod state;
