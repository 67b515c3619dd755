//! The client's request body on the request path, held so a failed attempt can hand it to the
//! next one.
//!
//! Owns: [`ProxyBody`] and [`BodySlot`] (the body no attempt has read yet, with the frame read
//! ahead to know it has started), and telling a body past `proxy.max_body` from one the client
//! broke ([`past_limit`]). Must not touch: routing, retries or the upstream connection.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{LengthLimitError, Limited};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::wire::body::RequestBody;

use crate::error::BoxError;
use crate::sync::lock;

/// A request body that can be handed back if the attempt failed before reading any of it.
pub enum ProxyBody {
    Empty,
    Streaming {
        slot: Arc<BodySlot>,
        taken: Option<Unsent>,
        hint: SizeHint,
    },
}

/// The client's body as no attempt has sent it yet: the frame [`ProxyBody::started`] read ahead
/// (if any), then the rest, still at the client.
pub struct Unsent {
    first: Option<Bytes>,
    rest: Limited<RequestBody>,
}

impl ProxyBody {
    pub fn new(body: RequestBody, limit: u64) -> ProxyBody {
        if body.is_end_stream() {
            return ProxyBody::Empty;
        }
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        ProxyBody::Streaming {
            hint: body.size_hint(),
            slot: Arc::new(BodySlot::new(Unsent {
                first: None,
                rest: Limited::new(body, limit),
            })),
            taken: None,
        }
    }

    /// The slot behind a streamed body, for the next attempt and for failure causes.
    pub fn slot(&self) -> Option<(Arc<BodySlot>, SizeHint)> {
        match self {
            ProxyBody::Streaming { slot, hint, .. } => Some((slot.clone(), *hint)),
            ProxyBody::Empty => None,
        }
    }

    /// Nothing of the body has been read yet (by this attempt or an earlier one).
    pub fn untouched(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Streaming { slot, taken, .. } => taken.is_none() && slot.is_untouched(),
        }
    }

    /// Waits until the client's body has started: its first frame has arrived (kept for the
    /// first attempt to send) or the body ended. A replica connection is only taken after this,
    /// so a request whose body never comes holds none. A body that ended with nothing becomes
    /// [`ProxyBody::Empty`]. The error is the body's ([`past_limit`] tells which).
    pub async fn started(&mut self) -> Result<(), BoxError> {
        let first = loop {
            if matches!(self, ProxyBody::Empty) {
                return Ok(());
            }
            match std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await {
                None => {
                    *self = ProxyBody::Empty;
                    return Ok(());
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => break data,
                    // Trailers and empty frames carry nothing to send (trailers are not
                    // forwarded): the body has not started yet.
                    _ => continue,
                },
            }
        };
        if let ProxyBody::Streaming { slot, taken, .. } = self {
            if let Some(mut unsent) = taken.take() {
                unsent.first = Some(first);
                *lock(&slot.body) = Some(unsent);
            }
        }
        Ok(())
    }

    /// A body for the next attempt over the same slot (empty stays empty).
    pub fn again(slot: Option<(Arc<BodySlot>, SizeHint)>) -> ProxyBody {
        match slot {
            None => ProxyBody::Empty,
            Some((slot, hint)) => ProxyBody::Streaming {
                slot,
                taken: None,
                hint,
            },
        }
    }
}

/// Holds the client's body until an attempt first polls it. A failed attempt that never polled
/// it leaves it here, and the next attempt takes it: that is what makes a request with a body
/// retryable.
pub struct BodySlot {
    body: Mutex<Option<Unsent>>,
}

impl BodySlot {
    fn new(body: Unsent) -> BodySlot {
        BodySlot {
            body: Mutex::new(Some(body)),
        }
    }

    fn take(&self) -> Option<Unsent> {
        lock(&self.body).take()
    }

    /// No attempt has read from the body yet.
    pub fn is_untouched(&self) -> bool {
        lock(&self.body).is_some()
    }
}

/// Whether a body's error says it ran past `proxy.max_body` (else the client broke it).
pub fn past_limit(e: &BoxError) -> bool {
    e.is::<LengthLimitError>()
}

impl HttpBody for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Streaming { slot, taken, .. } => {
                if taken.is_none() {
                    *taken = slot.take();
                }
                let Some(unsent) = taken else {
                    return Poll::Ready(None);
                };
                if let Some(data) = unsent.first.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Pin::new(&mut unsent.rest).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ProxyBody::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Streaming { hint, .. } => *hint,
        }
    }
}

impl crate::wire::client::Outgoing for ProxyBody {
    fn untouched(&self) -> bool {
        ProxyBody::untouched(self)
    }

    fn share(&self) -> ProxyBody {
        ProxyBody::again(self.slot())
    }
}
