//! Throughput of one queue, in process: `cargo bench --bench queue [-- --quick]`.
//!
//! A first measurement for the foundation; the side-by-side comparison with
//! peers lives in its own benchmark.

use std::time::{Duration, Instant};

use postbox::{Failure, Runtime};
use postbox_actors::{Broker, ConsumeOptions, Delivery, Envelope, QueueOptions};
use tokio::sync::mpsc;

async fn run(
    broker: &Broker,
    name: &str,
    n: u64,
    options: ConsumeOptions,
    consumers: usize,
    batch: usize,
) -> Duration {
    let queue = broker
        .declare_queue(name, QueueOptions::default().mailbox(4096))
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
    let mut handles = Vec::new();
    for _ in 0..consumers {
        let tx = tx.clone();
        let manual = options.ack_mode() == postbox_actors::AckMode::Manual;
        handles.push(
            broker
                .consume(name, options.clone(), move || {
                    let tx = tx.clone();
                    let mut count = 0u64;
                    move |d: Delivery| {
                        count += 1;
                        let report = count.is_multiple_of(1024);
                        let tx = tx.clone();
                        async move {
                            // Manual acks are batched: every 64th tag settles all before it.
                            if manual && (report || d.tag().0.is_multiple_of(64)) {
                                d.ack_multiple().await.map_err(Failure::from)?;
                            }
                            if report {
                                let _ = tx.send(1024);
                            }
                            Ok(())
                        }
                    }
                })
                .await
                .unwrap(),
        );
    }
    let payload = bytes::Bytes::from(vec![7u8; 64]);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < n {
        let k = (batch as u64).min(n - sent) as usize;
        if k == 1 {
            queue.publish(Envelope::new(payload.clone())).await.unwrap();
        } else {
            let msgs = (0..k).map(|_| Envelope::new(payload.clone())).collect();
            queue.publish_batch(msgs).await.unwrap();
        }
        sent += k as u64;
    }
    let mut received = 0u64;
    while received + 1024 * consumers as u64 <= n {
        received += rx.recv().await.unwrap();
    }
    start.elapsed()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: u64 = if quick { 100_000 } else { 2_000_000 };
    let rt = Runtime::new().unwrap();
    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    driver.block_on(async {
        let broker = Broker::new(&rt);
        let cases: [(&str, ConsumeOptions, usize, usize); 4] = [
            (
                "auto-ack, 1 consumer, publish",
                ConsumeOptions::auto().mailbox(1024),
                1,
                1,
            ),
            (
                "auto-ack, 1 consumer, batches of 64",
                ConsumeOptions::auto().mailbox(1024),
                1,
                64,
            ),
            (
                "manual, prefetch 256, 2 consumers, publish",
                ConsumeOptions::manual(256),
                2,
                1,
            ),
            (
                "manual, prefetch 256, 2 consumers, batches of 64",
                ConsumeOptions::manual(256),
                2,
                64,
            ),
        ];
        for (i, (label, options, consumers, batch)) in cases.into_iter().enumerate() {
            let elapsed = run(&broker, &format!("bench-{i}"), n, options, consumers, batch).await;
            println!(
                "{label:<50} {:>12.0} msg/s",
                n as f64 / elapsed.as_secs_f64()
            );
        }
    });
    rt.shutdown();
}
