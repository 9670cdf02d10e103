//! The body types the layers share.
//!
//! Requests: AI requests are JSON of a few bytes to a few MB, and two layers (AiRetry,
//! ModelFallback) send them again, so the request body is [`AiBody`]: a `Bytes` that
//! clones by reference count. Any body type can take part through [`ReplayBody`].
//!
//! Responses: success bodies pass through untouched. Error bodies are read (bounded) by
//! [`Classify`](crate::Classify) so they can be classified, then handed on whole inside
//! [`ClassifiedBody`], together with whatever of them was not read.

use std::borrow::Borrow;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use smallvec::SmallVec;

use crate::attempt::AttemptBudget;
use crate::deadline::Deadline;
use crate::error::BoxError;
use crate::facts::Facts;

/// A request body that can be sent again, and whose bytes can be read without consuming it.
///
/// Implemented for [`AiBody`], [`Bytes`], [`String`], `Vec<u8>`, `&'static str` and `()`
/// (the last ones are handy with `tower_test::mock`). A body that cannot be replayed (a
/// streamed upload) returns `None` from [`try_clone`](ReplayBody::try_clone), and layers
/// then send it once.
pub trait ReplayBody: Sized {
    /// A copy to send again, if this body can be replayed.
    fn try_clone(&self) -> Option<Self>;
    /// The whole body, if it is in memory.
    fn bytes(&self) -> Option<&[u8]>;
}

/// The request body of tower-ai: bytes in memory (cheap to clone), or a streamed body that
/// is sent once.
///
/// ```
/// use tower_ai_core::{AiBody, ReplayBody};
/// let body = AiBody::from(r#"{"model":"gpt-4o","messages":[]}"#);
/// let again = body.try_clone().unwrap();
/// assert_eq!(again.bytes(), body.bytes());
/// ```
pub struct AiBody {
    inner: Inner,
}

enum Inner {
    Full { bytes: Bytes, sent: bool },
    Stream(Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static>>),
}

impl AiBody {
    /// An empty body.
    pub fn empty() -> Self {
        AiBody::from(Bytes::new())
    }

    /// A streamed body: sent once, never replayed, never read by the layers.
    pub fn streaming<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        struct MapErr<B>(Pin<Box<B>>);
        impl<B> Body for MapErr<B>
        where
            B: Body<Data = Bytes>,
            B::Error: Into<BoxError>,
        {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                self.0.as_mut().poll_frame(cx).map_err(Into::into)
            }
            fn is_end_stream(&self) -> bool {
                self.0.is_end_stream()
            }
            fn size_hint(&self) -> SizeHint {
                self.0.size_hint()
            }
        }
        AiBody {
            inner: Inner::Stream(Box::pin(MapErr(Box::pin(body)))),
        }
    }

    /// The bytes, if this body is in memory.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match &self.inner {
            Inner::Full { bytes, .. } => Some(bytes),
            Inner::Stream(_) => None,
        }
    }
}

impl ReplayBody for AiBody {
    fn try_clone(&self) -> Option<Self> {
        match &self.inner {
            Inner::Full { bytes, .. } => Some(AiBody::from(bytes.clone())),
            Inner::Stream(_) => None,
        }
    }
    fn bytes(&self) -> Option<&[u8]> {
        self.as_bytes().map(|b| &b[..])
    }
}

impl Default for AiBody {
    fn default() -> Self {
        AiBody::empty()
    }
}

impl fmt::Debug for AiBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the bytes: request bodies hold prompts, which are the user's data.
        match &self.inner {
            Inner::Full { bytes, .. } => write!(f, "AiBody({} bytes)", bytes.len()),
            Inner::Stream(_) => f.write_str("AiBody(stream)"),
        }
    }
}

impl From<Bytes> for AiBody {
    fn from(bytes: Bytes) -> Self {
        AiBody {
            inner: Inner::Full { bytes, sent: false },
        }
    }
}
impl From<Vec<u8>> for AiBody {
    fn from(v: Vec<u8>) -> Self {
        AiBody::from(Bytes::from(v))
    }
}
impl From<String> for AiBody {
    fn from(s: String) -> Self {
        AiBody::from(Bytes::from(s))
    }
}
impl From<&'static str> for AiBody {
    fn from(s: &'static str) -> Self {
        AiBody::from(Bytes::from_static(s.as_bytes()))
    }
}
impl From<&'static [u8]> for AiBody {
    fn from(s: &'static [u8]) -> Self {
        AiBody::from(Bytes::from_static(s))
    }
}

impl Body for AiBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Inner::Full { bytes, sent } => {
                if *sent || bytes.is_empty() {
                    *sent = true;
                    return Poll::Ready(None);
                }
                *sent = true;
                Poll::Ready(Some(Ok(Frame::data(bytes.clone()))))
            }
            Inner::Stream(s) => s.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full { bytes, sent } => *sent || bytes.is_empty(),
            Inner::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full { bytes, sent } => {
                SizeHint::with_exact(if *sent { 0 } else { bytes.len() as u64 })
            }
            Inner::Stream(s) => s.size_hint(),
        }
    }
}

