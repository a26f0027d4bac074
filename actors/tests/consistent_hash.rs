//! The consistent-hash exchange (`x-consistent-hash`): keys land where
//! RabbitMQ 3.10's plugin puts them for the same bindings, weights share the
//! keys out, a new binding takes keys only for itself, and the ring (binding
//! order and weights) survives a restart. The comparison with a live
//! RabbitMQ is `tests/rabbitmq_consistent_hash.rs` in the root crate.

use std::collections::HashMap;

use postbox::testkit::local;
use postbox::{Runtime, RuntimeHandle};
use postbox_actors::{
    AckMode, BindingError, Broker, BrokerError, Envelope, ExchangeOptions, HashOn, HashProperty,
    MessageId, QueueOptions, StorageOptions,
};

/// Declares queues bound to consistent-hash exchange `x` with the weights
/// given.
async fn ring(broker: &Broker, x: &str, options: ExchangeOptions, queues: &[(&str, u32)]) {
    broker.declare_exchange(x, options).await.unwrap();
    for (queue, weight) in queues {
        broker
            .declare_queue(queue, QueueOptions::default())
            .await
            .unwrap();
        broker
            .bind_queue(queue, x, weight.to_string().as_str())
            .await
            .unwrap();
    }
}

/// Which queue each message (its body is its key) reached.
async fn placements(broker: &Broker, queues: &[&str]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for queue in queues {
        while let Some((d, _)) = broker.get(queue, AckMode::Auto).await.unwrap() {
            let key: String = String::from_utf8(d.message().payload().to_vec()).unwrap();
            assert!(
                out.insert(key, queue.to_string()).is_none(),
                "one copy each"
            );
        }
    }
    out
}

fn keyed(key: &str) -> Envelope {
    Envelope::new(key.to_string())
}

/// The placements RabbitMQ 3.10.8 made on this machine (pika, plugin
/// enabled): queues q1..q4 bound with weights 1, 1, 2, 2, keys `user-0` to
/// `user-15` as routing keys; then q2 unbound.
#[tokio::test]
async fn keys_land_where_rabbitmq_puts_them_before_and_after_an_unbind() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let queues = [("q1", 1), ("q2", 1), ("q3", 2), ("q4", 2)];
        ring(&broker, "chx", ExchangeOptions::consistent_hash(), &queues).await;
        let names = ["q1", "q2", "q3", "q4"];
        let rabbit = [
            "q3", "q3", "q4", "q3", "q3", "q3", "q4", "q2", "q2", "q4", "q3", "q2", "q3", "q3",
            "q2", "q3",
        ];
        for i in 0..16 {
            let key = format!("user-{i}");
            assert_eq!(
                broker.publish_to("chx", &key, keyed(&key)).await.unwrap(),
                1
            );
        }
        let got = placements(&broker, &names).await;
        for (i, want) in rabbit.iter().enumerate() {
            assert_eq!(got[&format!("user-{i}")], *want, "user-{i}");
        }
        // Unbinding q2 renumbers the buckets after it, as the plugin does.
        assert!(broker.unbind_queue("q2", "chx", "1").await.unwrap());
        let rabbit = [
            "q3", "q3", "q4", "q4", "q3", "q4", "q1", "q3", "q3", "q4", "q4", "q3", "q4", "q3",
            "q3", "q3",
        ];
        for i in 0..16 {
            let key = format!("user-{i}");
            broker.publish_to("chx", &key, keyed(&key)).await.unwrap();
        }
        let got = placements(&broker, &names).await;
        for (i, want) in rabbit.iter().enumerate() {
            assert_eq!(
                got[&format!("user-{i}")],
                *want,
                "user-{i} after the unbind"
            );
        }
    })
    .await;
}

