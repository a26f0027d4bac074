//! Ordering: each user's order events (created, paid, shipped) handled in
//! the order they were published, through partitions whose consumers crash.
//!
//! From section 7 of the seed tutorial (消息顺序保证, "message ordering"): its
//! `OrderEventSender` sends each user's events to one of 4 partition queues
//! by a hash of the user id, and its `OrderEventProcessor` has one listener
//! per partition (`concurrency = "1"`), so that one user's events are
//! handled one at a time, in order. Here:
//!
//! - a **partitioned queue** (`Broker::declare_partitioned`, with
//!   `PartitionOptions`): `--partitions` queues `order.events.0`..., and a
//!   publisher that sends each event to the partition of its `user` header,
//!   with Kafka's hash, so that a user's events stay in one queue, in order;
//! - each partition has a **single active consumer** and a **standby**
//!   (`Partitioned::consume` twice): one consumer at a time receives the
//!   partition's events; when it crashes, what it held goes back to its
//!   place and the standby takes over, first with that;
//! - consumers take one event at a time (prefetch 1): a **requeued** event
//!   (a transient failure, `nack(true)`) is then the next one its partition
//!   delivers, so nothing overtakes it;
//! - consumers **crash** at random (seeded): before applying an event, or
//!   after applying it and before the ack. Each crash restarts the consumer
//!   and redelivers the event. The events are numbered per user as they are
//!   published (`PartitionOptions::sequence()`, header `x-key-seq`), and the
//!   order service checks them with a `partition::SequenceCheck`: the event
//!   due next is applied, and a redelivery of one already applied (a crash
//!   between applying and acking) is recognized and skipped, so that
//!   nothing is applied twice.
//!
//! The order service is the state the consumers share, which survives
//! their restarts (a database, in a real service): each user's applied
//! events and each order's status (created → paid → shipped).
//!
//! It checks that every user's events were applied exactly once and in
//! publish order (and every order went through its statuses in order),
//! that none was lost, that no event was delivered again after its ack, that
//! every redelivery of an applied event was skipped, that each user's events
//! all went to the user's partition, that no partition ever had two
//! consumers handling at once, and that the consumers crashed as often as
//! the example made them.
//!
//! Run it with
//! `cargo run --release --example partitioned_order_events -- --users 40 --crash-pct 3`.
//!
//! Flags (defaults in brackets):
//! - `--users N`: users [40];
//! - `--orders N`: orders per user, 3 events each [3];
//! - `--partitions N`: partitions [4];
//! - `--producers N`: concurrent producers, each publishing its own users'
//!   events [2];
//! - `--nack-pct N`: percent of deliveries requeued (a transient failure) [5];
//! - `--crash-pct N`: percent of deliveries on which the consumer crashes
//!   before applying the event, and again as many after applying it [3];
//! - `--work-us N`: the longest time applying an event takes, in µs (tokio's
//!   timers round it up to a millisecond) [300];
//! - `--prefetch N`: deliveries a consumer may hold unacked [1]; with more,
//!   the events behind a requeued one overtake it, and the order check
//!   fails (try `--prefetch 4`);
//! - `--seed N`: the crashes' and requeues' seed [11].

#[path = "support/mod.rs"]
pub mod support;

use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use postbox::{Backoff, Failure, Runtime, RuntimeHandle};
use postbox_actors::partition::{PartitionKey, SEQUENCE_HEADER, SequenceCheck, Sequenced};
use postbox_actors::{
    Broker, ConsumeOptions, Consumer, ConsumerId, DeleteOptions, Delivery, Envelope,
    PartitionOptions,
};
use serde::{Deserialize, Serialize};
use support::{Flags, Summary, secs};

/// The partitioned queue: partitions `order.events.0`...
const EVENTS: &str = "order.events";
/// The header the partition key comes from.
const USER_HEADER: &str = "user";
/// Gives up waiting for the events after this long (a guard against a hang:
/// the checks count, they do not time).
const PATIENCE: Duration = Duration::from_secs(30);

/// The seed's event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum EventType {
    OrderCreated,
    PaymentProcessed,
    OrderShipped,
}

const LIFECYCLE: [EventType; 3] = [
    EventType::OrderCreated,
    EventType::PaymentProcessed,
    EventType::OrderShipped,
];

/// The seed's `OrderEvent`.
#[derive(Debug, Serialize, Deserialize)]
struct OrderEvent {
    user: u32,
    order: u32,
    event_type: EventType,
    /// Its place in the user's stream of events, from 0 (for the checks).
    step: u32,
}

