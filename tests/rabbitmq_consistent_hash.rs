//! postbox's consistent-hash exchange against RabbitMQ's plugin, message by
//! message: the same bindings (weights, an unbind in the middle), the same
//! keys, hashed on the routing key, on headers of every type postbox has,
//! and on properties, must reach the same queues.
//!
//! Runs when `AMQP_URL` is set (`.ci/run` sets it and enables the plugin,
//! `rabbitmq_consistent_hash_exchange`); without it, the test says so and
//! passes, so the README's test command needs no server.

use std::collections::BTreeMap;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use postbox::RuntimeHandle;
use postbox::testkit::local;
use postbox_actors::{
    AckMode, Broker, Envelope, ExchangeOptions, HashOn, HashProperty, HeaderValue, MessageId,
    QueueOptions,
};

/// The queues and weights bound in order; then `UNBOUND` is unbound.
const RING: [(&str, u32); 5] = [("q1", 1), ("q2", 1), ("q3", 2), ("q4", 2), ("q5", 3)];
const UNBOUND: &str = "q2";

/// One test message: its label (the body), routing key, header and
/// properties.
struct Sample {
    label: String,
    routing_key: String,
    header: Option<HeaderValue>,
    id: MessageId,
    correlation: Option<String>,
    timestamp_ms: u64,
}

fn samples() -> Vec<Sample> {
    let mut out = Vec::new();
    for i in 0..120u32 {
        let header = match i % 7 {
            0 => Some(HeaderValue::Str(format!("user-{i}").into())),
            1 => Some(HeaderValue::Int(i64::from(i) * 7919 - 300)),
            2 => Some(HeaderValue::Int(i64::from(i) << 40)),
            3 => Some(HeaderValue::Bool(i % 2 == 0)),
            4 => Some(HeaderValue::Float(f64::from(i) / 8.0)),
            5 => Some(HeaderValue::Bytes(format!("raw-{i}").into_bytes().into())),
            _ => None,
        };
        out.push(Sample {
            label: format!("m{i}"),
            routing_key: format!("order-{i}"),
            header,
            id: MessageId::for_key(&format!("id-{i}")),
            correlation: (i % 5 != 0).then(|| format!("conv-{i}")),
            timestamp_ms: 1_700_000_000_000 + u64::from(i) * 1_337,
        });
    }
    out
}

fn amqp_header(value: &HeaderValue) -> AMQPValue {
    match value {
        HeaderValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::Float(f) => AMQPValue::Double(*f),
        HeaderValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.to_vec())),
        HeaderValue::Void => AMQPValue::Void,
    }
}

/// The ways to hash, with RabbitMQ's exchange arguments for each.
fn modes() -> Vec<(&'static str, HashOn, FieldTable)> {
    let arg = |name: &str, value: &str| {
        let mut t = FieldTable::default();
        t.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from(value)),
        );
        t
    };
    vec![
        ("routing-key", HashOn::RoutingKey, FieldTable::default()),
        ("header", HashOn::header("h"), arg("hash-header", "h")),
        (
            "message-id",
            HashOn::Property(HashProperty::MessageId),
            arg("hash-property", "message_id"),
        ),
        (
            "correlation-id",
            HashOn::Property(HashProperty::CorrelationId),
            arg("hash-property", "correlation_id"),
        ),
        (
            "timestamp",
            HashOn::Property(HashProperty::Timestamp),
            arg("hash-property", "timestamp"),
        ),
    ]
}

type Placements = BTreeMap<String, String>;

