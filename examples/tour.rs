//! The tour: every program of the seed tutorial (point-to-point orders,
//! publish/subscribe, request-reply, acknowledgements, duplicates, ordering,
//! backpressure, and an actix-web service), run one after another with small
//! sizes, each with a narrated summary of what happened and the check of
//! what it promises. Each also runs on its own with its own flags
//! (`cargo run --release --example order_processing -- --orders 100000`).
//!
//! Run it with `cargo run --release --example tour`. It exits non-zero if
//! any example's check fails.

// Each example brings its own copy of `support` (so that it builds on its
// own); the tour includes all of them.
#![allow(clippy::duplicate_mod)]

#[allow(dead_code, unreachable_pub)]
#[path = "actix_web_orders.rs"]
mod actix_web_orders;
#[allow(dead_code, unreachable_pub)]
#[path = "backpressure.rs"]
mod backpressure;
#[allow(dead_code, unreachable_pub)]
#[path = "idempotent_orders.rs"]
mod idempotent_orders;
#[allow(dead_code, unreachable_pub)]
#[path = "manual_ack_orders.rs"]
mod manual_ack_orders;
#[allow(dead_code, unreachable_pub)]
#[path = "order_processing.rs"]
mod order_processing;
#[allow(dead_code, unreachable_pub)]
#[path = "partitioned_order_events.rs"]
mod partitioned_order_events;
#[allow(dead_code, unreachable_pub)]
#[path = "report_request_reply.rs"]
mod report_request_reply;
#[allow(dead_code, unreachable_pub)]
#[path = "user_registered.rs"]
mod user_registered;

use std::time::Instant;

/// One stop of the tour: what the narrator says first, and the outcome.
struct Stop {
    name: &'static str,
    intro: &'static str,
}

/// Runs one example's `run` with its flags, and prints its summary.
macro_rules! stop {
    ($rt:expr, $stop:expr, $module:ident, $flags:expr, $results:expr) => {{
        let stop: Stop = $stop;
        println!("{}. {}", $results.len() + 1, stop.intro);
        let started = Instant::now();
        let flags = $module::support::Flags::with($flags);
        let passed = match $module::run($rt, &flags).await {
            Ok(summary) => {
                print!("{}", summary.render());
                summary.passed()
            }
            Err(err) => {
                println!("   ✗ FAILED: {err}");
                false
            }
        };
        println!("   ({:.1} s)\n", started.elapsed().as_secs_f64());
        $results.push((stop.name, passed));
    }};
}

#[tokio::main]
async fn main() {
    println!(
        "postbox tour: the seed's programs, small\n========================================\n"
    );
    // The examples crash consumers on purpose (their summaries count the
    // crashes, and postbox contains them): only a panic of the tour itself
    // is worth a message.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some("main") {
            default_hook(info);
        }
    }));
    let started = Instant::now();
    let runtime = postbox::Runtime::new().expect("a postbox runtime");
    let rt = runtime.handle();
    let mut results: Vec<(&str, bool)> = Vec::new();
    stop!(
        &rt,
        Stop {
            name: "order_processing",
            intro: "Point-to-point: competing consumers share one durable queue; the broker\n   restarts halfway, and every order is still processed exactly once.",
        },
        order_processing,
        &[("orders", "500")],
        results
    );
    stop!(
        &rt,
        Stop {
            name: "user_registered",
            intro: "Publish/subscribe: a UserRegistered event reaches email, points and\n   statistics through a topic exchange; a durable subscription catches up\n   on what it missed while its service was down.",
        },
        user_registered,
        &[],
        results
    );
    stop!(
        &rt,
        Stop {
            name: "report_request_reply",
            intro: "Request-reply: reports requested asynchronously, with deadlines, the\n   caller's own request ids, and structured error replies.",
        },
        report_request_reply,
        &[],
        results
    );
    stop!(
        &rt,
        Stop {
            name: "manual_ack_orders",
            intro: "Manual acknowledgements: business errors are retried, system errors\n   dead-lettered, and a poison message stops at its delivery limit.",
        },
        manual_ack_orders,
        &[],
        results
    );
    stop!(
        &rt,
        Stop {
            name: "idempotent_orders",
            intro: "Duplicates: producer retries are refused by a duplicate window, and a\n   crash after processing does not repeat the side effect (an idempotent\n   consumer).",
        },
        idempotent_orders,
        &[],
        results
    );
    stop!(
        &rt,
        Stop {
            name: "partitioned_order_events",
            intro: "Ordering: each user's events stay in order through partitions with single\n   active consumers, across crashes.",
        },
        partitioned_order_events,
        &[],
        results
    );
    stop!(
        &rt,
        Stop {
            name: "backpressure",
            intro: "Backpressure: a rate-limited producer, a bounded queue that makes it wait,\n   a pool of consumers that grows from 5 to 10 and back, alerts that fire\n   and clear.",
        },
        backpressure,
        &[("messages", "300")],
        results
    );
    stop!(
        &rt,
        Stop {
            name: "actix_web_orders",
            intro: "An actix-web service: orders over HTTP, 503 with Retry-After when the\n   queue is full, consumed by an existing actix actor.",
        },
        actix_web_orders,
        &[],
        results
    );
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, passed)| !passed)
        .map(|(name, _)| *name)
        .collect();
    println!(
        "{} examples in {:.1} s: {}",
        results.len(),
        started.elapsed().as_secs_f64(),
        if failed.is_empty() {
            "every check held.".to_string()
        } else {
            format!("FAILED: {}", failed.join(", "))
        }
    );
    println!(
        "The basics (crash and redelivery, typed errors, streams): cargo run --release --example basics"
    );
    runtime.shutdown();
    std::process::exit(i32::from(!failed.is_empty()));
}