/// The order service's state, shared by every consumer and kept across
/// their restarts.
#[derive(Default)]
struct OrderService {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Which event of each user is due next.
    sequence: SequenceCheck,
    /// Each user's applied events: (step, sequence number).
    applied: HashMap<u32, Vec<(u32, u64)>>,
    /// Each order's status.
    status: HashMap<(u32, u32), EventType>,
    /// Events acked: (user, sequence number).
    acked: HashSet<(u32, u64)>,
    /// The partitions each user's events were handled in.
    partitions: HashMap<u32, HashSet<String>>,
    /// Per partition: consumers handling now, the most at once, and the
    /// consumer that handled last.
    handling: HashMap<String, (u32, u32, Option<ConsumerId>)>,
    /// A consumer other than the last one handled a partition.
    takeovers: u64,
    /// Deliveries of an event already acked (there should be none).
    after_ack: u64,
    /// Redeliveries of an event applied before a crash, skipped.
    skipped: u64,
    /// Events later than due (there should be none).
    gaps: u64,
    /// Orders whose status did not follow created → paid → shipped.
    bad_transitions: u64,
    nacks: u64,
    crashes_before: u64,
    crashes_after: u64,
}

/// Counts a consumer handling a partition while it lives (also when the
/// handler panics: the guard is dropped as the panic unwinds).
struct Handling<'a> {
    service: &'a OrderService,
    partition: String,
}

impl<'a> Handling<'a> {
    fn enter(service: &'a OrderService, partition: &str, consumer: ConsumerId) -> Self {
        let mut state = service.state.lock();
        let entry = state.handling.entry(partition.to_owned()).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(entry.0);
        let took_over = entry.2.is_some_and(|last| last != consumer);
        entry.2 = Some(consumer);
        if took_over {
            state.takeovers += 1;
        }
        Handling {
            service,
            partition: partition.to_owned(),
        }
    }
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self.service.state.lock().handling.get_mut(&self.partition) {
            entry.0 -= 1;
        }
    }
}

/// What a delivery is in for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    Apply,
    Requeue,
    CrashBefore,
    CrashAfter,
}

/// The seeded fate of one delivery of `user`'s event `seq`: the same every
/// run, whichever consumer gets it.
fn fate(
    seed: u64,
    user: u32,
    seq: u64,
    attempt: u32,
    nack_pct: u64,
    crash_pct: u64,
) -> (Fate, u64) {
    let mut state = seed ^ (u64::from(user) << 40) ^ (seq << 12) ^ u64::from(attempt);
    let roll = splitmix(&mut state) % 100;
    let fate = if roll < nack_pct {
        Fate::Requeue
    } else if roll < nack_pct + crash_pct {
        Fate::CrashBefore
    } else if roll < nack_pct + 2 * crash_pct {
        Fate::CrashAfter
    } else {
        Fate::Apply
    };
    (fate, splitmix(&mut state) % 100)
}

/// A small seeded generator (splitmix64).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed's `OrderEventProcessor`: one per partition, and a standby.
struct OrderEventProcessor {
    service: Arc<OrderService>,
    seed: u64,
    nack_pct: u64,
    crash_pct: u64,
    work: Duration,
}

impl Consumer for OrderEventProcessor {
    async fn handle(&mut self, d: Delivery) -> Result<(), Failure> {
        let service = &*self.service;
        let _handling = Handling::enter(service, d.queue(), d.consumer());
        let event: OrderEvent = d.decode()?;
        let seq = d
            .header(SEQUENCE_HEADER)
            .and_then(|v| v.as_int())
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| Failure::msg("an event without its sequence number"))?;
        let (fate, work) = fate(
            self.seed,
            event.user,
            seq,
            d.delivery_count(),
            self.nack_pct,
            self.crash_pct,
        );
        {
            let mut state = service.state.lock();
            if state.acked.contains(&(event.user, seq)) {
                state.after_ack += 1;
            }
            state
                .partitions
                .entry(event.user)
                .or_default()
                .insert(d.queue().to_owned());
        }
        // Applying an event takes a while: two consumers of one partition
        // would overtake each other here.
        tokio::time::sleep(self.work * work as u32 / 100).await;
        match fate {
            Fate::Requeue => {
                // A transient failure (the payment service is busy): back to
                // its place in the partition, and delivered again next.
                d.nack(true).await?;
                service.state.lock().nacks += 1;
                return Ok(());
            }
            Fate::CrashBefore => {
                service.state.lock().crashes_before += 1;
                panic!("simulated crash before applying {event:?}");
            }
            Fate::Apply | Fate::CrashAfter => {}
        }
        let applied = {
            let mut state = service.state.lock();
            match state
                .sequence
                .observe(format!("user-{}", event.user).as_bytes(), &d)
            {
                Sequenced::InOrder(_) => {
                    apply(&mut state, &event, seq);
                    true
                }
                Sequenced::Gap { .. } => {
                    // An event overtaken by a later one (never, if order holds).
                    state.gaps += 1;
                    apply(&mut state, &event, seq);
                    true
                }
                Sequenced::Behind { .. } => {
                    // Applied before its consumer crashed, not acked: skip it.
                    state.skipped += 1;
                    false
                }
                Sequenced::Unnumbered => return Err(Failure::msg("an event without its number")),
            }
        };
        if applied && fate == Fate::CrashAfter {
            service.state.lock().crashes_after += 1;
            panic!("simulated crash after applying {event:?}, before the ack");
        }
        d.ack().await?;
        service.state.lock().acked.insert((event.user, seq));
        Ok(())
    }
}

