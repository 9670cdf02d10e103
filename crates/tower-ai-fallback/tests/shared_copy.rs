//! ModelFallback and AiRetry below it keep one copy of a request's head between them
//! (ModelFallback offers its copy's head; AiRetry shares it when the request it gets has
//! exactly that head). Whatever is shared, every attempt must send what it would send
//! with a copy of its own: these tests fail if a retry replays the wrong request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_ai_core::{
    AiBody, AttemptBudget, BoxError, ClassifiedBody, ClassifyLayer, Deadline, DeadlineLayer,
    ReplayBody, RequestMeta,
};
use tower_ai_fallback::{FallbackChain, ModelFallbackLayer, Route};
use tower_ai_retry::AiRetryLayer;

type ResBody = ClassifiedBody<Full<Bytes>>;

/// A caller's own extension, to be carried by every attempt.
#[derive(Clone, Debug, PartialEq)]
struct Tag(u32);

/// What the provider saw of one attempt.
#[derive(Debug, Clone)]
struct Seen {
    method: http::Method,
    uri: String,
    /// Every header but the retry count, in order, with its sensitive flag.
    headers: Vec<(String, Vec<u8>, bool)>,
    attempt: Option<String>,
    body: Vec<u8>,
    extensions: usize,
    deadline: Option<Deadline>,
    budget_left: Option<u32>,
    meta_model: Option<String>,
    tag: Option<Tag>,
}

fn seen(r: &Request<AiBody>) -> Seen {
    Seen {
        method: r.method().clone(),
        uri: r.uri().to_string(),
        headers: r
            .headers()
            .iter()
            .filter(|(n, _)| n.as_str() != "x-stainless-retry-count")
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec(), v.is_sensitive()))
            .collect(),
        attempt: r
            .headers()
            .get("x-stainless-retry-count")
            .map(|v| v.to_str().unwrap().to_owned()),
        body: r.body().bytes().unwrap().to_vec(),
        extensions: r.extensions().len(),
        deadline: Deadline::of(r),
        budget_left: AttemptBudget::of(r).map(AttemptBudget::remaining),
        meta_model: RequestMeta::stored(r).and_then(|m| m.model().map(str::to_owned)),
        tag: r.extensions().get::<Tag>().cloned(),
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A provider that answers each call with the next status of `statuses` (200 after
/// them), and records what it was sent.
fn provider(
    log: &Log,
    statuses: &[u16],
) -> impl tower::Service<
    Request<AiBody>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future: Send,
> + Clone
       + Send {
    let log = log.clone();
    let statuses: Arc<[u16]> = statuses.into();
    service_fn(move |r: Request<AiBody>| {
        let n = {
            let mut l = log.lock().unwrap();
            l.push(seen(&r));
            l.len() - 1
        };
        let status = statuses.get(n).copied().unwrap_or(200);
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::new()))?,
            )
        }
    })
}

fn retry() -> AiRetryLayer {
    AiRetryLayer::builder()
        .max_attempts(3)
        .budget(Duration::from_secs(10), 100, 1.0)
        .build()
        .unwrap()
}

fn two_models() -> FallbackChain<AiBody, ResBody> {
    FallbackChain::builder()
        .route(Route::primary("a"))
        .route(Route::model("b"))
        .build()
        .unwrap()
}

