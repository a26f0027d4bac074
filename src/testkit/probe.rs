//! [`TestProbe`]: an actor that records the messages it receives, and
//! expectations that wait for them.
//!
//! A probe is a real actor ([`ProbeActor`]), spawned like any other, so the code
//! under test talks to it through an ordinary [`Addr`] or [`Recipient`]:
//! backpressure, asks and death watch behave as they would with a real
//! collaborator. The probe forwards each message to the test over an unbounded
//! channel, so its own mailbox never fills up.
//!
//! Expectations take `&mut self`, wait at most their timeout (virtual time if
//! the clock is paused), and consume the messages they return. On failure,
//! the panicking forms (`expect_*`, `receive_n`) panic with a message that says
//! what was expected and what arrived instead; the `try_*` forms return the
//! same text as a [`ProbeError`].

use std::fmt::{self, Debug, Write as _};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::actor::{Actor, Handler, Message};
use crate::addr::{Addr, Recipient};
use crate::context::Context;
use crate::failure::Failure;
use crate::runtime::RuntimeHandle;

/// How many messages a failure message lists before it abbreviates.
const SHOWN: usize = 20;

/// What kind of expectation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeErrorKind {
    /// The awaited message did not arrive in time.
    Timeout,
    /// A message arrived that the expectation did not allow.
    Unexpected,
    /// The probe's actor stopped, so nothing more can arrive.
    Stopped,
}

/// A failed expectation: what was expected, and what arrived instead.
///
/// Its [`Display`](fmt::Display) text is the message the panicking form of the
/// same expectation panics with.
///
/// ```
/// use std::time::Duration;
/// use postbox::testkit::{self, ProbeErrorKind, TestProbe};
/// use postbox::RuntimeHandle;
///
/// #[derive(Debug)]
/// struct Ping;
/// impl postbox::Message for Ping { type Reply = (); }
///
/// testkit::run(async {
///     let mut probe = TestProbe::<Ping>::new(&RuntimeHandle::local());
///     let err = probe.try_expect_msg(Duration::from_secs(1)).await.unwrap_err();
///     assert_eq!(err.kind(), ProbeErrorKind::Timeout);
///     assert_eq!(err.to_string(), "expect_msg: timeout (1s) waiting for a message; received nothing");
/// });
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeError {
    kind: ProbeErrorKind,
    message: String,
}

impl ProbeError {
    /// An error of `kind` with the given text; for test helpers built on the kit.
    pub fn new(kind: ProbeErrorKind, message: impl Into<String>) -> ProbeError {
        ProbeError {
            kind,
            message: message.into(),
        }
    }

    /// What kind of expectation failed.
    pub fn kind(&self) -> ProbeErrorKind {
        self.kind
    }

    /// The readable description (the same as the `Display` text).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ProbeError {}

/// Formats a list of messages as `[a, b, c]`, abbreviated past [`SHOWN`] items.
fn show<T: Debug>(items: &[T]) -> String {
    let mut out = String::from("[");
    for (i, item) in items.iter().take(SHOWN).enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{item:?}");
    }
    if items.len() > SHOWN {
        let _ = write!(out, ", ... and {} more", items.len() - SHOWN);
    }
    out.push(']');
    out
}

type Reply<M> = Arc<dyn Fn(&M) -> <M as Message>::Reply + Send + Sync>;

/// The actor behind a [`TestProbe`]: it answers each `M` (see
/// [`TestProbe::replying`]) and hands the message to the test.
pub struct ProbeActor<M: Message> {
    tx: mpsc::UnboundedSender<M>,
    reply: Reply<M>,
}

impl<M: Message> std::fmt::Debug for ProbeActor<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeActor").finish_non_exhaustive()
    }
}

impl<M: Message> Actor for ProbeActor<M> {}

impl<M: Message> Handler<M> for ProbeActor<M> {
    async fn handle(&mut self, msg: M, _: &mut Context<Self>) -> Result<M::Reply, Failure> {
        let reply = (self.reply)(&msg);
        // If the test dropped its probe, nobody will look at the message.
        let _ = self.tx.send(msg);
        Ok(reply)
    }
}

/// An actor address that records what it receives, with expectations on it.
///
/// Hand [`recipient`](Self::recipient) (or [`addr`](Self::addr)) to the code
/// under test, then await expectations on the probe. Messages are returned in
/// the order the probe received them.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use postbox::testkit::{self, TestProbe};
/// use postbox::{Message, RuntimeHandle};
///
/// #[derive(Debug, PartialEq)]
/// enum Event { Started(u32), Stopped(u32) }
/// impl Message for Event { type Reply = (); }
///
/// testkit::run(async {
///     let mut probe = TestProbe::<Event>::new(&RuntimeHandle::local());
///     let events = probe.recipient(); // what the code under test gets
///     for id in [1, 2] {
///         events.send(Event::Started(id)).await.unwrap();
///     }
///     events.send(Event::Stopped(1)).await.unwrap();
///
///     let second = Duration::from_secs(1);
///     assert_eq!(probe.expect_msg(second).await, Event::Started(1));
///     // Skips Started(2), which does not match:
///     let stopped = probe.expect_msg_matching(|e| matches!(e, Event::Stopped(_)), second).await;
///     assert_eq!(stopped, Event::Stopped(1));
///     probe.expect_no_msg(second).await;
/// });
/// ```
pub struct TestProbe<M: Message> {
    addr: Addr<ProbeActor<M>>,
    rx: mpsc::UnboundedReceiver<M>,
}

