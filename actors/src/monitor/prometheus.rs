//! The Prometheus exporter (feature `prometheus`): a recorder for the
//! monitor's metrics ([`METRICS`](super::METRICS)) that renders them in
//! Prometheus' text exposition format, for an HTTP endpoint of the
//! application's (or the admin API's) to serve at `/metrics`.
//!
//! ```
//! # postbox::testkit::run(async {
//! use postbox_actors::monitor::{prometheus, MonitorOptions};
//! # let broker = postbox_actors::Broker::new(&postbox::RuntimeHandle::local());
//! let handle = prometheus::install()?;
//! let monitor = broker.monitor(MonitorOptions::default());
//! // ... later, in the /metrics handler:
//! let text = handle.render();
//! # let _ = (text, monitor);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use metrics_exporter_prometheus::PrometheusBuilder;
pub use metrics_exporter_prometheus::{BuildError, PrometheusHandle, PrometheusRecorder};

/// Installs a Prometheus recorder as the process's `metrics` recorder and
/// returns the handle that renders what it holds. Fails if a recorder is
/// installed already.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    PrometheusBuilder::new().install_recorder()
}

/// A Prometheus recorder that is not installed: for an application that
/// composes recorders, or a test that installs it locally
/// (`metrics::with_local_recorder`). Its handle renders what it recorded.
pub fn recorder() -> PrometheusRecorder {
    PrometheusBuilder::new().build_recorder()
}
