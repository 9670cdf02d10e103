//! The stream reader against each dialect's recorded streams (docs/protocols.md#openai-chat-stream,
//! docs/protocols.md#openai-responses-stream, docs/protocols.md#anthropic-stream,
//! docs/protocols.md#gemini-stream, docs/protocols.md#openai-compatible), fed whole and in
//! awkward splits.

use tower_ai_core::stream::{FinishReason, StreamDialect, StreamScanner};
use tower_ai_core::{ErrorKind, Usage};

const OPENAI_CHAT: &str = concat!(
    "data: {\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\",\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_5050236cbd\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\",\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_5050236cbd\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"I'm\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\",\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_5050236cbd\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\",\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_5050236cbd\",\"choices\":[],\"usage\":{\"prompt_tokens\":14,\"completion_tokens\":30,\"total_tokens\":44,\"completion_tokens_details\":{\"reasoning_tokens\":0}}}\n\n",
    "data: [DONE]\n\n",
);

const ANTHROPIC: &str = concat!(
    "event: message_start\n",
    "data: {\"type\": \"message_start\", \"message\": {\"id\": \"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\", \"type\": \"message\", \"role\": \"assistant\", \"content\": [], \"model\": \"claude-opus-4-8\", \"stop_reason\": null, \"stop_sequence\": null, \"usage\": {\"input_tokens\": 25, \"output_tokens\": 1}}}\n\n",
    "event: content_block_start\n",
    "data: {\"type\": \"content_block_start\", \"index\": 0, \"content_block\": {\"type\": \"text\", \"text\": \"\"}}\n\n",
    "event: ping\n",
    "data: {\"type\": \"ping\"}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"Hello\"}}\n\n",
    "event: content_block_stop\n",
    "data: {\"type\": \"content_block_stop\", \"index\": 0}\n\n",
    "event: message_delta\n",
    "data: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": \"end_turn\", \"stop_sequence\":null}, \"usage\": {\"output_tokens\": 15}}\n\n",
    "event: message_stop\n",
    "data: {\"type\": \"message_stop\"}\n\n",
);

const GEMINI: &str = concat!(
    "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Potato\"}],\"role\": \"model\"}}],\"usageMetadata\": {\"promptTokenCount\": 10,\"totalTokenCount\": 10},\"modelVersion\": \"gemini-2.0-flash\"}\r\n\r\n",
    "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"ガイモ (jagaimo)\\nRussian: картофель (kartofel')\\n\"}],\"role\": \"model\"},\"finishReason\": \"STOP\"}],\"usageMetadata\": {\"promptTokenCount\": 10,\"candidatesTokenCount\": 49,\"totalTokenCount\": 59,\"promptTokensDetails\": [{\"modality\": \"TEXT\",\"tokenCount\": 10}],\"candidatesTokensDetails\": [{\"modality\": \"TEXT\",\"tokenCount\": 49}]},\"modelVersion\": \"gemini-2.0-flash\",\"responseId\": \"ibRCaOfLGfuQ1PIPqNma8Aw\"}\r\n\r\n",
);

struct Run {
    content_chunks: usize,
    liveness_chunks: usize,
    terminal: bool,
    error: Option<tower_ai_core::Classification>,
    scanner: StreamScanner,
}

fn run(dialect: StreamDialect, stream: &str, split: usize) -> Run {
    let mut s = StreamScanner::new(dialect);
    let mut r = Run {
        content_chunks: 0,
        liveness_chunks: 0,
        terminal: false,
        error: None,
        scanner: s.clone(),
    };
    let bytes = stream.as_bytes();
    let mut chunks: Vec<&[u8]> = bytes.chunks(split.max(1)).collect();
    chunks.push(b"");
    for (i, c) in chunks.iter().enumerate() {
        let f = if i + 1 == chunks.len() {
            s.finish()
        } else {
            s.feed(c)
        };
        r.content_chunks += f.content as usize;
        r.liveness_chunks += f.liveness as usize;
        r.terminal |= f.terminal;
        if f.error.is_some() {
            r.error = f.error;
        }
    }
    r.scanner = s;
    r
}

#[test]
fn openai_chat_stream() {
    for split in [usize::MAX, 1, 7, 64] {
        let r = run(StreamDialect::OpenAiChat, OPENAI_CHAT, split);
        assert!(r.terminal && r.scanner.terminal_seen(), "split {split}");
        assert!(r.scanner.content_seen());
        assert_eq!(r.scanner.finish_reason(), Some(FinishReason::Stop));
        assert_eq!(
            r.scanner.usage(),
            Some(Usage {
                input_tokens: 14,
                output_tokens: 30
            })
        );
        assert!(r.error.is_none());
    }
    // The first chunk (role, empty content) is not content.
    let mut s = StreamScanner::new(StreamDialect::OpenAiChat);
    let first = OPENAI_CHAT.split_inclusive("\n\n").next().unwrap();
    let f = s.feed(first.as_bytes());
    assert!(!f.content && f.liveness);
}

#[test]
fn openai_chat_truncated_by_length_and_cut_streams() {
    let length = OPENAI_CHAT.replace("\"finish_reason\":\"stop\"", "\"finish_reason\":\"length\"");
    let r = run(StreamDialect::OpenAiChat, &length, usize::MAX);
    assert_eq!(r.scanner.finish_reason(), Some(FinishReason::Length));
    assert!(r.scanner.finish_reason().unwrap().is_truncation());
    // Cut before [DONE] and before the usage chunk: no terminal, no usage.
    let cut: String = OPENAI_CHAT.split_inclusive("\n\n").take(2).collect();
    let r = run(StreamDialect::OpenAiChat, &cut, usize::MAX);
    assert!(!r.scanner.terminal_seen() && r.scanner.usage().is_none());
}

#[test]
fn openai_mid_stream_error() {
    let stream = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
        "data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n",
    );
    let r = run(StreamDialect::OpenAiChat, stream, 5);
    let e = r.error.expect("error event");
    assert_eq!(e.kind, Some(ErrorKind::ServerError));
    assert_eq!(e.status, 200);
    // A chunk carrying `"error": null` is not an error.
    let r = run(
        StreamDialect::OpenAiChat,
        "data: {\"error\":null,\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n",
        usize::MAX,
    );
    assert!(r.error.is_none() && r.scanner.content_seen());
}