impl ReplayBody for Bytes {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
    fn bytes(&self) -> Option<&[u8]> {
        Some(self)
    }
}
impl ReplayBody for String {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
    fn bytes(&self) -> Option<&[u8]> {
        Some(self.as_bytes())
    }
}
impl ReplayBody for Vec<u8> {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
    fn bytes(&self) -> Option<&[u8]> {
        Some(self)
    }
}
impl ReplayBody for &'static str {
    fn try_clone(&self) -> Option<Self> {
        Some(self)
    }
    fn bytes(&self) -> Option<&[u8]> {
        Some(self.as_bytes())
    }
}
impl ReplayBody for () {
    fn try_clone(&self) -> Option<Self> {
        Some(())
    }
    fn bytes(&self) -> Option<&[u8]> {
        None
    }
}

/// Clones a request whose body is a [`ReplayBody`]: method, URI, version, headers,
/// extensions and body. `None` when the body cannot be replayed.
pub fn try_clone_request<B: ReplayBody>(req: &http::Request<B>) -> Option<http::Request<B>> {
    let mut out = clone_head_and_body(req)?;
    *out.extensions_mut() = req.extensions().clone();
    Some(out)
}

/// Method, URI, version, headers and body of `req`, with no extensions.
fn clone_head_and_body<B: ReplayBody>(req: &http::Request<B>) -> Option<http::Request<B>> {
    let body = req.body().try_clone()?;
    let mut out = http::Request::new(body);
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.version_mut() = req.version();
    *out.headers_mut() = req.headers().clone();
    Some(out)
}

/// Headers a [`RetainedHead`] keeps inline (a request with more keeps them all on the
/// heap, in one allocation).
const INLINE_HEADERS: usize = 6;

/// Bytes of header values a [`RetainedHead`] copies into itself (all values together; a
/// value that does not fit is kept as a clone of its `HeaderValue`). Enough for a content
/// type, an API key or bearer token of up to about 200 bytes (an OpenAI project key with
/// `Bearer ` is about 170) and a version header.
// A size `smallvec` supports without its `const_generics` feature (a power of two).
const INLINE_VALUE_BYTES: usize = 256;

/// A copy of a request kept to be sent again (AiRetry's next attempt, ModelFallback's next
/// route): what [`try_clone_request`] makes, for less on the usual request.
///
/// The method, URI, version and headers are kept in a [`RetainedHead`]: inline (`H` is
/// `RetainedHead`, the default), or behind an `Arc` (`H` is `Arc<RetainedHead>`) that one
/// layer shares with the layers below it: ModelFallback makes its copy that way
/// ([`copy_shared`](RetainedRequest::copy_shared)) and offers the head through the
/// request ([`RetainedHead::offer`]); AiRetry below it takes the head instead of copying
/// it when the request it got has exactly that head
/// ([`share`](RetainedRequest::share)), and keeps its own body and extensions either way.
///
/// The headers are kept as a list of `(name, value)` pairs, inline for a request of up to
/// six of them (cloning a `HeaderMap` costs two allocations, its index and its entries;
/// a list inline costs none, and a layer that keeps the copy in a box of its own pays for
/// nothing more). The values' bytes are copied into the copy itself (up to 256 bytes in
/// all; a longer value is kept as a clone of its `HeaderValue`): cloning a `HeaderValue`
/// built from a string allocates, the first time, to share its bytes, and on the happy
/// path the copy is never sent. [`replay`](RetainedRequest::replay) builds the header map
/// again, in the same order, with the same bytes and the same
/// [sensitive](HeaderValue::is_sensitive) flags.
///
/// When the request's only extensions are what the stack's own layers put in (the slot of
/// their per-call facts: its [`Deadline`], [`AttemptBudget`] and
/// [`RequestMeta`](crate::RequestMeta); or a `Deadline` and an `AttemptBudget` as values
/// of their own), the copy keeps them beside itself instead of in an extensions map of its
/// own (cloning a map costs three allocations: the map, its table and each value), and
/// [`replay`](RetainedRequest::replay) puts them back into every request it makes. Any
/// other extension and the whole map is copied. Either way, a replayed request carries
/// exactly the extensions the original did.
///
/// ```
/// use std::time::Duration;
/// use http::Request;
/// use tower_ai_core::{AttemptBudget, Deadline, RetainedRequest};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let mut req = Request::post("/v1/chat/completions").body(r#"{"model":"gpt-4o"}"#).unwrap();
/// let deadline = Deadline::after(Duration::from_secs(60));
/// Deadline::set(&mut req, deadline);
/// let kept = RetainedRequest::copy(&req).unwrap();
/// assert_eq!(kept.deadline(), Some(deadline));
/// let again = kept.replay().unwrap();
/// assert_eq!(Deadline::of(&again), Some(deadline));
/// assert_eq!(again.body(), req.body());
/// assert!(AttemptBudget::of(&again).is_none());
/// # }
/// ```
pub struct RetainedRequest<B, H = RetainedHead> {
    /// Method, URI, version and headers.
    head: H,
    body: B,
    /// Empty (which allocates nothing) when the original's extensions were at most the
    /// three fields below (kept there); else all of them, and the fields are `None`.
    ext: http::Extensions,
    deadline: Option<Deadline>,
    budget: Option<AttemptBudget>,
    facts: Option<Facts>,
}

