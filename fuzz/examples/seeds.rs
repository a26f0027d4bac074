//! Writes the seed corpus (`corpus/<target>/`) from the files of a real
//! broker: durable queues, persistent messages with every kind of envelope
//! field, acks, requeues, dead-lettering, a transaction, a deleted queue, in
//! 4 KiB segments. Run from `fuzz/` (stable is fine):
//!
//! ```text
//! cargo run --example seeds
//! ```

use std::path::Path;
use std::time::Duration;

use postbox::Runtime;
use postbox_actors::{
    AckMode, Broker, DeleteOptions, Envelope, ExchangeOptions, HeaderValue, QueueOptions,
    StorageOptions,
};

type Error = Box<dyn std::error::Error>;

/// Queue ids are handed out from 1 in declaration order: orders, dead,
/// scratch (deleted).
const DECLARED: u8 = 0b011;

fn message(n: u32) -> Envelope {
    let m = Envelope::new(format!("order {n}")).with_persistent(true);
    match n % 4 {
        0 => m,
        1 => m
            .with_routing_key("orders.eu")
            .with_header("n", i64::from(n) - 30)
            .with_header("vip", n % 8 == 1),
        2 => m
            .with_content_type("application/json")
            .with_correlation_id(format!("c-{n}"))
            .with_reply_to("replies")
            .with_priority(3)
            .with_expiration(Duration::from_secs(3600)),
        _ => m
            .with_header("ratio", 0.5)
            .with_header("raw", bytes_value())
            .with_header("none", HeaderValue::Void)
            .with_header("s", "text"),
    }
}

fn bytes_value() -> HeaderValue {
    HeaderValue::Bytes(vec![0, 1, 0xff].into())
}

async fn populate(broker: &Broker) -> Result<(), Error> {
    broker
        .declare_exchange("dlx", ExchangeOptions::fanout().durable())
        .await?;
    let orders = QueueOptions::default()
        .durable()
        .dead_letter_exchange("dlx");
    broker.declare_queue("orders", orders).await?;
    broker
        .declare_queue("dead", QueueOptions::default().durable())
        .await?;
    broker.bind_queue("dead", "dlx", "").await?;
    broker
        .declare_queue("scratch", QueueOptions::default().durable())
        .await?;
    for n in 0..60 {
        broker.publish("orders", message(n)).await?;
        if n % 5 == 0 {
            let m = Envelope::new("scratch").with_persistent(true);
            broker.publish("scratch", m).await?;
        }
    }
    let mut held = Vec::new();
    for n in 0..30 {
        let Some((d, _)) = broker.get("orders", AckMode::Manual).await? else {
            break;
        };
        match n % 6 {
            0..=2 => d.ack().await?,
            3 => d.nack(true).await?,
            4 => d.reject(false).await?, // dead-lettered: a death in its envelope
            _ => held.push(d),           // requeued when dropped: delivered again
        }
    }
    drop(held);
    // A transaction: one atomic record (a publish and an ack).
    if let Some((d, _)) = broker.get("orders", AckMode::Manual).await? {
        let mut tx = broker.transaction();
        tx.publish("orders", message(1000)).ack(&d);
        if let Err(err) = tx.commit().await {
            eprintln!("transaction not committed: {err}");
        }
    }
    broker
        .delete_queue("scratch", DeleteOptions::default())
        .await?;
    // Acks are written lazily (within 200 ms).
    tokio::time::sleep(Duration::from_millis(400)).await;
    Ok(())
}

/// The payloads of a store file's frames (it is intact: no checks needed).
fn payloads(file: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut pos = 24;
    while pos + 8 <= file.len() {
        let n = u32::from_le_bytes(file[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let end = pos + 8 + n;
        if end > file.len() {
            break;
        }
        out.push(&file[pos + 8..end]);
        pos = end;
    }
    out
}

/// A publish record's queue id, envelope flags and size (in 16 bytes): its
/// layout is `1 queue seq ordinal expires_at+1 id:16 flags ...`.
fn publish_shape(p: &[u8]) -> (u8, u8, usize) {
    let mut pos = 1;
    for _ in 0..4 {
        while p.get(pos).is_some_and(|b| b & 0x80 != 0) {
            pos += 1;
        }
        pos += 1;
    }
    let flags = p.get(pos + 16).copied().unwrap_or(0);
    (p.get(1).copied().unwrap_or(0), flags, p.len() / 16)
}

/// One file of the `recovery` target's input (see its documentation).
fn recovery_file(out: &mut Vec<u8>, id: u64, raw: bool, body: &[u8]) {
    out.extend_from_slice(&id.to_le_bytes());
    out.push(u8::from(raw));
    let len = u16::try_from(body.len()).expect("a body fits a u16 length");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
}

fn framed_body(file: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for p in payloads(file) {
        let len = u16::try_from(p.len()).expect("a record fits a u16 length");
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(p);
    }
    body
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), Error> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let data = std::env::temp_dir().join(format!("postbox-fuzz-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let rt = Runtime::new()?;
    {
        let broker = Broker::open(&rt, StorageOptions::new(&data).segment_bytes(4096))?;
        populate(&broker).await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut segments = Vec::new();
    for entry in std::fs::read_dir(data.join("log"))? {
        let path = entry?.path();
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(id) = id {
            segments.push((id, std::fs::read(&path)?));
        }
    }
    segments.sort();
    let topology = std::fs::read(data.join("topology.log"))?;
    std::fs::remove_dir_all(&data)?;
    println!(
        "{} segments ({:?} bytes), topology.log {} bytes",
        segments.len(),
        segments.iter().map(|(_, s)| s.len()).collect::<Vec<_>>(),
        topology.len()
    );

    // log_reader: the segments, one torn and one damaged.
    let dir = corpus.join("log_reader");
    for (id, file) in &segments {
        write(&dir, &format!("segment-{id}"), file)?;
    }
    if let Some((_, last)) = segments.last() {
        write(&dir, "torn", &last[..last.len() - 3])?;
    }
    if let Some((_, first)) = segments.first() {
        let mut damaged = first.clone();
        damaged[24 + 8 + 2] ^= 0x10;
        write(&dir, "damaged", &damaged)?;
    }

    // record: a few records of each type; publishes of different shapes.
    let dir = corpus.join("record");
    let mut seen = [0usize; 5];
    let mut shapes = Vec::new();
    for (_, file) in &segments {
        for p in payloads(file) {
            let kind = usize::from(p.first().copied().unwrap_or(0)).min(4);
            let wanted = if kind == 1 {
                let shape = publish_shape(p);
                let new = !shapes.contains(&shape) && seen[1] < 8;
                shapes.push(shape);
                new
            } else {
                seen[kind] < 3
            };
            if wanted {
                seen[kind] += 1;
                write(&dir, &format!("type{kind}-{}", seen[kind]), p)?;
            }
        }
    }
    println!(
        "records by type (publish, settle, deliver, atomic): {:?}",
        &seen[1..]
    );

    // recovery: every segment, framed and raw; with the deleted queue
    // declared too.
    let dir = corpus.join("recovery");
    for (name, raw, mask) in [
        ("framed", false, DECLARED),
        ("raw", true, DECLARED),
        ("all-declared", false, 0xff),
    ] {
        let mut input = vec![mask];
        for (id, file) in &segments {
            let body = if raw { file.clone() } else { framed_body(file) };
            recovery_file(&mut input, *id, raw, &body);
        }
        write(&dir, name, &input)?;
    }

    // meta_log: the topology log.
    write(&corpus.join("meta_log"), "topology.log", &topology)?;
    Ok(())
}
