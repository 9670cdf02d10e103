//! Gemini generateContent templates: docs/protocols.md#gemini-errors and the sections after it.

use serde_json::{json, Value};

use super::{
    proto_duration, token_text, Answer, BadRequest, Ctx, ErrorCase, LimitKind, Piece, StreamEnd,
    Tail,
};

const HELP: &str = "https://ai.google.dev/gemini-api/docs/rate-limits";

fn status_name(status: u16) -> &'static str {
    match status {
        400 | 413 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 => "UNIMPLEMENTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        502 | 503 | 529 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        500..=599 => "INTERNAL",
        _ => "FAILED_PRECONDITION",
    }
}

fn error(status: u16, message: impl Into<String>, details: Vec<Value>) -> Value {
    let mut inner =
        json!({"code": status, "message": message.into(), "status": status_name(status)});
    if !details.is_empty() {
        inner["details"] = Value::Array(details);
    }
    json!({ "error": inner })
}

fn retry_info(delay: std::time::Duration) -> Value {
    json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": proto_duration(delay)})
}

fn quota_failure(metric: &str, quota_id: &str, model: &str, limit: u64) -> Value {
    json!({
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{
            "quotaMetric": format!("generativelanguage.googleapis.com/{metric}"),
            "quotaId": quota_id,
            "quotaDimensions": {"location": "global", "model": model},
            "quotaValue": limit.to_string(),
        }],
    })
}

fn help() -> Value {
    json!({
        "@type": "type.googleapis.com/google.rpc.Help",
        "links": [{"description": "Learn more about Gemini API quotas", "url": HELP}],
    })
}

fn quota_message(
    metric: &str,
    limit: u64,
    model: &str,
    wait: Option<std::time::Duration>,
) -> String {
    let mut m = format!("You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: {HELP}.\n* Quota exceeded for metric: generativelanguage.googleapis.com/{metric}, limit: {limit}, model: {model}");
    if let Some(w) = wait {
        m.push_str(&format!("\nPlease retry in {}.", proto_duration(w)));
    }
    m
}

/// The error body for `case` (the status comes from the case).
pub(crate) fn error_body(case: &ErrorCase, ctx: &Ctx) -> Value {
    let status = case.status();
    let model = ctx.model.as_str();
    let with_wait = |message: String, mut details: Vec<Value>| {
        if let Some(w) = ctx.retry_after {
            details.push(retry_info(w));
        }
        error(status, message, details)
    };
    match case {
        ErrorCase::NotFound { path, .. } => {
            error(404, format!("The requested URL {path} was not found on this server."), vec![])
        }
        ErrorCase::MethodNotAllowed { method, .. } => {
            error(405, format!("Method {method} is not supported for this endpoint."), vec![])
        }
        ErrorCase::BadRequest(BadRequest::InvalidJson(detail)) => {
            error(400, format!("Invalid JSON payload received. {detail}"), vec![])
        }
        ErrorCase::BadRequest(BadRequest::Invalid { message, .. }) => {
            error(400, message.clone(), vec![])
        }
        ErrorCase::BodyTooLarge { limit } => error(
            413,
            format!("Request payload size exceeds the limit: {limit} bytes."),
            vec![],
        ),
        ErrorCase::ModelNotFound => error(
            404,
            format!("models/{model} is not found for API version v1beta, or is not supported for generateContent. Call ListModels to see the list of available models and their supported methods."),
            vec![],
        ),
        ErrorCase::QuotaExhausted => {
            let metric = "generate_content_free_tier_requests";
            error(
                429,
                quota_message(metric, 0, model, Some(ctx.until_next_day)),
                vec![
                    quota_failure(metric, "GenerateRequestsPerDayPerProjectPerModel-FreeTier", model, 0),
                    help(),
                    retry_info(ctx.until_next_day),
                ],
            )
        }
        ErrorCase::ContextLength { prompt, window } => error(
            400,
            format!("The input token count ({prompt}) exceeds the maximum number of tokens allowed ({window})."),
            vec![],
        ),
        ErrorCase::RateLimited {
            kind,
            limit,
            too_large,
            ..
        } => {
            let (metric, quota_id) = match kind {
                LimitKind::Requests => (
                    "generate_content_free_tier_requests",
                    "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                ),
                LimitKind::Tokens => (
                    "generate_content_free_tier_input_token_count",
                    "GenerateContentInputTokensPerModelPerMinute-FreeTier",
                ),
            };
            let wait = if *too_large { None } else { ctx.retry_after };
            let mut details = vec![quota_failure(metric, quota_id, model, *limit), help()];
            if let Some(w) = wait {
                details.push(retry_info(w));
            }
            error(429, quota_message(metric, *limit, model, wait), details)
        }
        ErrorCase::Status(s) => {
            let message = match s {
                401 => "API key not valid. Please pass a valid API key.",
                429 => "Resource has been exhausted (e.g. check quota).",
                502 | 503 | 529 => "The model is overloaded. Please try again later.",
                504 => "Deadline expired before operation could complete.",
                500..=599 => "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
                _ => "Simulated error.",
            };
            with_wait(message.to_owned(), vec![])
        }
    }
}

/// The `data:` payload of a stream cut by an error event.
pub(crate) fn mid_stream_error() -> Value {
    error(
        503,
        "The model is overloaded. Please try again later.",
        vec![],
    )
}

fn finish_reason(a: &Answer) -> &'static str {
    if a.truncated {
        "MAX_TOKENS"
    } else {
        "STOP"
    }
}

