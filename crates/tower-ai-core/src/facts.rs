//! The stack's own per-call facts about a request ([`Deadline`], [`AttemptBudget`],
//! [`RequestMeta`]), kept in one slot of its extensions.
//!
//! Each value in an `http::Extensions` map is boxed: three facts in three slots cost three
//! allocations per call, one slot costs one. The layers write them through
//! [`Deadline::set`], [`AttemptBudget::attach`] and [`RequestMeta::get_or_insert`] and
//! read them through [`Deadline::of`], [`AttemptBudget::of`] and [`RequestMeta::stored`],
//! which also read (and, for a fact already there, update) a `Deadline`, an
//! `AttemptBudget` or a `RequestMeta` that a caller put into the extensions as a value of
//! its own: that one always wins.
//!
//! The slot also carries, when a layer above keeps a copy of the request to send again
//! (ModelFallback), that copy's head, offered to the layers below to share
//! ([`RetainedHead::offer`], [`RetainedRequest::share_offered`](crate::RetainedRequest::share_offered)).

use std::sync::Arc;

use http::Extensions;

use crate::attempt::AttemptBudget;
use crate::body::RetainedHead;
use crate::deadline::Deadline;
use crate::meta::RequestMeta;

/// The slot (private: only the accessors above name it).
#[derive(Clone, Debug, Default)]
pub(crate) struct Facts {
    pub(crate) deadline: Option<Deadline>,
    pub(crate) budget: Option<AttemptBudget>,
    pub(crate) meta: Option<RequestMeta>,
    /// The head of a copy of this request that a layer above keeps to send again, offered
    /// to the layers below to share (see [`RetainedHead::offer`]).
    pub(crate) head: Option<Arc<RetainedHead>>,
}

impl Facts {
    /// The request's slot, if a layer made one.
    #[inline]
    pub(crate) fn of(ext: &Extensions) -> Option<&Facts> {
        ext.get::<Facts>()
    }

    /// The request's slot when it is the request's only extension (the usual request in
    /// the stack): no value of the caller's can then take precedence, and one lookup
    /// answers.
    #[inline]
    pub(crate) fn alone(ext: &Extensions) -> Option<&Facts> {
        match ext.len() {
            1 => ext.get::<Facts>(),
            _ => None,
        }
    }

    /// [`alone`](Facts::alone), to change in place.
    #[inline]
    pub(crate) fn alone_mut(ext: &mut Extensions) -> Option<&mut Facts> {
        match ext.len() {
            1 => ext.get_mut::<Facts>(),
            _ => None,
        }
    }

