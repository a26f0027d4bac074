//! Durability through the broker: [`Broker::open`] on a data directory
//! recovers the durable queues with their persistent messages, the durable
//! exchanges, and the bindings between them; declarations, bindings and
//! deletions of durable ones are written to the topology log before they
//! return.
//!
//! As in RabbitMQ, a binding is durable when both of its ends are: a durable
//! exchange bound to a durable queue or exchange. A binding with a transient
//! end lives as long as the broker does.
//!
//! The topology log holds one JSON entry per change. Each queue declaration
//! gets an id that is never reused (the highest id handed out is part of
//! every snapshot), so a queue deleted and declared again does not inherit
//! the old one's messages.
//!
//! Durable streams are recorded the same way, each declaration with a stream
//! id of its own that is never reused either; a stream's records and named
//! subscribers' offsets are in its directory (`streams/<id>/`, see
//! `store::stream_log`), which its deletion removes. A binding from a
//! durable exchange to a durable stream is durable.

use std::path::Path;

use bytestring::ByteString;
use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use crate::broker::{Broker, BrokerConfig};
use crate::envelope::Headers;
use crate::error::BrokerError;
use crate::exchange::{Binding, Destination, ExchangeOptions};
use crate::queue::actor::Durable;
use crate::queue::options::QueueOptions;
use crate::store::stream_log::{RecoveredStream, StreamId, StreamLog};
use crate::store::{DataDir, QueueId, StorageOptions, StorageStats, Store, StoreError};
use crate::stream::{StreamHandle, StreamOptions};

/// One change to the durable topology, as written to the topology log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum MetaOp {
    /// Ids from here on are free (written at the head of every snapshot).
    NextQueueId {
        id: QueueId,
    },
    Queue {
        name: String,
        id: QueueId,
        options: QueueOptions,
    },
    DeleteQueue {
        id: QueueId,
    },
    Exchange {
        name: String,
        options: ExchangeOptions,
    },
    DeleteExchange {
        name: String,
    },
    Bind(BindingRecord),
    Unbind(BindingRecord),
    /// Stream ids from here on are free (in every snapshot).
    NextStreamId {
        id: StreamId,
    },
    Stream {
        name: String,
        id: StreamId,
        options: StreamOptions,
    },
    DeleteStream {
        id: StreamId,
    },
}

/// A durable binding, as written to the topology log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct BindingRecord {
    exchange: String,
    destination: Destination,
    key: ByteString,
    #[serde(default)]
    arguments: Headers,
}

impl BindingRecord {
    fn new(exchange: &str, binding: &Binding) -> Self {
        BindingRecord {
            exchange: exchange.to_string(),
            destination: binding.destination.clone(),
            key: binding.key.clone(),
            arguments: binding.arguments.clone(),
        }
    }

    fn binding(&self) -> Binding {
        Binding {
            destination: self.destination.clone(),
            key: self.key.clone(),
            arguments: self.arguments.clone(),
        }
    }
}

/// The durable topology, as the topology log describes it.
#[derive(Default)]
struct Meta {
    next_queue_id: QueueId,
    queues: FxHashMap<String, (QueueId, QueueOptions)>,
    exchanges: FxHashMap<String, ExchangeOptions>,
    /// In the order they were made, as routing lists them.
    bindings: Vec<BindingRecord>,
    next_stream_id: StreamId,
    streams: FxHashMap<String, (StreamId, StreamOptions)>,
}

/// Removes the entries declared with `id` (one, or none); returns their names.
fn remove_id<O>(declared: &mut FxHashMap<String, (u64, O)>, id: u64) -> Vec<String> {
    let gone: Vec<String> = declared
        .iter()
        .filter(|(_, (declared_id, _))| *declared_id == id)
        .map(|(name, _)| name.clone())
        .collect();
    for name in &gone {
        declared.remove(name);
    }
    gone
}

