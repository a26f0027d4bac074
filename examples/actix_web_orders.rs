//! An actix-web endpoint that takes orders with backpressure, and an actix
//! actor the application already has that processes them, fed by postbox
//! through `postbox_actors::actix::ActixConsumer`.
//!
//! From the seed tutorial's section 2 (点对点模式, point to point: the
//! `OrderProducer`/`OrderConsumer` pair, "each order processed by exactly
//! one consumer") and section 8 (背压处理机制, backpressure: a producer
//! faster than its consumer, bounded instead of buffered for ever). The
//! seed's producer is a Spring bean; here it is an HTTP endpoint, as in
//! most services that would embed postbox, and the consumer is a plain
//! actix 0.13 actor (`OrderBook`) with no postbox types in it.
//!
//! - `POST /orders` with a JSON order publishes it to the queue
//!   `orders.http`, bounded by `QueueOptions::max_length` with
//!   `Overflow::Block`, with `QueueHandle::try_publish`: **202** when the
//!   order is in; **503 with `Retry-After`** and a JSON error when the queue
//!   is full (`TryPublishError::Full`), so a burst is pushed back to the
//!   clients instead of piling up in memory; **400** with a JSON error for a
//!   body that is not an order; **500** for anything else (the queue gone).
//!   Why block + `try_publish` rather than reject-publish + `publish`:
//!   `try_publish` never waits, so no HTTP worker is held by a full queue,
//!   and under block a full queue makes it fail at once (at its limit it
//!   takes nothing more), while an accepted order is never dropped. (Under
//!   reject-publish, `try_publish` would accept orders that the queue then
//!   refuses without telling anyone; `publish` would tell, at the cost of a
//!   round trip to the queue per request.) Accepted orders not yet booked
//!   are bounded: `--max-length` ready in the queue, at most `--inbox`
//!   publishes waiting in front of it, and the consumer's `--prefetch`.
//! - `OrderBook` consumes through an `ActixConsumer`: each delivery becomes
//!   a `PlaceOrder` message sent with `Recipient::send().await`, and the
//!   consumer waits for the reply before it takes the next one, so the
//!   actor's pace is the queue's. The reply acknowledges: `Ok` acks,
//!   `Err(BookError::Busy)` (the book turns away the first attempt of every
//!   `--busy-every`th order) fails the delivery, which the consumer's
//!   `OnError` policy (requeue, the default) puts back at its place, and
//!   the redelivery is booked.
//! - The example is its own client: it sends a malformed body and an
//!   invalid order (400s), then a burst of `--orders` orders over HTTP/1.1
//!   on the loopback port; the refused ones (503) are sent again after their
//!   `Retry-After`, for up to `--rounds` rounds.
//!
//! It checks that every accepted order was booked by the actor exactly once
//! (and acknowledged), that every 503 carried `Retry-After` and a JSON
//! error, that nothing was lost (each order accepted or still refused with
//! 503, no other answer, nothing left in the queue), that the actor's `Err`
//! replies were requeued rather than acknowledged, and that the bad bodies
//! got 400s.
//!
//! Run it with
//! `cargo run --release --example actix_web_orders -- --orders 60 --pace-ms 5`.
//!
//! Flags (defaults in brackets):
//! - `--orders N`: orders in the burst [30];
//! - `--pace-ms N`: the actor's time per order [10];
//! - `--max-length N`: the queue's length limit [10];
//! - `--inbox N`: publishes that may wait in front of the full queue [4];
//! - `--prefetch N`: the consumer's prefetch [1];
//! - `--busy-every N`: the actor turns away the first attempt of every Nth
//!   order [7] (0: never);
//! - `--retry-after N`: the 503's `Retry-After`, in seconds [1];
//! - `--rounds N`: how many times the client sends (the burst, then
//!   retries) [10];
//! - `--port N`: the port to listen on, on 127.0.0.1 [0: any free port].
//!
//! The actix-web server and the actor run on an actix `System` of their own,
//! on a thread started here (actix-web needs one, and `run` may be called
//! from a tokio runtime, where an actix system cannot start); postbox's
//! runtime runs on its own threads; the two meet through `Recipient::send`.
//! Everything is stopped and joined before `run` returns.
//!
//! `tests/actix_web_orders.rs` tests the server, the queue and the actor
//! over HTTP with the actor held at a gate (`OrderBook::gated`), so that the
//! 503s do not depend on the machine's speed.

