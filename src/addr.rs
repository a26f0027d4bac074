//! Addresses: [`Addr`] (typed by actor), [`Recipient`] (typed by message) and
//! [`AnyAddr`] (untyped: identity, stats, stop, death watch).
//!
//! Every mailbox is bounded. [`Addr::send`] waits for room when the mailbox is
//! full, so a slow actor slows its senders down instead of growing without bound;
//! [`Addr::try_send`] fails at once with [`TrySendError::Full`] and hands the
//! message back. Sending to an actor that has stopped for good gives `Closed`,
//! again with the message.
//!
//! ```
//! # use postbox::{Actor, Context, Failure, Handler, Message, Runtime};
//! # #[derive(Default)] struct Echo;
//! # impl Actor for Echo {}
//! # struct Hi; impl Message for Hi { type Reply = &'static str; }
//! # impl Handler<Hi> for Echo {
//! #     async fn handle(&mut self, _: Hi, _: &mut Context<Self>) -> Result<&'static str, Failure> { Ok("hi") }
//! # }
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let rt = Runtime::new().unwrap();
//! let addr = rt.spawn(Echo);
//! addr.send(Hi).await.unwrap(); // one-way: waits while the mailbox is full
//! let reply = addr.ask(Hi).timeout(std::time::Duration::from_secs(1)).await; // request-reply
//! assert_eq!(reply.unwrap(), "hi");
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::mailbox;

use crate::actor::{Actor, Handler, Message};
use crate::ask::{Ask, AskError};
use crate::envelope::{Envelope, Tell};
use crate::failure::ExitReason;

/// A process-unique actor identity, stable across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorId(pub u64);

impl ActorId {
    pub(crate) fn next() -> ActorId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ActorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "actor#{}", self.0)
    }
}

/// Out-of-band commands to an actor's cell. They bypass the (possibly full)
/// mailbox so that a supervisor can always reach its children.
#[derive(Debug)]
pub(crate) enum Control {
    /// Stop for good. `report` tells the cell whether to tell its parent.
    Stop { report: bool },
    /// Restart the given incarnation (ignored if it already ended) after `delay`.
    Restart { incarnation: u64, delay: Duration },
}

/// An actor's control inbox: a queue and a wake-up for its cell (the only
/// reader). Lighter than a channel: nothing is allocated until a command is
/// sent, and most actors never get one. The cell polls it before every
/// message, so the empty case is one atomic load (and a waker registration
/// when the cell is about to sleep).
#[derive(Default)]
pub(crate) struct ControlBox {
    /// Commands queued and not yet taken.
    pending: AtomicUsize,
    queue: Mutex<VecDeque<Control>>,
    cell: AtomicWaker,
}

impl ControlBox {
    /// Queues a command for the cell.
    pub(crate) fn send(&self, command: Control) {
        self.queue.lock().push_back(command);
        self.pending.fetch_add(1, Ordering::Release);
        self.cell.wake();
    }

    /// The next command, waiting for one. Cancel-safe: a command is only
    /// taken when this resolves.
    pub(crate) fn recv(&self) -> impl Future<Output = Control> + '_ {
        std::future::poll_fn(|cx| {
            if self.pending.load(Ordering::Acquire) == 0 {
                self.cell.register(cx.waker());
                if self.pending.load(Ordering::Acquire) == 0 {
                    return Poll::Pending;
                }
            }
            // Queued before `pending` was raised, so it is there.
            match self.queue.lock().pop_front() {
                Some(command) => {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    Poll::Ready(command)
                }
                None => Poll::Pending,
            }
        })
    }
}

type Watcher = Box<dyn FnOnce(ExitReason) + Send>;

struct Life {
    incarnation: u64,
    terminated: bool,
    /// The most recently ended incarnation and why it ended, for late
    /// watchers. Boxed: most actors are alive, and every actor has a `Life`.
    last_exit: Option<Box<(u64, ExitReason)>>,
    watchers: Vec<(u64, Watcher)>,
}

