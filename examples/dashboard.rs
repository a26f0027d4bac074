//! The operator's view: a small workload watched through postbox's admin
//! server (feature `admin`), its HTTP API and live dashboard.
//!
//! The workload: a producer publishes orders (one in ten malformed), emails
//! and audit records; two order processors ack what they finish and reject
//! the malformed orders into a dead-letter queue (`orders.dead`, reason
//! `rejected`); one slow mailer falls behind, so the `emails` queue grows
//! until its depth alert fires; a payments consumer crashes on one payment in twenty
//! payment (a crash-looping consumer, restarted by its supervisor, the
//! payment redelivered); a slow auditor reads the `audit` stream and lags.
//!
//! Open the printed URL while it runs: the queue table, rates, the chart of
//! a queue (click its row), consumers, crashes, the stream's lag, alerts
//! firing and clearing, dead letters with their reasons. Purging and
//! publishing from the page need the token it prints (or the one in
//! `POSTBOX_ADMIN_TOKEN`).
//!
//! At the end it checks, through the HTTP API, that the API shows the
//! workload: every queue, the dead letters by reason, the stream's
//! subscriber, the consumers' crashes, the depth alert, and the queues'
//! gauges in Prometheus' `/metrics`.
//!
//! Run it with `cargo run --release --example dashboard -- --serve-for 0`
//! (until Ctrl-C).
//!
//! Flags (defaults in brackets):
//! - `--serve-for S`: seconds to run, 0 for until interrupted [6];
//! - `--port N`: where to listen, on 127.0.0.1 [15680; 0 picks one];
//! - `--rate N`: orders per second [50].

#[path = "support/mod.rs"]
pub mod support;

