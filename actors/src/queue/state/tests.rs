//! Unit tests of the queue state machine: delivery order, acknowledgements,
//! requeues, consumers, and the limits (TTL, delivery limit, length).

use std::collections::{HashMap, HashSet};

use super::*;
use crate::envelope::MessageId;

const A: ConsumerId = ConsumerId(1);
const B: ConsumerId = ConsumerId(2);
const C: ConsumerId = ConsumerId(3);

fn msg(name: &str) -> Envelope {
    Envelope::new(name.to_owned())
}

fn name(message: &Envelope) -> &str {
    std::str::from_utf8(message.payload()).unwrap()
}

fn publish_all(queue: &mut QueueState, names: &[&str]) {
    for n in names {
        queue.publish(msg(n));
    }
}

/// A purged backlog, a drained one and settled deliveries give their
/// buffers back (they used to keep them until the queue was deleted).
#[test]
fn memory_is_given_back_when_the_backlog_shrinks() {
    const N: usize = 200_000;
    let mut q = QueueState::new();
    for _ in 0..N {
        q.publish(Envelope::new(""));
    }
    assert!(q.ready.entries.capacity() >= N);
    assert_eq!(q.purge(), N);
    assert!(
        q.ready.entries.capacity() <= 16 * 1024,
        "{}",
        q.ready.entries.capacity()
    );

    for _ in 0..N {
        q.publish(Envelope::new(""));
    }
    q.add_consumer(A, AckMode::Manual, 0).unwrap();
    let mut tags = Vec::with_capacity(N);
    while let Some(d) = q.next_delivery() {
        tags.push(d.tag);
    }
    assert_eq!(tags.len(), N);
    // A drained backlog keeps its buffer until the driver releases it.
    assert!(q.ready.entries.capacity() >= N);
    assert!(q.has_spare());
    q.release_spare();
    assert!(!q.has_spare());
    assert!(
        q.ready.entries.capacity() <= 16 * 1024,
        "{}",
        q.ready.entries.capacity()
    );
    let held = &q.consumers[0].unacked.slots;
    assert!(held.capacity() >= N);
    for tag in tags {
        q.ack(A, tag, false).unwrap();
    }
    let held = &q.consumers[0].unacked.slots;
    assert!(held.capacity() <= 16 * 1024, "{}", held.capacity());
    assert!(q.is_empty());
}

fn ready_names(queue: &QueueState) -> Vec<String> {
    queue
        .ready
        .entries
        .iter()
        .map(|e| name(&e.message).to_owned())
        .collect()
}

/// Everything observable about a queue, to check that a failed call changed nothing.
#[derive(Debug, PartialEq)]
struct Snapshot {
    stats: QueueStats,
    consumers: Vec<ConsumerStats>,
    ready: Vec<(u64, MessageId, u32)>,
    unacked: Vec<(ConsumerId, DeliveryTag, u64, MessageId)>,
    active: VecDeque<ConsumerId>,
    last_tag: u64,
    next_seq: u64,
}

fn snapshot(queue: &QueueState) -> Snapshot {
    Snapshot {
        stats: queue.stats(),
        consumers: queue.consumers().collect(),
        ready: queue
            .ready
            .entries
            .iter()
            .map(|e| (e.seq, e.message.id(), e.message.delivery_count()))
            .collect(),
        unacked: queue
            .consumers
            .iter()
            .flat_map(|c| {
                c.unacked
                    .iter()
                    .map(|(tag, e)| (c.id, *tag, e.seq, e.message.id()))
            })
            .collect(),
        active: queue
            .active
            .iter()
            .map(|&p| queue.consumers[p].id)
            .collect(),
        last_tag: queue.last_tag,
        next_seq: queue.next_seq,
    }
}

fn deliver(queue: &mut QueueState) -> Dispatch {
    queue.next_delivery().expect("a delivery")
}

#[test]
fn requeued_message_returns_to_its_original_position() {
    let mut q = QueueState::new();
    publish_all(&mut q, &["m1", "m2", "m3"]);
    q.add_consumer(A, AckMode::Manual, 2).unwrap();

    let d1 = deliver(&mut q);
    let d2 = deliver(&mut q);
    assert_eq!((name(&d1.message), name(&d2.message)), ("m1", "m2"));
    assert_eq!((d1.tag, d2.tag), (DeliveryTag(1), DeliveryTag(2)));
    assert!(q.next_delivery().is_none(), "prefetch 2 reached");

    assert_eq!(q.nack(A, d1.tag, false, true), Ok(1));
    assert_eq!(ready_names(&q), ["m1", "m3"]);

    let again = deliver(&mut q);
    assert_eq!(name(&again.message), "m1");
    assert!(again.message.redelivered());
    assert_eq!(again.message.delivery_count(), 2);
    assert_eq!(again.tag, DeliveryTag(3));
    assert!(q.next_delivery().is_none(), "prefetch 2 reached again");

    q.ack(A, d2.tag, false).unwrap();
    let d3 = deliver(&mut q);
    assert_eq!(name(&d3.message), "m3");
    assert!(!d3.message.redelivered());
    assert_eq!(d3.message.delivery_count(), 1);

    let stats = q.stats();
    assert_eq!(
        (
            stats.delivered,
            stats.redelivered,
            stats.requeued,
            stats.acknowledged
        ),
        (4, 1, 1, 1)
    );
}