/// State shared by every address of one actor and by its cell.
pub(crate) struct Shared {
    pub(crate) id: ActorId,
    pub(crate) name: Option<Arc<str>>,
    pub(crate) control: ControlBox,
    pub(crate) handled: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) restarts: AtomicU64,
    life: Mutex<Life>,
    /// The mailbox's (queued, capacity) for untyped handles: the mailbox's
    /// own shared state, seen through a trait (no allocation of its own).
    mailbox: Arc<dyn mailbox::Load>,
}

impl Shared {
    pub(crate) fn new<M: Send + 'static>(name: Option<Arc<str>>, tx: &mailbox::Sender<M>) -> Self {
        Shared {
            mailbox: tx.load(),
            id: ActorId::next(),
            name,
            control: ControlBox::default(),
            handled: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            life: Mutex::new(Life {
                incarnation: 0,
                terminated: false,
                last_exit: None,
                watchers: Vec::new(),
            }),
        }
    }

    pub(crate) fn incarnation(&self) -> u64 {
        self.life.lock().incarnation
    }

    /// Starts the next incarnation and returns its number; every one after
    /// the first counts as a restart.
    pub(crate) fn begin_incarnation(&self) -> u64 {
        let mut life = self.life.lock();
        life.incarnation += 1;
        if life.incarnation > 1 {
            self.restarts.fetch_add(1, Ordering::Relaxed);
        }
        life.incarnation
    }

    /// Fires the watchers of the incarnation that just ended (and of any earlier one).
    pub(crate) fn end_incarnation(&self, incarnation: u64, reason: &ExitReason, terminal: bool) {
        let fired: Vec<Watcher> = {
            let mut life = self.life.lock();
            if terminal {
                life.terminated = true;
            }
            let exit = (incarnation.min(life.incarnation), reason.clone());
            match &mut life.last_exit {
                Some(last) => **last = exit,
                None => life.last_exit = Some(Box::new(exit)),
            }
            let (fire, keep): (Vec<_>, Vec<_>) = life
                .watchers
                .drain(..)
                .partition(|(inc, _)| terminal || *inc <= incarnation);
            life.watchers = keep;
            fire.into_iter().map(|(_, w)| w).collect()
        };
        for watcher in fired {
            watcher(reason.clone());
        }
    }

    /// Registers `watcher` for the end of `incarnation` (`None`: the current one).
    /// Fires at once when that incarnation has already ended.
    pub(crate) fn watch(&self, incarnation: Option<u64>, watcher: Watcher) {
        let mut life = self.life.lock();
        let target = incarnation.unwrap_or(life.incarnation);
        if life.terminated || target < life.incarnation {
            // Already over: report why, if we know it for that incarnation.
            let reason = match life.last_exit.as_deref() {
                Some((inc, reason)) if life.terminated || *inc == target => reason.clone(),
                _ => ExitReason::Restarted,
            };
            drop(life);
            watcher(reason);
        } else {
            // Most actors have one watcher (their broker's or supervisor's):
            // room for one, not the four a first push reserves. Later
            // pushes grow the usual way (doubling).
            if life.watchers.capacity() == 0 {
                life.watchers.reserve_exact(1);
            }
            life.watchers.push((target, watcher));
        }
    }

    fn is_terminated(&self) -> bool {
        self.life.lock().terminated
    }
}

/// Counters of one actor, summed over all its incarnations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActorStats {
    /// Messages handled (successfully or not).
    pub handled: u64,
    /// Requests skipped at dequeue because their asker had already given up.
    pub skipped_requests: u64,
    /// Incarnations that ended in a failure (error or panic).
    pub failures: u64,
    /// Times the actor was rebuilt from its factory.
    pub restarts: u64,
    /// The current incarnation, from 1.
    pub incarnation: u64,
    /// Messages waiting in the mailbox.
    pub queued: usize,
    /// The mailbox's capacity.
    pub capacity: usize,
}

