//! Why an actor stopped: [`Failure`] for handlers that fail, [`ExitReason`] for
//! every way an incarnation can end.
//!
//! A handler signals "I am broken, rebuild me" by returning `Err(Failure)`; a panic
//! in a handler is caught and turned into a `Failure` of kind [`FailureKind::Panic`].
//! Business errors that the caller should see without the actor restarting belong
//! in the reply type instead (`Reply = Result<T, MyError>`).

use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// What kind of failure ended an actor's incarnation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// A handler or lifecycle hook returned `Err`.
    Error,
    /// A handler, lifecycle hook or factory panicked.
    Panic,
    /// A supervisor gave up: its children failed more often than its restart
    /// intensity allows.
    Escalation,
}

/// The error type of handlers: the actor failed and its supervisor decides what
/// happens next.
///
/// Any `std::error::Error` converts into it, so `?` works in handlers:
///
/// ```
/// use postbox::Failure;
/// fn parse(input: &str) -> Result<u32, Failure> {
///     Ok(input.parse::<u32>()?)
/// }
/// assert!(parse("x").is_err());
/// assert_eq!(parse("7").unwrap(), 7);
/// ```
#[derive(Clone)]
pub struct Failure {
    kind: FailureKind,
    message: Arc<str>,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Failure {
    /// A failure with a message.
    pub fn msg(message: impl Into<String>) -> Self {
        Failure {
            kind: FailureKind::Error,
            message: Arc::from(message.into()),
            source: None,
        }
    }

    /// A failure of the given kind.
    pub fn with_kind(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: Arc::from(message.into()),
            source: None,
        }
    }

    /// Builds a failure from a caught panic payload (as from
    /// `std::panic::catch_unwind`), keeping its message.
    ///
    /// ```
    /// use postbox::{Failure, FailureKind};
    /// let caught = std::panic::catch_unwind(|| panic!("boom")).unwrap_err();
    /// let failure = Failure::from_panic(caught);
    /// assert_eq!(failure.kind(), FailureKind::Panic);
    /// assert!(failure.to_string().contains("boom"));
    /// ```
    pub fn from_panic(payload: Box<dyn Any + Send>) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
            (*s).to_string()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "panic with a non-string payload".to_string()
        };
        Failure::with_kind(FailureKind::Panic, message)
    }

    /// The kind of failure.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The failure's message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True when this failure was a caught panic.
    pub fn is_panic(&self) -> bool {
        self.kind == FailureKind::Panic
    }

    /// The underlying error, when the failure was converted from one.
    pub fn source_error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for Failure {
    fn from(err: E) -> Self {
        Failure {
            kind: FailureKind::Error,
            message: Arc::from(err.to_string()),
            source: Some(Arc::new(err)),
        }
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failure")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FailureKind::Error => write!(f, "{}", self.message),
            FailureKind::Panic => write!(f, "panicked: {}", self.message),
            FailureKind::Escalation => write!(f, "escalated: {}", self.message),
        }
    }
}

/// How one incarnation of an actor ended.
#[derive(Clone, Debug)]
pub enum ExitReason {
    /// The actor stopped itself (`Context::stop`) or every address to it was dropped.
    Normal,
    /// It was stopped from outside: by `Addr::stop`, its supervisor, or runtime shutdown.
    Stopped,
    /// It was restarted by its supervisor while healthy (one-for-all, rest-for-one).
    Restarted,
    /// A handler failed or panicked.
    Failed(Failure),
}

impl ExitReason {
    /// True for [`ExitReason::Failed`].
    pub fn is_failure(&self) -> bool {
        matches!(self, ExitReason::Failed(_))
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Normal => f.write_str("stopped normally"),
            ExitReason::Stopped => f.write_str("stopped"),
            ExitReason::Restarted => f.write_str("restarted by its supervisor"),
            ExitReason::Failed(failure) => write!(f, "failed: {failure}"),
        }
    }
}
