//! Model-based property tests: random operation sequences run against the queue
//! and a simple reference model, checking results and invariants after each step.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use proptest::prelude::*;

use super::*;
use crate::envelope::MessageId;

const A: ConsumerId = ConsumerId(1);

#[derive(Clone, Copy, Debug)]
enum TagPick {
    /// One of the chosen consumer's outstanding tags (by index), if it has any.
    Held(usize),
    /// Any number, often invalid.
    Raw(u64),
}

#[derive(Clone, Copy, Debug)]
enum Settle {
    Ack,
    Requeue,
    Discard,
}

#[derive(Clone, Debug)]
enum Op {
    Publish,
    Add {
        manual: bool,
        prefetch: u32,
        reuse: Option<usize>,
    },
    Remove(usize),
    Block(usize, bool),
    Deliver,
    Drain,
    Settle {
        consumer: usize,
        tag: TagPick,
        multiple: bool,
        how: Settle,
    },
    Purge,
}

fn op() -> impl Strategy<Value = Op> {
    let tag = prop_oneof![
        3 => any::<usize>().prop_map(TagPick::Held),
        1 => (0u64..40).prop_map(TagPick::Raw),
    ];
    let how = prop_oneof![
        Just(Settle::Ack),
        Just(Settle::Requeue),
        Just(Settle::Discard)
    ];
    prop_oneof![
        6 => Just(Op::Publish),
        2 => (any::<bool>(), 0u32..4, proptest::option::weighted(0.1, 0usize..8))
            .prop_map(|(manual, prefetch, reuse)| Op::Add { manual, prefetch, reuse }),
        1 => (0usize..8).prop_map(Op::Remove),
        1 => (0usize..8, any::<bool>()).prop_map(|(c, b)| Op::Block(c, b)),
        5 => Just(Op::Deliver),
        1 => Just(Op::Drain),
        6 => (0usize..8, tag, any::<bool>(), how).prop_map(
            |(consumer, tag, multiple, how)| Op::Settle { consumer, tag, multiple, how }
        ),
        1 => Just(Op::Purge),
    ]
}

struct MConsumer {
    id: ConsumerId,
    manual: bool,
    prefetch: u32,
    blocked: bool,
    removed: bool,
    /// Outstanding tags -> publish index.
    held: BTreeMap<u64, u64>,
    /// In the line of consumers waiting for a delivery.
    in_line: bool,
}

impl MConsumer {
    fn eligible(&self) -> bool {
        !self.removed
            && !self.blocked
            && (!self.manual || self.prefetch == 0 || self.held.len() < self.prefetch as usize)
    }
}

/// The reference model. Consumers are never deleted, only marked removed.
/// Deliveries follow RabbitMQ's line of active consumers: the front is served
/// and goes to the back; one found unable to take leaves the line and rejoins
/// at the back when it can take again (after a settlement, or unblocked).
#[derive(Default)]
struct Model {
    /// Publish index -> id, for ready messages.
    ready: BTreeMap<u64, MessageId>,
    ids: Vec<MessageId>,
    deliveries: HashMap<MessageId, u32>,
    consumers: Vec<MConsumer>,
    /// Consumer indices, in line.
    line: VecDeque<usize>,
    /// A single active consumer: the first registered one that is still
    /// there gets everything, and keeps the queue while it is there.
    single_active: bool,
    holder: Option<usize>,
    last_tag: u64,
    stats: QueueStats,
}

impl Model {
    fn live(&self, id: ConsumerId) -> Option<usize> {
        self.consumers.iter().position(|c| c.id == id && !c.removed)
    }

    /// The consumer the next delivery goes to; drops those unable to take
    /// from the front of the line on the way.
    fn expected_consumer(&mut self) -> Option<usize> {
        if self.single_active {
            let p = match self.holder {
                Some(p) if !self.consumers[p].removed => p,
                _ => {
                    let p = self.consumers.iter().position(|c| !c.removed)?;
                    self.holder = Some(p);
                    p
                }
            };
            return self.consumers[p].eligible().then_some(p);
        }
        while let Some(&p) = self.line.front() {
            if self.consumers[p].eligible() {
                return Some(p);
            }
            self.consumers[p].in_line = false;
            self.line.pop_front();
        }
        None
    }

