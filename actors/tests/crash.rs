//! Kill -9: a child process (this test binary, re-run as `crash_child`)
//! publishes persistent messages with confirms and consumes them with acks
//! on a data directory, and is killed with SIGKILL at a random moment, round
//! after round. After each kill the directory is reopened and checked:
//!
//! - every confirmed message is there, or was acknowledged;
//! - no message whose ack was made durable (`QueueHandle::sync` returned
//!   after it) is there;
//! - nothing is corrupt, nothing is there twice, and each publisher's
//!   messages are in the order it published them;
//! - the queue's duplicate window remembers every confirmed message: each,
//!   published again, is refused as a duplicate.
//!
//! The child prints what it knows as lines on stdout: `C r p s` when message
//! (round r, publisher p, sequence s) is confirmed, `A r p s` when it starts
//! acking one, `D r p s` when the ack returned, and `S` when a sync returned
//! (every ack done before it is durable).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use postbox::Runtime;
use postbox_actors::{
    AckMode, Broker, BrokerError, ConsumeOptions, DedupWindow, Delivery, Envelope, MessageId,
    QueueOptions, StorageOptions,
};

const DIR_ENV: &str = "POSTBOX_CRASH_DIR";
const ROUND_ENV: &str = "POSTBOX_CRASH_ROUND";
const PUBLISHERS: u32 = 3;
const PER_ROUND: u32 = 800;

type Id = (u32, u32, u32);

/// A persistent message whose id is derived from (round, publisher, seq), so
/// that a retry of it carries the same id.
fn payload(id: Id) -> Envelope {
    Envelope::encode(&id)
        .unwrap()
        .with_persistent(true)
        .with_id(MessageId::for_key(&format!("{}/{}/{}", id.0, id.1, id.2)))
}

/// The queue's options: durable, with a duplicate window longer than the test.
fn options() -> QueueOptions {
    QueueOptions::default()
        .durable()
        .dedup(DedupWindow::new(Duration::from_secs(3600)))
}

