//! User registered: one event, many subscribers, through a topic exchange;
//! and a durable subscription that keeps collecting while its service is
//! down.
//!
//! From section 3 of the seed tutorial (发布订阅模式, "publish/subscribe"):
//! a `UserEventPublisher` publishes a `UserRegisteredEvent` to the
//! `user.events` topic exchange with the key `user.registered`, and each
//! service reacts to it on a queue of its own: the email service sends a
//! welcome email, the points service grants welcome points, the statistics
//! service counts users. Here:
//!
//! - the email and points services subscribe to `user.registered`
//!   (`Broker::subscribe`: a queue of their own, for as long as they run);
//!   the statistics service subscribes to `user.*`, and so also hears the
//!   `user.logged_in` events published for every third user, which nobody
//!   else hears (topic routing);
//! - the points service's database is unreachable the first time it is
//!   called: its handler fails, and under `OnError::Restart` the consumer is
//!   restarted with what it held requeued, so that no user misses their
//!   points and none gets them twice;
//! - the recommendation service (the seed's list of subscribers has one too)
//!   subscribes durably (`Broker::subscribe_durable`, the named queue
//!   `recommendation.user.registered`). After the first half of the users it
//!   goes down (`Subscription::cancel`): its queue stays bound and collects
//!   the second half's events, which it receives once it subscribes again.
//!
//! It checks that every subscriber got every event it subscribed to exactly
//! once, that each registration reached the four queues, that the durable
//! queue held exactly the events published while its service was down and
//! that the restarted service received exactly those, and that the points
//! service crashed and was restarted once.
//!
//! Run it with `cargo run --release --example user_registered -- --users 1000`.
//!
//! Flags (defaults in brackets):
//! - `--users N`: users who register [1000];
//! - `--prefetch N`: each subscriber's prefetch [16].

// `support::secs` is not reachable from outside: the lint would fail clippy.
#[path = "support/mod.rs"]
pub mod support;

use std::collections::HashMap;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postbox::{Failure, Runtime, RuntimeHandle};
use postbox_actors::{
    Broker, ConsumeOptions, Consumer, DeleteOptions, Delivery, Envelope, ExchangeOptions, OnError,
};
use serde::{Deserialize, Serialize};
use support::{Flags, Summary, secs};
use tokio::sync::mpsc;

