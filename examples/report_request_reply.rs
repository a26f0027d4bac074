//! Report request-reply: asynchronous requests, each with the caller's own
//! request id and a deadline, answered by a report, a structured error or
//! nothing in time.
//!
//! From section 4 of the seed tutorial (请求应答模式, "request-reply"): a
//! `ReportService` sends report requests to the `report.request` queue with
//! a request id and a reply-to address, returns at once, and hears each
//! result later in a listener (`handleReportResponse`); a `ReportProcessor`
//! generates each report and replies, with an error reply when it fails.
//! Here:
//!
//! - `--responders` supervised responders (`Broker::respond`) compete for
//!   `report.request`; a reply travels back to the requester's own reply
//!   queue, under the request's correlation id;
//! - the caller gives each request its own request id as correlation id
//!   (kept by the requester), sends them all with `send_to` a callback actor
//!   (the seed's listener), which gets exactly one `ReplyEvent` per request,
//!   and goes on without waiting;
//! - a request for an unknown region, or for a month not closed yet, fails in
//!   the responder with a `RemoteError` carrying a structured `ReportFailure`;
//!   the caller gets `RequestError::Remote` and matches on the decoded
//!   details;
//! - every tenth request asks for the full history, which takes `--slow-ms`,
//!   for a live dashboard that gives it only `--slow-deadline-ms`: it times
//!   out (`RequestError::Timeout`), and the reply that comes after is
//!   counted as late (`Requester::late_replies`), never delivered; a full
//!   history request still waiting in the queue when its deadline passes is
//!   skipped by the responder (`ResponderStats::expired`) and costs nothing.
//!   The other requests allow `--deadline-ms`.
//!
//! The inputs follow a fixed pattern (request `i`: `i % 10 == 3` an unknown
//! region, `== 5` a month not closed, `== 7` the full history, otherwise a
//! sales or inventory report), so the expected count of each outcome is
//! known. It checks that every request got exactly one outcome, of the
//! expected kind, that each report answers the request of its id, that each
//! structured error names what was wrong, and that every timed-out request's
//! reply was counted late or never produced.
//!
//! Run it with
//! `cargo run --release --example report_request_reply -- --requests 40 --responders 2`.
//!
//! Flags (defaults in brackets):
//! - `--requests N`: report requests [40];
//! - `--responders N`: competing responders [2];
//! - `--deadline-ms N`: deadline of ordinary requests [5000];
//! - `--slow-deadline-ms N`: deadline of full-history requests [100];
//! - `--slow-ms N`: time to build the full history [300] (keep it above its
//!   deadline); an ordinary report takes 2 ms.

// `support::secs` is not reachable from outside: the lint would fail clippy.
#[path = "support/mod.rs"]
pub mod support;

use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::time::{Duration, Instant};

use postbox::{Actor, Context, Failure, Handler, Runtime, RuntimeHandle};
use postbox_actors::rpc::{RemoteError, ReplyEvent, Request, RequestError};
use postbox_actors::{Broker, ConsumeOptions, DeleteOptions, Envelope, QueueOptions};
use serde::{Deserialize, Serialize};
use support::{Flags, Summary, secs};
use tokio::sync::mpsc;

/// The seed's request queue.
const QUEUE: &str = "report.request";
/// The regions the report service knows.
const REGIONS: [&str; 3] = ["north", "south", "east"];
/// The last month whose books are closed.
const LAST_CLOSED: &str = "2026-10";
/// Time to build an ordinary report.
const REPORT_TIME: Duration = Duration::from_millis(2);
/// How long the example waits for outcomes before giving up.
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
enum ReportKind {
    Sales,
    Inventory,
    FullHistory,
}

#[derive(Debug, Serialize, Deserialize)]
struct ReportRequest {
    request_id: String,
    kind: ReportKind,
    region: String,
    month: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ReportResponse {
    request_id: String,
    kind: ReportKind,
    rows: u32,
}

/// Why the report service refuses a request: sent back as a `RemoteError`'s
/// structured details.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "code")]
enum ReportFailure {
    UnknownRegion { region: String, known: Vec<String> },
    MonthNotClosed { month: String, last_closed: String },
}

/// What the caller expects of a request, from its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Expect {
    Report,
    UnknownRegion,
    MonthNotClosed,
    Timeout,
}

/// The request `i` of the fixed pattern, and what it should get.
fn input(i: usize) -> (ReportRequest, Expect) {
    let (kind, region, month, expect) = match i % 10 {
        3 => (
            ReportKind::Sales,
            "atlantis",
            "2026-09",
            Expect::UnknownRegion,
        ),
        5 => (
            ReportKind::Inventory,
            "south",
            "2027-01",
            Expect::MonthNotClosed,
        ),
        7 => (ReportKind::FullHistory, "east", "2026-10", Expect::Timeout),
        n if n % 2 == 0 => (ReportKind::Sales, REGIONS[i % 3], "2026-10", Expect::Report),
        _ => (
            ReportKind::Inventory,
            REGIONS[i % 3],
            "2026-08",
            Expect::Report,
        ),
    };
    let request = ReportRequest {
        request_id: format!("rpt-{i:05}"),
        kind,
        region: region.to_string(),
        month: month.to_string(),
    };
    (request, expect)
}

