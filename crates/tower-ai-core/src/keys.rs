//! Keys for per-key state (cooldowns, breakers, budgets), and the functions that derive
//! them from a request.
//!
//! A [`Key`] is a 64-bit hash made with a per-process random seed, so per-key maps stay
//! small and fixed-size whatever the key's source, and a key made from an API key reveals
//! nothing about it. A readable [label](KeyFn::label) is produced only when one is needed
//! (an error, an event) and never contains a secret.

use std::hash::{BuildHasher, Hash};
use std::sync::OnceLock;

use http::Request;

use crate::body::ReplayBody;
use crate::meta::{model_of, RequestMeta};

/// A per-key state key: a hash, seeded per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(u64);

/// The seeded hasher of every [`Key`]. foldhash's quality variant: several times faster than
/// std's SipHash on short keys (a key is derived on every call of every per-key layer).
/// Seeded at random per process unless [`set_seed`] gave a seed first, so keys cannot be
/// predicted from outside.
#[inline]
fn seed() -> &'static foldhash::quality::SeedableRandomState {
    SEED.get_or_init(foldhash::quality::SeedableRandomState::random)
}

static SEED: OnceLock<foldhash::quality::SeedableRandomState> = OnceLock::new();

/// Seeds every [`Key`] of this process with a secret of the application's, instead of a
/// random seed: replicas given the same secret derive the same keys and the same labels
/// for the same request.
///
/// Needed only when state is shared between processes and keyed by a hash of something
/// secret, such as [`ApiKeyHash`] or [`ApiKeyHostModel`] with a store shared through Redis:
/// with a random seed per process, each replica would name a tenant's state differently.
/// Keys made from the provider host and model name ([`HostModel`], the default) agree
/// across replicas either way, since their labels are readable. Keep the secret secret:
/// who knows it can predict keys, and aim a flood of requests at one key of a per-key map.
///
/// Call it once, before the first request (before any layer derives a key). Fails, and
/// changes nothing, if the keys of this process are already seeded.
///
/// ```
/// use tower_ai_core::keys::{set_seed, ApiKeyHash, KeyFn};
/// # fn secret_from_config() -> u64 { 0x5eed }
/// set_seed(secret_from_config()).expect("seeded before any key was made");
/// let req = http::Request::post("https://api.openai.com/v1/chat/completions")
///     .header("authorization", "Bearer sk-a")
///     .body("")
///     .unwrap();
/// // The same label on every replica seeded with the same secret.
/// let label = ApiKeyHash.label(&req);
/// assert!(label.starts_with("api-key#") && !label.contains("sk-a"));
/// ```
pub fn set_seed(secret: u64) -> Result<(), SeedAlreadySet> {
    let mut fresh = false;
    SEED.get_or_init(|| {
        fresh = true;
        // One leak per process at most: `get_or_init` runs this once.
        let shared: &'static foldhash::SharedSeed =
            Box::leak(Box::new(foldhash::SharedSeed::from_u64(secret)));
        foldhash::quality::SeedableRandomState::with_seed(secret, shared)
    });
    if fresh {
        Ok(())
    } else {
        Err(SeedAlreadySet)
    }
}

/// [`set_seed`] was called after this process's keys were seeded (by an earlier
/// `set_seed`, or at random by the first key made).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedAlreadySet;

impl std::fmt::Display for SeedAlreadySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the keys of this process are already seeded; call set_seed before the first request",
        )
    }
}

impl std::error::Error for SeedAlreadySet {}

impl Key {
    /// The key of any hashable value.
    #[inline]
    pub fn of<T: Hash + ?Sized>(value: &T) -> Key {
        Key(seed().hash_one(value))
    }

    /// The raw hash.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for Key {
    /// `key-` and the hash in hex: a stable, secret-free name for logs and errors.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key-{:016x}", self.0)
    }
}

/// The hasher of a [`KeyMap`]: a [`Key`] is already a seeded hash, so the map uses it as
/// it is instead of hashing it again.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is reached for a `Key`; fold anything else in, just in case.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map from [`Key`] to per-key state, hashing nothing twice. Every per-key layer keeps
/// its state in one (and bounds and evicts it itself).
pub type KeyMap<V> = std::collections::HashMap<Key, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// Derives a per-key state key from a request.
///
/// Implemented by [`HostModel`] (the default of every per-key layer), [`ApiKeyHash`],
/// [`Global`] and any `Fn(&Request<B>) -> Option<Key> + Send + Sync + 'static` closure.
/// Returning `None` exempts the request from per-key state (it passes ungated).
pub trait KeyFn<B>: Send + Sync + 'static {
    /// The request's key.
    fn key(&self, req: &Request<B>) -> Option<Key>;

    /// A readable name for the request's key, for errors and events. Called only when
    /// needed; must never contain a secret.
    fn label(&self, req: &Request<B>) -> String {
        match self.key(req) {
            Some(k) => k.to_string(),
            None => "none".to_owned(),
        }
    }
}

