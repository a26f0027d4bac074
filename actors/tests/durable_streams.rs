//! Durable streams on a data directory: records and named subscribers'
//! offsets that survive reopening (and a crash, simulated by copying the
//! directory of a running broker after a sync point), what does not come
//! back, retention deleting whole segments, damaged files, durable bindings,
//! and publishes that wait for the disk.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use postbox::Runtime;
use postbox_actors::testkit::DiskFaults;
use postbox_actors::{
    Broker, BrokerError, Envelope, ExchangeOptions, MessageId, StorageOptions, StoreError,
    StreamDelivery, StreamError, StreamHandle, StreamOptions, StreamStart, SubscribeOptions,
    SyncPolicy,
};
use tokio::sync::mpsc;

/// Long enough for anything here to happen (real time: these tests do I/O).
const WAIT: Duration = Duration::from_secs(20);

fn durable() -> StreamOptions {
    StreamOptions::unbounded().durable()
}

fn open(rt: &Runtime, dir: &Path) -> Broker {
    Broker::open(rt, StorageOptions::new(dir)).expect("open the data directory")
}

/// One record as a subscriber saw it.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    offset: u64,
    timestamp_ms: u64,
    id: MessageId,
    value: u32,
}

/// A subscriber factory reporting every record it handles.
fn reporter(
    tx: &mpsc::UnboundedSender<Seen>,
) -> impl Fn() -> Box<dyn FnMut(StreamDelivery) -> std::future::Ready<Result<(), postbox::Failure>>>
+ Send
+ Sync
+ 'static {
    let tx = tx.clone();
    move || {
        let tx = tx.clone();
        Box::new(move |d: StreamDelivery| {
            let _ = tx.send(Seen {
                offset: d.offset(),
                timestamp_ms: d.timestamp_ms(),
                id: d.id(),
                value: d.decode::<u32>().unwrap_or(u32::MAX),
            });
            std::future::ready(Ok(()))
        })
    }
}

/// The next `n` records `rx` receives (fails after [`WAIT`]).
async fn receive(rx: &mut mpsc::UnboundedReceiver<Seen>, n: usize) -> Vec<Seen> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let got = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} records arrived: {out:?}", out.len()))
            .expect("the subscriber is gone");
        out.push(got);
    }
    out
}

/// Every retained record of `stream`, read from the start by a fresh
/// subscriber.
async fn read_all(stream: &StreamHandle) -> Vec<Seen> {
    let len = stream.stats().len;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sub = stream
        .subscribe(
            StreamStart::First,
            SubscribeOptions::default(),
            reporter(&tx),
        )
        .await
        .unwrap();
    let got = receive(&mut rx, len).await;
    sub.cancel().await;
    got
}

fn values(seen: &[Seen]) -> Vec<u32> {
    seen.iter().map(|s| s.value).collect()
}

fn offsets(seen: &[Seen]) -> Vec<u64> {
    seen.iter().map(|s| s.offset).collect()
}

/// Polls `check` until it holds (fails after [`WAIT`]): for positions that a
/// subscriber commits right after handing a record over.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The directories of the durable streams in `dir`.
fn stream_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir.join("streams")) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    dirs.sort();
    dirs
}

/// The segment files of the only durable stream in `dir`.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let dirs = stream_dirs(dir);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    common::seg_files(&dirs[0])
}

