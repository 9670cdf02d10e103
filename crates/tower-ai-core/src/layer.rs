use tower_layer::Layer;

use crate::classify::ClassifyConfig;
use crate::service::Classify;

/// Applies [`Classify`] to a service: see its docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClassifyLayer {
    config: ClassifyConfig,
}

impl ClassifyLayer {
    /// A layer with the default [`ClassifyConfig`].
    pub fn new() -> Self {
        ClassifyLayer::default()
    }

    /// A layer with the given limits.
    pub const fn with_config(config: ClassifyConfig) -> Self {
        ClassifyLayer { config }
    }
}

impl<S> Layer<S> for ClassifyLayer {
    type Service = Classify<S>;

    fn layer(&self, inner: S) -> Classify<S> {
        Classify::new(inner, self.config)
    }
}