#[test]
fn openai_responses_stream() {
    let stream = concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\",\"sequence_number\":1}\n\n",
        "event: response.incomplete\ndata: {\"type\":\"response.incomplete\",\"response\":{\"incomplete_details\":{\"reason\":\"max_output_tokens\"},\"usage\":{\"input_tokens\":5,\"output_tokens\":16,\"total_tokens\":21}},\"sequence_number\":2}\n\n",
    );
    let r = run(StreamDialect::OpenAiResponses, stream, 3);
    assert!(r.terminal && r.scanner.content_seen());
    assert_eq!(r.scanner.finish_reason(), Some(FinishReason::Length));
    assert_eq!(
        r.scanner.usage(),
        Some(Usage {
            input_tokens: 5,
            output_tokens: 16
        })
    );
    let failed = "event: response.created\ndata: {}\n\nevent: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"error\":{\"code\":\"server_is_overloaded\",\"message\":\"busy\"}}}\n\n";
    let r = run(StreamDialect::OpenAiResponses, failed, usize::MAX);
    assert_eq!(r.error.unwrap().kind, Some(ErrorKind::Overloaded));
    assert!(
        !r.scanner.content_seen(),
        "failed before the first semantic event: safe to retry"
    );
}

#[test]
fn anthropic_stream() {
    for split in [usize::MAX, 1, 13] {
        let r = run(StreamDialect::Anthropic, ANTHROPIC, split);
        assert!(r.terminal, "split {split}");
        assert!(r.scanner.content_seen());
        assert_eq!(r.scanner.finish_reason(), Some(FinishReason::Stop));
        // message_delta usage is cumulative: 15, not 1 + 15; input from message_start.
        assert_eq!(
            r.scanner.usage(),
            Some(Usage {
                input_tokens: 25,
                output_tokens: 15
            })
        );
    }
    // `ping` alone is liveness, not content.
    let mut s = StreamScanner::new(StreamDialect::Anthropic);
    let f = s.feed(b"event: ping\ndata: {\"type\": \"ping\"}\n\n");
    assert!(f.liveness && !f.content);
}

#[test]
fn anthropic_error_event_and_max_tokens() {
    let stream = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
        "event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n",
    );
    let r = run(StreamDialect::Anthropic, stream, 9);
    let e = r.error.unwrap();
    assert_eq!(
        e.kind,
        Some(ErrorKind::Overloaded),
        "classified by error.type, not by the 200"
    );
    assert!(!r.terminal);
    let max = ANTHROPIC.replace(
        "\"stop_reason\": \"end_turn\"",
        "\"stop_reason\": \"max_tokens\"",
    );
    assert_eq!(
        run(StreamDialect::Anthropic, &max, usize::MAX)
            .scanner
            .finish_reason(),
        Some(FinishReason::Length)
    );
}

#[test]
fn gemini_stream_crlf() {
    for split in [usize::MAX, 1, 2, 31] {
        let r = run(StreamDialect::Gemini, GEMINI, split);
        assert!(r.scanner.content_seen(), "split {split}");
        assert!(StreamDialect::Gemini.has_terminal_marker());
        assert!(
            r.scanner.terminal_seen(),
            "finishReason is Gemini's terminal marker"
        );
        assert_eq!(r.scanner.finish_reason(), Some(FinishReason::Stop));
        assert_eq!(
            r.scanner.usage(),
            Some(Usage {
                input_tokens: 10,
                output_tokens: 49
            }),
            "the last usageMetadata wins"
        );
    }
    let err = "data: {\"error\": {\"code\": 503, \"message\": \"The model is overloaded.\", \"status\": \"UNAVAILABLE\"}}\r\n\r\n";
    let r = run(StreamDialect::Gemini, err, 4);
    assert_eq!(r.error.unwrap().kind, Some(ErrorKind::Overloaded));
    let max = GEMINI.replace(
        "\"finishReason\": \"STOP\"",
        "\"finishReason\": \"MAX_TOKENS\"",
    );
    assert!(run(StreamDialect::Gemini, &max, usize::MAX)
        .scanner
        .finish_reason()
        .unwrap()
        .is_truncation());
}

#[test]
fn llama_cpp_error_field_is_not_a_clean_completion() {
    let stream = "error: {\"code\":400,\"message\":\"the request exceeds the available context size, try increasing it\",\"type\":\"exceed_context_size_error\"}\n\ndata: [DONE]\n\n";
    let r = run(StreamDialect::OpenAiChat, stream, usize::MAX);
    assert_eq!(
        r.error.unwrap().kind,
        Some(ErrorKind::ContextLengthExceeded)
    );
}

#[test]
fn comments_are_liveness() {
    let mut s = StreamScanner::new(StreamDialect::OpenAiChat);
    let f = s.feed(b": OPENROUTER PROCESSING\n\n");
    assert!(f.liveness && !f.content && f.error.is_none());
}
