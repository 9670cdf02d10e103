//! Differential property tests for the stream readers, whose fast paths are hand-written
//! for speed: the SSE parser against a plain line-by-line reading of the WHATWG rules (with
//! the two deviations the parser documents), and the stream scanner's facts against the
//! same facts read from each payload with `serde_json`. Both fed in arbitrary chunks.

use proptest::prelude::*;
use serde_json::{json, Value};
use tower_ai_core::sse::{oversized_head, SseItem, SseParser};
use tower_ai_core::stream::{FinishReason, StreamDialect, StreamScanner};
use tower_ai_core::Usage;

/// An item as the tests compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Event(String, Vec<u8>),
    Comment(Vec<u8>),
    Other(Vec<u8>, Vec<u8>),
    /// An oversized event: its name, the start of its data and the end of it.
    Oversized(String, Vec<u8>, Vec<u8>),
}

fn own(i: SseItem<'_>) -> Item {
    match i {
        SseItem::Event { event, data } => Item::Event(event.to_owned(), data.to_vec()),
        SseItem::Comment(c) => Item::Comment(c.to_vec()),
        SseItem::OtherField { name, value } => Item::Other(name.to_vec(), value.to_vec()),
        SseItem::Oversized { event, head, tail } => {
            Item::Oversized(event.to_owned(), head.to_vec(), tail.to_vec())
        }
    }
}

/// The event being assembled by [`reference`].
#[derive(Default)]
struct Pending {
    name: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
}

impl Pending {
    fn dispatch(&mut self, out: &mut Vec<Item>) {
        if self.has_data {
            let event = match std::str::from_utf8(&self.name) {
                Ok("") | Err(_) => "message".to_owned(),
                Ok(n) => n.to_owned(),
            };
            out.push(Item::Event(event, std::mem::take(&mut self.data)));
        }
        *self = Pending::default();
    }
}

/// The event stream read the slow, obvious way: split into lines (LF, CR, CRLF), one line
/// at a time. Unknown fields are reported and a last event without its blank line is
/// dispatched at the end, as the parser documents.
fn reference(input: &[u8]) -> Vec<Item> {
    let input = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
    let mut lines = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < input.len() {
        if input[i] == b'\n' || input[i] == b'\r' {
            lines.push(&input[start..i]);
            if input[i] == b'\r' && input.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
            start = i + 1;
        }
        i += 1;
    }
    if start < input.len() {
        lines.push(&input[start..]);
    }
    let mut out = Vec::new();
    let mut ev = Pending::default();
    for line in lines {
        if line.is_empty() {
            ev.dispatch(&mut out);
            continue;
        }
        if line[0] == b':' {
            out.push(Item::Comment(line[1..].to_vec()));
            continue;
        }
        let (field, mut value) = match line.iter().position(|&b| b == b':') {
            Some(c) => (&line[..c], &line[c + 1..]),
            None => (line, &b""[..]),
        };
        if value.first() == Some(&b' ') {
            value = &value[1..];
        }
        match field {
            b"data" => {
                if ev.has_data {
                    ev.data.push(b'\n');
                }
                ev.data.extend_from_slice(value);
                ev.has_data = true;
            }
            b"event" => {
                ev.name.clear();
                ev.name.extend_from_slice(value);
            }
            b"id" | b"retry" => {}
            _ => out.push(Item::Other(field.to_vec(), value.to_vec())),
        }
    }
    ev.dispatch(&mut out);
    out
}

/// `input` cut into chunks of the sizes in `cuts`, repeated.
fn chunks<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = input;
    for n in cuts.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (a, b) = rest.split_at((*n).clamp(1, rest.len()));
        out.push(a);
        rest = b;
    }
    out
}

fn parse(parts: &[&[u8]], max_event: usize) -> Vec<Item> {
    let mut p = SseParser::with_max_event(max_event);
    let mut out = Vec::new();
    for c in parts {
        p.feed(c, |i| out.push(own(i)));
    }
    p.finish(|i| out.push(own(i)));
    out
}

/// A field value: any bytes but line ends, colons and spaces included.
fn value() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            6 => b'a'..=b'z',
            2 => Just(b' '),
            2 => Just(b':'),
            1 => Just(b'"'),
            1 => Just(0xC3u8),
            1 => Just(0xA9u8),
            1 => Just(0xFFu8),
        ],
        0..14,
    )
}

