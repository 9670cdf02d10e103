//! TelemetryLayer with no `tracing` subscriber and a `log` logger: `tracing`'s `log`
//! fallback writes a span's fields to the logger when no subscriber was ever set, so a
//! call's span is made when the logger takes `INFO` records, and not when its level
//! leaves `INFO` out. A test binary of its own: a `log` logger is process-global, and no
//! subscriber may ever be set in this process.

use std::sync::Mutex;

use http::Request;
use tower::{ServiceBuilder, ServiceExt};
use tower_ai_core::{AiBody, ClassifyLayer, TelemetryLayer};
use tower_ai_sim::{Scenario, Simulator};

/// One record as the logger got it.
#[derive(Debug)]
struct Logged {
    level: log::Level,
    target: String,
    module_path: Option<String>,
    message: String,
}

/// A logger that keeps every record it is given; `log::max_level()` decides what it gets.
struct Collect(Mutex<Vec<Logged>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(Logged {
            level: record.level(),
            target: record.target().to_owned(),
            module_path: record.module_path().map(str::to_owned),
            message: record.args().to_string(),
        });
    }

    fn flush(&self) {}
}

static LOGGER: Collect = Collect(Mutex::new(Vec::new()));

fn taken() -> Vec<Logged> {
    std::mem::take(&mut *LOGGER.0.lock().unwrap())
}

/// One chat call through TelemetryLayer and ClassifyLayer to the simulator.
async fn one_call(sim: &Simulator) {
    let client = ServiceBuilder::new()
        .layer(TelemetryLayer::new())
        .layer(ClassifyLayer::new())
        .service(sim.service());
    let req = Request::post("https://api.openai.com/v1/chat/completions")
        .body(AiBody::from(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#,
        ))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
}

// One test: the logger and its level are the process's.
#[tokio::test(start_paused = true)]
async fn a_logger_taking_info_gets_the_span_and_one_leaving_info_out_gets_nothing() {
    log::set_logger(&LOGGER).unwrap();
    assert!(
        !tracing::dispatcher::has_been_set(),
        "no subscriber in this process: the log fallback is on"
    );
    let sim = Simulator::new(Scenario::builder().build().unwrap());

    // A logger taking INFO: the span is made, and tracing's log fallback writes its name
    // and the fields it has when made to the logger, at INFO, with the span's target.
    // (Its end, `-- gen_ai.client;` at TRACE, is offered too: tracing compares the
    // span's level, not the record's, with `log::max_level()`, and leaves the rest to the
    // logger's `enabled`.)
    log::set_max_level(log::LevelFilter::Info);
    one_call(&sim).await;
    let logged = taken();
    let made: Vec<_> = logged
        .iter()
        .filter(|r| r.level == log::Level::Info)
        .collect();
    assert_eq!(made.len(), 1, "one INFO record, the span's: {logged:#?}");
    let span = made[0];
    assert_eq!(span.target, "tower_ai", "{span:?}");
    assert_eq!(
        span.module_path.as_deref(),
        Some("tower_ai_core::telemetry"),
        "{span:?}"
    );
    assert_eq!(
        span.message, "gen_ai.client; otel.kind=\"client\"",
        "the span's name and fields as the log fallback writes them"
    );
    assert!(
        logged
            .iter()
            .any(|r| r.level == log::Level::Trace && r.message == "-- gen_ai.client;"),
        "{logged:#?}"
    );

    // A logger leaving INFO out: nothing of the call reaches it. (Whether a span was made
    // at all is not visible from here: tracing compares a record's level with
    // `log::max_level()` before it asks the logger, so a disabled span made and dropped
    // writes nothing either.)
    log::set_max_level(log::LevelFilter::Warn);
    one_call(&sim).await;
    let logged = taken();
    assert!(logged.is_empty(), "{logged:#?}");
}
