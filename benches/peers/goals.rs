//! The goals (issues 7, 14, 15, 16, 17, 18 and 20), checked against this run's rows.

use std::fmt::Write as _;

use crate::actor_layer::{
    ACROSS_KAMEO, ACROSS_POSTBOX, ACROSS_RACTOR, ONE_KAMEO, ONE_POSTBOX, ONE_RACTOR, RESTART_KAMEO,
    RESTART_POSTBOX, RESTART_RACTOR, S8, TELL_KAMEO, TELL_POSTBOX, TELL_RACTOR, TOKIO_KAMEO,
    TOKIO_POSTBOX, TOKIO_RACTOR,
};
use crate::durable::{
    POSTBOX_INTERVAL, POSTBOX_RECOVERY, S5, ceiling, postbox as postbox_durable, postbox_publishers,
};
use crate::fanout::{BROADCAST, POSTBOX_FANOUT, POSTBOX_STREAM, S3};
use crate::flow::{BLOCK, MONITORED, PLAIN as FLOW_PLAIN, PRIORITY, S11, UNBOUNDED};
use crate::idempotent::{MEMORY as IDEMPOTENT_MEMORY, PLAIN as IDEMPOTENT_PLAIN, S9};
use crate::memory::{OVERHEAD_GOAL, S7};
use crate::nats::NATS_IN_FLIGHT;
use crate::ordered::{KEY_ORDERED, PARTITIONED, PLAIN as ORDERED_PLAIN, S10};
use crate::p2p::{POSTBOX_BATCH, POSTBOX_PUBLISH, S1, S2, S2_BATCHED, S2_EACH, TOKIO_MPSC};
use crate::rabbit::{
    RABBIT_FANOUT, RABBIT_P2P, RABBIT_PUBLISHERS, RABBIT_RPC, RABBIT_RPC_CONFIRMS,
    rabbit_publishers,
};
use crate::remote::{
    LAPIN_CONSUME, LAPIN_PUBLISH, REMOTE_CONSUME, REMOTE_PUBLISH, REMOTE_RPC, S12,
};
use crate::report::{Report, Row};
use crate::rpc::{
    ACTIX_SAME, ASK_ACROSS, ASK_ACROSS_BUSY, ASK_SAME, RPC_ACROSS, RPC_ACROSS_BUSY,
    RPC_ACROSS_DIRECT_BUSY, RPC_SAME, RPC_SAME_DIRECT, S4,
};
use crate::util::PAYLOAD;

