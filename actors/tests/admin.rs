//! The admin HTTP API over real HTTP on a loopback port: the shapes of its
//! answers, the token (none, wrong, right), mutations off by default, and
//! bad input (unknown queue, invalid names, oversize and malformed bodies),
//! each a 4xx with a JSON reason and nothing lost.

#![cfg(feature = "admin")]

use std::net::SocketAddr;
use std::time::Duration;

use postbox::Runtime;
use postbox_actors::admin::{AdminError, AdminOptions, AdminServer};
use postbox_actors::monitor::{MonitorOptions, Thresholds};
use postbox_actors::{
    Broker, ConsumeOptions, Delivery, Envelope, ExchangeKind, ExchangeOptions, QueueOptions,
    StreamDelivery, StreamOptions, StreamStart, SubscribeOptions,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TOKEN: &str = "a-token-of-some-length-0123456789";

struct Fixture {
    broker: Broker,
    server: AdminServer,
    http: reqwest::Client,
    // Last: the broker's actors stop when it drops.
    _rt: Runtime,
}

impl Fixture {
    async fn start(options: AdminOptions) -> Result<Fixture, Box<dyn std::error::Error>> {
        let rt = Runtime::new()?;
        let broker = Broker::new(&rt.handle());
        let options = options.bind(SocketAddr::from(([127, 0, 0, 1], 0)));
        let server = AdminServer::start(&broker, options).await?;
        Ok(Fixture {
            broker,
            server,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            _rt: rt,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.server.local_addr(), path)
    }

    async fn get(&self, path: &str) -> Result<(StatusCode, Value), reqwest::Error> {
        let response = self.http.get(self.url(path)).send().await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), reqwest::Error> {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }
}

fn mutable() -> AdminOptions {
    AdminOptions::default().token(TOKEN).mutations(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_in_rabbitmqs_shapes() -> TestResult {
    let f = Fixture::start(mutable().metrics(|| "postbox_up 1\n".to_string())).await?;
    let b = &f.broker;
    b.declare_queue("orders.dead", QueueOptions::default())
        .await?;
    b.declare_queue(
        "orders",
        QueueOptions::default()
            .dead_letter_exchange("")
            .dead_letter_routing_key("orders.dead"),
    )
    .await?;
    b.declare_exchange("events", ExchangeOptions::new(ExchangeKind::Topic))
        .await?;
    b.bind_queue("orders", "events", "order.*").await?;
    let audit = b.declare_stream("audit", StreamOptions::default()).await?;
    for n in 0..3 {
        b.publish("orders", Envelope::new(format!("order {n}")))
            .await?;
        audit.publish(Envelope::new(format!("record {n}"))).await?;
    }
    // A subscriber that reads nothing yet: three records behind.
    let (gate, wait) = tokio::sync::watch::channel(false);
    let _auditor = audit
        .subscribe(
            StreamStart::First,
            SubscribeOptions::default().named("auditor"),
            move || {
                let wait = wait.clone();
                move |_d: StreamDelivery| {
                    let mut wait = wait.clone();
                    async move {
                        let _ = wait.wait_for(|open| *open).await;
                        Ok(())
                    }
                }
            },
        )
        .await?;

    let (status, overview) = f.get("/api/overview").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(overview["product_name"], "postbox");
    assert_eq!(overview["backend"], "embedded");
    assert_eq!(overview["object_totals"]["queues"], 2);
    assert_eq!(overview["object_totals"]["exchanges"], 1);
    assert_eq!(overview["object_totals"]["streams"], 1);
    assert_eq!(overview["queue_totals"]["messages_ready"], 3);
    assert_eq!(overview["message_stats"]["publish"], 3);

    let (status, queues) = f.get("/api/queues").await?;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = queues
        .as_array()
        .ok_or("not an array")?
        .iter()
        .filter_map(|q| q["name"].as_str())
        .collect();
    assert_eq!(names, ["orders", "orders.dead"]);

    for path in ["/api/queues/orders", "/api/queues/%2F/orders"] {
        let (status, q) = f.get(path).await?;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(q["name"], "orders");
        assert_eq!(q["vhost"], "/");
        assert_eq!(q["messages"], 3);
        assert_eq!(q["messages_ready"], 3);
        assert_eq!(q["messages_unacknowledged"], 0);
        assert_eq!(q["consumers"], 0);
        assert_eq!(q["arguments"]["x-dead-letter-exchange"], "");
        assert_eq!(q["arguments"]["x-dead-letter-routing-key"], "orders.dead");
        assert_eq!(q["message_stats"]["publish"], 3);
        assert!(q["consumer_details"].is_array());
        assert!(q["history"].is_array());
    }

    let (_, exchanges) = f.get("/api/exchanges").await?;
    let events = exchanges
        .as_array()
        .ok_or("not an array")?
        .iter()
        .find(|e| e["name"] == "events")
        .ok_or("no events exchange")?;
    assert_eq!(events["type"], "topic");
    assert!(
        exchanges[0]["name"] == "",
        "the default exchange is listed first"
    );

    let (_, bindings) = f.get("/api/bindings").await?;
    assert!(bindings.as_array().ok_or("not an array")?.contains(&json!({
        "source": "events", "vhost": "/", "destination": "orders",
        "destination_type": "queue", "routing_key": "order.*", "arguments": {},
    })));

    let (_, streams) = f.get("/api/streams").await?;
    assert_eq!(streams[0]["name"], "audit");
    assert_eq!(streams[0]["messages"], 3);
    assert_eq!(streams[0]["next_offset"], 3);
    assert_eq!(streams[0]["subscribers"][0]["name"], "auditor");
    assert_eq!(streams[0]["subscribers"][0]["lag"], 3);
    assert_eq!(streams[0]["max_lag"], 3);
    let _ = gate.send(true);

    let (status, alerts) = f.get("/api/alerts").await?;
    assert_eq!(status, StatusCode::OK);
    assert!(alerts["firing"].is_array() && alerts["recent"].is_array());

    let (_, deaths) = f.get("/api/deaths").await?;
    assert_eq!(deaths["routes"][0]["queue"], "orders");
    assert_eq!(
        deaths["routes"][0]["dead_letter_routing_key"],
        "orders.dead"
    );

    // The dashboard and its assets are served by the binary itself.
    let page = f.http.get(f.url("/")).send().await?;
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page
        .headers()
        .get("content-security-policy")
        .ok_or("no CSP")?
        .to_str()?
        .to_string();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let html = page.text().await?;
    assert!(
        html.contains("/dashboard.js") && !html.contains("http"),
        "{html}"
    );
    let script = f.http.get(f.url("/dashboard.js")).send().await?;
    assert_eq!(script.status(), StatusCode::OK);

    // Prometheus text from the renderer it was given.
    let metrics = f.http.get(f.url("/metrics")).send().await?;
    assert_eq!(metrics.status(), StatusCode::OK);
    assert_eq!(metrics.text().await?, "postbox_up 1\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_and_dead_letter_reasons_are_listed() -> TestResult {
    let f = Fixture::start(mutable()).await?;
    let b = &f.broker;
    b.declare_queue("work.dead", QueueOptions::default())
        .await?;
    b.declare_queue(
        "work",
        QueueOptions::default()
            .dead_letter_exchange("")
            .dead_letter_routing_key("work.dead"),
    )
    .await?;
    let consumer = b
        .consume("work", ConsumeOptions::manual(8), || {
            |d: Delivery| async move {
                d.reject(false).await?;
                Ok(())
            }
        })
        .await?;
    for n in 0..4 {
        b.publish("work", Envelope::new(format!("job {n}"))).await?;
    }
    // Every job is rejected into the dead-letter queue.
    for _ in 0..200 {
        if b.queue_stats("work.dead").await?.stats.ready == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, consumers) = f.get("/api/consumers").await?;
    let list = consumers.as_array().ok_or("not an array")?;
    assert_eq!(list.len(), 1, "{consumers}");
    assert_eq!(list[0]["queue"]["name"], "work");
    assert_eq!(list[0]["ack_required"], true);
    assert_eq!(list[0]["prefetch_count"], 8);
    assert_eq!(list[0]["delivered"], 4);

    let (_, deaths) = f.get("/api/deaths").await?;
    assert_eq!(deaths["by_queue"]["work"]["rejected"], 4, "{deaths}");
    assert_eq!(deaths["recent"].as_array().ok_or("no recent")?.len(), 4);
    let (_, q) = f.get("/api/queues/work").await?;
    assert_eq!(q["deaths"]["rejected"], 4);
    assert_eq!(q["dead_lettered"], 4);

    // Looking at the dead letters shows their history and keeps them.
    let (status, got) = f
        .send(
            reqwest::Method::POST,
            "/api/queues/work.dead/get",
            Some(TOKEN),
            Some(json!({ "count": 10 })),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{got}");
    let got = got.as_array().ok_or("not an array")?;
    assert_eq!(got.len(), 4);
    assert_eq!(got[0]["payload"], "job 0");
    assert_eq!(got[0]["payload_encoding"], "string");
    assert_eq!(got[0]["deaths"][0]["reason"], "rejected");
    assert_eq!(got[0]["deaths"][0]["queue"], "work");
    let after = b.queue_stats("work.dead").await?.stats;
    assert_eq!(
        (after.ready, after.unacked),
        (4, 0),
        "an inspection consumes nothing"
    );
    // ... in their order.
    let (_, again) = f
        .send(
            reqwest::Method::POST,
            "/api/queues/work.dead/get",
            Some(TOKEN),
            Some(json!({ "count": 4 })),
        )
        .await?;
    let payloads: Vec<&str> = again
        .as_array()
        .ok_or("not an array")?
        .iter()
        .filter_map(|m| m["payload"].as_str())
        .collect();
    assert_eq!(payloads, ["job 0", "job 1", "job 2", "job 3"]);
    consumer.cancel().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_need_the_right_token() -> TestResult {
    let f = Fixture::start(mutable()).await?;
    f.broker
        .declare_queue("inbox", QueueOptions::default())
        .await?;
    for n in 0..5 {
        f.broker
            .publish("inbox", Envelope::new(format!("m{n}")))
            .await?;
    }
    let purge = "/api/queues/inbox/contents";
    let (status, body) = f.send(reqwest::Method::DELETE, purge, None, None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "not_authorized");
    let (status, _) = f
        .send(
            reqwest::Method::DELETE,
            purge,
            Some("a-token-of-some-length-0123456780"),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        f.broker.queue_stats("inbox").await?.stats.ready,
        5,
        "nothing purged"
    );

    let (status, body) = f
        .send(reqwest::Method::DELETE, purge, Some(TOKEN), None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["messages_purged"], 5);
    assert_eq!(f.broker.queue_stats("inbox").await?.stats.ready, 0);

    // Publishing a test message, through the default exchange and by name.
    let (status, body) = f
        .send(
            reqwest::Method::POST,
            "/api/exchanges/%2F/amq.default/publish",
            Some(TOKEN),
            Some(json!({
                "routing_key": "inbox", "payload": "aGVsbG8=", "payload_encoding": "base64",
                "properties": { "correlation_id": "c-1", "headers": { "attempt": 2 } },
            })),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["routed"], true);
    let (delivery, _) = f
        .broker
        .get("inbox", postbox_actors::AckMode::Auto)
        .await?
        .ok_or("nothing published")?;
    assert_eq!(delivery.message().payload().as_ref(), b"hello");
    assert_eq!(delivery.message().correlation_id(), Some("c-1"));

    // Reads stay open; deletion needs the token too.
    assert_eq!(f.get("/api/queues/inbox").await?.0, StatusCode::OK);
    let (status, _) = f
        .send(reqwest::Method::DELETE, "/api/queues/inbox", None, None)
        .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = f
        .send(
            reqwest::Method::DELETE,
            "/api/queues/inbox",
            Some(TOKEN),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert!(f.broker.queue_names().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_are_off_by_default_and_reads_can_be_protected() -> TestResult {
    let f = Fixture::start(AdminOptions::default()).await?;
    f.broker
        .declare_queue("inbox", QueueOptions::default())
        .await?;
    f.broker.publish("inbox", Envelope::new("kept")).await?;
    let (status, body) = f
        .send(
            reqwest::Method::DELETE,
            "/api/queues/inbox/contents",
            Some(TOKEN),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(f.broker.queue_stats("inbox").await?.stats.ready, 1);
    assert_eq!(f.get("/api/queues").await?.0, StatusCode::OK);
    // No renderer, no metrics.
    assert_eq!(f.get("/metrics").await?.0, StatusCode::NOT_FOUND);

    let f = Fixture::start(AdminOptions::default().token(TOKEN).protect_reads(true)).await?;
    assert_eq!(f.get("/api/queues").await?.0, StatusCode::UNAUTHORIZED);
    let (status, _) = f
        .send(reqwest::Method::GET, "/api/queues", Some(TOKEN), None)
        .await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_with_a_reason_and_loses_nothing() -> TestResult {
    let f = Fixture::start(mutable().max_body_bytes(1024)).await?;
    f.broker
        .declare_queue("inbox", QueueOptions::default())
        .await?;
    f.broker.publish("inbox", Envelope::new("kept")).await?;

    let (status, body) = f.get("/api/queues/nope").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
    assert!(
        body["reason"].as_str().is_some_and(|r| r.contains("nope")),
        "{body}"
    );

    let long = "q".repeat(300);
    let (status, body) = f.get(&format!("/api/queues/{long}")).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        f.get("/api/queues/bad%00name").await?.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(f.get("/api/nothing-here").await?.0, StatusCode::NOT_FOUND);

    let post = |path: &'static str, body: Vec<u8>| {
        f.http
            .post(f.url(path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let oversize = serde_json::to_vec(&json!({
        "routing_key": "inbox", "payload": "x".repeat(4096),
    }))?;
    let response = post("/api/exchanges/amq.default/publish", oversize).await?;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let response = post("/api/exchanges/amq.default/publish", b"{not json".to_vec()).await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await?;
    assert!(
        body["reason"].as_str().is_some_and(|r| r.contains("JSON")),
        "{body}"
    );
    let unknown_field = serde_json::to_vec(&json!({ "payload": "x", "colour": "red" }))?;
    let response = post("/api/exchanges/amq.default/publish", unknown_field).await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = post(
        "/api/exchanges/no-such-exchange/publish",
        br#"{"payload":"x"}"#.to_vec(),
    )
    .await?;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let consume = serde_json::to_vec(&json!({ "count": 1, "ackmode": "ack_requeue_false" }))?;
    let response = post("/api/queues/inbox/get", consume).await?;
    assert_eq!(
        response.status(),
        StatusCode::BAD_REQUEST,
        "an inspection never consumes"
    );
    let too_many = serde_json::to_vec(&json!({ "count": 100_000 }))?;
    let response = post("/api/queues/inbox/get", too_many).await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let (status, _) = f
        .send(
            reqwest::Method::DELETE,
            "/api/queues/inbox?if-empty=true",
            Some(TOKEN),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = f
        .send(
            reqwest::Method::DELETE,
            "/api/queues/inbox?if-empty=maybe",
            Some(TOKEN),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A page of another site whose name was rebound to 127.0.0.1.
    let rebound = f
        .http
        .get(f.url("/api/queues"))
        .header("host", "evil.example:15680")
        .send()
        .await?;
    assert_eq!(rebound.status(), StatusCode::MISDIRECTED_REQUEST);
    let named = f
        .http
        .get(f.url("/api/queues"))
        .header("host", "localhost:15680")
        .send()
        .await?;
    assert_eq!(named.status(), StatusCode::OK);

    let stats = f.broker.queue_stats("inbox").await?.stats;
    assert_eq!(
        (stats.ready, stats.published),
        (1, 1),
        "nothing lost, nothing added"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_rate_are_refused_with_429() -> TestResult {
    let options =
        AdminOptions::default().requests_per_second(std::num::NonZeroU32::new(1).ok_or("zero")?);
    let f = Fixture::start(options).await?;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = f.http.get(f.url("/api/overview")).send().await?;
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(response.headers().contains_key("retry-after"));
        }
    }
    // A burst of two, then refusals.
    assert_eq!(&statuses[..2], [StatusCode::OK, StatusCode::OK]);
    assert!(
        statuses[2..].contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_configurations_are_refused_and_the_token_never_printed() -> TestResult {
    let rt = Runtime::new()?;
    let broker = Broker::new(&rt.handle());
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    let refused =
        AdminServer::start(&broker, AdminOptions::default().bind(local).mutations(true)).await;
    assert!(matches!(refused, Err(AdminError::MutationsWithoutToken)));
    let refused = AdminServer::start(
        &broker,
        AdminOptions::default()
            .bind(local)
            .token("short")
            .mutations(true),
    )
    .await;
    assert!(matches!(refused, Err(AdminError::WeakToken)));
    let options = AdminOptions::default().token(TOKEN);
    assert!(!format!("{options:?}").contains(TOKEN));
    assert_eq!(
        options.bind.ip().to_string(),
        "127.0.0.1",
        "loopback unless told otherwise"
    );
    // An address in use is a typed error.
    let first = AdminServer::start(&broker, AdminOptions::default().bind(local)).await?;
    let taken = AdminServer::start(&broker, AdminOptions::default().bind(first.local_addr())).await;
    assert!(matches!(taken, Err(AdminError::Bind { .. })));
    first.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_and_clear_through_the_api() -> TestResult {
    let monitor = MonitorOptions::default()
        .interval(Duration::from_millis(50))
        .thresholds(Thresholds::default().depth(2));
    let f = Fixture::start(mutable().monitor(monitor)).await?;
    f.broker
        .declare_queue("deep", QueueOptions::default())
        .await?;
    for n in 0..3 {
        f.broker
            .publish("deep", Envelope::new(format!("m{n}")))
            .await?;
    }
    let firing = wait_for(&f, |a| {
        a["firing"].as_array().is_some_and(|x| !x.is_empty())
    })
    .await?;
    assert_eq!(firing["firing"][0]["queue"], "deep");
    assert_eq!(firing["firing"][0]["kind"], "depth");
    f.broker.purge_queue("deep").await?;
    let cleared = wait_for(&f, |a| a["firing"].as_array().is_some_and(Vec::is_empty)).await?;
    let recent = cleared["recent"].as_array().ok_or("no recent")?;
    assert_eq!(
        recent[0]["firing"], false,
        "the newest event is the clearing"
    );
    assert_eq!(recent[1]["firing"], true);
    Ok(())
}

async fn wait_for(
    f: &Fixture,
    done: impl Fn(&Value) -> bool,
) -> Result<Value, Box<dyn std::error::Error>> {
    for _ in 0..200 {
        let (_, alerts) = f.get("/api/alerts").await?;
        if done(&alerts) {
            return Ok(alerts);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err("the alerts never reached the expected state".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_consumer_is_listed_with_its_failure() -> TestResult {
    let f = Fixture::start(mutable()).await?;
    f.broker
        .declare_queue("poison", QueueOptions::default())
        .await?;
    let consumer = f
        .broker
        .consume("poison", ConsumeOptions::manual(1), || {
            |_d: Delivery| async move {
                panic!("a poison message");
            }
        })
        .await?;
    f.broker.publish("poison", Envelope::new("bad")).await?;
    let mut listed = Value::Null;
    for _ in 0..200 {
        let (_, consumers) = f.get("/api/consumers").await?;
        let looping = consumers.as_array().and_then(|list| {
            list.iter()
                .find(|c| c["restarts"].as_u64().is_some_and(|r| r >= 2))
                .cloned()
        });
        if let Some(c) = looping {
            listed = c;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(listed["queue"]["name"], "poison", "{listed}");
    assert!(
        listed["last_failure"]
            .as_str()
            .is_some_and(|f| f.contains("a poison message")),
        "{listed}"
    );
    let (_, crashes) = f.get("/api/crashes").await?;
    let newest = &crashes[0];
    assert_eq!(newest["queue"], "poison");
    assert!(newest["restarts"].as_u64().is_some());
    assert!(newest["consumer"].is_string(), "tags are strings: {newest}");
    consumer.cancel().await;
    Ok(())
}