impl<B, F> KeyFn<B> for F
where
    F: Fn(&Request<B>) -> Option<Key> + Send + Sync + 'static,
{
    fn key(&self, req: &Request<B>) -> Option<Key> {
        self(req)
    }
}

/// The request's host: the URI's, or the `Host` header's (without the port).
pub fn host_of<B>(req: &Request<B>) -> &str {
    crate::provider::uri_host(req.uri())
        .or_else(|| {
            let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
            Some(h.rsplit_once(':').map_or(h, |(host, _)| host))
        })
        .unwrap_or("")
}

/// Key = provider host + model: one sick model does not hold back the others.
/// Reads the model as [`model_of`] does (no allocation), with a
/// shortcut for the common body whose first key is a plain `"model"` string.
///
/// A model name longer than [`MAX_MODEL_LEN`] bytes is no model any provider serves: all
/// such requests to a host share one key (so a caller cannot make a state per junk name),
/// and its label names the length, not the bytes. AiRetry refuses such a request with
/// [`AiError::ModelTooLong`](crate::AiError::ModelTooLong) before it reaches any per-key
/// layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostModel;

impl<B: ReplayBody> KeyFn<B> for HostModel {
    fn key(&self, req: &Request<B>) -> Option<Key> {
        // A stored `RequestMeta` takes precedence, as in `model_of` (one lookup for both).
        if let Some(meta) = RequestMeta::stored(req) {
            let model = meta.model().unwrap_or("");
            return Some(host_model_key(host_of(req), model.as_bytes()));
        }
        // The common shape: a body whose first key is a plain `"model"`. Same key as the
        // general path below.
        if let Some(model) = req.body().bytes().and_then(leading_model) {
            return Some(host_model_key(host_of(req), model));
        }
        let model = model_of(req);
        Some(host_model_key(
            host_of(req),
            model.as_deref().unwrap_or("").as_bytes(),
        ))
    }
    fn label(&self, req: &Request<B>) -> String {
        host_model_label(host_of(req), model_of(req).as_deref())
    }
}

/// `host/model`, bounded: the model's length instead of an absurd model, and the whole
/// capped by [`cap_label`].
fn host_model_label(host: &str, model: Option<&str>) -> String {
    let host = &host[..floor_char_boundary(host, MAX_LABEL_LEN)];
    let label = match model {
        Some(m) if m.len() > MAX_MODEL_LEN => format!("{host}/<model name of {} bytes>", m.len()),
        Some(m) => {
            let m = &m[..floor_char_boundary(m, MAX_LABEL_LEN)];
            format!("{host}/{m}")
        }
        None => host.to_owned(),
    };
    cap_label(label)
}

/// The longest model name the per-key layers accept, in bytes. Real model names are
/// under 100 bytes (OpenAI's fine-tuned `ft:…` names are the longest, about 60); Azure
/// deployment names are at most 64 characters.
pub const MAX_MODEL_LEN: usize = 256;

/// The longest label (in bytes) a per-key layer keeps or puts in an error:
/// [`cap_label`] cuts longer ones.
pub const MAX_LABEL_LEN: usize = 128;

/// The marker [`cap_label`] ends a cut label with.
pub const TRUNCATION_MARKER: &str = "…";

/// A label cut to at most [`MAX_LABEL_LEN`] bytes, on a character boundary, ending with
/// [`TRUNCATION_MARKER`] when it was cut. A cut label is a fresh, exactly sized string,
/// so a long label's allocation is not kept. Every per-key layer passes the labels of its
/// [`KeyFn`] through this before it keeps one (in a registry, a waiter, an error).
///
/// ```
/// use tower_ai_core::keys::{cap_label, MAX_LABEL_LEN};
/// assert_eq!(cap_label("api.openai.com/gpt-4o".into()), "api.openai.com/gpt-4o");
/// let long = cap_label("é".repeat(1000));
/// assert!(long.len() <= MAX_LABEL_LEN && long.ends_with('…'));
/// ```
pub fn cap_label(label: String) -> String {
    if label.len() <= MAX_LABEL_LEN {
        return label;
    }
    let keep = floor_char_boundary(&label, MAX_LABEL_LEN - TRUNCATION_MARKER.len());
    let mut out = String::with_capacity(keep + TRUNCATION_MARKER.len());
    out.push_str(&label[..keep]);
    out.push_str(TRUNCATION_MARKER);
    out
}

