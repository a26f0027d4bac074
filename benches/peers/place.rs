//! Where the threads of a throughput trial run.
//!
//! On a machine with few cores, the OS's choice of cores for the producer and
//! the consumers decides some results by up to 2× (producer and consumer
//! sharing one core or not; and on the 2-vCPU VM of `BENCHMARKS.md`, which
//! vCPU gets which thread), and that choice tends to stick for a whole run.
//! By default the OS decides, as it does for users, and each row reports the
//! median and spread of several trials. With `--pin` every system gets the
//! same fixed placement instead: the producer (the driver thread) on core 0
//! and every consuming thread (postbox arbiters, tokio workers, actix
//! arbiters) on core 1. Rows are then stable to a few percent from run to
//! run, which is what comparing two commits needs, but the absolute numbers
//! are those of that one placement. Latency rows pin on their own (see
//! `rpc.rs`).

use std::sync::atomic::{AtomicBool, Ordering};

use postbox::{Actor, Context, Failure, Handler, Message, Runtime};

use crate::actix_threads::ActixThreads;
use crate::util::pin_current_thread;

/// The producer's core.
pub const PRODUCER_CORE: usize = 0;
/// The consumers' core.
pub const WORKER_CORE: usize = 1;

static PINNING: AtomicBool = AtomicBool::new(false);

/// Turns fixed placement on (only where there are at least two cores).
pub fn enable() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    PINNING.store(cores > WORKER_CORE, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    PINNING.load(Ordering::Relaxed)
}

/// Pins the calling (driver) thread to the producer's core.
pub fn producer() {
    if enabled() {
        pin_current_thread(PRODUCER_CORE);
    }
}

/// For `on_thread_start` of a baseline's tokio runtime.
pub fn worker_thread() {
    if enabled() {
        pin_current_thread(WORKER_CORE);
    }
}

/// A postbox runtime with one arbiter per core, its arbiters on the
/// consumers' core when placement is fixed.
pub async fn postbox_runtime() -> Runtime {
    let rt = Runtime::new().expect("postbox runtime");
    if enabled() {
        pin_arbiters(&rt, |_| WORKER_CORE).await;
    }
    rt
}

/// An actix system with one arbiter per core, placed like postbox's.
pub fn actix_threads() -> ActixThreads {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads = ActixThreads::start(cores);
    if enabled() {
        for arbiter in &threads.arbiters {
            arbiter.spawn_fn(|| pin_current_thread(WORKER_CORE));
        }
    }
    threads
}

/// Pins arbiter `i` of `rt` to core `core(i)`, from an actor started there,
/// and returns once every arbiter is pinned.
pub async fn pin_arbiters(rt: &Runtime, core: impl Fn(usize) -> usize) {
    for i in 0..rt.arbiters() {
        let pinner = rt.build(|| Some(Pinner)).arbiter(i).spawn();
        let _ = pinner.ask(PinTo(core(i))).await;
        pinner.stop();
    }
}

struct Pinner;

impl Actor for Pinner {}

struct PinTo(usize);

impl Message for PinTo {
    type Reply = ();
}

impl Handler<PinTo> for Pinner {
    async fn handle(&mut self, PinTo(core): PinTo, _: &mut Context<Self>) -> Result<(), Failure> {
        pin_current_thread(core);
        Ok(())
    }
}