#[path = "support/mod.rs"]
pub mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::http::StatusCode;
use actix_web::http::header::RETRY_AFTER;
use actix_web::{HttpResponse, HttpServer, web};
use postbox::{Failure, Runtime, RuntimeHandle};
use postbox_actors::actix::ActixConsumer;
use postbox_actors::{
    Broker, BrokerError, ConsumeOptions, ConsumerHandle, Delivery, Envelope, Overflow, QueueHandle,
    QueueOptions, QueueStats, TryPublishError,
};
use serde::{Deserialize, Serialize};
use support::{Flags, Summary, secs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// The queue (the example has a broker of its own).
pub const QUEUE: &str = "orders.http";

// ---------------------------------------------------------------------------
// The actor the application already has: a plain actix 0.13 actor.

/// An order, as clients post it and the queue carries it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Order {
    /// The client's order number.
    pub id: u64,
    /// What is ordered.
    pub item: String,
    /// How many (at least 1).
    pub quantity: u32,
}

impl Order {
    /// Why the order cannot be taken, if it cannot.
    fn invalid(&self) -> Option<&'static str> {
        if self.quantity == 0 {
            Some("quantity must be at least 1")
        } else if self.item.trim().is_empty() {
            Some("item must not be empty")
        } else {
            None
        }
    }
}

/// Books orders, one at a time, at its own pace; keeps a ledger.
#[derive(Debug)]
pub struct OrderBook {
    pace: Duration,
    busy_every: u64,
    /// Held closed, the book waits before each order (tests use it to keep
    /// the queue full).
    gate: Option<watch::Receiver<bool>>,
    booked: BTreeMap<u64, u32>,
    turned_away: u32,
    busy_time: Duration,
}

impl OrderBook {
    /// A book taking `pace` per order, turning away the first attempt of
    /// every `busy_every`th order (0: none).
    pub fn new(pace: Duration, busy_every: u64) -> Self {
        OrderBook {
            pace,
            busy_every,
            gate: None,
            booked: BTreeMap::new(),
            turned_away: 0,
            busy_time: Duration::ZERO,
        }
    }

    /// Waits for `gate` to be `true` before each order.
    pub fn gated(mut self, gate: watch::Receiver<bool>) -> Self {
        self.gate = Some(gate);
        self
    }
}

impl Actor for OrderBook {
    type Context = Context<Self>;
}

/// Book this order (its `attempt`-th delivery).
#[derive(Debug)]
pub struct PlaceOrder {
    /// The order.
    pub order: Order,
    /// 1 for the first delivery, 2 for the first redelivery...
    pub attempt: u32,
}

/// Why the book did not take an order.
#[derive(Debug)]
pub enum BookError {
    /// Not now: try again.
    Busy(u64),
}

impl std::fmt::Display for BookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BookError::Busy(id) => write!(f, "the book is busy, order {id} not taken"),
        }
    }
}

impl Message for PlaceOrder {
    /// `Ok` acknowledges the delivery, `Err` fails it (see `ActorReply`).
    type Result = Result<(), BookError>;
}

impl Handler<PlaceOrder> for OrderBook {
    /// One order at a time: the actor waits for each (`ctx.wait`).
    type Result = AtomicResponse<Self, Result<(), BookError>>;

