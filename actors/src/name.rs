//! Validation of user-chosen queue and exchange names, routing keys and binding
//! patterns.

use std::fmt;
use std::sync::Arc;

/// The longest accepted name, in bytes (RabbitMQ's limit for queue and exchange names).
pub const MAX_NAME_LEN: usize = 255;

/// What a name belongs to; used only to word error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NameKind {
    /// A queue name.
    Queue,
    /// An exchange name.
    Exchange,
    /// A message's routing key.
    RoutingKey,
    /// A binding key or topic pattern.
    BindingKey,
    /// A stream name.
    Stream,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Queue => "queue",
            Self::Exchange => "exchange",
            Self::RoutingKey => "routing key",
            Self::BindingKey => "binding key",
            Self::Stream => "stream",
        })
    }
}

/// Why a name was refused.
///
/// Names end up in logs, metrics labels, error messages and (later) on disk and on the
/// wire to RabbitMQ, whose own limit is 255 bytes. Checking them once, when a queue or
/// exchange is declared, keeps every later consumer of the name free of these concerns.
///
/// The rules are deliberately few: a name must be non-empty, at most [`MAX_NAME_LEN`]
/// bytes of UTF-8, and free of ASCII control characters. The default exchange `""` is
/// built in and is never declared, so it does not go through this check.
///
/// ```
/// use postbox_actors::{Broker, BrokerError, NameError, NameKind, QueueOptions};
/// # postbox::testkit::run(async {
/// let broker = Broker::new(&postbox::RuntimeHandle::local());
/// assert!(broker.declare_queue("orders.created", QueueOptions::default()).await.is_ok());
/// assert_eq!(
///     broker.declare_queue("", QueueOptions::default()).await.unwrap_err(),
///     BrokerError::InvalidName(NameError::Empty { kind: NameKind::Queue }),
/// );
/// # });
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("{kind} name is empty")]
    Empty {
        /// What the name was for.
        kind: NameKind,
    },
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("{kind} name is {len} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// What the name was for.
        kind: NameKind,
        /// The name's length in bytes.
        len: usize,
    },
    /// The name contains an ASCII control character (`\0`..`\x1f` or DEL).
    #[error("{kind} name {name:?} contains a control character at byte {index}")]
    ControlChar {
        /// What the name was for.
        kind: NameKind,
        /// The offending name (at most [`MAX_NAME_LEN`] bytes, since length is checked first).
        name: String,
        /// Byte offset of the first control character.
        index: usize,
    },
    /// The name starts with `amq.`, a prefix RabbitMQ reserves for the broker
    /// (its built-in exchanges, server-named queues); declaring one is refused.
    #[error("{kind} name {name:?} contains reserved prefix 'amq.'")]
    Reserved {
        /// What the name was for.
        kind: NameKind,
        /// The refused name.
        name: String,
    },
}

/// The prefix RabbitMQ reserves for the broker's own queues and exchanges.
pub const RESERVED_PREFIX: &str = "amq.";

