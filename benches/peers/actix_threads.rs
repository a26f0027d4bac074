//! A plain actix system for the actix baselines: one system thread driving
//! `n` arbiters, each an OS thread with a single-threaded tokio runtime. This
//! is the same layout a postbox `Runtime` uses, so the comparison is like for
//! like.

use actix_rt::{Arbiter, ArbiterHandle, System};

pub struct ActixThreads {
    pub arbiters: Vec<ArbiterHandle>,
    system: System,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ActixThreads {
    pub fn start(n: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("actix-system".into())
            .spawn(move || {
                let runner = System::new();
                let arbiters: Vec<Arbiter> = (0..n).map(|_| Arbiter::new()).collect();
                let handles = arbiters.iter().map(Arbiter::handle).collect::<Vec<_>>();
                tx.send((System::current(), handles))
                    .expect("the bench waits for the actix system");
                runner.run().expect("actix system run");
                for arbiter in arbiters {
                    arbiter.stop();
                    let _ = arbiter.join();
                }
            })
            .expect("spawn the actix system thread");
        let (system, arbiters) = rx.recv().expect("the actix system started");
        ActixThreads {
            arbiters,
            system,
            thread: Some(thread),
        }
    }
}

impl Drop for ActixThreads {
    fn drop(&mut self) {
        self.system.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