/// The first offset a segment holds, from its name.
fn first_offset(segment: &Path) -> u64 {
    segment
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn records_and_named_offsets_survive_reopening_and_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    let before;
    {
        let broker = open(&rt, dir.path());
        let stream = broker.declare_stream("events", durable()).await.unwrap();
        for n in 0..10u32 {
            assert_eq!(stream.publish(common::msg(n)).await.unwrap(), u64::from(n));
        }
        // "billing" handles 0..10 and stops; "audit" handles everything and
        // stays live.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let billing = stream
            .subscribe(
                StreamStart::First,
                SubscribeOptions::default().named("billing"),
                reporter(&tx),
            )
            .await
            .unwrap();
        assert_eq!(
            values(&receive(&mut rx, 10).await),
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(billing.cancel().await.unwrap().offset, 10);
        let batch: Vec<Envelope> = (10..15).map(common::msg).collect();
        assert_eq!(stream.publish_batch(batch).await.unwrap(), 10..15);
        let (atx, mut arx) = mpsc::unbounded_channel();
        let audit = stream
            .subscribe(
                StreamStart::First,
                SubscribeOptions::default().named("audit"),
                reporter(&atx),
            )
            .await
            .unwrap();
        receive(&mut arx, 15).await;
        eventually("audit committed 15", || {
            audit.stats().is_some_and(|s| s.offset == 15)
        })
        .await;
        before = read_all(&stream).await;
        // The sync point: records and positions as of now are on disk. A
        // crash here leaves this copy.
        stream.sync().await.unwrap();
        common::copy_dir(dir.path(), crashed.path());
        let stats = stream.stats();
        assert_eq!(stats.segments, 1, "{stats:?}");
        assert!(stats.bytes_on_disk > 15 * 8, "{stats:?}");
    }
    assert_eq!(offsets(&before), (0..15).collect::<Vec<_>>());
    for path in [dir.path(), crashed.path()] {
        let broker = open(&rt, path);
        let stream = broker.stream("events").unwrap();
        assert!(stream.options().durable);
        let stats = stream.stats();
        assert_eq!(
            (
                stats.first_offset,
                stats.next_offset,
                stats.len,
                stats.damaged_records
            ),
            (0, 15, 15, 0),
            "{path:?}"
        );
        assert_eq!(stream.stored_offset("billing"), Some(10), "{path:?}");
        assert_eq!(stream.stored_offset("audit"), Some(15), "{path:?}");
        // Same offsets, timestamps, messages.
        assert_eq!(read_all(&stream).await, before, "{path:?}");
        // A named subscriber resumes where it was, whatever start it asks
        // for, and misses nothing published since.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let billing = stream
            .subscribe(
                StreamStart::Next,
                SubscribeOptions::default().named("billing"),
                reporter(&tx),
            )
            .await
            .unwrap();
        let resumed = receive(&mut rx, 5).await;
        assert_eq!(offsets(&resumed), (10..15).collect::<Vec<_>>(), "{path:?}");
        assert_eq!(values(&resumed), (10..15).collect::<Vec<_>>());
        // The next publish continues the offsets.
        assert_eq!(stream.publish(common::msg(15)).await.unwrap(), 15);
        let next = receive(&mut rx, 1).await;
        assert_eq!((next[0].offset, next[0].value), (15, 15));
        billing.cancel().await;
    }
    rt.shutdown();
}

#[tokio::test]
async fn streams_that_are_not_durable_do_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    {
        let broker = open(&rt, dir.path());
        let stream = broker
            .declare_stream("scratch", StreamOptions::default())
            .await
            .unwrap();
        stream.publish(common::msg(1)).await.unwrap();
        // Nothing on disk for it, and nothing to wait for.
        stream.sync().await.unwrap();
        assert_eq!(stream.stats().segments, 0);
        broker.declare_stream("kept", durable()).await.unwrap();
    }
    assert_eq!(stream_dirs(dir.path()).len(), 1);
    let broker = open(&rt, dir.path());
    assert_eq!(broker.stream_names(), ["kept"]);
    assert!(matches!(
        broker.stream("scratch"),
        Err(StreamError::NotFound(_))
    ));
    // Declared again with another durability: a mismatch, as before.
    assert!(matches!(
        broker
            .declare_stream("kept", StreamOptions::unbounded())
            .await,
        Err(StreamError::Mismatch { .. })
    ));
    drop(broker);
    // On an in-memory broker, durable is accepted and changes nothing.
    let broker = Broker::new(&rt);
    let stream = broker.declare_stream("kept", durable()).await.unwrap();
    assert_eq!(stream.publish(common::msg(7)).await.unwrap(), 0);
    stream.sync().await.unwrap();
    let stats = stream.stats();
    assert_eq!((stats.len, stats.segments, stats.bytes_on_disk), (1, 0, 0));
    assert_eq!(values(&read_all(&stream).await), [7]);
    rt.shutdown();
}