fn request() -> Request<AiBody> {
    let mut auth = HeaderValue::from_static("Bearer sk-proj-0123456789abcdef");
    auth.set_sensitive(true);
    Request::post("https://api.openai.com/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", auth)
        .header("x-trace", "1")
        .header("x-trace", "2")
        .body(AiBody::from(r#"{"model":"a","messages":[]}"#))
        .unwrap()
}

/// `retry` is `first` sent again by AiRetry: the same in everything but the retry count.
fn assert_same_attempt(first: &Seen, retry: &Seen, n: &str) {
    assert_eq!(retry.method, first.method);
    assert_eq!(retry.uri, first.uri);
    assert_eq!(
        retry.headers, first.headers,
        "headers, idempotency key included"
    );
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.extensions, first.extensions);
    assert_eq!(retry.deadline, first.deadline);
    assert_eq!(retry.meta_model, first.meta_model);
    assert_eq!(retry.tag, first.tag);
    assert!(retry.budget_left.is_some(), "the same attempt budget");
    assert_eq!(retry.attempt.as_deref(), Some(n));
}

/// A change a layer makes to a request.
type Change = fn(&mut Request<AiBody>);

#[tokio::test(start_paused = true)]
async fn a_layer_between_that_changes_the_request_is_what_the_retry_sends() {
    // Each change is made between ModelFallback (which keeps and offers the caller's
    // request) and AiRetry: AiRetry's retry must send the changed request, not the one
    // ModelFallback kept.
    let changes: [(&str, Change); 6] = [
        ("a header's value", |r| {
            r.headers_mut()
                .insert("x-trace", HeaderValue::from_static("changed"));
        }),
        ("a header added", |r| {
            r.headers_mut()
                .insert("x-added", HeaderValue::from_static("1"));
        }),
        ("a header's sensitive flag", |r| {
            let mut v = r.headers()["authorization"].clone();
            v.set_sensitive(false);
            r.headers_mut().insert("authorization", v);
        }),
        ("the body", |r| {
            *r.body_mut() = AiBody::from(r#"{"model":"a","messages":[],"user":"u"}"#);
        }),
        ("the URI's host case", |r| {
            *r.uri_mut() = "https://API.openai.com/v1/chat/completions"
                .parse()
                .unwrap();
        }),
        ("the method", |r| *r.method_mut() = http::Method::PUT),
    ];
    for (what, change) in changes {
        let log = Log::default();
        let svc = ServiceBuilder::new()
            .layer(ModelFallbackLayer::new(two_models()))
            .map_request(move |mut r: Request<AiBody>| {
                change(&mut r);
                r
            })
            .layer(retry())
            .layer(ClassifyLayer::new())
            .service(provider(&log, &[503]));
        let res = svc.oneshot(request()).await.unwrap();
        assert_eq!(res.status(), 200, "{what}");
        let calls = log.lock().unwrap().clone();
        assert_eq!(calls.len(), 2, "{what}: a first attempt and a retry");
        assert_same_attempt(&calls[0], &calls[1], "1");
        // And the first attempt was the changed request.
        let mut want = request();
        change(&mut want);
        let want = seen(&want);
        assert_eq!(calls[0].method, want.method, "{what}");
        assert_eq!(calls[0].uri, want.uri, "{what}");
        assert_eq!(calls[0].body, want.body, "{what}");
        let without_key: Vec<_> = calls[0]
            .headers
            .iter()
            .filter(|(n, _, _)| n != "idempotency-key")
            .cloned()
            .collect();
        assert_eq!(without_key, want.headers, "{what}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_on_the_second_route_sends_its_rewritten_body() {
    // Route "a" fails twice over (AiRetry retries it once, of 2 attempts), then route "b"
    // (the body's model rewritten) fails once and its retry answers.
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer(ModelFallbackLayer::new(two_models()))
        .layer(
            AiRetryLayer::builder()
                .max_attempts(2)
                .budget(Duration::from_secs(10), 100, 1.0)
                .build()
                .unwrap(),
        )
        .layer(ClassifyLayer::new())
        .service(provider(&log, &[503, 503, 500]));
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), 200);
    let calls = log.lock().unwrap().clone();
    assert_eq!(calls.len(), 4);
    let model = |s: &Seen| -> String {
        let v: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
        v["model"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        calls.iter().map(model).collect::<Vec<_>>(),
        ["a", "a", "b", "b"]
    );
    assert_same_attempt(&calls[0], &calls[1], "1");
    assert_same_attempt(&calls[2], &calls[3], "1");
    assert_eq!(calls[3].body, br#"{"model":"b","messages":[]}"#);
    // The second route's request is the caller's, rewritten: the same head (its own
    // idempotency key: AiRetry draws one per call).
    let head = |s: &Seen| -> Vec<_> {
        s.headers
            .iter()
            .filter(|(n, _, _)| n != "idempotency-key")
            .cloned()
            .collect()
    };
    assert_eq!(head(&calls[2]), head(&calls[0]));
    assert_eq!(calls[2].uri, calls[0].uri);
    assert_eq!(calls[2].attempt.as_deref(), Some("0"));
}

#[tokio::test(start_paused = true)]
async fn a_retry_keeps_every_extension_and_header() {
    // Deadline (DeadlineLayer's slot), the chain's attempt budget, the parsed meta and a
    // caller's own extension; a sensitive header and a repeated one.
    for with_tag in [false, true] {
        let log = Log::default();
        let svc = ServiceBuilder::new()
            .layer(DeadlineLayer::new(Duration::from_secs(60)))
            .map_request(|mut r: Request<AiBody>| {
                RequestMeta::get_or_insert(&mut r);
                r
            })
            .layer(ModelFallbackLayer::new(two_models()))
            .layer(retry())
            .layer(ClassifyLayer::new())
            .service(provider(&log, &[500, 429]));
        let mut req = request();
        if with_tag {
            req.extensions_mut().insert(Tag(7));
        }
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let calls = log.lock().unwrap().clone();
        assert_eq!(calls.len(), 3);
        let first = &calls[0];
        assert!(first.deadline.is_some());
        assert_eq!(first.meta_model.as_deref(), Some("a"));
        assert_eq!(first.tag, with_tag.then_some(Tag(7)));
        assert!(first
            .headers
            .iter()
            .any(|(n, _, sensitive)| n == "authorization" && *sensitive));
        assert!(first.headers.iter().any(|(n, _, _)| n == "idempotency-key"));
        assert_same_attempt(first, &calls[1], "1");
        assert_same_attempt(first, &calls[2], "2");
        // Three attempts paid from the chain's budget of 4 (2 routes + 2).
        assert_eq!(calls[2].budget_left, Some(1));
    }
}
