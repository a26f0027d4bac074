//! The idempotency storm, run against every store: orders published three
//! times each with the same id, consumed by four consumers that fail, crash
//! before the side effect, crash after recording the key and before the ack,
//! and crash after the ack, at random. The side effect (a counter per
//! order) must end at exactly 1 for every order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use postbox::{Backoff, Failure, RuntimeHandle};
use postbox_actors::idempotency::{IdempotencyStats, IdempotencyStore, Idempotent};
use postbox_actors::testkit::CrashAfterRecord;
use postbox_actors::{
    Broker, ConsumeOptions, Consumer, Delivery, Envelope, Layer, LayerExt, MessageId, QueueOptions,
};

/// Percent chances of each fault, per delivery that reaches it.
const ERROR: u32 = 5;
const PANIC_BEFORE: u32 = 3;
const PANIC_AFTER_RECORD: u32 = 3;
const PANIC_AFTER_ACK: u32 = 3;

/// What a storm saw.
#[derive(Debug)]
pub struct Storm {
    /// The layer's counters.
    pub stats: IdempotencyStats,
    /// Handler errors, and panics at each point.
    pub errors: u64,
    pub panics: u64,
}

/// Crashes its consumer after the inner consumer returned (acked) now and
/// then.
#[derive(Clone)]
struct CrashAfterAck {
    rng: Arc<Mutex<fastrand::Rng>>,
    panics: Arc<AtomicU64>,
}

struct CrashingAfterAck<C> {
    inner: C,
    layer: CrashAfterAck,
}

impl<C: Consumer> Consumer for CrashingAfterAck<C> {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        self.inner.handle(delivery).await?;
        if self.layer.rng.lock().u32(0..100) < PANIC_AFTER_ACK {
            self.layer.panics.fetch_add(1, Ordering::Relaxed);
            panic!("crash after the ack");
        }
        Ok(())
    }

    async fn cancelled(&mut self) {
        self.inner.cancelled().await
    }
}

impl<C: Consumer> Layer<C> for CrashAfterAck {
    type Consumer = CrashingAfterAck<C>;
    fn layer(&self, inner: C) -> CrashingAfterAck<C> {
        CrashingAfterAck {
            inner,
            layer: self.clone(),
        }
    }
}

/// Runs the storm: `orders` orders, each published three times with one id
/// (all once, then all again, twice), on a fresh queue named after `name`,
/// four consumers; waits until the queue is empty and checks every order's
/// side effect ran exactly once. Real time: stores talk to servers.
pub async fn exactly_once_orders<S: IdempotencyStore>(
    rt: &RuntimeHandle,
    name: &str,
    store: S,
    orders: u32,
    seed: u64,
) -> Storm {
    let panics = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let after_record = Arc::new(AtomicU64::new(0));
    let store = {
        let (panics, after_record) = (panics.clone(), after_record.clone());
        let rng = Mutex::new(fastrand::Rng::with_seed(seed));
        CrashAfterRecord::new(store, move |_: &str| {
            let crash = rng.lock().u32(0..100) < PANIC_AFTER_RECORD;
            if crash {
                panics.fetch_add(1, Ordering::Relaxed);
                after_record.fetch_add(1, Ordering::Relaxed);
            }
            crash
        })
    };
    let idempotent = Idempotent::by_message_id(store).lease(Duration::from_secs(30));
    let effects: Arc<Vec<AtomicU32>> = Arc::new((0..orders).map(|_| AtomicU32::new(0)).collect());
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed ^ 0x5eed)));
    let broker = Broker::new(rt);
    let queue = broker
        .declare_queue(name, QueueOptions::default())
        .await
        .expect("declare");
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let (effects, rng, errors, panics) =
            (effects.clone(), rng.clone(), errors.clone(), panics.clone());
        let crash_after_ack = CrashAfterAck {
            rng: rng.clone(),
            panics: panics.clone(),
        };
        let handler = move || {
            let (effects, rng, errors, panics) =
                (effects.clone(), rng.clone(), errors.clone(), panics.clone());
            move |d: Delivery| {
                let (effects, rng, errors, panics) =
                    (effects.clone(), rng.clone(), errors.clone(), panics.clone());
                async move {
                    let order: u32 = d.decode()?;
                    let roll = rng.lock().u32(0..100);
                    if roll < ERROR {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return Err(Failure::msg(format!("declined {order}")));
                    }
                    if roll < ERROR + PANIC_BEFORE {
                        panics.fetch_add(1, Ordering::Relaxed);
                        panic!("crash before charging {order}");
                    }
                    // The side effect; the layer records the key and acks.
                    effects[order as usize].fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }
        };
        let factory = handler.layer(idempotent.clone()).layer(crash_after_ack);
        let options = ConsumeOptions::manual(16)
            .restarts(usize::MAX, Duration::from_secs(1))
            .backoff(Backoff::NONE);
        consumers.push(
            broker
                .consume(name, options, factory)
                .await
                .expect("consume"),
        );
    }
    let ids: Vec<MessageId> = (0..orders).map(|_| MessageId::new()).collect();
    for _round in 0..3 {
        for (order, id) in ids.iter().enumerate() {
            let message = Envelope::encode(&(order as u32))
                .expect("encode")
                .with_id(*id);
            queue.publish(message).await.expect("publish");
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let snap = queue.snapshot().await.expect("snapshot");
        let done = effects.iter().all(|e| e.load(Ordering::SeqCst) >= 1);
        if done && snap.stats.ready == 0 && snap.stats.unacked == 0 && snap.stats.delayed == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not drained: {:?}, {} orders never charged",
            snap.stats,
            effects
                .iter()
                .filter(|e| e.load(Ordering::SeqCst) == 0)
                .count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let twice: Vec<usize> = (0..orders as usize)
        .filter(|&i| effects[i].load(Ordering::SeqCst) != 1)
        .collect();
    assert!(
        twice.is_empty(),
        "orders charged other than once: {twice:?}"
    );
    let stats = idempotent.stats();
    // Each order recorded once: counted, or crashed right after.
    let after_record = after_record.load(Ordering::Relaxed);
    assert_eq!(
        stats.completed + after_record,
        u64::from(orders),
        "{stats:?}"
    );
    assert!(stats.skipped >= 2 * u64::from(orders), "{stats:?}");
    for consumer in consumers {
        consumer.close().await;
    }
    broker.delete_queue(name, Default::default()).await.ok();
    Storm {
        stats,
        errors: errors.load(Ordering::Relaxed),
        panics: panics.load(Ordering::Relaxed),
    }
}