#[tokio::test]
async fn a_deleted_durable_stream_stays_deleted_and_a_new_one_starts_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    {
        let broker = open(&rt, dir.path());
        let old = broker.declare_stream("s", durable()).await.unwrap();
        for n in 0..3 {
            old.publish(common::msg(n)).await.unwrap();
        }
        broker.delete_stream("s").await.unwrap();
        assert!(matches!(
            old.publish(common::msg(9)).await,
            Err(StreamError::NotFound(_))
        ));
        let new = broker.declare_stream("s", durable()).await.unwrap();
        assert_eq!(new.publish(common::msg(100)).await.unwrap(), 0);
        let gone = broker.declare_stream("gone", durable()).await.unwrap();
        gone.publish(common::msg(5)).await.unwrap();
        broker.delete_stream("gone").await.unwrap();
        // Only the new "s" has a directory.
        assert_eq!(stream_dirs(dir.path()).len(), 1);
    }
    let broker = open(&rt, dir.path());
    assert_eq!(broker.stream_names(), ["s"]);
    let s = broker.stream("s").unwrap();
    let stats = s.stats();
    assert_eq!((stats.first_offset, stats.next_offset), (0, 1));
    assert_eq!(values(&read_all(&s).await), [100]);
    assert_eq!(s.publish(common::msg(101)).await.unwrap(), 1);
    rt.shutdown();
}

/// A record of about 200 bytes carrying `n`.
fn big(n: u32) -> Envelope {
    Envelope::encode(&n)
        .unwrap()
        .with_header("padding", "x".repeat(200))
}

#[tokio::test]
async fn retention_deletes_whole_segments_and_what_is_kept_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    let options = StorageOptions::new(dir.path()).segment_bytes(4096);
    {
        let broker = Broker::open(&rt, options.clone()).unwrap();
        let stream = broker
            .declare_stream("s", StreamOptions::default().max_len(50).durable())
            .await
            .unwrap();
        for round in 0..20u32 {
            // Batches of 25: a batch fills more than one segment.
            let batch: Vec<Envelope> = (round * 25..round * 25 + 25).map(big).collect();
            stream.publish_batch(batch).await.unwrap();
        }
        // The sync point: the segments retention emptied are deleted.
        stream.sync().await.unwrap();
        let stats = stream.stats();
        assert_eq!(
            (stats.first_offset, stats.next_offset, stats.len),
            (450, 500, 50)
        );
        let files = segments(dir.path());
        assert_eq!(stats.segments, files.len(), "{stats:?}");
        let bytes: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum();
        assert_eq!(stats.bytes_on_disk, bytes);
        // 50 records of ~250 bytes: 3 or 4 full segments and the one being
        // filled, out of about 30 written.
        assert!(
            (3..=6).contains(&files.len()),
            "{} segments for 50 records: {files:?}",
            files.len()
        );
        // Whole segments only: the oldest left holds the oldest retained
        // record, and the next starts after it.
        assert!(first_offset(&files[0]) <= 450, "{files:?}");
        assert!(first_offset(&files[1]) > 450, "{files:?}");
    }
    let broker = Broker::open(&rt, options).unwrap();
    let stream = broker.stream("s").unwrap();
    let stats = stream.stats();
    assert_eq!(
        (stats.first_offset, stats.next_offset, stats.len),
        (450, 500, 50)
    );
    let kept = read_all(&stream).await;
    assert_eq!(offsets(&kept), (450..500).collect::<Vec<_>>());
    assert_eq!(values(&kept), (450..500).collect::<Vec<_>>());
    assert_eq!(stream.publish(big(500)).await.unwrap(), 500);
    rt.shutdown();
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_a_damaged_record_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    {
        let broker = open(&rt, dir.path());
        let stream = broker.declare_stream("s", durable()).await.unwrap();
        for n in 0..20 {
            stream.publish(common::msg(n)).await.unwrap();
        }
    }
    let files = segments(dir.path());
    assert_eq!(files.len(), 1);
    let mut data = std::fs::read(&files[0]).unwrap();
    let len = data.len();
    // A flipped bit in the middle, and half a record of garbage at the end.
    data[len / 2] ^= 0x10;
    data.extend_from_slice(&[0xab; 20]);
    std::fs::write(&files[0], &data).unwrap();
    let broker = open(&rt, dir.path());
    let stream = broker.stream("s").unwrap();
    let stats = stream.stats();
    assert_eq!(stats.damaged_records, 1, "{stats:?}");
    assert_eq!((stats.len, stats.next_offset), (19, 20), "{stats:?}");
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().len(),
        len as u64,
        "the torn tail was cut"
    );
    // Subscribers step over the hole; the others keep their offsets.
    let got = read_all(&stream).await;
    assert_eq!(got.len(), 19);
    assert!(
        got.iter().all(|s| u64::from(s.value) == s.offset),
        "{got:?}"
    );
    assert!(got.windows(2).all(|w| w[0].offset < w[1].offset));
    assert_eq!(stream.publish(common::msg(20)).await.unwrap(), 20);
    rt.shutdown();
}

