//! Each dialect's JSON and SSE answers, checked against the shapes in docs/protocols.md.

mod support;

use serde_json::{json, Value};
use support::*;
use tower_ai_sim::{digest, Dialect, ModelSpec, Outcome, Scenario, Simulator};

fn sim(tokens: u32) -> Simulator {
    Simulator::new(
        Scenario::builder()
            .default_model(ModelSpec::new("*").completion_tokens(tokens))
            .build()
            .unwrap(),
    )
}

// "Hello, world! x" is 15 bytes -> ceil(15 / 4) = 4 prompt tokens.
const PROMPT: &str = "Hello, world! x";
const PROMPT_TOKENS: u64 = 4;

#[tokio::test]
async fn openai_json() {
    let sim = sim(7);
    let body = chat("gpt-4o", PROMPT);
    let (parts, v) = read_json(send_json(&sim, OPENAI, &body).await).await;
    assert_eq!(parts.status, 200);
    assert_eq!(header(&parts, "content-type"), Some("application/json"));
    assert!(header(&parts, "x-request-id").unwrap().starts_with("req_"));
    assert_eq!(header(&parts, "openai-version"), Some("2020-10-01"));
    assert!(
        header(&parts, "x-ratelimit-limit-requests").is_none(),
        "no limits configured"
    );
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(!choice["message"]["content"].as_str().unwrap().is_empty());
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], PROMPT_TOKENS + 7);

    let call = &sim.calls()[0];
    assert_eq!(call.dialect, Dialect::OpenAi);
    assert_eq!(call.model.as_deref(), Some("gpt-4o"));
    assert_eq!((call.status, call.outcome), (200, Outcome::Success));
    assert_eq!(
        (call.prompt_tokens, call.completion_tokens),
        (PROMPT_TOKENS, 7)
    );
    assert_eq!(call.body_digest, digest(body.to_string().as_bytes()));
    assert!(!call.streamed);
}

#[tokio::test]
async fn openai_truncated_by_max_tokens() {
    let sim = sim(20);
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut body = chat("gpt-4o", PROMPT);
        body[field] = json!(3);
        let (_, v) = read_json(send_json(&sim, OPENAI, &body).await).await;
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{field}");
        assert_eq!(v["usage"]["completion_tokens"], 3);
    }
    // A max above what the model produces does not truncate.
    let mut body = chat("gpt-4o", PROMPT);
    body["max_tokens"] = json!(50);
    let (_, v) = read_json(send_json(&sim, OPENAI, &body).await).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 20);
    assert!(sim.calls()[0].truncated && !sim.calls()[2].truncated);
}

fn openai_stream_chunks(text: &str) -> Vec<Value> {
    let events = sse_events(text, "\n\n");
    assert!(
        events.iter().all(|(name, _)| name.is_none()),
        "OpenAI uses no event names"
    );
    let (last, rest) = events.split_last().unwrap();
    assert_eq!(last.1, "[DONE]");
    rest.iter().map(|(_, d)| parse(d)).collect()
}

