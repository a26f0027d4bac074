//! The RabbitMQ backend against a real RabbitMQ (`AMQP_URL`, e.g.
//! `amqp://guest:guest@127.0.0.1:5672/%2f`): a connection cut in the middle
//! of 100,000 confirmed publishes loses none of them, TLS with a certificate
//! the test generates, request-reply through direct reply-to, credentials
//! that never show in a log line or an error, and channels closed (by
//! RabbitMQ or by postbox) without costing the connection, and a stream
//! subscriber reading on across cuts without a gap or a repeat. Without
//! `AMQP_URL` each test says so and passes (the plain `cargo test` needs no
//! server).
#![cfg(feature = "amqp")]

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use postbox::Runtime;
use postbox_actors::amqp::AmqpOptions;
use postbox_actors::rpc::{Request, RequestError, Respond, ResponderHandle};
use postbox_actors::{
    Backend, Broker, BrokerError, ConsumeOptions, DeleteOptions, Delivery, Envelope, QueueOptions,
    StreamDelivery, StreamError, StreamOptions, StreamStart, SubscribeOptions,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn amqp_url(test: &str) -> Option<String> {
    match std::env::var("AMQP_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            eprintln!("{test}: AMQP_URL is not set; skipped (needs a RabbitMQ)");
            None
        }
    }
}

/// A postbox runtime and a broker on the RabbitMQ at `AMQP_URL`; `None`
/// (said why) without one. The runtime is kept for as long as the broker.
async fn rabbit(
    test: &str,
) -> Result<Option<(Runtime, Broker)>, Box<dyn std::error::Error + Send + Sync>> {
    let Some(url) = amqp_url(test) else {
        return Ok(None);
    };
    let rt = Runtime::new()?;
    let broker = Broker::connect(&rt, &url).await?;
    Ok(Some((rt, broker)))
}

fn unique(base: &str) -> String {
    format!("{base}-{}", uuid::Uuid::new_v4().simple())
}

/// `url` with its host and port replaced by `addr`.
fn via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!("{scheme}://{}{addr}{path}", userinfo.unwrap_or_default())
}

/// Whether `text` shows `url`'s password: `:password@` anywhere, or the
/// password itself where it is not also the user name (guest/guest).
fn shows_password(text: &str, url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let user = rest.split_once(':').map_or("", |(u, _)| u);
    let secret = password(url);
    !secret.is_empty()
        && (text.contains(&format!(":{secret}@")) || (secret != user && text.contains(&secret)))
}

/// The password of `url`'s user info.
fn password(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let userinfo = rest
        .split('/')
        .next()
        .and_then(|a| a.rsplit_once('@'))
        .map(|(u, _)| u);
    userinfo
        .and_then(|u| u.split_once(':'))
        .map(|(_, p)| p.to_string())
        .unwrap_or_default()
}

/// A loopback TCP proxy to RabbitMQ whose connections can be cut, as a
/// network failure would.
struct Proxy {
    addr: SocketAddr,
    cut: broadcast::Sender<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = broadcast::channel(4);
        let cuts = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut stop = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    // As lapin's own socket: no Nagle delay on small frames.
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = stop.recv() => {}
                    }
                });
            }
        });
        Ok(Proxy { addr, cut })
    }

    /// Drops every open connection (the listener stays up).
    fn cut(&self) {
        let _ = self.cut.send(());
    }
}

fn upstream(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5672")
    };
    let host = host.replace("localhost", "127.0.0.1");
    host.parse().expect("a host:port RabbitMQ address")
}

/// Every log line of the test, to check that no credential shows.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Every log line of this test binary, from every thread (the tests
    /// share it: a password of one must not show in any).
    fn capture() -> Logs {
        static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            let _ = tracing::subscriber::set_global_default(subscriber);
            logs
        })
        .clone()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