/// The largest index `<= max` on a character boundary of `s` (`str::floor_char_boundary`
/// is not stable yet).
fn floor_char_boundary(s: &str, max: usize) -> usize {
    if max >= s.len() {
        return s.len();
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The key of a host and a model. Hashed as bytes, so that [`leading_model`] needs no
/// UTF-8 check (it checks for ASCII as it scans).
#[inline]
fn host_model_key(host: &str, model: &[u8]) -> Key {
    if model.len() > MAX_MODEL_LEN {
        // One key for every absurd name: no state per junk name.
        return Key::of(&(host.as_bytes(), OVERSIZED_MODEL));
    }
    Key::of(&(host.as_bytes(), model))
}

/// What an over-long model name is hashed as (no real model name holds a NUL byte).
const OVERSIZED_MODEL: &[u8] = b"\0oversized model name";

/// The value of `"model"` when it is the first key of the JSON object and a plain ASCII
/// string (no escape): what [`model_of`] finds for such a body, read without its general
/// scan. `None` for any other shape, which the general scan then reads.
#[inline]
fn leading_model(json: &[u8]) -> Option<&[u8]> {
    #[inline]
    fn ws(b: &[u8], mut i: usize) -> usize {
        while matches!(b.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            i += 1;
        }
        i
    }
    #[inline]
    fn eat(b: &[u8], i: usize, token: &[u8]) -> Option<usize> {
        let i = ws(b, i);
        (b.get(i..i + token.len())? == token).then_some(i + token.len())
    }
    const COMPACT: &[u8] = b"{\"model\":\"";
    let start = if json.starts_with(COMPACT) {
        COMPACT.len()
    } else {
        let i = eat(json, 0, b"{")?;
        let i = eat(json, i, b"\"model\"")?;
        let i = eat(json, i, b":")?;
        eat(json, i, b"\"")?
    };
    let rest = json.get(start..)?;
    let end = first_special(rest)?;
    (rest[end] == b'"').then(|| &rest[..end])
}

/// The index of the first `"`, `\\` or non-ASCII byte, eight bytes at a time.
#[inline]
fn first_special(b: &[u8]) -> Option<usize> {
    use crate::swar::{splat, zero_bytes, TOPS};
    // The lowest flag is a true one (see `swar`), which is all `trailing_zeros` reads.
    let mut chunks = b.chunks_exact(8);
    let mut i = 0;
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let v = u64::from_le_bytes(word);
        let hits = zero_bytes(v ^ splat(b'"')) | zero_bytes(v ^ splat(b'\\')) | (v & TOPS);
        if hits != 0 {
            return Some(i + hits.trailing_zeros() as usize / 8);
        }
        i += 8;
    }
    let tail = chunks.remainder();
    tail.iter()
        .position(|&c| c == b'"' || c == b'\\' || !c.is_ascii())
        .map(|j| i + j)
}

/// Key = the request's API key (`authorization`, `x-api-key`, `api-key` or
/// `x-goog-api-key`, else the `key` query parameter Gemini documents as an alternative:
/// `?key=API_KEY`), hashed: the key itself is never stored or shown. The same key sent
/// in a header or in the query is the same tenant. Requests without one share a single
/// key.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiKeyHash;

const SECRET_HEADERS: [&str; 4] = ["authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// The request's API key as sent (a header's value, else the raw `key` query value), or
/// empty. Borrowed: never copied, never kept.
fn api_key_of<B>(req: &Request<B>) -> &[u8] {
    SECRET_HEADERS
        .iter()
        .find_map(|h| req.headers().get(*h))
        .map(|v| v.as_bytes())
        .or_else(|| query_key(req.uri().query()?))
        .unwrap_or(b"")
}

/// The raw value of the first `key=` parameter of a query string.
fn query_key(query: &str) -> Option<&[u8]> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("key="))
        .map(str::as_bytes)
}