    /// Back in line at the end, if out of it and able to take.
    fn rejoin(&mut self, p: usize) {
        let c = &mut self.consumers[p];
        if !c.in_line && c.eligible() {
            c.in_line = true;
            self.line.push_back(p);
        }
    }

    fn check_settle(
        &self,
        id: ConsumerId,
        tag: u64,
        multiple: bool,
    ) -> Result<Vec<u64>, SettleError> {
        let Some(p) = self.live(id) else {
            return Err(SettleError::UnknownConsumer(id));
        };
        let c = &self.consumers[p];
        let t = DeliveryTag(tag);
        if !c.manual {
            return Err(SettleError::AutoAckConsumer(id));
        }
        if tag == 0 || tag > self.last_tag {
            return Err(SettleError::UnknownTag { tag: t });
        }
        if !c.held.contains_key(&tag) {
            return Err(
                match self.consumers.iter().find(|o| o.held.contains_key(&tag)) {
                    Some(o) => SettleError::WrongConsumer {
                        tag: t,
                        owner: o.id,
                    },
                    None => SettleError::AlreadySettled { tag: t },
                },
            );
        }
        Ok(if multiple {
            c.held.range(..=tag).map(|(t, _)| *t).collect()
        } else {
            vec![tag]
        })
    }
}

struct Harness {
    queue: QueueState,
    model: Model,
    next_consumer: u64,
    /// Store locations of the persisted messages the queue should hold,
    /// according to its journal.
    persisted: HashSet<u64>,
}

impl Harness {
    fn pick_consumer(&self, i: usize) -> ConsumerId {
        // One slot past the end is a consumer that never existed.
        self.model
            .consumers
            .get(i % (self.model.consumers.len() + 1))
            .map_or(ConsumerId(u64::MAX), |c| c.id)
    }

    fn publish(&mut self) {
        let m = Envelope::new("m");
        let index = self.model.ids.len() as u64;
        self.model.ids.push(m.id());
        self.model.ready.insert(index, m.id());
        self.model.stats.published += 1;
        // Every other message is persisted, at a location of its own.
        if index.is_multiple_of(2) {
            self.queue.publish(m);
        } else {
            let persisted = &mut self.persisted;
            self.queue.publish_persisted(m, |_, _, _| {
                persisted.insert(index + 1);
                index + 1
            });
        }
    }

    /// What the journal says agrees with what the queue holds: every
    /// location settled was live (settled once), every delivered one is
    /// still held, and the persisted messages held are exactly those
    /// published and not settled.
    fn check_journal(&mut self) {
        let journal = self.queue.take_journal();
        for loc in &journal.settled {
            assert!(
                self.persisted.remove(loc),
                "settled twice, or never persisted: {loc}"
            );
        }
        for loc in &journal.delivered {
            assert!(
                self.persisted.contains(loc),
                "delivered after leaving: {loc}"
            );
        }
        let held: HashSet<u64> = self.queue.persisted().into_iter().collect();
        assert_eq!(held, self.persisted);
        assert_eq!(self.queue.stats().persisted, held.len());
    }

