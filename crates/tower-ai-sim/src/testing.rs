//! Helpers for testing stacks frame by frame: a response body the test feeds itself.
//!
//! The simulator scripts whole provider behaviours; some tests need to hold a body at an
//! exact byte (a chunk now, nothing for 30 s, then an error) and look at what a layer did
//! in between. [`body_channel`] gives a body and the handle that feeds it.
//!
//! ```
//! use http_body_util::BodyExt;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (tx, body) = tower_ai_sim::testing::body_channel();
//! let sent = tx.send("data: {}\n\n");
//! drop(tx); // ends the body
//! assert_eq!(body.collect().await.unwrap().to_bytes(), sent);
//! # }
//! ```

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use tokio::sync::mpsc;

use crate::BoxError;

type Item = Result<Frame<Bytes>, BoxError>;

/// A body and the handle that feeds it. The body ends when every sender is dropped.
pub fn body_channel() -> (BodySender, ChannelBody) {
    let (tx, rx) = mpsc::unbounded_channel();
    (BodySender(tx), ChannelBody(rx))
}

/// A response body whose frames come from a [`BodySender`].
#[derive(Debug)]
pub struct ChannelBody(mpsc::UnboundedReceiver<Item>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.0.poll_recv(cx)
    }
}

/// Feeds a [`ChannelBody`]. Sending to a body that was dropped is silently ignored.
#[derive(Debug, Clone)]
pub struct BodySender(mpsc::UnboundedSender<Item>);

impl BodySender {
    /// Sends one data frame; returns the `Bytes` sent, so a test can check that a layer
    /// passed this very buffer on (`Bytes::as_ptr`) rather than a copy.
    pub fn send(&self, data: impl AsRef<[u8]>) -> Bytes {
        let bytes = Bytes::copy_from_slice(data.as_ref());
        let _ = self.0.send(Ok(Frame::data(bytes.clone())));
        bytes
    }

    /// Sends a trailers frame.
    pub fn send_trailers(&self, trailers: HeaderMap) {
        let _ = self.0.send(Ok(Frame::trailers(trailers)));
    }

    /// Fails the body with `err`.
    pub fn fail(&self, err: impl Into<BoxError>) {
        let _ = self.0.send(Err(err.into()));
    }
}
