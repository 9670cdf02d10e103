//! Careless and hostile callers (issue #16): labels that cannot pin caller-sized strings,
//! API keys read wherever a provider accepts them, credentials redacted from error text.

use http::Request;
use tower_ai_core::keys::{
    cap_label, ApiKeyHash, ApiKeyHostModel, HostModel, KeyFn, MAX_LABEL_LEN,
};
use tower_ai_core::{redact_secrets, AiError, BoxError, ErrorKind, REDACTED};

fn chat(model: &str) -> Request<String> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .body(format!(r#"{{"model":"{model}","messages":[]}}"#))
        .unwrap()
}

#[test]
fn a_huge_model_name_gives_a_short_label_and_no_key_of_its_own() {
    let huge = "m".repeat(1 << 20);
    let label = HostModel.label(&chat(&huge));
    assert!(label.len() <= MAX_LABEL_LEN, "{} bytes", label.len());
    assert!(
        label.capacity() <= MAX_LABEL_LEN,
        "{} bytes held",
        label.capacity()
    );
    assert!(label.starts_with("api.openai.com/"), "{label}");
    assert!(
        label.contains("1048576"),
        "the label names the length: {label}"
    );
    // Junk names cannot make a state each: every over-long name is one key.
    let other = "n".repeat(1 << 20);
    assert_eq!(HostModel.key(&chat(&huge)), HostModel.key(&chat(&other)));
    assert_ne!(HostModel.key(&chat(&huge)), HostModel.key(&chat("gpt-4o")));
    // A long but acceptable name is cut with a visible marker, on a char boundary.
    let long = "é".repeat(120); // 240 bytes
    let label = HostModel.label(&chat(&long));
    assert!(
        label.len() <= MAX_LABEL_LEN && label.ends_with('…'),
        "{label}"
    );
    assert_ne!(
        HostModel.key(&chat(&long)),
        HostModel.key(&chat(&"é".repeat(119)))
    );
    // Short labels are untouched.
    assert_eq!(HostModel.label(&chat("gpt-4o")), "api.openai.com/gpt-4o");
    // A huge Host header is cut too.
    let req = Request::post("/v1/chat/completions")
        .header("host", "h".repeat(10_000))
        .body(r#"{"model":"gpt-4o"}"#.to_owned())
        .unwrap();
    assert!(HostModel.label(&req).len() <= MAX_LABEL_LEN);
}

#[test]
fn cap_label_cuts_on_a_char_boundary_with_a_marker() {
    for n in 0..300 {
        let s: String = "aé€😀".chars().cycle().take(n).collect();
        let capped = cap_label(s.clone());
        assert!(capped.len() <= MAX_LABEL_LEN);
        if s.len() <= MAX_LABEL_LEN {
            assert_eq!(capped, s);
        } else {
            assert!(capped.ends_with('…'));
            assert!(s.starts_with(capped.trim_end_matches('…')));
        }
    }
}

#[test]
fn gemini_query_keys_are_tenants_of_their_own() {
    let gemini = |q: &str| {
        Request::post(format!(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent{q}"
        ))
        .body(String::new())
        .unwrap()
    };
    let (a, b) = (
        gemini("?key=AIza-tenant-a"),
        gemini("?alt=sse&key=AIza-tenant-b"),
    );
    assert_ne!(ApiKeyHash.key(&a), ApiKeyHash.key(&b));
    assert_ne!(ApiKeyHash.key(&a), ApiKeyHash.key(&gemini("")));
    // The same key in the header Gemini also accepts is the same tenant.
    let header =
        Request::post("https://generativelanguage.googleapis.com/v1beta/models/x:generateContent")
            .header("x-goog-api-key", "AIza-tenant-a")
            .body(String::new())
            .unwrap();
    assert_eq!(ApiKeyHash.key(&a), ApiKeyHash.key(&header));
    // `monkey=` is not `key=`.
    assert_eq!(
        ApiKeyHash.key(&gemini("?monkey=x")),
        ApiKeyHash.key(&gemini(""))
    );
    assert!(!ApiKeyHash.label(&a).contains("tenant"));
}

#[test]
fn the_composite_key_separates_tenants_hosts_and_models() {
    let req = |key: &str, model: &str| {
        let mut r = chat(model);
        r.headers_mut()
            .insert("authorization", key.parse().unwrap());
        r
    };
    let k = |r: &Request<String>| ApiKeyHostModel.key(r).unwrap();
    assert_ne!(k(&req("Bearer a", "gpt-4o")), k(&req("Bearer b", "gpt-4o")));
    assert_ne!(
        k(&req("Bearer a", "gpt-4o")),
        k(&req("Bearer a", "gpt-4o-mini"))
    );
    assert_eq!(k(&req("Bearer a", "gpt-4o")), k(&req("Bearer a", "gpt-4o")));
    let label = ApiKeyHostModel.label(&req("Bearer sk-secret", &"m".repeat(1 << 20)));
    assert!(
        label.len() <= MAX_LABEL_LEN && !label.contains("secret"),
        "{label}"
    );
}

/// A client error whose text carries the URL, as reqwest's does.
#[derive(Debug)]
struct UrlError(&'static str, Option<Box<UrlError>>);
impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for UrlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.1.as_deref().map(|e| e as _)
    }
}

#[test]
fn transport_errors_never_carry_a_credential() {
    let err: BoxError = Box::new(UrlError(
        "error sending request for url (https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent?key=AIzaSECRET1)",
        Some(Box::new(UrlError("client error (Connect): Authorization: Bearer sk-SECRET2", None))),
    ));
    let wrapped = AiError::transport(err);
    let mut text = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*wrapped);
    while let Some(e) = cur {
        text.push_str(&e.to_string());
        text.push('\n');
        cur = e.source();
    }
    assert!(!text.contains("SECRET"), "{text}");
    assert!(text.contains(&format!("?key={REDACTED}")), "{text}");
    assert!(text.contains("generateContent"), "the rest is kept: {text}");
    let ai = AiError::find(&*wrapped).unwrap();
    assert!(matches!(ai, AiError::Transport { .. }));
    assert_eq!(ai.kind(), ErrorKind::Connection, "judged before redaction");
    // An error with nothing to hide is kept as it is (for downcasting).
    let io: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
    let wrapped = AiError::transport(io);
    let Some(AiError::Transport { source, .. }) = wrapped.downcast_ref::<AiError>() else {
        panic!()
    };
    assert!(source.is::<std::io::Error>());
}

