//! The types other layers hold must be Send/Sync/Clone as documented.

use bytes::Bytes;
use http_body_util::Full;
use tower_ai_sim::{ResponseFuture, SimBody, SimServer, SimService, Simulator};
use tower_service::Service;

fn send_sync_static<T: Send + Sync + 'static>() {}
fn send_static<T: Send + 'static>() {}
fn unpin<T: Unpin>() {}

#[test]
fn auto_traits() {
    send_sync_static::<Simulator>();
    send_sync_static::<SimService>();
    send_sync_static::<SimBody>();
    send_sync_static::<SimServer>();
    send_static::<ResponseFuture>();
    unpin::<SimBody>();
}

#[test]
fn service_bounds() {
    fn is_service<S>(_: &S)
    where
        S: Service<http::Request<Full<Bytes>>, Response = http::Response<SimBody>> + Clone,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        S::Future: Send + 'static,
    {
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let sim = Simulator::new(Default::default());
    is_service(&sim.service());
}