    fn handle(&mut self, msg: PlaceOrder, _: &mut Context<Self>) -> Self::Result {
        let (pace, gate) = (self.pace, self.gate.clone());
        AtomicResponse::new(Box::pin(
            async move {
                if let Some(mut gate) = gate {
                    let _ = gate.wait_for(|open| *open).await;
                }
                actix::clock::sleep(pace).await;
            }
            .into_actor(self)
            .map(move |(), book, _| {
                book.busy_time += pace;
                let id = msg.order.id;
                if book.busy_every > 0 && id.is_multiple_of(book.busy_every) && msg.attempt == 1 {
                    book.turned_away += 1;
                    return Err(BookError::Busy(id));
                }
                *book.booked.entry(id).or_default() += 1;
                Ok(())
            }),
        ))
    }
}

/// What the book has done.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// Times each order was booked.
    pub booked: BTreeMap<u64, u32>,
    /// Attempts answered `Err(Busy)`.
    pub turned_away: u32,
    /// Time spent on orders.
    pub busy_time: Duration,
}

/// Asks the book for its ledger.
#[derive(Debug)]
pub struct GetLedger;

impl Message for GetLedger {
    type Result = Ledger;
}

impl Handler<GetLedger> for OrderBook {
    type Result = MessageResult<GetLedger>;
    fn handle(&mut self, _: GetLedger, _: &mut Context<Self>) -> Self::Result {
        MessageResult(Ledger {
            booked: self.booked.clone(),
            turned_away: self.turned_away,
            busy_time: self.busy_time,
        })
    }
}

// ---------------------------------------------------------------------------
// postbox to the actor: the adapter.

/// A delivery as the book's message: the order, and which attempt it is.
fn place_order(delivery: &Delivery) -> Result<PlaceOrder, Failure> {
    Ok(PlaceOrder {
        order: delivery.decode()?,
        attempt: delivery.delivery_count(),
    })
}

/// Feeds `queue` to `book`, one order at a time, acked by its replies.
pub async fn consume_orders(
    broker: &Broker,
    queue: &str,
    book: &Addr<OrderBook>,
    prefetch: u32,
) -> Result<ConsumerHandle<ActixConsumer<PlaceOrder>>, BrokerError> {
    let consumer = ActixConsumer::new(book.clone().recipient(), place_order);
    broker
        .consume(queue, ConsumeOptions::manual(prefetch.max(1)), consumer)
        .await
}

// ---------------------------------------------------------------------------
// The HTTP endpoint.

#[derive(Clone)]
struct Endpoint {
    queue: QueueHandle,
    retry_after: u64,
}

fn json_error(status: StatusCode, error: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": error.to_string() }))
}

/// `POST /orders`: 202 when the order is in the queue, 503 with
/// `Retry-After` when the queue is full, 400 for a bad body, 500 otherwise.
async fn post_order(endpoint: web::Data<Endpoint>, body: web::Bytes) -> HttpResponse {
    let order: Order = match serde_json::from_slice(&body) {
        Ok(order) => order,
        Err(err) => return json_error(StatusCode::BAD_REQUEST, format!("not an order: {err}")),
    };
    if let Some(why) = order.invalid() {
        return json_error(StatusCode::BAD_REQUEST, why);
    }
    let message = match Envelope::encode(&order) {
        Ok(message) => message,
        Err(err) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, err),
    };
    match endpoint.queue.try_publish(message) {
        Ok(()) => HttpResponse::Accepted().json(serde_json::json!({ "accepted": order.id })),
        Err(TryPublishError::Full { .. }) => HttpResponse::ServiceUnavailable()
            .insert_header((RETRY_AFTER, endpoint.retry_after.to_string()))
            .json(serde_json::json!({
                "error": "too many orders waiting: try again later",
                "retry_after_secs": endpoint.retry_after,
            })),
        Err(TryPublishError::Refused(err @ BrokerError::MessageTooLarge { .. })) => {
            json_error(StatusCode::PAYLOAD_TOO_LARGE, err)
        }
        Err(TryPublishError::Refused(err)) => json_error(StatusCode::INTERNAL_SERVER_ERROR, err),
    }
}