/// Checks a name a user declares a queue, exchange or stream with: a valid
/// name ([`validate_name`]) that does not start with [`RESERVED_PREFIX`]
/// (RabbitMQ refuses those with `ACCESS_REFUSED`).
///
/// # Errors
/// Those of [`validate_name`], or [`NameError::Reserved`].
///
pub(crate) fn validate_declared(kind: NameKind, name: &str) -> Result<(), NameError> {
    validate_name(kind, name)?;
    if name.starts_with(RESERVED_PREFIX) {
        return Err(NameError::Reserved {
            kind,
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Checks that `name` is acceptable as a queue or exchange name.
///
/// Rules are checked in order, and the first one broken is reported: non-empty, at most
/// [`MAX_NAME_LEN`] bytes, no ASCII control character (including `\0`, `\t`, `\n` and
/// DEL). Any other Unicode is accepted.
///
/// # Errors
/// [`NameError::Empty`], [`NameError::TooLong`] or [`NameError::ControlChar`].
pub(crate) fn validate_name(kind: NameKind, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            kind,
            len: name.len(),
        });
    }
    // Control characters are all ASCII, and UTF-8 never uses ASCII bytes inside a
    // multi-byte sequence, so a byte scan is exact and gives the byte index directly.
    if let Some(index) = name.bytes().position(|b| b.is_ascii_control()) {
        return Err(NameError::ControlChar {
            kind,
            name: name.to_owned(),
            index,
        });
    }
    Ok(())
}

/// Checks a routing key or binding key: like [`validate_name`], except that the
/// empty key is valid (it is meaningful: for topic exchanges it has zero words).
///
/// # Errors
/// [`NameError::TooLong`] or [`NameError::ControlChar`].
pub(crate) fn validate_key(kind: NameKind, key: &str) -> Result<(), NameError> {
    if key.is_empty() {
        return Ok(());
    }
    validate_name(kind, key)
}

/// An actor's name in one allocation: `format!` and a conversion to
/// `Arc<str>` would take two, and a name is made for every queue and
/// consumer. Longer names than a queue name with a prefix fall back to that.
pub(crate) fn actor_name(args: fmt::Arguments<'_>) -> Arc<str> {
    struct Stack {
        buf: [u8; MAX_NAME_LEN + 64],
        len: usize,
    }
    impl fmt::Write for Stack {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let end = self.len + s.len();
            let room = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
            room.copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }
    let mut stack = Stack {
        buf: [0; MAX_NAME_LEN + 64],
        len: 0,
    };
    if fmt::Write::write_fmt(&mut stack, args).is_ok()
        && let Ok(name) = std::str::from_utf8(&stack.buf[..stack.len])
    {
        return Arc::from(name);
    }
    Arc::from(fmt::format(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        use NameKind::{Exchange, Queue};
        let long = "x".repeat(MAX_NAME_LEN);
        let too_long = "x".repeat(MAX_NAME_LEN + 1);
        // 128 two-byte characters: 128 chars but 256 bytes.
        let too_long_utf8 = "é".repeat(128);
        let control = |kind, name: &str, index| {
            Err(NameError::ControlChar {
                kind,
                name: name.to_owned(),
                index,
            })
        };
        let cases: Vec<(NameKind, &str, Result<(), NameError>)> = vec![
            (Queue, "orders", Ok(())),
            (Exchange, "amq.topic", Ok(())),
            (Queue, "a b-c_d.e/f:g", Ok(())),
            (Queue, "заказы", Ok(())),
            (Queue, "📦", Ok(())),
            (Queue, &long, Ok(())),
            (Queue, "", Err(NameError::Empty { kind: Queue })),
            (Exchange, "", Err(NameError::Empty { kind: Exchange })),
            (
                Queue,
                &too_long,
                Err(NameError::TooLong {
                    kind: Queue,
                    len: 256,
                }),
            ),
            (
                Exchange,
                &too_long_utf8,
                Err(NameError::TooLong {
                    kind: Exchange,
                    len: 256,
                }),
            ),
            (Queue, "a\0b", control(Queue, "a\0b", 1)),
            (Queue, "\nq", control(Queue, "\nq", 0)),
            (Exchange, "tab\there", control(Exchange, "tab\there", 3)),
            (Queue, "del\x7f", control(Queue, "del\x7f", 3)),
            (Queue, "é\x1b", control(Queue, "é\x1b", 2)),
        ];
        for (kind, name, expected) in cases {
            assert_eq!(validate_name(kind, name), expected, "{kind} {name:?}");
        }
    }

    #[test]
    fn the_amq_prefix_is_reserved_for_declarations_only() {
        for kind in [NameKind::Queue, NameKind::Exchange, NameKind::Stream] {
            assert_eq!(
                validate_declared(kind, "amq.gen-1"),
                Err(NameError::Reserved {
                    kind,
                    name: "amq.gen-1".into()
                })
            );
            assert!(validate_declared(kind, "amq").is_ok());
            assert!(validate_declared(kind, "xamq.y").is_ok());
            assert!(
                validate_declared(kind, "AMQ.y").is_ok(),
                "case-sensitive, as RabbitMQ"
            );
        }
        // Keys may use it, and names are otherwise valid.
        assert!(validate_key(NameKind::RoutingKey, "amq.x").is_ok());
        assert!(validate_name(NameKind::Exchange, "amq.topic").is_ok());
        assert_eq!(
            validate_declared(NameKind::Queue, "amq.q")
                .unwrap_err()
                .to_string(),
            "queue name \"amq.q\" contains reserved prefix 'amq.'"
        );
    }

    #[test]
    fn messages() {
        assert_eq!(
            validate_name(NameKind::Queue, "").unwrap_err().to_string(),
            "queue name is empty"
        );
        assert_eq!(
            validate_name(NameKind::Queue, &"q".repeat(300))
                .unwrap_err()
                .to_string(),
            "queue name is 300 bytes long; the limit is 255"
        );
        assert_eq!(
            validate_name(NameKind::Exchange, "a\nb")
                .unwrap_err()
                .to_string(),
            r#"exchange name "a\nb" contains a control character at byte 1"#
        );
    }

    #[test]
    fn actor_names_of_any_length() {
        assert_eq!(
            &*actor_name(format_args!("queue:{}", "orders")),
            "queue:orders"
        );
        let long = "é".repeat(MAX_NAME_LEN);
        let name = actor_name(format_args!("consumer:{long}:{}", 7));
        assert_eq!(&*name, format!("consumer:{long}:7"));
    }
}
