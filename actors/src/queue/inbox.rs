//! The queue's inbox: consecutive publishes share one mailbox entry.
//!
//! Publishing is the one thing a queue is asked to do at a high rate, and a
//! mailbox entry per message costs an allocation, a mailbox permit, a wake-up
//! and a handler call each. So publishes go into the queue's *open batch*
//! instead: the newest batch whose [`Collect`] entry is in the mailbox and not
//! yet handled. Joining it costs a short lock and a push. When no batch is open
//! (the queue took it, it is full, or it was closed), the publisher waits for
//! room in the mailbox like any sender, opens a new batch and sends its
//! `Collect`. A busy queue therefore takes its publishes in batches, while an
//! idle one still gets each publish at once.
//!
//! Order: batches are numbered, and the queue collects every batch up to the
//! one it is told to, oldest first, so a publisher's messages are enqueued in
//! the order it published them even when two `Collect`s land out of order.
//! [`QueueHandle`](crate::QueueHandle)'s other requests close the open batch
//! before they are sent, so nothing published after them can overtake them.
//!
//! Backpressure is counted in messages, as before batching: at most the queue's
//! `mailbox` capacity of publishes wait in the inbox, and a publisher waits
//! (fairly, first come first served) for the queue to collect some: until
//! half the inbox is free again, so that a publisher faster than its queue
//! sleeps once per several batches rather than once per batch (a quarter of
//! the context switches, and 10-20% more throughput, for a queue running at
//! its limit). A batch holds at most [`BATCH_CAPACITY`] messages.
//!
//! Shutting the inbox ([`Inbox::shut`]) is the queue's point of no return: it
//! happens under the same lock as every join, so a publish either joined
//! before (and the queue still collects it) or fails, with the reason the
//! inbox was shut for ([`Shut`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use parking_lot::Mutex;
use postbox::Message;
use tokio::sync::{Semaphore, SemaphorePermit, TryAcquireError};

use crate::envelope::Envelope;

/// Most messages in one batch: with the mailbox's capacity, bounds how many
/// publishes wait for the queue.
pub(crate) const BATCH_CAPACITY: usize = 64;

/// The publishes waiting for a queue, in numbered batches.
pub(crate) struct Inbox {
    state: Mutex<State>,
    /// One permit per message that may still wait; closed when the queue stops.
    room: Semaphore,
    /// The number of permits `room` started with.
    capacity: usize,
    /// Why the inbox was shut ([`Shut`] as a number; 0 while open), readable
    /// without the lock.
    shut: AtomicU8,
    /// A blocking queue is at its limit (or publishes wait for room):
    /// `try_publish` fails with `Full` meanwhile.
    blocked: AtomicBool,
}

/// Why a queue's inbox was shut: what a publisher refused by it is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shut {
    /// The queue was deleted (or stopped on its own).
    Deleted = 1,
    /// The runtime shut down.
    Stopped = 2,
}

#[derive(Default)]
struct State {
    /// Set once the inbox is shut: nothing joins any more.
    shut: bool,
    /// Whether the newest batch takes more messages.
    open: bool,
    /// Number of the next batch.
    next: u64,
    /// Batches not yet collected, oldest first.
    batches: VecDeque<Batch>,
    /// Emptied batch buffers given back by the queue, reused so that pushes
    /// under the lock do not reallocate.
    spare: Vec<Vec<Envelope>>,
}

/// Most spare buffers kept: a busy queue alternates between the batch it
/// handles and the one filling up.
const SPARE_BUFFERS: usize = 2;

impl State {
    /// Adds `message` to the open batch, or gives it back.
    fn join(&mut self, message: Envelope) -> Result<(), Envelope> {
        let Some(batch) = self.batches.back_mut().filter(|_| self.open && !self.shut) else {
            self.open = false;
            return Err(message);
        };
        batch.messages.push(message);
        batch.permits += 1;
        if batch.messages.len() >= BATCH_CAPACITY {
            self.open = false;
        }
        Ok(())
    }

    /// Appends a new batch, open if it has room; returns its number.
    fn push(&mut self, messages: Vec<Envelope>, permits: usize) -> u64 {
        let number = self.next;
        self.next += 1;
        self.open = messages.len() < BATCH_CAPACITY;
        self.batches.push_back(Batch {
            number,
            messages,
            permits,
        });
        number
    }
}

struct Batch {
    number: u64,
    messages: Vec<Envelope>,
    /// Permits of `room` the batch holds (fewer than its messages only for a
    /// `publish_batch` larger than the whole inbox).
    permits: usize,
}

/// Room for one message in the inbox; given back if dropped unused.
pub(crate) struct Room<'a>(SemaphorePermit<'a>);

/// Why there is no room: the inbox is full, or the queue has stopped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NoRoom {
    Full,
    Closed,
}

