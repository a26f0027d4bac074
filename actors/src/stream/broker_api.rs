//! The broker's stream registry and its API: [`Broker::declare_stream`],
//! [`Broker::stream`], [`Broker::delete_stream`], [`Broker::stream_names`].
//!
//! Streams have a namespace of their own (a queue and a stream may share a
//! name). The registry is read under a lock only on lookups: publishers on a
//! hot path keep a [`StreamHandle`].

use std::collections::HashMap;
use std::sync::Arc;

use bytestring::ByteString;
use parking_lot::RwLock;

use crate::broker::Broker;
use crate::name::{NameKind, validate_name};
use crate::stream::error::StreamError;
use crate::stream::handle::{StreamCore, StreamHandle};
use crate::stream::log::StreamStats;
use crate::stream::options::StreamOptions;

/// The streams of one broker, by name.
#[derive(Default)]
pub(crate) struct StreamRegistry {
    streams: RwLock<HashMap<ByteString, StreamHandle>>,
}

impl Broker {
    /// Declares a stream: creates it, or checks that the existing one has the
    /// same options ([`StreamError::Mismatch`] if not).
    pub async fn declare_stream(
        &self,
        name: &str,
        options: StreamOptions,
    ) -> Result<StreamHandle, StreamError> {
        validate_name(NameKind::Stream, name)?;
        let mut streams = self.stream_registry().streams.write();
        if let Some(existing) = streams.get(name) {
            if existing.core.options != options {
                return Err(StreamError::Mismatch {
                    name: name.to_string(),
                    existing: Box::new(existing.core.options.clone()),
                    requested: Box::new(options),
                });
            }
            return Ok(existing.clone());
        }
        let limit = options
            .max_message_bytes
            .unwrap_or(self.config().max_message_bytes)
            .min(options.max_bytes.unwrap_or(usize::MAX));
        let name = ByteString::from(name);
        tracing::debug!(stream = %name, ?options, "stream declared");
        let handle = StreamHandle {
            core: Arc::new(StreamCore::new(
                name.clone(),
                options,
                limit,
                self.runtime().clone(),
            )),
        };
        streams.insert(name, handle.clone());
        Ok(handle)
    }

    /// A handle to an existing stream.
    pub fn stream(&self, name: &str) -> Result<StreamHandle, StreamError> {
        self.stream_registry()
            .streams
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| StreamError::NotFound(name.to_string()))
    }

    /// The names of all streams.
    pub fn stream_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .stream_registry()
            .streams
            .read()
            .keys()
            .map(|k| k.to_string())
            .collect();
        names.sort();
        names
    }

    /// Deletes a stream and its records, and stops its subscribers (each
    /// finishes the batch in hand). Publishers waiting on it, and later calls
    /// through its handles, get [`StreamError::NotFound`]. Returns its last
    /// stats.
    pub async fn delete_stream(&self, name: &str) -> Result<StreamStats, StreamError> {
        let handle = self
            .stream_registry()
            .streams
            .write()
            .remove(name)
            .ok_or_else(|| StreamError::NotFound(name.to_string()))?;
        tracing::debug!(stream = %name, "stream deleted");
        Ok(handle.core.close().await)
    }
}