/// How to run the web side.
#[derive(Debug)]
pub struct WebOptions {
    /// The port on 127.0.0.1 (0: any free one).
    pub port: u16,
    /// The 503's `Retry-After`, in seconds.
    pub retry_after: u64,
}

/// The running server and actor, on an actix system of their own thread.
pub struct Web {
    /// Where the server listens.
    pub addr: SocketAddr,
    /// The order book actor.
    pub book: Addr<OrderBook>,
    server: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts the order book and the HTTP server on a thread running an actix
/// `System` (from any context: a tokio runtime cannot host one).
pub async fn start_web(
    queue: QueueHandle,
    book: OrderBook,
    options: WebOptions,
) -> io::Result<Web> {
    let endpoint = Endpoint {
        queue,
        retry_after: options.retry_after,
    };
    let (started, ready) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("actix-web-orders".into())
        .spawn(move || {
            System::new().block_on(async move {
                let book = book.start();
                let server = HttpServer::new(move || {
                    actix_web::App::new()
                        .app_data(web::Data::new(endpoint.clone()))
                        .route("/orders", web::post().to(post_order))
                })
                .workers(1)
                // No process-wide signal handlers: `run` may share its process.
                .disable_signals()
                .shutdown_timeout(1)
                .bind(("127.0.0.1", options.port));
                let server = match server {
                    Ok(server) => server,
                    Err(err) => {
                        let _ = started.send(Err(err));
                        return;
                    }
                };
                let addr = server.addrs()[0];
                let server = server.run();
                if started.send(Ok((addr, book, server.handle()))).is_ok() {
                    let _ = server.await;
                }
            });
        })?;
    match ready.await {
        Ok(Ok((addr, book, server))) => Ok(Web {
            addr,
            book,
            server,
            thread: Some(thread),
        }),
        failed => {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            Err(match failed {
                Ok(Err(err)) => err,
                _ => io::Error::other("the actix-web thread died while starting"),
            })
        }
    }
}

impl std::fmt::Debug for Web {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Web").field("addr", &self.addr).finish()
    }
}

impl Web {
    /// Stops the server (gracefully), then its actix system and thread.
    pub async fn stop(mut self) {
        self.server.stop(true).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Web {
    /// Not stopped (an early return): stop now, without waiting for requests.
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            drop(self.server.stop(false));
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------
// A small HTTP/1.1 client: one request per connection.

/// An answer, as the client saw it.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
    /// The body.
    pub body: String,
}

impl Answer {
    /// The body's `"error"` field, if the body is a JSON object with one.
    pub fn json_error(&self) -> Option<String> {
        let body: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        body.get("error")?.as_str().map(str::to_string)
    }

    /// `Retry-After` in seconds, if present and a number of seconds.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after.as_deref()?.trim().parse().ok()
    }
}

/// `POST path` with a JSON `body`; gives up after 10 s.
pub async fn post(addr: SocketAddr, path: &str, body: &str) -> io::Result<Answer> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse_answer(&raw)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no HTTP answer in 10 s"))?
}

fn parse_answer(raw: &[u8]) -> io::Result<Answer> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let retry_after = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("retry-after"))
        .map(|(_, value)| value.trim().to_string());
    Ok(Answer {
        status,
        retry_after,
        body: body.to_string(),
    })
}

/// An order's JSON.
pub fn order_json(id: u64) -> String {
    let order = Order {
        id,
        item: ["book", "lamp", "chair", "mug"][(id % 4) as usize].to_string(),
        quantity: 1 + (id % 3) as u32,
    };
    serde_json::to_string(&order).expect("an order serializes")
}

// ---------------------------------------------------------------------------
// The example.

/// One round of the client: what it sent and what came back.
struct Round {
    sent: usize,
    accepted: usize,
    refused: usize,
    took: Duration,
    waited_before: Duration,
}

