//! Not published: this package holds the workspace's cross-crate integration tests
//! (`tests/`), examples (`examples/`) and benchmarks (`benches/`), and compiles the
//! README's code as a doctest so it cannot drift.
#![doc = include_str!("../README.md")]

pub mod replicas;
pub mod storm;
