//! The actor-layer test kit, exercised: probe expectations and their failure
//! messages, virtual time, and test runtimes. (The messaging test kit's tests
//! are in `actors/tests/testkit.rs`.)

use std::time::Duration;

use postbox::testkit::{self, ProbeErrorKind, TestProbe, TestRuntime, advance};
use postbox::{
    Actor, AskError, Backoff, ChildSpec, Context, Failure, Handler, Message, Recipient,
    RuntimeHandle, SupervisorSpec,
};
use tokio::time::Instant;

const SEC: Duration = Duration::from_secs(1);

#[derive(Debug, PartialEq)]
struct Work(u32);
impl Message for Work {
    type Reply = ();
}

// ---------------------------------------------------------------- probes

#[tokio::test(start_paused = true)]
async fn probe_expectations_return_messages_in_order() {
    testkit::local(async {
        let mut probe = TestProbe::<Work>::new(&RuntimeHandle::local());
        let to_probe = probe.recipient();
        for n in 1..=6 {
            to_probe.send(Work(n)).await.unwrap();
        }
        assert_eq!(probe.expect_msg(SEC).await, Work(1));
        assert_eq!(probe.expect_msg_eq(Work(2), SEC).await, Work(2));
        // Skips (and drops) Work(3).
        assert_eq!(probe.expect_msg_matching(|w| w.0 == 4, SEC).await, Work(4));
        assert_eq!(probe.receive_n(2, SEC).await, [Work(5), Work(6)]);
        assert!(probe.try_receive().is_none());

        // Waiting for nothing takes exactly the given virtual time.
        let start = Instant::now();
        probe.expect_no_msg(3 * SEC).await;
        assert_eq!(start.elapsed(), 3 * SEC);

        // A message sent later, in virtual time, arrives exactly then.
        let later = probe.recipient();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            later.send(Work(7)).await.unwrap();
        });
        let start = Instant::now();
        assert_eq!(probe.expect_msg(2 * SEC).await, Work(7));
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
    })
    .await;
}

#[derive(Debug)]
struct Price(&'static str);
impl Message for Price {
    type Reply = usize;
}

#[tokio::test(start_paused = true)]
async fn a_replying_probe_answers_asks_and_records_them() {
    testkit::local(async {
        let mut probe = TestProbe::replying(&RuntimeHandle::local(), |p: &Price| p.0.len());
        assert_eq!(probe.addr().ask(Price("coffee")).await.unwrap(), 6);
        let recipient: Recipient<Price> = probe.recipient();
        assert_eq!(recipient.ask(Price("tea"), Some(SEC)).await.unwrap(), 3);
        let got = probe.receive_n(2, SEC).await;
        assert_eq!((got[0].0, got[1].0), ("coffee", "tea"));
    })
    .await;
}

#[test]
fn failing_expectations_say_what_arrived_instead() {
    testkit::run(async {
        let mut probe = TestProbe::<Work>::new(&RuntimeHandle::local());
        let to_probe = probe.recipient();

        to_probe.send(Work(1)).await.unwrap();
        to_probe.send(Work(2)).await.unwrap();
        let err = probe
            .try_expect_msg_matching(|w| w.0 == 3, SEC)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ProbeErrorKind::Timeout);
        assert_eq!(
            err.to_string(),
            "expect_msg_matching: timeout (1s) waiting for a matching message; \
             received instead: [Work(1), Work(2)]"
        );

        let err = probe
            .try_expect_msg(Duration::from_millis(250))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "expect_msg: timeout (250ms) waiting for a message; received nothing"
        );

        to_probe.send(Work(8)).await.unwrap();
        to_probe.send(Work(9)).await.unwrap();
        let err = probe.try_receive_n(3, SEC).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "receive_n: timeout (1s) waiting for 3 messages; received 2: [Work(8), Work(9)]"
        );

        to_probe.send(Work(10)).await.unwrap();
        let err = probe.try_expect_msg_eq(Work(1), SEC).await.unwrap_err();
        assert_eq!(err.kind(), ProbeErrorKind::Unexpected);
        assert_eq!(
            err.message(),
            "expect_msg_eq: expected Work(1), received Work(10)"
        );

        let later = probe.recipient();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            later.send(Work(7)).await.unwrap();
        });
        let err = probe.try_expect_no_msg(SEC).await.unwrap_err();
        assert_eq!(err.kind(), ProbeErrorKind::Unexpected);
        assert_eq!(
            err.to_string(),
            "expect_no_msg: expected no message for 1s, received Work(7) after 300ms"
        );

        probe.addr().stop();
        probe.addr().terminated().await;
        let err = probe.try_expect_msg(SEC).await.unwrap_err();
        assert_eq!(err.kind(), ProbeErrorKind::Stopped);
        assert_eq!(
            err.to_string(),
            "expect_msg: the probe's actor stopped while waiting for a message; received nothing"
        );
    });
}

#[test]
#[should_panic(
    expected = "expect_msg_matching: timeout (1s) waiting for a matching message; received instead: [Work(1), Work(2)]"
)]
fn a_failing_expectation_panics_with_the_same_message() {
    testkit::run(async {
        let mut probe = TestProbe::<Work>::new(&RuntimeHandle::local());
        probe.recipient().send(Work(1)).await.unwrap();
        probe.recipient().send(Work(2)).await.unwrap();
        probe.expect_msg_matching(|w| w.0 == 3, SEC).await;
    });
}