    fn deliver(&mut self) -> bool {
        let result = self.queue.next_delivery();
        let expected = if self.model.ready.is_empty() {
            None
        } else {
            self.model.expected_consumer()
        };
        let (Some(d), Some(p)) = (result.as_ref(), expected) else {
            assert!(
                result.is_none() && expected.is_none(),
                "{result:?} vs {expected:?}"
            );
            return false;
        };
        let m = &mut self.model;
        // (d) and (e): the delivered message is the oldest ready one by original
        // publish position, so a requeued message comes before later publishes.
        let (index, id) = m.ready.pop_first().unwrap();
        assert_eq!(d.message.id(), id);
        let count = m.deliveries.entry(id).or_default();
        *count += 1;
        assert_eq!(d.message.delivery_count(), *count);
        assert_eq!(d.message.redelivered(), *count > 1);
        // Fair round-robin.
        let consumer = &mut m.consumers[p];
        assert_eq!(d.consumer, consumer.id);
        m.last_tag += 1;
        assert_eq!(d.tag, DeliveryTag(m.last_tag));
        // Served: to the back of the line (a single active consumer is
        // served without taking turns).
        if !m.single_active {
            let front = m.line.pop_front();
            assert_eq!(front, Some(p));
            m.line.push_back(p);
        }
        m.stats.delivered += 1;
        if *count > 1 {
            m.stats.redelivered += 1;
        }
        if consumer.manual {
            consumer.held.insert(m.last_tag, index);
        } else {
            m.stats.acknowledged += 1;
        }
        true
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Publish => self.publish(),
            Op::Add {
                manual,
                prefetch,
                reuse,
            } => {
                let id = match reuse {
                    Some(i) if !self.model.consumers.is_empty() => self.pick_consumer(i),
                    _ => {
                        self.next_consumer += 1;
                        ConsumerId(self.next_consumer)
                    }
                };
                let mode = if manual {
                    AckMode::Manual
                } else {
                    AckMode::Auto
                };
                let result = self.queue.add_consumer(id, mode, prefetch);
                if self.model.live(id).is_some() {
                    assert_eq!(result, Err(ConsumerError::Duplicate(id)));
                } else {
                    assert_eq!(result, Ok(()));
                    self.model.consumers.push(MConsumer {
                        id,
                        manual,
                        prefetch,
                        blocked: false,
                        removed: false,
                        held: BTreeMap::new(),
                        in_line: true,
                    });
                    self.model.line.push_back(self.model.consumers.len() - 1);
                }
            }
            Op::Remove(i) => {
                let id = self.pick_consumer(i);
                let result = self.queue.remove_consumer(id);
                match self.model.live(id) {
                    None => assert_eq!(result, Err(SettleError::UnknownConsumer(id))),
                    Some(p) => {
                        let c = &mut self.model.consumers[p];
                        c.removed = true;
                        c.in_line = false;
                        self.model.line.retain(|&q| q != p);
                        let held = std::mem::take(&mut c.held);
                        assert_eq!(result, Ok(held.len()));
                        for index in held.into_values() {
                            self.model
                                .ready
                                .insert(index, self.model.ids[index as usize]);
                            self.model.stats.requeued += 1;
                        }
                    }
                }
            }
            Op::Block(i, blocked) => {
                let id = self.pick_consumer(i);
                let result = self.queue.set_blocked(id, blocked);
                match self.model.live(id) {
                    None => assert_eq!(result, Err(SettleError::UnknownConsumer(id))),
                    Some(p) => {
                        assert_eq!(result, Ok(()));
                        self.model.consumers[p].blocked = blocked;
                        self.model.rejoin(p);
                    }
                }
            }
            Op::Deliver => {
                self.deliver();
            }
            Op::Drain => while self.deliver() {},
            Op::Settle {
                consumer,
                tag,
                multiple,
                how,
            } => {
                let id = self.pick_consumer(consumer);
                let tag = match tag {
                    TagPick::Raw(t) => t,
                    TagPick::Held(i) => self
                        .model
                        .live(id)
                        .map(|p| &self.model.consumers[p].held)
                        .filter(|h| !h.is_empty())
                        .and_then(|h| h.keys().nth(i % h.len()).copied())
                        .unwrap_or(i as u64 % 40),
                };
                let expected = self.model.check_settle(id, tag, multiple);
                let mut discarded = Vec::new();
                let result = match how {
                    Settle::Ack => self.queue.ack(id, DeliveryTag(tag), multiple),
                    Settle::Requeue => self.queue.nack(id, DeliveryTag(tag), multiple, true),
                    Settle::Discard => {
                        self.queue
                            .nack_with(id, DeliveryTag(tag), multiple, false, |m| {
                                discarded.push(m.id())
                            })
                    }
                };
                let tags = match expected {
                    Err(e) => {
                        assert_eq!(result, Err(e));
                        return;
                    }
                    Ok(tags) => tags,
                };
                assert_eq!(result, Ok(tags.len()));
                let p = self.model.live(id).unwrap();
                let mut expected_discards = Vec::new();
                for t in tags {
                    let index = self.model.consumers[p].held.remove(&t).unwrap();
                    let mid = self.model.ids[index as usize];
                    match how {
                        Settle::Ack => self.model.stats.acknowledged += 1,
                        Settle::Requeue => {
                            self.model.stats.requeued += 1;
                            self.model.ready.insert(index, mid);
                        }
                        Settle::Discard => {
                            self.model.stats.rejected += 1;
                            expected_discards.push(mid);
                        }
                    }
                }
                assert_eq!(discarded, expected_discards);
                self.model.rejoin(p);
            }
            Op::Purge => {
                let n = self.model.ready.len();
                self.model.ready.clear();
                self.model.stats.purged += n as u64;
                assert_eq!(self.queue.purge(), n);
            }
        }
    }

    fn check_invariants(&mut self) {
        // A spilling queue's tail, read back without taking it.
        let mut spilled = Vec::new();
        if let Some(s) = &mut self.queue.ready.spill {
            s.tail.each(&mut |m| spilled.push((m.seq, m.message.id())));
        }
        let q = &self.queue;
        let s = q.stats();
        // (a) Conservation.
        assert_eq!(
            s.published,
            (s.ready + s.unacked + s.delayed) as u64
                + s.acknowledged
                + s.rejected
                + s.purged
                + s.expired
                + s.maxlen
                + s.delivery_limit
                + s.shed,
            "{s:?}"
        );
        // Counters and sizes agree with the model.
        let live: Vec<_> = self.model.consumers.iter().filter(|c| !c.removed).collect();
        let expected = QueueStats {
            ready: self.model.ready.len(),
            unacked: live.iter().map(|c| c.held.len()).sum(),
            consumers: live.len(),
            // Every model message has the 1-byte payload "m".
            ready_bytes: self.model.ready.len(),
            spilled: spilled.len(),
            persisted: s.persisted,
            // What the files hold is the spill's business.
            spill_bytes_on_disk: s.spill_bytes_on_disk,
            // Timestamps are the envelopes' business.
            head_timestamp_ms: s.head_timestamp_ms,
            ..self.model.stats
        };
        assert_eq!(s.head_timestamp_ms.is_some(), s.ready > 0);
        assert_eq!(s, expected);
        assert_eq!(q.ready_len(), s.ready);
        assert_eq!(q.unacked_len(), s.unacked);
        assert_eq!(q.is_empty(), s.ready == 0 && s.unacked == 0);
        assert_eq!(q.has_consumers(), s.consumers > 0);
        // Consumers, in registration order.
        let stats: Vec<_> = q.consumers().collect();
        assert_eq!(stats.len(), live.len());
        for (stat, model) in stats.iter().zip(&live) {
            assert_eq!(stat.id, model.id);
            assert_eq!(stat.unacked, model.held.len());
            assert_eq!(stat.blocked, model.blocked);
            // (b) Prefetch is never exceeded.
            if stat.mode == AckMode::Manual && stat.prefetch > 0 {
                assert!(stat.unacked <= stat.prefetch as usize, "{stat:?}");
            }
            assert_eq!(q.consumer_stats(stat.id).as_ref(), Some(stat));
        }
        // (c) Every message is in at most one place, and where the model says.
        let mut seen = HashSet::new();
        let mut last_seq = None;
        let ready = q
            .ready
            .entries
            .iter()
            .map(|e| (e.seq, e.message.id()))
            .chain(spilled.iter().copied());
        for (seq, id) in ready.clone() {
            assert!(seen.insert(id), "duplicate {id:?}");
            assert!(last_seq < Some(seq), "ready out of order");
            last_seq = Some(seq);
        }
        for c in &q.consumers {
            for e in c.unacked.values() {
                assert!(
                    seen.insert(e.message.id()),
                    "duplicate {:?}",
                    e.message.id()
                );
            }
        }
        assert_eq!(seen.len(), s.ready + s.unacked);
        let ready_ids: Vec<_> = ready.map(|(_, id)| id).collect();
        let model_ids: Vec<_> = self.model.ready.values().copied().collect();
        assert_eq!(ready_ids, model_ids);
        // Consumers are found where they are: by a scan while few, through
        // a complete index once many.
        let indexed = q.consumers.len() >= super::INDEXED_FROM;
        assert_eq!(q.index.len(), if indexed { q.consumers.len() } else { 0 });
        for (p, c) in q.consumers.iter().enumerate() {
            assert_eq!(q.find(c.id), Some(p));
        }
        let line: Vec<ConsumerId> = self
            .model
            .line
            .iter()
            .map(|&p| self.model.consumers[p].id)
            .collect();
        let active: Vec<ConsumerId> = q.active.iter().map(|&p| q.consumers[p].id).collect();
        assert_eq!(active, line);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_operations_keep_the_invariants(ops in proptest::collection::vec(op(), 0..250)) {
        let mut h = Harness {
            queue: QueueState::new(),
            model: Model::default(),
            next_consumer: 0,
            persisted: HashSet::new(),
        };
        for op in &ops {
            h.apply(op);
            h.check_invariants();
            h.check_journal();
        }
    }

    /// A spilling queue (2 messages in memory, the rest on disk) behaves
    /// exactly as an unbounded one: same deliveries, same order, nothing
    /// lost or dropped.
    #[test]
    fn a_spilling_queue_behaves_as_an_unbounded_one(ops in proptest::collection::vec(op(), 0..250)) {
        let policy = QueuePolicy {
            max_length: Some(2),
            overflow: Overflow::Spill,
            ..QueuePolicy::default()
        };
        let mut h = Harness {
            queue: QueueState::with_policy(policy),
            model: Model::default(),
            next_consumer: 0,
            persisted: HashSet::new(),
        };
        for op in &ops {
            h.apply(op);
            h.check_invariants();
            h.check_journal();
        }
    }

    /// With a single active consumer: the first consumer still registered
    /// gets every delivery, whoever else is there; the next one takes over
    /// when it goes (requeued messages first).
    #[test]
    fn a_single_active_consumer_queue_keeps_the_invariants(ops in proptest::collection::vec(op(), 0..250)) {
        let policy = QueuePolicy {
            single_active_consumer: true,
            ..QueuePolicy::default()
        };
        let mut h = Harness {
            queue: QueueState::with_policy(policy),
            model: Model {
                single_active: true,
                ..Model::default()
            },
            next_consumer: 0,
            persisted: HashSet::new(),
        };
        for op in &ops {
            h.apply(op);
            h.check_invariants();
            h.check_journal();
        }
    }

    /// (d) One consumer, no requeues: deliveries follow publish order exactly.
    #[test]
    fn single_consumer_without_requeue_delivers_in_publish_order(
        prefetch in 0u32..5,
        ops in proptest::collection::vec((0u8..6, any::<usize>(), any::<bool>()), 0..300),
    ) {
        let mut q = QueueState::new();
        q.add_consumer(A, AckMode::Manual, prefetch).unwrap();
        let mut published = Vec::new();
        let mut delivered = Vec::new();
        let mut held: Vec<DeliveryTag> = Vec::new();
        for (kind, pick, flag) in ops {
            match kind {
                0 | 1 => {
                    let m = Envelope::new("m");
                    published.push(m.id());
                    q.publish(m);
                }
                2 => {
                    if let Some(d) = q.next_delivery() {
                        prop_assert!(!d.message.redelivered());
                        delivered.push(d.message.id());
                        held.push(d.tag);
                    }
                }
                3 if !held.is_empty() => {
                    let i = pick % held.len();
                    if flag {
                        q.ack(A, held[i], true).unwrap();
                        held.drain(..=i);
                    } else {
                        q.reject(A, held[i], false).unwrap();
                        held.remove(i);
                    }
                }
                4 => q.set_blocked(A, flag).unwrap(),
                5 if pick % 8 == 0 => {
                    // Purged messages are never delivered: drop them from the
                    // expected order too.
                    let n = q.purge();
                    let start = published.len() - n;
                    published.truncate(start);
                }
                _ => {}
            }
        }
        // Everything delivered was delivered in publish order.
        let order: HashMap<MessageId, usize> =
            published.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let positions: Vec<_> = delivered.iter().map(|id| order[id]).collect();
        prop_assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        prop_assert_eq!(positions, (0..delivered.len()).collect::<Vec<_>>());
    }
}
