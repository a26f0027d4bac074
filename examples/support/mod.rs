//! What every example shares: flags (`--name value`, each with a small
//! default), a short summary printed at the end, and the invariant check
//! that makes an example exit non-zero when what it promises did not hold.
//!
//! Each example is a file of `examples/` with
//! `pub async fn run(rt: &RuntimeHandle, flags: &Flags) -> Result<Summary, Box<dyn Error>>`,
//! which the tour calls too, and a `#[tokio::main] main` that parses the
//! flags, starts a `Runtime`, runs it, prints the summary and exits 1 if a
//! check failed (`Summary::exit`).

#![allow(dead_code, unreachable_pub)]

use std::fmt::Write as _;
use std::time::Duration;

/// Flags given as `--name value` (or `--name=value`), read by name with a
/// default.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pairs: Vec<(String, String)>,
}

impl Flags {
    /// The process's flags.
    pub fn from_args() -> Self {
        Self::parse(std::env::args().skip(1))
    }

    /// Flags from `args`; anything that is not `--name value` is ignored
    /// (cargo may pass `--bench`).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Self {
        let mut pairs = Vec::new();
        let mut args = args.into_iter().peekable();
        while let Some(arg) = args.next() {
            let Some(name) = arg.strip_prefix("--") else {
                continue;
            };
            if let Some((name, value)) = name.split_once('=') {
                pairs.push((name.to_string(), value.to_string()));
            } else if let Some(value) = args.next_if(|v| !v.starts_with("--")) {
                pairs.push((name.to_string(), value));
            } else {
                pairs.push((name.to_string(), "true".to_string()));
            }
        }
        Flags { pairs }
    }

    /// Flags for the tour: the defaults, with `pairs` on top.
    pub fn with(pairs: &[(&str, &str)]) -> Self {
        Flags {
            pairs: pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A number flag; the default when absent or not a number.
    pub fn u64(&self, name: &str, default: u64) -> u64 {
        self.get(name)
            .and_then(|v| v.replace('_', "").parse().ok())
            .unwrap_or(default)
    }

    /// A number flag as `usize`.
    pub fn usize(&self, name: &str, default: usize) -> usize {
        usize::try_from(self.u64(name, default as u64)).unwrap_or(default)
    }

    /// A number flag as `u32`.
    pub fn u32(&self, name: &str, default: u32) -> u32 {
        u32::try_from(self.u64(name, u64::from(default))).unwrap_or(default)
    }

    /// A duration flag in milliseconds.
    pub fn millis(&self, name: &str, default: Duration) -> Duration {
        Duration::from_millis(self.u64(name, default.as_millis() as u64))
    }

    /// A string flag.
    pub fn string(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or(default).to_string()
    }

    /// Whether a switch (`--name`, or `--name true`) is on.
    pub fn switch(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1" | "yes"))
    }
}

/// What an example tells when it is done: a title, a few lines of what
/// happened (counts, timings), and the checks of its invariant.
#[derive(Debug)]
pub struct Summary {
    title: String,
    lines: Vec<String>,
    checks: Vec<(String, bool)>,
}

impl Summary {
    /// An empty summary under `title`.
    pub fn new(title: impl Into<String>) -> Self {
        Summary {
            title: title.into(),
            lines: Vec::new(),
            checks: Vec::new(),
        }
    }

    /// A line of what happened.
    pub fn line(&mut self, line: impl Into<String>) -> &mut Self {
        self.lines.push(line.into());
        self
    }

    /// A check of what the example promises: `what` held or not.
    pub fn check(&mut self, what: impl Into<String>, held: bool) -> &mut Self {
        self.checks.push((what.into(), held));
        self
    }

    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|(_, held)| *held)
    }

    /// The summary as text.
    pub fn render(&self) -> String {
        let mut out = format!("== {}\n", self.title);
        for line in &self.lines {
            let _ = writeln!(out, "   {line}");
        }
        for (what, held) in &self.checks {
            let mark = if *held { "✓" } else { "✗ FAILED:" };
            let _ = writeln!(out, "   {mark} {what}");
        }
        out
    }

    /// Prints the summary and exits: 0 if every check held, 1 if not.
    pub fn exit(self) -> ! {
        print!("{}", self.render());
        std::process::exit(if self.passed() { 0 } else { 1 })
    }
}

/// Keeps the panics an example causes on purpose (in consumers, raised in
/// `file` or injected by the test kit, on the runtime's threads) from
/// printing a notice each; any other panic is reported as usual.
pub fn quiet_panics_from(file: &'static str) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Raised in the example, or injected by the test kit for it.
        let injected = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|m| m.starts_with("postbox testkit: injected"));
        let ours = injected || info.location().is_some_and(|l| l.file() == file);
        let on_main = std::thread::current().name() == Some("main");
        if !ours || on_main {
            default(info);
        }
    }));
}

/// Seconds, for summaries.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
