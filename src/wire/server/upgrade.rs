//! The hand-over of a client connection after `101 Switching Protocols`: the seam tunnels are
//! built on.
//!
//! Owns: [`OnUpgrade`] (put in the extensions of a request that asks to switch protocols:
//! `Connection: upgrade` and an `Upgrade` field, HTTP/1.1 only) and [`Upgraded`] (the client's
//! connection, and the bytes it sent past its request head, once a `101` was written). The
//! server writes the `101` the handler answered, then hands the connection over and ends its
//! own loop.
//! Must not touch: what flows over an upgraded connection (its taker decides).

use bytes::BytesMut;
use http::header::{self, HeaderMap};
use http::Version;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::io::Transport;
use crate::sync::lock;

/// The client's connection after a `101`.
pub struct Upgraded {
    pub io: Transport,
    /// What the client sent past its request head (the new protocol's first bytes).
    pub read: BytesMut,
}

/// Completes with the client's connection once the server has written the handler's `101`;
/// `None` if the answer was anything else (or the connection went first). Cloneable, as request
/// extensions must be; the first to wait takes the connection.
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    pub(super) fn new(rx: oneshot::Receiver<Upgraded>) -> OnUpgrade {
        OnUpgrade(Arc::new(Mutex::new(Some(rx))))
    }

    pub async fn upgraded(self) -> Option<Upgraded> {
        let rx = lock(&self.0).take()?;
        rx.await.ok()
    }
}

/// Whether a request of `version` with `headers` asks to switch protocols (RFC 9110 §7.8).
pub fn asks_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn an_upgrade_is_asked_by_connection_and_upgrade_together_on_http_1_1() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(
            !asks_upgrade(Version::HTTP_11, &h),
            "no Connection: upgrade"
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(asks_upgrade(Version::HTTP_11, &h));
        assert!(
            !asks_upgrade(Version::HTTP_10, &h),
            "HTTP/1.0 cannot switch"
        );
        h.remove(header::UPGRADE);
        assert!(!asks_upgrade(Version::HTTP_11, &h), "no protocol named");
    }
}
