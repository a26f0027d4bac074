//! Request-reply over queues: correlation ids, reply-to, deadlines.
//!
//! A [`Requester`] owns an exclusive reply queue and a router actor consuming
//! it. Each request gets a fresh correlation id, the reply queue as `reply_to`,
//! and its deadline in the `x-deadline` header (epoch milliseconds on
//! [`postbox::clock`]); the router hands each reply to whoever waits for that
//! correlation id.
//!
//! A [`Responder`] is a consumer whose handler returns the reply. It skips
//! requests whose deadline has passed (and counts them), tells its handler how
//! much time is left, and sends handler errors back as typed remote errors
//! rather than letting the requester time out.
//!
//! Ways to wait for a reply:
//! - `.await` the request (with `.timeout(d)`);
//! - [`send`](RequestBuilder::send) it and get a [`PendingReply`] at once, to
//!   await or poll later;
//! - [`send_to`](RequestBuilder::send_to) a callback actor, which receives a
//!   [`ReplyEvent`];
//! - [`gather`](RequestBuilder::gather) up to N replies from every responder an
//!   exchange reaches (scatter-gather).
//!
//! A request that nobody can answer (no queue, or no consumer on any queue it
//! reaches) fails at once with [`RequestError::NoResponders`] instead of waiting
//! out its timeout. Replies that arrive after their requester gave up are not
//! dropped silently: they are counted, logged with their correlation id, listed
//! by [`Requester::late_replies`], and, if the requester was built with
//! [`RequesterOptions::late_replies_to`], published to an exchange of your choice
//! (the dead-letter path for replies).
//!
//! With [`RequesterOptions::direct_replies`], responders of the same broker
//! hand replies straight to the waiting request instead of through the reply
//! queue (RabbitMQ's direct reply-to): two of a round trip's four hops fewer.
//!
//! ```
//! use std::time::Duration;
//! use postbox::Runtime;
//! use postbox_actors::{Broker, ConsumeOptions, Envelope, QueueOptions, rpc::Request};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let rt = Runtime::new()?;
//! let broker = Broker::new(&rt);
//! broker.declare_queue("reports", QueueOptions::default()).await?;
//! let _responder = broker
//!     .respond("reports", ConsumeOptions::manual(8), || |req: Request| async move {
//!         let month: String = req.decode()?;
//!         Ok(Envelope::encode(&format!("report for {month}"))?)
//!     })
//!     .await?;
//! let client = broker.requester().await?;
//! let reply = client
//!     .request("reports", Envelope::encode("2026-11")?)
//!     .timeout(Duration::from_secs(5))
//!     .await?;
//! assert_eq!(reply.decode::<String>()?, "report for 2026-11");
//! # Ok(()) }
//! ```

pub(crate) mod direct;
mod requester;
mod responder;

pub use requester::{
    DEFAULT_TIMEOUT, LATE_HEADER, PendingReply, ReplyEvent, RequestBuilder, RequestError,
    RequestId, Requester, RequesterOptions, RequesterStats, Target,
};
pub use responder::{RemoteError, Request, Respond, Responder, ResponderHandle, ResponderStats};

/// Header carrying a request's deadline, in epoch milliseconds.
pub const DEADLINE_HEADER: &str = "x-deadline";
/// Header marking a reply as a remote error; its value is the error message.
pub const ERROR_HEADER: &str = "x-error";
