//! The HTTP API: routes, handlers, the JSON shapes (RabbitMQ's management
//! API's where they fit) and the typed error every refusal becomes.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State as Extract};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytestring::ByteString;
use futures::future::join_all;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::Deserialize;
use serde_json::{Value, json};

use super::state::{Crash, State};
use super::{AdminOptions, assets, guard};
use crate::envelope::{Envelope, HeaderValue as Header};
use crate::error::{BrokerError, PublishError};
use crate::exchange::Destination;
use crate::monitor::{AlertKind, QueueSample, Rates, Sample};
use crate::name::{NameKind, validate_name};
use crate::queue::ack::AckMode;
use crate::queue::actor::QueueSnapshot;
use crate::queue::options::{DeleteOptions, QueueOptions};

/// How long after its last crash a consumer that has not registered again
/// is listed as restarting (the default supervision's window).
const RESTARTING_WINDOW_MS: u64 = 60_000;
/// Most messages one `get` returns.
const MAX_GET: usize = 100;
/// Payload bytes shown per message by `get` unless `truncate` says fewer.
const MAX_SHOWN_PAYLOAD: usize = 50_000;

type Shared = Extract<Arc<State>>;

/// The routes, behind the guard and the body limit.
pub(super) fn router(state: Arc<State>, options: &AdminOptions) -> Router {
    let mut routes = Router::new()
        .route("/api/overview", get(overview))
        .route("/api/queues", get(queues))
        .route("/api/exchanges", get(exchanges))
        .route("/api/bindings", get(bindings))
        .route("/api/consumers", get(consumers))
        .route("/api/crashes", get(crashes))
        .route("/api/streams", get(streams))
        .route("/api/alerts", get(alerts))
        .route("/api/deaths", get(deaths))
        .route("/metrics", get(metrics))
        .route("/", get(assets::index))
        .route("/dashboard.js", get(assets::script))
        .route("/dashboard.css", get(assets::style));
    // Without a vhost, and under RabbitMQ's default one ("/", encoded).
    for prefix in ["", "/%2F", "/%2f"] {
        routes = routes
            .route(
                &format!("/api/queues{prefix}/{{name}}"),
                get(queue).delete(delete_queue),
            )
            .route(
                &format!("/api/queues{prefix}/{{name}}/contents"),
                delete(purge),
            )
            .route(
                &format!("/api/queues{prefix}/{{name}}/get"),
                post(get_messages),
            )
            .route(
                &format!("/api/exchanges{prefix}/{{name}}/publish"),
                post(publish),
            );
        if !prefix.is_empty() {
            routes = routes
                .route(&format!("/api/queues{prefix}"), get(queues))
                .route(&format!("/api/exchanges{prefix}"), get(exchanges));
        }
    }
    routes
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard::guard))
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .with_state(state)
}

/// A refusal: a status and RabbitMQ's error body.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    error: &'static str,
    reason: String,
    /// Seconds, for 429.
    pub(super) retry_after: Option<u64>,
    /// Whether to send `WWW-Authenticate: Bearer` (401).
    pub(super) challenge: bool,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            reason: reason.into(),
            retry_after: None,
            challenge: false,
        }
    }

    fn bad_request(reason: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.error, "reason": self.reason });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<BrokerError> for ApiError {
    fn from(err: BrokerError) -> Self {
        let status = match &err {
            BrokerError::QueueNotFound(_) | BrokerError::ExchangeNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            BrokerError::QueueInUse { .. }
            | BrokerError::QueueNotEmpty { .. }
            | BrokerError::ExclusiveConsumer { .. }
            | BrokerError::Duplicate(_) => StatusCode::CONFLICT,
            BrokerError::MessageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BrokerError::Stopped | BrokerError::QueueFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            BrokerError::Backend(_) | BrokerError::Unconfirmed(_) | BrokerError::Storage(_) => {
                StatusCode::BAD_GATEWAY
            }
            BrokerError::Unsupported { .. } => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        };
        let error = match status {
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::CONFLICT => "conflict",
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::NOT_IMPLEMENTED => "unsupported",
            _ => "unavailable",
        };
        ApiError::new(status, error, err.to_string())
    }
}