/// The method, URI, version and headers of a [`RetainedRequest`]: what does not depend on
/// the body's type, so that one copy, behind an `Arc`, can serve every layer that replays
/// the same request (see [`offer`](RetainedHead::offer)).
///
/// ```
/// use std::sync::Arc;
/// use http::Request;
/// use tower_ai_core::{AiBody, AttemptBudget, RetainedRequest};
///
/// let req = Request::post("/v1/chat/completions")
///     .header("authorization", "Bearer k")
///     .body(AiBody::from(r#"{"model":"gpt-4o"}"#))
///     .unwrap();
/// let kept = RetainedRequest::copy_shared(&req).unwrap();
/// assert!(kept.head().matches(&req));
/// // Another layer's copy of the same request, with the same head (no copy of it).
/// let again = RetainedRequest::share(&req, kept.head()).unwrap();
/// assert!(Arc::ptr_eq(again.head(), kept.head()));
/// let mut changed = Request::post("/v1/chat/completions")
///     .header("authorization", "Bearer other")
///     .body(AiBody::from(r#"{"model":"gpt-4o"}"#))
///     .unwrap();
/// assert!(RetainedRequest::share(&changed, kept.head()).is_none());
///
/// // Offered through the request's slot of per-call facts (here made by a budget).
/// let mut req = req;
/// AttemptBudget::new(3).attach(&mut req);
/// assert!(kept.head().offer(&mut req));
/// let below = RetainedRequest::share_offered(&req).unwrap();
/// assert!(Arc::ptr_eq(below.head(), kept.head()));
/// assert!(below.attempt_budget().is_some());
/// AttemptBudget::new(3).attach(&mut changed);
/// assert!(kept.head().offer(&mut changed));
/// assert!(RetainedRequest::share_offered(&changed).is_none(), "not its head");
/// ```
pub struct RetainedHead {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    /// Every `(name, value)` of the original, in its iteration order.
    headers: SmallVec<[(HeaderName, KeptValue); INLINE_HEADERS]>,
    /// The bytes of the [`KeptValue::Inline`] values, one after the other. Never grown
    /// past its inline capacity (a value that would not fit is kept as a `HeaderValue`).
    value_bytes: SmallVec<[u8; INLINE_VALUE_BYTES]>,
}

/// A header value of a [`RetainedHead`].
enum KeptValue {
    /// Its bytes, at `start..start + len` of `value_bytes`.
    Inline {
        start: u16,
        len: u16,
        sensitive: bool,
    },
    /// The value itself (it did not fit).
    Value(HeaderValue),
}

/// The bytes of a [`KeptValue::Inline`] value, at `start..start + len` of `value_bytes`.
#[inline]
fn inline_bytes(value_bytes: &[u8], start: u16, len: u16) -> Option<&[u8]> {
    let start = usize::from(start);
    value_bytes.get(start..start + usize::from(len))
}

impl RetainedHead {
    /// `req`'s method, URI and version, and no headers yet ([`fill`](RetainedHead::fill)
    /// copies them in place).
    fn start<B>(req: &http::Request<B>) -> Self {
        RetainedHead {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: SmallVec::new(),
            value_bytes: SmallVec::new(),
        }
    }

    /// A copy of `req`'s head behind an `Arc`, to share (written in place in the `Arc`'s
    /// allocation).
    pub fn shared<B>(req: &http::Request<B>) -> Arc<RetainedHead> {
        let mut head = Arc::new(RetainedHead::start(req));
        match Arc::get_mut(&mut head) {
            Some(h) => h.fill(req),
            // Unreachable: a new `Arc` has no other handle.
            None => {
                let mut h = RetainedHead::start(req);
                h.fill(req);
                head = Arc::new(h);
            }
        }
        head
    }

    /// Copies `req`'s headers into this head (made by [`start`](RetainedHead::start)).
    fn fill<B>(&mut self, req: &http::Request<B>) {
        let headers = req.headers();
        if headers.len() > INLINE_HEADERS {
            self.headers.reserve(headers.len());
        }
        for (n, v) in headers {
            let bytes = v.as_bytes();
            let start = self.value_bytes.len();
            let value = if bytes.len() <= INLINE_VALUE_BYTES - start {
                self.value_bytes.extend_from_slice(bytes);
                // Both below INLINE_VALUE_BYTES, which fits a u16.
                KeptValue::Inline {
                    start: start as u16,
                    len: bytes.len() as u16,
                    sensitive: v.is_sensitive(),
                }
            } else {
                KeptValue::Value(v.clone())
            };
            self.headers.push((n.clone(), value));
        }
        // All the inline bytes checked in one pass; on a failure (a value that only unsafe
        // code builds), each inline value again, and those that would not build the same
        // `HeaderValue` are kept as clones.
        if !valid_value(&self.value_bytes) {
            for ((_, kv), (_, v)) in self.headers.iter_mut().zip(headers) {
                if let KeptValue::Inline { start, len, .. } = *kv {
                    if !inline_bytes(&self.value_bytes, start, len).is_some_and(valid_value) {
                        *kv = KeptValue::Value(v.clone());
                    }
                }
            }
        }
    }

