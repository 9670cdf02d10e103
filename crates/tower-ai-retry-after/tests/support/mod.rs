//! What the RetryAfterAware tests share: a chat request for a model, a response with
//! headers, and the layer over a `tower_test` mock.
#![allow(dead_code, unreachable_pub)]

use http::{Request, Response};
use tower::ServiceBuilder;
use tower_ai_retry_after::{RetryAfterAware, RetryAfterAwareLayer};
use tower_test::mock;

pub type Mock = mock::Mock<Request<String>, Response<String>>;
pub type Handle = mock::Handle<Request<String>, Response<String>>;

/// An OpenAI chat request for `model`.
pub fn request(model: &str) -> Request<String> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .body(format!(r#"{{"model":"{model}","messages":[]}}"#))
        .unwrap()
}

/// A response with `status` and `headers`, and an empty JSON body.
pub fn resp(status: u16, headers: &[(&str, &str)]) -> Response<String> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body("{}".to_owned()).unwrap()
}

/// `layer` over a fresh mock provider.
pub fn stack(layer: &RetryAfterAwareLayer) -> (RetryAfterAware<Mock>, Handle) {
    let (svc, handle) = mock::pair::<Request<String>, Response<String>>();
    (
        ServiceBuilder::new().layer(layer.clone()).service(svc),
        handle,
    )
}
