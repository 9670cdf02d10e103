//! A push parser for Server-Sent Events, fed with body chunks as they pass.
//!
//! It follows the WHATWG event-stream rules that matter for AI streams
//! (docs/protocols.md#sse-parsing): lines end in LF, CR or CRLF, also when the CR and LF arrive in different chunks; `data:`
//! lines join with `\n`; `:` lines are comments; one leading space after the colon is
//! dropped; a leading BOM is skipped; an event is dispatched on a blank line. Two
//! differences, both deliberate: fields that are not `event`, `data`, `id` or `retry` are
//! reported instead of dropped (llama.cpp writes errors as `error: {…}` lines, which a
//! strict parser would turn into a clean, empty answer), and at end of input a last event
//! that lacks its blank line is still dispatched by [`SseParser::finish`].
//!
//! It never copies a chunk to pass it on: callers hand it `&[u8]` and keep the chunk. It
//! keeps only the bytes of an incomplete line and of the event being assembled, bounded by
//! [`SseParser::with_max_event`]; a larger event is skipped and reported as
//! [`SseItem::Oversized`] with its name, the start of its data and the end of it, so that
//! what it was (a terminal event, an error) and what it said last (Gemini's `finishReason`,
//! a usage object) can still be told.

use std::collections::VecDeque;
use std::ops::Range;

/// What the parser found in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseItem<'a> {
    /// A complete event: its `event:` name (`"message"` when it had none) and its data.
    Event {
        /// The event name.
        event: &'a str,
        /// The data lines, joined with `\n`.
        data: &'a [u8],
    },
    /// A `:` comment line (a keep-alive, like OpenRouter's `: OPENROUTER PROCESSING`).
    Comment(&'a [u8]),
    /// A field that is not part of the SSE standard, such as llama.cpp's `error:`.
    OtherField {
        /// The field name.
        name: &'a [u8],
        /// Its value.
        value: &'a [u8],
    },
    /// An event was larger than the limit and was skipped. Its name and the start and the
    /// end of its data are kept, so that a reader can still tell a terminal event (OpenAI
    /// Responses' `response.completed` holding a large image inline, a Gemini chunk whose
    /// `finishReason` follows a large inline image) or an error from the rest, and read
    /// what the event ends with (usage).
    Oversized {
        /// The event name (`"message"` when it had none, or when its `event:` line came
        /// after the line that made it too large and was itself too long).
        event: &'a str,
        /// The first bytes of its data ([`oversized_head`] of them at most, fewer when
        /// the data was shorter before the line that did not fit was not a `data` line),
        /// the data lines joined with `\n` as in [`SseItem::Event`].
        head: &'a [u8],
        /// The last bytes of its data ([`oversized_head`] of them at most), the data lines
        /// joined with `\n` as in [`SseItem::Event`]: the end of the data the event would
        /// have had under no bound, whatever the split of the input into chunks. It may
        /// begin anywhere, inside a string or a UTF-8 sequence; it overlaps the head when
        /// the data is shorter than both.
        tail: &'a [u8],
    },
}

/// How many bytes of an oversized event's data [`SseItem::Oversized`] keeps of its start
/// (and as many of its end), for an event bound of `max_event`: 16 KiB, or less for a
/// small bound (half of it, less a `data: ` prefix). Any split of the input into chunks
/// gives the same head and the same tail.
pub const fn oversized_head(max_event: usize) -> usize {
    let half = max_event.saturating_sub(6) / 2;
    if half < OVERSIZED_HEAD {
        half
    } else {
        OVERSIZED_HEAD
    }
}

/// The most bytes kept of an oversized event's data.
const OVERSIZED_HEAD: usize = 16 * 1024;