    /// Whether `req` has exactly this head: the same method, version, URI (scheme,
    /// authority, path and query, byte for byte: `Uri`'s own `==` ignores the case of
    /// the scheme and host, which would still be sent as they are) and headers (the
    /// same names and value bytes, with the same sensitive flags, in the same order). A
    /// request built again from this head is then the same as one built from `req`'s.
    pub fn matches<B>(&self, req: &http::Request<B>) -> bool {
        let (uri, theirs) = (&self.uri, req.uri());
        if self.method != req.method()
            || self.version != req.version()
            || uri.scheme_str() != theirs.scheme_str()
            || uri.authority().map(|a| a.as_str()) != theirs.authority().map(|a| a.as_str())
            || uri.path_and_query().map(|p| p.as_str())
                != theirs.path_and_query().map(|p| p.as_str())
        {
            return false;
        }
        let headers = req.headers();
        if headers.len() != self.headers.len() {
            return false;
        }
        for ((name, kept), (n, v)) in self.headers.iter().zip(headers) {
            let (bytes, sensitive) = match *kept {
                KeptValue::Inline {
                    start,
                    len,
                    sensitive,
                } => match inline_bytes(&self.value_bytes, start, len) {
                    Some(bytes) => (bytes, sensitive),
                    None => return false,
                },
                KeptValue::Value(ref k) => (k.as_bytes(), k.is_sensitive()),
            };
            if name != n || sensitive != v.is_sensitive() || bytes != v.as_bytes() {
                return false;
            }
        }
        true
    }

    /// Offers this head to the layers below through `req`, in the slot of the stack's
    /// per-call facts, for [`RetainedRequest::share_offered`] (a layer that keeps a copy
    /// of the request it gets, and finds this head there and equal to its request's,
    /// shares it instead of copying it). Only a request that has the slot gets it
    /// (nothing is allocated for it); returns whether it did.
    pub fn offer<B>(self: &Arc<Self>, req: &mut http::Request<B>) -> bool {
        match req.extensions_mut().get_mut::<Facts>() {
            Some(facts) => {
                facts.head = Some(Arc::clone(self));
                true
            }
            None => false,
        }
    }

    /// A request with this head (the original's method, URI, version and headers) and
    /// `body`, without extensions.
    fn request<B>(&self, body: B) -> http::Request<B> {
        let mut out = http::Request::new(body);
        *out.method_mut() = self.method.clone();
        *out.uri_mut() = self.uri.clone();
        *out.version_mut() = self.version;
        *out.headers_mut() = self.header_map();
        out
    }

    /// The original's headers, as a map again (the same names and values, in the same
    /// order).
    fn header_map(&self) -> HeaderMap {
        // The original held them all, so they fit: `try_*` only keeps a panic out of reach.
        let mut map = HeaderMap::try_with_capacity(self.headers.len()).unwrap_or_default();
        for (name, value) in &self.headers {
            if let Some(v) = self.value(value) {
                let _ = map.try_append(name.clone(), v);
            }
        }
        map
    }

    /// A kept value as a `HeaderValue` again (built anew from its bytes when inline).
    /// Always `Some`: inline bytes were checked with [`valid_value`] when copied.
    fn value(&self, value: &KeptValue) -> Option<HeaderValue> {
        match *value {
            KeptValue::Inline {
                start,
                len,
                sensitive,
            } => {
                let bytes = inline_bytes(&self.value_bytes, start, len)?;
                let mut v = HeaderValue::from_bytes(bytes).ok()?;
                v.set_sensitive(sensitive);
                Some(v)
            }
            KeptValue::Value(ref v) => Some(v.clone()),
        }
    }

    /// The method.
    pub fn method(&self) -> &http::Method {
        &self.method
    }

    /// The URI.
    pub fn uri(&self) -> &http::Uri {
        &self.uri
    }

    /// The headers, each value of each name in the original's iteration order. The
    /// values are built again from the bytes kept (see [`RetainedRequest`]), so this is
    /// for the cold path.
    pub fn headers(&self) -> impl Iterator<Item = (&HeaderName, HeaderValue)> {
        self.headers
            .iter()
            .filter_map(|(n, v)| Some((n, self.value(v)?)))
    }
}

impl fmt::Debug for RetainedHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the header values: they hold API keys.
        f.debug_struct("RetainedHead")
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("headers", &self.headers.len())
            .finish()
    }
}

impl<B: ReplayBody> RetainedRequest<B> {
    /// A copy of `req`, or `None` when its body cannot be replayed.
    pub fn copy(req: &http::Request<B>) -> Option<Self> {
        let mut slot = None;
        RetainedRequest::copy_into(req, &mut slot);
        slot
    }

