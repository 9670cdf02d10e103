//! A scripted provider: each request says (in headers) what it gets back and how late.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use tower::{service_fn, Service, ServiceExt};
use tower_ai_circuit_breaker::{
    CircuitBreaker, CircuitBreakerLayer, CircuitEvent, CircuitState, TransitionReason,
};
use tower_ai_core::{AiError, BoxError};
use tower_layer::Layer;

pub type Inner = tower::util::BoxCloneSyncService<Request<String>, Response<String>, BoxError>;

/// What the provider does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Do {
    Status(u16),
    /// Answer `status` after `ms` milliseconds.
    Late(u16, u64),
    /// A connection reset, as a client error.
    Reset,
}

pub const OK: Do = Do::Status(200);
pub const FAIL: Do = Do::Status(500);
pub const LIMITED: Do = Do::Status(429);

pub fn req(model: &str, what: Do) -> Request<String> {
    let (status, ms) = match what {
        Do::Status(s) => (s, 0),
        Do::Late(s, ms) => (s, ms),
        Do::Reset => (0, 0),
    };
    Request::post("https://api.openai.com/v1/chat/completions")
        .header("x-status", status)
        .header("x-delay-ms", ms)
        .body(format!(r#"{{"model":"{model}","messages":[]}}"#))
        .unwrap()
}

/// The provider, and the number of calls that reached it.
pub fn provider() -> (Inner, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let svc = service_fn(move |r: Request<String>| {
        h.fetch_add(1, Ordering::SeqCst);
        let num = |name: &str| -> u64 { r.headers()[name].to_str().unwrap().parse().unwrap() };
        let (status, ms) = (num("x-status"), num("x-delay-ms"));
        async move {
            if ms > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if status == 0 {
                let e = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
                return Err(Box::new(e) as BoxError);
            }
            Ok(Response::builder()
                .status(status as u16)
                .body(String::new())?)
        }
    });
    (Inner::new(svc), hits)
}

pub struct Rig {
    pub svc: CircuitBreaker<Inner>,
    pub hits: Arc<AtomicUsize>,
    pub events: Arc<Mutex<Vec<(CircuitState, CircuitState)>>>,
    pub reasons: Arc<Mutex<Vec<TransitionReason>>>,
    pub handle: tower_ai_circuit_breaker::CircuitBreakerHandle,
}

/// A rig from a builder (the listener is set here).
pub fn rig(b: tower_ai_circuit_breaker::CircuitBreakerBuilder) -> Rig {
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let reasons = Arc::new(Mutex::new(Vec::new()));
    let rs = reasons.clone();
    let layer: CircuitBreakerLayer<_, _> = b
        .listener(move |e: &CircuitEvent| {
            if let CircuitEvent::StateChanged {
                from, to, reason, ..
            } = e
            {
                ev.lock().unwrap().push((*from, *to));
                rs.lock().unwrap().push(*reason);
            }
        })
        .build()
        .unwrap();
    let (inner, hits) = provider();
    let handle = layer.handle();
    Rig {
        svc: layer.layer(inner),
        hits,
        events,
        reasons,
        handle,
    }
}

/// The outcome of one call as the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    Status(u16),
    Open,
    Error,
}

impl Rig {
    pub async fn call(&self, model: &str, what: Do) -> Got {
        match self.svc.clone().oneshot(req(model, what)).await {
            Ok(r) => Got::Status(r.status().as_u16()),
            Err(e) => match e.downcast_ref::<AiError>() {
                Some(AiError::CircuitOpen { .. }) => Got::Open,
                _ => Got::Error,
            },
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn state(&self, model: &str) -> CircuitState {
        self.handle.state_for(&req(model, OK))
    }

    pub fn reasons(&self) -> Vec<TransitionReason> {
        self.reasons.lock().unwrap().clone()
    }

    pub fn transitions(&self) -> Vec<(CircuitState, CircuitState)> {
        self.events.lock().unwrap().clone()
    }
}

/// Keeps `Service` in scope for callers.
pub fn ready<S: Service<R>, R>(s: &mut S) -> tower::util::Ready<'_, S, R> {
    s.ready()
}
