//! DeadlineLayer on a paused clock, against a tower-test mock.

use std::time::Duration;

use http::Request;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_ai_core::{Deadline, DeadlineLayer};
use tower_test::mock;

/// Sends `req` through a `DeadlineLayer::new(layer)` and returns the deadline the inner
/// service saw, as time left.
async fn seen(layer: Duration, req: Request<()>) -> Option<Duration> {
    let (inner, mut handle) = mock::pair::<Request<()>, ()>();
    let svc = DeadlineLayer::new(layer).layer(inner);
    let call = tokio::spawn(svc.oneshot(req));
    let (got, send) = handle.next_request().await.expect("a request");
    send.send_response(());
    call.await.unwrap().unwrap();
    Deadline::of(&got).map(|d| d.instant() - Instant::now())
}

type Headers<'a> = &'a [(&'a str, &'a [u8])];

fn req(headers: Headers<'_>) -> Request<()> {
    let mut b = Request::post("/v1/chat/completions");
    for (k, v) in headers {
        b = b.header(*k, http::HeaderValue::from_bytes(v).unwrap());
    }
    b.body(()).unwrap()
}

const TEN_MIN: Duration = Duration::from_secs(600);

#[tokio::test(start_paused = true)]
async fn a_request_without_one_gets_the_layers_deadline() {
    assert_eq!(seen(TEN_MIN, req(&[])).await, Some(TEN_MIN));
}

#[tokio::test(start_paused = true)]
async fn the_earlier_of_the_callers_and_the_layers_is_kept() {
    let mut r = req(&[]);
    Deadline::set(&mut r, Deadline::after(Duration::from_secs(5)));
    assert_eq!(seen(TEN_MIN, r).await, Some(Duration::from_secs(5)));

    let mut r = req(&[]);
    Deadline::set(&mut r, Deadline::after(Duration::from_secs(3600)));
    assert_eq!(seen(TEN_MIN, r).await, Some(TEN_MIN));
}

#[tokio::test(start_paused = true)]
async fn timeout_headers_shorten_it_and_never_lengthen_it() {
    let cases: &[(Headers<'_>, Duration)] = &[
        (&[("grpc-timeout", b"20S")], Duration::from_secs(20)),
        (&[("grpc-timeout", b"1500m")], Duration::from_millis(1500)),
        (&[("grpc-timeout", b"2H")], TEN_MIN),
        (&[("x-stainless-timeout", b"30")], Duration::from_secs(30)),
        (
            &[("x-stainless-read-timeout", b"45.5")],
            Duration::from_millis(45_500),
        ),
        (
            &[("x-stainless-timeout", b"30"), ("grpc-timeout", b"10S")],
            Duration::from_secs(10),
        ),
        // Garbage is ignored: the layer's own deadline applies.
        (&[("grpc-timeout", b"10 S")], TEN_MIN),
        (&[("grpc-timeout", b"123456789S")], TEN_MIN),
        (&[("x-stainless-timeout", b"-5")], TEN_MIN),
        (&[("x-stainless-timeout", b"NaN")], TEN_MIN),
        (&[("x-stainless-timeout", b"\xff")], TEN_MIN),
    ];
    for (headers, want) in cases {
        assert_eq!(
            seen(TEN_MIN, req(headers)).await,
            Some(*want),
            "{headers:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn absurd_layer_timeouts_do_not_panic() {
    let left = seen(Duration::MAX, req(&[])).await.unwrap();
    assert!(left > Duration::from_secs(86_400 * 365));
    let left = seen(Duration::MAX, req(&[("grpc-timeout", b"99999999H")]))
        .await
        .unwrap();
    assert_eq!(left, tower_ai_core::MAX_HEADER_TIMEOUT);
    assert_eq!(seen(Duration::ZERO, req(&[])).await, Some(Duration::ZERO));
}