#[test]
fn requeue_goes_behind_older_ready_messages() {
    // Requeued messages interleave with ready ones by publish order: m2 lands before
    // m4 and m5, then m3 between m2 and m4.
    let mut q = QueueState::new();
    publish_all(&mut q, &["m1", "m2", "m3", "m4", "m5"]);
    q.add_consumer(A, AckMode::Manual, 0).unwrap();
    q.add_consumer(B, AckMode::Manual, 0).unwrap();
    let d: Vec<_> = (0..4).map(|_| deliver(&mut q)).collect();
    // A: m1, m3; B: m2, m4.
    assert_eq!(q.nack(B, d[3].tag, true, true), Ok(2));
    assert_eq!(ready_names(&q), ["m2", "m4", "m5"]);
    assert_eq!(q.nack(A, d[2].tag, false, true), Ok(1));
    assert_eq!(ready_names(&q), ["m2", "m3", "m4", "m5"]);
}

#[test]
fn round_robin_is_fair() {
    let mut q = QueueState::new();
    for id in [A, B, C] {
        q.add_consumer(id, AckMode::Manual, 0).unwrap();
    }
    publish_all(&mut q, &["1", "2", "3", "4", "5", "6", "7", "8", "9"]);
    let order: Vec<_> = std::iter::from_fn(|| q.next_delivery())
        .map(|d| d.consumer)
        .collect();
    assert_eq!(order, [A, B, C, A, B, C, A, B, C]);
    for stats in q.consumers() {
        assert_eq!((stats.delivered, stats.unacked), (3, 3));
    }
}

#[test]
fn prefetch_bounds_and_blocked_consumers_are_skipped() {
    let mut q = QueueState::new();
    q.add_consumer(A, AckMode::Manual, 1).unwrap();
    q.add_consumer(B, AckMode::Manual, 2).unwrap();
    q.add_consumer(C, AckMode::Manual, 3).unwrap();
    for i in 0..10 {
        q.publish(msg(&format!("m{i}")));
    }
    let first: Vec<_> = std::iter::from_fn(|| q.next_delivery()).collect();
    let order: Vec<_> = first.iter().map(|d| d.consumer).collect();
    assert_eq!(order, [A, B, C, B, C, C]);
    for stats in q.consumers() {
        assert_eq!(stats.unacked, stats.prefetch as usize);
    }
    assert_eq!(q.ready_len(), 4);

    // Free everyone's credit, but block B: it is skipped, and the turn order holds.
    for d in &first {
        q.ack(d.consumer, d.tag, false).unwrap();
    }
    q.set_blocked(B, true).unwrap();
    assert!(q.consumer_stats(B).unwrap().blocked);
    let order: Vec<_> = std::iter::from_fn(|| q.next_delivery())
        .map(|d| d.consumer)
        .collect();
    assert_eq!(order, [A, C, C, C]);
    assert_eq!(q.ready_len(), 0);

    // Unblocked, B is eligible again.
    q.set_blocked(B, false).unwrap();
    q.publish(msg("late"));
    assert_eq!(deliver(&mut q).consumer, B);
    // Everyone blocked: nothing is delivered, nothing is lost.
    for id in [A, B, C] {
        q.set_blocked(id, true).unwrap();
    }
    q.publish(msg("waiting"));
    assert!(q.next_delivery().is_none());
    assert_eq!(q.ready_len(), 1);
}

/// As RabbitMQ: a new consumer joins the back of the line of consumers.
#[test]
fn a_new_consumer_joins_the_back_of_the_line() {
    let mut q = QueueState::new();
    q.add_consumer(A, AckMode::Auto, 0).unwrap();
    q.add_consumer(B, AckMode::Auto, 0).unwrap();
    publish_all(&mut q, &["1", "2", "3", "4", "5"]);
    assert_eq!(deliver(&mut q).consumer, A);
    assert_eq!(deliver(&mut q).consumer, B);
    q.add_consumer(C, AckMode::Auto, 0).unwrap();
    assert_eq!(deliver(&mut q).consumer, A);
    assert_eq!(deliver(&mut q).consumer, B);
    // Removing the consumer whose turn it is passes the turn to the next one.
    q.remove_consumer(C).unwrap();
    assert_eq!(deliver(&mut q).consumer, A);
}

/// As RabbitMQ 3.10 serves them (checked against the broker): consumers at
/// their prefetch limit leave the line when a delivery finds them full, and
/// rejoin it at the back in the order they can take again, not in
/// registration order.
#[test]
fn consumers_are_served_in_the_order_they_became_able_to_take() {
    let order = |acks: [ConsumerId; 3], extra: usize| {
        let mut q = QueueState::new();
        for id in [A, B, C] {
            q.add_consumer(id, AckMode::Manual, 1).unwrap();
        }
        publish_all(&mut q, &["m1", "m2", "m3", "m4"]);
        let mut got = Vec::new();
        let mut held = HashMap::new();
        let drain = |q: &mut QueueState,
                     got: &mut Vec<(ConsumerId, String)>,
                     held: &mut HashMap<ConsumerId, DeliveryTag>| {
            while let Some(d) = q.next_delivery() {
                held.insert(d.consumer, d.tag);
                got.push((d.consumer, name(&d.message).to_owned()));
            }
        };
        drain(&mut q, &mut got, &mut held);
        for id in acks {
            q.ack(id, held[&id], false).unwrap();
            drain(&mut q, &mut got, &mut held);
        }
        for i in 0..extra {
            q.publish(msg(&format!("m{}", 5 + i)));
            drain(&mut q, &mut got, &mut held);
        }
        got
    };
    let s = |id: ConsumerId, m: &str| (id, m.to_owned());
    assert_eq!(
        order([C, B, A], 1),
        [s(A, "m1"), s(B, "m2"), s(C, "m3"), s(C, "m4"), s(B, "m5")]
    );
    assert_eq!(
        order([C, A, B], 1),
        [s(A, "m1"), s(B, "m2"), s(C, "m3"), s(C, "m4"), s(A, "m5")]
    );
    assert_eq!(
        order([C, B, A], 2),
        [
            s(A, "m1"),
            s(B, "m2"),
            s(C, "m3"),
            s(C, "m4"),
            s(B, "m5"),
            s(A, "m6")
        ]
    );
}