/// One line of an event stream, without its line end.
fn line() -> impl Strategy<Value = Vec<u8>> {
    let field = |name: &'static str| {
        (
            prop_oneof![Just(":"), Just(": "), Just(":  "), Just("")],
            value(),
        )
            .prop_map(move |(sep, v)| {
                let mut l = name.as_bytes().to_vec();
                l.extend_from_slice(sep.as_bytes());
                if !sep.is_empty() {
                    l.extend_from_slice(&v);
                }
                l
            })
    };
    prop_oneof![
        6 => field("data"),
        3 => Just(Vec::new()),
        2 => field("event"),
        1 => value().prop_map(|v| [&b":"[..], &v].concat()),
        1 => field("id"),
        1 => field("retry"),
        1 => field("error"),
        1 => value().prop_filter("a field name", |v| !v.is_empty() && v[0] != b':'),
    ]
}

/// A stream of lines with mixed line ends, maybe a BOM (or half of one) first, maybe no
/// line end at the very end.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            Just(&b""[..]),
            Just(&b"\xEF\xBB\xBF"[..]),
            Just(&b"\xEF\xBB"[..])
        ],
        proptest::collection::vec((line(), 0usize..3), 0..24),
        any::<bool>(),
    )
        .prop_map(|(bom, lines, cut_last)| {
            let mut s = bom.to_vec();
            for (l, e) in lines {
                s.extend_from_slice(&l);
                s.extend_from_slice([&b"\n"[..], b"\r\n", b"\r"][e]);
            }
            if cut_last {
                while matches!(s.last(), Some(b'\n' | b'\r')) {
                    s.pop();
                }
            }
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn sse_parser_reads_like_the_reference(s in stream(), cuts in proptest::collection::vec(1usize..20, 1..6)) {
        let want = reference(&s);
        prop_assert_eq!(&parse(&[&s[..]], 1 << 20), &want, "whole");
        prop_assert_eq!(&parse(&chunks(&s, &cuts), 1 << 20), &want, "in chunks {:?}", cuts);
        prop_assert_eq!(&parse(&chunks(&s, &[1]), 1 << 20), &want, "byte by byte");
    }

    #[test]
    fn sse_parser_bounds_are_the_same_whole_or_split(
        s in stream(),
        cuts in proptest::collection::vec(1usize..20, 1..6),
        max in 4usize..40,
    ) {
        prop_assert_eq!(parse(&chunks(&s, &cuts), max), parse(&[&s[..]], max));
    }

    /// An oversized event's head is the start and its tail the end of the data it would
    /// have had under no bound (the data lines joined, bare `data` lines and `data:`
    /// without a space included), whatever the chunks and wherever the bound fell.
    #[test]
    fn an_oversized_event_keeps_the_start_and_the_end_of_its_data(
        ev in event(),
        cuts in proptest::collection::vec(1usize..20, 1..6),
        max in 8usize..64,
    ) {
        let data = parse(&[&ev[..]], 1 << 20)
            .into_iter()
            .find_map(|i| match i {
                Item::Event(_, d) => Some(d),
                _ => None,
            })
            .unwrap_or_default();
        let got = parse(&chunks(&ev, &cuts), max);
        prop_assert_eq!(&got, &parse(&[&ev[..]], max));
        prop_assert_eq!(&got, &parse(&chunks(&ev, &[1]), max), "byte by byte");
        let cap = oversized_head(max);
        for item in got {
            if let Item::Oversized(_, head, tail) = item {
                prop_assert!(data.starts_with(&head), "head {:?} of {:?}", head, data);
                prop_assert_eq!(&tail[..], &data[data.len().saturating_sub(cap)..]);
            }
        }
    }
}

/// One event: lines that are not blank (some long), each with its line end, then a
/// blank line.
fn event() -> impl Strategy<Value = Vec<u8>> {
    let long_line = (line(), 0usize..60, 0usize..3)
        .prop_filter("not blank", |(l, n, _)| !l.is_empty() || *n > 0)
        .prop_map(|(mut l, n, e)| {
            l.extend(std::iter::repeat_n(b'x', n));
            l.extend_from_slice([&b"\n"[..], b"\r\n", b"\r"][e]);
            l
        });
    (proptest::collection::vec(long_line, 1..8), 0usize..3).prop_map(|(lines, e)| {
        let mut s = lines.concat();
        s.extend_from_slice([&b"\n"[..], b"\r\n", b"\r"][e]);
        s
    })
}

/// Text a model might stream, written to trip a reader that looks for keys without
/// reading strings: quotes, backslashes, colons, braces, and whole JSON fragments with
/// the very keys the scanner looks for.
fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            4 => "[a-z ]{1,6}",
            1 => Just("\"".to_owned()),
            1 => Just("\\".to_owned()),
            1 => Just(":".to_owned()),
            1 => Just("{}[],".to_owned()),
            1 => Just("é\n\t".to_owned()),
            1 => Just(r#""finish_reason":"length""#.to_owned()),
            1 => Just(r#""stop_reason":"max_tokens""#.to_owned()),
            1 => Just(r#""finishReason":"MAX_TOKENS""#.to_owned()),
            1 => Just(r#""usage":{"prompt_tokens":7,"output_tokens":999}"#.to_owned()),
            1 => Just(r#""error":{"message":"x"}"#.to_owned()),
            1 => Just(r#""content":"x","text":"y""#.to_owned()),
        ],
        0..6,
    )
    .prop_map(|parts| parts.concat())
}

fn finish() -> impl Strategy<Value = Option<&'static str>> {
    proptest::option::of(prop_oneof![
        Just("stop"),
        Just("length"),
        Just("tool_calls"),
        Just("content_filter"),
        Just("end_turn"),
        Just("max_tokens"),
        Just("STOP"),
        Just("MAX_TOKENS"),
        Just("SAFETY"),
    ])
}

/// What a whole stream showed, as the scanner reports it at the end.
#[derive(Debug, PartialEq, Eq)]
struct Facts {
    content: bool,
    terminal: bool,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    error: bool,
}

fn scan(dialect: StreamDialect, parts: &[&[u8]]) -> Facts {
    scan_bounded(dialect, parts, tower_ai_core::sse::DEFAULT_MAX_EVENT)
}

fn scan_bounded(dialect: StreamDialect, parts: &[&[u8]], max_event: usize) -> Facts {
    let mut s = StreamScanner::with_max_event(dialect, max_event);
    let mut error = false;
    for c in parts {
        error |= s.feed(c).error.is_some();
    }
    error |= s.finish().error.is_some();
    Facts {
        content: s.content_seen(),
        terminal: s.terminal_seen(),
        finish: s.finish_reason(),
        usage: s.usage(),
        error,
    }
}

fn sse(events: &[(Option<&str>, Value)], done: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in events {
        if let Some(n) = name {
            out.extend_from_slice(format!("event: {n}\n").as_bytes());
        }
        out.extend_from_slice(format!("data: {data}\n\n").as_bytes());
    }
    if done {
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn openai_chat_facts_match_serde(
        chunks_in in proptest::collection::vec(
            (proptest::option::of(text()), finish(), proptest::option::of((0u64..1_000_000, 0u64..100_000)), any::<bool>()),
            0..8,
        ),
        done in any::<bool>(),
        cuts in proptest::collection::vec(1usize..64, 1..5),
    ) {
        let mut want = Facts { content: false, terminal: done, finish: None, usage: None, error: false };
        let mut events = Vec::new();
        for (content, fin, usage, null_usage) in &chunks_in {
            let mut delta = json!({});
            if let Some(t) = content {
                delta["content"] = json!(t);
                want.content |= !t.is_empty();
            }
            let mut chunk = json!({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": fin}],
            });
            if let Some(f) = fin {
                want.finish = Some(FinishReason::parse(f));
            }
            match usage {
                Some((p, c)) => {
                    chunk["usage"] = json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                        "prompt_tokens_details": {"cached_tokens": 0}});
                    want.usage = Usage::from_value(&chunk);
                }
                None if *null_usage => chunk["usage"] = Value::Null,
                None => {}
            }
            events.push((None, chunk));
        }
        let stream = sse(&events, done);
        prop_assert_eq!(scan(StreamDialect::OpenAiChat, &chunks(&stream, &cuts)), want);
    }

    #[test]
    fn gemini_facts_match_serde(
        chunks_in in proptest::collection::vec(
            (proptest::option::of(text()), finish(), proptest::option::of((0u64..1_000_000, 0u64..100_000, proptest::option::of(0u64..9_999)))),
            0..8,
        ),
        cuts in proptest::collection::vec(1usize..64, 1..5),
    ) {
        let mut want = Facts { content: false, terminal: false, finish: None, usage: None, error: false };
        let mut events = Vec::new();
        for (text, fin, usage) in &chunks_in {
            let parts = match text {
                Some(t) => { want.content = true; json!([{"text": t}]) }
                None => json!([]),
            };
            let mut candidate = json!({"content": {"parts": parts, "role": "model"}, "index": 0});
            if let Some(f) = fin {
                candidate["finishReason"] = json!(f);
                want.finish = Some(FinishReason::parse(f));
                // Gemini's terminal marker: a candidate's finishReason.
                want.terminal = true;
            }
            let mut chunk = json!({"candidates": [candidate], "modelVersion": "gemini-2.5-flash"});
            if let Some((p, c, th)) = usage {
                let mut m = json!({"promptTokenCount": p, "candidatesTokenCount": c, "totalTokenCount": p + c});
                if let Some(th) = th {
                    m["thoughtsTokenCount"] = json!(th);
                }
                chunk["usageMetadata"] = m;
                want.usage = Usage::from_value(&chunk);
            }
            events.push((None, chunk));
        }
        let stream = sse(&events, false);
        prop_assert_eq!(scan(StreamDialect::Gemini, &chunks(&stream, &cuts)), want);
    }

    #[test]
    fn anthropic_facts_match_serde(
        input in 0u64..1_000_000,
        deltas in proptest::collection::vec((text(), any::<bool>()), 0..6),
        end in proptest::option::of((finish(), 0u64..100_000)),
        stop in any::<bool>(),
        cuts in proptest::collection::vec(1usize..64, 1..5),
    ) {
        let mut want = Facts { content: false, terminal: stop, finish: None, usage: None, error: false };
        let start = json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
            "content": [], "model": "claude-sonnet-4", "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1}}});
        want.usage = Some(Usage { input_tokens: input, output_tokens: 1 });
        let mut events = vec![(Some("message_start"), start)];
        for (t, ping) in &deltas {
            if *ping {
                events.push((Some("ping"), json!({"type": "ping"})));
            }
            events.push((Some("content_block_delta"),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})));
            want.content = true;
        }
        if let Some((fin, output)) = end {
            events.push((Some("message_delta"), json!({"type": "message_delta",
                "delta": {"stop_reason": fin, "stop_sequence": null}, "usage": {"output_tokens": output}})));
            want.finish = fin.map(FinishReason::parse);
            want.usage = Some(Usage { input_tokens: input, output_tokens: output });
        }
        if stop {
            events.push((Some("message_stop"), json!({"type": "message_stop"})));
        }
        let stream = sse(&events, false);
        prop_assert_eq!(scan(StreamDialect::Anthropic, &chunks(&stream, &cuts)), want);
    }
}