#[tokio::test]
async fn an_unknown_format_version_of_a_stream_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    {
        let broker = open(&rt, dir.path());
        let stream = broker.declare_stream("s", durable()).await.unwrap();
        stream.publish(common::msg(1)).await.unwrap();
    }
    common::assert_unknown_version_refused(&rt, dir.path(), &segments(dir.path())[0]);
    rt.shutdown();
}

#[tokio::test]
async fn a_durable_binding_to_a_durable_stream_routes_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    {
        let broker = open(&rt, dir.path());
        broker
            .declare_exchange("events", ExchangeOptions::topic().durable())
            .await
            .unwrap();
        broker
            .declare_exchange("flash", ExchangeOptions::fanout())
            .await
            .unwrap();
        broker.declare_stream("audit", durable()).await.unwrap();
        broker
            .declare_stream("scratch", StreamOptions::default())
            .await
            .unwrap();
        broker
            .bind_stream("audit", "events", "user.#")
            .await
            .unwrap();
        broker
            .bind_stream("audit", "events", "old.#")
            .await
            .unwrap();
        broker
            .unbind_stream("audit", "events", "old.#")
            .await
            .unwrap();
        // A transient end makes a transient binding.
        broker.bind_stream("scratch", "events", "#").await.unwrap();
        broker.bind_stream("audit", "flash", "").await.unwrap();
        assert_eq!(
            broker
                .publish_to("events", "user.login", common::msg(1))
                .await
                .unwrap(),
            2
        );
    }
    let broker = open(&rt, dir.path());
    let bindings: Vec<(String, String)> = broker
        .bindings("events")
        .unwrap()
        .into_iter()
        .map(|b| (format!("{:?}", b.destination), b.key.to_string()))
        .collect();
    assert_eq!(
        bindings,
        [("Stream(\"audit\")".to_string(), "user.#".to_string())]
    );
    assert!(broker.bindings("flash").is_err());
    assert_eq!(
        broker
            .publish_to("events", "user.logout", common::msg(2))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        broker
            .publish_to("events", "old.x", common::msg(3))
            .await
            .unwrap(),
        0
    );
    let audit = broker.stream("audit").unwrap();
    // A routed publish also returns once the record is stored.
    assert_eq!(audit.stats().next_offset, 2);
    assert_eq!(values(&read_all(&audit).await), [1, 2]);
    // A long topology log is rewritten as a snapshot on reopening: streams
    // and their bindings are in it.
    for _ in 0..40 {
        broker
            .bind_stream("audit", "events", "churn")
            .await
            .unwrap();
        broker
            .unbind_stream("audit", "events", "churn")
            .await
            .unwrap();
    }
    drop(broker);
    drop(open(&rt, dir.path()));
    let broker = open(&rt, dir.path());
    assert_eq!(broker.bindings("events").unwrap().len(), 1);
    let audit = broker.stream("audit").unwrap();
    assert_eq!(values(&read_all(&audit).await), [1, 2]);
    assert_eq!(audit.publish(common::msg(3)).await.unwrap(), 2);
    // Deleting the stream deletes its durable binding.
    broker.delete_stream("audit").await.unwrap();
    broker.declare_stream("audit", durable()).await.unwrap();
    drop(broker);
    let broker = open(&rt, dir.path());
    assert!(broker.bindings("events").unwrap().is_empty());
    assert_eq!(broker.stream("audit").unwrap().stats().next_offset, 0);
    rt.shutdown();
}