/// `api-key#` and a short slice of the salted hash of the request's API key: enough to
/// tell keys apart in logs, useless to recover the secret.
fn api_key_label<B>(req: &Request<B>) -> String {
    format!("api-key#{:08x}", Key::of(api_key_of(req)).as_u64() >> 32)
}

impl<B> KeyFn<B> for ApiKeyHash {
    fn key(&self, req: &Request<B>) -> Option<Key> {
        Some(Key::of(api_key_of(req)))
    }
    fn label(&self, req: &Request<B>) -> String {
        api_key_label(req)
    }
}

/// Key = the request's API key (hashed, as [`ApiKeyHash`] reads it) + provider host +
/// model: per-tenant state for a proxy that forwards each tenant's own API key.
///
/// [`HostModel`], the default of every per-key layer, models *one* provider account: a
/// 429 or an outage of `host/model` holds back every caller of that model, which is
/// right when all calls spend one key's limits. When each tenant sends its own key, the
/// provider's limits are per key too, and a cooldown or an open circuit under
/// `HostModel` would let one tenant's 429 hold back the others. With this key each
/// tenant's (key, model) has its own state:
///
/// - RetryAfterAware: one tenant's `Retry-After` cools only that tenant down.
/// - TokenBudget: limits per tenant and model (use [`ApiKeyHash`] for per-tenant limits
///   over all models).
/// - CircuitBreaker: usually keep `HostModel` (an outage is the provider's, for all
///   tenants); this key fits when failures are per key (a revoked or exhausted key).
///
/// The price: one state per tenant and model, so a map's size bound (each layer's
/// `max_keys`) must cover tenants × models, and a caller that invents keys creates
/// states (bounded, like any key).
///
/// ```
/// use http::Request;
/// use tower_ai_core::keys::{ApiKeyHostModel, KeyFn};
/// let req = |key: &str| {
///     Request::post("https://api.openai.com/v1/chat/completions")
///         .header("authorization", key)
///         .body(r#"{"model":"gpt-4o"}"#)
///         .unwrap()
/// };
/// let (a, b) = (req("Bearer sk-a"), req("Bearer sk-b"));
/// assert_ne!(ApiKeyHostModel.key(&a), ApiKeyHostModel.key(&b));
/// assert!(!ApiKeyHostModel.label(&a).contains("sk-a"));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiKeyHostModel;

impl<B: ReplayBody> KeyFn<B> for ApiKeyHostModel {
    fn key(&self, req: &Request<B>) -> Option<Key> {
        let model = HostModel.key(req)?;
        Some(Key::of(&(api_key_of(req), model.as_u64())))
    }
    fn label(&self, req: &Request<B>) -> String {
        cap_label(format!("{}/{}", api_key_label(req), HostModel.label(req)))
    }
}

/// One key for every request: the whole layer shares one state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

impl<B> KeyFn<B> for Global {
    fn key(&self, _: &Request<B>) -> Option<Key> {
        Some(Key(0))
    }
    fn label(&self, _: &Request<B>) -> String {
        "global".to_owned()
    }
}

