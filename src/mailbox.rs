//! An actor's mailbox: a bounded queue with many senders and one receiver
//! (the actor's cell) that allocates nothing until a message is sent.
//!
//! tokio's bounded `mpsc` allocates its first block of 32 slots, and pads
//! its shared state to cache lines, when the channel is made: about 1.1 KB
//! for every actor, used or not. A system with a million idle queues, each
//! with a consumer, pays that twice per queue. Here the shared state is a
//! queue behind a lock, a semaphore counting free room and a waker: about
//! 150 bytes, and the queue's buffer grows with the first messages.
//!
//! The semantics are those of tokio's bounded channel, which the actor
//! layer was written against:
//!
//! - Room is reserved before a message is put in ([`Sender::reserve`], FIFO
//!   among waiting senders, cancel-safe), and given back when the receiver
//!   takes the message, or when a reservation is dropped unused.
//! - Messages from all senders come out in the order they were put in.
//! - [`Receiver::recv`] ends (`None`) once the queue is empty and either
//!   every [`Sender`] is gone or the receiver closed the mailbox and no
//!   reservation is outstanding (a sender that reserved room before the
//!   close may still put its message in, and it is received).
//! - Dropping the receiver closes the mailbox and drops what it holds;
//!   messages put in afterwards are dropped at once.
//!
//! The receiver takes the whole queue in one lock when its own batch runs
//! out, so under load it locks once per batch, not once per message.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use futures::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::Semaphore;

/// A mailbox of at most `capacity` messages (at least one; at most what a
/// semaphore can count).
pub(crate) fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
    let chan = Arc::new(Chan {
        queue: Mutex::new(Queue {
            messages: VecDeque::new(),
            receiver_gone: false,
        }),
        room: Semaphore::new(capacity),
        capacity,
        senders: AtomicUsize::new(1),
        receiver: AtomicWaker::new(),
    });
    (
        Sender { chan: chan.clone() },
        Receiver {
            chan,
            batch: VecDeque::new(),
        },
    )
}

struct Chan<T> {
    queue: Mutex<Queue<T>>,
    /// Free room: a permit per message that may still be put in. Closed
    /// when the receiver closes the mailbox.
    room: Semaphore,
    capacity: usize,
    /// Live [`Sender`]s; weak senders do not count.
    senders: AtomicUsize,
    receiver: AtomicWaker,
}

struct Queue<T> {
    messages: VecDeque<T>,
    /// The receiver was dropped: nothing put in would ever be taken.
    receiver_gone: bool,
}

/// The mailbox is closed: the receiver closed it or is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// Why [`Sender::try_reserve`] found no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TryReserveError {
    Full,
    Closed,
}

/// Puts messages into a mailbox. The receiver's `recv` ends once every
/// sender is dropped and the queue is empty.
pub(crate) struct Sender<T> {
    chan: Arc<Chan<T>>,
}