impl Meta {
    fn apply(&mut self, op: MetaOp) {
        match op {
            MetaOp::NextQueueId { id } => self.next_queue_id = self.next_queue_id.max(id),
            MetaOp::Queue { name, id, options } => {
                self.next_queue_id = self.next_queue_id.max(id.saturating_add(1));
                self.queues.insert(name, (id, options));
            }
            MetaOp::DeleteQueue { id } => {
                for name in remove_id(&mut self.queues, id) {
                    let dest = Destination::Queue(ByteString::from(name));
                    self.bindings.retain(|b| b.destination != dest);
                }
            }
            MetaOp::Exchange { name, options } => {
                self.exchanges.insert(name, options);
            }
            MetaOp::DeleteExchange { name } => {
                let dest = Destination::Exchange(ByteString::from(name.as_str()));
                self.bindings
                    .retain(|b| b.exchange != name && b.destination != dest);
                self.exchanges.remove(&name);
            }
            MetaOp::Bind(record) => {
                if !self.bindings.contains(&record) {
                    self.bindings.push(record);
                }
            }
            MetaOp::Unbind(record) => self.bindings.retain(|b| *b != record),
            MetaOp::NextStreamId { id } => self.next_stream_id = self.next_stream_id.max(id),
            MetaOp::Stream { name, id, options } => {
                self.next_stream_id = self.next_stream_id.max(id.saturating_add(1));
                self.streams.insert(name, (id, options));
            }
            MetaOp::DeleteStream { id } => {
                for name in remove_id(&mut self.streams, id) {
                    let dest = Destination::Stream(ByteString::from(name));
                    self.bindings.retain(|b| b.destination != dest);
                }
            }
        }
    }

    fn snapshot(&self) -> Vec<MetaOp> {
        let mut ops = vec![MetaOp::NextQueueId {
            id: self.next_queue_id,
        }];
        let mut queues: Vec<_> = self.queues.iter().collect();
        queues.sort_by_key(|(_, (id, _))| *id);
        ops.extend(
            queues
                .into_iter()
                .map(|(name, (id, options))| MetaOp::Queue {
                    name: name.clone(),
                    id: *id,
                    options: options.clone(),
                }),
        );
        let mut exchanges: Vec<_> = self.exchanges.iter().collect();
        exchanges.sort_by_key(|(name, _)| name.as_str());
        ops.extend(
            exchanges
                .into_iter()
                .map(|(name, options)| MetaOp::Exchange {
                    name: name.clone(),
                    options: options.clone(),
                }),
        );
        ops.push(MetaOp::NextStreamId {
            id: self.next_stream_id,
        });
        let mut streams: Vec<_> = self.streams.iter().collect();
        streams.sort_by_key(|(_, (id, _))| *id);
        ops.extend(
            streams
                .into_iter()
                .map(|(name, (id, options))| MetaOp::Stream {
                    name: name.clone(),
                    id: *id,
                    options: options.clone(),
                }),
        );
        // Bindings last: their ends are declared by then.
        ops.extend(self.bindings.iter().cloned().map(MetaOp::Bind));
        ops
    }

    /// How many entries a snapshot of this topology has.
    fn len(&self) -> usize {
        2 + self.queues.len() + self.exchanges.len() + self.streams.len() + self.bindings.len()
    }
}

/// A broker's storage: its data directory, message log and topology, and
/// its durable streams' logs.
pub(crate) struct Storage {
    dir: DataDir,
    pub(crate) log: Store,
    meta: Mutex<Meta>,
    /// The logs of the durable streams, by id (closed with the broker).
    streams: Mutex<FxHashMap<StreamId, StreamLog>>,
}

impl Storage {
    fn write(&self, op: &MetaOp) -> Result<(), StoreError> {
        // Serializing these plain structs cannot fail.
        let entry = serde_json::to_vec(op).unwrap_or_default();
        self.dir.meta.append(&entry)
    }

    /// Records a durable queue's declaration; returns its new id.
    pub(crate) fn declare_queue(
        &self,
        name: &str,
        options: &QueueOptions,
    ) -> Result<QueueId, StoreError> {
        let mut meta = self.meta.lock();
        let id = meta.next_queue_id.max(1);
        let op = MetaOp::Queue {
            name: name.to_string(),
            id,
            options: options.clone(),
        };
        self.write(&op)?;
        meta.apply(op);
        Ok(id)
    }

