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
use crate::meta::model_of;

/// A per-key state key: a hash, seeded per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(u64);

/// The per-process seeded hasher. foldhash's quality variant: several times faster than
/// std's SipHash on short keys (a key is derived on every call of every per-key layer),
/// and still seeded at random per process, so keys cannot be predicted from outside.
fn seed() -> &'static foldhash::quality::RandomState {
    static SEED: OnceLock<foldhash::quality::RandomState> = OnceLock::new();
    SEED.get_or_init(Default::default)
}

impl Key {
    /// The key of any hashable value.
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
    req.uri()
        .host()
        .or_else(|| {
            let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
            Some(h.rsplit_once(':').map_or(h, |(host, _)| host))
        })
        .unwrap_or("")
}

/// Key = provider host + model: one sick model does not hold back the others.
/// Reads the model with [`model_of`](crate::meta::model_of) (no allocation).
#[derive(Debug, Clone, Copy, Default)]
pub struct HostModel;

impl<B: ReplayBody> KeyFn<B> for HostModel {
    fn key(&self, req: &Request<B>) -> Option<Key> {
        let model = model_of(req);
        Some(Key::of(&(host_of(req), model.as_deref().unwrap_or(""))))
    }
    fn label(&self, req: &Request<B>) -> String {
        match model_of(req) {
            Some(m) => format!("{}/{}", host_of(req), m),
            None => host_of(req).to_owned(),
        }
    }
}

/// Key = the request's API key (`authorization`, `x-api-key`, `api-key` or
/// `x-goog-api-key`), hashed: the key itself is never stored or shown. Requests without
/// one share a single key.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiKeyHash;

const SECRET_HEADERS: [&str; 4] = ["authorization", "x-api-key", "api-key", "x-goog-api-key"];

impl<B> KeyFn<B> for ApiKeyHash {
    fn key(&self, req: &Request<B>) -> Option<Key> {
        let secret = SECRET_HEADERS
            .iter()
            .find_map(|h| req.headers().get(*h))
            .map(|v| v.as_bytes())
            .unwrap_or(b"");
        Some(Key::of(secret))
    }
    fn label(&self, req: &Request<B>) -> String {
        // A short slice of the salted hash: enough to tell keys apart in logs, useless
        // to recover the secret.
        let k = self.key(req).map_or(0, Key::as_u64);
        format!("api-key#{:08x}", k >> 32)
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