/// The seed's `ReportProcessor`: builds the report, or refuses with a
/// structured error.
async fn build_report(request: Request, slow: Duration) -> Result<Envelope, RemoteError> {
    let req: ReportRequest = request.decode()?;
    if !REGIONS.contains(&req.region.as_str()) {
        let failure = ReportFailure::UnknownRegion {
            region: req.region.clone(),
            known: REGIONS.iter().map(|r| r.to_string()).collect(),
        };
        return Err(
            RemoteError::new(format!("unknown region {}", req.region)).with_details(&failure)?
        );
    }
    if req.month.as_str() > LAST_CLOSED {
        let failure = ReportFailure::MonthNotClosed {
            month: req.month.clone(),
            last_closed: LAST_CLOSED.to_string(),
        };
        return Err(
            RemoteError::new(format!("{} is not closed", req.month)).with_details(&failure)?
        );
    }
    // A real service could stop early with `request.time_left()`; this one
    // finishes the report, whose reply then comes late.
    let work = if req.kind == ReportKind::FullHistory {
        slow
    } else {
        REPORT_TIME
    };
    tokio::time::sleep(work).await;
    let response = ReportResponse {
        rows: 10 + req.month.len() as u32 * 3,
        request_id: req.request_id,
        kind: req.kind,
    };
    Ok(Envelope::encode(&response)?)
}

/// What the caller made of one outcome.
#[derive(Debug)]
enum Outcome {
    Report { answers_its_request: bool },
    Refused(ReportFailure),
    TimedOut,
    Unexpected(String),
}

/// The seed's `handleReportResponse`: a callback actor that receives each
/// request's outcome, reply or error, and classifies it.
struct ReportInbox {
    outcomes: mpsc::UnboundedSender<(String, Outcome)>,
}

impl Actor for ReportInbox {}

impl Handler<ReplyEvent> for ReportInbox {
    async fn handle(&mut self, event: ReplyEvent, _: &mut Context<Self>) -> Result<(), Failure> {
        let id = event.id.to_string();
        let outcome = match event.result {
            Ok(reply) => match reply.decode::<ReportResponse>() {
                Ok(report) => Outcome::Report {
                    answers_its_request: report.request_id == id,
                },
                Err(err) => Outcome::Unexpected(format!("undecodable report: {err}")),
            },
            Err(err @ RequestError::Remote { .. }) => match err.details::<ReportFailure>() {
                Some(Ok(failure)) => Outcome::Refused(failure),
                _ => Outcome::Unexpected(format!("remote error without details: {err}")),
            },
            Err(RequestError::Timeout { .. }) => Outcome::TimedOut,
            Err(other) => Outcome::Unexpected(other.to_string()),
        };
        let _ = self.outcomes.send((id, outcome));
        Ok(())
    }
}

