//! The RabbitMQ backend (feature `amqp`): the [`Broker`](crate::Broker) API
//! served by a RabbitMQ server through `lapin`, for applications that outgrow
//! one process.
//!
//! [`Broker::connect`](crate::Broker::connect) with an `amqp://` or
//! `amqps://` URL (or [`Broker::connect_with`](crate::Broker::connect_with)
//! and [`AmqpOptions`], for a CA certificate) returns a broker whose queues,
//! exchanges and bindings live on RabbitMQ. Consumers stay supervised actors
//! running [`Consumer`](crate::Consumer)s; their code does not change.
//!
//! - `connection`: the connection, its channels, reconnecting with backoff
//!   and redeclaring the topology this process declared;
//! - `topology`: queue and exchange options as RabbitMQ arguments, and
//!   RabbitMQ's refusals as [`BrokerError`]s;
//! - `publish`: publishes with publisher confirms (`mandatory`, so that a
//!   publish to a missing queue is refused as it is embedded);
//! - `consume`: consumers on their own channels, deliveries settled through
//!   the same link as embedded ones (so double acks are typed errors), and
//!   `basic.get`;
//! - `replies`: request-reply through direct reply-to;
//! - `streams`: streams as RabbitMQ stream queues, read by supervised
//!   subscribers from an `x-stream-offset`;
//! - `convert`: envelopes to AMQP properties and back, with `x-death` read
//!   into the typed death history.
//!
//! Where RabbitMQ differs, the README's "postbox on RabbitMQ" section says
//! so; what RabbitMQ lacks (duplicate windows on queues and exchanges,
//! `block` and `drop-new` overflow, delayed requeue) the backend provides on
//! this side, and what it cannot provide fails with
//! [`BrokerError::Unsupported`].

mod connection;
mod consume;
mod convert;
mod publish;
mod replies;
mod streams;
mod topology;

pub(crate) use connection::Remote;
pub(crate) use consume::RemoteQueue;
pub(crate) use replies::{REPLY_TO, Replies, Route, Sent};
pub(crate) use streams::AmqpStream;

use std::fmt;
use std::time::Duration;

use crate::error::BrokerError;
use crate::secret::{redact, scrub, url_secrets};

/// How to reach RabbitMQ.
///
/// ```
/// use postbox_actors::amqp::AmqpOptions;
/// let options = AmqpOptions::new("amqp://app:s3cret@rabbit.internal:5672/%2f");
/// // The password never shows.
/// assert_eq!(format!("{options:?}").contains("s3cret"), false);
/// ```
#[derive(Clone)]
pub struct AmqpOptions {
    url: String,
    ca_certificate: Option<String>,
    connection_name: Option<String>,
    timeout: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
}

impl fmt::Debug for AmqpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpOptions")
            .field("url", &redact(&self.url))
            .field("ca_certificate", &self.ca_certificate.is_some())
            .field("connection_name", &self.connection_name)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl AmqpOptions {
    /// Options for `url` (`amqp://user:password@host:port/vhost`, or
    /// `amqps://` for TLS), with a 30-second limit on each operation and
    /// reconnection backoff from 100 ms to 5 s.
    pub fn new(url: impl Into<String>) -> Self {
        AmqpOptions {
            url: url.into(),
            ca_certificate: None,
            connection_name: None,
            timeout: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }

    /// Trusts this CA certificate (PEM) for `amqps://`, besides the system's
    /// roots: a server whose certificate it signed is accepted.
    pub fn ca_certificate(mut self, pem: impl Into<String>) -> Self {
        self.ca_certificate = Some(pem.into());
        self
    }

    /// The connection's name, as RabbitMQ's management UI shows it.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// The longest any operation waits, for the connection included (while
    /// reconnecting, calls wait up to this long for the connection to be
    /// back, then fail).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The backoff between reconnection attempts: doubling from `min` up
    /// to `max`.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max.max(min);
        self
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Checks the URL's scheme and form.
    fn validate(&self) -> Result<(), BrokerError> {
        let scheme_ok = self.url.starts_with("amqp://") || self.url.starts_with("amqps://");
        if !scheme_ok {
            return Err(BrokerError::InvalidUrl {
                url: self.redacted_url(),
                reason: "the scheme must be amqp:// or amqps://".into(),
            });
        }
        self.url
            .parse::<lapin::uri::AMQPUri>()
            .map(|_| ())
            .map_err(|reason| BrokerError::InvalidUrl {
                url: self.redacted_url(),
                reason: scrub(reason, &url_secrets(&self.url)),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show_in_options() {
        let options = AmqpOptions::new("amqp://app:hunter22@h/");
        assert!(!format!("{options:?}").contains("hunter22"));
        assert_eq!(options.redacted_url(), "amqp://app:***@h/");
    }

    #[test]
    fn a_bad_url_is_a_typed_error_without_the_password() {
        let err = AmqpOptions::new("http://u:secret@h/")
            .validate()
            .unwrap_err();
        assert!(matches!(err, BrokerError::InvalidUrl { .. }));
        assert!(!err.to_string().contains("secret"), "{err}");
        let err = AmqpOptions::new("amqp://u:secret@h:notaport/")
            .validate()
            .unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