/// The error of [`Addr::send`]: the actor has stopped for good. Holds the message.
#[derive(thiserror::Error)]
#[error("the actor's mailbox is closed")]
pub struct SendError<M>(pub M);

impl<M> SendError<M> {
    /// The message that could not be sent.
    pub fn into_inner(self) -> M {
        self.0
    }
}

impl<M> fmt::Debug for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SendError(Closed)")
    }
}

/// The error of [`Addr::try_send`]. Both variants hand the message back.
#[derive(thiserror::Error)]
pub enum TrySendError<M> {
    /// The mailbox is at capacity.
    #[error("the actor's mailbox is full")]
    Full(M),
    /// The actor has stopped for good.
    #[error("the actor's mailbox is closed")]
    Closed(M),
}

impl<M> TrySendError<M> {
    /// The message that could not be sent.
    pub fn into_inner(self) -> M {
        match self {
            TrySendError::Full(m) | TrySendError::Closed(m) => m,
        }
    }

    /// True for [`TrySendError::Full`].
    pub fn is_full(&self) -> bool {
        matches!(self, TrySendError::Full(_))
    }

    /// Converts the message handed back, keeping the variant.
    pub fn map<N>(self, f: impl FnOnce(M) -> N) -> TrySendError<N> {
        match self {
            TrySendError::Full(m) => TrySendError::Full(f(m)),
            TrySendError::Closed(m) => TrySendError::Closed(f(m)),
        }
    }
}

impl<M> fmt::Debug for TrySendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("TrySendError::Full(..)"),
            TrySendError::Closed(_) => f.write_str("TrySendError::Closed(..)"),
        }
    }
}

/// Room for one message in an actor's mailbox, from [`Addr::reserve`] or
/// [`Addr::try_reserve`]. Dropping it gives the room back.
pub struct Permit<'a, A: Actor> {
    inner: mailbox::Permit<'a, Envelope<A>>,
}

impl<A: Actor> Permit<'_, A> {
    /// Puts `msg` into the reserved room.
    pub fn send<M>(self, msg: M)
    where
        A: Handler<M>,
        M: Message,
    {
        self.inner.send(Box::new(Tell(msg)));
    }
}

impl<A: Actor> fmt::Debug for Permit<'_, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Permit")
    }
}

/// The address of an actor of type `A`: send it any message it handles.
///
/// Cloning is cheap. The actor stops when every address to it is dropped (once its
/// mailbox is drained), when it stops itself, or when it is stopped.
pub struct Addr<A: Actor> {
    pub(crate) tx: mailbox::Sender<Envelope<A>>,
    pub(crate) shared: Arc<Shared>,
}

impl<A: Actor> Clone for Addr<A> {
    fn clone(&self) -> Self {
        Addr {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<A: Actor> fmt::Debug for Addr<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Addr")
            .field("id", &self.shared.id)
            .field("name", &self.shared.name)
            .finish()
    }
}

impl<A: Actor> Addr<A> {
    /// Sends a one-way message, waiting while the mailbox is full.
    pub async fn send<M>(&self, msg: M) -> Result<(), SendError<M>>
    where
        A: Handler<M>,
        M: Message,
    {
        // Not through `send_into`: the hottest path of the actor layer, a
        // few percent faster written out (its future is smaller).
        match self.tx.reserve().await {
            Ok(permit) => {
                permit.send(Box::new(Tell(msg)));
                Ok(())
            }
            Err(_) => Err(SendError(msg)),
        }
    }

    /// Sends a one-way message if there is room now.
    pub fn try_send<M>(&self, msg: M) -> Result<(), TrySendError<M>>
    where
        A: Handler<M>,
        M: Message,
    {
        try_send_into(&self.tx, msg, |m| -> Envelope<A> { Box::new(Tell(m)) })
    }

