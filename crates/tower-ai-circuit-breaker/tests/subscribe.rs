//! Run-time subscribers to a layer's state changes (`CircuitBreakerHandle::subscribe`):
//! several at once, alongside the builder's listener, each from the moment it subscribed,
//! a slow one told how many it missed.

use std::sync::{Arc, Mutex};

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tower_ai_circuit_breaker::{
    CircuitBreakerLayer, CircuitEvent, CircuitState, SUBSCRIBER_CAPACITY,
};
use tower_ai_core::keys::Key;

fn change(e: CircuitEvent) -> (CircuitState, CircuitState) {
    match e {
        CircuitEvent::StateChanged { from, to, .. } => (from, to),
        other => panic!("not a state change: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn every_subscriber_and_the_listener_see_each_change_from_when_they_subscribed() {
    let seen = Arc::new(Mutex::new(0));
    let counted = seen.clone();
    let layer = CircuitBreakerLayer::builder()
        .listener(move |e: &CircuitEvent| {
            if matches!(e, CircuitEvent::StateChanged { .. }) {
                *counted.lock().unwrap() += 1;
            }
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let key = Key::of("api.openai.com/gpt-4o");
    // Before anyone subscribes: nobody but the listener hears it.
    handle.force_open(key);
    let mut early = handle.subscribe();
    let mut other = handle.clone().subscribe();
    handle.reset(key);
    let mut late = handle.subscribe();
    handle.force_closed(key);

    for rx in [&mut early, &mut other] {
        assert_eq!(
            change(rx.recv().await.unwrap()),
            (CircuitState::ForcedOpen, CircuitState::Closed)
        );
        assert_eq!(
            change(rx.recv().await.unwrap()),
            (CircuitState::Closed, CircuitState::ForcedClosed)
        );
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
    }
    assert_eq!(
        change(late.recv().await.unwrap()),
        (CircuitState::Closed, CircuitState::ForcedClosed)
    );
    assert_eq!(*seen.lock().unwrap(), 3);
    // A dropped subscriber costs the others nothing.
    drop(other);
    handle.reset(key);
    assert!(early.try_recv().is_ok() && late.try_recv().is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_subscriber_that_falls_behind_is_told_how_many_it_missed_and_goes_on() {
    let layer = CircuitBreakerLayer::new();
    let handle = layer.handle();
    let mut rx = handle.subscribe();
    let key = Key::of("api.anthropic.com/claude");
    let changes = SUBSCRIBER_CAPACITY + 10;
    for i in 0..changes {
        if i % 2 == 0 {
            handle.force_open(key);
        } else {
            handle.reset(key);
        }
    }
    assert_eq!(rx.recv().await.unwrap_err(), RecvError::Lagged(10));
    let mut rest = 0;
    while rx.try_recv().is_ok() {
        rest += 1;
    }
    assert_eq!(rest, SUBSCRIBER_CAPACITY);
}