    /// [`copy`](RetainedRequest::copy) made where it is kept (a layer's boxed state):
    /// `slot` is set to the copy, or to `None` when the body cannot be replayed. The copy
    /// is written in place, not moved there (it holds its headers inline). Returns whether
    /// there is a copy.
    pub fn copy_into(req: &http::Request<B>, slot: &mut Option<Self>) -> bool {
        let Some(body) = req.body().try_clone() else {
            *slot = None;
            return false;
        };
        let kept = slot.insert(RetainedRequest::around(RetainedHead::start(req), body));
        kept.keep_extensions(req.extensions());
        kept.head.fill(req);
        true
    }
}

impl<B: ReplayBody> RetainedRequest<B, Arc<RetainedHead>> {
    /// A copy of `req` whose head is behind an `Arc` of its own, to
    /// [offer](RetainedHead::offer) to the layers below; `None` when the body cannot be
    /// replayed.
    pub fn copy_shared(req: &http::Request<B>) -> Option<Self> {
        let body = req.body().try_clone()?;
        let mut kept = RetainedRequest::around(RetainedHead::shared(req), body);
        kept.keep_extensions(req.extensions());
        Some(kept)
    }

    /// A copy of `req` that shares `head` instead of copying one (its body and
    /// extensions are its own, taken from `req` as [`copy`](RetainedRequest::copy) takes
    /// them): `None` when `req` does not have exactly that head (see
    /// [`RetainedHead::matches`]; a layer between changed it, or it is another route's),
    /// or when the body cannot be replayed. What it replays is then what a copy of `req`
    /// would.
    pub fn share(req: &http::Request<B>, head: &Arc<RetainedHead>) -> Option<Self> {
        RetainedRequest::share_with(req, head, None)
    }

    /// [`share`](RetainedRequest::share) with the head a layer above
    /// [offered](RetainedHead::offer) through `req`: `None` when there is none, when `req`
    /// does not have exactly that head, or when the body cannot be replayed. One lookup of
    /// the slot for both the head and the extensions to keep.
    pub fn share_offered(req: &http::Request<B>) -> Option<Self> {
        let ext = req.extensions();
        let facts = Facts::of(ext)?;
        // The slot alone (the stack's usual request) is what is kept beside the copy.
        RetainedRequest::share_with(req, facts.head.as_ref()?, (ext.len() == 1).then_some(facts))
    }

    /// [`share`](RetainedRequest::share), keeping `alone` (the request's only extension,
    /// already found) beside the copy, or else the request's extensions as a copy keeps them.
    #[inline(always)]
    fn share_with(
        req: &http::Request<B>,
        head: &Arc<RetainedHead>,
        alone: Option<&Facts>,
    ) -> Option<Self> {
        if !head.matches(req) {
            return None;
        }
        let body = req.body().try_clone()?;
        let mut kept = RetainedRequest::around(Arc::clone(head), body);
        match alone {
            Some(facts) => kept.facts = Some(facts.clone()),
            None => kept.keep_extensions(req.extensions()),
        }
        Some(kept)
    }

    /// The shared head.
    pub fn head(&self) -> &Arc<RetainedHead> {
        &self.head
    }
}

impl<B, H> RetainedRequest<B, H> {
    /// A copy around `head` and `body`, with no extensions yet (`keep_extensions` adds
    /// them): the one shape every way of making a copy starts from.
    #[inline(always)]
    fn around(head: H, body: B) -> Self {
        RetainedRequest {
            head,
            body,
            ext: http::Extensions::new(),
            deadline: None,
            budget: None,
            facts: None,
        }
    }

    /// Takes `ext`: beside the copy when it holds only the stack's own facts, else the
    /// whole map.
    fn keep_extensions(&mut self, ext: &http::Extensions) {
        let (deadline, budget, facts) = match Facts::alone(ext) {
            // The stack's usual request: one lookup.
            Some(f) => (None, None, Some(f.clone())),
            None if ext.is_empty() => return,
            None => (
                ext.get::<Deadline>().copied(),
                ext.get::<AttemptBudget>().cloned(),
                Facts::of(ext).cloned(),
            ),
        };
        let own_ext = ext.len()
            != usize::from(deadline.is_some())
                + usize::from(budget.is_some())
                + usize::from(facts.is_some());
        if own_ext {
            // Everything is in the copied map.
            self.ext = ext.clone();
        } else {
            self.deadline = deadline;
            self.budget = budget;
            self.facts = facts;
        }
    }
}

impl<B: ReplayBody, H: Borrow<RetainedHead>> RetainedRequest<B, H> {
    /// A request to send: a copy of the original, extensions included. `None` when the
    /// body will not replay.
    pub fn replay(&self) -> Option<http::Request<B>> {
        let mut out = self.head.borrow().request(self.body.try_clone()?);
        if self.ext.is_empty() {
            self.restore(&mut out);
        } else {
            *out.extensions_mut() = self.ext.clone();
        }
        Some(out)
    }

    /// The original request itself, extensions included (for the last time it is sent).
    pub fn into_request(self) -> http::Request<B> {
        let mut out = self.head.borrow().request(self.body);
        *out.extensions_mut() = self.ext;
        // All `None` when the copy has extensions of its own.
        if let Some(d) = self.deadline {
            out.extensions_mut().insert(d);
        }
        if let Some(b) = self.budget {
            out.extensions_mut().insert(b);
        }
        if let Some(f) = self.facts {
            out.extensions_mut().insert(f);
        }
        out
    }