    /// Waits for room in the mailbox and reserves it: sending through the
    /// [`Permit`] then neither waits nor fails. For senders that decide what to
    /// send only once room is certain. Fails if the actor has stopped for good.
    ///
    /// ```
    /// # use postbox::{Actor, Context, Failure, Handler, Message, Runtime};
    /// # struct Echo; impl Actor for Echo {}
    /// # struct Hi; impl Message for Hi { type Reply = (); }
    /// # impl Handler<Hi> for Echo {
    /// #     async fn handle(&mut self, _: Hi, _: &mut Context<Self>) -> Result<(), Failure> { Ok(()) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let rt = Runtime::new().unwrap();
    /// let addr = rt.spawn(Echo);
    /// let permit = addr.reserve().await.expect("running");
    /// permit.send(Hi);
    /// # }
    /// ```
    pub async fn reserve(&self) -> Result<Permit<'_, A>, SendError<()>> {
        match self.tx.reserve().await {
            Ok(inner) => Ok(Permit { inner }),
            Err(_) => Err(SendError(())),
        }
    }

    /// Reserves room in the mailbox if there is some now.
    pub fn try_reserve(&self) -> Result<Permit<'_, A>, TrySendError<()>> {
        match self.tx.try_reserve() {
            Ok(inner) => Ok(Permit { inner }),
            Err(mailbox::TryReserveError::Full) => Err(TrySendError::Full(())),
            Err(mailbox::TryReserveError::Closed) => Err(TrySendError::Closed(())),
        }
    }

    /// Sends a request and resolves to the handler's reply; add `.timeout(d)` to
    /// bound the wait (room in the mailbox included).
    pub fn ask<M>(&self, msg: M) -> Ask<'_, A, M>
    where
        A: Handler<M>,
        M: Message,
    {
        Ask::new(self, msg)
    }

    /// A handle that accepts only `M`, hiding the actor type.
    pub fn recipient<M>(&self) -> Recipient<M>
    where
        A: Handler<M>,
        M: Message,
    {
        Recipient {
            inner: Arc::new(self.clone()),
        }
    }

    /// An untyped handle: identity, stats, stop, death watch.
    pub fn any(&self) -> AnyAddr {
        AnyAddr {
            shared: self.shared.clone(),
        }
    }

    /// A weak address that does not keep the actor alive.
    pub fn downgrade(&self) -> WeakAddr<A> {
        WeakAddr {
            tx: self.tx.downgrade(),
            shared: self.shared.clone(),
        }
    }

    /// The actor's identity.
    pub fn id(&self) -> ActorId {
        self.shared.id
    }

    /// True once the actor has stopped for good.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Messages waiting in the mailbox.
    pub fn queued(&self) -> usize {
        self.tx.queued()
    }

    /// Asks the actor to stop after the message it is handling (out of band: a full
    /// mailbox does not delay it). Queued messages are dropped.
    pub fn stop(&self) {
        self.shared.control.send(Control::Stop { report: true });
    }

    /// The actor's counters.
    pub fn stats(&self) -> ActorStats {
        stats_of(&self.shared, self.queued(), self.tx.max_capacity())
    }

    /// Resolves when the actor has stopped for good, with the reason of its last
    /// incarnation.
    pub async fn terminated(&self) -> ExitReason {
        self.any().terminated().await
    }
}

/// Sends `msg`, wrapped into the mailbox's envelope type, once the mailbox
/// has room; hands it back if the mailbox is closed.
pub(crate) async fn send_into<E, M>(
    mailbox: &mailbox::Sender<E>,
    msg: M,
    wrap: impl FnOnce(M) -> E,
) -> Result<(), SendError<M>> {
    match mailbox.reserve().await {
        Ok(permit) => {
            permit.send(wrap(msg));
            Ok(())
        }
        Err(_) => Err(SendError(msg)),
    }
}

