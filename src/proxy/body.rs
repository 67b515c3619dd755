//! The client's request body on the request path, held so a failed attempt can hand it to the
//! next one.
//!
//! Owns: [`ProxyBody`] (one attempt's view of the body) and [`BodySlot`] (what every attempt
//! of a request shares: the client's stream, the frames read from it that are still held, and
//! whether any went to a replica without being held), the bound on what is held for a resend
//! ([`RESEND_LIMIT`]), and telling a body past `proxy.max_body` from one the client broke
//! ([`past_limit`]).
//! A request's first frame is always held (it is read ahead, to know the body started). A
//! request going over HTTP/2 also holds the frames after it, copied, while they stay within
//! [`RESEND_LIMIT`] in all: a stream the replica refused after it had read some of the body
//! (`REFUSED_STREAM`, a GOAWAY: never processed) can then be sent again whole, to a fresh
//! connection or the next server, as Envoy's retry buffer does. Past the bound the held copy
//! is dropped and the body can no longer be sent again. Once a replica answered
//! ([`ProxyBody::release`]) nothing more is held and what was sent is let go, so a long-lived
//! stream (a gRPC client or bidirectional stream) holds no copy while it lasts.
//! Must not touch: routing, retries or the upstream connection.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{LengthLimitError, Limited};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::wire::body::RequestBody;

use crate::error::BoxError;
use crate::sync::lock;

/// The most of a request body held (copied) so the request can be sent again after a replica
/// refused its stream having read some of it: 64 KiB, like Envoy's default per-request retry
/// buffer; a gRPC call's request messages are mostly far smaller.
pub const RESEND_LIMIT: usize = 64 * 1024;

/// One attempt's view of the request body: what the slot holds first, then the rest from the
/// client.
pub enum ProxyBody {
    Empty,
    Streaming {
        slot: Arc<BodySlot>,
        /// Which attempt this is: only the latest reads (a refused stream's body, still in the
        /// hands of its connection, must not take frames from the next attempt).
        attempt: u32,
        hint: SizeHint,
    },
}

/// A frame held for the next attempt.
enum Held {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::Data(d) => d.len(),
            Held::Trailers(_) => 0,
        }
    }

    fn frame(&self) -> Frame<Bytes> {
        match self {
            Held::Data(d) => Frame::data(d.clone()),
            Held::Trailers(t) => Frame::trailers(t.clone()),
        }
    }
}

impl ProxyBody {
    /// The client's `body` (at most `limit` bytes, `proxy.max_body`), holding up to `keep`
    /// bytes of it for a resend (0: only the first frame, read ahead).
    pub fn new(body: RequestBody, limit: u64, keep: usize) -> ProxyBody {
        if body.is_end_stream() {
            return ProxyBody::Empty;
        }
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        ProxyBody::Streaming {
            hint: body.size_hint(),
            slot: Arc::new(BodySlot::new(Limited::new(body, limit), keep)),
            attempt: 0,
        }
    }

    /// The slot behind a streamed body, for the next attempt and for failure causes.
    pub fn slot(&self) -> Option<(Arc<BodySlot>, SizeHint)> {
        match self {
            ProxyBody::Streaming { slot, hint, .. } => Some((slot.clone(), *hint)),
            ProxyBody::Empty => None,
        }
    }

    /// Nothing of the body has been sent yet (by this attempt or an earlier one).
    pub fn untouched(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Streaming { slot, .. } => !lock(&slot.state).touched,
        }
    }

    /// All of the body sent so far is still held: the next attempt can send it whole.
    pub fn resendable(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Streaming { slot, .. } => !lock(&slot.state).spent,
        }
    }

    /// Waits until the client's body has started: its first frame has arrived (held for the
    /// first attempt to send) or the body ended. A replica connection is only taken after this,
    /// so a request whose body never comes holds none. A body that ended with nothing becomes
    /// [`ProxyBody::Empty`]. The error is the body's ([`past_limit`] tells which).
    pub async fn started(&mut self) -> Result<(), BoxError> {
        let ProxyBody::Streaming { slot, .. } = self else {
            return Ok(());
        };
        let slot = slot.clone();
        loop {
            let polled = std::future::poll_fn(|cx| {
                let mut state = lock(&slot.state);
                Pin::new(&mut state.client).poll_frame(cx)
            })
            .await;
            match polled {
                None => {
                    *self = ProxyBody::Empty;
                    return Ok(());
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => {
                        // Held whatever its size: it is in hand already.
                        let mut state = lock(&slot.state);
                        state.bytes = data.len();
                        state.held.push(Held::Data(data));
                        return Ok(());
                    }
                    // Trailers and empty frames carry nothing to send (trailers are not
                    // forwarded): the body has not started yet.
                    _ => continue,
                },
            }
        }
    }

    /// A body for the next attempt over the same slot (empty stays empty): it sends what the
    /// slot holds, then reads on from the client. Earlier attempts' bodies read nothing more.
    pub fn again(slot: Option<(Arc<BodySlot>, SizeHint)>) -> ProxyBody {
        match slot {
            None => ProxyBody::Empty,
            Some((slot, hint)) => {
                let attempt = {
                    let mut state = lock(&slot.state);
                    state.attempt = state.attempt.wrapping_add(1);
                    state.next = 0;
                    state.unheld = false;
                    state.attempt
                };
                ProxyBody::Streaming {
                    slot,
                    attempt,
                    hint,
                }
            }
        }
    }

    /// A replica answered: the body will not be sent again. What the answering attempt sent
    /// already is let go, and nothing more is held (what it has still to send stays, for it).
    pub fn release(&self) {
        if let ProxyBody::Streaming { slot, .. } = self {
            let mut state = lock(&slot.state);
            let sent = state.next.min(state.held.len());
            state.held.drain(..sent);
            state.next = 0;
            state.keep = 0;
            state.bytes = state.held.iter().map(Held::len).sum();
        }
    }
}