/// The push parser. Feed it chunks with [`feed`](SseParser::feed); call
/// [`finish`](SseParser::finish) at end of stream.
///
/// One pass over each chunk: `memchr` finds the line ends, and an event whose lines all
/// lie in the chunk being fed is handed out as a slice of that chunk, never copied. Only
/// what is still open when the chunk ends (an incomplete line, the event being assembled)
/// is copied into the parser's own buffers, which are reused from event to event.
///
/// ```
/// use tower_ai_core::sse::{SseItem, SseParser};
/// let mut p = SseParser::new();
/// let mut events = Vec::new();
/// for chunk in [&b"event: ping\r\ndata: {}\r"[..], b"\n\r\ndata: a\ndata: b\n\n"] {
///     p.feed(chunk, |item| if let SseItem::Event { event, data } = item {
///         events.push((event.to_owned(), data.to_vec()));
///     });
/// }
/// assert_eq!(events, [("ping".to_owned(), b"{}".to_vec()), ("message".to_owned(), b"a\nb".to_vec())]);
/// ```
#[derive(Debug, Clone)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    event: Vec<u8>,
    /// The start of the data of an event found too large (see [`SseItem::Oversized`]).
    head: Vec<u8>,
    /// The end of the data of an event found too large, as it streams past.
    tail: Tail,
    /// The last event name handed out, kept to hand out the next one equal to it without
    /// checking its UTF-8 again (streams repeat a few names).
    name: String,
    has_data: bool,
    skip_lf: bool,
    bom_seen: u8,
    oversized: bool,
    /// The line being read was dropped when a chunk ended in it (too long to keep): its
    /// end ends nothing else.
    line_dropped: bool,
    max_event: usize,
}

/// The byte order mark a stream may start with.
const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// The longest event name kept; longer names are cut (no dialect uses more than ~40).
const MAX_EVENT_NAME: usize = 256;

/// The parts of the current event that still lie in the chunk being fed (ranges into
/// it); they move into the parser's buffers when the chunk ends before the event does.
#[derive(Default)]
struct InChunk {
    data: Option<Range<usize>>,
    event: Option<Range<usize>>,
}

/// The default bound on one event: 4 MiB (Gemini sends whole response objects per event).
pub const DEFAULT_MAX_EVENT: usize = 4 * 1024 * 1024;

impl Default for SseParser {
    fn default() -> Self {
        SseParser::new()
    }
}

impl SseParser {
    /// A parser with the default event bound.
    pub fn new() -> Self {
        SseParser::with_max_event(DEFAULT_MAX_EVENT)
    }

    /// A parser that skips events larger than `max_event` bytes: an event is skipped (and
    /// reported once as [`SseItem::Oversized`]) as soon as its data and the line being
    /// read no longer fit, whatever kind of line that is, and wherever the chunks end.
    pub fn with_max_event(max_event: usize) -> Self {
        SseParser {
            line: Vec::new(),
            data: Vec::new(),
            event: Vec::new(),
            head: Vec::new(),
            tail: Tail::default(),
            name: String::new(),
            has_data: false,
            skip_lf: false,
            bom_seen: 0,
            oversized: false,
            line_dropped: false,
            max_event,
        }
    }

    /// Bytes held between calls (an incomplete line and the event being assembled, or the
    /// start and end kept of an oversized one).
    pub fn buffered(&self) -> usize {
        self.line.len()
            + self.data.len()
            + self.event.len()
            + self.head.len()
            + self.tail.bytes.len()
    }

    /// Parses `chunk`, calling `on_item` for each complete item.
    pub fn feed<F: FnMut(SseItem<'_>)>(&mut self, chunk: &[u8], mut on_item: F) {
        let mut pos = 0;
        // Skip a BOM at the very start, even when it arrives split across chunks.
        while self.bom_seen < 3 {
            let Some(&b) = chunk.get(pos) else { return };
            if b == BOM[self.bom_seen as usize] {
                self.bom_seen += 1;
                pos += 1;
            } else {
                // Not a BOM after all: the bytes taken for one are part of the first line.
                self.line.extend_from_slice(&BOM[..self.bom_seen as usize]);
                self.bom_seen = 3;
            }
        }
        let mut held = InChunk::default();
        while let Some(&b) = chunk.get(pos) {
            // A line end right here (an empty line, mostly) needs no search.
            let end = if b == b'\n' || b == b'\r' {
                if b == b'\n' && self.skip_lf {
                    // The LF of a CRLF split from its CR.
                    self.skip_lf = false;
                    pos += 1;
                    continue;
                }
                pos
            } else {
                match memchr::memchr2(b'\n', b'\r', &chunk[pos..]) {
                    Some(i) => pos + i,
                    None => break,
                }
            };
            self.skip_lf = chunk[end] == b'\r';
            self.line_end(chunk, pos..end, &mut held, &mut on_item);
            pos = end + 1;
            // The LF of a CRLF in this chunk.
            if self.skip_lf && chunk.get(pos) == Some(&b'\n') {
                self.skip_lf = false;
                pos += 1;
            }
        }
        // The chunk ends inside an event: keep what of it lies in the chunk.
        if let Some(r) = held.data {
            self.data.extend_from_slice(&chunk[r]);
        }
        if let Some(r) = held.event {
            self.event.clear();
            self.event.extend_from_slice(&chunk[r]);
        }
        let rest = &chunk[pos.min(chunk.len())..];
        if !rest.is_empty() {
            self.skip_lf = false;
            if self.line_dropped {
                // Still inside a line too long to keep: only its end is kept, if it is data.
                let cap = oversized_head(self.max_event);
                self.tail.line_part(rest, cap, &mut self.has_data);
            } else if self.line.len() + rest.len() + self.data.len() > self.max_event {
                let cap = oversized_head(self.max_event);
                if !self.oversized {
                    keep_head(
                        &mut self.head,
                        cap,
                        [&self.data, &[]],
                        self.has_data,
                        [&self.line, rest],
                    );
                    self.tail.push(&self.data, cap);
                }
                self.tail.line_part(&self.line, cap, &mut self.has_data);
                self.tail.line_part(rest, cap, &mut self.has_data);
                self.oversized = true;
                self.line_dropped = true;
                self.line.clear();
                self.data.clear();
            } else {
                self.line.extend_from_slice(rest);
            }
        }
    }