#[tokio::test]
async fn publishes_wait_for_the_sync_and_failures_lose_nothing_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    {
        let faults = DiskFaults::new();
        let broker =
            Broker::open(&rt, StorageOptions::new(dir.path()).faults(faults.clone())).unwrap();
        let stream = broker.declare_stream("s", durable()).await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let watch = stream
            .subscribe(
                StreamStart::First,
                SubscribeOptions::default(),
                reporter(&tx),
            )
            .await
            .unwrap();
        // Each publish returns after a sync of its record.
        for n in 0..3u32 {
            let (_, syncs) = faults.counts();
            assert_eq!(stream.publish(common::msg(n)).await.unwrap(), u64::from(n));
            assert!(
                faults.counts().1 > syncs,
                "publish {n} returned before a sync"
            );
        }
        // A batch shares one.
        let (_, syncs) = faults.counts();
        let batch: Vec<Envelope> = (3..53).map(common::msg).collect();
        assert_eq!(stream.publish_batch(batch).await.unwrap(), 3..53);
        assert_eq!(faults.counts().1, syncs + 1, "one sync for the batch");
        // A failed write: refused and taken back; the next publish gets its
        // offset.
        let faults = faults.fail_write(1);
        match stream.publish(common::msg(1000)).await {
            Err(StreamError::Storage(StoreError::Io { .. })) => {}
            other => panic!("expected an I/O error, got {other:?}"),
        }
        assert_eq!(stream.stats().next_offset, 53);
        assert_eq!(stream.publish(common::msg(53)).await.unwrap(), 53);
        // A full disk: refused while full, fine once there is room.
        let faults = faults.disk_full_after(0);
        match stream.publish(common::msg(1001)).await {
            Err(StreamError::Storage(err)) => assert!(err.is_disk_full(), "{err}"),
            other => panic!("expected a full disk, got {other:?}"),
        }
        faults.free();
        assert_eq!(stream.publish(common::msg(54)).await.unwrap(), 54);
        // The subscriber got every stored record, and none of the others.
        let seen = receive(&mut rx, 55).await;
        assert_eq!(values(&seen), (0..55).collect::<Vec<_>>());
        assert_eq!(offsets(&seen), (0..55).collect::<Vec<_>>());
        // A failed sync: nothing more is stored until the broker reopens.
        let _faults = faults.fail_sync(1);
        assert!(matches!(
            stream.publish(common::msg(1002)).await,
            Err(StreamError::Storage(_))
        ));
        assert!(matches!(
            stream.publish(common::msg(1003)).await,
            Err(StreamError::Storage(_))
        ));
        assert!(stream.sync().await.is_err());
        assert_eq!(stream.stats().next_offset, 55);
        watch.cancel().await;
        assert!(
            rx.try_recv().is_err(),
            "a record that was not stored was read"
        );
    }
    let broker = open(&rt, dir.path());
    let stream = broker.stream("s").unwrap();
    let got = read_all(&stream).await;
    // Every confirmed record, at its offset; the one whose sync failed may
    // be there (it was written), nothing else.
    assert_eq!(values(&got[..55]), (0..55).collect::<Vec<_>>());
    assert_eq!(offsets(&got[..55]), (0..55).collect::<Vec<_>>());
    assert!(values(&got[55..]).iter().all(|&v| v == 1002), "{got:?}");
    let next = stream.stats().next_offset;
    assert_eq!(stream.publish(common::msg(2000)).await.unwrap(), next);
    rt.shutdown();
}

