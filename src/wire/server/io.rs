//! A client connection's byte stream, whatever it is (TCP, or TLS over TCP).
//!
//! Owns: [`Io`] and [`Transport`]. A leaf of the server: the connection loop and the request
//! body both read from it. Must not touch: bytes.

use tokio::io::{AsyncRead, AsyncWrite};

/// What a client connection's stream can do.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A client connection's stream, boxed.
pub type Transport = Box<dyn Io>;