/// The same placements with `hash-header`: the header's string value
/// (hashed as RabbitMQ hashes an AMQP `longstr`), whatever the routing key;
/// messages without the header all go to one queue (Erlang's `undefined`).
#[tokio::test]
async fn a_header_places_keys_as_rabbitmq_and_a_missing_header_has_one_queue() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let queues = [("q1", 1), ("q2", 1), ("q3", 2), ("q4", 2)];
        let options = ExchangeOptions::consistent_hash().hash_on(HashOn::header("uid"));
        ring(&broker, "chx", options, &queues).await;
        let names = ["q1", "q2", "q3", "q4"];
        let rabbit = ["q1", "q3", "q3", "q3", "q4", "q4", "q1", "q2"];
        for i in 0..8 {
            let key = format!("user-{i}");
            let m = keyed(&key).with_header("uid", key.as_str());
            broker.publish_to("chx", "ignored", m).await.unwrap();
        }
        let got = placements(&broker, &names).await;
        for (i, want) in rabbit.iter().enumerate() {
            assert_eq!(got[&format!("user-{i}")], *want, "user-{i}");
        }
        for i in 0..20 {
            let key = format!("anonymous-{i}");
            broker.publish_to("chx", &key, keyed(&key)).await.unwrap();
        }
        let got = placements(&broker, &names).await;
        assert_eq!(got.len(), 20);
        assert!(got.values().all(|q| q == "q2"), "{got:?}");
    })
    .await;
}

/// Weights share the keys out: 1:1:2:2 gives about 1/6, 1/6, 1/3, 1/3.
#[tokio::test]
async fn weights_share_keys_in_proportion() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let queues = [("a", 1), ("b", 1), ("c", 2), ("d", 2)];
        ring(&broker, "chx", ExchangeOptions::consistent_hash(), &queues).await;
        let n = 6_000;
        for i in 0..n {
            let key = format!("order-{i}");
            broker.publish_to("chx", &key, keyed(&key)).await.unwrap();
        }
        for (queue, weight) in queues {
            let ready = broker.queue_stats(queue).await.unwrap().stats.ready;
            let expected = n * weight as usize / 6;
            assert!(
                ready.abs_diff(expected) < expected / 8,
                "{queue}: {ready} of {n}, expected about {expected}"
            );
        }
    })
    .await;
}

/// A new binding takes keys for itself only: every key that moves, moves to
/// it (jump consistent hashing), and about its share of them.
#[tokio::test]
async fn a_new_binding_moves_keys_only_to_itself() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let queues = [("a", 1), ("b", 1), ("c", 1)];
        ring(&broker, "chx", ExchangeOptions::consistent_hash(), &queues).await;
        let keys: Vec<String> = (0..2_000).map(|i| format!("k{i}")).collect();
        for key in &keys {
            broker.publish_to("chx", key, keyed(key)).await.unwrap();
        }
        let before = placements(&broker, &["a", "b", "c"]).await;
        broker
            .declare_queue("d", QueueOptions::default())
            .await
            .unwrap();
        broker.bind_queue("d", "chx", "1").await.unwrap();
        for key in &keys {
            broker.publish_to("chx", key, keyed(key)).await.unwrap();
        }
        let after = placements(&broker, &["a", "b", "c", "d"]).await;
        let moved: Vec<&String> = keys.iter().filter(|k| before[*k] != after[*k]).collect();
        assert!(moved.iter().all(|k| after[*k] == "d"), "moved elsewhere");
        assert!(
            (400..600).contains(&moved.len()),
            "about a quarter moved: {}",
            moved.len()
        );
    })
    .await;
}

/// hash-property: the message id (its text form), the correlation id.
#[tokio::test]
async fn properties_place_messages_by_their_id_or_correlation() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let queues = [("a", 1), ("b", 1), ("c", 1), ("d", 1)];
        let by_id =
            ExchangeOptions::consistent_hash().hash_on(HashOn::Property(HashProperty::MessageId));
        ring(&broker, "by-id", by_id, &queues).await;
        let by_corr = ExchangeOptions::consistent_hash()
            .hash_on(HashOn::Property(HashProperty::CorrelationId));
        broker.declare_exchange("by-corr", by_corr).await.unwrap();
        for (queue, _) in queues {
            broker.bind_queue(queue, "by-corr", "1").await.unwrap();
        }
        // A retry with the same id goes where the first went.
        for i in 0..50 {
            let id = MessageId::for_key(&format!("order-{i}"));
            for copy in 0..2 {
                let m = Envelope::new(format!("{i}/{copy}")).with_id(id);
                broker.publish_to("by-id", "", m).await.unwrap();
            }
        }
        let got = placements(&broker, &["a", "b", "c", "d"]).await;
        for i in 0..50 {
            assert_eq!(got[&format!("{i}/0")], got[&format!("{i}/1")], "id {i}");
        }
        assert!(got.values().collect::<std::collections::HashSet<_>>().len() > 1);
        for i in 0..50 {
            let m = Envelope::new(format!("c{i}")).with_correlation_id(format!("conv-{}", i % 5));
            broker.publish_to("by-corr", "", m).await.unwrap();
        }
        let got = placements(&broker, &["a", "b", "c", "d"]).await;
        for i in 0..50 {
            assert_eq!(got[&format!("c{i}")], got[&format!("c{}", i % 5)], "c{i}");
        }
    })
    .await;
}

