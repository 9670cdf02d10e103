//! The main demo: one bad afternoon at an AI provider, and three ways through it.
//!
//! The simulator plays a provider in a storm (see `tower_ai_workspace::storm`): rate
//! limits, a burst of 503 overload, a 60 s outage of the primary model, stalled streams,
//! and a quota that runs out part-way. The same 600 requests go through (a) a bare
//! client, (b) the retry loop most tutorials show (3 retries, 1/2/4 s backoff plus a
//! little jitter, Retry-After ignored, no fallback) and (c) the tower-ai stack, on a
//! paused clock: five minutes of provider time take a second or two. The table is
//! computed, not typed in.
//!
//! Standard output holds only what the run computes: the table and the sentences that read
//! it, exactly as README.md shows them (`.ci/check-figures.sh` compares the two in CI, and
//! `.ci/check-figures.sh --update` rewrites the README's copy). Progress and wall-clock
//! time go to standard error.
//!
//! Run with:
//!
//! ```text
//! cargo run --example chaos_demo            # seed 7
//! cargo run --example chaos_demo -- 42      # another seed
//! ```

use tower_ai_workspace::storm::{self, Storm, StormConfig};

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let seed = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let config = StormConfig {
        seed,
        ..StormConfig::default()
    };
    let wall = std::time::Instant::now();
    eprintln!(
        "tower-ai chaos demo: {} requests over {} virtual seconds, seed {seed}",
        config.requests,
        (config.interval * config.requests).as_secs()
    );

    let mut reports = Vec::new();
    let s = Storm::new(config);
    reports.push(storm::run("bare", &s, storm::bare(&s), progress("bare")).await);
    let s = Storm::new(config);
    reports.push(storm::run("naive retry", &s, storm::naive(&s), progress("naive retry")).await);
    let s = Storm::new(config);
    reports.push(storm::run("tower-ai", &s, storm::tower_ai(&s), progress("tower-ai")).await);

    eprintln!();
    print!("{}", storm::table(&reports));
    println!();
    print!("{}", storm::summary(&reports));
    eprintln!("\n(wall-clock time: {:.2} s)", wall.elapsed().as_secs_f64());
}

fn progress(name: &'static str) -> impl FnMut(u64, u32, u32) {
    move |secs, served, finished| {
        eprintln!("  [{name}] t={secs:>3}s  finished {finished:>3}  served {served:>3}")
    }
}