    /// Ends the input: a pending line is taken as complete and a pending event is
    /// dispatched (see the module docs), then the parser is ready for a new stream.
    pub fn finish<F: FnMut(SseItem<'_>)>(&mut self, mut on_item: F) {
        let mut held = InChunk::default();
        if self.bom_seen < 3 {
            // The input ended inside what began like a BOM: those bytes are a line.
            self.line
                .extend_from_slice(&BOM[..usize::from(self.bom_seen)]);
            self.bom_seen = 3;
        }
        if !self.line.is_empty() || self.line_dropped {
            self.line_end(&[], 0..0, &mut held, &mut on_item);
        }
        self.dispatch(&[], &mut held, &mut on_item);
        *self = SseParser::with_max_event(self.max_event);
    }

    /// The line `chunk[range]` ended, completing the line held from earlier chunks if
    /// there is one.
    fn line_end<F: FnMut(SseItem<'_>)>(
        &mut self,
        chunk: &[u8],
        range: Range<usize>,
        held: &mut InChunk,
        on_item: &mut F,
    ) {
        if std::mem::take(&mut self.line_dropped) {
            // The rest of a line too long to keep: the event is skipped already, only the
            // end of its data is kept.
            let cap = oversized_head(self.max_event);
            self.tail.line_part(&chunk[range], cap, &mut self.has_data);
            self.tail.line_end(cap, &mut self.has_data);
            return;
        }
        // A line that does not fit with the event's data skips the event, wherever the
        // chunks happen to end (the check in `feed`, at a chunk's end, is this one made early).
        let len = self.line.len() + range.len();
        let data = self.data.len() + held.data.as_ref().map_or(0, |r| r.len());
        if len > 0 && len + data > self.max_event {
            let cap = oversized_head(self.max_event);
            if !self.oversized {
                let held_data = held.data.clone().map_or(&[][..], |r| &chunk[r]);
                keep_head(
                    &mut self.head,
                    cap,
                    [&self.data, held_data],
                    self.has_data,
                    [&self.line, &chunk[range.clone()]],
                );
                self.tail.push(&self.data, cap);
                self.tail.push(held_data, cap);
            }
            self.tail.line_part(&self.line, cap, &mut self.has_data);
            self.tail.line_part(&chunk[range], cap, &mut self.has_data);
            self.tail.line_end(cap, &mut self.has_data);
            self.oversized = true;
            self.line.clear();
            self.data.clear();
            held.data = None;
            return;
        }
        if self.line.is_empty() {
            if range.is_empty() {
                self.dispatch(chunk, held, on_item);
            } else {
                self.field(chunk, range, Some(held), on_item);
            }
        } else {
            // A line begun in an earlier chunk: the first line completed in this one, so
            // nothing is held in the chunk yet.
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(&chunk[range]);
            self.field(&line, 0..line.len(), None, on_item);
            line.clear();
            self.line = line;
        }
    }

