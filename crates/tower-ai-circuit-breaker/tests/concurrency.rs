//! Many tasks on a multi-thread runtime through one breaker in half-open: exactly the
//! configured number of probes get through.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tokio::sync::{Barrier, Semaphore};
use tower::{service_fn, Layer, ServiceExt};
use tower_ai_circuit_breaker::{CircuitBreakerLayer, CircuitState};
use tower_ai_core::AiError;

const TASKS: usize = 64;
const PROBES: u32 = 3;

fn req(status: u16) -> Request<String> {
    Request::post("https://api.openai.com/v1/chat/completions")
        .header("x-status", status)
        .body(r#"{"model":"m"}"#.to_owned())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_admits_exactly_the_configured_probes() {
    let hits = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (h, g) = (hits.clone(), gate.clone());
    // A concrete error type: with `BoxError` as the closure's error, rustc cannot prove the
    // spawned task `Send` (rust-lang/rust#64552, a `dyn Error + '_` in the task's witness).
    let inner = service_fn(move |r: Request<String>| {
        let status: u16 = r.headers()["x-status"].to_str().unwrap().parse().unwrap();
        let (h, g) = (h.clone(), g.clone());
        async move {
            if status == 200 {
                h.fetch_add(1, Ordering::SeqCst);
                // a probe holds its permit until the test lets it finish
                g.acquire().await.unwrap().forget();
            }
            Ok::<_, std::io::Error>(
                Response::builder()
                    .status(status)
                    .body(String::new())
                    .unwrap(),
            )
        }
    });
    // An open duration of 1 ns: the breaker is due to probe as soon as it opens, so the
    // test needs no clock at all.
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_duration(Duration::from_nanos(1))
        .half_open_probes(PROBES)
        .half_open_successes(PROBES)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(inner);
    let key = handle.key_of(&req(200)).unwrap();

    for round in 0..20 {
        assert_eq!(svc.clone().oneshot(req(500)).await.unwrap().status(), 500);
        assert_eq!(handle.state(key), CircuitState::Open, "round {round}");
        hits.store(0, Ordering::SeqCst);
        let start = Arc::new(Barrier::new(TASKS));
        let rejected = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (svc, start, rejected) = (svc.clone(), start.clone(), rejected.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    let res = svc.oneshot(req(200)).await;
                    if let Err(e) = &res {
                        assert!(matches!(
                            e.downcast_ref::<AiError>(),
                            Some(AiError::CircuitOpen { .. })
                        ));
                        rejected.fetch_add(1, Ordering::SeqCst);
                    }
                    res.is_ok()
                })
            })
            .collect();
        // Every task but the probes is refused at once, and the admitted probes reach the
        // provider (an admitted task may not have been polled yet on another worker, so
        // wait for both; bounded, no sleeping). Admitted = TASKS - refused, so waiting for
        // the probes cannot hide an over-admission: the counts are checked exactly below.
        tokio::time::timeout(Duration::from_secs(10), async {
            while rejected.load(Ordering::SeqCst) < TASKS - PROBES as usize
                || hits.load(Ordering::SeqCst) < PROBES as usize
            {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("non-probes must be refused, not queued, and the probes must be sent");
        assert_eq!(
            rejected.load(Ordering::SeqCst),
            TASKS - PROBES as usize,
            "round {round}"
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            PROBES as usize,
            "round {round}"
        );
        assert_eq!(handle.state(key), CircuitState::HalfOpen);
        assert!(handle.is_open(key), "every permit is taken");
        gate.add_permits(PROBES as usize);
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap());
        }
        assert_eq!(ok, PROBES as usize, "round {round}");
        assert_eq!(rejected.load(Ordering::SeqCst), TASKS - PROBES as usize);
        assert_eq!(handle.state(key), CircuitState::Closed, "round {round}");
    }
}

/// Threads move from key to key (more keys than a thread's cache of lanes holds, and a
/// call of the last key still in flight), so each key's lanes are let go and made again
/// all the time: every call is counted all the same.
#[test]
fn no_call_is_lost_while_lanes_come_and_go() {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};
    use tower::Service;

    const THREADS: usize = 4;
    const KEYS: usize = 40;
    const ROUNDS: usize = 100;
    let layer = CircuitBreakerLayer::builder()
        .count_window(1_000_000)
        .build()
        .unwrap();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|_: Request<String>| async {
        Ok::<_, std::io::Error>(Response::new(String::new()))
    }));
    let model = |k: usize| -> Request<String> {
        Request::post("https://api.openai.com/v1/chat/completions")
            .body(format!(r#"{{"model":"m{k}"}}"#))
            .unwrap()
    };
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let mut svc = svc.clone();
            s.spawn(move || {
                let mut cx = Context::from_waker(Waker::noop());
                let mut pending: Option<Pin<Box<dyn Future<Output = _>>>> = None;
                for r in 0..ROUNDS {
                    for k in 0..KEYS {
                        assert!(svc.poll_ready(&mut cx).is_ready());
                        let fut = Box::pin(svc.call(model((k * 7 + t + r) % KEYS)));
                        // The previous call ends after this one started.
                        if let Some(mut p) = pending.replace(fut) {
                            assert!(matches!(p.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
                        }
                    }
                }
                if let Some(mut p) = pending {
                    assert!(matches!(p.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
                }
            });
        }
    });
    for k in 0..KEYS {
        let m = handle.metrics(handle.key_of(&model(k)).unwrap()).unwrap();
        assert_eq!(m.calls, (THREADS * ROUNDS) as u64, "m{k}");
        assert_eq!(m.state, CircuitState::Closed);
    }
}