/// 100,000 messages published (16 publishers, each publish confirmed) and
/// consumed (manual acks, prefetch 256) while the connection is cut twice.
/// Every confirmed publish is consumed; publishes in flight at a cut fail
/// with a typed error (and are published again); deliveries in flight are
/// redelivered flagged as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_loses_no_confirmed_message() -> TestResult {
    let Some(url) = amqp_url("a_cut_connection_loses_no_confirmed_message") else {
        return Ok(());
    };
    let logs = Logs::capture();
    let proxy = Proxy::start(upstream(&url)).await?;
    let rt = Runtime::new()?;
    let options = AmqpOptions::new(via(&url, proxy.addr))
        .connection_name("postbox-cut-test")
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(500));
    let broker = Broker::connect_with(&rt, options).await?;
    assert_eq!(broker.backend(), Backend::RabbitMq);
    let queue = unique("cut");
    broker
        .declare_queue(&queue, QueueOptions::default())
        .await?;

    const N: u32 = 100_000;
    const PUBLISHERS: u32 = 16;
    // How many times each message was consumed, and whether a redelivery.
    let seen: Arc<Mutex<HashMap<u32, (u32, bool)>>> = Arc::default();
    let consumed = Arc::new(AtomicUsize::new(0));
    let (s, c) = (seen.clone(), consumed.clone());
    let consumer = broker
        .consume(&queue, ConsumeOptions::manual(256), move || {
            let (s, c) = (s.clone(), c.clone());
            move |d: Delivery| {
                let (s, c) = (s.clone(), c.clone());
                async move {
                    let i: u32 = d.decode()?;
                    {
                        let mut seen = s.lock();
                        let entry = seen.entry(i).or_insert((0, false));
                        entry.0 += 1;
                        entry.1 |= d.redelivered();
                    }
                    c.fetch_add(1, Ordering::Relaxed);
                    // A delivery of a lost channel cannot be acked: RabbitMQ
                    // delivers it again.
                    let _ = d.ack().await;
                    Ok(())
                }
            }
        })
        .await?;

    let confirmed = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let (broker, queue) = (broker.clone(), queue.clone());
        let (confirmed, failed) = (confirmed.clone(), failed.clone());
        publishers.push(tokio::spawn(async move {
            let mut i = p;
            while i < N {
                match broker.publish(&queue, Envelope::encode(&i)?).await {
                    Ok(()) => {
                        confirmed.fetch_add(1, Ordering::Relaxed);
                        i += PUBLISHERS;
                    }
                    // Not confirmed: published again (it may arrive twice).
                    Err(err @ (BrokerError::Unconfirmed(_) | BrokerError::Backend(_))) => {
                        failed.lock().push(err.to_string());
                    }
                    Err(other) => {
                        return Err(Box::new(other) as Box<dyn std::error::Error + Send + Sync>);
                    }
                }
            }
            Ok(())
        }));
    }
    let started = std::time::Instant::now();
    // Two cuts: at 30% and 60% of the confirmed publishes.
    for at in [N as usize * 3 / 10, N as usize * 6 / 10] {
        tokio::time::timeout(Duration::from_secs(120), async {
            while confirmed.load(Ordering::Relaxed) < at {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await?;
        eprintln!("cut at {at} confirmed, {:?}", started.elapsed());
        proxy.cut();
    }
    for publisher in publishers {
        publisher.await??;
    }
    eprintln!(
        "published, {:?}; consumed {}",
        started.elapsed(),
        consumed.load(Ordering::Relaxed)
    );
    assert_eq!(confirmed.load(Ordering::Relaxed), N as usize);
    // Every message, confirmed once, is consumed.
    tokio::time::timeout(Duration::from_secs(120), async {
        while seen.lock().len() < N as usize {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| {
        // Which ones, for the diagnosis: their number tells which
        // publisher sent them and when.
        let seen = seen.lock();
        let missing: Vec<u32> = (0..N).filter(|i| !seen.contains_key(i)).take(20).collect();
        // What the broker said of the cuts (seen lost once in many runs:
        // these lines are what is known of it).
        let said = |l: &&str| [" INFO ", " WARN ", " ERROR "].iter().any(|lvl| l.contains(lvl));
        for line in logs.text().lines().filter(said).take(200) {
            eprintln!("{line}");
        }
        format!(
            "{} of {N} consumed; missing (first 20): {missing:?}; {} publishes failed and were repeated",
            seen.len(),
            failed.lock().len()
        )
    })?;
    let seen = seen.lock().clone();
    assert!((0..N).all(|i| seen.contains_key(&i)));
    let twice: Vec<_> = seen.iter().filter(|(_, (n, _))| *n > 1).collect();
    let redelivered = seen.values().filter(|(_, r)| *r).count();
    eprintln!(
        "{N} confirmed and consumed across 2 cuts; {} publishes failed and were repeated; {} consumed more than once; {redelivered} flagged redelivered",
        failed.lock().len(),
        twice.len()
    );
    // The consumer kept going across both cuts, on the same registration.
    assert!(consumer.report().running);
    consumer.close().await;
    broker
        .delete_queue(&queue, DeleteOptions::default())
        .await?;
    let text = logs.text();
    assert!(
        text.contains("reconnected to rabbitmq"),
        "no reconnection logged"
    );
    assert!(
        !shows_password(&text, &url),
        "the password shows in the logs"
    );
    for err in failed.lock().iter() {
        assert!(!shows_password(err, &url), "the password shows in {err}");
    }
    Ok(())
}

/// A stream subscriber reading while the connection is cut twice, during
/// 20,000 confirmed publishes: it consumes again from its position each
/// time, so it sees every offset once, in order, from 0 (no gap, no
/// repeat), and every confirmed record among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_subscriber_reads_on_across_cuts() -> TestResult {
    let Some(url) = amqp_url("a_stream_subscriber_reads_on_across_cuts") else {
        return Ok(());
    };
    let proxy = Proxy::start(upstream(&url)).await?;
    let rt = Runtime::new()?;
    let options = AmqpOptions::new(via(&url, proxy.addr))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(500));
    let broker = Broker::connect_with(&rt, options).await?;
    let name = unique("stream-cut");
    let stream = broker
        .declare_stream(&name, StreamOptions::unbounded())
        .await?;
    const N: u32 = 20_000;
    // Offsets handled, in order, and the record each carried.
    let seen: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let s = seen.clone();
    let subscription = stream
        .subscribe(StreamStart::First, SubscribeOptions::default(), move || {
            let s = s.clone();
            move |d: StreamDelivery| {
                let record: Result<u32, _> = d.decode();
                s.lock().push((d.offset(), record.unwrap_or(u32::MAX)));
                async { Ok::<(), postbox::Failure>(()) }
            }
        })
        .await?;
    let confirmed = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (stream, confirmed) = (stream.clone(), confirmed.clone());
        tokio::spawn(async move {
            let mut repeated = 0;
            for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
                let batch = || {
                    chunk
                        .iter()
                        .map(Envelope::encode)
                        .collect::<Result<Vec<_>, _>>()
                };
                loop {
                    match stream.publish_batch(batch()?).await {
                        Ok(_) => break,
                        // Not confirmed: again (a record may then be in
                        // the stream twice, at two offsets).
                        Err(StreamError::Remote(_)) => repeated += 1,
                        Err(other) => {
                            return Err(Box::new(other) as Box<dyn std::error::Error + Send + Sync>);
                        }
                    }
                }
                confirmed.fetch_add(chunk.len(), Ordering::Relaxed);
            }
            Ok(repeated)
        })
    };
    for at in [N as usize * 3 / 10, N as usize * 6 / 10] {
        tokio::time::timeout(Duration::from_secs(60), async {
            while seen.lock().len() < at {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await?;
        proxy.cut();
    }
    let repeated = tokio::time::timeout(Duration::from_secs(120), publisher).await???;
    assert_eq!(confirmed.load(Ordering::Relaxed), N as usize);
    let every = |seen: &[(u64, u32)]| {
        let mut got: Vec<u32> = seen.iter().map(|(_, n)| *n).collect();
        got.sort_unstable();
        got.dedup();
        got.len() == N as usize
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        while !every(&seen.lock()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| format!("{} records read of {N}", seen.lock().len()))?;
    let seen = seen.lock().clone();
    for (i, (offset, _)) in seen.iter().enumerate() {
        assert_eq!(*offset, i as u64, "offsets read in order, each once");
    }
    eprintln!(
        "{} records read across 2 cuts, {repeated} batches published again",
        seen.len()
    );
    let stats = subscription
        .cancel()
        .await
        .ok_or("the subscriber was live")?;
    assert_eq!(stats.delivered, seen.len() as u64);
    assert_eq!(stats.redeliveries, 0);
    broker.delete_stream(&name).await?;
    Ok(())
}

/// A subscriber from `Next` whose connection is cut while it handles its
/// first record reads on from that record (where `next` resolved), not
/// from `next` again: nothing published meanwhile is skipped. Then the
/// stream deleted by another process stops it, and a stream deleted here
/// is not declared again by the next reconnection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_subscriber_from_next_loses_nothing_to_an_early_cut() -> TestResult {
    let Some(url) = amqp_url("a_stream_subscriber_from_next_loses_nothing_to_an_early_cut") else {
        return Ok(());
    };
    let proxy = Proxy::start(upstream(&url)).await?;
    let rt = Runtime::new()?;
    let options = AmqpOptions::new(via(&url, proxy.addr))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let broker = Broker::connect_with(&rt, options).await?;
    let name = unique("stream-early-cut");
    let stream = broker
        .declare_stream(&name, StreamOptions::unbounded())
        .await?;
    stream.publish(Envelope::encode(&u32::MAX)?).await?;
    let seen: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let holding = Arc::new(AtomicBool::new(false));
    let (s, g, h) = (seen.clone(), gate.clone(), holding.clone());
    let subscription = stream
        .subscribe(StreamStart::Next, SubscribeOptions::default(), move || {
            let (s, g, h) = (s.clone(), g.clone(), h.clone());
            move |d: StreamDelivery| {
                let (s, g, h) = (s.clone(), g.clone(), h.clone());
                async move {
                    let n: u32 = d.decode()?;
                    if n == 0 && !h.swap(true, Ordering::SeqCst) {
                        // Held until the connection was cut and is back.
                        let _ = g.acquire().await;
                    }
                    s.lock().push((d.offset(), n));
                    Ok(())
                }
            }
        })
        .await?;
    let publish = |from: u32, to: u32| {
        let stream = stream.clone();
        async move {
            for i in from..to {
                // Unconfirmed while the connection is down: again.
                while stream.publish(Envelope::encode(&i)?).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        }
    };
    publish(0, 5).await?;
    tokio::time::timeout(Duration::from_secs(10), async {
        while !holding.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await?;
    proxy.cut();
    publish(5, 10).await?;
    gate.add_permits(1);
    // A publish caught by the cut may have reached RabbitMQ without its
    // confirm coming back: the retry then stores it twice, under two
    // offsets. The reader must see every offset once, in order.
    let values = |seen: &[(u64, u32)]| {
        let mut values: Vec<u32> = seen.iter().map(|&(_, n)| n).collect();
        values.dedup();
        values
    };
    tokio::time::timeout(Duration::from_secs(20), async {
        while values(&seen.lock()).len() < 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .map_err(|_| format!("read {:?}", seen.lock()))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = seen.lock().clone();
    let offsets: Vec<u64> = seen.iter().map(|&(offset, _)| offset).collect();
    let want: Vec<u64> = (1..=offsets.len() as u64).collect();
    assert_eq!(
        offsets, want,
        "every offset from the first, once, in order: {seen:?}"
    );
    assert_eq!(values(&seen), (0..10).collect::<Vec<u32>>(), "{seen:?}");

    // Deleted by another process: the subscriber stops.
    let other = Broker::connect(&rt, &url).await?;
    other.delete_queue(&name, DeleteOptions::default()).await?;
    tokio::time::timeout(Duration::from_secs(10), subscription.terminated())
        .await
        .map_err(|_| "the subscriber of a stream deleted elsewhere did not stop")?;
    // Declared and deleted here: a reconnection does not declare it again.
    let gone = unique("stream-deleted");
    broker
        .declare_stream(&gone, StreamOptions::unbounded())
        .await?;
    broker.delete_stream(&gone).await?;
    // Deleted by the other process first: deleting it here fails with
    // NotFound, and forgets it all the same.
    let twice = unique("stream-deleted-twice");
    broker
        .declare_stream(&twice, StreamOptions::unbounded())
        .await?;
    other.delete_queue(&twice, DeleteOptions::default()).await?;
    let err = broker.delete_stream(&twice).await.unwrap_err();
    assert!(matches!(err, StreamError::NotFound(_)), "{err}");
    proxy.cut();
    let last = Mutex::new(None);
    tokio::time::timeout(Duration::from_secs(10), async {
        // Once reconnected, asking succeeds (and finds nothing).
        loop {
            match broker.queue_stats(&gone).await {
                Err(BrokerError::QueueNotFound(_)) => break,
                Ok(_) => panic!("the deleted stream was declared again"),
                Err(e) => {
                    *last.lock() = Some(e.to_string());
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
            }
        }
    })
    .await
    .map_err(|_| format!("not reconnected within 10 s: {:?}", last.lock()))?;
    for name in [&gone, &twice] {
        assert!(
            matches!(
                other.queue_stats(name).await,
                Err(BrokerError::QueueNotFound(_))
            ),
            "{name} declared again"
        );
    }
    // The first stream, deleted by the other process, was this one's to
    // declare again on reconnecting (as its queues are): deleted here too.
    let _ = broker.delete_stream(&name).await;
    assert!(matches!(
        other.queue_stats(&name).await,
        Err(BrokerError::QueueNotFound(_))
    ));
    Ok(())
}

/// Calls made as the connection dies end (within the test's 5 s, far below
/// the 60 s operation timeout): lapin may never answer a channel asked for
/// just as its I/O loop stops, and the loss of the connection must answer
/// it instead. Many cuts, each while calls are in flight, to meet that
/// moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_caught_by_a_cut_end() -> TestResult {
    let Some(url) = amqp_url("calls_caught_by_a_cut_end") else {
        return Ok(());
    };
    let proxy = Proxy::start(upstream(&url)).await?;
    let rt = Runtime::new()?;
    let options = AmqpOptions::new(via(&url, proxy.addr))
        .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(50))
        .timeout(Duration::from_secs(60));
    let broker = Broker::connect_with(&rt, options).await?;
    let name = unique("cut-calls");
    broker.declare_queue(&name, QueueOptions::default()).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (broker, name) = (broker.clone(), name.clone());
            let (stop, answered) = (stop.clone(), answered.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    // Refused while the connection is down: fine; hung: not.
                    let call = broker.queue_stats(&name);
                    match tokio::time::timeout(Duration::from_secs(5), call).await {
                        Err(_) => return Err("a queue_stats call caught by a cut hung"),
                        Ok(Ok(_)) => {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
                Ok(())
            })
        })
        .collect();
    for round in 0..40u64 {
        // Calls answered since the last cut: the connection is back.
        let before = answered.load(Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), async {
            while answered.load(Ordering::SeqCst) < before + 8 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .map_err(|_| format!("round {round}: calls stopped being answered"))?;
        tokio::time::sleep(Duration::from_millis(round % 7)).await;
        proxy.cut();
    }
    stop.store(true, Ordering::SeqCst);
    for caller in callers {
        caller.await??;
    }
    broker.delete_queue(&name, DeleteOptions::default()).await?;
    Ok(())
}

/// A RabbitMQ TLS listener on a free port, with a certificate this test
/// generates (signed by its own CA), started through `rabbitmqctl` and
/// stopped when dropped.
struct TlsListener {
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsListener {
    fn start() -> Result<(TlsListener, String), Box<dyn std::error::Error + Send + Sync>> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "postbox test CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        let dir = tempfile::tempdir()?;
        let write = |name: &str, text: &str| -> std::io::Result<String> {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            // RabbitMQ runs as its own user: it must read them.
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
            }
            Ok(path.display().to_string())
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        let ca_path = write("ca.pem", &ca_cert.pem())?;
        let cert_path = write("server.pem", &cert.pem())?;
        let key_path = write("server.key", &key.serialize_pem())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let expr = format!(
            "rabbit_networking:start_ssl_listener({port}, [{{cacertfile,\"{ca_path}\"}},{{certfile,\"{cert_path}\"}},{{keyfile,\"{key_path}\"}}], 1, 1)."
        );
        let out = std::process::Command::new("rabbitmqctl")
            .args(["eval", &expr])
            .output()?;
        if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("ok") {
            return Err(format!(
                "starting the TLS listener failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok((TlsListener { port, dir }, ca_cert.pem()))
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        let expr = format!("rabbit_networking:stop_tcp_listener({}).", self.port);
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["eval", &expr])
            .output();
        let _ = &self.dir;
    }
}

/// `amqps://` with the CA of a certificate the test generated: publish and
/// consume over TLS; without the CA, the server is not trusted and the
/// connection is refused with a typed error that does not show the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_generated_certificate() -> TestResult {
    let Some(url) = amqp_url("tls_with_a_generated_certificate") else {
        return Ok(());
    };
    let logs = Logs::capture();
    let (listener, ca) = TlsListener::start()?;
    let plain = upstream(&url);
    let tls_url = via(&url, plain)
        .replacen("amqp://", "amqps://", 1)
        .replace(&format!("{plain}"), &format!("localhost:{}", listener.port));
    let rt = Runtime::new()?;

    let untrusted = Broker::connect(&rt, &tls_url).await;
    let err = untrusted.expect_err("a server signed by an unknown CA is not trusted");
    assert!(matches!(err, BrokerError::Backend(_)), "{err:?}");

    let broker = Broker::connect_with(&rt, AmqpOptions::new(&tls_url).ca_certificate(ca)).await?;
    let queue = unique("tls");
    broker
        .declare_queue(&queue, QueueOptions::default())
        .await?;
    broker.publish(&queue, Envelope::new("over tls")).await?;
    let (got, _) = broker
        .get(&queue, postbox_actors::AckMode::Auto)
        .await?
        .ok_or("the message")?;
    assert_eq!(got.payload().as_ref(), b"over tls");
    broker
        .delete_queue(&queue, DeleteOptions::default())
        .await?;

    for text in [format!("{err}"), format!("{err:?}"), logs.text()] {
        assert!(!shows_password(&text, &url), "the password shows: {text}");
    }
    drop(listener);
    Ok(())
}

/// Wrong credentials: a typed error naming the server, never the password
/// (nor in `Debug`, nor in a log line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused_without_showing_them() -> TestResult {
    let Some(url) = amqp_url("wrong_credentials_are_refused_without_showing_them") else {
        return Ok(());
    };
    let logs = Logs::capture();
    let rt = Runtime::new()?;
    let addr = upstream(&url);
    let secret = "wr0ng-Passw0rd-xyz";
    let bad = format!("amqp://postbox-nobody:{secret}@{addr}/%2f");
    let err = Broker::connect(&rt, &bad).await.expect_err("refused");
    assert!(matches!(err, BrokerError::Backend(_)), "{err:?}");
    let options = AmqpOptions::new(&bad);
    for text in [
        format!("{err}"),
        format!("{err:?}"),
        format!("{options:?}"),
        logs.text(),
    ] {
        assert!(!text.contains(secret), "the password shows: {text}");
    }
    assert!(err.to_string().contains("postbox-nobody:***@"), "{err}");
    Ok(())
}

/// Request-reply through direct reply-to: replies by correlation id, remote
/// errors typed, no responder fails fast, a slow responder times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_through_direct_reply_to() -> TestResult {
    let Some((_rt, broker)) = rabbit("request_reply_through_direct_reply_to").await? else {
        return Ok(());
    };
    let queue = unique("rpc");
    broker
        .declare_queue(&queue, QueueOptions::default())
        .await?;
    let client = broker.requester().await?;
    let err = client
        .request(queue.as_str(), Envelope::encode(&1)?)
        .timeout(Duration::from_secs(5))
        .await
        .expect_err("nobody consumes the queue yet");
    assert!(matches!(err, RequestError::NoResponders { .. }), "{err:?}");
    let slow = Arc::new(AtomicBool::new(false));
    let s = slow.clone();
    let _responder = broker
        .respond(&queue, ConsumeOptions::manual(8), move || {
            let s = s.clone();
            move |req: Request| {
                let s = s.clone();
                async move {
                    let n: i64 = req.decode()?;
                    if s.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    if n < 0 {
                        return Err(postbox_actors::rpc::RemoteError::new("negative"));
                    }
                    Ok(Envelope::encode(&(n * 2))?)
                }
            }
        })
        .await?;
    let mut replies = Vec::new();
    for n in 0..20i64 {
        let reply = client
            .request(queue.as_str(), Envelope::encode(&n)?)
            .timeout(Duration::from_secs(5))
            .await?;
        replies.push(reply.decode::<i64>()?);
    }
    assert_eq!(replies, (0..20).map(|n| n * 2).collect::<Vec<_>>());
    let err = client
        .request(queue.as_str(), Envelope::encode(&-1i64)?)
        .timeout(Duration::from_secs(5))
        .await
        .expect_err("a remote error");
    assert!(
        matches!(&err, RequestError::Remote { message, .. } if message.contains("negative")),
        "{err:?}"
    );
    slow.store(true, Ordering::Relaxed);
    let err = client
        .request(queue.as_str(), Envelope::encode(&3i64)?)
        .timeout(Duration::from_millis(100))
        .await
        .expect_err("too slow");
    assert!(matches!(err, RequestError::Timeout { .. }), "{err:?}");
    broker
        .delete_queue(&queue, DeleteOptions::default())
        .await?;
    Ok(())
}

/// Input RabbitMQ cannot carry is refused with a typed error before
/// anything is sent: a batch with one correlation id over 255 bytes
/// publishes none of its messages; a bound name over 255 bytes is an error,
/// not a panic; and transactions, which RabbitMQ cannot span across a
/// consumer's and a publisher's channels, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_rabbitmq_cannot_carry_is_refused_before_anything_is_sent() -> TestResult {
    let Some((_rt, broker)) =
        rabbit("what_rabbitmq_cannot_carry_is_refused_before_anything_is_sent").await?
    else {
        return Ok(());
    };
    let queue = unique("refused");
    let handle = broker
        .declare_queue(&queue, QueueOptions::default())
        .await?;
    let batch = vec![
        Envelope::new("1"),
        Envelope::new("2"),
        Envelope::new("3").with_correlation_id("c".repeat(300)),
    ];
    let err = handle.publish_batch(batch).await.expect_err("refused");
    assert!(matches!(err, BrokerError::Unsupported { .. }), "{err:?}");
    assert_eq!(broker.queue_stats(&queue).await?.stats.ready, 0);

    let long = "q".repeat(300);
    let err = broker
        .bind_queue(&long, "amq.direct", "k")
        .await
        .expect_err("a name over 255 bytes");
    assert!(
        matches!(
            err,
            BrokerError::InvalidName(_) | BrokerError::Unsupported { .. }
        ),
        "{err:?}"
    );

    let mut tx = broker.transaction();
    tx.publish(&queue, Envelope::new("in a transaction"));
    let err = tx.commit().await.expect_err("not on RabbitMQ");
    assert!(
        matches!(
            err,
            postbox_actors::TxError::Publish(BrokerError::Unsupported { .. })
        ),
        "{err:?}"
    );
    assert_eq!(broker.queue_stats(&queue).await?.stats.ready, 0);

    // A stream RabbitMQ cannot hold (the default retains by count; a
    // RabbitMQ stream by bytes and age only) is refused, and nothing is
    // declared on the server under that name.
    let stream = unique("stream");
    let err = broker
        .declare_stream(&stream, postbox_actors::StreamOptions::default())
        .await
        .expect_err("retention by count");
    assert!(
        matches!(err, postbox_actors::StreamError::Unsupported(_)),
        "{err:?}"
    );
    assert!(
        matches!(
            broker.queue_stats(&stream).await,
            Err(BrokerError::QueueNotFound(_))
        ),
        "nothing declared"
    );
    broker
        .delete_queue(&queue, DeleteOptions::default())
        .await?;
    Ok(())
}

/// After a reconnection, a declaration RabbitMQ now refuses (another
/// process redeclared the queue with other arguments meanwhile) is skipped
/// and logged, and the rest of the topology comes back: the broker works
/// again instead of retrying the refused declaration for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_redeclaration_does_not_keep_the_broker_down() -> TestResult {
    let Some(url) = amqp_url("a_refused_redeclaration_does_not_keep_the_broker_down") else {
        return Ok(());
    };
    let proxy = Proxy::start(upstream(&url)).await?;
    let rt = Runtime::new()?;
    let options = AmqpOptions::new(via(&url, proxy.addr))
        .timeout(Duration::from_secs(5))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let broker = Broker::connect_with(&rt, options).await?;
    let (changed, kept) = (unique("changed"), unique("kept"));
    let ttl = |secs| QueueOptions::default().message_ttl(Duration::from_secs(secs));
    broker.declare_queue(&changed, ttl(60)).await?;
    broker.declare_queue(&kept, QueueOptions::default()).await?;
    // Another process replaces the first queue with other arguments.
    let other = Broker::connect(&rt, &url).await?;
    other
        .delete_queue(&changed, DeleteOptions::default())
        .await?;
    other.declare_queue(&changed, ttl(30)).await?;
    proxy.cut();
    // Back, with the queue it could redeclare. A publish racing the cut may
    // fail (not confirmed): it is repeated, as an application would.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match broker.publish(&kept, Envelope::new("after")).await {
            Ok(()) => break,
            Err(err @ (BrokerError::Unconfirmed(_) | BrokerError::Backend(_))) => {
                assert!(tokio::time::Instant::now() < deadline, "still down: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => return Err(other.into()),
        }
    }
    assert!(broker.queue_stats(&kept).await?.stats.ready >= 1);
    for queue in [&changed, &kept] {
        other.delete_queue(queue, DeleteOptions::default()).await?;
    }
    Ok(())
}

/// A responder echoing each request, on a queue of its own.
struct Echo<R: Respond> {
    queue: String,
    responder: ResponderHandle<R>,
}

async fn echo(
    broker: &Broker,
    options: ConsumeOptions,
) -> Result<Echo<impl Respond>, Box<dyn std::error::Error + Send + Sync>> {
    let queue = unique("echo");
    broker
        .declare_queue(&queue, QueueOptions::default())
        .await?;
    let responder = broker
        .respond(&queue, options, || {
            |req: Request| async move { Ok(req.message().clone()) }
        })
        .await?;
    Ok(Echo { queue, responder })
}

impl<R: Respond> Echo<R> {
    async fn end(self, broker: &Broker) -> TestResult {
        drop(self.responder);
        broker
            .delete_queue(&self.queue, DeleteOptions::default())
            .await?;
        Ok(())
    }
}

/// A message held unacknowledged by a consumer of its own on `broker`:
/// delivered once, unless the connection drops (RabbitMQ then delivers it
/// again after the reconnection).
struct Held {
    queue: String,
    deliveries: Arc<AtomicUsize>,
    close: futures::future::BoxFuture<'static, ()>,
}

impl Held {
    async fn start(broker: &Broker) -> Result<Held, Box<dyn std::error::Error + Send + Sync>> {
        let queue = unique("held");
        broker
            .declare_queue(&queue, QueueOptions::default())
            .await?;
        broker.publish(&queue, Envelope::new("held")).await?;
        let deliveries = Arc::new(AtomicUsize::new(0));
        let d = deliveries.clone();
        let consumer = broker
            .consume(&queue, ConsumeOptions::manual(1), move || {
                let d = d.clone();
                move |_: Delivery| {
                    d.fetch_add(1, Ordering::Relaxed);
                    async { Ok(()) }
                }
            })
            .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while deliveries.load(Ordering::Relaxed) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never delivered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Held {
            queue,
            deliveries,
            close: Box::pin(consumer.close()),
        })
    }

    /// Fails if the held message was delivered again: the connection
    /// dropped meanwhile.
    async fn still_held(self, broker: &Broker) -> TestResult {
        // Time for a reconnection's redelivery to show, had there been one.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            self.deliveries.load(Ordering::Relaxed),
            1,
            "the connection dropped"
        );
        self.close.await;
        broker
            .delete_queue(&self.queue, DeleteOptions::default())
            .await?;
        Ok(())
    }
}

/// A publish RabbitMQ refuses by closing the channel (to a missing
/// exchange), made while other publishes are in flight, costs nothing
/// else: the other publishes are confirmed, and the connection stays up (a
/// delivery held unacknowledged on another channel is not delivered again,
/// as it would be after a reconnection). RabbitMQ closes a whole connection
/// on a frame sent on a channel after its close (`CHANNEL_ERROR - expected
/// 'channel.open'`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_costs_nothing_else() -> TestResult {
    let Some((_rt, broker)) = rabbit("a_refused_publish_costs_nothing_else").await? else {
        return Ok(());
    };
    publishes_racing_refused_ones_all_land(&broker, &unique("missing")).await
}

/// The same with an exchange this process declared, published through and
/// then deleted: it is not taken for existing afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_deleted_after_use_is_not_trusted() -> TestResult {
    let Some((_rt, broker)) = rabbit("an_exchange_deleted_after_use_is_not_trusted").await? else {
        return Ok(());
    };
    let gone = unique("gone");
    broker
        .declare_exchange(&gone, postbox_actors::ExchangeOptions::fanout())
        .await?;
    assert_eq!(broker.publish_to(&gone, "k", Envelope::new("x")).await?, 0);
    broker.delete_exchange(&gone, false).await?;
    publishes_racing_refused_ones_all_land(&broker, &gone).await
}