/// [`send_into`] if there is room now.
pub(crate) fn try_send_into<E, M>(
    mailbox: &mailbox::Sender<E>,
    msg: M,
    wrap: impl FnOnce(M) -> E,
) -> Result<(), TrySendError<M>> {
    match mailbox.try_reserve() {
        Ok(permit) => {
            permit.send(wrap(msg));
            Ok(())
        }
        Err(mailbox::TryReserveError::Full) => Err(TrySendError::Full(msg)),
        Err(mailbox::TryReserveError::Closed) => Err(TrySendError::Closed(msg)),
    }
}

pub(crate) fn stats_of(shared: &Shared, queued: usize, capacity: usize) -> ActorStats {
    ActorStats {
        handled: shared.handled.load(Ordering::Relaxed),
        skipped_requests: shared.skipped.load(Ordering::Relaxed),
        failures: shared.failures.load(Ordering::Relaxed),
        restarts: shared.restarts.load(Ordering::Relaxed),
        incarnation: shared.incarnation(),
        queued,
        capacity,
    }
}

/// A weak address: see [`Addr::downgrade`].
pub struct WeakAddr<A: Actor> {
    tx: mailbox::WeakSender<Envelope<A>>,
    shared: Arc<Shared>,
}

impl<A: Actor> Clone for WeakAddr<A> {
    fn clone(&self) -> Self {
        WeakAddr {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<A: Actor> fmt::Debug for WeakAddr<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakAddr")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl<A: Actor> WeakAddr<A> {
    /// The address, if the actor can still be reached.
    pub fn upgrade(&self) -> Option<Addr<A>> {
        self.tx.upgrade().map(|tx| Addr {
            tx,
            shared: self.shared.clone(),
        })
    }
}

/// An untyped actor handle: identity, stats, stop and termination.
#[derive(Clone)]
pub struct AnyAddr {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for AnyAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnyAddr")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl AnyAddr {
    /// The actor's identity.
    pub fn id(&self) -> ActorId {
        self.shared.id
    }

    /// The actor's name, if it was given one.
    pub fn name(&self) -> Option<&str> {
        self.shared.name.as_deref()
    }

    /// The current incarnation (1 for the first, +1 per restart).
    pub fn incarnation(&self) -> u64 {
        self.shared.incarnation()
    }

    /// See [`Addr::stop`].
    pub fn stop(&self) {
        self.shared.control.send(Control::Stop { report: true });
    }

    /// True once the actor has stopped for good.
    pub fn is_terminated(&self) -> bool {
        self.shared.is_terminated()
    }

    /// The actor's counters (see [`Addr::stats`]); `queued` and `capacity`
    /// read 0 once its mailbox has closed.
    pub fn stats(&self) -> ActorStats {
        let (queued, capacity) = self.shared.mailbox.load().unwrap_or((0, 0));
        stats_of(&self.shared, queued, capacity)
    }

    /// Resolves when the actor has stopped for good.
    pub async fn terminated(&self) -> ExitReason {
        let (tx, rx) = oneshot::channel();
        self.shared.watch(
            Some(u64::MAX),
            Box::new(move |reason| {
                let _ = tx.send(reason);
            }),
        );
        rx.await.unwrap_or(ExitReason::Stopped)
    }

    /// Calls `f` when the given incarnation (`None`: the current one) ends, or at
    /// once if it already has. `f` runs on the dying actor's thread and must not
    /// block; [`Context::watch`](crate::Context::watch) wraps this for actors.
    pub fn on_exit(&self, incarnation: Option<u64>, f: impl FnOnce(ExitReason) + Send + 'static) {
        self.shared.watch(incarnation, Box::new(f));
    }
}

/// An address typed by message rather than by actor: any actor that handles `M`.
pub struct Recipient<M: Message> {
    pub(crate) inner: Arc<dyn ErasedAddr<M>>,
}

impl<M: Message> Clone for Recipient<M> {
    fn clone(&self) -> Self {
        Recipient {
            inner: self.inner.clone(),
        }
    }
}

impl<M: Message> fmt::Debug for Recipient<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recipient")
            .field("id", &self.inner.any().id())
            .finish()
    }
}