/// One line per goal: what was measured, the target, met or missed.
pub fn check(report: &Report) -> String {
    let mut out = String::from("| goal | measured | target | |\n|---|---:|---:|---|\n");
    let mut line =
        |goal: &str, measured: Option<f64>, unit: &str, target: &str, ok: Option<bool>| {
            let measured = measured.map_or("–".to_string(), |m| format!("{m:.2}{unit}"));
            let verdict = match ok {
                Some(true) => "met",
                Some(false) => "**missed**",
                // A row left out (`--only`, `--filter`) or a peer not
                // configured (no AMQP_URL or NATS_URL).
                None => "not measured",
            };
            let _ = writeln!(out, "| {goal} | {measured} | {target} | {verdict} |");
        };
    let rate = |s: &str, sys: &str| report.find(s, sys).and_then(|r| r.msgs_per_sec);
    let p50 = |s: &str, sys: &str| report.find(s, sys).and_then(|r| r.p50_us);
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let at_least = |r: Option<f64>, min: f64| r.map(|r| r >= min);
    let at_most = |r: Option<f64>, max: f64| r.map(|r| r <= max);

    let r = ratio(rate(S1, POSTBOX_PUBLISH), rate(S1, TOKIO_MPSC));
    line(
        "1: publish vs tokio mpsc",
        r,
        "×",
        "≥ 0.5×",
        at_least(r, 0.5),
    );
    let r = ratio(rate(S1, POSTBOX_BATCH), rate(S1, TOKIO_MPSC));
    line(
        "1: publish_batch(64) vs tokio mpsc",
        r,
        "×",
        "≥ 0.5×",
        at_least(r, 0.5),
    );
    let r = ratio(rate(S2, S2_EACH), rate(S1, POSTBOX_PUBLISH));
    line(
        "2: publish + ack each vs scenario 1 publish",
        r,
        "×",
        "≥ 0.5×",
        at_least(r, 0.5),
    );
    let r = ratio(rate(S2, S2_BATCHED), rate(S1, POSTBOX_BATCH));
    line(
        "2: batched publish + ack_multiple vs scenario 1 batched",
        r,
        "×",
        "≥ 0.5×",
        at_least(r, 0.5),
    );
    for (system, what) in [
        (POSTBOX_STREAM, "stream"),
        (POSTBOX_FANOUT, "fanout exchange"),
    ] {
        let r = ratio(rate(S3, system), rate(S3, BROADCAST));
        line(
            &format!("3: fan-out ({what}) vs tokio broadcast"),
            r,
            "×",
            if system == POSTBOX_STREAM {
                "≥ 0.5×"
            } else {
                "(≥ 0.5×: streams are the fan-out path)"
            },
            at_least(r, 0.5),
        );
    }
    for (system, what) in [
        (ASK_SAME, "Addr::ask"),
        (RPC_SAME, "rpc"),
        (RPC_SAME_DIRECT, "rpc, direct replies"),
    ] {
        let r = ratio(p50(S4, system), p50(S4, ACTIX_SAME));
        line(
            &format!("4: {what} p50 same arbiter vs actix"),
            r,
            "×",
            "≤ 2×",
            at_most(r, 2.0),
        );
    }
    for (system, what) in [
        (ASK_ACROSS, "Addr::ask"),
        (RPC_ACROSS, "rpc"),
        (ASK_ACROSS_BUSY, "Addr::ask (busy_poll)"),
        (RPC_ACROSS_BUSY, "rpc (busy_poll)"),
        (RPC_ACROSS_DIRECT_BUSY, "rpc, direct replies (busy_poll)"),
    ] {
        let v = p50(S4, system);
        line(
            &format!("4: {what} p50 across arbiters"),
            v,
            " µs",
            "≤ 10 µs",
            at_most(v, 10.0),
        );
    }
    for batch in crate::durable::BATCHES {
        let r = ratio(rate(S5, &postbox_durable(batch)), rate(S5, &ceiling(batch)));
        line(
            &format!("5: durable publish, batch {batch}, vs disk ceiling"),
            r,
            "×",
            "≥ 0.5×",
            at_least(r, 0.5),
        );
    }
    let r = ratio(
        rate(S5, &postbox_publishers(RABBIT_PUBLISHERS)),
        rate(S5, &rabbit_publishers(RABBIT_PUBLISHERS)),
    );
    line(
        "5: durable, 64 publishers confirming each (SyncPolicy::Always) vs RabbitMQ, 64 publishers",
        r,
        "×",
        "≥ 10×",
        at_least(r, 10.0),
    );
    let r = ratio(rate(S5, POSTBOX_INTERVAL), rate(S5, NATS_IN_FLIGHT));
    line(
        "5: durable, 256 publishers, interval sync vs JetStream, 256 in flight",
        r,
        "×",
        "≥ 3×",
        at_least(r, 3.0),
    );
    let v = rate(S5, POSTBOX_RECOVERY);
    line(
        "5: recovery at reopening, messages per second",
        v,
        "/s",
        "≥ 1,000,000/s",
        at_least(v, 1_000_000.0),
    );
    let r = ratio(rate(S1, POSTBOX_PUBLISH), rate(S1, RABBIT_P2P));
    line(
        "in-memory vs RabbitMQ (scenario 1, publish)",
        r,
        "×",
        "≥ 30×",
        at_least(r, 30.0),
    );
    let r = ratio(rate(S1, POSTBOX_BATCH), rate(S1, RABBIT_P2P));
    line(
        "in-memory vs RabbitMQ (scenario 1, publish_batch(64))",
        r,
        "×",
        "≥ 30×",
        at_least(r, 30.0),
    );
    for (system, what) in [
        (POSTBOX_STREAM, "stream"),
        (POSTBOX_FANOUT, "fanout exchange"),
    ] {
        let r = ratio(rate(S3, system), rate(S3, RABBIT_FANOUT));
        line(
            &format!("in-memory vs RabbitMQ (scenario 3, fan-out, {what})"),
            r,
            "×",
            "≥ 30×",
            at_least(r, 30.0),
        );
    }
    let overhead = report
        .rows
        .iter()
        .filter(|row: &&Row| row.scenario == S7 && row.system.starts_with("postbox queue,"))
        .find_map(|row| row.bytes_per_msg)
        .map(|b| b - PAYLOAD as f64);
    line(
        "7: overhead per queued message",
        overhead,
        " B",
        &format!("≤ {OVERHEAD_GOAL:.0} B"),
        at_most(overhead, OVERHEAD_GOAL),
    );
    let s8 = |sys: &str| report.find(S8, sys);
    let best = |systems: &[&str], key: fn(&Row) -> Option<f64>, higher: bool| {
        systems
            .iter()
            .filter_map(|s| s8(s).and_then(key))
            .reduce(|a, b| if (a > b) == higher { a } else { b })
    };
    let rate_of = |r: &Row| r.msgs_per_sec;
    let p50_of = |r: &Row| r.p50_us;
    let bytes_of = |r: &Row| r.bytes_per_msg;
    let r = ratio(
        s8(TELL_POSTBOX).and_then(rate_of),
        best(&[TELL_KAMEO, TELL_RACTOR], rate_of, true),
    );
    line(
        "8: tell vs the better of kameo and ractor",
        r,
        "×",
        "≥ 1.0×",
        at_least(r, 1.0),
    );
    for (ours, peers, what, max) in [
        (ONE_POSTBOX, [ONE_KAMEO, ONE_RACTOR], "ask, one thread", 1.0),
        (
            ACROSS_POSTBOX,
            [ACROSS_KAMEO, ACROSS_RACTOR],
            "ask across pinned threads",
            1.0,
        ),
        (
            TOKIO_POSTBOX,
            [TOKIO_KAMEO, TOKIO_RACTOR],
            "ask from a plain tokio task",
            2.0,
        ),
        (
            RESTART_POSTBOX,
            [RESTART_KAMEO, RESTART_RACTOR],
            "panic → restart → answer",
            1.0,
        ),
    ] {
        let r = ratio(s8(ours).and_then(p50_of), best(&peers, p50_of, false));
        line(
            &format!("8: {what}, p50 vs the better peer"),
            r,
            "×",
            &format!("≤ {max:.1}×"),
            at_most(r, max),
        );
    }
    let spawn_rows = report
        .rows
        .iter()
        .filter(|r| r.scenario == S8 && r.system.contains(" spawn "))
        .collect::<Vec<_>>();
    let ours = spawn_rows.iter().find(|r| r.system.starts_with("postbox"));
    let peers = spawn_rows
        .iter()
        .filter(|r| !r.system.starts_with("postbox"))
        .collect::<Vec<_>>();
    let peer_best = |key: fn(&Row) -> Option<f64>, higher: bool| {
        peers
            .iter()
            .filter_map(|r| key(r))
            .reduce(|a, b| if (a > b) == higher { a } else { b })
    };
    let r = ratio(ours.and_then(|r| r.msgs_per_sec), peer_best(rate_of, true));
    line(
        "8: spawning idle actors, rate vs the better peer",
        r,
        "×",
        "≥ 1.0×",
        at_least(r, 1.0),
    );
    let r = ratio(ours.and_then(|r| bytes_of(r)), peer_best(bytes_of, false));
    line(
        "8: idle actor, bytes vs the better peer",
        r,
        "×",
        "≤ 1.0×",
        at_most(r, 1.0),
    );
    let one_by_one = report
        .rows
        .iter()
        .find(|r| r.scenario == S7 && r.system.ends_with("queues + 1 consumer each"));
    let kb = one_by_one.and_then(|r| r.bytes_per_msg).map(|b| b / 1000.0);
    line(
        "7: queue with a consumer, memory",
        kb,
        " KB",
        "≤ 6 KB",
        at_most(kb, 6.0),
    );
    let created = one_by_one.and_then(|r| r.msgs_per_sec);
    line(
        "7: queue+consumer pairs created per second, one at a time",
        created,
        "/s",
        "≥ 100,000/s",
        at_least(created, 100_000.0),
    );
    let r = ratio(rate(S9, IDEMPOTENT_MEMORY), rate(S9, IDEMPOTENT_PLAIN));
    line(
        "9: idempotent consumer (memory store) vs none",
        r,
        "×",
        "≥ 0.70×",
        at_least(r, 0.70),
    );
    for (goal, system) in [
        ("10: 4 partitions vs one plain queue", PARTITIONED),
        (
            "10: key-ordered consumer, 4 workers, vs one plain queue",
            KEY_ORDERED,
        ),
    ] {
        let r = ratio(rate(S10, system), rate(S10, ORDERED_PLAIN));
        line(goal, r, "×", "≥ 0.70×", at_least(r, 0.70));
    }
    let r = ratio(rate(S11, PRIORITY), rate(S11, FLOW_PLAIN));
    line(
        "11: priority queue vs plain queue",
        r,
        "×",
        "≥ 0.50×",
        at_least(r, 0.50),
    );
    let r = ratio(rate(S11, MONITORED), rate(S11, FLOW_PLAIN));
    line(
        "11: monitor + metrics recorder vs none",
        r,
        "×",
        "≥ 0.90×",
        at_least(r, 0.90),
    );
    // Flat memory: block's backlog stays at its limit while no limit's grows.
    let bytes = |sys: &str| report.find(S11, sys).and_then(|r| r.bytes_per_msg);
    let r = ratio(bytes(BLOCK), bytes(UNBOUNDED));
    line(
        "11: memory added under block vs no limit (consumer 10x slower)",
        r,
        "×",
        "≤ 0.10×",
        at_most(r, 0.10),
    );
    // The RabbitMQ backend adds little to what raw lapin does.
    for (ours, theirs, what) in [
        (REMOTE_PUBLISH, LAPIN_PUBLISH, "publish"),
        (REMOTE_CONSUME, LAPIN_CONSUME, "consume"),
    ] {
        let r = ratio(rate(S12, ours), rate(S12, theirs));
        line(
            &format!("12: postbox on RabbitMQ vs raw lapin, {what}"),
            r,
            "×",
            "≥ 0.90×",
            at_least(r, 0.90),
        );
    }
    let r = ratio(rate(S12, REMOTE_RPC), rate(S4, RABBIT_RPC));
    line(
        "12: postbox on RabbitMQ vs raw lapin, rpc round trips",
        r,
        "×",
        "≥ 0.90×",
        at_least(r, 0.90),
    );
    // Like for like: RabbitMQ itself takes longer with confirms on.
    let r = ratio(rate(S12, REMOTE_RPC), rate(S4, RABBIT_RPC_CONFIRMS));
    line(
        "12: postbox on RabbitMQ vs raw lapin with the same confirms, rpc",
        r,
        "×",
        "≥ 0.90×",
        at_least(r, 0.90),
    );
    out
}
