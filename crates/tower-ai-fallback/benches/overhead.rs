//! Placeholder; the overhead bench follows.
fn main() {}