/// RabbitMQ 3.10 (checked against the broker): A (prefetch 1) holds m1, B
/// (prefetch 1) holds m2; B acks, then A nacks m1 with requeue: m1 goes back
/// to A, which is ahead of B in line (neither was found full).
#[test]
fn a_requeued_message_goes_to_the_consumer_ahead_in_line() {
    let mut q = QueueState::new();
    q.add_consumer(A, AckMode::Manual, 1).unwrap();
    q.add_consumer(B, AckMode::Manual, 1).unwrap();
    publish_all(&mut q, &["m1", "m2"]);
    let m1 = deliver(&mut q);
    let m2 = deliver(&mut q);
    assert_eq!((m1.consumer, m2.consumer), (A, B));
    q.ack(B, m2.tag, false).unwrap();
    q.nack(A, m1.tag, false, true).unwrap();
    let again = deliver(&mut q);
    assert_eq!((again.consumer, name(&again.message)), (A, "m1"));
}

#[test]
fn multiple_ack_and_nack_touch_only_the_callers_deliveries() {
    let mut q = QueueState::new();
    q.add_consumer(A, AckMode::Manual, 0).unwrap();
    q.add_consumer(B, AckMode::Manual, 0).unwrap();
    publish_all(&mut q, &["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"]);
    let d: Vec<_> = (0..6).map(|_| deliver(&mut q)).collect();
    // A holds tags 1, 3, 5; B holds 2, 4, 6.
    assert_eq!(q.ack(A, d[4].tag, true), Ok(3));
    assert_eq!(q.consumer_stats(A).unwrap().unacked, 0);
    assert_eq!(q.consumer_stats(B).unwrap().unacked, 3);

    assert_eq!(q.nack(B, d[3].tag, true, true), Ok(2));
    assert_eq!(ready_names(&q), ["m2", "m4", "m7", "m8"]);

    let mut dropped = Vec::new();
    assert_eq!(
        q.nack_with(B, d[5].tag, true, false, |m| dropped.push(m)),
        Ok(1)
    );
    assert_eq!(dropped.len(), 1);
    assert_eq!(name(&dropped[0]), "m6");

    let stats = q.stats();
    assert_eq!(
        (
            stats.acknowledged,
            stats.requeued,
            stats.rejected,
            stats.unacked
        ),
        (3, 2, 1, 0)
    );
    assert_eq!(stats.ready, 4);
}

#[test]
fn multiple_with_only_earlier_deliveries_outstanding() {
    let mut q = QueueState::new();
    q.add_consumer(A, AckMode::Manual, 0).unwrap();
    publish_all(&mut q, &["m1", "m2", "m3"]);
    let d: Vec<_> = (0..3).map(|_| deliver(&mut q)).collect();
    q.ack(A, d[1].tag, false).unwrap();
    // Tag 2 is settled: `multiple` from it is refused, and 1 stays outstanding.
    let before = snapshot(&q);
    assert_eq!(
        q.ack(A, d[1].tag, true),
        Err(SettleError::AlreadySettled { tag: d[1].tag })
    );
    assert_eq!(snapshot(&q), before);
    assert_eq!(q.ack(A, d[2].tag, true), Ok(2));
    assert!(q.is_empty());
}