    /// Records a durable queue's deletion (idempotent).
    pub(crate) fn delete_queue(&self, id: QueueId) {
        let mut meta = self.meta.lock();
        if !meta.queues.values().any(|(qid, _)| *qid == id) {
            return;
        }
        let op = MetaOp::DeleteQueue { id };
        if let Err(err) = self.write(&op) {
            tracing::error!(queue_id = id, %err, "could not record a durable queue's deletion: it comes back, empty, when the broker reopens");
        }
        meta.apply(op);
        // Its duplicate window, if it had one.
        let window = self.log.dedup_path(id);
        if let Err(err) = std::fs::remove_file(&window)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %window.display(), %err, "could not delete a deleted queue's duplicate window");
        }
    }

    /// Records a durable exchange's declaration.
    pub(crate) fn declare_exchange(
        &self,
        name: &str,
        options: &ExchangeOptions,
    ) -> Result<(), StoreError> {
        self.record(MetaOp::Exchange {
            name: name.to_string(),
            options: options.clone(),
        })
    }

    /// Records a durable exchange's deletion, and so of every binding from
    /// or to it.
    pub(crate) fn delete_exchange(&self, name: &str) {
        if let Err(err) = self.record(MetaOp::DeleteExchange {
            name: name.to_string(),
        }) {
            tracing::error!(exchange = name, %err, "could not record a durable exchange's deletion: it comes back when the broker reopens");
        }
    }

    /// Records a durable binding.
    pub(crate) fn bind(&self, exchange: &str, binding: &Binding) -> Result<(), StoreError> {
        self.record(MetaOp::Bind(BindingRecord::new(exchange, binding)))
    }

    /// Records a durable binding's removal.
    pub(crate) fn unbind(&self, exchange: &str, binding: &Binding) -> Result<(), StoreError> {
        self.record(MetaOp::Unbind(BindingRecord::new(exchange, binding)))
    }

    /// Writes `op` (synced) and applies it.
    fn record(&self, op: MetaOp) -> Result<(), StoreError> {
        let mut meta = self.meta.lock();
        self.write(&op)?;
        meta.apply(op);
        Ok(())
    }

    /// Records a durable stream's declaration (with a new id), creates its
    /// directory, and starts it.
    pub(crate) fn declare_stream(
        &self,
        name: &str,
        options: &StreamOptions,
        limit: usize,
        runtime: &postbox::RuntimeHandle,
    ) -> Result<StreamHandle, StoreError> {
        let mut meta = self.meta.lock();
        let id = meta.next_stream_id.max(1);
        // Never handed out again, even if the entry below is not written
        // whole (it may still be read back).
        meta.next_stream_id = id.saturating_add(1);
        let (log, seed) = self.dir.create_stream(id)?;
        let op = MetaOp::Stream {
            name: name.to_string(),
            id,
            options: options.clone(),
        };
        if let Err(err) = self.write(&op) {
            self.dir.remove_stream(id);
            return Err(err);
        }
        meta.apply(op);
        drop(meta);
        let handle = StreamHandle::durable(
            ByteString::from(name),
            options.clone(),
            limit,
            runtime.clone(),
            (log.clone(), seed),
            RecoveredStream::default(),
        );
        match handle {
            Ok(handle) => {
                self.streams.lock().insert(id, log);
                Ok(handle)
            }
            Err(err) => {
                self.forget_stream(name);
                self.dir.remove_stream(id);
                Err(err)
            }
        }
    }

    /// Closes a deleted durable stream's log (see
    /// [`forget_stream`](Self::forget_stream)) and deletes its directory.
    pub(crate) fn remove_stream(&self, id: StreamId) {
        let log = self.streams.lock().remove(&id);
        if let Some(log) = log {
            log.close();
        }
        self.dir.remove_stream(id);
    }

    /// Records a durable stream's deletion; returns its id.
    pub(crate) fn forget_stream(&self, name: &str) -> Option<StreamId> {
        let mut meta = self.meta.lock();
        let &(id, _) = meta.streams.get(name)?;
        let op = MetaOp::DeleteStream { id };
        if let Err(err) = self.write(&op) {
            tracing::error!(stream = name, %err, "could not record a durable stream's deletion: it comes back, empty, when the broker reopens");
        }
        meta.apply(op);
        Some(id)
    }

    pub(crate) fn stats(&self) -> StorageStats {
        self.log.stats()
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir.options.dir
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        // The streams' last records and their subscribers' offsets.
        for log in self.streams.get_mut().values() {
            log.close();
        }
        self.log.close();
    }
}