/// The same with an exchange this process published through, which another
/// process deleted while the connection was down: what was known of the
/// server is asked again after a reconnection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_known_of_exchanges_is_asked_again_after_a_reconnection() -> TestResult {
    let Some((_rt, other)) =
        rabbit("what_was_known_of_exchanges_is_asked_again_after_a_reconnection").await?
    else {
        return Ok(());
    };
    let url = std::env::var("AMQP_URL")?;
    let proxy = Proxy::start(upstream(&url)).await?;
    let rt = Runtime::new()?;
    let options = AmqpOptions::new(via(&url, proxy.addr))
        .timeout(Duration::from_secs(5))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let broker = Broker::connect_with(&rt, options).await?;
    let gone = unique("gone");
    other
        .declare_exchange(&gone, postbox_actors::ExchangeOptions::fanout())
        .await?;
    assert_eq!(broker.publish_to(&gone, "k", Envelope::new("x")).await?, 0);
    proxy.cut();
    other.delete_exchange(&gone, false).await?;
    // Back: a queue declared after the cut answers.
    let back = unique("back");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while broker
        .declare_queue(&back, QueueOptions::default())
        .await
        .is_err()
    {
        assert!(tokio::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publishes_racing_refused_ones_all_land(&broker, &gone).await?;
    broker.delete_queue(&back, DeleteOptions::default()).await?;
    Ok(())
}

/// The same with an exchange another process deleted while this one was
/// connected: the first publish through it after that is refused by
/// RabbitMQ itself (it closes the publishing channel), and from then on it
/// is asked about first again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_refused_by_rabbitmq_is_not_trusted_again() -> TestResult {
    let Some((_rt, broker)) =
        rabbit("an_exchange_refused_by_rabbitmq_is_not_trusted_again").await?
    else {
        return Ok(());
    };
    let Some((_other_rt, other)) =
        rabbit("an_exchange_refused_by_rabbitmq_is_not_trusted_again").await?
    else {
        return Ok(());
    };
    let gone = unique("gone");
    other
        .declare_exchange(&gone, postbox_actors::ExchangeOptions::fanout())
        .await?;
    assert_eq!(broker.publish_to(&gone, "k", Envelope::new("x")).await?, 0);
    other.delete_exchange(&gone, false).await?;
    assert!(matches!(
        broker.publish_to(&gone, "k", Envelope::new("y")).await,
        Err(postbox_actors::PublishError::Refused(
            BrokerError::ExchangeNotFound(_)
        ))
    ));
    publishes_racing_refused_ones_all_land(&broker, &gone).await
}