#[test]
fn redaction_covers_each_credential_form() {
    let cases = [
        ("https://x/y?key=abc", "https://x/y?key=[REDACTED]"),
        (
            "https://x/y?a=1&KEY=abc&b=2",
            "https://x/y?a=1&KEY=[REDACTED]&b=2",
        ),
        (
            "https://x/openai?api-key=abc)",
            "https://x/openai?api-key=[REDACTED])",
        ),
        ("u?api_key=abc#f", "u?api_key=[REDACTED]#f"),
        (
            "u?access_token=ya29.abc def",
            "u?access_token=[REDACTED] def",
        ),
        (
            "authorization: bearer  sk-1",
            "authorization: bearer  [REDACTED]",
        ),
        ("Bearer [REDACTED]", "Bearer [REDACTED]"),
        ("?key=[REDACTED]", "?key=[REDACTED]"),
        (
            "no secret here, key: value, monkey=1, ?keys=2",
            "no secret here, key: value, monkey=1, ?keys=2",
        ),
        ("?key=", "?key="),
        ("unbearer x", "unbearer x"),
    ];
    for (input, want) in cases {
        assert_eq!(redact_secrets(input), want, "{input}");
    }
    // Never panics, whatever the text (multi-byte characters next to the markers).
    for s in [
        "?key=é",
        "bearer é",
        "é?key",
        "Bé",
        "?",
        "&key=😀&",
        "bearer",
    ] {
        let _ = redact_secrets(s);
    }
}
