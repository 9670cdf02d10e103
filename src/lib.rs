//! Not published: this package only holds the workspace's cross-crate integration
//! tests (`tests/`), examples (`examples/`) and benchmarks (`benches/`).