/// A recipient from a shared address: recipients of several message types
/// made from one `Arc<Addr<A>>` share its allocation ([`Addr::recipient`]
/// makes one per call).
///
/// ```
/// # use std::sync::Arc;
/// # use postbox::{Actor, Context, Failure, Handler, Message, Recipient, Runtime};
/// # struct Both; impl Actor for Both {}
/// # struct Ping; impl Message for Ping { type Reply = (); }
/// # struct Pong; impl Message for Pong { type Reply = (); }
/// # impl Handler<Ping> for Both {
/// #     async fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> Result<(), Failure> { Ok(()) }
/// # }
/// # impl Handler<Pong> for Both {
/// #     async fn handle(&mut self, _: Pong, _: &mut Context<Self>) -> Result<(), Failure> { Ok(()) }
/// # }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # let rt = Runtime::new().unwrap();
/// let addr = Arc::new(rt.spawn(Both));
/// let pings: Recipient<Ping> = addr.clone().into();
/// let pongs: Recipient<Pong> = addr.into();
/// pings.send(Ping).await.unwrap();
/// pongs.send(Pong).await.unwrap();
/// # }
/// ```
impl<A, M> From<Arc<Addr<A>>> for Recipient<M>
where
    A: Handler<M>,
    M: Message,
{
    fn from(addr: Arc<Addr<A>>) -> Self {
        Recipient { inner: addr }
    }
}

impl<M: Message> Recipient<M> {
    /// See [`Addr::send`].
    pub async fn send(&self, msg: M) -> Result<(), SendError<M>> {
        self.inner.send(msg).await
    }

    /// See [`Addr::try_send`].
    pub fn try_send(&self, msg: M) -> Result<(), TrySendError<M>> {
        self.inner.try_send(msg)
    }

    /// See [`Addr::ask`]; `timeout` bounds the whole exchange.
    pub async fn ask(&self, msg: M, timeout: Option<Duration>) -> Result<M::Reply, AskError> {
        self.inner.ask(msg, timeout).await
    }

    /// An untyped handle to the same actor.
    pub fn any(&self) -> AnyAddr {
        self.inner.any()
    }

    /// True once the actor has stopped for good.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

/// What a [`Recipient`] needs of an address, whatever its actor type.
pub(crate) trait ErasedAddr<M: Message>: Send + Sync {
    fn send(&self, msg: M) -> BoxFuture<'_, Result<(), SendError<M>>>;
    fn try_send(&self, msg: M) -> Result<(), TrySendError<M>>;
    fn ask(&self, msg: M, timeout: Option<Duration>) -> BoxFuture<'_, Result<M::Reply, AskError>>;
    fn any(&self) -> AnyAddr;
    fn is_closed(&self) -> bool;
}

impl<A: Handler<M>, M: Message> ErasedAddr<M> for Addr<A> {
    fn send(&self, msg: M) -> BoxFuture<'_, Result<(), SendError<M>>> {
        Box::pin(Addr::send(self, msg))
    }

    fn try_send(&self, msg: M) -> Result<(), TrySendError<M>> {
        Addr::try_send(self, msg)
    }

    fn ask(&self, msg: M, timeout: Option<Duration>) -> BoxFuture<'_, Result<M::Reply, AskError>> {
        let ask = Addr::ask(self, msg);
        Box::pin(match timeout {
            Some(d) => ask.timeout(d).into_future(),
            None => ask.into_future(),
        })
    }

    fn any(&self) -> AnyAddr {
        Addr::any(self)
    }

    fn is_closed(&self) -> bool {
        Addr::is_closed(self)
    }
}

#[cfg(test)]
mod control_tests {
    use std::task::{Context, Poll};
    use std::time::Duration;

    use futures::task::noop_waker;

    use super::{Control, ControlBox};

