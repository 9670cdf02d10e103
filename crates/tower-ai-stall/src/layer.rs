//! [`StallDetectorLayer`].

use tower_layer::Layer;

use crate::config::{StallConfig, StallConfigBuilder};
use crate::service::StallDetector;

/// Applies [`StallDetector`] to a service.
///
/// The layer holds only its [`StallConfig`] (a small `Copy` value): there is no state
/// shared between calls or between the services it builds, so cloning it or calling
/// `layer` many times costs nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct StallDetectorLayer {
    config: StallConfig,
}

impl StallDetectorLayer {
    /// A layer with the default deadlines (see [`StallConfig`] for them and the reasons).
    pub fn new() -> Self {
        StallDetectorLayer::default()
    }

    /// A layer with `config`.
    pub const fn with_config(config: StallConfig) -> Self {
        StallDetectorLayer { config }
    }

    /// A builder from the defaults; finish it with
    /// [`build`](StallConfigBuilder::build).
    pub fn builder() -> StallConfigBuilder {
        StallConfig::builder()
    }

    /// The config.
    pub fn config(&self) -> &StallConfig {
        &self.config
    }
}

impl From<StallConfig> for StallDetectorLayer {
    fn from(config: StallConfig) -> Self {
        StallDetectorLayer::with_config(config)
    }
}

impl<S> Layer<S> for StallDetectorLayer {
    type Service = StallDetector<S>;

    fn layer(&self, inner: S) -> StallDetector<S> {
        StallDetector::new(inner, self.config)
    }
}