/// Runs the example: sends the requests, collects one outcome per request,
/// and checks them against what each input should get.
pub async fn run(rt: &RuntimeHandle, flags: &Flags) -> Result<Summary, Box<dyn Error>> {
    let n = flags.usize("requests", 40);
    let responders = flags.usize("responders", 2).max(1);
    let deadline = flags.millis("deadline-ms", Duration::from_millis(5000));
    let slow_deadline = flags.millis("slow-deadline-ms", Duration::from_millis(100));
    let slow = flags.millis("slow-ms", Duration::from_millis(300));
    let mut summary = Summary::new(format!(
        "report_request_reply: {n} report requests, {responders} responders, deadlines, structured errors"
    ));
    let broker = Broker::new(rt);
    broker.declare_queue(QUEUE, QueueOptions::default()).await?;
    let mut handles = Vec::with_capacity(responders);
    for _ in 0..responders {
        // Prefetch 1: a responder busy with a long report takes no other.
        let handle = broker
            .respond(QUEUE, ConsumeOptions::manual(1), move || {
                move |request: Request| build_report(request, slow)
            })
            .await?;
        handles.push(handle);
    }
    let client = broker.requester().await?;
    let (tx, mut outcomes) = mpsc::unbounded_channel();
    let inbox = rt.spawn(ReportInbox { outcomes: tx });

    // Send everything, each with its own id and deadline; nothing waits here.
    let started = Instant::now();
    let mut expected = HashMap::new();
    let mut kept_ids = 0;
    for i in 0..n {
        let (request, expect) = input(i);
        let timeout = if expect == Expect::Timeout {
            slow_deadline
        } else {
            deadline
        };
        let id = request.request_id.clone();
        let message = Envelope::encode(&request)?.with_correlation_id(id.clone());
        let sent = client
            .request(QUEUE, message)
            .timeout(timeout)
            .send_to(inbox.recipient())
            .await?;
        kept_ids += usize::from(sent.to_string() == id);
        expected.insert(id, (request, expect));
    }
    let sent_in = started.elapsed();

    // The outcomes, one by one as they come.
    let mut got: HashMap<String, Vec<Outcome>> = HashMap::new();
    let mut received = 0;
    while received < n {
        match tokio::time::timeout(PATIENCE, outcomes.recv()).await {
            Ok(Some((id, outcome))) => {
                got.entry(id).or_default().push(outcome);
                received += 1;
            }
            _ => return Err(format!("only {received} of {n} outcomes arrived").into()),
        }
    }
    let all_in = started.elapsed();

    // The late replies: each timed-out request's reply comes after its
    // deadline, unless the responder skipped it as expired.
    let count = |want: Expect| expected.values().filter(|(_, e)| *e == want).count();
    let timeouts = count(Expect::Timeout);
    let expired = || handles.iter().map(|h| h.stats().expired).sum::<u64>();
    let settled = tokio::time::timeout(PATIENCE, async {
        while client.stats().late + expired() < timeouts as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    if settled.is_err() {
        return Err("late replies did not all come in".into());
    }
    // Anything else that came in the meantime (a second outcome) counts too.
    tokio::time::sleep(Duration::from_millis(20)).await;
    while let Ok((id, outcome)) = outcomes.try_recv() {
        got.entry(id).or_default().push(outcome);
    }
    let stats = client.stats();
    let late: HashSet<String> = client.late_replies().into_iter().collect();
    let (replied, errors) = handles.iter().fold((0, 0), |(r, e), h| {
        let s = h.stats();
        (r + s.replied, e + s.errors)
    });
    let expired = expired();

    // Tidy up.
    for handle in handles {
        handle.cancel().await;
    }
    drop((client, inbox));
    broker.delete_queue(QUEUE, DeleteOptions::default()).await?;
    drop(broker);

    let outcome_of = |id: &str| got.get(id).map(Vec::as_slice).unwrap_or_default();
    let matches = |id: &str, (request, want): &(ReportRequest, Expect)| -> bool {
        match (outcome_of(id), want) {
            (
                [
                    Outcome::Report {
                        answers_its_request,
                    },
                ],
                Expect::Report,
            ) => *answers_its_request,
            (
                [Outcome::Refused(ReportFailure::UnknownRegion { region, known })],
                Expect::UnknownRegion,
            ) => *region == request.region && known.len() == REGIONS.len(),
            (
                [Outcome::Refused(ReportFailure::MonthNotClosed { month, last_closed })],
                Expect::MonthNotClosed,
            ) => *month == request.month && last_closed == LAST_CLOSED,
            ([Outcome::TimedOut], Expect::Timeout) => true,
            _ => false,
        }
    };
    let tally = |f: fn(&Outcome) -> bool| got.values().flatten().filter(|o| f(o)).count();
    let reports = tally(|o| matches!(o, Outcome::Report { .. }));
    let refused = tally(|o| matches!(o, Outcome::Refused(_)));
    let timed_out = tally(|o| matches!(o, Outcome::TimedOut));
    let unexpected: Vec<&str> = got
        .values()
        .flatten()
        .filter_map(|o| match o {
            Outcome::Unexpected(what) => Some(what.as_str()),
            _ => None,
        })
        .collect();
    summary.line(format!(
        "{n} requests sent in {} without waiting; all outcomes in {}",
        secs(sent_in),
        secs(all_in)
    ));
    summary.line(format!(
        "outcomes: {reports} reports, {refused} structured errors ({} unknown region, {} month not closed), {timed_out} timeouts{}",
        count(Expect::UnknownRegion),
        count(Expect::MonthNotClosed),
        if unexpected.is_empty() { String::new() } else { format!(", unexpected: {unexpected:?}") }
    ));
    summary.line(format!(
        "responders: {replied} replied, {errors} refused, {expired} skipped as expired; requester: {} replies in time (reports and errors), {} late",
        stats.replies, stats.late
    ));
    summary.check(
        "every request got exactly one outcome, under its own request id",
        kept_ids == n && got.len() == n && expected.keys().all(|id| outcome_of(id).len() == 1),
    );
    summary.check(
        format!(
            "each outcome is what its input calls for: {} reports, {} structured errors, {timeouts} timeouts",
            count(Expect::Report),
            count(Expect::UnknownRegion) + count(Expect::MonthNotClosed),
        ),
        expected.iter().all(|(id, input)| matches(id, input)),
    );
    summary.check(
        "each timed-out request's reply was counted late (or never built: expired), none delivered",
        stats.late + expired == timeouts as u64
            && late.len() as u64 == stats.late.min(1024)
            && late
                .iter()
                .all(|id| expected.get(id).is_some_and(|(_, e)| *e == Expect::Timeout)),
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