    fn restore(&self, out: &mut http::Request<B>) {
        if let Some(d) = self.deadline {
            out.extensions_mut().insert(d);
        }
        if let Some(b) = &self.budget {
            out.extensions_mut().insert(b.clone());
        }
        if let Some(f) = &self.facts {
            out.extensions_mut().insert(f.clone());
        }
    }
}

impl<B, H: Borrow<RetainedHead>> RetainedRequest<B, H> {
    /// The copy's method.
    pub fn method(&self) -> &http::Method {
        &self.head.borrow().method
    }

    /// The copy's URI.
    pub fn uri(&self) -> &http::Uri {
        &self.head.borrow().uri
    }

    /// The copy's body.
    pub fn body(&self) -> &B {
        &self.body
    }

    /// The copy's headers, each value of each name in the original's iteration order.
    /// The values are built again from the bytes kept (see the type's docs), so this is
    /// for the cold path.
    pub fn headers(&self) -> impl Iterator<Item = (&HeaderName, HeaderValue)> {
        self.head.borrow().headers()
    }

    /// The dialect the original request speaks ([`Provider::of`](crate::Provider::of)).
    pub fn provider(&self) -> crate::Provider {
        if let Some(p) = self.ext.get::<crate::Provider>() {
            return *p;
        }
        let head = self.head.borrow();
        crate::Provider::detect(&head.uri, &head.header_map())
    }

    /// The original request's [`Deadline`], if it carried one (as [`Deadline::of`] reads
    /// it).
    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline
            .or_else(|| self.facts.as_ref()?.deadline)
            .or_else(|| Deadline::in_extensions(&self.ext))
    }

    /// The original request's [`AttemptBudget`], if it carried one (as
    /// [`AttemptBudget::of`] reads it).
    pub fn attempt_budget(&self) -> Option<&AttemptBudget> {
        self.budget
            .as_ref()
            .or_else(|| self.facts.as_ref()?.budget.as_ref())
            .or_else(|| AttemptBudget::in_extensions(&self.ext))
    }
}

/// Whether [`HeaderValue::from_bytes`] takes `bytes` (visible ASCII, spaces, tabs and
/// bytes over 127), so that a value copied as bytes is built again exactly. A `HeaderValue`
/// holds nothing else unless `unsafe` code built it unchecked; such a value is kept as a
/// clone instead.
///
/// Eight bytes at a time: a word with no byte under 0x20 and none equal to 0x7f is valid
/// (the usual value), and only a word that may have one (a tab, or a byte the test flags
/// needlessly: a borrow between bytes can only add flags, never hide one) is checked
/// byte by byte.
fn valid_value(bytes: &[u8]) -> bool {
    use crate::swar::{splat, zero_bytes, TOPS};
    // Whether some byte of `x` is under 0x20, or is 0x7f (bytes over 127 never flag).
    let suspect =
        |x: u64| (x.wrapping_sub(splat(0x20)) & !x & TOPS) | zero_bytes(x ^ splat(0x7f)) != 0;
    let exact = |w: &[u8]| w.iter().all(|&b| (b >= 32 && b != 127) || b == b'\t');
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let x = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        if suspect(x) && !exact(w) {
            return false;
        }
    }
    // The last 0 to 7 bytes.
    exact(words.remainder())
}

impl<B, H: Borrow<RetainedHead>> fmt::Debug for RetainedRequest<B, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetainedRequest")
            .field("method", self.method())
            .field("uri", self.uri())
            .field("deadline", &self.deadline())
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// A response body as it leaves [`Classify`](crate::Classify): a success body passed
    /// through untouched, or an error body whose first bytes were read to classify it,
    /// delivered whole: the bytes read, then the rest of the original body (with its
    /// trailers, or the read error met on the way).
    pub struct ClassifiedBody<B> {
        #[pin]
        rest: Option<B>,
        // Boxed: only an error body read ahead (or a body of bytes only) has these, and
        // inline they would make every response, and each of its moves through the layers
        // above, some 180 bytes larger.
        read: Option<Box<ReadAhead<B>>>,
    }
}

/// What an error body read ahead is made of, in the order it is delivered.
struct ReadAhead<B> {
    prefix: Option<Bytes>,
    tail: Option<Bytes>,
    trailers: Option<HeaderMap>,
    error: Option<BoxError>,
    remainder: Option<Pin<Box<B>>>,
}

impl<B> ClassifiedBody<B> {
    /// A body passed through untouched.
    pub fn passthrough(body: B) -> Self {
        ClassifiedBody {
            rest: Some(body),
            read: None,
        }
    }

    /// A body made of bytes only, with no inner body (a degraded answer, a test response).
    pub fn full(bytes: Bytes) -> Self {
        ClassifiedBody::buffered(bytes, None, None, None, None)
    }