// The cases these properties found, kept by name.

#[test]
fn a_stream_of_half_a_bom_is_a_line_not_nothing() {
    assert_eq!(
        parse(&[b"\xEF\xBB"], 1 << 20),
        [Item::Other(b"\xEF\xBB".to_vec(), Vec::new())]
    );
}

#[test]
fn a_line_dropped_at_a_chunk_end_does_not_end_its_event() {
    // The line is too long to keep when the chunk ends inside it; its end must not read
    // as the blank line that ends the event, or "b" would be delivered on its own.
    let input = b"data: aaaaaaaaaaaa\ndata: b\n\ndata: c\n\n";
    let whole = parse(&[&input[..]], 12);
    assert_eq!(
        whole,
        [
            Item::Oversized("message".into(), b"aaa".to_vec(), b"a\nb".to_vec()),
            Item::Event("message".into(), b"c".to_vec())
        ]
    );
    for cut in 1..input.len() {
        assert_eq!(
            parse(&chunks(input, &[cut]), 12),
            whole,
            "cut every {cut} bytes"
        );
    }
}

#[test]
fn a_null_stop_reason_is_no_finish_reason() {
    let stream = sse(
        &[(
            Some("message_delta"),
            json!({"type": "message_delta", "delta": {"stop_reason": null, "stop_sequence": null},
                   "usage": {"output_tokens": 3}}),
        )],
        false,
    );
    assert_eq!(scan(StreamDialect::Anthropic, &[&stream[..]]).finish, None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `Usage::from_json` reads a whole response without building a tree; it must find
    /// what `serde_json` finds, whatever the answer's text says.
    #[test]
    fn usage_of_a_whole_response_matches_serde(
        shape in 0usize..3,
        t in text(),
        counts in proptest::option::of((0u64..1_000_000, 0u64..100_000, 0u64..5_000)),
        pad in prop_oneof![Just(""), Just(" "), Just("\n  ")],
    ) {
        let mut v = match shape {
            0 => json!({"id": "c", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}]}),
            1 => json!({"id": "msg", "type": "message", "content": [{"type": "text", "text": t}], "stop_reason": "end_turn"}),
            _ => json!({"candidates": [{"content": {"parts": [{"text": t}], "role": "model"}, "finishReason": "STOP"}]}),
        };
        if let Some((a, b, c)) = counts {
            match shape {
                0 => v["usage"] = json!({"prompt_tokens": a, "completion_tokens": b, "total_tokens": a + b}),
                1 => v["usage"] = json!({"input_tokens": a, "cache_read_input_tokens": c, "output_tokens": b}),
                _ => v["usageMetadata"] = json!({"promptTokenCount": a, "candidatesTokenCount": b,
                    "thoughtsTokenCount": c, "totalTokenCount": a + b + c}),
            }
        }
        let body = format!("{pad}{v}{pad}");
        prop_assert_eq!(Usage::from_json(body.as_bytes()), Usage::from_value(&v));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// An event over the bound still tells what it was, from its name and the start of its
    /// data, however the stream is cut: a terminal event ends the stream (an OpenAI
    /// Responses `response.completed` holding a large image inline is whole), an error
    /// event or a payload whose first key is `error` is an error, anything else is read as
    /// before (content for the dialects without event names).
    #[test]
    fn oversized_events_are_told_by_name_and_start(
        pad in 200usize..3000,
        cuts in proptest::collection::vec(1usize..97, 1..5),
        max in 64usize..190,
    ) {
        let big = "A".repeat(pad);
        let delta = (Some("response.output_text.delta"), json!({"type": "response.output_text.delta", "delta": "Hi"}));
        let completed = (Some("response.completed"), json!({"type": "response.completed", "response": {"status": "completed",
            "output": [{"type": "image_generation_call", "result": big}], "usage": {"input_tokens": 5, "output_tokens": 7}}}));
        let stream = sse(&[delta.clone(), completed], false);
        let f = scan_bounded(StreamDialect::OpenAiResponses, &chunks(&stream, &cuts), max);
        prop_assert!(f.terminal && f.content && !f.error, "{:?}", f);
        prop_assert_eq!(f.finish, Some(FinishReason::Stop));

        let incomplete = (Some("response.incomplete"), json!({"type": "response.incomplete", "response": {"status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"}, "output": [{"type": "message", "text": big}]}}));
        let stream = sse(&[delta.clone(), incomplete], false);
        let f = scan_bounded(StreamDialect::OpenAiResponses, &chunks(&stream, &cuts), max);
        prop_assert!(f.terminal, "{:?}", f);

        let error = (Some("error"), json!({"type": "error", "code": "server_error", "message": big}));
        let stream = sse(&[delta.clone(), error], false);
        let f = scan_bounded(StreamDialect::OpenAiResponses, &chunks(&stream, &cuts), max);
        prop_assert!(f.error && !f.terminal, "{:?}", f);

        let ant_error = (Some("error"), json!({"type": "error", "error": {"type": "overloaded_error", "message": big}}));
        let stream = sse(&[ant_error], false);
        prop_assert!(scan_bounded(StreamDialect::Anthropic, &chunks(&stream, &cuts), max).error);

        for dialect in [StreamDialect::OpenAiChat, StreamDialect::Gemini] {
            let err = (None, json!({"error": {"code": 503, "message": big, "status": "UNAVAILABLE"}}));
            let stream = sse(&[err], false);
            let f = scan_bounded(dialect, &chunks(&stream, &cuts), max);
            prop_assert!(f.error, "{:?} {:?}", dialect, f);
            // An ordinary large chunk is content, not an error, and ends nothing.
            let chunk = (None, json!({"choices": [{"delta": {"content": big}}], "candidates": [{"content": {"parts": [{"text": big}]}}]}));
            let stream = sse(&[chunk], false);
            let f = scan_bounded(dialect, &chunks(&stream, &cuts), max);
            prop_assert!(f.content && !f.error && !f.terminal, "{:?} {:?}", dialect, f);
        }
    }

    /// An event over the bound is also read by its end: a Gemini chunk whose inline image
    /// makes it large ends the stream with its `finishReason` and gives its
    /// `usageMetadata`, an OpenAI Chat chunk its `finish_reason` and `usage`, a Responses
    /// terminal event its `usage`, Anthropic's `message_delta` its usage: the facts are
    /// those of the same stream read under no bound, however it is cut. Text that quotes
    /// the keys is not taken for them.
    #[test]
    fn oversized_events_are_told_by_their_end_too(
        pad in 1000usize..6000,
        cuts in proptest::collection::vec(1usize..97, 1..5),
        // A tail of 197 to 397 bytes: room for the usage objects that end the events.
        max in 400usize..800,
        mimic in any::<bool>(),
    ) {
        let big = "A".repeat(pad);
        // The text may end quoting the very keys the tail is read for.
        let quoted = if mimic {
            format!(r#"{big}"finishReason":"STOP","usageMetadata":{{"promptTokenCount":1}},"finish_reason":"stop","usage":{{"prompt_tokens":1}}"#)
        } else {
            big.clone()
        };
        let same = |dialect, stream: &[u8]| -> Result<Facts, TestCaseError> {
            let f = scan_bounded(dialect, &chunks(stream, &cuts), max);
            prop_assert_eq!(&f, &scan(dialect, &[stream]), "{:?}", dialect);
            Ok(f)
        };

        let token = (None, json!({"candidates": [{"content": {"parts": [{"text": quoted}], "role": "model"}, "index": 0}],
            "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10}}));
        let image = (None, json!({"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": big}}],
            "role": "model"}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 20, "thoughtsTokenCount": 3, "totalTokenCount": 33}}));
        let f = same(StreamDialect::Gemini, &sse(&[token.clone(), image], false))?;
        prop_assert!(f.terminal && f.content, "{:?}", f);
        prop_assert_eq!(f.usage, Some(Usage { input_tokens: 10, output_tokens: 23 }));
        // A large chunk that is not the last, whose text quotes the keys: not an end.
        let f = same(StreamDialect::Gemini, &sse(&[token], false))?;
        prop_assert!(!f.terminal && f.finish.is_none(), "{:?}", f);

        let chunk = (None, json!({"choices": [{"index": 0, "delta": {"content": quoted}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}));
        let f = same(StreamDialect::OpenAiChat, &sse(&[chunk], true))?;
        prop_assert_eq!(f.finish, Some(FinishReason::Length));
        prop_assert_eq!(f.usage, Some(Usage { input_tokens: 5, output_tokens: 7 }));
        let plain = (None, json!({"choices": [{"index": 0, "delta": {"content": quoted}, "finish_reason": null}], "usage": null}));
        let f = same(StreamDialect::OpenAiChat, &sse(&[plain], true))?;
        prop_assert_eq!(f.usage, None);

        let delta = (Some("response.output_text.delta"), json!({"type": "response.output_text.delta", "delta": "Hi"}));
        let completed = (Some("response.completed"), json!({"type": "response.completed", "response": {"status": "completed",
            "output": [{"type": "message", "text": quoted}], "usage": {"input_tokens": 5, "output_tokens": 7}}}));
        let f = same(StreamDialect::OpenAiResponses, &sse(&[delta, completed], false))?;
        prop_assert_eq!(f.usage, Some(Usage { input_tokens: 5, output_tokens: 7 }));

        let start = (Some("message_start"), json!({"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}}));
        let message_delta = (Some("message_delta"), json!({"type": "message_delta", "delta": {"stop_reason": null, "text": quoted},
            "usage": {"output_tokens": 20}}));
        let f = scan_bounded(StreamDialect::Anthropic, &chunks(&sse(&[start, message_delta], false), &cuts), max);
        prop_assert_eq!(f.usage, Some(Usage { input_tokens: 10, output_tokens: 20 }));
    }
}