impl<M: Message> Debug for TestProbe<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestProbe")
            .field("addr", &self.addr)
            .field("waiting", &self.rx.len())
            .finish()
    }
}

impl<M: Message<Reply = ()>> TestProbe<M> {
    /// Spawns a probe for one-way messages on `runtime`.
    ///
    /// With a local handle, call it inside [`run`](super::run) or
    /// [`local`](super::local) (spawning needs the `LocalSet`).
    pub fn new(runtime: &RuntimeHandle) -> TestProbe<M> {
        TestProbe::replying(runtime, |_| ())
    }
}

impl<M: Message> TestProbe<M> {
    /// Spawns a probe that answers asks with `reply(&msg)` (like an Akka
    /// auto-pilot), for messages whose reply is not `()`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use postbox::testkit::{self, TestProbe};
    /// use postbox::{Message, RuntimeHandle};
    ///
    /// #[derive(Debug)]
    /// struct Price(&'static str);
    /// impl Message for Price { type Reply = u32; }
    ///
    /// testkit::run(async {
    ///     let mut probe = TestProbe::replying(&RuntimeHandle::local(), |p: &Price| p.0.len() as u32);
    ///     assert_eq!(probe.addr().ask(Price("tea")).await.unwrap(), 3);
    ///     assert_eq!(probe.expect_msg(Duration::from_secs(1)).await.0, "tea");
    /// });
    /// ```
    pub fn replying(
        runtime: &RuntimeHandle,
        reply: impl Fn(&M) -> M::Reply + Send + Sync + 'static,
    ) -> TestProbe<M> {
        let (tx, rx) = mpsc::unbounded_channel();
        let reply: Reply<M> = Arc::new(reply);
        let addr = runtime
            .build(move || {
                Some(ProbeActor {
                    tx: tx.clone(),
                    reply: reply.clone(),
                })
            })
            .name("test-probe")
            .spawn();
        TestProbe { addr, rx }
    }

    /// The probe actor's address.
    pub fn addr(&self) -> &Addr<ProbeActor<M>> {
        &self.addr
    }

    /// The probe as a [`Recipient`], to hand to the code under test.
    pub fn recipient(&self) -> Recipient<M> {
        self.addr.recipient()
    }

    /// The next message if one has already arrived; never waits.
    pub fn try_receive(&mut self) -> Option<M> {
        self.rx.try_recv().ok()
    }