#[tokio::test]
async fn openai_stream_without_usage() {
    let sim = sim(5);
    let mut body = chat("gpt-4o", PROMPT);
    body["stream"] = json!(true);
    let (parts, text) = read(send_json(&sim, OPENAI, &body).await).await;
    assert_eq!(parts.status, 200);
    assert!(header(&parts, "content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    assert!(!text.contains('\r'), "OpenAI frames are LF only");
    let chunks = openai_stream_chunks(&text);
    // role chunk + 5 content chunks + finish chunk, no usage chunk
    assert_eq!(chunks.len(), 7, "{text}");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(
            c.get("usage").is_none(),
            "no usage field without include_usage: {c}"
        );
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks[1..6]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert!(chunks[..6]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[6]["choices"][0]["delta"], json!({}));

    // The streamed text is the same as the non-streamed answer's.
    let (_, v) = read_json(send_json(&sim, OPENAI, &chat("gpt-4o", PROMPT)).await).await;
    assert_eq!(v["choices"][0]["message"]["content"], content);
    assert!(sim.calls()[0].streamed);
}

#[tokio::test]
async fn openai_stream_with_include_usage() {
    let sim = sim(4);
    let mut body = chat("gpt-4o", PROMPT);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body["max_tokens"] = json!(2);
    let (_, text) = read(send_json(&sim, OPENAI, &body).await).await;
    let chunks = openai_stream_chunks(&text);
    // role + 2 tokens + finish + usage
    assert_eq!(chunks.len(), 5, "{text}");
    let (usage_chunk, others) = chunks.split_last().unwrap();
    for c in others {
        assert!(
            c["usage"].is_null() && c.get("usage").is_some(),
            "usage: null on {c}"
        );
    }
    assert_eq!(
        others.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 2);
    assert_eq!(usage_chunk["usage"]["total_tokens"], PROMPT_TOKENS + 2);
}

#[tokio::test]
async fn azure_is_openai_with_a_deployment_path() {
    let sim = Simulator::new(Scenario::builder().rpm_limit(10).build().unwrap());
    let path = "/openai/deployments/my-gpt/chat/completions?api-version=2024-10-21";
    // Azure bodies usually carry no model: the deployment names it.
    let body = json!({"messages": [{"role": "user", "content": PROMPT}]});
    let (parts, v) = read_json(send_json(&sim, path, &body).await).await;
    assert_eq!(parts.status, 200);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "my-gpt");
    assert_eq!(header(&parts, "x-ratelimit-limit-requests"), Some("10"));
    assert_eq!(header(&parts, "x-ratelimit-remaining-requests"), Some("9"));
    // Azure's reset is a plain number of seconds, not a Go duration.
    assert_eq!(header(&parts, "x-ratelimit-reset-requests"), Some("60"));
    assert_eq!(sim.calls()[0].dialect, Dialect::AzureOpenAi);
}

#[tokio::test]
async fn anthropic_json() {
    let sim = sim(6);
    let mut body = chat("claude-sonnet", PROMPT);
    body["max_tokens"] = json!(1024);
    body["system"] = json!("abcd"); // +4 bytes -> 19 bytes -> 5 tokens
    let (parts, v) = read_json(send_json(&sim, ANTHROPIC, &body).await).await;
    assert_eq!(parts.status, 200);
    assert!(header(&parts, "request-id").unwrap().starts_with("req_"));
    assert!(header(&parts, "date").unwrap().ends_with(" GMT"));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(v["content"][0]["type"], "text");
    assert!(!v["content"][0]["text"].as_str().unwrap().is_empty());
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["stop_sequence"].is_null());
    assert_eq!(v["usage"], json!({"input_tokens": 5, "output_tokens": 6}));

    body["max_tokens"] = json!(2);
    let (_, v) = read_json(send_json(&sim, ANTHROPIC, &body).await).await;
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 2);
}

