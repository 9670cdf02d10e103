//! OpenAI Chat Completions (and Azure OpenAI) templates:
//! docs/protocols.md#openai-errors and the sections after it, and
//! docs/protocols.md#azure-openai.

use serde_json::{json, Value};

use super::{
    ceil_secs, go_duration, sse_data, token_text, Answer, BadRequest, Ctx, Dialect, ErrorCase,
    LimitKind, Piece, StreamEnd, Tail,
};

const PARSE_ERROR: &str = "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)";
const SERVER_ERROR: &str =
    "The server had an error while processing your request. Sorry about that!";
const OVERLOADED: &str = "That model is currently overloaded with other requests. You can retry your request, or contact us through our help center at help.openai.com if the error persists.";
const QUOTA: &str = "You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.";

fn error(message: impl Into<String>, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message.into(), "type": kind, "param": param, "code": code}})
}

/// The error body for `case`.
pub(crate) fn error_body(dialect: Dialect, case: &ErrorCase, ctx: &Ctx) -> Value {
    let wait = ctx
        .retry_after
        .map(go_duration)
        .unwrap_or_else(|| "1s".into());
    match case {
        ErrorCase::NotFound { method, path } | ErrorCase::MethodNotAllowed { method, path } => {
            error(
                format!("Invalid URL ({method} {path})"),
                "invalid_request_error",
                None,
                None,
            )
        }
        ErrorCase::BadRequest(BadRequest::InvalidJson(_)) => {
            error(PARSE_ERROR, "invalid_request_error", None, None)
        }
        ErrorCase::BadRequest(BadRequest::Invalid { message, param }) => {
            error(message.clone(), "invalid_request_error", *param, None)
        }
        ErrorCase::BodyTooLarge { limit } => error(
            format!("Request body too large: the limit is {limit} bytes."),
            "invalid_request_error",
            None,
            None,
        ),
        ErrorCase::ModelNotFound => error(
            format!(
                "The model `{}` does not exist or you do not have access to it.",
                ctx.model
            ),
            "invalid_request_error",
            None,
            Some("model_not_found"),
        ),
        ErrorCase::QuotaExhausted => error(QUOTA, "insufficient_quota", None, Some("insufficient_quota")),
        ErrorCase::ContextLength { prompt, window } => error(
            format!("This model's maximum context length is {window} tokens. However, your messages resulted in {prompt} tokens. Please reduce the length of the messages."),
            "invalid_request_error",
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        ErrorCase::RateLimited { .. } | ErrorCase::Status(429) if dialect == Dialect::AzureOpenAi => {
            let secs = ctx.retry_after.map_or(1, ceil_secs);
            json!({"error": {"code": "429", "message": format!("Rate limit is exceeded. Try again in {secs} seconds.")}})
        }
        ErrorCase::RateLimited {
            kind,
            limit,
            used,
            requested,
            too_large,
        } => {
            let (kind, unit) = match kind {
                LimitKind::Requests => ("requests", "requests per min (RPM)"),
                LimitKind::Tokens => ("tokens", "tokens per min (TPM)"),
            };
            let model = &ctx.model;
            let message = if *too_large {
                format!("Request too large for {model} in organization org-sim on {unit}: Limit {limit}, Requested {requested}. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.")
            } else {
                format!("Rate limit reached for {model} in organization org-sim on {unit}: Limit {limit}, Used {used}, Requested {requested}. Please try again in {wait}. Visit https://platform.openai.com/account/rate-limits to learn more.")
            };
            error(message, kind, None, Some("rate_limit_exceeded"))
        }
        ErrorCase::Status(status) => status_body(*status, &ctx.model, &wait),
    }
}

fn status_body(status: u16, model: &str, wait: &str) -> Value {
    match status {
        401 => error(
            "Incorrect API key provided: sk-sim***. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        ),
        429 => error(
            format!("Rate limit reached for {model} in organization org-sim on requests per min (RPM). Please try again in {wait}. Visit https://platform.openai.com/account/rate-limits to learn more."),
            "requests",
            None,
            Some("rate_limit_exceeded"),
        ),
        503 | 529 => error(OVERLOADED, "service_unavailable_error", None, Some("server_is_overloaded")),
        500..=599 => error(SERVER_ERROR, "server_error", None, None),
        _ => error(
            format!("Simulated error (HTTP {status})."),
            "invalid_request_error",
            None,
            None,
        ),
    }
}

/// The error event of a stream cut by `StreamFault::ErrorEventAfterTokens`.
pub(crate) fn mid_stream_error() -> Value {
    error(SERVER_ERROR, "server_error", None, None)
}

fn finish_reason(a: &Answer) -> &'static str {
    if a.truncated {
        "length"
    } else {
        "stop"
    }
}

fn usage(a: &Answer) -> Value {
    json!({
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "total_tokens": a.total_tokens(),
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    })
}

fn id(ctx: &Ctx) -> String {
    format!("chatcmpl-sim{:016x}", ctx.seq)
}

/// A non-streamed `chat.completion`.
pub(crate) fn success_json(ctx: &Ctx, a: &Answer) -> Value {
    json!({
        "id": id(ctx),
        "object": "chat.completion",
        "created": ctx.created(),
        "model": ctx.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": a.text(), "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason(a),
        }],
        "usage": usage(a),
        "system_fingerprint": "fp_sim",
    })
}

/// A `chat.completion.chunk` stream: a role chunk, one chunk per token, a
/// finish chunk, the usage chunk (`choices: []`, only with `include_usage`),
/// then `data: [DONE]`.
pub(crate) fn stream(ctx: &Ctx, a: &Answer, end: StreamEnd) -> Vec<Piece> {
    let id = id(ctx);
    let created = ctx.created();
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut v = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": ctx.model,
            "system_fingerprint": "fp_sim",
            "choices": choices,
        });
        if a.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        sse_data(&v)
    };
    let choice = |delta: Value, finish: Option<&str>| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let Some((shown, tail)) = end.plan(a.completion_tokens) else {
        return Vec::new();
    };
    let mut pieces = vec![Piece::meta(chunk(
        choice(
            json!({"role": "assistant", "content": "", "refusal": null}),
            None,
        ),
        None,
    ))];
    for i in 0..shown {
        pieces.push(Piece::token(chunk(
            choice(json!({"content": token_text(i)}), None),
            None,
        )));
    }
    match tail {
        Tail::None => {}
        Tail::Error => pieces.push(Piece::meta(sse_data(&mid_stream_error()))),
        Tail::Finish => {
            pieces.push(Piece::meta(chunk(
                choice(json!({}), Some(finish_reason(a))),
                None,
            )));
            if a.include_usage {
                pieces.push(Piece::meta(chunk(json!([]), Some(usage(a)))));
            }
            pieces.push(Piece::meta("data: [DONE]\n\n".into()));
        }
    }
    pieces
}