/// What the client did and saw.
struct Client {
    /// The answers to the bad bodies.
    bad_bodies: Vec<Answer>,
    /// Orders answered 202.
    accepted: BTreeSet<u64>,
    /// Orders still refused (503) after the last round.
    pending: Vec<u64>,
    /// 503 answers, and those without `Retry-After` or a JSON error.
    answered_503: usize,
    without_retry_after: usize,
    /// Any other answer, by status.
    other_answers: BTreeMap<u16, usize>,
    rounds: Vec<Round>,
}

/// The client: a malformed body and an invalid order, then the burst of
/// `orders`, then the refused ones again after their `Retry-After`, for up
/// to `rounds` rounds.
async fn exchange(addr: SocketAddr, orders: u64, rounds: u32) -> io::Result<Client> {
    let bad_bodies = vec![
        post(addr, "/orders", "{\"id\": 1, \"item\": ").await?,
        post(
            addr,
            "/orders",
            r#"{"id": 2, "item": "book", "quantity": 0}"#,
        )
        .await?,
    ];
    let mut client = Client {
        bad_bodies,
        accepted: BTreeSet::new(),
        pending: (1..=orders).collect(),
        answered_503: 0,
        without_retry_after: 0,
        other_answers: BTreeMap::new(),
        rounds: Vec::new(),
    };
    let mut wait = Duration::ZERO;
    for _ in 0..rounds {
        if client.pending.is_empty() {
            break;
        }
        tokio::time::sleep(wait).await;
        let round_started = Instant::now();
        let mut refused = Vec::new();
        let mut retry = 0;
        for &id in &client.pending {
            let answer = post(addr, "/orders", &order_json(id)).await?;
            match answer.status {
                202 => {
                    client.accepted.insert(id);
                }
                503 => {
                    client.answered_503 += 1;
                    match (answer.retry_after_secs(), answer.json_error()) {
                        (Some(secs), Some(_)) => retry = retry.max(secs),
                        _ => client.without_retry_after += 1,
                    }
                    refused.push(id);
                }
                other => *client.other_answers.entry(other).or_default() += 1,
            }
        }
        client.rounds.push(Round {
            sent: client.pending.len(),
            accepted: client.pending.len() - refused.len(),
            refused: refused.len(),
            took: round_started.elapsed(),
            waited_before: wait,
        });
        client.pending = refused;
        wait = Duration::from_secs(retry.max(1));
    }
    Ok(client)
}

