//! Helpers shared by the messaging tests: messages that carry a number, a
//! way to let every actor run, draining what a test channel received, and a
//! stream reader that reports what it reads and can be held back.
//!
//! Each test file uses some of them.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use postbox::Failure;
use postbox_actors::{
    Broker, Envelope, ExchangeOptions, QueueOptions, StreamConsumer, StreamDelivery, StreamHandle,
    StreamStart, StreamSubscription, SubscribeOptions,
};
use tokio::sync::{Semaphore, mpsc};

/// Long enough for anything in these tests to happen, in virtual time.
pub const WAIT: Duration = Duration::from_secs(5);

/// A message carrying `n`, JSON-encoded.
pub fn msg(n: u32) -> Envelope {
    Envelope::encode(&n).unwrap()
}

/// Lets every actor run until idle (virtual time: free).
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// What has arrived on `rx` so far.
pub fn drain<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Ok(x) = rx.try_recv() {
        out.push(x);
    }
    out
}

/// What has arrived on `rx` once every actor has run.
pub async fn settled<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
    settle().await;
    drain(rx)
}

/// One record as a [`Reader`] saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Got {
    pub label: &'static str,
    pub offset: u64,
    pub value: u32,
    pub attempt: u32,
    pub skipped: u64,
}

/// A stream subscriber that reports every record it reads, optionally waiting
/// for a permit of `gate` before each one (a test-controlled slow reader).
pub struct Reader {
    label: &'static str,
    tx: mpsc::UnboundedSender<Got>,
    gate: Option<Arc<Semaphore>>,
}

impl StreamConsumer for Reader {
    async fn handle(&mut self, d: StreamDelivery) -> Result<(), Failure> {
        if let Some(gate) = &self.gate {
            gate.acquire().await?.forget();
        }
        let _ = self.tx.send(Got {
            label: self.label,
            offset: d.offset(),
            value: d.decode()?,
            attempt: d.attempt(),
            skipped: d.skipped(),
        });
        Ok(())
    }
}

/// A factory of [`Reader`]s.
pub fn reader(
    label: &'static str,
    tx: &mpsc::UnboundedSender<Got>,
    gate: Option<&Arc<Semaphore>>,
) -> impl Fn() -> Reader + Send + Sync + 'static {
    let (tx, gate) = (tx.clone(), gate.cloned());
    move || Reader {
        label,
        tx: tx.clone(),
        gate: gate.clone(),
    }
}

/// A reader of `stream` from the next record that waits for a permit of the
/// returned gate before each record: it holds back block-mode retention.
pub async fn gated(
    stream: &StreamHandle,
) -> (
    Arc<Semaphore>,
    mpsc::UnboundedReceiver<Got>,
    StreamSubscription<Reader>,
) {
    let gate = Arc::new(Semaphore::new(0));
    let (tx, rx) = mpsc::unbounded_channel();
    let sub = stream
        .subscribe(
            StreamStart::Next,
            SubscribeOptions::default(),
            reader("gated", &tx, Some(&gate)),
        )
        .await
        .unwrap();
    (gate, rx, sub)
}

/// The values of what a reader reported.
pub fn values(got: Vec<Got>) -> Vec<u32> {
    got.into_iter().map(|g| g.value).collect()
}

/// Every record of `stream`, in offset order, read from the start by a fresh
/// subscriber.
pub async fn records(stream: &StreamHandle) -> Vec<u32> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sub = stream
        .subscribe(
            StreamStart::First,
            SubscribeOptions::default(),
            reader("records", &tx, None),
        )
        .await
        .unwrap();
    settle().await;
    sub.cancel().await;
    values(drain(&mut rx))
}

/// Copies a data directory, to reopen the same state several times (or to
/// keep what a crash of the broker using it would leave, as far as what was
/// synced goes).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// The segment files (`*.seg`) in `dir`, in order.
pub fn seg_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// Sets the format version of `file` (a storage file) to 9 and checks that
/// opening `dir` is refused with `UnsupportedVersion`.
pub fn assert_unknown_version_refused(
    rt: &postbox::Runtime,
    dir: &std::path::Path,
    file: &std::path::Path,
) {
    use postbox_actors::{Broker, BrokerError, StorageOptions, StoreError};
    let mut data = std::fs::read(file).unwrap();
    data[8] = 9; // the version field
    std::fs::write(file, &data).unwrap();
    match Broker::open(rt, StorageOptions::new(dir)) {
        Err(BrokerError::Storage(err @ StoreError::UnsupportedVersion { version: 9, .. })) => {
            assert!(err.to_string().contains("version 9"), "{err}");
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
}

pub mod orders;

/// A fanout dead-letter exchange "dlx" feeding queue "dlq": give a queue
/// `.dead_letter_exchange("dlx")` and read its dead letters from "dlq".
pub async fn dead_letter_queue(broker: &Broker) {
    broker
        .declare_exchange("dlx", ExchangeOptions::fanout())
        .await
        .unwrap();
    broker
        .declare_queue("dlq", QueueOptions::default())
        .await
        .unwrap();
    broker.bind_queue("dlq", "dlx", "").await.unwrap();
}