/// 8 × 300 publishes to a queue, racing 30 publishes through exchange
/// `missing`: each of those is `ExchangeNotFound`, every other one is
/// confirmed, and the connection stays up.
async fn publishes_racing_refused_ones_all_land(broker: &Broker, missing: &str) -> TestResult {
    let busy = unique("busy");
    broker.declare_queue(&busy, QueueOptions::default()).await?;
    let held = Held::start(broker).await?;

    const PUBLISHERS: usize = 8;
    const EACH: usize = 300;
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let (broker, busy) = (broker.clone(), busy.clone());
        publishers.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            for i in 0..EACH {
                if let Err(err) = broker
                    .publish(&busy, Envelope::encode(&(p * EACH + i))?)
                    .await
                {
                    failed.push(err.to_string());
                }
            }
            Ok::<_, postbox_actors::CodecError>(failed)
        }));
    }
    for _ in 0..30 {
        match broker.publish_to(missing, "k", Envelope::new("lost")).await {
            Err(postbox_actors::PublishError::Refused(BrokerError::ExchangeNotFound(name))) => {
                assert_eq!(name, missing)
            }
            other => panic!("expected ExchangeNotFound, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut failed = Vec::new();
    for publisher in publishers {
        failed.extend(publisher.await??);
    }
    assert!(
        failed.is_empty(),
        "{} publishes failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(
        broker.queue_stats(&busy).await?.stats.ready,
        PUBLISHERS * EACH
    );
    held.still_held(broker).await?;
    broker.delete_queue(&busy, DeleteOptions::default()).await?;
    Ok(())
}

/// A requester dropped with requests in flight closes its channel only once
/// they are sent: RabbitMQ closes the whole connection on a publish that
/// follows a channel's close, and lapin sends a close ahead of publishes
/// still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_dropped_with_requests_in_flight_costs_nothing_else() -> TestResult {
    let Some((_rt, broker)) =
        rabbit("a_requester_dropped_with_requests_in_flight_costs_nothing_else").await?
    else {
        return Ok(());
    };
    let echo = echo(&broker, ConsumeOptions::manual(64)).await?;
    let queue = echo.queue.clone();
    let held = Held::start(&broker).await?;
    for round in 0..5 {
        let client = broker.requester().await?;
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (client, queue) = (client.clone(), queue.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let _ = client
                        .request(queue.as_str(), Envelope::new(vec![0u8; 512 * 1024]))
                        .timeout(Duration::from_secs(5))
                        .await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(5 + 10 * round)).await;
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        drop(client);
    }
    held.still_held(&broker).await?;
    echo.end(&broker).await
}

/// Requesters dropped with nothing in flight cost nothing else either: the
/// channel closes at once, and lapin's own `basic.cancel` of the dropped
/// reply consumer must not follow the close (RabbitMQ closes the whole
/// connection on it: `CHANNEL_ERROR - expected 'channel.open'`, operation
/// `basic.cancel`, seen in CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_requesters_dropped_cost_nothing_else() -> TestResult {
    let Some((_rt, broker)) = rabbit("idle_requesters_dropped_cost_nothing_else").await? else {
        return Ok(());
    };
    let echo = echo(&broker, ConsumeOptions::auto()).await?;
    let queue = echo.queue.clone();
    let held = Held::start(&broker).await?;
    for _ in 0..10 {
        let mut clients = Vec::new();
        for _ in 0..20 {
            let client = broker.requester().await?;
            client
                .request(queue.as_str(), Envelope::new("ping"))
                .timeout(Duration::from_secs(5))
                .await?;
            clients.push(client);
        }
        drop(clients);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    held.still_held(&broker).await?;
    echo.end(&broker).await
}

/// A delivery nacked with a delay whose consumer closes before the delay
/// has passed is requeued by RabbitMQ at the close, and delivered once more;
/// the delayed nack sends nothing on the closed channel (the connection
/// stays up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_nack_outlived_by_its_consumer_sends_nothing() -> TestResult {
    let Some((_rt, broker)) =
        rabbit("a_delayed_nack_outlived_by_its_consumer_sends_nothing").await?
    else {
        return Ok(());
    };
    let held = Held::start(&broker).await?;
    let queue = unique("delayed");
    broker
        .declare_queue(&queue, QueueOptions::default())
        .await?;
    broker.publish(&queue, Envelope::new("once")).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let forward = move || {
        let tx = tx.clone();
        move |d: Delivery| {
            let _ = tx.send(d);
            async { Ok(()) }
        }
    };
    let first = broker
        .consume(&queue, ConsumeOptions::manual(1), forward.clone())
        .await?;
    let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await?
        .ok_or("a delivery")?;
    d.nack_after(Duration::from_millis(300)).await?;
    first.close().await;
    // Requeued at the close, not after the delay.
    assert_eq!(broker.queue_stats(&queue).await?.stats.ready, 1);
    // The delay passes with nobody to nack for.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = broker
        .consume(&queue, ConsumeOptions::manual(1), forward)
        .await?;
    let again = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await?
        .ok_or("delivered again")?;
    assert_eq!(again.id(), d.id());
    assert!(again.redelivered());
    again.ack().await?;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "delivered a third time"
    );
    second.close().await;
    held.still_held(&broker).await?;
    broker
        .delete_queue(&queue, DeleteOptions::default())
        .await?;
    Ok(())
}