/// The client's body as every attempt of a request shares it: the stream from the client, and
/// the frames read from it that are held for the next attempt. A failed attempt that sent
/// nothing, or only what is held, leaves the next one a whole body to send: that is what makes
/// a request with a body retryable.
pub struct BodySlot {
    state: Mutex<SlotState>,
}

struct SlotState {
    client: Limited<RequestBody>,
    /// The frames read from the client and held, in order.
    held: Vec<Held>,
    /// Their bytes.
    bytes: usize,
    /// The most bytes held (the first frame is held whatever its size).
    keep: usize,
    /// An attempt took a frame: the replica may have some of the body.
    touched: bool,
    /// A frame went to an attempt without being held: the body cannot be sent again whole.
    spent: bool,
    /// The client's body ended (after the frames read).
    ended: bool,
    /// The latest attempt; only it reads.
    attempt: u32,
    /// The next held frame the latest attempt sends.
    next: usize,
    /// The latest attempt read past what is held ([`RESEND_LIMIT`]): it reads from the client,
    /// holding nothing.
    unheld: bool,
}

impl BodySlot {
    fn new(client: Limited<RequestBody>, keep: usize) -> BodySlot {
        BodySlot {
            state: Mutex::new(SlotState {
                client,
                held: Vec::new(),
                bytes: 0,
                keep,
                touched: false,
                spent: false,
                ended: false,
                attempt: 0,
                next: 0,
                unheld: false,
            }),
        }
    }
}

/// Whether a body's error says it ran past `proxy.max_body` (else the client broke it).
pub fn past_limit(e: &BoxError) -> bool {
    e.is::<LengthLimitError>()
}

/// An earlier attempt's body, polled after a later attempt took over.
#[derive(Debug, thiserror::Error)]
#[error("the request body went to a later attempt")]
struct Superseded;

/// The body was partly sent without being held, and a later attempt would miss that part.
#[derive(Debug, thiserror::Error)]
#[error("part of the request body was sent on an earlier attempt and not held (past {RESEND_LIMIT} bytes)")]
struct NotHeld;

