//! NATS JetStream through `async-nats`, as a durable peer in scenario 5 when
//! `NATS_URL` is set (e.g. `nats://127.0.0.1:4222`; the server must run
//! with JetStream enabled, `-js`).
//!
//! Each row gets its own stream (`postbox-bench-<pid>-<what>-<n>`, file
//! storage, one replica, one subject `postbox-bench.<pid>.<what>.<n>`), which
//! is deleted at the end of the row. Publishes carry the 64-byte payload and
//! are acknowledged by the server (`jetstream.publish(..).await?.await?`);
//! nothing consumes them (as in postbox's and RabbitMQ's rows).
//!
//! - One at a time: each publish waits for its ack before the next; p50/p99
//!   per publish.
//! - 256 in flight: publishes are sent in order, and at most 256 wait for
//!   their acks at any time (as postbox's 256 publishers each wait for their
//!   own confirm).
//!
//! How durable an ack is: nats-server 2.9 writes each stored message to the
//! OS before it acks (the file store flushes in place), and syncs a stream's
//! files every 2 minutes (fixed in 2.9; 2.10 made it the `sync_interval`
//! setting, default 2 minutes). So JetStream faces postbox's
//! `SyncPolicy::Interval`, not `SyncPolicy::Always`.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::Subject;
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::Config;
use crate::durable::S5;
use crate::report::{Report, Row};
use crate::util::{Latencies, payload, sample, throughput, timed};

pub const NATS_ONE: &str = "NATS JetStream (async-nats) file stream, acked publish, 1 at a time";
pub const NATS_IN_FLIGHT: &str =
    "NATS JetStream (async-nats) file stream, acked publish, 256 in flight";

/// An ack being awaited.
type AckFuture = <jetstream::context::PublishAckFuture as IntoFuture>::IntoFuture;

/// Publishes waiting for their acks at once, in the in-flight row.
const IN_FLIGHT: usize = 256;

const SYNC_NOTE: &str = "nats-server 2.9 acks once written to the OS and syncs every 2 min: \
                         faces postbox's interval policy";

pub struct Nats {
    client: async_nats::Client,
    js: jetstream::Context,
    next: AtomicU64,
}

impl Nats {
    pub async fn connect(url: &str) -> Result<Nats, async_nats::ConnectError> {
        let client = async_nats::connect(url).await?;
        let js = jetstream::new(client.clone());
        Ok(Nats {
            client,
            js,
            next: AtomicU64::new(0),
        })
    }

    pub async fn close(self) {
        let _ = self.client.flush().await;
    }

    /// A new file-storage stream with one subject; returns its name and
    /// subject.
    async fn stream(&self, what: &str) -> (String, Subject) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("postbox-bench-{pid}-{what}-{n}");
        let subject = format!("postbox-bench.{pid}.{what}.{n}");
        self.js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![subject.clone()],
                storage: stream::StorageType::File,
                num_replicas: 1,
                ..stream::Config::default()
            })
            .await
            .expect("create a JetStream stream (is the server running with -js?)");
        (name, Subject::from(subject))
    }

    async fn delete(&self, name: &str) {
        self.js
            .delete_stream(name)
            .await
            .expect("delete the JetStream stream");
    }

    pub async fn scenario5(&self, cfg: &Config, report: &mut Report) {
        if cfg.wants(NATS_ONE) {
            let n = cfg.count(20_000, 1_000) as usize;
            let (name, subject) = self.stream("one").await;
            let p = payload();
            let (samples, elapsed) = sample(n / 10, n, || {
                let (js, subject, p) = (&self.js, &subject, &p);
                async move {
                    js.publish(subject.clone(), p.clone())
                        .await
                        .expect("JetStream publish")
                        .await
                        .expect("a JetStream ack");
                }
            })
            .await;
            self.delete(&name).await;
            let l = Latencies::new(samples, elapsed);
            report.push(
                Row::new(S5, NATS_ONE)
                    .rate(l.rate())
                    .latency(l.percentile_us(50.0), l.percentile_us(99.0))
                    .note(format!(
                        "one publisher awaiting each ack, as postbox batch 1; \
                         p50/p99 per publish; {SYNC_NOTE}"
                    )),
            );
        }
        if cfg.wants(NATS_IN_FLIGHT) {
            let n = cfg.count(200_000, 10_240);
            let (name, subject) = self.stream("inflight").await;
            let p = payload();
            let rate = throughput(n / 10, n, cfg.reps.min(3), |k| {
                let (js, subject, p) = (&self.js, &subject, &p);
                timed(async move {
                    let mut acks: FuturesUnordered<AckFuture> = FuturesUnordered::new();
                    for _ in 0..k {
                        if acks.len() >= IN_FLIGHT {
                            let ack = acks.next().await.expect("an ack in flight");
                            ack.expect("a JetStream ack");
                        }
                        let ack = js
                            .publish(subject.clone(), p.clone())
                            .await
                            .expect("JetStream publish");
                        acks.push(ack.into_future());
                    }
                    while let Some(ack) = acks.next().await {
                        ack.expect("a JetStream ack");
                    }
                })
            })
            .await;
            self.delete(&name).await;
            report.push(Row::new(S5, NATS_IN_FLIGHT).rate(rate).note(format!(
                "one connection, 256 publishes awaiting their acks at any time, \
                         as postbox's 256 publishers; {SYNC_NOTE}"
            )));
        }
    }
}