#[test]
fn every_settle_error_leaves_the_state_unchanged() {
    let mut q = QueueState::new();
    q.add_consumer(A, AckMode::Manual, 0).unwrap();
    q.add_consumer(B, AckMode::Manual, 0).unwrap();
    q.add_consumer(C, AckMode::Auto, 0).unwrap();
    publish_all(&mut q, &["m1", "m2", "m3", "m4", "m5"]);
    let d: Vec<_> = (0..4).map(|_| deliver(&mut q)).collect();
    // A: tag 1 (m1), 4 (m4); B: tag 2 (m2); C auto: tag 3 (m3, settled).
    assert_eq!(
        d.iter().map(|d| d.consumer).collect::<Vec<_>>(),
        [A, B, C, A]
    );
    q.ack(A, d[3].tag, false).unwrap();
    q.publish(msg("m6"));

    let ghost = ConsumerId(99);
    let cases: Vec<(ConsumerId, u64, bool, SettleError)> = vec![
        (ghost, 1, false, SettleError::UnknownConsumer(ghost)),
        (ghost, 0, true, SettleError::UnknownConsumer(ghost)),
        (C, 3, false, SettleError::AutoAckConsumer(C)),
        (C, 1, true, SettleError::AutoAckConsumer(C)),
        (C, 0, false, SettleError::AutoAckConsumer(C)),
        (
            A,
            0,
            false,
            SettleError::UnknownTag {
                tag: DeliveryTag(0),
            },
        ),
        (
            A,
            5,
            true,
            SettleError::UnknownTag {
                tag: DeliveryTag(5),
            },
        ),
        (
            A,
            u64::MAX,
            true,
            SettleError::UnknownTag {
                tag: DeliveryTag(u64::MAX),
            },
        ),
        (
            A,
            2,
            false,
            SettleError::WrongConsumer {
                tag: DeliveryTag(2),
                owner: B,
            },
        ),
        (
            B,
            1,
            true,
            SettleError::WrongConsumer {
                tag: DeliveryTag(1),
                owner: A,
            },
        ),
        // Settled automatically (auto consumer C).
        (
            A,
            3,
            false,
            SettleError::AlreadySettled {
                tag: DeliveryTag(3),
            },
        ),
        // Already acked.
        (
            A,
            4,
            false,
            SettleError::AlreadySettled {
                tag: DeliveryTag(4),
            },
        ),
        (
            B,
            4,
            true,
            SettleError::AlreadySettled {
                tag: DeliveryTag(4),
            },
        ),
    ];
    for (consumer, tag, multiple, expected) in cases {
        let tag = DeliveryTag(tag);
        let before = snapshot(&q);
        assert_eq!(q.ack(consumer, tag, multiple), Err(expected.clone()));
        assert_eq!(snapshot(&q), before, "ack {consumer} {tag}");
        for requeue in [true, false] {
            let mut called = false;
            let result = q.nack_with(consumer, tag, multiple, requeue, |_| called = true);
            assert_eq!(result, Err(expected.clone()));
            assert!(!called);
            assert_eq!(snapshot(&q), before, "nack {consumer} {tag}");
        }
        if !multiple {
            assert_eq!(q.reject(consumer, tag, true), Err(expected.clone()));
            assert_eq!(snapshot(&q), before);
        }
    }

    // Consumer operations on an unknown consumer.
    let before = snapshot(&q);
    assert_eq!(
        q.remove_consumer(ghost),
        Err(SettleError::UnknownConsumer(ghost))
    );
    assert_eq!(
        q.set_blocked(ghost, true),
        Err(SettleError::UnknownConsumer(ghost))
    );
    assert_eq!(
        q.add_consumer(A, AckMode::Auto, 5),
        Err(ConsumerError::Duplicate(A))
    );
    assert_eq!(snapshot(&q), before);

    // Deliveries of a removed consumer are no longer outstanding anywhere.
    q.remove_consumer(A).unwrap();
    assert_eq!(
        q.ack(B, d[0].tag, false),
        Err(SettleError::AlreadySettled { tag: d[0].tag })
    );
    assert_eq!(
        q.ack(A, d[0].tag, false),
        Err(SettleError::UnknownConsumer(A))
    );
}

#[test]
fn double_ack_is_already_settled() {
    let mut q = QueueState::new();
    q.add_consumer(A, AckMode::Manual, 0).unwrap();
    q.publish(msg("m"));
    let d = deliver(&mut q);
    assert_eq!(q.ack(A, d.tag, false), Ok(1));
    assert_eq!(
        q.ack(A, d.tag, false),
        Err(SettleError::AlreadySettled { tag: d.tag })
    );
    assert_eq!(q.stats().acknowledged, 1);
}

#[test]
fn error_messages() {
    let tag = DeliveryTag(7);
    assert_eq!(
        SettleError::UnknownConsumer(A).to_string(),
        "consumer 1 is not registered on this queue"
    );
    assert_eq!(
        SettleError::UnknownTag { tag }.to_string(),
        "delivery tag 7 was never issued by this queue"
    );
    assert_eq!(
        SettleError::AlreadySettled { tag }.to_string(),
        "delivery tag 7 is already settled"
    );
    assert_eq!(
        SettleError::WrongConsumer { tag, owner: B }.to_string(),
        "delivery tag 7 belongs to consumer 2"
    );
    assert_eq!(
        SettleError::AutoAckConsumer(C).to_string(),
        "consumer 3 uses automatic acknowledgement; it has nothing to settle"
    );
    assert_eq!(
        ConsumerError::Duplicate(A).to_string(),
        "consumer 1 is already registered on this queue"
    );
}