/// Applies `event` to the order service.
fn apply(state: &mut State, event: &OrderEvent, seq: u64) {
    let status = state.status.get(&(event.user, event.order)).copied();
    let valid = match event.event_type {
        EventType::OrderCreated => status.is_none(),
        EventType::PaymentProcessed => status == Some(EventType::OrderCreated),
        EventType::OrderShipped => status == Some(EventType::PaymentProcessed),
    };
    if !valid {
        state.bad_transitions += 1;
    }
    state
        .status
        .insert((event.user, event.order), event.event_type);
    state
        .applied
        .entry(event.user)
        .or_default()
        .push((event.step, seq));
}

/// Runs the example: publishes every user's events from several producers,
/// waits until they are applied, and checks their order.
pub async fn run(rt: &RuntimeHandle, flags: &Flags) -> Result<Summary, Box<dyn Error>> {
    let users = flags.u32("users", 40).max(1);
    let orders = flags.u32("orders", 3).max(1);
    let partitions = flags.u32("partitions", 4).max(1);
    let producers = flags.u32("producers", 2).clamp(1, users);
    let nack_pct = flags.u64("nack-pct", 5).min(50);
    let crash_pct = flags.u64("crash-pct", 3).min(25);
    let work = Duration::from_micros(flags.u64("work-us", 300).min(1_000_000));
    let seed = flags.u64("seed", 11);
    let prefetch = flags.u32("prefetch", 1).max(1);
    let per_user = orders * LIFECYCLE.len() as u32;
    let total = u64::from(users) * u64::from(per_user);

    let broker = Broker::new(rt);
    let events = broker
        .declare_partitioned(
            EVENTS,
            PartitionOptions::new(partitions)
                .key(PartitionKey::Header(USER_HEADER.into()))
                .sequence(),
        )
        .await?;
    let service = Arc::new(OrderService::default());
    let factory = {
        let service = service.clone();
        move || OrderEventProcessor {
            service: service.clone(),
            seed,
            nack_pct,
            crash_pct,
            work,
        }
    };
    // Prefetch 1, so that a requeued event is the next one delivered; a
    // short backoff cap, so that a consumer that crashed several times is
    // back soon (the default doubles to 30 s within a minute of crashes).
    let options = ConsumeOptions::manual(prefetch).backoff(
        Backoff::exponential(Duration::from_millis(1), Duration::from_millis(50)).immediate(1),
    );
    let active = events
        .consume(&broker, options.clone(), factory.clone())
        .await?;
    let standby = events.consume(&broker, options, factory).await?;

    // Producers: each publishes its own users' events, users taking turns,
    // each user's in lifecycle order. Returns each user's partition.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            let mut placed = HashMap::new();
            for step in 0..per_user {
                let (order, event_type) = (
                    step / LIFECYCLE.len() as u32,
                    LIFECYCLE[(step % LIFECYCLE.len() as u32) as usize],
                );
                for user in (p..users).step_by(producers as usize) {
                    let event = OrderEvent {
                        user,
                        order,
                        event_type,
                        step,
                    };
                    let message =
                        Envelope::encode(&event)?.with_header(USER_HEADER, format!("user-{user}"));
                    let partition = events.publish(message).await?;
                    placed.insert(user, partition);
                }
            }
            Ok::<_, Box<dyn Error + Send + Sync>>(placed)
        }));
    }
    let mut placed = HashMap::new();
    for task in tasks {
        placed.extend(task.await?.map_err(|e| e.to_string())?);
    }
    let published_in = started.elapsed();

    // Until every partition is idle: nothing ready, held or delayed (a
    // crashed consumer's deliveries are held until they are requeued), so
    // nothing more will happen.
    let settled = loop {
        let mut idle = true;
        for queue in events.queues() {
            let s = queue.snapshot().await?.stats;
            idle &= s.ready + s.unacked + s.delayed == 0;
        }
        if idle {
            break true;
        }
        if started.elapsed() > PATIENCE {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let elapsed = started.elapsed();

    let reports: Vec<_> = active.iter().chain(&standby).map(|c| c.report()).collect();
    let crashes: u64 = reports.iter().map(|r| r.crashes).sum();
    let mut stats = Vec::new();
    for queue in events.queues() {
        stats.push(queue.snapshot().await?.stats);
    }
    let delivered: u64 = stats.iter().map(|s| s.delivered).sum();
    let redelivered: u64 = stats.iter().map(|s| s.redelivered).sum();
    let state = std::mem::take(&mut *service.state.lock());

    // Each user's applied events: steps 0, 1, 2... numbered 1, 2, 3...
    let in_order = (0..users)
        .filter(|user| {
            let got = state.applied.get(user).map(Vec::as_slice).unwrap_or(&[]);
            got.len() == per_user as usize
                && got
                    .iter()
                    .enumerate()
                    .all(|(i, (step, seq))| *step as usize == i && *seq == i as u64 + 1)
        })
        .count() as u32;
    let applied: u64 = state.applied.values().map(|v| v.len() as u64).sum();
    let in_their_partition = (0..users)
        .filter(|user| {
            let expected = placed.get(user).map(|p| format!("{EVENTS}.{p}"));
            state
                .partitions
                .get(user)
                .is_some_and(|seen| seen.len() == 1 && expected.is_some_and(|e| seen.contains(&e)))
        })
        .count() as u32;
    let most_at_once = state.handling.values().map(|h| h.1).max().unwrap_or(0);
    let injected = state.crashes_before + state.crashes_after;
    let per_partition: Vec<String> = events
        .queues()
        .iter()
        .zip(&stats)
        .map(|(q, s)| format!("{} {}", q.name(), s.published))
        .collect();

    let mut summary = Summary::new(format!(
        "per-user ordering: {users} users x {per_user} events through {partitions} partitions"
    ));
    summary
        .line(format!(
            "published {total} events from {producers} producers in {}: {}",
            secs(published_in),
            per_partition.join(", "),
        ))
        .line(format!(
            "consumers: an active one and a standby per partition; {} requeues, {injected} crashes ({} before applying, {} after applying and before the ack), {} takeovers",
            state.nacks, state.crashes_before, state.crashes_after, state.takeovers,
        ))
        .line(format!(
            "applied {applied} events; {} redeliveries of an applied event skipped by the sequence check; {delivered} deliveries ({redelivered} redeliveries); done in {}",
            state.skipped,
            secs(elapsed),
        ));
    if !settled {
        summary.line(format!(
            "gave up waiting after {}: events still in the partitions",
            secs(PATIENCE)
        ));
    }
    summary
        .check(
            format!(
                "every user's events applied once each, in publish order: {in_order} of {users} users ({} gaps, {} orders out of created → paid → shipped)",
                state.gaps, state.bad_transitions
            ),
            in_order == users && state.gaps == 0 && state.bad_transitions == 0,
        )
        .check(
            format!("none lost: {applied} of {total} events applied"),
            applied == total,
        )
        .check(
            format!(
                "none handled again after its ack ({} deliveries of acked events); every redelivery of an applied event skipped: {} of {}",
                state.after_ack, state.skipped, state.crashes_after
            ),
            state.after_ack == 0 && state.skipped == state.crashes_after,
        )
        .check(
            format!(
                "each user's events in its own partition ({in_their_partition} of {users} users), handled by one consumer at a time (at most {most_at_once} at once)"
            ),
            in_their_partition == users && most_at_once == 1,
        )
        .check(
            format!("the consumers survived every crash: {crashes} crashes reported of {injected}"),
            crashes == injected,
        );

    // Deleting the partitions cancels their consumers.
    for queue in events.queues() {
        broker
            .delete_queue(queue.name(), DeleteOptions::default())
            .await?;
    }
    Ok(summary)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    support::quiet_panics_from(file!());
    let flags = Flags::from_args();
    let rt = Runtime::new()?;
    let summary = run(&rt.handle(), &flags).await?;
    rt.shutdown();
    summary.exit()
}
