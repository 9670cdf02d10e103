//! Anthropic Messages templates: docs/protocols.md#anthropic-errors and the sections after it.

use serde_json::{json, Value};

use super::{
    first_of_next_month, token_text, Answer, BadRequest, Ctx, ErrorCase, LimitKind, Piece,
    StreamEnd, Tail,
};

/// The `request-id` header and the `request_id` body field.
pub(crate) fn request_id(ctx: &Ctx) -> String {
    format!("req_sim{:018x}", ctx.seq)
}

fn error(ctx: &Ctx, kind: &str, message: impl Into<String>) -> Value {
    json!({
        "type": "error",
        "error": {"type": kind, "message": message.into()},
        "request_id": request_id(ctx),
    })
}

/// The error body for `case`.
pub(crate) fn error_body(case: &ErrorCase, ctx: &Ctx) -> Value {
    match case {
        ErrorCase::NotFound { .. } => error(ctx, "not_found_error", "Not Found"),
        ErrorCase::MethodNotAllowed { .. } => {
            error(ctx, "invalid_request_error", "Method Not Allowed")
        }
        ErrorCase::BadRequest(BadRequest::InvalidJson(detail)) => error(
            ctx,
            "invalid_request_error",
            format!("There was an error parsing the body of your request: {detail}"),
        ),
        ErrorCase::BadRequest(BadRequest::Invalid { message, .. }) => {
            error(ctx, "invalid_request_error", message.clone())
        }
        ErrorCase::BodyTooLarge { .. } => error(
            ctx,
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
        ),
        ErrorCase::ModelNotFound => error(ctx, "not_found_error", format!("model: {}", ctx.model)),
        ErrorCase::QuotaExhausted => {
            let mut body = error(
                ctx,
                "rate_limit_error",
                format!(
                    "You have reached your API usage limits: your organization has crossed its monthly API usage threshold, set based on your organization's API tier. You will regain access on {} at 00:00 UTC.",
                    first_of_next_month(ctx.wall_now)
                ),
            );
            body["error"]["details"] = json!({"error_code": "enforced_spend_limit_reached"});
            body
        }
        ErrorCase::ContextLength { prompt, window } => error(
            ctx,
            "invalid_request_error",
            format!("prompt is too long: {prompt} tokens > {window} maximum"),
        ),
        ErrorCase::RateLimited { kind, limit, .. } => {
            let unit = match kind {
                LimitKind::Requests => "requests",
                LimitKind::Tokens => "tokens",
            };
            error(
                ctx,
                "rate_limit_error",
                format!("This request would exceed the rate limit for your organization (sim) of {limit} {unit} per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later."),
            )
        }
        ErrorCase::Status(status) => {
            let (kind, message) = match status {
                401 => ("authentication_error", "invalid x-api-key"),
                402 => ("billing_error", "Your credit balance is too low."),
                403 => (
                    "permission_error",
                    "Your API key does not have permission to use the specified resource.",
                ),
                404 => ("not_found_error", "Not Found"),
                413 => (
                    "request_too_large",
                    "Request exceeds the maximum allowed number of bytes.",
                ),
                429 => (
                    "rate_limit_error",
                    "Number of requests has exceeded your rate limit.",
                ),
                504 => ("timeout_error", "Request timed out"),
                529 => ("overloaded_error", "Overloaded"),
                500..=599 => ("api_error", "Internal server error"),
                _ => ("invalid_request_error", "Simulated error."),
            };
            error(ctx, kind, message)
        }
    }
}

/// The `event: error` payload of a stream cut by an error event.
pub(crate) fn mid_stream_error() -> Value {
    json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
}

fn stop_reason(a: &Answer) -> &'static str {
    if a.truncated {
        "max_tokens"
    } else {
        "end_turn"
    }
}

fn id(ctx: &Ctx) -> String {
    format!("msg_sim{:018x}", ctx.seq)
}

/// A non-streamed `message`.
pub(crate) fn success_json(ctx: &Ctx, a: &Answer) -> Value {
    json!({
        "id": id(ctx),
        "type": "message",
        "role": "assistant",
        "model": ctx.model,
        "content": [{"type": "text", "text": a.text()}],
        "stop_reason": stop_reason(a),
        "stop_sequence": null,
        "usage": {"input_tokens": a.prompt_tokens, "output_tokens": a.completion_tokens},
    })
}

fn event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// `message_start`, `content_block_start`, `ping`, one `content_block_delta`
/// per token, `content_block_stop`, `message_delta` (cumulative usage),
/// `message_stop`; named events.
pub(crate) fn stream(ctx: &Ctx, a: &Answer, end: StreamEnd) -> Vec<Piece> {
    let Some((shown, tail)) = end.plan(a.completion_tokens) else {
        return Vec::new();
    };
    let mut pieces = vec![
        Piece::meta(event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id(ctx), "type": "message", "role": "assistant", "content": [],
                "model": ctx.model, "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": a.prompt_tokens, "output_tokens": 1},
            }}),
        )),
        Piece::meta(event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
        )),
        Piece::meta(event("ping", &json!({"type": "ping"}))),
    ];
    for i in 0..shown {
        pieces.push(Piece::token(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": token_text(i)}}),
        )));
    }
    match tail {
        Tail::None => {}
        Tail::Error => pieces.push(Piece::meta(event("error", &mid_stream_error()))),
        Tail::Finish => {
            pieces.push(Piece::meta(event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": 0}),
            )));
            pieces.push(Piece::meta(event(
                "message_delta",
                &json!({"type": "message_delta",
                        "delta": {"stop_reason": stop_reason(a), "stop_sequence": null},
                        "usage": {"input_tokens": a.prompt_tokens,
                                  "output_tokens": a.completion_tokens}}),
            )));
            pieces.push(Piece::meta(event(
                "message_stop",
                &json!({"type": "message_stop"}),
            )));
        }
    }
    pieces
}
