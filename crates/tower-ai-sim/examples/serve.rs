//! Serve a scenario on 127.0.0.1 so a person (curl, an SDK) can talk to it.
//!
//! Run with
//! ```not_rust
//! cargo run -p tower-ai-sim --example serve -- [scenario.json] [port]
//! ```
//! Without a file it serves a well-behaved provider (RPM 60, 20-token answers,
//! 50 ms per token). Try:
//! ```not_rust
//! curl -N localhost:8080/v1/chat/completions -d '{"model":"gpt-4o","stream":true,
//!   "stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hi"}]}'
//! curl -N localhost:8080/v1/messages -d '{"model":"claude","max_tokens":5,"stream":true,
//!   "messages":[{"role":"user","content":"Hi"}]}'
//! curl -N 'localhost:8080/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse'
//!   -d '{"contents":[{"parts":[{"text":"Hi"}]}]}'
//! ```
//! Stop with Ctrl-C; the call log is summarised on exit.

use std::net::SocketAddr;
use std::time::Duration;

use tower_ai_sim::{Latency, ModelSpec, Scenario, Simulator};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let scenario = match args.next() {
        Some(path) => Scenario::from_json_file(&path)?,
        None => Scenario::builder()
            .default_model(ModelSpec::new("*").completion_tokens(20))
            .rpm_limit(60)
            .latency(Latency::uniform(
                Duration::from_millis(100),
                Duration::from_millis(400),
            ))
            .token_interval(Latency::fixed(Duration::from_millis(50)))
            .build()?,
    };
    let port: u16 = args.next().map(|p| p.parse()).transpose()?.unwrap_or(8080);
    let sim = Simulator::new(scenario);
    let server = sim.serve(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    println!("tower-ai-sim listening on {}", server.url());
    tokio::signal::ctrl_c().await?;
    server.shutdown_with_grace(Duration::from_secs(1)).await;
    let stats = sim.stats();
    println!(
        "{} calls, {} successes, by status: {:?}",
        stats.total, stats.successes, stats.by_status
    );
    Ok(())
}