use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use postbox::{Runtime, RuntimeHandle};
use postbox_actors::admin::{AdminOptions, AdminServer};
use postbox_actors::monitor::{MonitorOptions, Thresholds};
use postbox_actors::{
    Broker, ConsumeOptions, Delivery, Envelope, QueueOptions, StreamDelivery, StreamOptions,
    StreamStart, SubscribeOptions,
};
use serde_json::Value;
use support::{Flags, Summary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs the workload with the admin server watching, then checks what its
/// API shows.
pub async fn run(rt: &RuntimeHandle, flags: &Flags) -> Result<Summary, Box<dyn Error>> {
    let serve_for = flags.u64("serve-for", 6);
    let port = u16::try_from(flags.u64("port", 15680)).unwrap_or(15680);
    let rate = flags.u64("rate", 50).clamp(1, 10_000);
    let broker = Broker::new(rt);

    // The topology.
    let dead = QueueOptions::default()
        .dead_letter_exchange("")
        .dead_letter_routing_key("orders.dead");
    broker
        .declare_queue("orders.dead", QueueOptions::default())
        .await?;
    broker.declare_queue("orders", dead).await?;
    broker
        .declare_queue("emails", QueueOptions::default())
        .await?;
    broker
        .declare_queue("payments", QueueOptions::default())
        .await?;
    let audit = broker
        .declare_stream("audit", StreamOptions::default())
        .await?;

    // Consumers: two processors, a slow mailer, a flaky payments service.
    let processed = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let processed = processed.clone();
        consumers.push(
            broker
                .consume("orders", ConsumeOptions::manual(16), move || {
                    let processed = processed.clone();
                    move |d: Delivery| {
                        let processed = processed.clone();
                        async move {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            if d.payload().starts_with(b"malformed") {
                                d.reject(false).await?;
                            } else {
                                processed.fetch_add(1, Ordering::Relaxed);
                                d.ack().await?;
                            }
                            Ok(())
                        }
                    }
                })
                .await?,
        );
    }
    let mailer = broker
        .consume("emails", ConsumeOptions::manual(1), || {
            |d: Delivery| async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                d.ack().await?;
                Ok(())
            }
        })
        .await?;
    let payments = broker
        .consume("payments", ConsumeOptions::manual(1), || {
            |d: Delivery| async move {
                let n: u64 = d.decode()?;
                if n.is_multiple_of(20) && !d.redelivered() {
                    // A bug on a rare path: the consumer crashes, its
                    // supervisor restarts it, the payment comes back.
                    panic!("payment {n}: card service returned an unexpected reply");
                }
                d.ack().await?;
                Ok(())
            }
        })
        .await?;
    let _auditor = audit
        .subscribe(
            StreamStart::First,
            SubscribeOptions::default().named("auditor"),
            || {
                |_d: StreamDelivery| async move {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    Ok(())
                }
            },
        )
        .await?;

    // The admin server, watching for a growing mail backlog and crashes.
    let token = std::env::var("POSTBOX_ADMIN_TOKEN")
        .unwrap_or_else(|_| uuid::Uuid::new_v4().simple().to_string());
    let monitor = MonitorOptions::default()
        .interval(Duration::from_millis(500))
        .thresholds(Thresholds::default().crash_loop(3, Duration::from_secs(10)))
        .queue_thresholds(
            "emails",
            Thresholds::default()
                .depth(20)
                .oldest_message(Duration::from_secs(2)),
        );
    // Prometheus scrapes /metrics: the monitor's metrics, through the
    // recorder of feature prometheus.
    let prometheus = postbox_actors::monitor::prometheus::install()?;
    let options = AdminOptions::default()
        .bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .token(token.clone())
        .mutations(true)
        .monitor(monitor)
        .metrics(move || prometheus.render());
    let server = AdminServer::start(&broker, options).await?;
    println!("dashboard: {}   token: {token}", server.url());

    // The producer.
    let producer = {
        let (broker, audit) = (broker.clone(), audit.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            for n in 0u64.. {
                tick.tick().await;
                let order = if n % 10 == 9 {
                    format!("malformed order {n}")
                } else {
                    format!("order {n}")
                };
                let sent = async {
                    broker.publish("orders", Envelope::new(order)).await?;
                    if n.is_multiple_of(3) {
                        broker
                            .publish("emails", Envelope::new(format!("mail {n}")))
                            .await?;
                    }
                    if n.is_multiple_of(4) {
                        broker.publish_json("payments", &(n / 4)).await?;
                    }
                    audit.publish(Envelope::new(format!("audit {n}"))).await?;
                    Ok::<_, Box<dyn Error + Send + Sync>>(())
                };
                if sent.await.is_err() {
                    break;
                }
            }
        })
    };

    if serve_for == 0 {
        tokio::signal::ctrl_c().await?;
    } else {
        tokio::time::sleep(Duration::from_secs(serve_for)).await;
    }

    // What the API shows of it.
    let addr = server.local_addr();
    let queues = get_json(addr, "/api/queues").await?;
    let names: Vec<&str> = queues
        .as_array()
        .map(|q| q.iter().filter_map(|q| q["name"].as_str()).collect())
        .unwrap_or_default();
    let deaths = get_json(addr, "/api/deaths").await?;
    let rejected = deaths["by_queue"]["orders"]["rejected"]
        .as_u64()
        .unwrap_or(0);
    let streams = get_json(addr, "/api/streams").await?;
    let auditor = &streams[0]["subscribers"][0];
    let crashes = get_json(addr, "/api/crashes").await?;
    let crash_count = crashes.as_array().map_or(0, Vec::len);
    let alerts = get_json(addr, "/api/alerts").await?;
    let depth_alert = alerts["recent"].as_array().is_some_and(|a| {
        a.iter()
            .any(|x| x["queue"] == "emails" && x["kind"] == "depth")
    });
    let emails = get_json(addr, "/api/queues/emails").await?;
    let metrics = get_text(addr, "/metrics").await?;

    producer.abort();
    server.shutdown().await;
    for consumer in &consumers {
        consumer.cancel().await;
    }
    mailer.cancel().await;
    payments.cancel().await;

    let mut summary = Summary::new("dashboard: a workload through the admin API");
    summary
        .line(format!(
            "orders processed: {}",
            processed.load(Ordering::Relaxed)
        ))
        .line(format!("orders dead-lettered (rejected): {rejected}"))
        .line(format!("emails waiting: {}", emails["messages_ready"]))
        .line(format!("auditor lag: {} records", auditor["lag"]))
        .line(format!("payments consumer crashes: {crash_count}"));
    summary
        .check(
            "the API lists every queue",
            names == ["emails", "orders", "orders.dead", "payments"],
        )
        .check("dead letters are counted by reason", rejected > 0)
        .check(
            "the stream's subscriber and its lag are shown",
            auditor["name"] == "auditor" && auditor["lag"].is_u64(),
        )
        .check(
            "the payments consumer's crashes are listed",
            crash_count > 0,
        )
        .check(
            "the mail backlog raised a depth alert",
            depth_alert || serve_for < 2,
        )
        .check(
            "Prometheus' /metrics carries the queues' gauges",
            metrics.contains("postbox_queue_messages_ready{queue=\"emails\"}"),
        )
        .check(
            "a queue's detail carries its history for the chart",
            emails["history"].as_array().is_some_and(|h| !h.is_empty()),
        );
    Ok(summary)
}

/// A GET of JSON from the admin API.
async fn get_json(addr: SocketAddr, path: &str) -> Result<Value, Box<dyn Error>> {
    Ok(serde_json::from_str(&get_text(addr, path).await?)?)
}

/// A GET on the admin server, with nothing but a socket (the example needs
/// no HTTP client).
async fn get_text(addr: SocketAddr, path: &str) -> Result<String, Box<dyn Error>> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await??;
    let text = String::from_utf8(response)?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(body.to_string())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    support::quiet_panics_from(file!());
    let flags = Flags::from_args();
    let rt = Runtime::new()?;
    let summary = run(&rt.handle(), &flags).await?;
    rt.shutdown();
    summary.exit()
}
