//! A scripted provider for the integration tests: answers by model, records every call.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer};
use tower_ai_core::{model_of, AiBody, BoxError, ClassifiedBody, ClassifyLayer, ReplayBody};
use tower_ai_fallback::AttemptBudget;

pub type ResBody = ClassifiedBody<Full<Bytes>>;
pub type Svc = BoxCloneSyncService<Request<AiBody>, Response<ResBody>, BoxError>;

/// One call that reached the provider.
#[derive(Debug, Clone)]
pub struct Seen {
    pub model: Option<String>,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub budget_remaining: Option<u32>,
}

/// What the provider answers for a model.
#[derive(Clone)]
pub enum Answer {
    Status(u16, &'static str, Vec<(&'static str, &'static str)>),
    Fail(Arc<dyn Fn() -> BoxError + Send + Sync>),
}

pub fn ok() -> Answer {
    Answer::Status(200, r#"{"ok":true}"#, vec![])
}
pub fn status(code: u16, body: &'static str) -> Answer {
    Answer::Status(code, body, vec![])
}
pub fn fail(f: impl Fn() -> BoxError + Send + Sync + 'static) -> Answer {
    Answer::Fail(Arc::new(f))
}

#[derive(Clone, Default)]
pub struct Provider {
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Provider {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn answer(&self, model: &str, a: Answer) -> &Self {
        self.answers.lock().unwrap().insert(model.to_owned(), a);
        self
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn models_called(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .map(|s| s.model.unwrap_or_default())
            .collect()
    }

    /// The provider behind `Classify`, boxed.
    pub fn service(&self) -> Svc {
        let this = self.clone();
        let raw = service_fn(move |req: Request<AiBody>| {
            let this = this.clone();
            async move {
                let model = model_of(&req).map(|m| m.into_owned());
                this.seen.lock().unwrap().push(Seen {
                    model: model.clone(),
                    path: req.uri().path().to_owned(),
                    headers: req.headers().clone(),
                    body: Bytes::copy_from_slice(req.body().bytes().unwrap_or_default()),
                    budget_remaining: AttemptBudget::of(&req).map(AttemptBudget::remaining),
                });
                let answer = this
                    .answers
                    .lock()
                    .unwrap()
                    .get(model.as_deref().unwrap_or(""))
                    .cloned()
                    .unwrap_or_else(ok);
                match answer {
                    Answer::Status(code, body, headers) => {
                        let mut res = Response::builder().status(code);
                        for (k, v) in headers {
                            res = res.header(k, v);
                        }
                        Ok::<_, BoxError>(res.body(Full::new(Bytes::from_static(body.as_bytes())))?)
                    }
                    Answer::Fail(f) => Err(f()),
                }
            }
        });
        BoxCloneSyncService::new(ClassifyLayer::new().layer(raw))
    }
}

pub const OPENAI_URL: &str = "https://api.openai.com/v1/chat/completions";

pub fn chat(model: &str) -> Request<AiBody> {
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"Hello, \"model\": world"}}],"max_tokens":64,"temperature":0.70}}"#
    );
    Request::post(OPENAI_URL)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .body(AiBody::from(body))
        .unwrap()
}

pub const OVERLOADED: &str = r#"{"error":{"message":"The server is overloaded","type":"service_unavailable_error","param":null,"code":"server_is_overloaded"}}"#;
pub const QUOTA: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
pub const CONTEXT: &str = r#"{"error":{"message":"This model's maximum context length is 4097 tokens. However, your messages resulted in 4294 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
pub const FILTERED: &str = r#"{"error":{"message":"The response was filtered due to the prompt triggering content management policy.","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"hate":{"filtered":true,"severity":"high"}}}}}"#;
pub const UNAUTHORIZED: &str = r#"{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
pub const SERVER: &str = r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#;