impl<T> Sender<T> {
    /// Waits for room and reserves it. Fails once the mailbox is closed.
    pub(crate) async fn reserve(&self) -> Result<Permit<'_, T>, Closed> {
        // A waiting sender can be handed room by the receiver and then give
        // it back unused (the mailbox closed before it ran, or its wait was
        // cancelled): the semaphore takes it back without telling anyone,
        // and a closed mailbox's receiver waits for exactly that room.
        let guard = WakeReceiverOnDrop(&self.chan);
        let acquired = self.chan.room.acquire().await;
        match acquired {
            Ok(permit) => {
                std::mem::forget(guard);
                // Given back by the receiver when it takes the message, or
                // by the `Permit` if it is dropped unused.
                permit.forget();
                Ok(Permit { chan: &self.chan })
            }
            Err(_) => Err(Closed),
        }
    }

    /// Reserves room if there is some now.
    pub(crate) fn try_reserve(&self) -> Result<Permit<'_, T>, TryReserveError> {
        match self.chan.room.try_acquire() {
            Ok(permit) => {
                permit.forget();
                Ok(Permit { chan: &self.chan })
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => Err(TryReserveError::Full),
            Err(tokio::sync::TryAcquireError::Closed) => Err(TryReserveError::Closed),
        }
    }

    /// A handle that does not keep the mailbox open.
    pub(crate) fn downgrade(&self) -> WeakSender<T> {
        WeakSender {
            chan: self.chan.clone(),
        }
    }

    /// Whether the receiver closed the mailbox (or is gone).
    pub(crate) fn is_closed(&self) -> bool {
        self.chan.room.is_closed()
    }

    /// Messages queued or reserved and not yet received.
    pub(crate) fn queued(&self) -> usize {
        self.chan.queued()
    }

    /// The mailbox's size.
    pub(crate) fn max_capacity(&self) -> usize {
        self.chan.capacity
    }

    /// The mailbox's load, readable without knowing its message type; does
    /// not keep the mailbox open.
    pub(crate) fn load(&self) -> Arc<dyn Load>
    where
        T: Send + 'static,
    {
        self.chan.clone()
    }
}

/// A mailbox's load, for untyped handles.
pub(crate) trait Load: Send + Sync {
    /// (queued, capacity); `None` once every sender is gone.
    fn load(&self) -> Option<(usize, usize)>;
}

impl<T: Send> Load for Chan<T> {
    fn load(&self) -> Option<(usize, usize)> {
        (self.senders.load(Ordering::Acquire) > 0).then(|| (self.queued(), self.capacity))
    }
}

impl<T> Chan<T> {
    fn queued(&self) -> usize {
        self.capacity - self.room.available_permits()
    }

    /// Room given back unused (a reservation dropped, or a message dropped
    /// because the receiver is gone). A closed mailbox's receiver waits for
    /// every reservation to be settled before it ends: it is woken.
    fn give_back(&self, room: usize) {
        self.room.add_permits(room);
        self.wake_if_closed();
    }

    fn wake_if_closed(&self) {
        if self.room.is_closed() {
            self.receiver.wake();
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.chan.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            chan: self.chan.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        // Release: what this sender put in is visible to a receiver that
        // sees the count reach zero.
        if self.chan.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.chan.receiver.wake();
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("capacity", &self.chan.capacity)
            .finish_non_exhaustive()
    }
}

/// A sender that does not keep the mailbox open: see [`Sender::downgrade`].
pub(crate) struct WeakSender<T> {
    chan: Arc<Chan<T>>,
}

impl<T> WeakSender<T> {
    /// A sender, unless every sender is already gone.
    pub(crate) fn upgrade(&self) -> Option<Sender<T>> {
        let mut n = self.chan.senders.load(Ordering::Relaxed);
        loop {
            if n == 0 {
                return None;
            }
            match self.chan.senders.compare_exchange_weak(
                n,
                n + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Sender {
                        chan: self.chan.clone(),
                    });
                }
                Err(now) => n = now,
            }
        }
    }
}

impl<T> Clone for WeakSender<T> {
    fn clone(&self) -> Self {
        WeakSender {
            chan: self.chan.clone(),
        }
    }
}

/// Wakes a closed mailbox's receiver when a `reserve` ends without room:
/// room the receiver handed it may have gone back to the semaphore unused.
struct WakeReceiverOnDrop<'a, T>(&'a Chan<T>);

impl<T> Drop for WakeReceiverOnDrop<'_, T> {
    fn drop(&mut self) {
        self.0.wake_if_closed();
    }
}

/// Room for one message, reserved. Dropping it unused gives the room back.
pub(crate) struct Permit<'a, T> {
    chan: &'a Chan<T>,
}

impl<T> Permit<'_, T> {
    /// Puts `message` into the reserved room.
    pub(crate) fn send(self, message: T) {
        let chan = self.chan;
        // The room now belongs to the message: the receiver gives it back.
        std::mem::forget(self);
        let mut queue = chan.queue.lock();
        if queue.receiver_gone {
            drop(queue);
            // Dropped outside the lock: its drop may send elsewhere.
            drop(message);
            chan.give_back(1);
            return;
        }
        queue.messages.push_back(message);
        drop(queue);
        chan.receiver.wake();
    }
}

