//! Which AI provider a request goes to.

use http::{HeaderMap, Uri};

/// The AI provider, and so the dialect of errors, headers and streams, of a request.
///
/// Detected once per request by [`Provider::detect`] from the host, the path and a few
/// provider-specific headers. A caller that knows better sets it explicitly by putting a
/// `Provider` into the request's extensions; [`Provider::of`] reads that first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Provider {
    /// OpenAI (`api.openai.com`), and servers that speak its Chat Completions or Responses
    /// API on their own paths.
    OpenAi,
    /// Anthropic Messages (`api.anthropic.com`, `/v1/messages`).
    Anthropic,
    /// Google Gemini (`generativelanguage.googleapis.com`, `…:generateContent`).
    Gemini,
    /// Azure OpenAI (`*.openai.azure.com`, `/openai/deployments/…`).
    AzureOpenAi,
    /// Anything else: classified by status code and the common error body shapes.
    #[default]
    Generic,
}

impl Provider {
    /// The provider of a request: the `Provider` in its extensions if the caller put one
    /// there, otherwise [`Provider::detect`].
    pub fn of<B>(req: &http::Request<B>) -> Provider {
        match req.extensions().get::<Provider>() {
            Some(p) => *p,
            None => Provider::detect(req.uri(), req.headers()),
        }
    }

    /// Detects the provider from the request's URI and headers.
    ///
    /// The host decides when it is a provider's own; otherwise the path (an
    /// OpenAI-compatible gateway on `localhost` that serves `/v1/chat/completions` speaks
    /// OpenAI's dialect) and then provider-specific headers (`anthropic-version`,
    /// `x-goog-api-key`, `api-key`). Cheap: no allocation.
    pub fn detect(uri: &Uri, headers: &HeaderMap) -> Provider {
        let host = uri_host(uri)
            .or_else(|| {
                headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(|h| h.split(':').next().unwrap_or(h))
            })
            .unwrap_or("");
        if let Some(p) = Self::from_host(host) {
            return p;
        }
        let path = uri.path();
        if path.starts_with("/openai/deployments/") {
            return Provider::AzureOpenAi;
        }
        if path.ends_with("/messages") || path.ends_with("/messages/count_tokens") {
            return Provider::Anthropic;
        }
        if path.contains(":generateContent") || path.contains(":streamGenerateContent") {
            return Provider::Gemini;
        }
        if path.ends_with("/chat/completions")
            || path.ends_with("/responses")
            || path.ends_with("/completions")
            || path.ends_with("/embeddings")
        {
            return Provider::OpenAi;
        }
        if headers.contains_key("anthropic-version") {
            return Provider::Anthropic;
        }
        if headers.contains_key("x-goog-api-key") {
            return Provider::Gemini;
        }
        if headers.contains_key("api-key") {
            return Provider::AzureOpenAi;
        }
        Provider::Generic
    }

    fn from_host(host: &str) -> Option<Provider> {
        let host = host.trim_end_matches('.');
        // The usual (lowercase) spelling first: one comparison of bytes.
        let is = |name: &str| host == name || host.eq_ignore_ascii_case(name);
        if is("api.openai.com") {
            Some(Provider::OpenAi)
        } else if is("api.anthropic.com") {
            Some(Provider::Anthropic)
        } else if is("generativelanguage.googleapis.com") {
            Some(Provider::Gemini)
        } else if ends_with_ignore_case(host, ".openai.azure.com") {
            Some(Provider::AzureOpenAi)
        } else {
            None
        }
    }