#[tokio::test]
async fn the_never_policy_confirms_without_syncing_and_closing_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    {
        let faults = DiskFaults::new();
        let options = StorageOptions::new(dir.path())
            .sync(SyncPolicy::Never)
            .faults(faults.clone());
        let broker = Broker::open(&rt, options).unwrap();
        let stream = broker.declare_stream("s", durable()).await.unwrap();
        let (_, syncs) = faults.counts();
        for n in 0..20 {
            stream.publish(common::msg(n)).await.unwrap();
        }
        assert_eq!(faults.counts().1, syncs, "no sync before closing");
        // Stored (written) records are readable.
        assert_eq!(
            values(&read_all(&stream).await),
            (0..20).collect::<Vec<_>>()
        );
    }
    let broker = open(&rt, dir.path());
    let stream = broker.stream("s").unwrap();
    assert_eq!(
        values(&read_all(&stream).await),
        (0..20).collect::<Vec<_>>()
    );
    rt.shutdown();
}

#[tokio::test]
async fn concurrent_publishers_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    let faults = DiskFaults::new();
    let broker = Broker::open(&rt, StorageOptions::new(dir.path()).faults(faults.clone())).unwrap();
    let stream = broker.declare_stream("s", durable()).await.unwrap();
    let (_, syncs) = faults.counts();
    let mut tasks = Vec::new();
    for p in 0..64u32 {
        let stream = stream.clone();
        tasks.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            for i in 0..20u32 {
                offsets.push(stream.publish(common::msg(p * 100 + i)).await.unwrap());
            }
            offsets
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let offsets = t.await.unwrap();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "per publisher order"
        );
        all.extend(offsets);
    }
    all.sort_unstable();
    assert_eq!(all, (0..64 * 20).collect::<Vec<u64>>());
    let syncs = faults.counts().1 - syncs;
    assert!(
        syncs < 64 * 20 / 4,
        "{syncs} syncs for {} publishes: publishes do not share syncs",
        64 * 20
    );
    drop(broker);
    rt.shutdown();
}

#[tokio::test]
async fn a_publish_through_an_exchange_waits_for_a_durable_stream_and_reports_its_failure() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    let faults = DiskFaults::new();
    let broker = Broker::open(&rt, StorageOptions::new(dir.path()).faults(faults.clone())).unwrap();
    let stream = broker.declare_stream("s", durable()).await.unwrap();
    broker
        .declare_exchange("x", ExchangeOptions::fanout())
        .await
        .unwrap();
    broker.bind_stream("s", "x", "").await.unwrap();
    let (_, syncs) = faults.counts();
    assert_eq!(broker.publish_to("x", "", common::msg(0)).await.unwrap(), 1);
    assert!(
        faults.counts().1 > syncs,
        "returned before the record's sync"
    );
    let _faults = faults.fail_write(1);
    let err = broker
        .publish_to("x", "", common::msg(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            postbox_actors::PublishError::Refused(BrokerError::Storage(_))
        ),
        "{err}"
    );
    assert_eq!(broker.publish_to("x", "", common::msg(2)).await.unwrap(), 1);
    assert_eq!(stream.stats().next_offset, 2);
    rt.shutdown();
}