    /// An error body read ahead: `prefix` (the bytes classified), then `tail` (the
    /// unread part of the last frame read), then the trailers or the read error met while
    /// reading, then `remainder` (the body not yet read; `None` when it ended).
    pub(crate) fn buffered(
        prefix: Bytes,
        tail: Option<Bytes>,
        trailers: Option<HeaderMap>,
        error: Option<BoxError>,
        remainder: Option<Pin<Box<B>>>,
    ) -> Self {
        ClassifiedBody {
            rest: None,
            read: Some(Box::new(ReadAhead {
                prefix: (!prefix.is_empty()).then_some(prefix),
                tail: tail.filter(|t| !t.is_empty()),
                trailers,
                error,
                remainder,
            })),
        }
    }

    /// The bytes read ahead of the rest, if any (an error body's first bytes).
    pub fn prefix(&self) -> Option<&Bytes> {
        self.read.as_ref()?.prefix.as_ref()
    }
}

impl<B> fmt::Debug for ClassifiedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifiedBody")
            .field("prefix_len", &self.prefix().map(Bytes::len))
            .field("passthrough", &self.rest.is_some())
            .finish()
    }
}

impl<B> Body for ClassifiedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(rest) = this.rest.as_pin_mut() {
            return rest.poll_frame(cx).map_err(Into::into);
        }
        let Some(read) = this.read.as_deref_mut() else {
            return Poll::Ready(None);
        };
        if let Some(p) = read.prefix.take().or_else(|| read.tail.take()) {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        if let Some(e) = read.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if let Some(t) = read.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        match &mut read.remainder {
            Some(r) => r.as_mut().poll_frame(cx).map_err(Into::into),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        if let Some(r) = &self.rest {
            return r.is_end_stream();
        }
        let Some(read) = &self.read else { return true };
        read.prefix.is_none()
            && read.tail.is_none()
            && read.error.is_none()
            && read.trailers.is_none()
            && read.remainder.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(r) = &self.rest {
            return r.size_hint();
        }
        let Some(read) = &self.read else {
            return SizeHint::with_exact(0);
        };
        let extra = read.prefix.as_ref().map_or(0, |p| p.len() as u64)
            + read.tail.as_ref().map_or(0, |p| p.len() as u64);
        let mut hint = match &read.remainder {
            Some(r) => r.size_hint(),
            None => SizeHint::with_exact(0),
        };
        // Raise the upper bound first: `set_lower` asserts lower <= upper.
        if let Some(u) = hint.upper() {
            hint.set_upper(u.saturating_add(extra));
        }
        hint.set_lower(hint.lower().saturating_add(extra));
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn ai_body_replays() {
        let b = AiBody::from("hello");
        let c = b.try_clone().unwrap();
        assert_eq!(b.collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(c.collect().await.unwrap().to_bytes(), "hello");
        let s = AiBody::streaming(http_body_util::Full::new(Bytes::from_static(b"x")));
        assert!(s.try_clone().is_none());
        assert!(s.bytes().is_none());
        assert_eq!(format!("{s:?}"), "AiBody(stream)");
        assert_eq!(s.collect().await.unwrap().to_bytes(), "x");
        assert_eq!(
            format!("{:?}", AiBody::from("secret prompt")),
            "AiBody(13 bytes)"
        );
    }

    #[tokio::test]
    async fn classified_body_delivers_prefix_then_rest() {
        let rest = http_body_util::Full::new(Bytes::from_static(b"!"));
        let body = ClassifiedBody::buffered(
            Bytes::from_static(b"hello"),
            Some(Bytes::from_static(b" world")),
            None,
            None,
            Some(Box::pin(rest)),
        );
        assert_eq!(body.size_hint().exact(), Some(12));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello world!");
        let full: ClassifiedBody<http_body_util::Empty<Bytes>> =
            ClassifiedBody::full(Bytes::from_static(b"x"));
        assert!(!full.is_end_stream());
        assert_eq!(full.collect().await.unwrap().to_bytes(), "x");
    }

    #[test]
    fn request_clone_keeps_everything() {
        let mut req = http::Request::post("http://h/v1/chat/completions")
            .header("x-a", "1")
            .body(AiBody::from("{}"))
            .unwrap();
        req.extensions_mut().insert(7u32);
        let c = try_clone_request(&req).unwrap();
        assert_eq!(c.method(), http::Method::POST);
        assert_eq!(c.uri(), req.uri());
        assert_eq!(c.headers()["x-a"], "1");
        assert_eq!(c.extensions().get::<u32>(), Some(&7));
        assert_eq!(c.body().bytes(), Some(&b"{}"[..]));
    }

    #[test]
    fn a_retained_request_keeps_every_header_in_order() {
        // More headers than kept inline, repeated names, a custom name among standard ones.
        for extra in [0, 10] {
            let mut b = http::Request::post("http://h/v1/messages")
                .header("x-a", "1")
                .header("content-type", "application/json")
                .header("x-a", "2");
            for i in 0..extra {
                b = b.header(format!("x-filler-{i}"), i.to_string());
            }
            let mut req = b.body(AiBody::from("{}")).unwrap();
            req.headers_mut()
                .insert("authorization", "Bearer k".parse().unwrap());
            let want: Vec<_> = req
                .headers()
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            let kept = RetainedRequest::copy(&req).unwrap();
            let seen: Vec<_> = kept
                .headers()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            assert_eq!(seen, want);
            for r in [kept.replay().unwrap(), kept.into_request()] {
                assert_eq!(r.headers(), req.headers());
                let got: Vec<_> = r
                    .headers()
                    .iter()
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect();
                assert_eq!(got, want, "the same order");
                assert_eq!(r.uri(), req.uri());
                assert_eq!(r.version(), req.version());
            }
        }
    }

    #[test]
    fn a_retained_request_keeps_each_value_exactly() {
        // Values past the inline bytes (kept as clones), bytes over 127, a tab, empty
        // values, sensitive and not.
        let long = "k".repeat(INLINE_VALUE_BYTES - 20);
        let mut values = [
            HeaderValue::from_static("application/json"),
            HeaderValue::from_str(&format!("Bearer {long}")).unwrap(),
            HeaderValue::from_bytes(b"caf\xc3\xa9\t\xff end").unwrap(),
            HeaderValue::from_static(""),
            HeaderValue::from_str(&"v".repeat(INLINE_VALUE_BYTES + 1)).unwrap(),
            HeaderValue::from_str("2023-06-01").unwrap(),
            HeaderValue::from_str("last").unwrap(),
        ];
        values[1].set_sensitive(true);
        values[6].set_sensitive(true);
        let mut req = http::Request::post("http://h/v1/messages")
            .body(AiBody::from("{}"))
            .unwrap();
        for (i, v) in values.iter().enumerate() {
            req.headers_mut().append(
                HeaderName::try_from(format!("x-h{}", i % 3)).unwrap(),
                v.clone(),
            );
        }
        let want: Vec<_> = req
            .headers()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_bytes().to_vec(), v.is_sensitive()))
            .collect();
        let kept = RetainedRequest::copy(&req).unwrap();
        let seen: Vec<_> = kept
            .headers()
            .map(|(n, v)| (n.clone(), v.as_bytes().to_vec(), v.is_sensitive()))
            .collect();
        assert_eq!(seen, want);
        for r in [kept.replay().unwrap(), kept.into_request()] {
            let got: Vec<_> = r
                .headers()
                .iter()
                .map(|(n, v)| (n.clone(), v.as_bytes().to_vec(), v.is_sensitive()))
                .collect();
            assert_eq!(got, want);
        }
    }

    proptest::proptest! {
        #[test]
        fn valid_value_agrees_with_header_value(bytes in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::num::u8::ANY,
                proptest::sample::select(vec![b'\t', 0x1f, 0x20, 0x7e, 0x7f, 0x80, b'a']),
            ],
            0..40,
        )) {
            proptest::prop_assert_eq!(
                valid_value(&bytes),
                HeaderValue::from_bytes(&bytes).is_ok()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retained_request_replays_every_extension() {
        let mut req = http::Request::post("http://h/v1/chat/completions")
            .header("x-a", "1")
            .body(AiBody::from("{}"))
            .unwrap();
        let check = |r: &http::Request<AiBody>| {
            assert_eq!(r.method(), http::Method::POST);
            assert_eq!(r.uri(), "http://h/v1/chat/completions");
            assert_eq!(r.headers()["x-a"], "1");
            assert_eq!(r.body().bytes(), Some(&b"{}"[..]));
        };
        // No extensions: none kept, none put back.
        let kept = RetainedRequest::copy(&req).unwrap();
        assert_eq!(kept.deadline(), None);
        assert!(kept.attempt_budget().is_none());
        let again = kept.replay().unwrap();
        check(&again);
        assert!(again.extensions().is_empty());

        // The stack's own two: kept beside the copy, put back into every request.
        let deadline = Deadline::after(std::time::Duration::from_secs(60));
        Deadline::set(&mut req, deadline);
        let budget = AttemptBudget::new(3);
        req.extensions_mut().insert(budget.clone());
        let kept = RetainedRequest::copy(&req).unwrap();
        assert_eq!(kept.deadline(), Some(deadline));
        assert!(kept.attempt_budget().unwrap().try_acquire());
        assert_eq!(budget.remaining(), 2, "the same budget, not a copy");
        for r in [kept.replay().unwrap(), kept.into_request()] {
            check(&r);
            assert_eq!(r.extensions().len(), 2);
            assert_eq!(Deadline::of(&r), Some(deadline));
            assert!(AttemptBudget::of(&r).unwrap().try_acquire());
        }
        assert_eq!(budget.remaining(), 0);

        // Any other extension: the whole map is copied.
        req.extensions_mut().insert(7u32);
        let kept = RetainedRequest::copy(&req).unwrap();
        assert_eq!(kept.deadline(), Some(deadline));
        assert!(kept.attempt_budget().is_some());
        for r in [kept.replay().unwrap(), kept.into_request()] {
            check(&r);
            assert_eq!(r.extensions().len(), 3);
            assert_eq!(r.extensions().get::<u32>(), Some(&7));
            assert_eq!(Deadline::of(&r), Some(deadline));
            assert!(AttemptBudget::of(&r).is_some());
        }
    }
}