    /// An empty line: dispatches the event. `held` ranges are into `chunk`.
    fn dispatch<F: FnMut(SseItem<'_>)>(
        &mut self,
        chunk: &[u8],
        held: &mut InChunk,
        on_item: &mut F,
    ) {
        let (data_at, event_at) = (held.data.take(), held.event.take());
        if self.oversized || self.has_data {
            let name = match &event_at {
                Some(r) => &chunk[r.clone()],
                None => &self.event[..],
            };
            let event = if name.is_empty() {
                "message"
            } else if name == self.name.as_bytes() {
                &self.name
            } else {
                match std::str::from_utf8(name) {
                    Ok(e) => {
                        self.name.clear();
                        self.name.push_str(e);
                        &self.name
                    }
                    Err(_) => "message",
                }
            };
            if self.oversized {
                on_item(SseItem::Oversized {
                    event,
                    head: &self.head,
                    tail: self.tail.bytes.make_contiguous(),
                });
                self.head.clear();
                self.tail.bytes.clear();
            } else {
                let data = match data_at {
                    Some(r) => &chunk[r],
                    None => &self.data[..],
                };
                on_item(SseItem::Event { event, data });
            }
        }
        self.data.clear();
        self.event.clear();
        self.has_data = false;
        self.oversized = false;
    }

    /// A non-empty line, `src[range]`. `held` is `Some` when `src` is the chunk being fed:
    /// then the event's data and name may stay in it, as ranges.
    fn field<F: FnMut(SseItem<'_>)>(
        &mut self,
        src: &[u8],
        range: Range<usize>,
        held: Option<&mut InChunk>,
        on_item: &mut F,
    ) {
        let line = &src[range.clone()];
        // The value after the colon at `line[colon]`, one leading space dropped.
        let value = |colon: usize| {
            let v = colon + 1 + usize::from(line.get(colon + 1) == Some(&b' '));
            range.start + v.min(line.len())..range.end
        };
        // The two fields of nearly every line by their prefix; the rest by the colon.
        if line.starts_with(b"data:") {
            if self.oversized {
                return self.tail_line(line);
            }
            return self.data_line(src, value(4), held);
        }
        if line.starts_with(b"event:") {
            // Kept for an oversized event too: its name tells what it was.
            return self.event_line(src, value(5), held);
        }
        if self.oversized {
            // A bare `data` line is an empty data line.
            return self.tail_line(line);
        }
        if line[0] == b':' {
            return on_item(SseItem::Comment(&line[1..]));
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(i) => (&line[..i], value(i)),
            None => (line, range.end..range.end),
        };
        match name {
            b"data" => self.data_line(src, value, held),
            b"event" if self.oversized => {}
            b"event" => self.event_line(src, value, held),
            b"id" | b"retry" => {}
            _ => on_item(SseItem::OtherField {
                name,
                value: &src[value],
            }),
        }
    }

    /// A whole line of an oversized event: its value, if it is a data line, goes to the tail.
    #[cold]
    fn tail_line(&mut self, line: &[u8]) {
        let cap = oversized_head(self.max_event);
        self.tail.line_part(line, cap, &mut self.has_data);
        self.tail.line_end(cap, &mut self.has_data);
    }

    /// A `data` field whose value is `src[value]`.
    /// The event's bound was checked on the whole line (in `line_end`), which
    /// holds the value and more.
    fn data_line(&mut self, src: &[u8], value: Range<usize>, held: Option<&mut InChunk>) {
        match held {
            // The event's first data line, in this chunk: it stays there.
            Some(h) if !self.has_data => h.data = Some(value),
            held => {
                if let Some(r) = held.and_then(|h| h.data.take()) {
                    self.data.extend_from_slice(&src[r]);
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(&src[value]);
            }
        }
        self.has_data = true;
    }

    /// An `event` field whose value is `src[value]`.
    fn event_line(&mut self, src: &[u8], value: Range<usize>, held: Option<&mut InChunk>) {
        let value = value.start..value.end.min(value.start + MAX_EVENT_NAME);
        match held {
            Some(h) => h.event = Some(value),
            None => {
                self.event.clear();
                self.event.extend_from_slice(&src[value]);
            }
        }
    }
}

/// The end of an oversized event's data, kept as its lines stream past: a rolling buffer of
/// the last `cap` bytes (`cap` is [`oversized_head`] of the bound), and where the line being
/// read stands, for a line too long to keep that arrives in parts.
#[derive(Debug, Clone, Default)]
struct Tail {
    bytes: VecDeque<u8>,
    line: TailLine,
}

/// Where a line of an oversized event stands, read part by part: its first bytes may still
/// be `data:`'s (`Prefix(n)`: the first `n` are), it is a data line past its colon (one
/// space still to drop), in its value, or not a data line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TailLine {
    Prefix(u8),
    Colon,
    Value,
    Skip,
}