/// A declaration RabbitMQ refuses (a queue redeclared with other
/// arguments: it closes the channel) fails alone: declarations and bindings
/// made at the same time all succeed, and the connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_declaration_fails_only_itself() -> TestResult {
    let Some((_rt, broker)) = rabbit("a_refused_declaration_fails_only_itself").await? else {
        return Ok(());
    };
    let held = Held::start(&broker).await?;
    let ttl = |secs| QueueOptions::default().message_ttl(Duration::from_secs(secs));
    let taken = unique("taken");
    broker.declare_queue(&taken, ttl(60)).await?;
    let mut made = Vec::new();
    for _ in 0..5 {
        let mut good = Vec::new();
        for _ in 0..20 {
            let (broker, name) = (broker.clone(), unique("good"));
            made.push(name.clone());
            good.push(tokio::spawn(async move {
                broker
                    .declare_queue(&name, QueueOptions::default())
                    .await
                    .map(|_| ())
            }));
        }
        let refused = broker.declare_queue(&taken, ttl(30)).await;
        assert!(
            matches!(refused, Err(BrokerError::QueueMismatch { ref name, .. }) if *name == taken),
            "{refused:?}"
        );
        for declared in good {
            declared.await??;
        }
    }
    held.still_held(&broker).await?;
    for queue in made.iter().chain([&taken]) {
        broker.delete_queue(queue, DeleteOptions::default()).await?;
    }
    Ok(())
}

