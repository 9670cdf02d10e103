//! Bad input gets a proper error in the dialect's shape, never a panic.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;
use support::*;
use tower::ServiceExt;
use tower_ai_sim::{digest, Dialect, ModelSpec, Outcome, Scenario, Simulator};

async fn error_of(sim: &Simulator, path: &str, body: impl Into<Bytes>) -> (u16, Value) {
    let (parts, v) = read_json(send(sim, path, body).await).await;
    (parts.status.as_u16(), v)
}

fn assert_openai_error(v: &Value, kind: &str) {
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(v["error"]["message"].is_string());
    assert!(v["error"].get("param").is_some() && v["error"].get("code").is_some());
}

fn assert_anthropic_error(v: &Value, kind: &str) {
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(v["request_id"].is_string());
}

fn assert_gemini_error(v: &Value, code: u16, status: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["status"], status);
    assert!(v["error"]["message"].is_string());
}

#[tokio::test]
async fn non_json_and_empty_bodies() {
    let sim = Simulator::new(Scenario::default());
    for body in [
        &b"not json"[..],
        b"",
        b"{\"model\":",
        b"\xff\xfe\x00",
        b"[1,2,3]",
        b"null",
    ] {
        let (status, v) = error_of(&sim, OPENAI, body.to_vec()).await;
        assert_eq!(status, 400, "{body:?}");
        assert_openai_error(&v, "invalid_request_error");

        let (status, v) = error_of(&sim, ANTHROPIC, body.to_vec()).await;
        assert_eq!(status, 400);
        assert_anthropic_error(&v, "invalid_request_error");

        let (status, v) = error_of(&sim, &gemini("g", false, false), body.to_vec()).await;
        assert_eq!(status, 400);
        assert_gemini_error(&v, 400, "INVALID_ARGUMENT");
    }
    let stats = sim.stats();
    assert_eq!(stats.count(400), 18);
    assert_eq!(stats.outcome(Outcome::BadRequest), 18);
    // The exact bytes are still recorded.
    assert_eq!(sim.calls()[0].body_digest, digest(b"not json"));
    assert_eq!(sim.calls()[3].body_len, 0);
}

#[tokio::test]
async fn missing_model_and_wrong_types() {
    let sim = Simulator::new(Scenario::default());
    for body in [
        r#"{"messages":[]}"#,
        r#"{"model":42}"#,
        r#"{"model":""}"#,
        r#"{"model":"m","stream":"yes"}"#,
        r#"{"model":"m","max_tokens":"ten"}"#,
        r#"{"model":"m","max_tokens":-5}"#,
    ] {
        let (status, v) = error_of(&sim, OPENAI, body).await;
        assert_eq!(status, 400, "{body}");
        assert_openai_error(&v, "invalid_request_error");
    }
    // Fields of odd types where text is expected are ignored, not fatal.
    let (status, _) = error_of(
        &sim,
        OPENAI,
        r#"{"model":"m","messages":[1,null,{"content":{"x":1}},{"content":[5,{"text":7}]}]}"#,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn huge_model_name() {
    let sim = Simulator::new(Scenario::default());
    let name = "m".repeat(100_000);
    let (status, v) = error_of(&sim, OPENAI, chat(&name, "hi").to_string()).await;
    assert_eq!(status, 400);
    assert_openai_error(&v, "invalid_request_error");
    assert_eq!(v["error"]["param"], "model");
    // In the Gemini path too (http::Uri itself refuses paths over 64 KiB).
    let name = "m".repeat(1_000);
    let (status, v) = error_of(
        &sim,
        &gemini(&name, false, false),
        gemini_body("hi").to_string(),
    )
    .await;
    assert_eq!(status, 400);
    assert_gemini_error(&v, 400, "INVALID_ARGUMENT");
}

#[tokio::test]
async fn unknown_paths_and_methods() {
    let sim = Simulator::new(Scenario::default());
    let (status, v) = error_of(&sim, "/v1/engines/davinci/completions", "{}").await;
    assert_eq!(status, 404);
    assert_openai_error(&v, "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/engines/davinci/completions"));

    let (status, v) = error_of(&sim, "/v1beta/models/g:countTokens", "{}").await;
    assert_eq!(status, 404);
    assert_gemini_error(&v, 404, "NOT_FOUND");

    let req = Request::post("/v1/complete")
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (parts, v) = read_json(sim.service().oneshot(req).await.unwrap()).await;
    assert_eq!(parts.status, 404);
    assert_anthropic_error(&v, "not_found_error");

    let req = Request::get("/v1/chat/completions")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (parts, v) = read_json(sim.service().oneshot(req).await.unwrap()).await;
    assert_eq!(parts.status, 405);
    assert_openai_error(&v, "invalid_request_error");

    for path in [
        "/",
        "/openai/deployments//chat/completions",
        "/v1beta/models/:generateContent",
    ] {
        let (status, _) = error_of(&sim, path, "{}").await;
        assert_eq!(status, 404, "{path}");
    }
    assert_eq!(sim.stats().outcome(Outcome::NotFound), 7);
    assert_eq!(sim.calls()[2].dialect, Dialect::Anthropic);
}

#[tokio::test]
async fn body_over_the_limit() {
    let sim = Simulator::new(Scenario::builder().max_body_bytes(1000).build().unwrap());
    let (status, v) = error_of(&sim, ANTHROPIC, vec![b' '; 1001]).await;
    assert_eq!(status, 413);
    assert_anthropic_error(&v, "request_too_large");
    let (status, _) = error_of(&sim, OPENAI, chat("m", "hi").to_string()).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn strict_models_answer_404() {
    let sim = Simulator::new(
        Scenario::builder()
            .strict_models(true)
            .model(ModelSpec::new("known"))
            .build()
            .unwrap(),
    );
    let (status, v) = error_of(&sim, OPENAI, chat("unknown", "hi").to_string()).await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    let (status, v) = error_of(
        &sim,
        &gemini("unknown", false, false),
        gemini_body("x").to_string(),
    )
    .await;
    assert_eq!(status, 404);
    assert_gemini_error(&v, 404, "NOT_FOUND");
    assert_eq!(
        error_of(&sim, OPENAI, chat("known", "hi").to_string())
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn random_bytes_never_panic() {
    let sim = Simulator::new(Scenario::default());
    let mut rng = fastrand::Rng::with_seed(99);
    let paths = [
        OPENAI,
        ANTHROPIC,
        "/v1beta/models/g:streamGenerateContent?alt=sse",
        "/x",
    ];
    for i in 0..400 {
        let len = rng.usize(0..200);
        let mut body: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        if i % 2 == 0 {
            // Mostly-valid JSON with random damage.
            body = format!(
                r#"{{"model":"m{}","stream":{},"max_tokens":{},"messages":[{{"content":"{}"}}]}}"#,
                rng.u32(..),
                rng.bool(),
                rng.i64(-3..5),
                "é".repeat(rng.usize(0..10))
            )
            .into_bytes();
            if rng.bool() && !body.is_empty() {
                let at = rng.usize(..body.len());
                body.truncate(at);
            }
        }
        let path = paths[i % paths.len()];
        let resp = send(&sim, path, body).await;
        let status = resp.status().as_u16();
        let (_, text) = read(resp).await;
        assert!(matches!(status, 200 | 400 | 404), "{status}");
        if status != 200 {
            serde_json::from_str::<Value>(&text).expect("error bodies are JSON");
        }
    }
    assert_eq!(sim.stats().total, 400);
}