/// The seed's exchange.
const EXCHANGE: &str = "user.events";
/// The durable subscription's queue, named as the seed names its queues.
const DURABLE_QUEUE: &str = "recommendation.user.registered";
/// The user whose points meet the database outage (the last one, with
/// fewer users).
const UNLUCKY_USER: u32 = 7;
/// How long the example waits for its subscribers before giving up.
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
struct UserRegistered {
    user_id: u32,
    email: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct UserLoggedIn {
    user_id: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Service {
    Email,
    Points,
    Statistics,
    /// The durable subscriber, in its first or second run.
    Recommendation(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Event {
    Registered,
    LoggedIn,
}

/// What a subscriber tells when it has handled an event (its side effect).
type Heard = (Service, Event, u32);

/// How many times each service handled each (event, user).
#[derive(Default)]
struct Tally {
    counts: HashMap<(Service, Event, u32), u32>,
    per_service: HashMap<Service, usize>,
}

impl Tally {
    fn add(&mut self, (service, event, user): Heard) {
        *self.counts.entry((service, event, user)).or_default() += 1;
        *self.per_service.entry(service).or_default() += 1;
    }

    fn handled(&self, service: Service) -> usize {
        self.per_service.get(&service).copied().unwrap_or(0)
    }

    fn count(&self, service: Service, event: Event, user: u32) -> u32 {
        self.counts
            .get(&(service, event, user))
            .copied()
            .unwrap_or(0)
    }

    /// Receives until `done` holds.
    async fn until(
        &mut self,
        heard: &mut mpsc::UnboundedReceiver<Heard>,
        done: impl Fn(&Tally) -> bool,
    ) -> Result<(), Box<dyn Error>> {
        while !done(self) {
            match tokio::time::timeout(PATIENCE, heard.recv()).await {
                Ok(Some(h)) => self.add(h),
                _ => return Err("the subscribers stopped hearing events".into()),
            }
        }
        Ok(())
    }
}

/// A subscriber: decodes the event, does its service's work (here: tells
/// the tally) and acknowledges.
struct Subscriber {
    who: Service,
    heard: mpsc::UnboundedSender<Heard>,
    /// Set until the points service's first call for the unlucky user.
    db_down_once: Arc<AtomicBool>,
    unlucky: u32,
}

impl Consumer for Subscriber {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let (event, user) = match delivery.routing_key() {
            "user.logged_in" => (Event::LoggedIn, delivery.decode::<UserLoggedIn>()?.user_id),
            _ => (
                Event::Registered,
                delivery.decode::<UserRegistered>()?.user_id,
            ),
        };
        if self.who == Service::Points
            && user == self.unlucky
            && self.db_down_once.swap(false, Ordering::SeqCst)
        {
            // Before the side effect: no points were granted.
            return Err(Failure::msg("the points database is unreachable"));
        }
        // The side effect: the welcome email, the points, the count.
        let _ = self.heard.send((self.who, event, user));
        delivery.ack().await?;
        Ok(())
    }
}

/// Publishes the registrations of `users`, and a login for every third;
/// returns how many queues each registration reached.
async fn register(
    broker: &Broker,
    users: std::ops::RangeInclusive<u32>,
) -> Result<Vec<usize>, Box<dyn Error>> {
    let mut reached = Vec::new();
    for user_id in users {
        let event = UserRegistered {
            user_id,
            email: format!("user{user_id}@example.com"),
        };
        reached.push(
            broker
                .publish_to(EXCHANGE, "user.registered", Envelope::encode(&event)?)
                .await?,
        );
        if user_id % 3 == 0 {
            let login = UserLoggedIn { user_id };
            broker
                .publish_to(EXCHANGE, "user.logged_in", Envelope::encode(&login)?)
                .await?;
        }
    }
    Ok(reached)
}

/// Runs the example: fans registrations out to four subscribers, one of
/// which goes down and comes back, and checks that each got every event
/// once.
pub async fn run(rt: &RuntimeHandle, flags: &Flags) -> Result<Summary, Box<dyn Error>> {
    let users = flags.u32("users", 1000).max(2);
    let prefetch = flags.u32("prefetch", 16).max(1);
    let half = users / 2;
    let mut summary = Summary::new(format!(
        "user_registered: {users} registrations fanned out to 4 subscribers, one of them durable"
    ));
    let started = Instant::now();
    let broker = Broker::new(rt);
    broker
        .declare_exchange(EXCHANGE, ExchangeOptions::topic())
        .await?;
    let (tx, mut heard) = mpsc::unbounded_channel();
    let db_down_once = Arc::new(AtomicBool::new(true));
    let options = ConsumeOptions::manual(prefetch);
    let handler = |who: Service| {
        let (heard, db_down_once) = (tx.clone(), db_down_once.clone());
        // The factory: builds the subscriber at start and after a crash.
        move || Subscriber {
            who,
            heard: heard.clone(),
            db_down_once: db_down_once.clone(),
            unlucky: UNLUCKY_USER.min(users),
        }
    };

    let email = broker
        .subscribe(
            EXCHANGE,
            "user.registered",
            options.clone(),
            handler(Service::Email),
        )
        .await?;
    let points = broker
        .subscribe(
            EXCHANGE,
            "user.registered",
            options.clone().on_error(OnError::Restart),
            handler(Service::Points),
        )
        .await?;
    let statistics = broker
        .subscribe(
            EXCHANGE,
            "user.*",
            options.clone(),
            handler(Service::Statistics),
        )
        .await?;
    let recommendation = broker
        .subscribe_durable(
            EXCHANGE,
            "user.registered",
            DURABLE_QUEUE,
            options.clone(),
            handler(Service::Recommendation(1)),
        )
        .await?;

    let logins = |to: u32| (1..=to).filter(|u| u % 3 == 0).count();
    let mut tally = Tally::default();
    let mut reached = register(&broker, 1..=half).await?;
    tally
        .until(&mut heard, |t| {
            [Service::Email, Service::Points, Service::Recommendation(1)]
                .iter()
                .all(|s| t.handled(*s) == half as usize)
                && t.handled(Service::Statistics) == half as usize + logins(half)
        })
        .await?;

    // The recommendation service goes down; its queue stays bound.
    recommendation.cancel().await;
    reached.extend(register(&broker, half + 1..=users).await?);
    tally
        .until(&mut heard, |t| {
            [Service::Email, Service::Points]
                .iter()
                .all(|s| t.handled(*s) == users as usize)
                && t.handled(Service::Statistics) == users as usize + logins(users)
        })
        .await?;
    let waiting = broker.queue_stats(DURABLE_QUEUE).await?.stats.ready;

    // It comes back, on the same queue.
    let recommendation = broker
        .subscribe_durable(
            EXCHANGE,
            "user.registered",
            DURABLE_QUEUE,
            options,
            handler(Service::Recommendation(2)),
        )
        .await?;
    tally
        .until(&mut heard, |t| {
            t.handled(Service::Recommendation(2)) >= (users - half) as usize
        })
        .await?;
    let points_report = points.consumer().report();
    let points_redelivered = broker.queue_stats(points.queue()).await?.stats.redelivered;
    let elapsed = started.elapsed();

    // Tidy up: the subscribers' queues go with them; the durable one stays
    // until deleted.
    let leftover = broker.queue_stats(DURABLE_QUEUE).await?.stats;
    for subscription in [email, statistics] {
        subscription.cancel().await;
    }
    points.cancel().await;
    recommendation.cancel().await;
    broker
        .delete_queue(DURABLE_QUEUE, DeleteOptions::default())
        .await?;
    broker.delete_exchange(EXCHANGE, false).await?;
    drop(broker);
    // Anything heard after the counts were reached (a duplicate) counts too.
    while let Ok(h) = heard.try_recv() {
        tally.add(h);
    }

    summary.line(format!(
        "{users} users registered ({} logins), handled by all the subscribers in {}",
        logins(users),
        secs(elapsed)
    ));
    summary.line(format!(
        "handled: email {}, points {}, statistics {} (registrations and logins), recommendation {} + {} after its restart",
        tally.handled(Service::Email),
        tally.handled(Service::Points),
        tally.handled(Service::Statistics),
        tally.handled(Service::Recommendation(1)),
        tally.handled(Service::Recommendation(2)),
    ));
    summary.line(format!(
        "while the recommendation service was down its queue collected {waiting} events"
    ));
    summary.line(format!(
        "points service: {} crash(es) ({}), {} restart(s); the {points_redelivered} events it held were redelivered",
        points_report.crashes,
        points_report
            .last_crash
            .as_ref()
            .map_or("none", |f| f.message()),
        points_report.restarts
    ));

    let all = 1..=users;
    let once = |s: Service, e: Event, u: u32| tally.count(s, e, u) == 1;
    summary.check(
        "each registration reached 4 queues (email, points, statistics, recommendation)",
        reached.len() == users as usize && reached.iter().all(|&r| r == 4),
    );
    summary.check(
        "email and points handled every registration exactly once, and no login",
        all.clone().all(|u| {
            [Service::Email, Service::Points]
                .iter()
                .all(|&s| once(s, Event::Registered, u) && tally.count(s, Event::LoggedIn, u) == 0)
        }),
    );
    summary.check(
        "statistics handled every registration and every login exactly once",
        all.clone().all(|u| {
            once(Service::Statistics, Event::Registered, u)
                && tally.count(Service::Statistics, Event::LoggedIn, u) == u32::from(u % 3 == 0)
        }),
    );
    summary.check(
        format!(
            "the durable queue held the {} events published while its service was down",
            users - half
        ),
        waiting == (users - half) as usize,
    );
    summary.check(
        "the recommendation service got every registration exactly once: the first half before, the rest after its restart",
        all.clone().all(|u| {
            let (before, after) = (
                tally.count(Service::Recommendation(1), Event::Registered, u),
                tally.count(Service::Recommendation(2), Event::Registered, u),
            );
            if u <= half { (before, after) == (1, 0) } else { (before, after) == (0, 1) }
        }) && leftover.ready == 0
            && leftover.unacked == 0,
    );
    summary.check(
        "the points service crashed once and was restarted",
        points_report.crashes == 1 && points_report.restarts == 1,
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