/// The mailbox entry telling the queue to collect every batch up to this number.
pub(crate) struct Collect(pub(crate) u64);
impl Message for Collect {
    type Reply = ();
}

impl Inbox {
    /// An inbox where at most `capacity` messages wait.
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        Inbox {
            state: Mutex::default(),
            room: Semaphore::new(capacity),
            capacity,
            shut: AtomicU8::new(0),
            blocked: AtomicBool::new(false),
        }
    }

    /// Says whether the queue takes no more publishes for now (see
    /// [`Overflow::Block`](crate::Overflow::Block)).
    pub(crate) fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::Relaxed);
    }

    /// Whether the queue takes no more publishes for now.
    pub(crate) fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    /// Waits for room for one message; fails once the queue has stopped.
    pub(crate) async fn room(&self) -> Result<Room<'_>, NoRoom> {
        // The synchronous attempt skips the acquire future's set-up: usually
        // there is room.
        match self.try_room() {
            Err(NoRoom::Full) => {
                // Full: wait until half of the inbox is free again, not
                // one message's room (RabbitMQ's credit flow grants credit in
                // bulk too). A publisher faster than its queue then sleeps
                // once per several batches instead of being woken at every
                // batch the queue takes; the queue meanwhile still has most
                // of its inbox to work through.
                let refill = u32::try_from((self.capacity / 2).max(1)).unwrap_or(1);
                let mut permits = self
                    .room
                    .acquire_many(refill)
                    .await
                    .map_err(|_| NoRoom::Closed)?;
                // One for this message; the rest go back at once.
                match permits.split(1) {
                    Some(one) => Ok(Room(one)),
                    None => Ok(Room(permits)),
                }
            }
            ready => ready,
        }
    }

    /// Room for one message if there is some now.
    pub(crate) fn try_room(&self) -> Result<Room<'_>, NoRoom> {
        match self.room.try_acquire() {
            Ok(permit) => Ok(Room(permit)),
            Err(TryAcquireError::NoPermits) => Err(NoRoom::Full),
            Err(TryAcquireError::Closed) => Err(NoRoom::Closed),
        }
    }

    /// Adds `message` to the open batch, or gives it back (with its room) if
    /// none is open.
    pub(crate) fn join<'a>(
        &'a self,
        room: Room<'a>,
        message: Envelope,
    ) -> Result<(), (Room<'a>, Envelope)> {
        match self.state.lock().join(message) {
            Ok(()) => {
                room.0.forget();
                Ok(())
            }
            Err(message) => Err((room, message)),
        }
    }

    /// Adds `message` to the open batch if there is one (`Ok(None)`), or else
    /// opens a new batch with it and returns its number: the caller then sends
    /// `Collect(number)` through the mailbox room it reserved. Hands the
    /// message back if the inbox was shut meanwhile.
    pub(crate) fn open(&self, room: Room<'_>, message: Envelope) -> Result<Option<u64>, Envelope> {
        let mut state = self.state.lock();
        if state.shut {
            return Err(message);
        }
        room.0.forget();
        let Err(message) = state.join(message) else {
            return Ok(None);
        };
        let mut messages = state.spare.pop().unwrap_or_else(|| Vec::with_capacity(8));
        messages.push(message);
        Ok(Some(state.push(messages, 1)))
    }

    /// Opens a new batch holding `messages` (closing any open one) and returns
    /// its number, for the caller to send `Collect(number)`. Waits for room for
    /// all of them (or for the whole inbox, if they are more).
    pub(crate) async fn open_with(&self, messages: Vec<Envelope>) -> Result<u64, NoRoom> {
        let wanted = messages.len().min(self.capacity);
        let wanted = u32::try_from(wanted).unwrap_or(u32::MAX);
        let permits = self
            .room
            .acquire_many(wanted)
            .await
            .map_err(|_| NoRoom::Closed)?;
        let mut state = self.state.lock();
        if state.shut {
            return Err(NoRoom::Closed);
        }
        permits.forget();
        Ok(state.push(messages, wanted as usize))
    }

    /// Closes the open batch: later publishes start a new one.
    pub(crate) fn close(&self) {
        self.state.lock().open = false;
    }

    /// Takes the oldest batch if its number is at most `through`, and gives its
    /// room back.
    pub(crate) fn collect(&self, through: u64) -> Option<Vec<Envelope>> {
        let batch = {
            let mut state = self.state.lock();
            if state.batches.front().is_none_or(|b| b.number > through) {
                return None;
            }
            let batch = state.batches.pop_front()?;
            if state.batches.is_empty() {
                // That was the newest batch.
                state.open = false;
            }
            batch
        };
        self.room.add_permits(batch.permits);
        Some(batch.messages)
    }

    /// Gives back a collected batch's buffer, emptied, for reuse. A quiet
    /// queue keeps a small one; a busy one, a buffer that has grown to a full
    /// batch.
    pub(crate) fn recycle(&self, mut buffer: Vec<Envelope>) {
        buffer.clear();
        if buffer.capacity() <= BATCH_CAPACITY {
            let mut state = self.state.lock();
            if state.spare.len() < SPARE_BUFFERS {
                state.spare.push(buffer);
            }
        }
    }

    /// Shuts the inbox for `reason` (the first reason given stays): publishers
    /// waiting for room fail, and so do later ones. What joined before is
    /// still collected.
    pub(crate) fn shut(&self, reason: Shut) {
        self.shut_unless(reason, |_| false);
    }

    /// Shuts the inbox unless `refuse` says otherwise, given the number of
    /// messages waiting in it, under the lock every publish takes: so nothing
    /// can join between the check and the shutting. Returns whether it is
    /// shut (also if it was already).
    pub(crate) fn shut_unless(&self, reason: Shut, refuse: impl FnOnce(usize) -> bool) -> bool {
        {
            let mut state = self.state.lock();
            if !state.shut {
                let waiting = state.batches.iter().map(|b| b.messages.len()).sum();
                if refuse(waiting) {
                    return false;
                }
                state.shut = true;
                state.open = false;
                let _ = self.shut.compare_exchange(
                    0,
                    reason as u8,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
        }
        self.room.close();
        true
    }

    /// Why the inbox was shut, if it was.
    pub(crate) fn shut_reason(&self) -> Option<Shut> {
        match self.shut.load(Ordering::Acquire) {
            0 => None,
            1 => Some(Shut::Deleted),
            _ => Some(Shut::Stopped),
        }
    }

    /// Messages waiting to be collected.
    pub(crate) fn waiting(&self) -> usize {
        self.state
            .lock()
            .batches
            .iter()
            .map(|b| b.messages.len())
            .sum()
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("waiting", &self.waiting())
            .field("capacity", &self.capacity)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(s: &'static str) -> Envelope {
        Envelope::new(s)
    }

    fn texts(batch: Vec<Envelope>) -> Vec<String> {
        batch
            .iter()
            .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
            .collect()
    }

    fn join(inbox: &Inbox, m: Envelope) -> bool {
        let room = inbox.try_room().expect("room");
        inbox.join(room, m).is_ok()
    }

    fn open(inbox: &Inbox, m: Envelope) -> Option<u64> {
        let room = inbox.try_room().expect("room");
        inbox.open(room, m).expect("not shut")
    }

    #[test]
    fn publishes_join_the_open_batch_until_it_is_collected() {
        let inbox = Inbox::new(100);
        assert!(!join(&inbox, msg("a")), "nothing is open yet");
        assert_eq!(open(&inbox, msg("a")), Some(0));
        assert!(join(&inbox, msg("b")));
        assert_eq!(open(&inbox, msg("c")), None, "joined the open batch");
        assert_eq!(texts(inbox.collect(0).unwrap()), ["a", "b", "c"]);
        assert!(!join(&inbox, msg("d")), "the collected batch is closed");
        assert!(inbox.collect(0).is_none());
        assert_eq!(inbox.room.available_permits(), 100, "room given back");
    }

    #[test]
    fn closing_or_filling_a_batch_starts_the_next_one_and_order_is_kept() {
        let inbox = Inbox::new(1000);
        assert_eq!(open(&inbox, msg("a")), Some(0));
        inbox.close();
        assert!(!join(&inbox, msg("b")));
        assert_eq!(open(&inbox, msg("b")), Some(1));
        for _ in 1..BATCH_CAPACITY {
            assert!(join(&inbox, msg("x")));
        }
        assert!(!join(&inbox, msg("c")), "batch 1 is full");
        assert_eq!(open(&inbox, msg("c")), Some(2));
        assert_eq!(inbox.waiting(), 2 + BATCH_CAPACITY);
        // Collect(2) arriving first takes every batch through 2, oldest first.
        assert_eq!(texts(inbox.collect(2).unwrap()), ["a"]);
        assert_eq!(inbox.collect(2).unwrap().len(), BATCH_CAPACITY);
        assert_eq!(texts(inbox.collect(2).unwrap()), ["c"]);
        assert!(inbox.collect(2).is_none());
        // The late Collect(0) and Collect(1) find nothing.
        assert!(inbox.collect(0).is_none());
        assert!(inbox.collect(1).is_none());
        assert_eq!(inbox.waiting(), 0);
        assert_eq!(inbox.room.available_permits(), 1000);
    }

    #[test]
    fn a_collect_does_not_take_newer_batches() {
        let inbox = Inbox::new(10);
        assert_eq!(open(&inbox, msg("a")), Some(0));
        inbox.close();
        assert_eq!(open(&inbox, msg("b")), Some(1));
        assert_eq!(texts(inbox.collect(0).unwrap()), ["a"]);
        assert!(inbox.collect(0).is_none());
        // Batch 1 is still open and still takes publishes.
        assert!(join(&inbox, msg("c")));
        assert_eq!(texts(inbox.collect(1).unwrap()), ["b", "c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn room_is_counted_in_messages_and_comes_back_when_collected() {
        let inbox = Inbox::new(3);
        assert_eq!(open(&inbox, msg("a")), Some(0));
        assert!(join(&inbox, msg("b")));
        assert!(join(&inbox, msg("c")));
        assert_eq!(inbox.try_room().err(), Some(NoRoom::Full));
        // A room left unused is given back.
        inbox.collect(0).unwrap();
        drop(inbox.try_room().unwrap());
        assert_eq!(inbox.room.available_permits(), 3);
        // A batch larger than the inbox takes all of its room, and gives it back.
        let n = inbox.open_with(vec![msg("x"); 5]).await.unwrap();
        assert_eq!(inbox.try_room().err(), Some(NoRoom::Full));
        assert_eq!(inbox.collect(n).unwrap().len(), 5);
        assert_eq!(inbox.room.available_permits(), 3);
        inbox.shut(Shut::Stopped);
        assert_eq!(inbox.try_room().err(), Some(NoRoom::Closed));
        assert_eq!(inbox.room().await.err(), Some(NoRoom::Closed));
        assert_eq!(inbox.shut_reason(), Some(Shut::Stopped));
    }

    /// A publisher that found the inbox full wakes once half of it is free
    /// again, not at the first message's room: fewer wake-ups when it is
    /// faster than its queue. It then takes one message's room.
    #[tokio::test(start_paused = true)]
    async fn a_full_inbox_lets_its_publisher_go_when_half_of_it_is_free() {
        let inbox = Inbox::new(8);
        for i in 0..8 {
            inbox.close(); // one message per batch
            assert_eq!(open(&inbox, msg("m")), Some(i));
        }
        let mut waiting = std::pin::pin!(inbox.room());
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        for through in 0..3 {
            inbox.collect(through).unwrap();
            assert!(
                futures::poll!(waiting.as_mut()).is_pending(),
                "woken with {} of 8 free",
                through + 1
            );
        }
        inbox.collect(3).unwrap();
        let futures::task::Poll::Ready(Ok(room)) = futures::poll!(waiting.as_mut()) else {
            panic!("half the inbox is free");
        };
        // It holds one message's room; the rest is free for others.
        assert_eq!(inbox.room.available_permits(), 3);
        drop(room);
        assert_eq!(inbox.room.available_permits(), 4);
    }

    /// A publisher that got its room before the inbox was shut does not get
    /// in after: its join and its open both fail, and so does a batch.
    #[tokio::test(start_paused = true)]
    async fn nothing_joins_or_opens_after_the_inbox_is_shut() {
        let inbox = Inbox::new(10);
        assert_eq!(open(&inbox, msg("a")), Some(0));
        let early = inbox.try_room().unwrap();
        let late = inbox.try_room().unwrap();
        // Something waits: a refusing check leaves the inbox open.
        assert!(!inbox.shut_unless(Shut::Deleted, |waiting| waiting > 0));
        assert!(inbox.shut_reason().is_none());
        assert!(inbox.shut_unless(Shut::Deleted, |_| false));
        assert!(inbox.join(early, msg("b")).is_err());
        assert!(inbox.open(late, msg("c")).is_err());
        assert_eq!(inbox.open_with(vec![msg("d")]).await, Err(NoRoom::Closed));
        // What joined before is still collected; the first reason stays.
        inbox.shut(Shut::Stopped);
        assert_eq!(inbox.shut_reason(), Some(Shut::Deleted));
        assert_eq!(texts(inbox.collect(u64::MAX).unwrap()), ["a"]);
        assert!(inbox.collect(u64::MAX).is_none());
    }

    #[test]
    fn collected_buffers_are_reused_up_to_a_full_batch() {
        let inbox = Inbox::new(1000);
        assert_eq!(open(&inbox, msg("a")), Some(0));
        for _ in 1..BATCH_CAPACITY {
            assert!(join(&inbox, msg("x")));
        }
        let full = inbox.collect(0).unwrap();
        let capacity = full.capacity();
        inbox.recycle(full);
        assert_eq!(open(&inbox, msg("b")), Some(1));
        let reused = inbox.collect(1).unwrap();
        assert_eq!(texts(reused.clone()), ["b"]);
        assert_eq!(reused.capacity(), capacity, "the grown buffer was reused");
        // A caller's oversized publish_batch buffer is not kept.
        inbox.recycle(Vec::with_capacity(10 * BATCH_CAPACITY));
        assert!(inbox.state.lock().spare.is_empty());
    }
}