/// The child's workload; does nothing unless run by `kill_9_loses_nothing_confirmed`.
#[test]
fn crash_child() {
    let (Ok(dir), Ok(round)) = (std::env::var(DIR_ENV), std::env::var(ROUND_ENV)) else {
        return;
    };
    let round: u32 = round.parse().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    let driver = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    driver.block_on(async move {
        let broker = Broker::open(&rt, StorageOptions::new(&dir)).unwrap();
        let queue = broker.declare_queue("q", options()).await.unwrap();
        let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<Id>();
        let _consumer = broker
            .consume("q", ConsumeOptions::manual(32), move || {
                let acked = acked_tx.clone();
                move |d: Delivery| {
                    let acked = acked.clone();
                    async move {
                        let id: Id = d.decode()?;
                        // Said before acking: a message may be gone once
                        // its ack started.
                        println!("A {} {} {}", id.0, id.1, id.2);
                        // Slower than the publishers: a backlog builds up.
                        if id.2.is_multiple_of(16) {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        d.ack().await?;
                        let _ = acked.send(id);
                        Ok(())
                    }
                }
            })
            .await
            .unwrap();
        for p in 0..PUBLISHERS {
            let queue = queue.clone();
            tokio::spawn(async move {
                // The last publisher publishes batches of 8, confirmed together.
                let batch = if p + 1 == PUBLISHERS { 8 } else { 1 };
                // A bounded amount per round, so the backlog left for the
                // next rounds stays small.
                for start in (0..PER_ROUND).step_by(batch) {
                    let ids: Vec<Id> = (start..start + batch as u32)
                        .map(|s| (round, p, s))
                        .collect();
                    let sent = if batch == 1 {
                        queue.publish(payload(ids[0])).await
                    } else {
                        queue
                            .publish_batch(ids.iter().map(|&id| payload(id)).collect())
                            .await
                    };
                    if sent.is_ok() {
                        for id in ids {
                            println!("C {} {} {}", id.0, id.1, id.2);
                        }
                    }
                }
            });
        }
        // Acks done, and now and then made durable.
        loop {
            let Some(id) = acked_rx.recv().await else {
                break;
            };
            println!("D {} {} {}", id.0, id.1, id.2);
            while let Ok(id) = acked_rx.try_recv() {
                println!("D {} {} {}", id.0, id.1, id.2);
            }
            if queue.sync().await.is_ok() {
                println!("S");
            }
        }
    });
}

/// What the children reported, over every round.
#[derive(Default)]
struct Known {
    confirmed: HashSet<Id>,
    acked: HashSet<Id>,
    durably_acked: HashSet<Id>,
}

impl Known {
    fn read(&mut self, lines: &[String]) {
        let mut since_sync: Vec<Id> = Vec::new();
        for line in lines {
            // The test harness's own "test crash_child ... " may start the
            // first line.
            let line = line.rsplit("... ").next().unwrap_or(line);
            let mut parts = line.split_whitespace();
            let kind = parts.next();
            let mut num = || parts.next().and_then(|p| p.parse::<u32>().ok());
            match kind {
                Some("S") => self.durably_acked.extend(since_sync.drain(..)),
                Some(k @ ("C" | "A" | "D")) => {
                    let (Some(r), Some(p), Some(s)) = (num(), num(), num()) else {
                        continue; // a line cut by the kill
                    };
                    match k {
                        "C" => self.confirmed.insert((r, p, s)),
                        "A" => self.acked.insert((r, p, s)),
                        _ => {
                            since_sync.push((r, p, s));
                            true
                        }
                    };
                }
                _ => {}
            }
        }
    }
}

/// Every message in the queue, in queue order (fetched and requeued).
async fn contents(broker: &Broker) -> Vec<Id> {
    let mut held = Vec::new();
    let mut out = Vec::new();
    while let Some((d, _)) = broker.get("q", AckMode::Manual).await.unwrap() {
        out.push(
            d.decode::<Id>()
                .expect("a message decodes: nothing is corrupt"),
        );
        held.push(d);
    }
    out
}

#[test]
fn kill_9_loses_nothing_confirmed() {
    if std::env::var(DIR_ENV).is_ok() {
        return; // running as a child
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut known = Known::default();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let rounds = 20;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(DIR_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        // A random moment: 200 to 700 ms in (the child needs ~100 ms to start).
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(200 + rng % 500));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        if std::env::var("CRASH_DEBUG").is_ok() {
            eprintln!(
                "round {round}: {} lines; first: {:?}",
                lines.len(),
                &lines[..lines.len().min(12)]
            );
        }
        known.read(&lines);

        let rt = Runtime::with_arbiters(1).unwrap();
        let present = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let started = std::time::Instant::now();
                let broker = Broker::open(&rt, StorageOptions::new(dir.path())).unwrap();
                if std::env::var("CRASH_DEBUG").is_ok() {
                    eprintln!(
                        "open took {:?}: {:?}",
                        started.elapsed(),
                        broker.storage_stats()
                    );
                }
                let present = contents(&broker).await;
                // The duplicate window survived too: every message confirmed
                // in this round, published again, is refused as a duplicate
                // (acknowledged ones included).
                let queue = broker.queue("q").unwrap();
                for &id in known.confirmed.iter().filter(|id| id.0 == round) {
                    match queue.publish(payload(id)).await {
                        Err(BrokerError::Duplicate(_)) => {}
                        other => {
                            panic!("round {round}: confirmed {id:?} published again: {other:?}")
                        }
                    }
                }
                present
            });
        rt.shutdown();

        if std::env::var("CRASH_DEBUG").is_ok() {
            eprintln!(
                "round {round}: present {} first {:?}",
                present.len(),
                &present[..present.len().min(10)]
            );
        }
        let unique: HashSet<Id> = present.iter().copied().collect();
        assert_eq!(
            unique.len(),
            present.len(),
            "round {round}: a message is there twice"
        );
        for id in &known.confirmed {
            assert!(
                unique.contains(id) || known.acked.contains(id),
                "round {round}: confirmed {id:?} is gone and was never acked"
            );
        }
        for id in &present {
            assert!(
                !known.durably_acked.contains(id),
                "round {round}: {id:?} is back after its ack was synced"
            );
        }
        let mut last: HashMap<(u32, u32), u32> = HashMap::new();
        for &(r, p, s) in &present {
            if let Some(prev) = last.insert((r, p), s) {
                assert!(
                    prev < s,
                    "round {round}: publisher {r}/{p} out of order: {prev} then {s}"
                );
            }
        }
    }
    // The test did something: messages were confirmed, acked, synced.
    let by_round: BTreeMap<u32, usize> =
        known.confirmed.iter().fold(BTreeMap::new(), |mut m, id| {
            *m.entry(id.0).or_default() += 1;
            m
        });
    assert!(
        known.confirmed.len() > 1000,
        "confirmed per round: {by_round:?}"
    );
    assert!(
        known.durably_acked.len() > 100,
        "{} durable acks",
        known.durably_acked.len()
    );
}