impl Broker {
    /// A broker that keeps durable queues (and their persistent messages),
    /// durable streams (their records and named subscribers' positions),
    /// durable exchanges and durable bindings in `storage.dir`, and recovers
    /// them from it: what the broker held when it
    /// last stopped, cleanly or not (a crash, `kill -9`, a power loss with
    /// the default [`SyncPolicy`](crate::SyncPolicy)). Fails with
    /// [`BrokerError::Storage`] if the directory cannot be opened: another
    /// broker holds it ([`StoreError::Locked`]), a file is of an unknown
    /// format version, or an I/O error. Damaged records are skipped and
    /// reported, never a panic.
    ///
    /// ```
    /// use postbox::Runtime;
    /// use postbox_actors::{Broker, Envelope, QueueOptions, StorageOptions};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = std::env::temp_dir().join(format!("postbox-doc-{}", std::process::id()));
    /// let rt = Runtime::new()?;
    /// {
    ///     let broker = Broker::open(&rt, StorageOptions::new(&dir))?;
    ///     broker.declare_queue("orders", QueueOptions::default().durable()).await?;
    ///     // Returns once the message is on disk.
    ///     broker.publish("orders", Envelope::new("order-17").with_persistent(true)).await?;
    /// }
    /// let broker = Broker::open(&rt, StorageOptions::new(&dir))?;
    /// assert_eq!(broker.queue_stats("orders").await?.stats.ready, 1);
    /// # drop(broker); std::fs::remove_dir_all(&dir)?;
    /// # Ok(()) }
    /// ```
    pub fn open(
        runtime: &postbox::RuntimeHandle,
        storage: StorageOptions,
    ) -> Result<Broker, BrokerError> {
        Broker::open_with_config(runtime, BrokerConfig::default(), storage)
    }

    /// [`open`](Self::open) with explicit settings.
    pub fn open_with_config(
        runtime: &postbox::RuntimeHandle,
        config: BrokerConfig,
        storage: StorageOptions,
    ) -> Result<Broker, BrokerError> {
        let (dir, entries) = DataDir::open(storage)?;
        let mut meta = Meta {
            next_queue_id: 1,
            next_stream_id: 1,
            ..Meta::default()
        };
        let logged = entries.len();
        for entry in entries {
            match serde_json::from_slice::<MetaOp>(&entry) {
                Ok(op) => meta.apply(op),
                Err(err) => {
                    tracing::error!(dir = %dir.options.dir.display(), %err, "unreadable topology entry skipped");
                }
            }
        }
        let ids: FxHashSet<QueueId> = meta.queues.values().map(|(id, _)| *id).collect();
        let (log, mut recovery) = dir.start_log(&ids)?;
        tracing::info!(
            dir = %dir.options.dir.display(),
            queues = meta.queues.len(),
            records = recovery.records,
            damaged = recovery.damaged,
            truncated = recovery.truncated,
            "storage opened"
        );
        // A log much longer than what it describes is rewritten.
        if logged > 2 * meta.len() + 16 {
            let snapshot: Vec<Vec<u8>> = meta
                .snapshot()
                .iter()
                .map(|op| serde_json::to_vec(op).unwrap_or_default())
                .collect();
            dir.meta.rewrite(&snapshot)?;
        }
        let queues: Vec<(String, QueueId, QueueOptions)> = meta
            .queues
            .iter()
            .map(|(name, (id, options))| (name.clone(), *id, options.clone()))
            .collect();
        let exchanges: Vec<(String, ExchangeOptions)> = meta
            .exchanges
            .iter()
            .map(|(name, options)| (name.clone(), options.clone()))
            .collect();
        let bindings = meta.bindings.clone();
        let mut streams: Vec<(String, StreamId, StreamOptions)> = meta
            .streams
            .iter()
            .map(|(name, (id, options))| (name.clone(), *id, options.clone()))
            .collect();
        streams.sort_by_key(|s| s.1);
        let stream_ids: FxHashSet<StreamId> = streams.iter().map(|s| s.1).collect();
        dir.remove_streams_except(&stream_ids);
        let broker = Broker::build(
            runtime,
            config,
            Some(Storage {
                dir,
                log,
                meta: Mutex::new(meta),
                streams: Mutex::default(),
            }),
        );
        for (name, id, options) in queues {
            let recovered = recovery.queues.remove(&id).unwrap_or_default();
            broker.start_durable_queue(&name, id, options, recovered)?;
        }
        // Before the bindings, which lead to them.
        for (name, id, options) in streams {
            broker.start_durable_stream(&name, id, options)?;
        }
        {
            let mut topology = broker.inner.topology.write();
            for (name, options) in exchanges {
                if let Err(err) = topology.declare_exchange(&name, options) {
                    tracing::error!(exchange = %name, %err, "durable exchange not restored");
                }
            }
            for record in bindings {
                if let Err(err) = topology.bind(&record.exchange, record.binding()) {
                    tracing::error!(exchange = %record.exchange, destination = ?record.destination, %err, "durable binding not restored");
                }
            }
        }
        Ok(broker)
    }