async fn rabbit_placements(
    ch: &Channel,
    tag: &str,
    mode: &str,
    args: FieldTable,
    samples: &[Sample],
) -> Result<(Placements, Placements), lapin::Error> {
    let exchange = format!("postbox-chx-{tag}-{mode}");
    let queue = |q: &str| format!("postbox-chx-{tag}-{mode}-{q}");
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Custom("x-consistent-hash".into()),
        ExchangeDeclareOptions {
            auto_delete: false,
            ..ExchangeDeclareOptions::default()
        },
        args,
    )
    .await?;
    for (q, weight) in RING {
        ch.queue_declare(
            queue(q).as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            queue(q).as_str().into(),
            exchange.as_str().into(),
            weight.to_string().as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    let mut rounds = Vec::new();
    for round in 0..2 {
        if round == 1 {
            let weight = RING.iter().find(|(q, _)| *q == UNBOUND).map(|r| r.1);
            ch.queue_unbind(
                queue(UNBOUND).as_str().into(),
                exchange.as_str().into(),
                weight.unwrap_or(1).to_string().as_str().into(),
                FieldTable::default(),
            )
            .await?;
        }
        for s in samples {
            let mut props = BasicProperties::default()
                .with_message_id(s.id.to_string().as_str().into())
                .with_timestamp(s.timestamp_ms / 1000);
            if let Some(c) = &s.correlation {
                props = props.with_correlation_id(c.as_str().into());
            }
            if let Some(h) = &s.header {
                let mut headers = FieldTable::default();
                headers.insert("h".into(), amqp_header(h));
                props = props.with_headers(headers);
            }
            ch.basic_publish(
                exchange.as_str().into(),
                s.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                s.label.as_bytes(),
                props,
            )
            .await?
            .await?;
        }
        let mut placed = Placements::new();
        for (q, _) in RING {
            while let Some(m) = ch
                .basic_get(queue(q).as_str().into(), BasicGetOptions { no_ack: true })
                .await?
            {
                let label = String::from_utf8_lossy(&m.delivery.data).into_owned();
                placed.insert(label, q.to_string());
            }
        }
        rounds.push(placed);
    }
    for (q, _) in RING {
        ch.queue_delete(queue(q).as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    let after = rounds.pop().unwrap_or_default();
    let before = rounds.pop().unwrap_or_default();
    Ok((before, after))
}

async fn postbox_placements(hash_on: HashOn, samples: &[Sample]) -> (Placements, Placements) {
    let broker = Broker::new(&RuntimeHandle::local());
    let options = ExchangeOptions::consistent_hash().hash_on(hash_on);
    broker.declare_exchange("chx", options).await.unwrap();
    for (q, weight) in RING {
        broker
            .declare_queue(q, QueueOptions::default())
            .await
            .unwrap();
        broker
            .bind_queue(q, "chx", weight.to_string().as_str())
            .await
            .unwrap();
    }
    let mut rounds = Vec::new();
    for round in 0..2 {
        if round == 1 {
            let weight = RING.iter().find(|(q, _)| *q == UNBOUND).map_or(1, |r| r.1);
            let key = weight.to_string();
            assert!(
                broker
                    .unbind_queue(UNBOUND, "chx", key.as_str())
                    .await
                    .unwrap()
            );
        }
        for s in samples {
            let mut m = Envelope::new(s.label.clone())
                .with_id(s.id)
                .with_timestamp_ms(s.timestamp_ms);
            if let Some(c) = &s.correlation {
                m = m.with_correlation_id(c.as_str());
            }
            if let Some(h) = &s.header {
                m = m.with_header("h", h.clone());
            }
            assert_eq!(
                broker.publish_to("chx", &s.routing_key, m).await.unwrap(),
                1
            );
        }
        let mut placed = Placements::new();
        for (q, _) in RING {
            while let Some((d, _)) = broker.get(q, AckMode::Auto).await.unwrap() {
                let label = String::from_utf8_lossy(d.message().payload()).into_owned();
                placed.insert(label, q.to_string());
            }
        }
        rounds.push(placed);
    }
    let after = rounds.pop().unwrap_or_default();
    let before = rounds.pop().unwrap_or_default();
    (before, after)
}

/// Declares a consistent-hash exchange to learn whether the plugin is on;
/// turns it on with `rabbitmq-plugins` if it is not and the command is here.
async fn plugin_enabled(conn: &Connection) -> bool {
    for attempt in 0..2 {
        let Ok(ch) = conn.create_channel().await else {
            return false;
        };
        let probe = "postbox-chx-probe";
        let declared = ch
            .exchange_declare(
                probe.into(),
                ExchangeKind::Custom("x-consistent-hash".into()),
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await;
        if declared.is_ok() {
            let _ = ch
                .exchange_delete(probe.into(), ExchangeDeleteOptions::default())
                .await;
            return true;
        }
        if attempt == 0 {
            let enabled = std::process::Command::new("rabbitmq-plugins")
                .args(["enable", "rabbitmq_consistent_hash_exchange"])
                .status();
            if !matches!(enabled, Ok(s) if s.success()) {
                return false;
            }
        }
    }
    false
}

#[tokio::test]
async fn placements_equal_rabbitmq_for_every_way_of_hashing() {
    let Ok(url) = std::env::var("AMQP_URL") else {
        eprintln!("AMQP_URL is not set: the comparison with RabbitMQ is skipped");
        return;
    };
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect to AMQP_URL");
    assert!(
        plugin_enabled(&conn).await,
        "RabbitMQ at AMQP_URL has no x-consistent-hash exchange type \
         (rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)"
    );
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let tag = MessageId::new().to_string();
    let samples = samples();
    for (mode, hash_on, args) in modes() {
        let rabbit = rabbit_placements(&ch, &tag, mode, args, &samples)
            .await
            .unwrap();
        let ours = local(postbox_placements(hash_on, &samples)).await;
        assert_eq!(rabbit.0.len(), samples.len(), "{mode}: RabbitMQ routed all");
        assert_eq!(ours.0, rabbit.0, "{mode}: placements differ from RabbitMQ");
        assert_eq!(
            ours.1, rabbit.1,
            "{mode}: placements after unbinding {UNBOUND} differ from RabbitMQ"
        );
        // Enough distinct queues that agreeing means something.
        let used: std::collections::BTreeSet<_> = rabbit.0.values().collect();
        assert!(used.len() >= 3 || mode == "header", "{mode}: {used:?}");
    }
    let _ = conn.close(0, "done".into()).await;
}
