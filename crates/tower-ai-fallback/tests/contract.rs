//! Tower contract: honest readiness, the ready instance used by `call`, later attempts
//! made ready again, nothing sent before its time; auto traits.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};
use tower_ai_core::{AiBody, BoxError, ClassifiedBody};
use tower_ai_fallback::{FallbackChain, ModelFallback, ModelFallbackLayer, Route, Served};
use tower_test::mock;

type Res = Response<Bytes>;

fn chain() -> FallbackChain<AiBody, Bytes> {
    FallbackChain::builder()
        .route(Route::primary("a"))
        .route(Route::model("b"))
        .build()
        .unwrap()
}

fn status(code: u16) -> Res {
    Response::builder().status(code).body(Bytes::new()).unwrap()
}

fn req() -> Request<AiBody> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .body(AiBody::from(r#"{"model":"a","messages":[]}"#))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn readiness_and_later_attempts_go_through_the_inner_service() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<Request<AiBody>, Res, _>(ModelFallbackLayer::new(chain()));
    handle.allow(0);
    assert_pending!(svc.poll_ready(), "not ready while the inner service is not");
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(req()));
    assert_pending!(fut.poll());
    let (first, send) = handle.next_request().await.unwrap();
    assert_eq!(tower_ai_core::model_of(&first).unwrap(), "a");
    send.send_response(status(503));
    // The second attempt needs the inner service ready again.
    assert_pending!(fut.poll());
    assert!(
        handle.poll_request().is_pending(),
        "no second call without readiness"
    );
    handle.allow(1);
    assert_pending!(fut.poll());
    let (second, send) = handle.next_request().await.unwrap();
    assert_eq!(tower_ai_core::model_of(&second).unwrap(), "b");
    assert_pending!(fut.poll());
    send.send_response(status(200));
    let res = assert_ready!(fut.poll()).unwrap();
    assert_eq!(&*Served::get(&res).unwrap().route, "b");
}

#[tokio::test(start_paused = true)]
async fn a_success_is_passed_through_untouched() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<Request<AiBody>, Res, _>(ModelFallbackLayer::new(chain()));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(req()));
    assert_pending!(fut.poll());
    let (_, send) = handle.next_request().await.unwrap();
    let mut res = status(200);
    res.headers_mut().insert("x-upstream", "1".parse().unwrap());
    send.send_response(res);
    let res = assert_ready!(fut.poll()).unwrap();
    assert_eq!(res.headers()["x-upstream"], "1");
    assert!(
        res.extensions().is_empty(),
        "nothing added when the first route serves"
    );
    assert!(handle.poll_request().is_pending(), "one call only");
}

/// An inner service that, like `ConcurrencyLimit`, does not copy readiness into clones
/// and panics when called unready.
#[derive(Debug)]
struct Probe {
    ready: bool,
}

impl Clone for Probe {
    fn clone(&self) -> Self {
        Probe { ready: false }
    }
}

impl Service<Request<AiBody>> for Probe {
    type Response = Res;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Res, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.ready = true;
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<AiBody>) -> Self::Future {
        assert!(self.ready, "Service::call invoked without prior poll_ready");
        self.ready = false;
        let model = tower_ai_core::model_of(&req).unwrap().into_owned();
        std::future::ready(Ok(status(if model == "a" { 529 } else { 200 })))
    }
}

#[tokio::test]
async fn calls_only_ready_instances() {
    use tower::ServiceExt;
    let mut svc = ModelFallbackLayer::new(chain()).layer(Probe { ready: false });
    for _ in 0..3 {
        let res = svc.ready().await.unwrap().call(req()).await.unwrap();
        assert_eq!(res.status(), 200);
    }
}

#[test]
fn auto_traits() {
    fn send_sync_static<T: Send + Sync + 'static>() {}
    fn send<T: Send>() {}
    type Inner = BoxCloneSyncService<Request<AiBody>, Response<ClassifiedBody<Bytes>>, BoxError>;
    type Svc = ModelFallback<Inner, AiBody, ClassifiedBody<Bytes>>;
    send_sync_static::<Svc>();
    send_sync_static::<ModelFallbackLayer<AiBody, ClassifiedBody<Bytes>>>();
    send::<<Svc as Service<Request<AiBody>>>::Future>();
    send_sync_static::<tower_ai_fallback::AttemptBudget>();
    send_sync_static::<Served>();
}
