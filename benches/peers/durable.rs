//! Scenario 5: durable publish with confirms under group commit.
//!
//! postbox has no persistence yet, so its rows are printed empty. What is
//! measured is the disk's ceiling: a plain loop that appends a batch of records
//! (an 8-byte length plus the 64-byte payload each) to a file with one
//! `write`, then `fdatasync`s it, with batches of 1 and of 64. No durable
//! queue can confirm faster than that on this disk at that batch size. The
//! file lives in `$POSTBOX_BENCH_DIR` or the system's temporary directory, and
//! is removed afterwards. p50/p99 are per batch (write + fdatasync).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use crate::Config;
use crate::report::{Metric, Report, Row};
use crate::util::{Latencies, PAYLOAD};

pub const S5: &str = "5 durable publish with confirms";
pub const BATCHES: [usize; 2] = [1, 64];

pub fn ceiling(batch: usize) -> String {
    format!("disk ceiling: append + fdatasync, batch {batch}")
}

pub fn postbox(batch: usize) -> String {
    format!("postbox durable publish + confirm, batch {batch}")
}

pub async fn scenario5(cfg: &Config, report: &mut Report) {
    println!("\n== {S5}");
    for batch in BATCHES {
        if !cfg.wants(&ceiling(batch)) {
            continue;
        }
        // Enough syncs for a stable p99, few enough to bound the time.
        let syncs = cfg.count(if batch == 1 { 3_000 } else { 1_000 }, 100) as usize;
        let l = tokio::task::spawn_blocking(move || append_fdatasync(batch, syncs))
            .await
            .expect("the disk loop")
            .expect("append + fdatasync in the bench directory");
        report.push(
            Row::new(S5, ceiling(batch))
                .rate(l.rate() * batch as f64)
                .latency(l.percentile_us(50.0), l.percentile_us(99.0))
                .note("p50/p99 per batch"),
        );
        report.push(
            Row::new(S5, postbox(batch))
                .vs(&ceiling(batch), Metric::Throughput)
                .note("not implemented yet: postbox has no persistence"),
        );
    }
}

fn bench_dir() -> PathBuf {
    std::env::var_os("POSTBOX_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// `syncs` rounds of: append `batch` records with one write, then fdatasync.
fn append_fdatasync(batch: usize, syncs: usize) -> std::io::Result<Latencies> {
    let path = bench_dir().join(format!("postbox-peers-{}-{batch}.log", std::process::id()));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let mut record = (PAYLOAD as u64).to_le_bytes().to_vec();
    record.extend_from_slice(&[0x5a; PAYLOAD]);
    let buf = record.repeat(batch);
    let mut round = || -> std::io::Result<u64> {
        let t = Instant::now();
        file.write_all(&buf)?;
        file.sync_data()?;
        Ok(t.elapsed().as_nanos() as u64)
    };
    for _ in 0..(syncs / 10).max(1) {
        round()?;
    }
    let start = Instant::now();
    let samples = (0..syncs).map(|_| round()).collect::<Result<Vec<_>, _>>();
    let elapsed = start.elapsed();
    let _ = std::fs::remove_file(&path);
    Ok(Latencies::new(samples?, elapsed))
}