/// Bad input: a binding key that is not a weight, hashing options on another
/// kind of exchange; an exchange with no bindings routes nowhere (to its
/// alternate exchange, if it has one).
#[tokio::test]
async fn bad_weights_and_options_are_refused_and_an_empty_ring_routes_nowhere() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let options = ExchangeOptions::consistent_hash().alternate_exchange("lost");
        broker.declare_exchange("chx", options).await.unwrap();
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        for bad in ["0", "-2", "two", "", "1.5"] {
            let err = broker.bind_queue("q", "chx", bad).await.unwrap_err();
            assert_eq!(
                err,
                BrokerError::InvalidBinding(BindingError::BadWeight(bad.to_string()))
            );
        }
        assert!(broker.bindings("chx").unwrap().is_empty(), "nothing bound");
        assert_eq!(broker.publish_to("chx", "k", keyed("k")).await.unwrap(), 0);
        broker
            .declare_exchange("lost", ExchangeOptions::fanout())
            .await
            .unwrap();
        broker.bind_queue("q", "lost", "").await.unwrap();
        assert_eq!(broker.publish_to("chx", "k", keyed("k")).await.unwrap(), 1);
        let topic = ExchangeOptions::topic().hash_on(HashOn::header("user"));
        assert!(matches!(
            broker.declare_exchange("t", topic).await,
            Err(BrokerError::InvalidExchangeOptions { .. })
        ));
        // A leading plus is a weight, as Erlang's list_to_integer reads it.
        broker.bind_queue("q", "chx", "+3").await.unwrap();
        assert_eq!(broker.publish_to("chx", "k", keyed("k")).await.unwrap(), 1);
    })
    .await;
}

/// An exchange can be a destination too: its weight counts like a queue's.
#[tokio::test]
async fn an_exchange_bound_with_a_weight_passes_its_share_on() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        ring(
            &broker,
            "chx",
            ExchangeOptions::consistent_hash(),
            &[("a", 1)],
        )
        .await;
        broker
            .declare_exchange("audit", ExchangeOptions::fanout())
            .await
            .unwrap();
        broker
            .declare_queue("audit.q", QueueOptions::default())
            .await
            .unwrap();
        broker.bind_queue("audit.q", "audit", "").await.unwrap();
        broker.bind_exchange("audit", "chx", "3").await.unwrap();
        for i in 0..400 {
            let key = format!("k{i}");
            assert_eq!(
                broker.publish_to("chx", &key, keyed(&key)).await.unwrap(),
                1
            );
        }
        let audit = broker.queue_stats("audit.q").await.unwrap().stats.ready;
        assert!((250..350).contains(&audit), "about 3/4: {audit}");
    })
    .await;
}

/// A durable ring comes back in binding order with its weights (and without
/// what was unbound): every key goes where it went before the restart.
/// RabbitMQ rebuilds the ring from its bindings at boot and may renumber it.
#[tokio::test]
async fn a_durable_ring_places_keys_as_before_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    let names = ["a", "b", "c", "d"];
    let keys: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let open = || Broker::open(&rt, StorageOptions::new(dir.path())).unwrap();
    let before = {
        let broker = open();
        let options = ExchangeOptions::consistent_hash().durable();
        broker.declare_exchange("chx", options).await.unwrap();
        for (queue, weight) in [("d", "3"), ("b", "1"), ("a", "2"), ("c", "1")] {
            let durable = QueueOptions::default().durable();
            broker.declare_queue(queue, durable).await.unwrap();
            broker.bind_queue(queue, "chx", weight).await.unwrap();
        }
        assert!(broker.unbind_queue("b", "chx", "1").await.unwrap());
        broker.bind_queue("b", "chx", "2").await.unwrap();
        for key in &keys {
            broker.publish_to("chx", key, keyed(key)).await.unwrap();
        }
        placements(&broker, &names).await
    };
    let broker = open();
    for key in &keys {
        broker.publish_to("chx", key, keyed(key)).await.unwrap();
    }
    let after = placements(&broker, &names).await;
    assert_eq!(before.len(), keys.len());
    assert_eq!(before, after);
    rt.shutdown();
}