    /// The request's slot, made (empty) when there is none yet.
    pub(crate) fn get_or_insert(ext: &mut Extensions) -> &mut Facts {
        ext.get_or_insert_default::<Facts>()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;
    use crate::{AiBody, DeadlineLayer, RetainedRequest};

    fn chat() -> http::Request<AiBody> {
        http::Request::post("https://api.openai.com/v1/chat/completions")
            .body(AiBody::from(r#"{"model":"gpt-4o","messages":[]}"#))
            .unwrap()
    }

    /// What DeadlineLayer hands on: the request it got, with its deadline.
    async fn through_deadline_layer(req: http::Request<AiBody>) -> http::Request<AiBody> {
        let svc = tower::ServiceBuilder::new()
            .layer(DeadlineLayer::new(Duration::from_secs(60)))
            .service_fn(|req: http::Request<AiBody>| async move {
                Ok::<_, std::convert::Infallible>(req)
            });
        svc.oneshot(req).await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_layers_facts_share_one_slot_and_read_back_through_each_type() {
        let mut req = through_deadline_layer(chat()).await;
        let deadline = Deadline::after(Duration::from_secs(60));
        assert_eq!(Deadline::of(&req), Some(deadline));
        assert_eq!(req.extensions().len(), 1, "one slot");
        assert!(req.extensions().get::<Deadline>().is_none());

        let budget = AttemptBudget::new(3);
        budget.attach(&mut req);
        assert!(RequestMeta::stored(&req).is_none());
        assert_eq!(RequestMeta::get_or_insert(&mut req).model(), Some("gpt-4o"));
        assert_eq!(req.extensions().len(), 1, "still one slot");
        assert!(AttemptBudget::of(&req).unwrap().try_acquire());
        assert_eq!(budget.remaining(), 2, "the same counter");
        assert_eq!(RequestMeta::stored(&req).unwrap().model(), Some("gpt-4o"));

        // Deadline::set only shortens, in the slot.
        let sooner = Deadline::after(Duration::from_secs(5));
        assert_eq!(
            Deadline::set(&mut req, Deadline::after(Duration::from_secs(90))),
            deadline
        );
        assert_eq!(Deadline::set(&mut req, sooner), sooner);
        assert_eq!(Deadline::of(&req), Some(sooner));
        assert_eq!(req.extensions().len(), 1);

        // A model rewrite updates the meta in place; a rewrite of the body drops it.
        RequestMeta::stored_mut(&mut req).unwrap().model = Some("gpt-4o-mini".into());
        assert_eq!(RequestMeta::of(&req).model(), Some("gpt-4o-mini"));

        // A retained copy keeps the slot beside itself and puts it back, budget shared.
        let kept = RetainedRequest::copy(&req).unwrap();
        assert_eq!(kept.deadline(), Some(sooner));
        for r in [kept.replay().unwrap(), kept.into_request()] {
            assert_eq!(r.extensions().len(), 1);
            assert_eq!(Deadline::of(&r), Some(sooner));
            assert_eq!(
                RequestMeta::stored(&r).unwrap().model(),
                Some("gpt-4o-mini")
            );
            assert!(AttemptBudget::of(&r).unwrap().try_acquire());
        }
        assert_eq!(budget.remaining(), 0);

        assert_eq!(
            RequestMeta::remove(&mut req).unwrap().model(),
            Some("gpt-4o-mini")
        );
        assert!(RequestMeta::stored(&req).is_none());
        assert_eq!(
            Deadline::of(&req),
            Some(sooner),
            "the rest of the slot stays"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_callers_own_values_come_first_and_are_updated_where_they_are() {
        // A caller's `Deadline`: the layer shortens it in place, adds no slot.
        let mut req = chat();
        let callers = Deadline::after(Duration::from_secs(600));
        req.extensions_mut().insert(callers);
        let req = through_deadline_layer(req).await;
        assert_eq!(req.extensions().len(), 1);
        assert_eq!(
            req.extensions().get::<Deadline>(),
            Some(&Deadline::after(Duration::from_secs(60)))
        );
        let mut req = through_deadline_layer({
            let mut r = chat();
            r.extensions_mut()
                .insert(Deadline::after(Duration::from_secs(10)));
            r
        })
        .await;
        assert_eq!(
            Deadline::of(&req),
            Some(Deadline::after(Duration::from_secs(10))),
            "an earlier caller's deadline stays"
        );

        // A caller's `RequestMeta` and `AttemptBudget` are read, not shadowed by the slot.
        let mut theirs = RequestMeta::of(&req).into_owned();
        theirs.model = Some("theirs".into());
        req.extensions_mut().insert(theirs);
        assert_eq!(RequestMeta::get_or_insert(&mut req).model(), Some("theirs"));
        let own = AttemptBudget::new(1);
        req.extensions_mut().insert(own.clone());
        let other = AttemptBudget::new(5);
        other.attach(&mut req);
        assert_eq!(AttemptBudget::of(&req).unwrap().remaining(), 5, "replaced");
        assert!(req.extensions().get::<Facts>().is_none());
        assert_eq!(
            RequestMeta::remove(&mut req).unwrap().model(),
            Some("theirs")
        );
        assert!(RequestMeta::stored(&req).is_none());

        // No slot and no deadline: Deadline::set puts a `Deadline` of its own.
        let mut bare = chat();
        Deadline::set(&mut bare, callers);
        assert_eq!(bare.extensions().get::<Deadline>(), Some(&callers));
    }
}
