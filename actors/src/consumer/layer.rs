//! Consumer layers, as tower's: a [`Layer`] wraps a [`Consumer`] and is a
//! [`Consumer`] itself, so behaviour around a handler (retries, fault
//! injection, rate limits; deduplication and timeouts to come) is written
//! once and stacked on any consumer.
//!
//! Layers apply to a consumer *factory* (consumers are rebuilt after each
//! crash): [`LayerExt::layer`] turns a factory into one whose consumers are
//! wrapped, and calls chain, the last layer outermost:
//!
//! ```
//! use std::time::Duration;
//! use postbox_actors::{Delivery, LayerExt, RetryPolicy};
//!
//! let handler = || |d: Delivery| async move {
//!     let _order: String = d.decode()?;
//!     d.ack().await?;
//!     Ok(())
//! };
//! let retrying = handler.layer(RetryPolicy::fixed(Duration::from_millis(100), 3));
//! # let _ = retrying;
//! ```
//!
//! A layer of your own:
//!
//! ```
//! use postbox::Failure;
//! use postbox_actors::{Consumer, Delivery, Layer};
//!
//! /// Logs each delivery's id before handling it.
//! #[derive(Clone, Debug)]
//! struct Log;
//!
//! struct Logged<C>(C);
//! impl<C: Consumer> Consumer for Logged<C> {
//!     async fn handle(&mut self, d: Delivery) -> Result<(), Failure> {
//!         println!("{}", d.id());
//!         self.0.handle(d).await
//!     }
//!     async fn cancelled(&mut self) {
//!         self.0.cancelled().await
//!     }
//! }
//!
//! impl<C: Consumer> Layer<C> for Log {
//!     type Consumer = Logged<C>;
//!     fn layer(&self, inner: C) -> Logged<C> {
//!         Logged(inner)
//!     }
//! }
//! ```

use std::marker::PhantomData;

use crate::consumer::{Consumer, ConsumerFactory};

/// Wraps a consumer of type `C` into another consumer. Layers must forward
/// [`Consumer::cancelled`] to the consumer they wrap.
pub trait Layer<C: Consumer>: Send + Sync + 'static {
    /// The wrapped consumer.
    type Consumer: Consumer;

    /// Wraps `inner`.
    fn layer(&self, inner: C) -> Self::Consumer;
}

/// A consumer factory whose consumers (`C`s) are wrapped by a layer; made by
/// [`LayerExt::layer`].
pub struct Layered<F, L, C> {
    factory: F,
    layer: L,
    wraps: PhantomData<fn() -> C>,
}

impl<F: Clone, L: Clone, C> Clone for Layered<F, L, C> {
    fn clone(&self) -> Self {
        Layered {
            factory: self.factory.clone(),
            layer: self.layer.clone(),
            wraps: PhantomData,
        }
    }
}

impl<F, L: std::fmt::Debug, C> std::fmt::Debug for Layered<F, L, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layered")
            .field("layer", &self.layer)
            .finish()
    }
}

impl<C, F, L> ConsumerFactory<L::Consumer> for Layered<F, L, C>
where
    C: Consumer,
    F: ConsumerFactory<C>,
    L: Layer<C>,
{
    fn build(&self) -> L::Consumer {
        self.layer.layer(self.factory.build())
    }
}

/// Adds [`layer`](LayerExt::layer) to every consumer factory.
pub trait LayerExt<C: Consumer>: ConsumerFactory<C> + Sized {
    /// A factory whose consumers are this factory's, wrapped by `layer`.
    /// Chained calls stack layers, the last one outermost.
    fn layer<L: Layer<C>>(self, layer: L) -> Layered<Self, L, C> {
        Layered {
            factory: self,
            layer,
            wraps: PhantomData,
        }
    }
}

impl<C: Consumer, F: ConsumerFactory<C>> LayerExt<C> for F {}