// ---------------------------------------------------------------- virtual time

/// Never answers.
struct Mute;
impl Actor for Mute {}
impl Handler<Work> for Mute {
    async fn handle(&mut self, _: Work, _: &mut Context<Self>) -> Result<(), Failure> {
        std::future::pending().await
    }
}

#[test]
fn an_hour_long_ask_timeout_completes_at_once() {
    let wall = std::time::Instant::now();
    testkit::run(async {
        let mute = RuntimeHandle::local().spawn(Mute);
        let hour = Duration::from_secs(3600);
        let start = Instant::now();
        let err = mute.ask(Work(1)).timeout(hour).await.unwrap_err();
        assert!(matches!(err, AskError::Timeout(d) if d == hour), "{err:?}");
        assert_eq!(start.elapsed(), hour);
    });
    // A generous bound: virtual time spared us the hour.
    assert!(wall.elapsed() < Duration::from_secs(60));
}

/// Reports each incarnation's start to a probe; `Crash` panics.
struct Phoenix {
    starts: Recipient<Started>,
}
#[derive(Debug)]
struct Started {
    incarnation: u64,
    at: Instant,
}
impl Message for Started {
    type Reply = ();
}
impl Actor for Phoenix {
    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), Failure> {
        let started = Started {
            incarnation: ctx.incarnation(),
            at: Instant::now(),
        };
        self.starts
            .send(started)
            .await
            .map_err(|_| Failure::msg("probe gone"))
    }
}
struct Crash;
impl Message for Crash {
    type Reply = ();
}
impl Handler<Crash> for Phoenix {
    async fn handle(&mut self, _: Crash, _: &mut Context<Self>) -> Result<(), Failure> {
        panic!("crash requested");
    }
}

#[test]
fn supervisor_backoff_is_exact_in_virtual_time() {
    testkit::run(async {
        let rt = RuntimeHandle::local();
        let mut starts = TestProbe::<Started>::new(&rt);
        let to_probe = starts.recipient();
        let sup = SupervisorSpec::new("sup")
            .intensity(10, Duration::from_secs(3600))
            .backoff(Backoff::exponential(SEC, 4 * SEC))
            .child(ChildSpec::new("phoenix", move || Phoenix {
                starts: to_probe.clone(),
            }))
            .spawn(&rt);
        let phoenix = sup.child::<Phoenix>("phoenix").await.unwrap();
        assert_eq!(starts.expect_msg(SEC).await.incarnation, 1);
        let mut delays = Vec::new();
        for incarnation in 2..=5 {
            let crashed = Instant::now();
            phoenix.send(Crash).await.unwrap();
            let started = starts.expect_msg(10 * SEC).await;
            assert_eq!(started.incarnation, incarnation);
            delays.push(started.at - crashed);
        }
        assert_eq!(delays, [SEC, 2 * SEC, 4 * SEC, 4 * SEC]);
    });
}

/// Reminds its listener after the delay it is given.
struct Reminder {
    listener: Recipient<Work>,
}
impl Actor for Reminder {}
struct RemindIn(Duration, u32);
impl Message for RemindIn {
    type Reply = ();
}
impl Handler<RemindIn> for Reminder {
    async fn handle(&mut self, msg: RemindIn, ctx: &mut Context<Self>) -> Result<(), Failure> {
        ctx.notify_later(Work(msg.1), msg.0);
        Ok(())
    }
}
impl Handler<Work> for Reminder {
    async fn handle(&mut self, work: Work, _: &mut Context<Self>) -> Result<(), Failure> {
        self.listener
            .send(work)
            .await
            .map_err(|_| Failure::msg("gone"))
    }
}

#[tokio::test(start_paused = true)]
async fn advance_drives_notify_later() {
    testkit::local(async {
        let rt = RuntimeHandle::local();
        let mut probe = TestProbe::<Work>::new(&rt);
        let reminder = rt.spawn(Reminder {
            listener: probe.recipient(),
        });
        let start = Instant::now();
        reminder.ask(RemindIn(10 * SEC, 1)).await.unwrap();
        reminder.ask(RemindIn(4 * SEC, 2)).await.unwrap();

        advance(3 * SEC).await;
        probe.expect_no_msg(Duration::ZERO).await;
        advance(SEC).await;
        probe.expect_msg_eq(Work(2), Duration::from_millis(1)).await;
        assert_eq!(start.elapsed(), 4 * SEC);
        advance(5 * SEC).await;
        probe.expect_no_msg(Duration::ZERO).await;
        advance(SEC).await;
        probe.expect_msg_eq(Work(1), Duration::from_millis(1)).await;
        assert_eq!(start.elapsed(), 10 * SEC);
    })
    .await;
}

#[test]
fn a_test_runtime_keeps_actors_and_clock_between_steps() {
    let rt = TestRuntime::new().unwrap();
    let (mut probe, reminder) = rt.block_on(async {
        let probe = TestProbe::<Work>::new(&rt.handle());
        let reminder = rt.handle().spawn(Reminder {
            listener: probe.recipient(),
        });
        (probe, reminder)
    });
    let start = rt.block_on(async {
        let start = Instant::now();
        reminder.ask(RemindIn(SEC, 5)).await.unwrap();
        start
    });
    rt.block_on(async {
        assert_eq!(probe.expect_msg(2 * SEC).await, Work(5));
        assert_eq!(start.elapsed(), SEC);
    });
}