#[tokio::test]
async fn anthropic_stream() {
    let sim = sim(4);
    let mut body = chat("claude-sonnet", PROMPT);
    body["max_tokens"] = json!(1024);
    body["stream"] = json!(true);
    let (parts, text) = read(send_json(&sim, ANTHROPIC, &body).await).await;
    assert!(header(&parts, "content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    assert!(!text.contains("[DONE]"));
    let events = sse_events(&text, "\n\n");
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let data: Vec<Value> = events.iter().map(|(_, d)| parse(d)).collect();
    for ((name, _), d) in events.iter().zip(&data) {
        assert_eq!(
            d["type"],
            name.as_deref().unwrap(),
            "type matches the event name"
        );
    }
    assert_eq!(data[0]["message"]["usage"]["input_tokens"], PROMPT_TOKENS);
    assert_eq!(data[0]["message"]["content"], json!([]));
    assert_eq!(data[3]["delta"]["type"], "text_delta");
    // message_delta usage is cumulative: the whole answer's output tokens.
    assert_eq!(data[8]["usage"]["output_tokens"], 4);
    assert_eq!(data[8]["delta"]["stop_reason"], "end_turn");

    body["max_tokens"] = json!(1);
    let (_, text) = read(send_json(&sim, ANTHROPIC, &body).await).await;
    let events = sse_events(&text, "\n\n");
    let delta = events
        .iter()
        .find(|(n, _)| n.as_deref() == Some("message_delta"))
        .unwrap();
    let delta = parse(&delta.1);
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["output_tokens"], 1);
}

#[tokio::test]
async fn gemini_json() {
    let sim = sim(3);
    let (parts, v) = read_json(
        send_json(
            &sim,
            &gemini("gemini-2.0-flash", false, false),
            &gemini_body(PROMPT),
        )
        .await,
    )
    .await;
    assert_eq!(parts.status, 200);
    assert!(header(&parts, "content-type")
        .unwrap()
        .starts_with("application/json"));
    let c = &v["candidates"][0];
    assert_eq!(c["content"]["role"], "model");
    assert!(!c["content"]["parts"][0]["text"]
        .as_str()
        .unwrap()
        .is_empty());
    assert_eq!(c["finishReason"], "STOP");
    assert_eq!(v["usageMetadata"]["promptTokenCount"], PROMPT_TOKENS);
    assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 3);
    assert_eq!(v["usageMetadata"]["totalTokenCount"], PROMPT_TOKENS + 3);
    assert_eq!(v["modelVersion"], "gemini-2.0-flash");
    let call = &sim.calls()[0];
    assert_eq!(call.dialect, Dialect::Gemini);
    assert_eq!(call.model.as_deref(), Some("gemini-2.0-flash"));

    let mut body = gemini_body(PROMPT);
    body["generationConfig"] = json!({"maxOutputTokens": 2});
    let (_, v) = read_json(send_json(&sim, &gemini("g", false, false), &body).await).await;
    assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");
    assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 2);
}

#[tokio::test]
async fn gemini_sse_uses_crlf_and_no_done() {
    let sim = sim(3);
    let (parts, text) = read(
        send_json(
            &sim,
            &gemini("gemini-2.0-flash", true, true),
            &gemini_body(PROMPT),
        )
        .await,
    )
    .await;
    assert_eq!(parts.status, 200);
    assert!(header(&parts, "content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    assert!(!text.contains("[DONE]"));
    // Every line break is CRLF.
    assert_eq!(
        text.matches('\n').count(),
        text.matches("\r\n").count(),
        "{text:?}"
    );
    let events = sse_events(&text, "\r\n\r\n");
    assert_eq!(events.len(), 3);
    let chunks: Vec<Value> = events
        .iter()
        .map(|(n, d)| {
            assert!(n.is_none());
            parse(d)
        })
        .collect();
    for c in &chunks[..2] {
        assert!(c["candidates"][0].get("finishReason").is_none());
        assert!(c["usageMetadata"].get("candidatesTokenCount").is_none());
        assert_eq!(c["usageMetadata"]["promptTokenCount"], PROMPT_TOKENS);
    }
    let last = &chunks[2];
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert_eq!(last["usageMetadata"]["candidatesTokenCount"], 3);
    assert_eq!(last["usageMetadata"]["totalTokenCount"], PROMPT_TOKENS + 3);
    assert!(sim.calls()[0].streamed);
}

#[tokio::test]
async fn gemini_stream_without_sse_is_a_json_array() {
    let sim = sim(3);
    let (parts, text) =
        read(send_json(&sim, &gemini("g", true, false), &gemini_body(PROMPT)).await).await;
    assert!(header(&parts, "content-type")
        .unwrap()
        .starts_with("application/json"));
    let v: Value = serde_json::from_str(&text).unwrap();
    let chunks = v.as_array().unwrap();
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks[2]["candidates"][0]["finishReason"], "STOP");
}

#[tokio::test]
async fn prompt_estimate_counts_all_text() {
    let sim = sim(1);
    // 4 + 3 + 2 ("é") + 100 = 109 bytes -> 28 tokens
    let body = json!({
        "model": "m",
        "instructions": "abcd",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "abc"}, {"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": "é"},
            {"role": "user", "content": "x".repeat(100)},
        ],
    });
    let (_, v) = read_json(send_json(&sim, OPENAI, &body).await).await;
    assert_eq!(v["usage"]["prompt_tokens"], 28);
}