impl Default for TailLine {
    fn default() -> Self {
        TailLine::Prefix(0)
    }
}

impl Tail {
    /// Appends bytes of the event's data, keeping the last `cap`.
    fn push(&mut self, bytes: &[u8], cap: usize) {
        if bytes.len() >= cap {
            self.bytes.clear();
            self.bytes.extend(&bytes[bytes.len() - cap..]);
        } else {
            let over = (self.bytes.len() + bytes.len()).saturating_sub(cap);
            self.bytes.drain(..over);
            self.bytes.extend(bytes);
        }
    }

    /// A data line's value begins: joined with `\n` to the data before it.
    fn data_start(&mut self, cap: usize, has_data: &mut bool) {
        if *has_data {
            self.push(b"\n", cap);
        }
        *has_data = true;
    }

    /// The next part of the line being read (a line is read in one or more parts, then
    /// ended with [`line_end`](Tail::line_end)).
    fn line_part(&mut self, mut part: &[u8], cap: usize, has_data: &mut bool) {
        while let Some(&b) = part.first() {
            match self.line {
                TailLine::Prefix(n) => {
                    if b != b"data:"[usize::from(n)] {
                        self.line = TailLine::Skip;
                        return;
                    }
                    part = &part[1..];
                    self.line = if n == 4 {
                        self.data_start(cap, has_data);
                        TailLine::Colon
                    } else {
                        TailLine::Prefix(n + 1)
                    };
                }
                TailLine::Colon => {
                    if b == b' ' {
                        part = &part[1..];
                    }
                    self.line = TailLine::Value;
                }
                TailLine::Value => return self.push(part, cap),
                TailLine::Skip => return,
            }
        }
    }

    /// The line being read ended (a bare `data` line is an empty data line).
    fn line_end(&mut self, cap: usize, has_data: &mut bool) {
        if self.line == TailLine::Prefix(4) {
            self.data_start(cap, has_data);
        }
        self.line = TailLine::Prefix(0);
    }
}