    /// The storage counters; `None` for an in-memory broker.
    pub fn storage_stats(&self) -> Option<StorageStats> {
        self.inner.storage.as_ref().map(Storage::stats)
    }

    /// The data directory; `None` for an in-memory broker.
    pub fn data_dir(&self) -> Option<&Path> {
        self.inner.storage.as_ref().map(Storage::dir)
    }

    /// Reads a durable stream back from its directory and starts it.
    fn start_durable_stream(
        &self,
        name: &str,
        id: StreamId,
        options: StreamOptions,
    ) -> Result<(), BrokerError> {
        let Some(storage) = &self.inner.storage else {
            return Ok(());
        };
        let limit = options
            .max_message_bytes
            .unwrap_or(self.inner.config.max_message_bytes);
        let (log, seed, recovered) = storage.dir.open_stream(id)?;
        tracing::info!(
            stream = name,
            records = recovered.records.len(),
            damaged = recovered.damaged,
            truncated = recovered.truncated,
            "durable stream read back"
        );
        let handle = StreamHandle::durable(
            ByteString::from(name),
            options,
            limit,
            self.inner.runtime.clone(),
            (log.clone(), seed),
            recovered,
        )?;
        storage.streams.lock().insert(id, log);
        self.inner
            .topology
            .write()
            .streams
            .insert(ByteString::from(name), handle);
        Ok(())
    }

    /// Starts a recovered durable queue.
    fn start_durable_queue(
        &self,
        name: &str,
        id: QueueId,
        options: QueueOptions,
        recovered: Vec<crate::store::Recovered>,
    ) -> Result<(), BrokerError> {
        let Some(storage) = &self.inner.storage else {
            return Ok(());
        };
        let durable = Durable {
            store: storage.log.clone(),
            id,
        };
        let mut topology = self.inner.topology.write();
        self.start_queue(&mut topology, name, options, Some((durable, recovered)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A topology log naming the largest ids (damaged, or written by hand)
    /// is applied without overflowing (found by fuzzing).
    #[test]
    fn the_largest_ids_do_not_overflow() {
        let mut meta = Meta::default();
        meta.apply(MetaOp::Queue {
            name: "q".into(),
            id: u64::MAX,
            options: QueueOptions::default(),
        });
        let op: MetaOp =
            serde_json::from_str(r#"{"op":"next_queue_id","id":18446744073709551615}"#).unwrap();
        meta.apply(op);
        assert_eq!(meta.next_queue_id, u64::MAX);
        assert_eq!(meta.queues.len(), 1);
    }
}
