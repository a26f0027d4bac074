//! Threshold alerts: what to watch ([`Thresholds`]), what fires
//! ([`Alert`]), and the crossing logic that fires each alert once when its
//! condition starts and clears it once when it ends.

use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::Serialize;

/// The conditions a monitor raises alerts on, for every queue or for one
/// ([`MonitorOptions::queue_thresholds`](super::MonitorOptions::queue_thresholds)).
/// Each is off unless set.
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::monitor::Thresholds;
/// let watch = Thresholds::default()
///     .depth(10_000)
///     .oldest_message(Duration::from_secs(60))
///     .no_consumers()
///     .crash_loop(3, Duration::from_secs(60))
///     .publishers_blocked(Duration::from_secs(5));
/// # let _ = watch;
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Thresholds {
    /// Fires when more messages than this are ready.
    pub depth: Option<usize>,
    /// Fires when the message to be delivered next is older than this.
    pub oldest_message: Option<Duration>,
    /// Fires when messages are ready and no consumer is registered.
    pub no_consumers: bool,
    /// Fires when the queue's consumers crashed this many times within the
    /// window (a consumer restarting in a loop); clears once a window passes
    /// without that many.
    pub crash_loop: Option<(u32, Duration)>,
    /// Fires when publishers have waited for room (overflow `block`) for
    /// longer than this without a break.
    pub publishers_blocked: Option<Duration>,
}

impl Thresholds {
    /// Sets [`depth`](Self::depth).
    pub fn depth(mut self, ready: usize) -> Self {
        self.depth = Some(ready);
        self
    }

    /// Sets [`oldest_message`](Self::oldest_message).
    pub fn oldest_message(mut self, age: Duration) -> Self {
        self.oldest_message = Some(age);
        self
    }

    /// Sets [`no_consumers`](Self::no_consumers).
    pub fn no_consumers(mut self) -> Self {
        self.no_consumers = true;
        self
    }

    /// Sets [`crash_loop`](Self::crash_loop).
    pub fn crash_loop(mut self, crashes: u32, within: Duration) -> Self {
        self.crash_loop = Some((crashes.max(1), within));
        self
    }

    /// Sets [`publishers_blocked`](Self::publishers_blocked).
    pub fn publishers_blocked(mut self, longer_than: Duration) -> Self {
        self.publishers_blocked = Some(longer_than);
        self
    }
}

/// What an alert is about, with the value that crossed the threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[non_exhaustive]
pub enum AlertKind {
    /// Too many ready messages.
    Depth {
        /// Ready messages when it fired (or cleared).
        ready: usize,
        /// The threshold.
        threshold: usize,
    },
    /// The next message has waited too long.
    OldestMessage {
        /// Its age when the alert fired (or cleared: 0 for an empty queue).
        age_ms: u64,
        /// The threshold.
        threshold_ms: u64,
    },
    /// Messages wait and nobody consumes.
    NoConsumers {
        /// Ready messages.
        ready: usize,
    },
    /// Consumers keep crashing.
    CrashLooping {
        /// Crashes within the window.
        crashes: u32,
        /// The window.
        within_ms: u64,
    },
    /// Publishers have waited for room too long.
    PublishersBlocked {
        /// For how long, so far (or in all, when it clears).
        for_ms: u64,
        /// The threshold.
        threshold_ms: u64,
    },
}

impl AlertKind {
    /// The condition, without its values: what identifies one alert.
    fn condition(&self) -> u8 {
        match self {
            AlertKind::Depth { .. } => 0,
            AlertKind::OldestMessage { .. } => 1,
            AlertKind::NoConsumers { .. } => 2,
            AlertKind::CrashLooping { .. } => 3,
            AlertKind::PublishersBlocked { .. } => 4,
        }
    }
}

/// An alert firing or clearing: one event per crossing each way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Alert {
    /// The queue it is about.
    pub queue: String,
    /// The condition and its value.
    #[serde(flatten)]
    pub kind: AlertKind,
    /// True when it starts, false when it clears.
    pub firing: bool,
    /// When (epoch ms, [`postbox::clock::now_ms`]).
    pub at_ms: u64,
}

/// What one queue looks like to the alert rules at a sample.
pub(super) struct Observed {
    pub(super) ready: usize,
    pub(super) consumers: usize,
    pub(super) head_age_ms: Option<u64>,
    pub(super) waiting_publishes: usize,
    /// Crash times (epoch ms) within the longest window watched.
    pub(super) crashes: u32,
}

/// The alerts firing now, and since when publishers of each queue wait.
#[derive(Default)]
pub(super) struct AlertState {
    /// The alerts firing, with when each fired.
    firing: FxHashMap<(String, u8), (AlertKind, u64)>,
    blocked_since: FxHashMap<String, u64>,
}