/// Keeps the first `cap` bytes of an event's data in `head`, as the event is found too
/// large: the data so far (`data`, in two parts), then, if the line that did not fit
/// (`line`, in two parts, maybe only its start) is a `data` line, its value, joined with
/// `\n` when the event `has_data` already.
fn keep_head(head: &mut Vec<u8>, cap: usize, data: [&[u8]; 2], has_data: bool, line: [&[u8]; 2]) {
    head.clear();
    for part in data {
        head.extend_from_slice(&part[..part.len().min(cap - head.len())]);
    }
    if head.len() == cap {
        return;
    }
    // The line's start: its `data:` prefix (one space dropped) and what can be kept after it.
    let mut start = Vec::with_capacity((cap - head.len() + 6).min(line[0].len() + line[1].len()));
    for part in line {
        let room = (cap - head.len() + 6).saturating_sub(start.len());
        start.extend_from_slice(&part[..part.len().min(room)]);
    }
    let Some(value) = start.strip_prefix(b"data:") else {
        return;
    };
    let value = value.strip_prefix(b" ").unwrap_or(value);
    if has_data {
        head.push(b'\n');
    }
    head.extend_from_slice(&value[..value.len().min(cap.saturating_sub(head.len()))]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Owned {
        Event(String, String),
        Comment(String),
        Other(String, String),
        Oversized,
        OversizedHead(String, String),
    }

    fn own(i: SseItem<'_>) -> Owned {
        match i {
            SseItem::Oversized { event, head, .. } => {
                Owned::OversizedHead(event.into(), String::from_utf8_lossy(head).into())
            }
            i => own_plain(i),
        }
    }

    fn parse_heads(chunks: &[&[u8]], max: usize) -> Vec<Owned> {
        let mut p = SseParser::with_max_event(max);
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |i| out.push(own(i)));
        }
        p.finish(|i| out.push(own(i)));
        out
    }

    fn own_plain(i: SseItem<'_>) -> Owned {
        match i {
            SseItem::Event { event, data } => {
                Owned::Event(event.into(), String::from_utf8_lossy(data).into())
            }
            SseItem::Comment(c) => Owned::Comment(String::from_utf8_lossy(c).into()),
            SseItem::OtherField { name, value } => Owned::Other(
                String::from_utf8_lossy(name).into(),
                String::from_utf8_lossy(value).into(),
            ),
            SseItem::Oversized { .. } => Owned::Oversized,
        }
    }

    fn parse_chunks(chunks: &[&[u8]], max: usize) -> Vec<Owned> {
        let mut p = SseParser::with_max_event(max);
        let mut out = Vec::new();
        let mut push = |i: SseItem<'_>| out.push(own_plain(i));
        for c in chunks {
            p.feed(c, &mut push);
        }
        p.finish(&mut push);
        out
    }

    fn ev(e: &str, d: &str) -> Owned {
        Owned::Event(e.into(), d.into())
    }

    #[test]
    fn line_endings_and_split_crlf() {
        let all = parse_chunks(&[b"data: a\r\n\r\ndata: b\r\r", b"data: c\n\n"], 1024);
        assert_eq!(
            all,
            [ev("message", "a"), ev("message", "b"), ev("message", "c")]
        );
        // CR at the end of one chunk, LF at the start of the next: one line break, not two.
        let all = parse_chunks(&[b"data: x\r", b"\ndata: y\r", b"\n\r", b"\n"], 1024);
        assert_eq!(all, [ev("message", "x\ny")]);
    }

    #[test]
    fn every_byte_split_gives_the_same_events() {
        let stream: &[u8] = b"\xEF\xBB\xBFevent: message_start\ndata: {\"a\":1}\n\n: keepalive\r\nevent: ping\r\ndata: {}\r\n\r\ndata: l1\ndata:l2\n\n";
        let whole = parse_chunks(&[stream], 1024);
        assert_eq!(
            whole,
            [
                ev("message_start", "{\"a\":1}"),
                Owned::Comment(" keepalive".into()),
                ev("ping", "{}"),
                ev("message", "l1\nl2")
            ]
        );
        for i in 0..stream.len() {
            let (a, b) = stream.split_at(i);
            assert_eq!(parse_chunks(&[a, b], 1024), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(parse_chunks(&bytes, 1024), whole);
    }

    #[test]
    fn nonstandard_fields_and_eof() {
        let all = parse_chunks(&[b"error: {\"code\":400}\n\ndata: [DONE]"], 1024);
        assert_eq!(
            all,
            [
                Owned::Other("error".into(), "{\"code\":400}".into()),
                ev("message", "[DONE]")
            ]
        );
        assert_eq!(
            parse_chunks(&[b"event: only\n\n"], 1024),
            [],
            "no data, no event"
        );
    }

    #[test]
    fn oversized_events_are_skipped_and_memory_is_bounded() {
        let big = vec![b'x'; 5000];
        let mut p = SseParser::with_max_event(1024);
        let mut n = 0;
        p.feed(b"data: ", |_| {});
        for _ in 0..100 {
            p.feed(&big, |_| n += 1);
            assert!(p.buffered() <= 1024);
        }
        let mut items = Vec::new();
        p.feed(b"\n\ndata: ok\n\n", |i| items.push(own(i)));
        assert_eq!(n, 0);
        assert_eq!(
            items,
            [
                Owned::OversizedHead("message".into(), "x".repeat(oversized_head(1024))),
                ev("message", "ok")
            ]
        );
    }

    #[test]
    fn an_oversized_event_keeps_its_name_and_the_start_of_its_data() {
        let big = format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"b64\":\"{}\"}}\n\n",
            "A".repeat(5000)
        );
        let whole = parse_heads(&[big.as_bytes()], 1024);
        assert_eq!(whole.len(), 1);
        let Owned::OversizedHead(name, head) = &whole[0] else {
            panic!("{whole:?}")
        };
        assert_eq!(name, "response.completed");
        assert!(
            head.starts_with("{\"type\":\"response.completed\",\"b64\":\"AAA"),
            "{head}"
        );
        assert_eq!(head.len(), oversized_head(1024));
        for cut in [1, 7, 100, 1000, 3000] {
            let parts: Vec<&[u8]> = big.as_bytes().chunks(cut).collect();
            assert_eq!(parse_heads(&parts, 1024), whole, "cut every {cut}");
        }
        // The name may come after the data that made it too large.
        let late = format!("data: {}\nevent: error\n\n", "e".repeat(2000));
        let got = parse_heads(&[late.as_bytes()], 1024);
        assert!(
            matches!(&got[..], [Owned::OversizedHead(n, _)] if n == "error"),
            "{got:?}"
        );
    }
}