/// Consumers closed while deliveries flow to them cost nothing else. lapin
/// sends a `basic.cancel` of its own when a consumer it still counts as
/// active is dropped, from its internal task: dropped before its channel is
/// closed, that cancel could follow the close, and RabbitMQ closes the
/// whole connection on it (`CHANNEL_ERROR - expected 'channel.open'`,
/// operation `basic.cancel`; seen once in CI, in a consumer pool shrinking).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_closed_while_deliveries_flow_cost_nothing_else() -> TestResult {
    let Some((_rt, broker)) =
        rabbit("consumers_closed_while_deliveries_flow_cost_nothing_else").await?
    else {
        return Ok(());
    };
    let held = Held::start(&broker).await?;
    let queue = unique("flowing");
    let handle = broker
        .declare_queue(&queue, QueueOptions::default())
        .await?;
    let batch = (0..2_000).map(|i| Envelope::new(format!("m{i}"))).collect();
    handle.publish_batch(batch).await?;
    for _ in 0..10 {
        let mut consumers = Vec::new();
        for _ in 0..8 {
            let handled = Arc::new(AtomicUsize::new(0));
            let h = handled.clone();
            let consumer = broker
                .consume(&queue, ConsumeOptions::manual(16), move || {
                    let h = h.clone();
                    move |d: Delivery| {
                        h.fetch_add(1, Ordering::Relaxed);
                        async move {
                            d.nack(true).await?;
                            Ok(())
                        }
                    }
                })
                .await?;
            consumers.push((consumer, handled));
        }
        // Each has deliveries flowing when it is closed.
        for (_, handled) in &consumers {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while handled.load(Ordering::Relaxed) == 0 {
                assert!(tokio::time::Instant::now() < deadline, "nothing delivered");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        futures::future::join_all(consumers.into_iter().map(|(c, _)| c.close())).await;
    }
    // And idle ones, waiting for a delivery when they are closed.
    let idle = unique("idle");
    broker.declare_queue(&idle, QueueOptions::default()).await?;
    for _ in 0..10 {
        let mut consumers = Vec::new();
        for _ in 0..16 {
            consumers.push(
                broker
                    .consume(&idle, ConsumeOptions::manual(16), || {
                        |_: Delivery| async { Ok(()) }
                    })
                    .await?,
            );
        }
        futures::future::join_all(consumers.into_iter().map(|c| c.close())).await;
    }
    broker.delete_queue(&idle, DeleteOptions::default()).await?;
    held.still_held(&broker).await?;
    broker
        .delete_queue(&queue, DeleteOptions::default())
        .await?;
    Ok(())
}
