//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use bytes::Bytes;
use http::response::Parts;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tower::ServiceExt;
use tower_ai_sim::{SimBody, Simulator};

pub const OPENAI: &str = "/v1/chat/completions";
pub const ANTHROPIC: &str = "/v1/messages";

pub fn gemini(model: &str, stream: bool, sse: bool) -> String {
    match (stream, sse) {
        (false, _) => format!("/v1beta/models/{model}:generateContent"),
        (true, true) => format!("/v1beta/models/{model}:streamGenerateContent?alt=sse"),
        (true, false) => format!("/v1beta/models/{model}:streamGenerateContent"),
    }
}

/// An OpenAI / Anthropic style body with one user message.
pub fn chat(model: &str, content: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}]})
}

/// A Gemini body with one user message.
pub fn gemini_body(content: &str) -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": content}]}]})
}

pub async fn send(sim: &Simulator, path: &str, body: impl Into<Bytes>) -> Response<SimBody> {
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    sim.service().oneshot(req).await.unwrap()
}

pub async fn send_json(sim: &Simulator, path: &str, body: &Value) -> Response<SimBody> {
    send(sim, path, body.to_string()).await
}

pub async fn read(resp: Response<SimBody>) -> (Parts, String) {
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts, String::from_utf8(bytes.to_vec()).unwrap())
}

pub async fn read_json(resp: Response<SimBody>) -> (Parts, Value) {
    let (parts, text) = read(resp).await;
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (parts, v)
}

pub fn header<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).map(|v| v.to_str().unwrap())
}

/// Split an LF-framed SSE body into (event name, data JSON or raw) pairs.
pub fn sse_events(text: &str, sep: &str) -> Vec<(Option<String>, String)> {
    assert!(
        text.ends_with(sep),
        "stream does not end with a frame separator: {text:?}"
    );
    text[..text.len() - sep.len()]
        .split(sep)
        .map(|frame| {
            let mut event = None;
            let mut data = Vec::new();
            let line_sep = if sep == "\r\n\r\n" { "\r\n" } else { "\n" };
            for line in frame.split(line_sep) {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                } else {
                    panic!("unexpected SSE line {line:?} in {frame:?}");
                }
            }
            (event, data.join("\n"))
        })
        .collect()
}

pub fn parse(data: &str) -> Value {
    serde_json::from_str(data).unwrap_or_else(|e| panic!("bad JSON in event ({e}): {data}"))
}