    #[tokio::test]
    async fn commands_arrive_in_order_and_a_dropped_wait_loses_nothing() {
        let control = ControlBox::default();
        // Waiting with nothing queued, then giving up.
        {
            let mut wait = std::pin::pin!(control.recv());
            let waker = noop_waker();
            assert!(
                wait.as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            );
        }
        control.send(Control::Stop { report: true });
        control.send(Control::Restart {
            incarnation: 2,
            delay: Duration::from_millis(5),
        });
        assert!(matches!(
            control.recv().await,
            Control::Stop { report: true }
        ));
        assert!(matches!(
            control.recv().await,
            Control::Restart { incarnation: 2, .. }
        ));
        let waker = noop_waker();
        let mut wait = std::pin::pin!(control.recv());
        assert_eq!(
            wait.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .map(|_| ()),
            Poll::Pending
        );
    }

    #[tokio::test]
    async fn a_waiting_cell_is_woken_by_a_command_from_another_thread() {
        let control = std::sync::Arc::new(ControlBox::default());
        let sender = control.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            sender.send(Control::Stop { report: false });
        });
        let got = tokio::time::timeout(Duration::from_secs(30), control.recv()).await;
        assert!(matches!(got, Ok(Control::Stop { report: false })));
        thread.join().unwrap();
    }
}

#[cfg(test)]
mod watch_tests {
    use super::Shared;
    use crate::mailbox;

    /// The first watcher gets room for one; later ones grow the list by
    /// doubling, not one slot per watcher (an actor watched by many would
    /// copy its list at every watch).
    #[test]
    fn watchers_take_room_for_one_then_double() {
        let (tx, _rx) = mailbox::channel::<()>(1);
        let shared = Shared::new(None, &tx);
        shared.watch(None, Box::new(|_| {}));
        assert_eq!(shared.life.lock().watchers.capacity(), 1);
        for _ in 0..4 {
            shared.watch(None, Box::new(|_| {}));
        }
        assert!(
            shared.life.lock().watchers.capacity() >= 8,
            "grew one slot at a time"
        );
    }

    /// A watcher that comes after an incarnation ended hears why it ended;
    /// the record is replaced at each end (one box, reused), and an older
    /// incarnation, whose reason is no longer kept, reads as restarted.
    #[test]
    fn late_watchers_hear_the_last_exit() {
        use crate::{ExitReason, Failure};
        use std::sync::{Arc, Mutex};
        let (tx, _rx) = mailbox::channel::<()>(1);
        let shared = Shared::new(None, &tx);
        let heard = Arc::new(Mutex::new(Vec::new()));
        let listen = |incarnation| {
            let heard = heard.clone();
            shared.watch(
                Some(incarnation),
                Box::new(move |reason| heard.lock().unwrap().push(reason.to_string())),
            );
        };
        let failed = |m: &str| ExitReason::Failed(Failure::msg(m));
        assert_eq!(shared.begin_incarnation(), 1);
        shared.end_incarnation(1, &failed("boom"), false);
        assert_eq!(shared.begin_incarnation(), 2);
        listen(1);
        shared.end_incarnation(2, &failed("bang"), false);
        assert_eq!(shared.begin_incarnation(), 3);
        listen(2);
        listen(1);
        shared.end_incarnation(3, &ExitReason::Stopped, true);
        listen(1);
        let heard = heard.lock().unwrap().clone();
        let expected = [
            failed("boom"),
            failed("bang"),
            ExitReason::Restarted,
            // Terminated: every late watcher hears the final reason.
            ExitReason::Stopped,
        ];
        let expected: Vec<String> = expected.iter().map(|r| r.to_string()).collect();
        assert_eq!(heard, expected);
    }

    /// Every actor has one `Shared`: it stays small (the reason of the last
    /// exit is boxed, since most actors are alive).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn shared_state_stays_small() {
        let size = std::mem::size_of::<Shared>();
        assert!(size <= 200, "Shared is {size} bytes");
    }
}