#[test]
fn removed_consumers_deliveries_are_requeued_in_place() {
    let mut q = QueueState::new();
    q.add_consumer(A, AckMode::Manual, 0).unwrap();
    q.add_consumer(B, AckMode::Manual, 0).unwrap();
    publish_all(&mut q, &["m1", "m2", "m3", "m4", "m5"]);
    let d: Vec<_> = (0..4).map(|_| deliver(&mut q)).collect();
    // A: m1, m3; B: m2, m4.
    q.ack(B, d[1].tag, false).unwrap();

    assert_eq!(q.remove_consumer(A), Ok(2));
    assert_eq!(ready_names(&q), ["m1", "m3", "m5"]);
    assert!(q.consumer_stats(A).is_none());
    let stats = q.stats();
    assert_eq!(
        (stats.requeued, stats.unacked, stats.ready, stats.consumers),
        (2, 1, 3, 1)
    );

    let next: Vec<_> = std::iter::from_fn(|| q.next_delivery()).collect();
    let seen: Vec<_> = next
        .iter()
        .map(|d| {
            (
                d.consumer,
                name(&d.message),
                d.message.redelivered(),
                d.message.delivery_count(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [(B, "m1", true, 2), (B, "m3", true, 2), (B, "m5", false, 1)]
    );
    assert_eq!(q.stats().redelivered, 2);

    // Removing the last consumer requeues the rest; nothing is delivered any more.
    assert_eq!(q.remove_consumer(B), Ok(4));
    assert!(!q.has_consumers());
    assert!(q.next_delivery().is_none());
    assert_eq!(ready_names(&q), ["m1", "m3", "m4", "m5"]);
}

#[test]
fn auto_mode_settles_on_dispatch() {
    let mut q = QueueState::new();
    // Prefetch is ignored in auto mode.
    q.add_consumer(A, AckMode::Auto, 1).unwrap();
    publish_all(&mut q, &["m1", "m2", "m3"]);
    let d: Vec<_> = std::iter::from_fn(|| q.next_delivery()).collect();
    assert_eq!(d.len(), 3);
    assert!(
        d.iter()
            .all(|d| d.consumer == A && d.message.delivery_count() == 1)
    );
    assert_eq!(d.iter().map(|d| d.tag.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(q.is_empty());
    let stats = q.stats();
    assert_eq!(
        (stats.delivered, stats.acknowledged, stats.unacked),
        (3, 3, 0)
    );
    let consumer = q.consumer_stats(A).unwrap();
    assert_eq!((consumer.unacked, consumer.delivered), (0, 3));
    assert_eq!(
        q.ack(A, d[0].tag, false),
        Err(SettleError::AutoAckConsumer(A))
    );
}

#[test]
fn purge_drops_ready_but_keeps_unacked() {
    let mut q = QueueState::new();
    q.add_consumer(A, AckMode::Manual, 1).unwrap();
    publish_all(&mut q, &["m1", "m2", "m3"]);
    let d = deliver(&mut q);
    assert_eq!(q.purge(), 2);
    assert_eq!(q.purge(), 0);
    assert_eq!((q.ready_len(), q.unacked_len()), (0, 1));
    assert!(!q.is_empty());
    // The outstanding delivery can still be requeued and redelivered.
    q.nack(A, d.tag, false, true).unwrap();
    assert_eq!(name(&deliver(&mut q).message), "m1");
    assert_eq!(q.stats().purged, 2);
}

#[test]
fn empty_queue_and_no_consumers() {
    let mut q = QueueState::new();
    assert!(q.is_empty());
    assert!(!q.has_consumers());
    assert!(q.next_delivery().is_none());
    q.publish(msg("m"));
    assert!(!q.is_empty());
    assert!(q.next_delivery().is_none(), "no consumer");
    q.add_consumer(A, AckMode::default(), 0).unwrap();
    assert_eq!(q.consumer_stats(A).unwrap().mode, AckMode::Manual);
    assert!(q.next_delivery().is_some());
    assert!(q.next_delivery().is_none(), "no message");
    assert_eq!(q.stats().consumers, 1);
}

/// A small deterministic generator (SplitMix64) for the soak test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn ten_thousand_messages_four_consumers_each_acked_once() {
    const MESSAGES: usize = 10_000;
    let consumers = [
        ConsumerId(10),
        ConsumerId(11),
        ConsumerId(12),
        ConsumerId(13),
    ];
    let mut q = QueueState::new();
    for id in consumers {
        q.add_consumer(id, AckMode::Manual, 16).unwrap();
    }
    let mut published = HashSet::new();
    let mut acked: HashMap<MessageId, u32> = HashMap::new();
    let mut held: HashMap<ConsumerId, BTreeMap<DeliveryTag, MessageId>> = HashMap::new();
    let mut rng = Rng(0x5EED);

    let mut sent = 0;
    while sent < MESSAGES || !q.is_empty() {
        // Publish in bursts so that deliveries interleave with publishing.
        for _ in 0..rng.below(40) {
            if sent < MESSAGES {
                let m = Envelope::new(sent.to_string());
                published.insert(m.id());
                q.publish(m);
                sent += 1;
            }
        }
        while let Some(d) = q.next_delivery() {
            let mine = held.entry(d.consumer).or_default();
            assert!(mine.len() < 16, "prefetch exceeded");
            mine.insert(d.tag, d.message.id());
        }
        // Each consumer settles some of what it holds, in varying ways.
        for id in consumers {
            let mine = held.entry(id).or_default();
            if mine.is_empty() {
                continue;
            }
            let tags: Vec<_> = mine.keys().copied().collect();
            let tag = tags[rng.below(tags.len())];
            match rng.below(10) {
                0..=4 => {
                    assert_eq!(q.ack(id, tag, false), Ok(1));
                    *acked.entry(mine.remove(&tag).unwrap()).or_default() += 1;
                }
                5..=7 => {
                    let upto: Vec<_> = mine.range(..=tag).map(|(t, _)| *t).collect();
                    assert_eq!(q.ack(id, tag, true), Ok(upto.len()));
                    for t in upto {
                        *acked.entry(mine.remove(&t).unwrap()).or_default() += 1;
                    }
                }
                8 => {
                    assert_eq!(q.nack(id, tag, false, true), Ok(1));
                    mine.remove(&tag);
                }
                _ => {
                    // Double settle attempts are refused.
                    assert_eq!(q.ack(id, tag, false), Ok(1));
                    *acked.entry(mine.remove(&tag).unwrap()).or_default() += 1;
                    assert_eq!(
                        q.ack(id, tag, false),
                        Err(SettleError::AlreadySettled { tag })
                    );
                }
            }
        }
    }

    assert_eq!(acked.len(), MESSAGES);
    assert!(acked.values().all(|&n| n == 1));
    assert_eq!(acked.keys().copied().collect::<HashSet<_>>(), published);
    let stats = q.stats();
    assert_eq!(stats.published, MESSAGES as u64);
    assert_eq!(stats.acknowledged, MESSAGES as u64);
    assert_eq!(stats.delivered, MESSAGES as u64 + stats.redelivered);
    assert!(stats.requeued > 0 && stats.redelivered == stats.requeued);
    // Round-robin spreads the work evenly.
    for consumer in q.consumers() {
        let share = consumer.delivered as f64 / stats.delivered as f64;
        assert!((0.2..0.3).contains(&share), "{consumer:?}");
    }
}

mod limits {
    use std::time::Duration;

    use super::*;

    const C: ConsumerId = ConsumerId(1);

    fn payload(m: &Envelope) -> &[u8] {
        m.payload().as_ref()
    }

    fn dead(q: &mut QueueState) -> Vec<(String, DeathReason)> {
        q.drain_dead()
            .map(|d| {
                (
                    String::from_utf8_lossy(payload(&d.message)).into_owned(),
                    d.reason,
                )
            })
            .collect()
    }

    #[test]
    fn ttl_smaller_of_queue_and_message_expires_at_head_and_survives_requeue() {
        let mut q = QueueState::with_policy(QueuePolicy {
            message_ttl_ms: Some(1000),
            ..Default::default()
        });
        q.advance_to(10_000);
        q.publish(Envelope::new("long"));
        q.publish(Envelope::new("short").with_expiration(Duration::from_millis(100)));
        q.publish(Envelope::new("capped").with_expiration(Duration::from_secs(60)));
        assert_eq!(q.next_deadline(), Some(11_000), "the head's expiry");
        // At 10_500 "short" has expired but is not at the head: it stays (as in RabbitMQ).
        q.advance_to(10_500);
        assert_eq!(q.stats().ready, 3);
        // A consumer takes "long"; nacking it back does not reset its clock.
        q.add_consumer(C, AckMode::Manual, 1).unwrap();
        let long = q.next_delivery().unwrap();
        assert_eq!(payload(&long.message), b"long");
        // Now "short" is the head and expired: removed, never delivered.
        q.advance_to(10_600);
        assert_eq!(dead(&mut q), vec![("short".into(), DeathReason::Expired)]);
        q.nack(C, long.tag, false, true).unwrap();
        q.advance_to(11_000);
        // "long" (1 s from 10_000) and "capped" (queue TTL 1 s beats 60 s) are both gone.
        assert_eq!(q.next_delivery().map(|d| d.tag), None);
        assert_eq!(
            dead(&mut q),
            vec![
                ("long".into(), DeathReason::Expired),
                ("capped".into(), DeathReason::Expired)
            ]
        );
        let s = q.stats();
        assert_eq!((s.expired, s.ready, s.delivered), (3, 0, 1));
    }

    #[test]
    fn drop_head_and_reject_publish() {
        let mut q = QueueState::with_policy(QueuePolicy {
            max_length: Some(2),
            ..Default::default()
        });
        for m in ["a", "b", "c"] {
            assert!(matches!(q.publish(Envelope::new(m)), Publish::Enqueued));
        }
        assert_eq!(dead(&mut q), vec![("a".into(), DeathReason::MaxLen)]);
        assert_eq!((q.stats().ready, q.stats().maxlen), (2, 1));

        let mut q = QueueState::with_policy(QueuePolicy {
            max_length_bytes: Some(5),
            overflow: Overflow::RejectPublish,
            ..Default::default()
        });
        assert!(matches!(q.publish(Envelope::new("abc")), Publish::Enqueued));
        match q.publish(Envelope::new("def")) {
            Publish::Refused(m) => assert_eq!(payload(&m), b"def"),
            Publish::Enqueued | Publish::Dropped => panic!("6 bytes > 5: refused"),
        }
        assert!(matches!(q.publish(Envelope::new("de")), Publish::Enqueued));
        let s = q.stats();
        assert_eq!(
            (s.ready, s.ready_bytes, s.refused, s.published),
            (2, 5, 1, 2)
        );
        assert!(
            !q.has_dead(),
            "a refused message is handed back, not dead-lettered"
        );
    }

    #[test]
    fn delivery_limit_dead_letters_instead_of_requeueing() {
        let mut q = QueueState::with_policy(QueuePolicy {
            delivery_limit: Some(2),
            ..Default::default()
        });
        q.add_consumer(C, AckMode::Manual, 0).unwrap();
        q.publish(Envelope::new("poison"));
        let first = q.next_delivery().unwrap();
        q.nack(C, first.tag, false, true).unwrap();
        let second = q.next_delivery().unwrap();
        assert_eq!(second.message.delivery_count(), 2);
        // Returned after its 2nd delivery: over the limit.
        q.remove_consumer(C).unwrap();
        assert_eq!(
            dead(&mut q),
            vec![("poison".into(), DeathReason::DeliveryLimit)]
        );
        let s = q.stats();
        assert_eq!((s.ready, s.requeued, s.delivery_limit), (0, 1, 1));
    }

    #[test]
    fn rejected_messages_go_to_the_outbox() {
        let mut q = QueueState::new();
        q.add_consumer(C, AckMode::Manual, 0).unwrap();
        q.publish(Envelope::new("x"));
        q.publish(Envelope::new("y"));
        let _x = q.next_delivery().unwrap();
        let y = q.next_delivery().unwrap();
        q.nack(C, y.tag, true, false).unwrap();
        assert_eq!(
            dead(&mut q),
            vec![
                ("x".into(), DeathReason::Rejected),
                ("y".into(), DeathReason::Rejected)
            ]
        );
        assert!(!q.has_dead());
    }

    #[test]
    fn delayed_nack_comes_back_at_its_position_only_when_due() {
        let mut q = QueueState::new();
        q.add_consumer(C, AckMode::Manual, 0).unwrap();
        q.advance_to(1000);
        q.publish(Envelope::new("first"));
        q.publish(Envelope::new("second"));
        let first = q.next_delivery().unwrap();
        q.nack_delayed(C, first.tag, false, 1500).unwrap();
        assert_eq!((q.stats().delayed, q.stats().ready), (1, 1));
        assert_eq!(q.next_deadline(), Some(1500));
        let second = q.next_delivery().unwrap();
        assert_eq!(payload(&second.message), b"second");
        q.advance_to(1499);
        assert!(q.next_delivery().is_none(), "not before it is due");
        q.advance_to(1500);
        let again = q.next_delivery().unwrap();
        assert_eq!(payload(&again.message), b"first");
        assert!(again.message.redelivered());
        assert_eq!(q.stats().delayed, 0);
        assert!(!q.is_empty());
    }
}

/// The journal of a durable queue, under every way a message can leave:
/// length limits, TTLs, delivery limits, delayed requeues, consumers going
/// away, `basic.get`. What it reports settled was persisted and is settled
/// once; what the queue holds is what was persisted and not settled.
mod journal {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Step {
        Publish {
            persist: bool,
            ttl: Option<u64>,
        },
        Add {
            manual: bool,
            prefetch: u32,
        },
        Remove(usize),
        Deliver,
        Fetch(usize),
        Settle {
            pick: usize,
            multiple: bool,
            how: u8,
        },
        Advance(u64),
        Purge,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (any::<bool>(), proptest::option::weighted(0.3, 0u64..20))
                .prop_map(|(persist, ttl)| Step::Publish { persist, ttl }),
            1 => (any::<bool>(), 0u32..3).prop_map(|(manual, prefetch)| Step::Add { manual, prefetch }),
            1 => (0usize..4).prop_map(Step::Remove),
            5 => Just(Step::Deliver),
            1 => (0usize..4).prop_map(Step::Fetch),
            5 => (any::<usize>(), any::<bool>(), 0u8..4)
                .prop_map(|(pick, multiple, how)| Step::Settle { pick, multiple, how }),
            2 => (0u64..15).prop_map(Step::Advance),
            1 => Just(Step::Purge),
        ]
    }

    fn policy() -> impl Strategy<Value = QueuePolicy> {
        (
            proptest::option::of(0u64..10),
            proptest::option::of(1u32..3),
            proptest::option::of(1usize..6),
            prop_oneof![Just(Overflow::DropHead), Just(Overflow::RejectPublish)],
        )
            .prop_map(|(ttl, limit, max, overflow)| QueuePolicy {
                message_ttl_ms: ttl,
                delivery_limit: limit,
                max_length: max,
                max_length_bytes: None,
                overflow,
                single_active_consumer: false,
                max_priority: None,
                shed: None,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn journal_matches_what_the_queue_holds(
            policy in policy(),
            steps in proptest::collection::vec(step(), 0..200),
        ) {
            let mut q = QueueState::with_policy(policy);
            let mut live: HashSet<u64> = HashSet::new();
            let mut next_loc = 1u64;
            let mut consumers: Vec<ConsumerId> = Vec::new();
            let mut next_consumer = 0u64;
            let mut held: Vec<(ConsumerId, DeliveryTag)> = Vec::new();
            let mut now = 0u64;
            for step in steps {
                match step {
                    Step::Publish { persist, ttl } => {
                        let mut m = Envelope::new("m");
                        if let Some(ms) = ttl {
                            m = m.with_expiration(std::time::Duration::from_millis(ms));
                        }
                        if persist {
                            let loc = next_loc;
                            next_loc += 1;
                            q.publish_persisted(m, |_, _, _| {
                                live.insert(loc);
                                loc
                            });
                        } else {
                            q.publish(m);
                        }
                    }
                    Step::Add { manual, prefetch } => {
                        next_consumer += 1;
                        let id = ConsumerId(next_consumer);
                        let mode = if manual { AckMode::Manual } else { AckMode::Auto };
                        q.add_consumer(id, mode, prefetch).unwrap();
                        consumers.push(id);
                    }
                    Step::Remove(i) if !consumers.is_empty() => {
                        let id = consumers.remove(i % consumers.len());
                        q.remove_consumer(id).unwrap();
                        held.retain(|(c, _)| *c != id);
                    }
                    Step::Deliver => {
                        if let Some(d) = q.next_delivery()
                            && q.consumer_stats(d.consumer).is_some_and(|c| c.mode == AckMode::Manual)
                        {
                            held.push((d.consumer, d.tag));
                        }
                    }
                    Step::Fetch(i) if !consumers.is_empty() => {
                        let id = consumers[i % consumers.len()];
                        if let Ok(Some(d)) = q.fetch(id)
                            && q.consumer_stats(id).is_some_and(|c| c.mode == AckMode::Manual)
                        {
                            held.push((d.consumer, d.tag));
                        }
                    }
                    Step::Settle { pick, multiple, how } if !held.is_empty() => {
                        let (c, tag) = held[pick % held.len()];
                        let result = match how {
                            0 => q.ack(c, tag, multiple),
                            1 => q.nack(c, tag, multiple, true),
                            2 => q.nack(c, tag, multiple, false),
                            _ => q.nack_delayed(c, tag, multiple, now + 5),
                        };
                        if result.is_ok() {
                            held.retain(|(hc, ht)| *hc != c || (if multiple { ht.0 > tag.0 } else { *ht != tag }));
                        }
                    }
                    Step::Advance(ms) => {
                        now += ms;
                        q.advance_to(now);
                    }
                    Step::Purge => {
                        q.purge();
                    }
                    _ => {}
                }
                let journal = q.take_journal();
                for loc in &journal.settled {
                    prop_assert!(live.remove(loc), "settled twice or never persisted: {}", loc);
                }
                for loc in &journal.delivered {
                    prop_assert!(live.contains(loc), "delivered after leaving: {}", loc);
                }
                let persisted: HashSet<u64> = q.persisted().into_iter().collect();
                prop_assert_eq!(&persisted, &live);
            }
        }
    }

    #[test]
    fn restored_messages_come_back_in_order_before_new_ones() {
        let mut q = QueueState::new();
        let restored = [(7, NEVER, msg("b"), 11), (3, NEVER, msg("a"), 10)];
        q.restore(restored);
        q.publish(msg("c"));
        q.add_consumer(A, AckMode::Manual, 0).unwrap();
        let mut got = Vec::new();
        while let Some(d) = q.next_delivery() {
            got.push(name(&d.message).to_string());
        }
        assert_eq!(got, ["a", "b", "c"]);
        assert_eq!(q.take_journal().delivered, vec![10, 11]);
        let mut persisted = q.persisted();
        persisted.sort_unstable();
        assert_eq!(persisted, vec![10, 11]);
    }
}

/// A priority queue's ready messages against a reference: whatever the
/// sequence of publishes (priorities above the maximum included), takes
/// and requeues, the next message is the one of the highest (capped)
/// priority that was published first.
mod priority_order {
    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Publish(u8),
        Take,
        /// Requeue the n-th (modulo) message taken and not yet requeued.
        Requeue(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..9).prop_map(Op::Publish),
            2 => Just(Op::Take),
            1 => (0usize..16).prop_map(Op::Requeue),
        ]
    }

    proptest! {
        #[test]
        fn the_head_is_the_highest_priority_then_the_oldest(ops in proptest::collection::vec(op(), 1..200)) {
            const MAX: u8 = 5;
            let mut ready = Ready {
                levels: (0..MAX).map(|_| VecDeque::new()).collect(),
                ..Ready::default()
            };
            // The reference: (capped priority, seq) of each ready message.
            let mut model: Vec<(u8, u64)> = Vec::new();
            let mut taken: Vec<Entry> = Vec::new();
            let mut seq = 0;
            for op in ops {
                match op {
                    Op::Publish(p) => {
                        let message = Envelope::new("m").with_priority(p);
                        ready.push(Entry { seq, message, expires_at: NEVER });
                        model.push((p.min(MAX), seq));
                        seq += 1;
                    }
                    Op::Take => {
                        let want = model
                            .iter()
                            .copied()
                            .min_by_key(|(p, s)| (std::cmp::Reverse(*p), *s));
                        let got = ready.pop();
                        prop_assert_eq!(got.as_ref().map(|e| e.seq), want.map(|w| w.1));
                        if let Some(entry) = got {
                            model.retain(|m| m.1 != entry.seq);
                            taken.push(entry);
                        }
                    }
                    Op::Requeue(n) if !taken.is_empty() => {
                        let entry = taken.remove(n % taken.len());
                        model.push((entry.message.priority().min(MAX), entry.seq));
                        ready.requeue(entry);
                    }
                    Op::Requeue(_) => {}
                }
                prop_assert_eq!(ready.len(), model.len());
                prop_assert_eq!(ready.is_empty(), model.is_empty());
            }
        }
    }
}

/// Consumers are found by id whether the queue scans its few or indexes its
/// many (from `INDEXED_FROM` on): registered in no particular id order,
/// each settles its own delivery and reads its own stats, and a duplicate
/// id or a removed one is refused, on both sides of the threshold and as
/// removals cross it back.
#[test]
fn consumers_are_found_by_id_with_few_and_with_many() {
    let ids: Vec<ConsumerId> = (0..2 * INDEXED_FROM as u64)
        .map(|i| ConsumerId(1 + (i * 7919) % 101))
        .collect();
    let mut q = QueueState::new();
    let mut present: Vec<ConsumerId> = Vec::new();
    let check = |q: &mut QueueState, present: &[ConsumerId], removed: &[ConsumerId]| {
        for &id in present {
            assert_eq!(q.consumer_stats(id).map(|s| s.id), Some(id));
            assert_eq!(
                q.add_consumer(id, AckMode::Manual, 0),
                Err(ConsumerError::Duplicate(id))
            );
        }
        for &id in removed {
            assert!(q.consumer_stats(id).is_none());
            assert_eq!(q.remove_consumer(id), Err(SettleError::UnknownConsumer(id)));
        }
        // One delivery to each, in round-robin order; each settles its own.
        for _ in 0..present.len() {
            q.publish(msg("m"));
        }
        let mut served = HashSet::new();
        while let Some(d) = q.next_delivery() {
            assert!(served.insert(d.consumer), "{:?} served twice", d.consumer);
            assert_eq!(q.ack(d.consumer, d.tag, false), Ok(1));
        }
        assert_eq!(served, present.iter().copied().collect::<HashSet<_>>());
    };
    for &id in &ids {
        q.add_consumer(id, AckMode::Manual, 0).unwrap();
        present.push(id);
        check(&mut q, &present, &[]);
    }
    let mut removed = Vec::new();
    // From the middle, so that positions after it move.
    while present.len() > 1 {
        let id = present.remove(present.len() / 2);
        assert_eq!(q.remove_consumer(id), Ok(0));
        removed.push(id);
        check(&mut q, &present, &removed);
    }
}