impl AlertState {
    /// Checks `queue` against `t` at `now`; returns the alerts that fire or
    /// clear.
    pub(super) fn check(
        &mut self,
        queue: &str,
        t: &Thresholds,
        seen: &Observed,
        now: u64,
        out: &mut Vec<Alert>,
    ) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if let Some(threshold) = t.depth {
            let kind = AlertKind::Depth {
                ready: seen.ready,
                threshold,
            };
            self.set(queue, kind, seen.ready > threshold, now, out);
        }
        if let Some(max) = t.oldest_message {
            let age_ms = seen.head_age_ms.unwrap_or(0);
            let kind = AlertKind::OldestMessage {
                age_ms,
                threshold_ms: ms(max),
            };
            self.set(queue, kind, age_ms > ms(max), now, out);
        }
        if t.no_consumers {
            let kind = AlertKind::NoConsumers { ready: seen.ready };
            self.set(queue, kind, seen.ready > 0 && seen.consumers == 0, now, out);
        }
        if let Some((crashes, within)) = t.crash_loop {
            let kind = AlertKind::CrashLooping {
                crashes: seen.crashes,
                within_ms: ms(within),
            };
            self.set(queue, kind, seen.crashes >= crashes, now, out);
        }
        let since = if seen.waiting_publishes > 0 {
            *self.blocked_since.entry(queue.to_string()).or_insert(now)
        } else {
            self.blocked_since.remove(queue).unwrap_or(now)
        };
        if let Some(max) = t.publishers_blocked {
            let kind = AlertKind::PublishersBlocked {
                for_ms: now.saturating_sub(since),
                threshold_ms: ms(max),
            };
            let on = seen.waiting_publishes > 0 && now.saturating_sub(since) > ms(max);
            self.set(queue, kind, on, now, out);
        }
    }

    /// Fires `kind` if `on` and it is not firing, clears it if not `on` and
    /// it is.
    fn set(&mut self, queue: &str, kind: AlertKind, on: bool, now: u64, out: &mut Vec<Alert>) {
        let key = (queue.to_string(), kind.condition());
        let was = self.firing.contains_key(&key);
        if on == was {
            return;
        }
        if on {
            tracing::warn!(queue, alert = ?kind, "alert firing");
            self.firing.insert(key, (kind, now));
        } else {
            tracing::info!(queue, alert = ?kind, "alert cleared");
            self.firing.remove(&key);
        }
        out.push(Alert {
            queue: queue.to_string(),
            kind,
            firing: on,
            at_ms: now,
        });
    }

    /// Clears the alerts of a queue that is gone.
    pub(super) fn forget_except(
        &mut self,
        alive: &dyn Fn(&str) -> bool,
        now: u64,
        out: &mut Vec<Alert>,
    ) {
        let gone: Vec<(String, u8)> = self
            .firing
            .keys()
            .filter(|(q, _)| !alive(q))
            .cloned()
            .collect();
        for key in gone {
            if let Some((kind, _)) = self.firing.remove(&key) {
                tracing::info!(queue = %key.0, alert = ?kind, "alert cleared: queue gone");
                out.push(Alert {
                    queue: key.0,
                    kind,
                    firing: false,
                    at_ms: now,
                });
            }
        }
        self.blocked_since.retain(|q, _| alive(q));
    }

    /// The alerts firing now.
    pub(super) fn firing(&self) -> Vec<Alert> {
        self.firing
            .iter()
            .map(|((queue, _), (kind, at_ms))| Alert {
                queue: queue.clone(),
                kind: *kind,
                firing: true,
                at_ms: *at_ms,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(ready: usize) -> Observed {
        Observed {
            ready,
            consumers: 1,
            head_age_ms: None,
            waiting_publishes: 0,
            crashes: 0,
        }
    }

    #[test]
    fn a_depth_alert_fires_once_per_crossing_and_clears_once() {
        let t = Thresholds::default().depth(10);
        let mut state = AlertState::default();
        let mut out = Vec::new();
        for (i, ready) in [5, 11, 20, 30, 10, 3, 0, 12, 12].into_iter().enumerate() {
            state.check("q", &t, &seen(ready), i as u64, &mut out);
        }
        let events: Vec<(bool, u64)> = out.iter().map(|a| (a.firing, a.at_ms)).collect();
        assert_eq!(events, [(true, 1), (false, 4), (true, 7)]);
        assert_eq!(state.firing().len(), 1);
    }

    #[test]
    fn publishers_blocked_fires_after_the_threshold_without_a_break() {
        let t = Thresholds::default().publishers_blocked(Duration::from_millis(100));
        let mut state = AlertState::default();
        let mut out = Vec::new();
        let waiting = |w| Observed {
            waiting_publishes: w,
            ..seen(1)
        };
        for (now, w) in [
            (0, 1),
            (50, 1),
            (90, 0),
            (100, 1),
            (150, 1),
            (201, 1),
            (250, 0),
        ] {
            state.check("q", &t, &waiting(w), now, &mut out);
        }
        let events: Vec<(bool, u64)> = out.iter().map(|a| (a.firing, a.at_ms)).collect();
        assert_eq!(events, [(true, 201), (false, 250)]);
    }
}
