//! A client connection's byte stream, whatever it is (TCP, or TLS over TCP).
//!
//! Owns: [`Io`] and [`Transport`]. A leaf of the server: the connection loop and the request
//! body both read from it. Must not touch: bytes.

use std::any::Any;

use tokio::io::{AsyncRead, AsyncWrite};

/// What a client connection's stream can do.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {
    /// The stream as what it is, for whoever boxed it to take it back out (the listener, to
    /// hold an idle connection's socket without a task).
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
    /// The stream as what it is, to ask (a tunnel, whether it can rest without a task).
    fn as_any(&self) -> &dyn Any;
}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A client connection's stream, boxed.
pub type Transport = Box<dyn Io>;