    /// Waits up to `timeout` for the next message.
    ///
    /// # Errors
    ///
    /// [`ProbeErrorKind::Timeout`] if none arrives in time,
    /// [`ProbeErrorKind::Stopped`] if the probe's actor has stopped.
    pub async fn try_expect_msg(&mut self, timeout: Duration) -> Result<M, ProbeError> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(stopped("expect_msg", "waiting for a message", "nothing")),
            Err(_) => Err(ProbeError::new(
                ProbeErrorKind::Timeout,
                format!(
                    "expect_msg: timeout ({timeout:?}) waiting for a message; received nothing"
                ),
            )),
        }
    }

    /// Waits up to `timeout` for the next message and returns it.
    ///
    /// # Panics
    ///
    /// With the text of [`try_expect_msg`](Self::try_expect_msg)'s error, if no
    /// message arrives in time.
    pub async fn expect_msg(&mut self, timeout: Duration) -> M {
        self.try_expect_msg(timeout)
            .await
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// Waits up to `timeout` for `n` messages (the timeout covers all of them).
    ///
    /// # Errors
    ///
    /// [`ProbeErrorKind::Timeout`] (or `Stopped`) showing the messages that did
    /// arrive; those are consumed.
    pub async fn try_receive_n(&mut self, n: usize, timeout: Duration) -> Result<Vec<M>, ProbeError>
    where
        M: Debug,
    {
        let deadline = crate::clock::deadline(timeout);
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(msg)) => got.push(msg),
                Ok(None) => {
                    let what = format!("waiting for {n} messages");
                    let so_far = format!("{}: {}", got.len(), show(&got));
                    return Err(stopped("receive_n", &what, &so_far));
                }
                Err(_) => {
                    return Err(ProbeError::new(
                        ProbeErrorKind::Timeout,
                        format!(
                            "receive_n: timeout ({timeout:?}) waiting for {n} messages; received {}: {}",
                            got.len(),
                            show(&got)
                        ),
                    ));
                }
            }
        }
        Ok(got)
    }

    /// Waits up to `timeout` for `n` messages and returns them in order.
    ///
    /// # Panics
    ///
    /// If fewer arrive in time, showing those that did.
    pub async fn receive_n(&mut self, n: usize, timeout: Duration) -> Vec<M>
    where
        M: Debug,
    {
        self.try_receive_n(n, timeout)
            .await
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// Waits up to `timeout` for a message that satisfies `pred`, skipping (and
    /// dropping) the ones that do not.
    ///
    /// # Errors
    ///
    /// [`ProbeErrorKind::Timeout`] (or `Stopped`) showing the messages that
    /// arrived and did not match.
    pub async fn try_expect_msg_matching(
        &mut self,
        mut pred: impl FnMut(&M) -> bool,
        timeout: Duration,
    ) -> Result<M, ProbeError>
    where
        M: Debug,
    {
        let deadline = crate::clock::deadline(timeout);
        let mut skipped = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(msg)) if pred(&msg) => return Ok(msg),
                Ok(Some(msg)) => skipped.push(msg),
                Ok(None) => {
                    let instead = instead(&skipped);
                    return Err(stopped(
                        "expect_msg_matching",
                        "waiting for a matching message",
                        &instead,
                    ));
                }
                Err(_) => {
                    return Err(ProbeError::new(
                        ProbeErrorKind::Timeout,
                        format!(
                            "expect_msg_matching: timeout ({timeout:?}) waiting for a matching message; received {}",
                            instead(&skipped)
                        ),
                    ));
                }
            }
        }
    }

    /// Waits up to `timeout` for a message that satisfies `pred` and returns it;
    /// messages that do not match are dropped.
    ///
    /// # Panics
    ///
    /// If none matches in time, listing those that arrived instead.
    pub async fn expect_msg_matching(
        &mut self,
        pred: impl FnMut(&M) -> bool,
        timeout: Duration,
    ) -> M
    where
        M: Debug,
    {
        self.try_expect_msg_matching(pred, timeout)
            .await
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// Waits up to `timeout` for the next message and checks that it equals
    /// `expected`.
    ///
    /// # Errors
    ///
    /// [`ProbeErrorKind::Unexpected`] showing the message that arrived instead
    /// (it is consumed), or `Timeout`/`Stopped`.
    pub async fn try_expect_msg_eq(
        &mut self,
        expected: M,
        timeout: Duration,
    ) -> Result<M, ProbeError>
    where
        M: Debug + PartialEq,
    {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(msg)) if msg == expected => Ok(msg),
            Ok(Some(msg)) => Err(ProbeError::new(
                ProbeErrorKind::Unexpected,
                format!("expect_msg_eq: expected {expected:?}, received {msg:?}"),
            )),
            Ok(None) => Err(stopped(
                "expect_msg_eq",
                &format!("waiting for {expected:?}"),
                "nothing",
            )),
            Err(_) => Err(ProbeError::new(
                ProbeErrorKind::Timeout,
                format!(
                    "expect_msg_eq: timeout ({timeout:?}) waiting for {expected:?}; received nothing"
                ),
            )),
        }
    }

    /// Waits up to `timeout` for the next message, which must equal `expected`.
    ///
    /// # Panics
    ///
    /// If another message arrives (showing it), or none does in time.
    pub async fn expect_msg_eq(&mut self, expected: M, timeout: Duration) -> M
    where
        M: Debug + PartialEq,
    {
        self.try_expect_msg_eq(expected, timeout)
            .await
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// Checks that no message arrives within `duration`. With `Duration::ZERO`
    /// it checks that none has arrived so far.
    ///
    /// # Errors
    ///
    /// [`ProbeErrorKind::Unexpected`] showing the message that arrived and when
    /// (it is consumed).
    pub async fn try_expect_no_msg(&mut self, duration: Duration) -> Result<(), ProbeError>
    where
        M: Debug,
    {
        let start = Instant::now();
        match tokio::time::timeout(duration, self.rx.recv()).await {
            Ok(Some(msg)) => Err(ProbeError::new(
                ProbeErrorKind::Unexpected,
                format!(
                    "expect_no_msg: expected no message for {duration:?}, received {msg:?} after {:?}",
                    start.elapsed()
                ),
            )),
            // A stopped probe receives nothing: the expectation holds.
            Ok(None) | Err(_) => Ok(()),
        }
    }

    /// Checks that no message arrives within `duration`.
    ///
    /// # Panics
    ///
    /// If one does, showing it.
    pub async fn expect_no_msg(&mut self, duration: Duration)
    where
        M: Debug,
    {
        if let Err(err) = self.try_expect_no_msg(duration).await {
            panic!("{err}");
        }
    }
}

fn instead<T: Debug>(skipped: &[T]) -> String {
    if skipped.is_empty() {
        "nothing".to_string()
    } else {
        format!("instead: {}", show(skipped))
    }
}

fn stopped(what: &str, waiting: &str, received: &str) -> ProbeError {
    ProbeError::new(
        ProbeErrorKind::Stopped,
        format!("{what}: the probe's actor stopped while {waiting}; received {received}"),
    )
}