    /// A short lowercase name (`openai`, `gemini`, `azure_openai`, …), as [`Display`](std::fmt::Display)
    /// writes it. Trace fields use [`gen_ai_name`](Self::gen_ai_name).
    pub const fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
            Provider::AzureOpenAi => "azure_openai",
            Provider::Generic => "generic",
        }
    }

    /// The provider's name in the OpenTelemetry GenAI semantic conventions
    /// (`gen_ai.provider.name`): `openai`, `anthropic`, `gcp.gemini` (the
    /// `generativelanguage.googleapis.com` API), `azure.ai.openai`, and `_OTHER` for a
    /// provider tower-ai does not recognise.
    pub const fn gen_ai_name(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gcp.gemini",
            Provider::AzureOpenAi => "azure.ai.openai",
            Provider::Generic => "_OTHER",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// [`Uri::host`], by one pass over the authority's bytes: http's `Authority::host` splits
/// the authority twice with `str`'s searchers, ~400 instructions for `api.openai.com`,
/// paid by every layer that keys on the host.
pub(crate) fn uri_host(uri: &Uri) -> Option<&str> {
    let auth = uri.authority()?.as_str();
    // The usual authority is a plain host: no userinfo (`@`), no port (`:`), no IPv6
    // literal (`[`). Then it is the host, as a word-at-a-time scan tells.
    if auth.as_bytes().first() != Some(&b'[')
        && !crate::swar::contains2(auth.as_bytes(), b':', b'@')
    {
        return Some(auth);
    }
    Some(host_of_authority(auth))
}

/// The host of an authority with a port, userinfo or an IPv6 literal: after the last
/// `@`, up to the first `:` after it (or to an IPv6 literal's `]`).
fn host_of_authority(auth: &str) -> &str {
    // One forward pass: the host starts after the last `@` and ends at the first `:`
    // after that (or at an IPv6 literal's `]`).
    let (mut start, mut colon) = (0, None);
    for (i, &c) in auth.as_bytes().iter().enumerate() {
        if c == b'@' {
            (start, colon) = (i + 1, None);
        } else if c == b':' && colon.is_none() {
            colon = Some(i);
        }
    }
    let host_port = &auth[start..];
    if host_port.as_bytes().first() == Some(&b'[') {
        let end = host_port.bytes().position(|c| c == b']');
        return end.map_or(host_port, |e| &host_port[..=e]);
    }
    &auth[start..colon.unwrap_or(auth.len())]
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_host_is_http_s() {
        for uri in [
            "https://api.openai.com/v1/chat/completions",
            "http://localhost:8080/v1/messages",
            "http://user:pw@example.com:99/x",
            "http://a@b@c.example/x",
            "http://[::1]:8080/v1",
            "http://[fe80::1%25eth0]/v1",
            "http://user@[::1]/v1",
            "/v1/chat/completions",
            "*",
            "example.com:443",
            "http://a:b:c@host:1/x",
            "http://verylonghostname.example.com:8080/v1",
            "http://[::1]/v1",
            "http://12345678:9/x",
            "http://1234567:9/x",
            "http://123456789/x",
        ] {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(super::uri_host(&uri), uri.host(), "{uri}");
        }
    }

    use super::*;

    proptest::proptest! {
        /// The word-at-a-time scan finds the host `http` finds, userinfo, ports, IPv6
        /// literals and odd lengths included.
        #[test]
        fn the_host_is_http_s_for_any_authority(auth in "[a-z0-9.@:\\[\\]-]{1,40}") {
            if let Ok(uri) = format!("http://{auth}/v1").parse::<Uri>() {
                proptest::prop_assert_eq!(uri_host(&uri), uri.host());
            }
        }
    }

    fn detect(uri: &str) -> Provider {
        Provider::detect(&uri.parse().unwrap(), &HeaderMap::new())
    }

    #[test]
    fn by_host() {
        assert_eq!(
            detect("https://api.openai.com/v1/chat/completions"),
            Provider::OpenAi
        );
        assert_eq!(
            detect("https://api.anthropic.com/v1/messages"),
            Provider::Anthropic
        );
        assert_eq!(
            detect("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"),
            Provider::Gemini
        );
        assert_eq!(
            detect("https://myres.openai.azure.com/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"),
            Provider::AzureOpenAi
        );
        assert_eq!(
            detect("https://API.OPENAI.COM./v1/models"),
            Provider::OpenAi
        );
    }

    #[test]
    fn by_path_on_unknown_hosts() {
        assert_eq!(
            detect("http://127.0.0.1:8080/v1/chat/completions"),
            Provider::OpenAi
        );
        assert_eq!(
            detect("http://127.0.0.1:8080/v1/messages"),
            Provider::Anthropic
        );
        assert_eq!(
            detect("http://127.0.0.1/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"),
            Provider::Gemini
        );
        assert_eq!(
            detect("http://127.0.0.1/openai/deployments/x/chat/completions"),
            Provider::AzureOpenAi
        );
        assert_eq!(detect("http://127.0.0.1/healthz"), Provider::Generic);
        assert_eq!(detect("/v1/chat/completions"), Provider::OpenAi);
    }

    #[test]
    fn by_header_and_explicit() {
        let mut h = HeaderMap::new();
        h.insert("anthropic-version", "2023-06-01".parse().unwrap());
        assert_eq!(
            Provider::detect(&"http://proxy/x".parse().unwrap(), &h),
            Provider::Anthropic
        );
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, "api.openai.com:443".parse().unwrap());
        assert_eq!(
            Provider::detect(&"/x".parse().unwrap(), &h),
            Provider::OpenAi
        );

        let mut req = http::Request::new(());
        *req.uri_mut() = "http://api.openai.com/v1/chat/completions".parse().unwrap();
        req.extensions_mut().insert(Provider::Gemini);
        assert_eq!(Provider::of(&req), Provider::Gemini);
    }
}