fn usage(a: &Answer) -> Value {
    json!({
        "promptTokenCount": a.prompt_tokens,
        "candidatesTokenCount": a.completion_tokens,
        "totalTokenCount": a.total_tokens(),
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": a.prompt_tokens}],
    })
}

fn response_id(ctx: &Ctx) -> String {
    format!("sim{:016x}", ctx.seq)
}

/// A non-streamed `GenerateContentResponse`.
pub(crate) fn success_json(ctx: &Ctx, a: &Answer) -> Value {
    json!({
        "candidates": [{
            "content": {"parts": [{"text": a.text()}], "role": "model"},
            "finishReason": finish_reason(a),
            "index": 0,
        }],
        "usageMetadata": usage(a),
        "modelVersion": ctx.model,
        "responseId": response_id(ctx),
    })
}

/// One full `GenerateContentResponse` per token; the last carries
/// `finishReason` and the final `usageMetadata`, earlier ones only
/// `promptTokenCount`/`totalTokenCount`. SSE frames end in `\r\n\r\n` and
/// there is no `[DONE]`; without `alt=sse` the chunks form a JSON array.
pub(crate) fn stream(ctx: &Ctx, a: &Answer, end: StreamEnd) -> Vec<Piece> {
    // A stream always has at least one chunk, even for zero tokens.
    let chunks = a.completion_tokens.max(1);
    let Some((shown, tail)) = end.plan(chunks) else {
        return Vec::new();
    };
    let early_usage =
        json!({"promptTokenCount": a.prompt_tokens, "totalTokenCount": a.prompt_tokens});
    let mut items: Vec<(Value, bool)> = Vec::new();
    for i in 0..shown {
        let text = if i < a.completion_tokens {
            token_text(i)
        } else {
            ""
        };
        let last = i + 1 == chunks && tail == Tail::Finish;
        let mut candidate =
            json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
        if last {
            candidate["finishReason"] = json!(finish_reason(a));
        }
        items.push((
            json!({
                "candidates": [candidate],
                "usageMetadata": if last { usage(a) } else { early_usage.clone() },
                "modelVersion": ctx.model,
                "responseId": response_id(ctx),
            }),
            true,
        ));
    }
    if tail == Tail::Error {
        items.push((mid_stream_error(), false));
    }
    let closes = tail != Tail::None;
    let mut pieces = Vec::with_capacity(items.len() + 1);
    for (i, (item, is_token)) in items.into_iter().enumerate() {
        let text = if a.gemini_sse {
            format!("data: {item}\r\n\r\n")
        } else if i == 0 {
            format!("[{item}")
        } else {
            format!(",\r\n{item}")
        };
        pieces.push(Piece {
            bytes: text.into(),
            is_token,
        });
    }
    if closes && !a.gemini_sse {
        let close = if pieces.is_empty() { "[]" } else { "]" };
        pieces.push(Piece::meta(close.into()));
    }
    pieces
}
