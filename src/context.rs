//! [`Context`]: what a handler can do besides changing its actor's state: learn
//! its own address, stop, spawn tasks and timers tied to the current incarnation,
//! spawn other actors, and watch other actors.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::mailbox;
use tokio::task::AbortHandle;

use crate::actor::{Actor, Handler, Message};
use crate::addr::{ActorId, Addr, AnyAddr, Shared, TrySendError};
use crate::envelope::Envelope;
use crate::failure::ExitReason;
use crate::runtime::RuntimeHandle;

/// The context of one actor incarnation, passed to every handler and hook.
pub struct Context<A: Actor> {
    weak: mailbox::WeakSender<Envelope<A>>,
    shared: Arc<Shared>,
    runtime: RuntimeHandle,
    incarnation: u64,
    stopping: bool,
    tasks: Vec<AbortHandle>,
}

impl<A: Actor> std::fmt::Debug for Context<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.shared.id)
            .field("incarnation", &self.incarnation)
            .finish()
    }
}

impl<A: Actor> Context<A> {
    pub(crate) fn new(
        weak: mailbox::WeakSender<Envelope<A>>,
        shared: Arc<Shared>,
        runtime: RuntimeHandle,
        incarnation: u64,
    ) -> Self {
        Context {
            weak,
            shared,
            runtime,
            incarnation,
            stopping: false,
            tasks: Vec::new(),
        }
    }

    /// The actor's identity (stable across restarts).
    pub fn id(&self) -> ActorId {
        self.shared.id
    }

    /// The actor's name, if it was spawned with one.
    pub fn name(&self) -> Option<&str> {
        self.shared.name.as_deref()
    }

    /// The current incarnation: 1 for the first, +1 for every restart.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The actor's own address; `None` only when every address to it has been
    /// dropped (it then stops once its mailbox is drained).
    pub fn addr(&self) -> Option<Addr<A>> {
        self.weak.upgrade().map(|tx| Addr {
            tx,
            shared: self.shared.clone(),
        })
    }

    /// The actor's untyped handle.
    pub fn any(&self) -> AnyAddr {
        AnyAddr {
            shared: self.shared.clone(),
        }
    }

    /// The runtime this actor runs on, to spawn more actors.
    pub fn runtime(&self) -> &RuntimeHandle {
        &self.runtime
    }

    /// Stops the actor normally once the current handler returns.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// Spawns a task on the actor's thread; it is aborted when this incarnation
    /// ends. The task does not get `&mut self`: send the actor a message for that.
    pub fn spawn(&mut self, fut: impl Future<Output = ()> + 'static) {
        if self.tasks.len() >= 64 {
            self.tasks.retain(|t| !t.is_finished());
        }
        self.tasks
            .push(tokio::task::spawn_local(fut).abort_handle());
    }

    /// Sends `msg` to this actor after `delay` (cancelled if the incarnation ends
    /// first). Obeys tokio's clock, so paused-time tests control it.
    pub fn notify_later<M>(&mut self, msg: M, delay: Duration)
    where
        A: Handler<M>,
        M: Message,
    {
        let weak = self.weak.clone();
        let shared = self.shared.clone();
        // The deadline is fixed now, not when the task first runs.
        let at = crate::clock::deadline(delay);
        self.spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(tx) = weak.upgrade() {
                let _ = Addr { tx, shared }.send(msg).await;
            }
        });
    }

    /// Death watch: when `target`'s given incarnation (`None`: its current one)
    /// ends, this actor receives `f(reason)`. Fires at once if it already ended.
    pub fn watch<M>(
        &mut self,
        target: &AnyAddr,
        incarnation: Option<u64>,
        f: impl FnOnce(ExitReason) -> M + Send + 'static,
    ) where
        A: Handler<M>,
        M: Message,
    {
        let weak = self.weak.clone();
        let shared = self.shared.clone();
        target.on_exit(incarnation, move |reason| {
            let Some(tx) = weak.upgrade() else { return };
            let addr = Addr { tx, shared };
            if let Err(TrySendError::Full(msg)) = addr.try_send(f(reason)) {
                // Never block the dying actor on our full mailbox: deliver from a task.
                match tokio::runtime::Handle::try_current() {
                    Ok(handle) => {
                        handle.spawn(async move {
                            let _ = addr.send(msg).await;
                        });
                    }
                    Err(_) => {
                        tracing::warn!(watcher = %addr.id(), "death notice dropped: no runtime")
                    }
                }
            }
        });
    }

    pub(crate) fn abort_tasks(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}