impl From<PublishError> for ApiError {
    fn from(err: PublishError) -> Self {
        match err {
            PublishError::Refused(err) => err.into(),
            unroutable @ PublishError::Unroutable { .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "unroutable",
                unroutable.to_string(),
            ),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(value: Value) -> ApiResult {
    Ok(axum::Json(value).into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such page or API path",
    )
}

/// A queue name from the path, checked.
fn queue_name(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(name) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    validate_name(NameKind::Queue, &name).map_err(BrokerError::from)?;
    Ok(name)
}

/// A JSON body (an empty one is `T::default()`).
fn body<T: for<'de> Deserialize<'de> + Default>(
    bytes: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = bytes.map_err(|e| {
        let status = e.status();
        let error = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        };
        ApiError::new(status, error, e.body_text())
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn rate(value: f64) -> Value {
    json!({ "rate": (value * 10.0).round() / 10.0 })
}

fn message_stats(published: u64, delivered: u64, acked: u64, redelivered: u64, r: Rates) -> Value {
    json!({
        "publish": published, "publish_details": rate(r.publish),
        "deliver_get": delivered, "deliver_get_details": rate(r.deliver),
        "ack": acked, "ack_details": rate(r.ack),
        "redeliver": redelivered, "redeliver_details": rate(r.redeliver),
    })
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// RabbitMQ's `x-` arguments for what these options set.
fn arguments(o: &QueueOptions) -> Value {
    let mut args = serde_json::Map::new();
    let mut put = |key: &str, value: Value| {
        args.insert(key.to_string(), value);
    };
    if let Some(ttl) = o.message_ttl {
        put("x-message-ttl", json!(ms(ttl)));
    }
    if let Some(expires) = o.expires {
        put("x-expires", json!(ms(expires)));
    }
    if let Some(n) = o.max_length {
        put("x-max-length", json!(n));
    }
    if let Some(n) = o.max_length_bytes {
        put("x-max-length-bytes", json!(n));
    }
    if let Some(n) = o.delivery_limit {
        put("x-delivery-limit", json!(n));
    }
    if let Some(x) = &o.dead_letter_exchange {
        put("x-dead-letter-exchange", json!(x));
    }
    if let Some(k) = &o.dead_letter_routing_key {
        put("x-dead-letter-routing-key", json!(k));
    }
    if let Some(p) = o.max_priority {
        put("x-max-priority", json!(p));
    }
    if o.single_active_consumer {
        put("x-single-active-consumer", json!(true));
    }
    put(
        "x-overflow",
        serde_json::to_value(o.overflow).unwrap_or(Value::Null),
    );
    Value::Object(args)
}

fn queue_json(
    snap: &QueueSnapshot,
    options: Option<&QueueOptions>,
    sample: Option<&QueueSample>,
) -> Value {
    let s = &snap.stats;
    let rates = sample.and_then(|q| q.rates).unwrap_or_default();
    let state = if snap.waiting_publishes > 0 {
        "flow"
    } else {
        "running"
    };
    json!({
        "name": &*snap.name,
        "vhost": "/",
        "type": "classic",
        "state": state,
        "durable": options.is_some_and(|o| o.durable),
        "auto_delete": false,
        "arguments": options.map(arguments).unwrap_or_else(|| json!({})),
        "messages": s.ready + s.unacked,
        "messages_ready": s.ready,
        "messages_unacknowledged": s.unacked,
        "message_bytes_ready": s.ready_bytes,
        "consumers": s.consumers,
        "head_message_age_ms": sample.and_then(|q| q.head_age_ms),
        "message_stats": message_stats(s.published, s.delivered, s.acknowledged, s.redelivered, rates),
        "dead_lettered": snap.dead_lettered,
        "dead_letters_dropped": snap.dead_letters_dropped,
        "waiting_publishes": snap.waiting_publishes,
        "recent_crashes": sample.map_or(0, |q| q.recent_crashes),
        "stats": s,
    })
}

/// Every queue's snapshot, asked concurrently; queues deleted meanwhile are
/// left out.
async fn snapshots(state: &State) -> Vec<QueueSnapshot> {
    let names = state.broker.queue_names();
    join_all(names.iter().map(|n| state.broker.queue_stats(n)))
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect()
}

/// What a request reads besides the queues' snapshots, gathered once per
/// request rather than once per queue: the latest sample, indexed by queue,
/// the queues whose consumers are crash-looping, and each queue's latest
/// crash within the restarting window.
struct Seen {
    latest: Option<Arc<Sample>>,
    by_queue: FxHashMap<String, usize>,
    crash_looping: FxHashSet<String>,
    last_crash: FxHashMap<String, Crash>,
}

impl Seen {
    fn gather(state: &State) -> Seen {
        let latest = state.monitor.latest();
        let by_queue = latest.iter().flat_map(|l| l.queues.iter().enumerate());
        let by_queue = by_queue.map(|(i, q)| (q.name.clone(), i)).collect();
        let crash_looping = state
            .monitor
            .firing()
            .into_iter()
            .filter(|a| matches!(a.kind, AlertKind::CrashLooping { .. }))
            .map(|a| a.queue)
            .collect();
        let since = postbox::clock::now_ms().saturating_sub(RESTARTING_WINDOW_MS);
        let mut last_crash = FxHashMap::default();
        // Oldest first: a later crash of a queue replaces an earlier one.
        for crash in state.events.crashes.lock().iter() {
            if crash.at_ms >= since {
                last_crash.insert(crash.queue.clone(), crash.clone());
            }
        }
        Seen {
            latest,
            by_queue,
            crash_looping,
            last_crash,
        }
    }

    /// Queue `name` in the latest sample.
    fn sample(&self, name: &str) -> Option<&QueueSample> {
        let i = *self.by_queue.get(name)?;
        self.latest.as_ref()?.queues.get(i)
    }
}

async fn overview(Extract(state): Shared) -> ApiResult {
    let snaps = snapshots(&state).await;
    let latest = state.monitor.latest();
    let mut totals = Rates::default();
    for q in latest.iter().flat_map(|s| s.queues.iter()) {
        let r = q.rates.unwrap_or_default();
        totals.publish += r.publish;
        totals.deliver += r.deliver;
        totals.ack += r.ack;
        totals.redeliver += r.redeliver;
    }
    let sum = |f: fn(&QueueSnapshot) -> u64| snaps.iter().map(f).sum::<u64>();
    let ready = sum(|q| q.stats.ready as u64);
    let unacked = sum(|q| q.stats.unacked as u64);
    let stats = message_stats(
        sum(|q| q.stats.published),
        sum(|q| q.stats.delivered),
        sum(|q| q.stats.acknowledged),
        sum(|q| q.stats.redelivered),
        totals,
    );
    let history: Vec<_> = state.history.lock().totals.iter().copied().collect();
    ok(json!({
        "product_name": "postbox",
        "product_version": env!("CARGO_PKG_VERSION"),
        "backend": format!("{:?}", state.broker.backend()).to_lowercase(),
        "object_totals": {
            "queues": snaps.len(),
            "exchanges": state.broker.exchanges().len(),
            "streams": state.broker.stream_names().len(),
            "consumers": sum(|q| q.stats.consumers as u64),
        },
        "queue_totals": {
            "messages": ready + unacked,
            "messages_ready": ready,
            "messages_unacknowledged": unacked,
        },
        "message_stats": stats,
        "dead_lettered": sum(|q| q.dead_lettered),
        "alerts_firing": state.monitor.firing().len(),
        "sampled_at_ms": latest.as_ref().map(|s| s.at_ms),
        "history": history,
    }))
}

async fn queues(Extract(state): Shared) -> ApiResult {
    let snaps = snapshots(&state).await;
    let seen = Seen::gather(&state);
    let list: Vec<Value> = snaps
        .iter()
        .map(|snap| {
            let options = state.broker.queue_options(&snap.name).ok();
            queue_json(snap, options.as_ref(), seen.sample(&snap.name))
        })
        .collect();
    ok(Value::Array(list))
}

async fn queue(Extract(state): Shared, path: Result<Path<String>, PathRejection>) -> ApiResult {
    let name = queue_name(path)?;
    let snap = state.broker.queue_stats(&name).await?;
    let options = state.broker.queue_options(&name).ok();
    let seen = Seen::gather(&state);
    let mut value = queue_json(&snap, options.as_ref(), seen.sample(&name));
    let history: Vec<_> = state
        .history
        .lock()
        .queues
        .get(&name)
        .map(|h| h.iter().copied().collect())
        .unwrap_or_default();
    let deaths = state
        .events
        .deaths
        .lock()
        .counts
        .get(&name)
        .map(|c| {
            c.iter()
                .map(|(r, n)| (r.as_str(), *n))
                .collect::<BTreeMap<_, _>>()
        })
        .unwrap_or_default();
    if let Value::Object(map) = &mut value {
        map.insert(
            "consumer_details".into(),
            Value::Array(consumer_list(&snap, &seen)),
        );
        map.insert("history".into(), json!(history));
        map.insert("deaths".into(), json!(deaths));
    }
    ok(value)
}

/// A queue's consumers: the registered ones, and, when the queue's latest
/// crash (within the last minute) was of a registration that has not come
/// back, a row for the consumer restarting or backing off in a crash loop,
/// which the queue itself no longer lists. (A restarted consumer registers
/// under a new tag, as a RabbitMQ client consuming again would.)
fn consumer_list(snap: &QueueSnapshot, seen: &Seen) -> Vec<Value> {
    let crash_looping = seen.crash_looping.contains(&*snap.name);
    let recent_crashes = seen.sample(&snap.name).map_or(0, |q| q.recent_crashes);
    let mut list: Vec<Value> = snap
        .consumers
        .iter()
        .map(|c| {
            json!({
                "queue": { "name": &*snap.name, "vhost": "/" },
                "consumer_tag": c.id.to_string(),
                "ack_required": c.mode != AckMode::Auto,
                "prefetch_count": c.prefetch,
                "active": c.active,
                "activity_status": if c.blocked { "blocked" } else if c.active { "up" } else { "waiting" },
                "unacked": c.unacked,
                "delivered": c.delivered,
                "restarts": Value::Null,
                "last_failure": Value::Null,
                "queue_recent_crashes": recent_crashes,
                "crash_looping": crash_looping,
            })
        })
        .collect();
    if let Some(crash) = seen.last_crash.get(&*snap.name)
        && !snap.consumers.iter().any(|c| c.id == crash.consumer)
    {
        list.push(json!({
            "queue": { "name": &*snap.name, "vhost": "/" },
            "consumer_tag": crash.consumer.to_string(),
            "ack_required": Value::Null,
            "prefetch_count": Value::Null,
            "active": false,
            "activity_status": "restarting",
            "unacked": 0,
            "delivered": Value::Null,
            "restarts": crash.restarts + 1,
            "last_failure": crash.failure,
            "queue_recent_crashes": recent_crashes,
            "crash_looping": crash_looping,
        }));
    }
    list
}

async fn consumers(Extract(state): Shared) -> ApiResult {
    let snaps = snapshots(&state).await;
    let seen = Seen::gather(&state);
    let all = snaps.iter().flat_map(|snap| consumer_list(snap, &seen));
    ok(Value::Array(all.collect()))
}

async fn crashes(Extract(state): Shared) -> ApiResult {
    let recent: Vec<_> = state.events.crashes.lock().iter().rev().cloned().collect();
    ok(json!(recent))
}

async fn exchanges(Extract(state): Shared) -> ApiResult {
    let mut list = vec![json!({
        "name": "", "vhost": "/", "type": "direct", "durable": true, "internal": false,
        "arguments": {},
    })];
    for (name, o) in state.broker.exchanges() {
        let mut args = serde_json::Map::new();
        if let Some(alternate) = &o.alternate_exchange {
            args.insert("alternate-exchange".into(), json!(alternate));
        }
        list.push(json!({
            "name": name,
            "vhost": "/",
            "type": serde_json::to_value(o.kind).unwrap_or(Value::Null),
            "durable": o.durable,
            "internal": false,
            "arguments": args,
        }));
    }
    ok(Value::Array(list))
}

async fn bindings(Extract(state): Shared) -> ApiResult {
    // The default exchange's implicit binding of every queue, as RabbitMQ
    // lists them.
    let mut list: Vec<Value> = state
        .broker
        .queue_names()
        .into_iter()
        .map(|q| {
            json!({
                "source": "", "vhost": "/", "destination": q, "destination_type": "queue",
                "routing_key": q, "arguments": {},
            })
        })
        .collect();
    for (exchange, _) in state.broker.exchanges() {
        for b in state.broker.bindings(&exchange).unwrap_or_default() {
            let (kind, destination) = match &b.destination {
                Destination::Queue(n) => ("queue", n),
                Destination::Exchange(n) => ("exchange", n),
                Destination::Stream(n) => ("stream", n),
            };
            let arguments: serde_json::Map<String, Value> = b
                .arguments
                .iter()
                .map(|(k, v)| (k.to_string(), header_json(v)))
                .collect();
            list.push(json!({
                "source": exchange, "vhost": "/", "destination": &**destination,
                "destination_type": kind, "routing_key": &*b.key, "arguments": arguments,
            }));
        }
    }
    ok(Value::Array(list))
}

async fn streams(Extract(state): Shared) -> ApiResult {
    let latest = state.monitor.latest();
    let rates: FxHashMap<&str, f64> = latest
        .iter()
        .flat_map(|l| l.streams.iter())
        .filter_map(|x| Some((x.name.as_str(), x.publish_rate?)))
        .collect();
    let mut list = Vec::new();
    for name in state.broker.stream_names() {
        let Ok(stream) = state.broker.stream(&name) else {
            continue;
        };
        let s = stream.stats();
        let subscribers: Vec<Value> = stream
            .subscribers()
            .into_iter()
            .map(|(name, sub)| {
                json!({
                    "name": name, "offset": sub.offset, "lag": sub.lag,
                    "delivered": sub.delivered, "skipped": sub.skipped,
                    "redeliveries": sub.redeliveries,
                })
            })
            .collect();
        let publish_rate = rates.get(name.as_str()).copied().unwrap_or(0.0);
        list.push(json!({
            "name": name,
            "vhost": "/",
            "type": "stream",
            "messages": s.len,
            "bytes": s.bytes,
            "first_offset": s.first_offset,
            "next_offset": s.next_offset,
            "published": s.published,
            "publish_details": rate(publish_rate),
            "trimmed": s.trimmed,
            "blocked": s.blocked,
            "max_lag": subscribers.iter().filter_map(|x| x["lag"].as_u64()).max().unwrap_or(0),
            "subscribers": subscribers,
        }));
    }
    ok(Value::Array(list))
}

async fn alerts(Extract(state): Shared) -> ApiResult {
    let recent: Vec<_> = state.history.lock().alerts.iter().rev().cloned().collect();
    ok(json!({ "firing": state.monitor.firing(), "recent": recent }))
}

/// Dead-lettering by source queue and reason, where each queue's dead
/// letters go, and the latest ones.
async fn deaths(Extract(state): Shared) -> ApiResult {
    let (counts, recent) = {
        let log = state.events.deaths.lock();
        let counts: BTreeMap<String, BTreeMap<&'static str, u64>> = log
            .counts
            .iter()
            .map(|(q, c)| (q.clone(), c.iter().map(|(r, n)| (r.as_str(), *n)).collect()))
            .collect();
        (counts, log.recent.iter().rev().cloned().collect::<Vec<_>>())
    };
    let routes: Vec<Value> = state
        .broker
        .queue_names()
        .into_iter()
        .filter_map(|q| {
            let o = state.broker.queue_options(&q).ok()?;
            let exchange = o.dead_letter_exchange?;
            Some(json!({
                "queue": q,
                "dead_letter_exchange": exchange,
                "dead_letter_routing_key": o.dead_letter_routing_key,
            }))
        })
        .collect();
    ok(json!({ "by_queue": counts, "routes": routes, "recent": recent }))
}

async fn metrics(Extract(state): Shared) -> Response {
    match &state.metrics {
        Some(render) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no metrics renderer is configured (AdminOptions::metrics)",
        )
        .into_response(),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default, rename = "if-unused")]
    if_unused: bool,
    #[serde(default, rename = "if-empty")]
    if_empty: bool,
}

async fn delete_queue(
    Extract(state): Shared,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> ApiResult {
    let name = queue_name(path)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let options = DeleteOptions {
        if_unused: q.if_unused,
        if_empty: q.if_empty,
    };
    let last = state.broker.delete_queue(&name, options).await?;
    tracing::info!(queue = %name, dropped = last.stats.ready, "queue deleted through the admin API");
    state.monitor.sample_now();
    ok(json!({ "deleted": name, "messages_dropped": last.stats.ready }))
}

async fn purge(Extract(state): Shared, path: Result<Path<String>, PathRejection>) -> ApiResult {
    let name = queue_name(path)?;
    let purged = state.broker.purge_queue(&name).await?;
    tracing::info!(queue = %name, purged, "queue purged through the admin API");
    state.monitor.sample_now();
    ok(json!({ "queue": name, "messages_purged": purged }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBody {
    #[serde(default = "one")]
    count: usize,
    #[serde(default = "requeue")]
    ackmode: String,
    #[serde(default = "auto")]
    encoding: String,
    #[serde(default)]
    truncate: Option<usize>,
}

fn one() -> usize {
    1
}
fn requeue() -> String {
    "ack_requeue_true".into()
}
fn auto() -> String {
    "auto".into()
}

impl Default for GetBody {
    fn default() -> Self {
        GetBody {
            count: one(),
            ackmode: requeue(),
            encoding: auto(),
            truncate: None,
        }
    }
}

/// Takes up to `count` messages from the head and puts them all back where
/// they were: an inspection, never a consumption.
async fn get_messages(
    Extract(state): Shared,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let name = queue_name(path)?;
    let req: GetBody = body(bytes)?;
    if !(1..=MAX_GET).contains(&req.count) {
        return Err(ApiError::bad_request(format!(
            "count must be 1 to {MAX_GET}"
        )));
    }
    if !matches!(
        req.ackmode.as_str(),
        "ack_requeue_true" | "reject_requeue_true"
    ) {
        return Err(ApiError::bad_request(
            "ackmode must be ack_requeue_true or reject_requeue_true: an inspection never consumes",
        ));
    }
    let base64_only = match req.encoding.as_str() {
        "auto" => false,
        "base64" => true,
        _ => return Err(ApiError::bad_request("encoding must be auto or base64")),
    };
    let shown = req
        .truncate
        .unwrap_or(MAX_SHOWN_PAYLOAD)
        .min(MAX_SHOWN_PAYLOAD);
    let mut held = Vec::new();
    let mut out = Vec::new();
    let mut failure = None;
    while held.len() < req.count {
        match state.broker.get(&name, AckMode::Manual).await {
            Ok(Some((delivery, remaining))) => {
                out.push(message_json(
                    delivery.message(),
                    remaining,
                    base64_only,
                    shown,
                ));
                held.push(delivery);
            }
            Ok(None) => break,
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    // Back to their places, whatever happened above.
    for delivery in &held {
        if let Err(err) = delivery.nack(true).await {
            tracing::warn!(queue = %name, error = %err, "an inspected message could not be requeued");
        }
    }
    match failure {
        Some(err) if held.is_empty() => Err(err.into()),
        _ => ok(Value::Array(out)),
    }
}

fn header_json(v: &Header) -> Value {
    match v {
        Header::Str(s) => json!(&**s),
        Header::Int(i) => json!(i),
        Header::Bool(b) => json!(b),
        Header::Float(f) => json!(f),
        Header::Bytes(b) => json!(BASE64.encode(b)),
        Header::Void => Value::Null,
    }
}

fn message_json(m: &Envelope, remaining: usize, base64_only: bool, shown: usize) -> Value {
    let payload = m.payload();
    let cut = &payload[..payload.len().min(shown)];
    let (text, encoding) = match std::str::from_utf8(cut) {
        Ok(s) if !base64_only => (s.to_string(), "string"),
        _ => (BASE64.encode(cut), "base64"),
    };
    let headers: serde_json::Map<String, Value> = m
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), header_json(v)))
        .collect();
    let deaths: Vec<Value> = m
        .deaths()
        .iter()
        .map(|d| {
            json!({
                "queue": &*d.queue, "reason": d.reason.as_str(), "count": d.count,
                "time_ms": d.time_ms, "exchange": &*d.exchange,
                "routing-keys": d.routing_keys.iter().map(|k| &**k).collect::<Vec<&str>>(),
            })
        })
        .collect();
    json!({
        "payload": text,
        "payload_encoding": encoding,
        "payload_bytes": payload.len(),
        "payload_truncated": cut.len() < payload.len(),
        "redelivered": m.redelivered(),
        "exchange": m.exchange(),
        "routing_key": m.routing_key(),
        "message_count": remaining,
        "properties": {
            "message_id": m.id().to_string(),
            "correlation_id": m.correlation_id(),
            "reply_to": m.reply_to(),
            "content_type": m.content_type(),
            "priority": m.priority(),
            "timestamp_ms": m.timestamp_ms(),
            "expiration": m.expiration().map(|d| ms(d).to_string()),
            "delivery_count": m.delivery_count(),
            "headers": headers,
        },
        "deaths": deaths,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    #[serde(default)]
    routing_key: String,
    payload: String,
    #[serde(default = "string_encoding")]
    payload_encoding: String,
    #[serde(default)]
    properties: PublishProperties,
}

fn string_encoding() -> String {
    "string".into()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PublishProperties {
    content_type: Option<String>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    priority: Option<u8>,
    /// Milliseconds, as a string (AMQP's expiration).
    expiration: Option<String>,
    /// 2: persistent.
    delivery_mode: Option<u8>,
    #[serde(default)]
    headers: BTreeMap<String, Value>,
}

/// Publishes a test message through an exchange (`amq.default`: the
/// default exchange, where the routing key names the queue).
async fn publish(
    Extract(state): Shared,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Path(exchange) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let exchange = if exchange == "amq.default" {
        String::new()
    } else {
        exchange
    };
    if !exchange.is_empty() {
        validate_name(NameKind::Exchange, &exchange).map_err(BrokerError::from)?;
    }
    let req: PublishBody = body(bytes)?;
    let payload = match req.payload_encoding.as_str() {
        "string" => Bytes::from(req.payload),
        "base64" => Bytes::from(
            BASE64
                .decode(req.payload.as_bytes())
                .map_err(|e| ApiError::bad_request(format!("payload is not base64: {e}")))?,
        ),
        _ => {
            return Err(ApiError::bad_request(
                "payload_encoding must be string or base64",
            ));
        }
    };
    let mut message = Envelope::new(payload);
    let p = req.properties;
    if let Some(v) = p.content_type {
        message = message.with_content_type(v);
    }
    if let Some(v) = p.correlation_id {
        message = message.with_correlation_id(v);
    }
    if let Some(v) = p.reply_to {
        message = message.with_reply_to(v);
    }
    if let Some(v) = p.priority {
        message = message.with_priority(v);
    }
    if let Some(v) = p.expiration {
        let ms: u64 = v
            .parse()
            .map_err(|_| ApiError::bad_request("expiration must be milliseconds, as a string"))?;
        message = message.with_expiration(std::time::Duration::from_millis(ms));
    }
    match p.delivery_mode {
        None | Some(1) => {}
        Some(2) => message = message.with_persistent(true),
        Some(_) => return Err(ApiError::bad_request("delivery_mode must be 1 or 2")),
    }
    for (key, value) in p.headers {
        let value = match value {
            Value::String(s) => Header::Str(ByteString::from(s)),
            Value::Bool(b) => Header::Bool(b),
            Value::Null => Header::Void,
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => Header::Int(i),
                (None, Some(f)) => Header::Float(f),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "header {key:?}: number out of range"
                    )));
                }
            },
            _ => {
                return Err(ApiError::bad_request(format!(
                    "header {key:?}: only strings, numbers, booleans and null"
                )));
            }
        };
        message = message.with_header(key, value);
    }
    let routed = state
        .broker
        .publish_to(&exchange, &req.routing_key, message)
        .await?;
    state.monitor.sample_now();
    ok(json!({ "routed": routed > 0, "destinations": routed }))
}