impl<T> Drop for Permit<'_, T> {
    fn drop(&mut self) {
        self.chan.give_back(1);
    }
}

/// Takes messages out of a mailbox: held by the actor's cell.
pub(crate) struct Receiver<T> {
    chan: Arc<Chan<T>>,
    /// Messages taken from the shared queue and not yet received, oldest
    /// first (all older than anything still in the shared queue).
    batch: VecDeque<T>,
}

impl<T> Receiver<T> {
    /// The next message; `None` once none can come any more. Cancel-safe.
    ///
    /// Takes from the task's cooperative budget, as tokio's channels do: an
    /// actor whose mailbox never runs dry still lets the other tasks of its
    /// thread run (it yields when the budget is spent).
    pub(crate) fn recv(&mut self) -> impl Future<Output = Option<T>> + '_ {
        std::future::poll_fn(move |cx| {
            let budget = std::task::ready!(tokio::task::coop::poll_proceed(cx));
            let received = match self.take() {
                Some(message) => Some(message),
                None => {
                    self.chan.receiver.register(cx.waker());
                    match self.take() {
                        Some(message) => Some(message),
                        // The last sender may have put a message in just
                        // before it went: its count's release made the
                        // message visible.
                        None if self.finished() => self.take(),
                        // The budget is given back as it was (dropped).
                        None => return Poll::Pending,
                    }
                }
            };
            budget.made_progress();
            Poll::Ready(received)
        })
    }

    /// Whether nothing is waiting to be received now.
    pub(crate) fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.chan.queue.lock().messages.is_empty()
    }

    /// Refuses further reservations. What is queued, and what senders that
    /// reserved earlier put in, is still received.
    pub(crate) fn close(&mut self) {
        self.chan.room.close();
    }

    fn take(&mut self) -> Option<T> {
        if self.batch.is_empty() {
            let mut queue = self.chan.queue.lock();
            if queue.messages.is_empty() {
                return None;
            }
            // The emptied batch's buffer goes back for the senders to fill.
            std::mem::swap(&mut queue.messages, &mut self.batch);
        }
        let message = self.batch.pop_front()?;
        self.chan.room.add_permits(1);
        Some(message)
    }

    /// No message can come any more (given that none is queued).
    fn finished(&self) -> bool {
        self.chan.senders.load(Ordering::Acquire) == 0
            || (self.chan.room.is_closed()
                && self.chan.room.available_permits() == self.chan.capacity)
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.chan.room.close();
        let queued = {
            let mut queue = self.chan.queue.lock();
            queue.receiver_gone = true;
            std::mem::take(&mut queue.messages)
        };
        // The dropped messages' room is given back, so that the mailbox's
        // load reads empty, and the last waker goes (it would keep the
        // finished task's memory for as long as an address lives).
        let dropped = queued.len() + self.batch.len();
        // Outside the lock: a message's drop may send (to this mailbox too).
        drop(queued);
        self.batch.clear();
        self.chan.room.add_permits(dropped);
        drop(self.chan.receiver.take());
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("capacity", &self.chan.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[derive(Default)]
    struct Woken(std::sync::atomic::AtomicBool);
    impl futures::task::ArcWake for Woken {
        fn wake_by_ref(this: &Arc<Self>) {
            this.0.store(true, Ordering::SeqCst);
        }
    }

    /// Counts its drops.
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn holds_capacity_and_gives_room_back_when_taken() {
        let (tx, mut rx) = channel::<u32>(2);
        tx.try_reserve().expect("room").send(1);
        tx.try_reserve().expect("room").send(2);
        assert_eq!(tx.try_reserve().err(), Some(TryReserveError::Full));
        assert_eq!(tx.queued(), 2);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(tx.queued(), 1);
        tx.try_reserve().expect("room again").send(3);
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert!(rx.is_empty());
        assert_eq!(tx.queued(), 0);
    }

    #[tokio::test]
    async fn a_dropped_permit_gives_its_room_back() {
        let (tx, _rx) = channel::<u32>(1);
        let permit = tx.try_reserve().expect("room");
        assert_eq!(tx.try_reserve().err(), Some(TryReserveError::Full));
        drop(permit);
        assert!(tx.try_reserve().is_ok());
    }

    #[tokio::test]
    async fn a_zero_capacity_is_one() {
        let (tx, _rx) = channel::<u32>(0);
        assert_eq!(tx.max_capacity(), 1);
        assert!(tx.try_reserve().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_senders_get_room_in_order() {
        let (tx, mut rx) = channel::<u32>(1);
        tx.try_reserve().expect("room").send(0);
        let mut waiting = Vec::new();
        for i in 1..=3 {
            let tx = tx.clone();
            waiting.push(tokio::spawn(async move {
                tx.reserve().await.expect("open").send(i);
            }));
            // Each waits before the next one starts waiting.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(rx.recv().await.expect("a message"));
        }
        assert_eq!(got, vec![0, 1, 2, 3]);
        for task in waiting {
            task.await.expect("sent");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_takes_no_room() {
        let (tx, mut rx) = channel::<u32>(1);
        tx.try_reserve().expect("room").send(0);
        let gave_up = tokio::time::timeout(Duration::from_millis(5), tx.reserve()).await;
        assert!(gave_up.is_err(), "the mailbox is full");
        assert_eq!(rx.recv().await, Some(0));
        assert!(tx.try_reserve().is_ok(), "the abandoned wait took nothing");
    }

    #[tokio::test]
    async fn ends_when_every_sender_is_gone_after_what_they_sent() {
        let (tx, mut rx) = channel::<u32>(8);
        let weak = tx.downgrade();
        let other = weak.upgrade().expect("a sender is alive");
        tx.try_reserve().expect("room").send(1);
        other.try_reserve().expect("room").send(2);
        drop(tx);
        drop(other);
        assert!(weak.upgrade().is_none(), "no sender left to upgrade from");
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_mailbox_waits_for_senders_that_reserved() {
        let (tx, mut rx) = channel::<u32>(4);
        tx.try_reserve().expect("room").send(1);
        let late = tx.try_reserve().expect("room");
        let dropped = tx.try_reserve().expect("room");
        rx.close();
        assert!(tx.is_closed());
        assert_eq!(tx.try_reserve().err(), Some(TryReserveError::Closed));
        assert!(tx.reserve().await.is_err());
        assert_eq!(rx.recv().await, Some(1));
        // Two reservations are outstanding: recv waits for them.
        let pending = tokio::time::timeout(Duration::from_millis(5), rx.recv()).await;
        assert!(pending.is_err(), "recv ended with reservations outstanding");
        let send_late = async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            late.send(2);
            tokio::time::sleep(Duration::from_millis(1)).await;
            drop(dropped);
        };
        let receive = async {
            let got = (rx.recv().await, rx.recv().await);
            assert!(tx.is_closed());
            got
        };
        let (got, ()) = tokio::join!(receive, send_late);
        assert_eq!(got, (Some(2), None));
    }

    /// A sender handed room by `recv` gives it back unused after the
    /// close (its wait is dropped before it runs): the closed mailbox's
    /// `recv` still ends.
    #[tokio::test(start_paused = true)]
    async fn room_handed_to_a_waiting_sender_and_given_back_ends_a_closed_mailbox() {
        let (tx, mut rx) = channel::<u32>(1);
        tx.try_reserve().expect("room").send(1);
        let mut waiting = Box::pin(tx.reserve());
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "the mailbox is full"
        );
        // Taking the message hands its room to the waiting sender.
        assert_eq!(rx.recv().await, Some(1));
        rx.close();
        // The receiver waits for the reservation before the room comes
        // back, and must be woken when it does.
        let woken = Arc::new(Woken::default());
        let waker = futures::task::waker(woken.clone());
        let mut end = Box::pin(rx.recv());
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(end.as_mut().poll(&mut cx).is_pending());
        drop(waiting);
        assert!(woken.0.load(Ordering::SeqCst), "the receiver was not woken");
        assert_eq!(end.await, None);
    }

    /// An actor whose mailbox never runs dry still lets the other tasks of
    /// its thread run.
    #[tokio::test]
    async fn a_receiver_that_always_has_mail_yields_to_its_neighbours() {
        let (tx, mut rx) = channel::<u32>(4);
        let neighbour = tokio::spawn(async {});
        let mut polls = 0u32;
        while !neighbour.is_finished() {
            // Refilled at once: recv never finds the mailbox empty.
            tx.try_reserve().expect("room").send(polls);
            assert_eq!(rx.recv().await, Some(polls));
            polls += 1;
            assert!(polls < 10_000, "the neighbour never ran");
        }
    }

    /// Messages dropped with the receiver no longer count as queued.
    #[test]
    fn a_dropped_receiver_gives_back_the_room_of_what_it_dropped() {
        let (tx, rx) = channel::<u32>(4);
        let load = tx.load();
        tx.try_reserve().expect("room").send(1);
        tx.try_reserve().expect("room").send(2);
        assert_eq!(load.load(), Some((2, 4)));
        drop(rx);
        assert_eq!(load.load(), Some((0, 4)));
        assert_eq!(tx.queued(), 0);
    }

    #[test]
    fn a_dropped_receiver_drops_what_is_queued_and_what_comes_later() {
        let drops = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = channel::<Counted>(4);
        tx.try_reserve().expect("room").send(Counted(drops.clone()));
        let late = tx.try_reserve().expect("room");
        drop(rx);
        assert_eq!(drops.load(Ordering::SeqCst), 1, "queued message dropped");
        late.send(Counted(drops.clone()));
        assert_eq!(drops.load(Ordering::SeqCst), 2, "late message dropped");
        assert!(tx.is_closed());
    }

    #[test]
    fn its_load_reads_untyped_until_every_sender_is_gone() {
        let (tx, _rx) = channel::<u32>(4);
        let load = tx.load();
        tx.try_reserve().expect("room").send(1);
        assert_eq!(load.load(), Some((1, 4)));
        drop(tx);
        assert_eq!(load.load(), None);
    }

    #[test]
    fn allocates_nothing_until_a_message_comes() {
        let (tx, mut rx) = channel::<u64>(1024);
        assert_eq!(tx.chan.queue.lock().messages.capacity(), 0);
        assert_eq!(rx.batch.capacity(), 0);
        tx.try_reserve().expect("room").send(7);
        assert_eq!(rx.take(), Some(7));
    }

    /// Four threads send 20,000 messages each through a small mailbox:
    /// every message arrives once, each sender's in its order.
    #[test]
    fn senders_on_threads_lose_nothing_and_keep_their_order() {
        const SENDERS: u64 = 4;
        const EACH: u64 = 20_000;
        let (tx, mut rx) = channel::<(u64, u64)>(16);
        let threads: Vec<_> = (0..SENDERS)
            .map(|s| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .expect("runtime");
                    rt.block_on(async {
                        for i in 0..EACH {
                            tx.reserve().await.expect("open").send((s, i));
                        }
                    });
                })
            })
            .collect();
        drop(tx);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut next = [0u64; SENDERS as usize];
        rt.block_on(async {
            while let Some((s, i)) = rx.recv().await {
                assert_eq!(i, next[s as usize], "sender {s} out of order");
                next[s as usize] += 1;
            }
        });
        assert_eq!(next, [EACH; SENDERS as usize]);
        for t in threads {
            t.join().expect("sender thread");
        }
    }
}