impl SlotState {
    /// The next frame for `attempt`.
    fn poll_for(
        &mut self,
        attempt: u32,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if attempt != self.attempt {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if !self.unheld {
            if let Some(held) = self.held.get(self.next) {
                self.next += 1;
                self.touched = true;
                return Poll::Ready(Some(Ok(held.frame())));
            }
            if self.spent {
                return Poll::Ready(Some(Err(Box::new(NotHeld))));
            }
        }
        if self.ended {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut self.client).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                self.ended = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        self.touched = true;
        if !self.unheld {
            self.hold(&frame);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    /// Whether `attempt` has nothing more to send: it is the latest, everything held was sent,
    /// and the client's body has ended. Said as soon as it is true, so that an HTTP/2 stream
    /// to a replica ends with its last DATA frame instead of an empty one after it (a unary
    /// gRPC call's one message, read ahead by [`ProxyBody::started`]).
    fn at_end(&self, attempt: u32) -> bool {
        let held_left = !self.unheld && (self.next < self.held.len() || self.spent);
        attempt == self.attempt && !held_left && (self.ended || self.client.is_end_stream())
    }

    /// Holds a copy of `frame`, just read for the latest attempt, while the held bytes stay
    /// within the bound; past it, drops what is held: from then on the attempt reads unheld.
    fn hold(&mut self, frame: &Frame<Bytes>) {
        let held = match (frame.data_ref(), frame.trailers_ref()) {
            (Some(d), _) if self.bytes + d.len() <= self.keep => {
                self.bytes += d.len();
                // A copy: the frame's own bytes may share a larger buffer of the client
                // connection's, which holding would keep alive.
                Held::Data(Bytes::copy_from_slice(d))
            }
            (None, Some(t)) => Held::Trailers(t.clone()),
            _ => {
                self.spent = true;
                self.held = Vec::new();
                self.bytes = 0;
                self.unheld = true;
                return;
            }
        };
        self.held.push(held);
        self.next = self.held.len();
    }
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
            ProxyBody::Streaming { slot, attempt, .. } => lock(&slot.state).poll_for(*attempt, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Streaming { slot, attempt, .. } => lock(&slot.state).at_end(*attempt),
        }
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

    fn resendable(&self) -> bool {
        ProxyBody::resendable(self)
    }

    fn share(&self) -> ProxyBody {
        ProxyBody::again(self.slot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body from the client in `chunks`, with `keep` bytes held for a resend.
    fn body(chunks: &[&'static [u8]], keep: usize) -> ProxyBody {
        ProxyBody::new(RequestBody::frames(chunks), 1 << 20, keep)
    }

    async fn read_all(b: &mut ProxyBody) -> Result<Vec<u8>, BoxError> {
        let mut out = Vec::new();
        while let Some(frame) = b.frame().await {
            if let Ok(d) = frame?.into_data() {
                out.extend_from_slice(&d);
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_body_within_the_bound_is_sent_again_whole_and_the_earlier_attempt_reads_no_more() {
        let mut first = body(&[b"ab", b"cd", b"ef"], 16);
        first.started().await.expect("started");
        assert!(first.untouched() && first.resendable());
        let mut one = ProxyBody::again(first.slot());
        let frame = one.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok().as_deref(), Some(&b"ab"[..]));
        let frame = one.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok().as_deref(), Some(&b"cd"[..]));
        assert!(!first.untouched(), "some of it was sent");
        assert!(first.resendable(), "and all of that is held");
        let mut two = ProxyBody::again(first.slot());
        assert!(one.frame().await.expect("an error").is_err(), "superseded");
        assert_eq!(read_all(&mut two).await.expect("whole"), b"abcdef");
        assert!(first.resendable());
    }

    #[tokio::test]
    async fn past_the_bound_the_body_is_no_longer_resendable() {
        let mut first = body(&[b"abcd", b"efgh", b"ijkl"], 6);
        first.started().await.expect("started");
        let mut one = ProxyBody::again(first.slot());
        assert_eq!(
            read_all(&mut one).await.expect("whole, read once"),
            b"abcdefghijkl"
        );
        assert!(!first.resendable(), "8 bytes past a bound of 6");
        let mut two = ProxyBody::again(first.slot());
        assert!(
            read_all(&mut two).await.is_err(),
            "never a body with a hole"
        );
    }

    #[tokio::test]
    async fn once_answered_nothing_more_is_held_and_what_was_sent_is_let_go() {
        let mut first = body(&[b"ab", b"cd", b"ef"], 16);
        first.started().await.expect("started");
        let mut one = ProxyBody::again(first.slot());
        let frame = one.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok().as_deref(), Some(&b"ab"[..]));
        first.release();
        assert_eq!(lock(&slot_of(&first).state).held.len(), 0);
        assert_eq!(read_all(&mut one).await.expect("the rest"), b"cdef");
        assert_eq!(lock(&slot_of(&first).state).held.len(), 0, "none held");
        assert!(!first.resendable());
        // Released before the attempt sent what was held: that stays, for it.
        let mut second = body(&[b"gh", b"ij"], 16);
        second.started().await.expect("started");
        let mut two = ProxyBody::again(second.slot());
        second.release();
        assert_eq!(read_all(&mut two).await.expect("whole"), b"ghij");
    }

    #[tokio::test]
    async fn a_body_is_at_its_end_once_its_last_frame_is_taken() {
        let mut first = body(&[b"ab", b"cd"], 16);
        first.started().await.expect("started");
        let mut one = ProxyBody::again(first.slot());
        assert!(!one.is_end_stream(), "the held frame is still to send");
        one.frame().await.expect("a frame").expect("data");
        assert!(!one.is_end_stream(), "the client has more");
        one.frame().await.expect("a frame").expect("data");
        assert!(one.is_end_stream(), "the client's body ended with it");
        assert!(!first.is_end_stream(), "an earlier attempt's never is");
        let two = ProxyBody::again(first.slot());
        assert!(!two.is_end_stream(), "the next attempt sends it all again");
    }

    fn slot_of(b: &ProxyBody) -> Arc<BodySlot> {
        b.slot().expect("a streamed body").0
    }

    #[tokio::test]
    async fn with_nothing_kept_only_the_first_frame_is_held() {
        let mut first = body(&[b"ab", b"cd"], 0);
        first.started().await.expect("started");
        let mut one = ProxyBody::again(first.slot());
        let frame = one.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok().as_deref(), Some(&b"ab"[..]));
        assert!(!first.untouched() && first.resendable());
        let _ = one.frame().await;
        assert!(!first.resendable());
    }
}
