//! A health check on the replica's side of HTTP/1.1: the request traffic would send, read the
//! way traffic is read.
//!
//! Owns: [`check`]: `GET <target>` as a request of the gateway's own (no client fields to
//! forward: `Host` is the target's authority, `X-Forwarded-For` the gateway's address on the
//! connection), written and answered through [`super::exchange`] (the forwarded head's writer,
//! interim answers read past, the strict framing rules of both legs), then the whole body read
//! and dropped by the decoder traffic's bodies go through; every wait by the check's deadline.
//! Must not touch: connections (the caller brings a new one and drops it: a check never goes to
//! the pool) or verdicts (the health module judges the status).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{StatusCode, Uri};
use hyper::body::{Body as HttpBody, Frame};
use tokio::time::{timeout_at, Instant};

use super::body::BodyError;
use super::head::RequestFraming;
use super::{exchange, Forwarded, Outgoing, SendError};
use crate::error::BoxError;
use crate::upstream::pool::Conn;
use crate::wire::framing::Decoder;

/// Why a check got no whole response.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No response head: what a forwarded request would have failed with.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The head came and the body did not, whole: cut short or framed wrongly.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// The deadline passed while the body was read.
    #[error("the response body did not end before the deadline")]
    BodyTimeout,
}

impl CheckError {
    /// The check's deadline passed (for the head or the body): no fault found, only time.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            CheckError::BodyTimeout | CheckError::Send(SendError::Timeout)
        )
    }
}

/// `GET target` on `conn` (`target` absolute: its authority is the `Host`), the response head
/// and its whole body read by `deadline`; the status.
pub async fn check(
    conn: &mut Conn,
    target: &Uri,
    deadline: Instant,
) -> Result<StatusCode, CheckError> {
    let mut parts = http::Request::new(()).into_parts().0;
    parts.uri = target.clone();
    let forwarded = Forwarded {
        parts: &parts,
        client: conn.local_addr().map_err(SendError::Broken)?,
        proto: "http",
        framing: RequestFraming::None,
        upgrade: None,
    };
    let head = exchange(conn, &forwarded, deadline, &mut NoBody).await?;
    let mut decoder = Decoder::new(head.framing);
    loop {
        let piece = std::future::poll_fn(|cx| decoder.poll_piece(conn, cx));
        match timeout_at(deadline, piece).await {
            Err(_) => return Err(CheckError::BodyTimeout),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => return Ok(head.status),
            Ok(Err(e)) => return Err(BodyError::from(e).into()),
        }
    }
}

/// A check's request body: none.
struct NoBody;

impl HttpBody for NoBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        true
    }
}

impl Outgoing for NoBody {
    fn untouched(&self) -> bool {
        true
    }

    fn share(&self) -> NoBody {
        NoBody
    }
}