/// The queue's stats once the book has taken `accepted` orders and the
/// queue holds nothing (or after 30 s).
async fn drained(broker: &Broker, accepted: u64) -> Result<QueueStats, BrokerError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = broker.queue_stats(QUEUE).await?.stats;
        let done = stats.acknowledged >= accepted && stats.ready + stats.unacked == 0;
        if done || Instant::now() >= deadline {
            return Ok(stats);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the example: the server, the actor, the client's burst and retries;
/// returns the summary with its checks.
pub async fn run(rt: &RuntimeHandle, flags: &Flags) -> Result<Summary, Box<dyn Error>> {
    let orders = flags.u64("orders", 30).max(1);
    let pace = flags.millis("pace-ms", Duration::from_millis(10));
    let max_length = flags.usize("max-length", 10).max(1);
    let inbox = flags.usize("inbox", 4).max(1);
    let prefetch = flags.u32("prefetch", 1).max(1);
    let busy_every = flags.u64("busy-every", 7);
    let retry_after = flags.u64("retry-after", 1).max(1);
    let rounds = flags.u32("rounds", 10).max(1);
    let port = u16::try_from(flags.u64("port", 0)).map_err(|_| "--port: not a port number")?;
    let started = Instant::now();

    let broker = Broker::new(rt);
    let queue = broker
        .declare_queue(
            QUEUE,
            QueueOptions::default()
                .max_length(max_length)
                .overflow(Overflow::Block)
                .mailbox(inbox),
        )
        .await?;
    let web = start_web(
        queue,
        OrderBook::new(pace, busy_every),
        WebOptions { port, retry_after },
    )
    .await?;
    let addr = web.addr;
    println!("listening on http://{addr}/orders");
    let consumer = consume_orders(&broker, QUEUE, &web.book, prefetch).await?;

    // The client's side, then the wait for the book; whatever happens, the
    // consumer is cancelled before its actor stops, and everything stops.
    let client = exchange(addr, orders, rounds).await;
    let stats = match &client {
        Ok(client) => drained(&broker, client.accepted.len() as u64).await,
        Err(_) => broker.queue_stats(QUEUE).await.map(|s| s.stats),
    };
    let ledger = web.book.send(GetLedger).await;
    let report = consumer.report();
    consumer.cancel().await;
    web.stop().await;
    let Client {
        bad_bodies,
        accepted,
        pending,
        answered_503,
        without_retry_after,
        other_answers,
        rounds: log,
    } = client?;
    let (stats, ledger) = (stats?, ledger?);

    let mut summary = Summary::new(
        "actix-web orders: HTTP 503 + Retry-After when the queue is full, an actix actor consuming",
    );
    summary.line(format!(
        "POST http://{addr}/orders -> queue {QUEUE:?} (max_length {max_length}, overflow block, inbox {inbox}) -> actix OrderBook at {} ms an order",
        pace.as_millis()
    ));
    for (i, round) in log.iter().enumerate() {
        let when = if i == 0 {
            "burst".to_string()
        } else {
            format!("retry after {} s", round.waited_before.as_secs())
        };
        summary.line(format!(
            "round {} ({when}): {} POSTs in {} ms: {} x 202, {} x 503",
            i + 1,
            round.sent,
            round.took.as_millis(),
            round.accepted,
            round.refused,
        ));
    }
    summary.line(format!(
        "OrderBook booked {} orders, turned away {} first attempts (Err -> requeued, booked on redelivery); {} of work in {}",
        ledger.booked.len(),
        ledger.turned_away,
        secs(ledger.busy_time),
        secs(started.elapsed()),
    ));
    summary.line(format!(
        "queue: published {}, delivered {}, acknowledged {}, requeued {}, ready {}, unacked {}; consumer: {} handled, {} errors, {} crashes",
        stats.published,
        stats.delivered,
        stats.acknowledged,
        stats.requeued,
        stats.ready,
        stats.unacked,
        report.handled,
        report.errors,
        report.crashes,
    ));

    let booked_once = ledger.booked.values().all(|&n| n == 1)
        && ledger.booked.keys().copied().eq(accepted.iter().copied());
    summary.check(
        format!(
            "every accepted order ({}) booked by the actor exactly once, and acknowledged ({})",
            accepted.len(),
            stats.acknowledged
        ),
        booked_once && stats.acknowledged == accepted.len() as u64,
    );
    summary.check(
        format!("every 503 ({answered_503}) carried Retry-After and a JSON error"),
        without_retry_after == 0,
    );
    summary.check(
        format!(
            "nothing lost: {} accepted + {} still refused (503) = {orders} sent, no other answer, queue empty",
            accepted.len(),
            pending.len()
        ),
        accepted.len() + pending.len() == orders as usize
            && other_answers.is_empty()
            && stats.published == accepted.len() as u64
            && stats.ready + stats.unacked + stats.delayed == 0,
    );
    summary.check(
        format!(
            "the actor's Err replies ({}) were requeued, not acknowledged (requeued {})",
            ledger.turned_away, stats.requeued
        ),
        stats.requeued == u64::from(ledger.turned_away) && stats.rejected == 0,
    );
    let bad_ok = bad_bodies
        .iter()
        .filter(|a| a.status == 400 && a.json_error().is_some())
        .count();
    summary.check(
        format!(
            "bad bodies answered 400 with a JSON error ({bad_ok} of {})",
            bad_bodies.len()
        ),
        bad_ok == bad_bodies.len(),
    );
    Ok(summary)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let flags = Flags::from_args();
    let rt = Runtime::new()?;
    let summary = run(&rt.handle(), &flags).await?;
    rt.shutdown();
    summary.exit()
}