/// Whether a header holds a credential, and so must never be logged.
pub fn is_secret_header(name: &http::HeaderName) -> bool {
    SECRET_HEADERS.contains(&name.as_str())
        || name == http::header::PROXY_AUTHORIZATION
        || name == http::header::COOKIE
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Just;

    fn req(uri: &str, body: &'static str) -> Request<&'static str> {
        Request::post(uri).body(body).unwrap()
    }

    #[test]
    fn host_model_separates_models_and_hosts() {
        let a = req(
            "https://api.openai.com/v1/chat/completions",
            r#"{"model":"a"}"#,
        );
        let b = req(
            "https://api.openai.com/v1/chat/completions",
            r#"{"model":"b"}"#,
        );
        let a2 = req(
            "https://api.openai.com/v1/chat/completions",
            r#"{"messages":[],"model":"a"}"#,
        );
        let other = req("https://api.anthropic.com/v1/messages", r#"{"model":"a"}"#);
        assert_ne!(HostModel.key(&a), HostModel.key(&b));
        assert_eq!(HostModel.key(&a), HostModel.key(&a2));
        assert_ne!(HostModel.key(&a), HostModel.key(&other));
        assert_eq!(HostModel.label(&a), "api.openai.com/a");
    }

    #[test]
    fn the_leading_model_shortcut_agrees_with_the_general_scan() {
        let bodies = [
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
            " {\n  \"model\" : \"claude-x\",\t\"max_tokens\":1}",
            r#"{"model":"","x":1}"#,
            r#"{"model":"a\u0062"}"#, // escaped: the general scan unescapes
            r#"{"model":"modèle"}"#,  // not ASCII
            r#"{"model":"open"#,      // unterminated
            r#"{"model":7}"#,         // not a string
            r#"{"messages":[],"model":"b"}"#, // not first
            r#"{"modelx":"c","model":"d"}"#,
            r#"["model","e"]"#,
            "",
        ];
        for body in bodies {
            if let Some(m) = leading_model(body.as_bytes()) {
                assert_eq!(
                    crate::meta::top_level_string(body.as_bytes(), b"model").as_deref(),
                    std::str::from_utf8(m).ok(),
                    "{body}"
                );
            }
            let uri = "https://api.openai.com/v1/chat/completions";
            let r = req(uri, body);
            let general = model_of(&r);
            let expected = host_model_key(
                "api.openai.com",
                general.as_deref().unwrap_or("").as_bytes(),
            );
            assert_eq!(HostModel.key(&req(uri, body)), Some(expected), "{body}");
        }
        assert_eq!(
            leading_model(bodies[0].as_bytes()),
            Some(&b"gpt-4o-mini"[..])
        );
        assert_eq!(leading_model(bodies[1].as_bytes()), Some(&b"claude-x"[..]));
        assert_eq!(leading_model(bodies[3].as_bytes()), None);
        assert_eq!(leading_model(bodies[7].as_bytes()), None);
        // A `RequestMeta` takes precedence over the body, as in `model_of`.
        let mut r = req("https://api.openai.com/v1/chat/completions", bodies[0]);
        let other = req("https://api.openai.com/v1/x", r#"{"model":"z"}"#);
        let meta = RequestMeta::of(&other).into_owned();
        r.extensions_mut().insert(meta);
        assert_eq!(
            HostModel.key(&r),
            Some(host_model_key("api.openai.com", b"z"))
        );
    }

    proptest::proptest! {
        #[test]
        fn the_word_scan_finds_the_first_special_byte(b in proptest::collection::vec(
            proptest::prop_oneof![Just(b'"'), Just(b'\\'), Just(0x80u8), Just(0xffu8), Just(0u8), Just(1u8), Just(0x21u8), Just(0x23u8), Just(0x5bu8), Just(0x5du8), 0x20u8..0x7f],
            0..40,
        )) {
            let want = b.iter().position(|&c| c == b'"' || c == b'\\' || !c.is_ascii());
            proptest::prop_assert_eq!(first_special(&b), want);
        }


        #[test]
        fn the_leading_model_shortcut_agrees_on_any_body(
            body in r#"[ \n]?\{[ ]?("model"|"m"|"modelx")[ ]?:[ ]?("[a-z0-9\\"é.-]{0,8}"?|7|\[\])[,}]?.{0,6}"#
        ) {
            if let Some(m) = leading_model(body.as_bytes()) {
                let general = crate::meta::top_level_string(body.as_bytes(), b"model");
                proptest::prop_assert_eq!(general.as_deref(), std::str::from_utf8(m).ok());
            }
        }
    }

    #[test]
    fn api_keys_are_hashed_never_shown() {
        let mk = |k: &str| {
            Request::post("/")
                .header("authorization", k)
                .body("")
                .unwrap()
        };
        let (a, b) = (mk("Bearer sk-secret-aaaa"), mk("Bearer sk-secret-bbbb"));
        assert_ne!(ApiKeyHash.key(&a), ApiKeyHash.key(&b));
        assert_eq!(
            ApiKeyHash.key(&a),
            ApiKeyHash.key(&mk("Bearer sk-secret-aaaa"))
        );
        let label = ApiKeyHash.label(&a);
        assert!(!label.contains("sk-") && !label.contains("aaaa"), "{label}");
        assert!(is_secret_header(&http::HeaderName::from_static(
            "x-goog-api-key"
        )));
        assert!(!is_secret_header(&http::HeaderName::from_static(
            "content-type"
        )));
    }

    #[test]
    fn closures_are_key_fns() {
        let f = |r: &Request<&'static str>| (r.uri().path() != "/skip").then(|| Key::of("x"));
        assert!(KeyFn::key(&f, &req("/skip", "")).is_none());
        assert!(KeyFn::key(&f, &req("/go", "")).is_some());
    }
}
