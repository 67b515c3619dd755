//! HTTP/1.1 on the wire, both legs: the one codec for the client's side (our server) and the
//! replica's side (our client), as siblings (the shape of pingora's
//! `protocols/http/v1/{server,client}`).
//!
//! Owns: the strict rules for the framing fields both legs read ([`fields`]: `Content-Length`,
//! `Transfer-Encoding`; [`syntax`]: RFC 9110's tokens), the body decoder and the chunk encoder
//! ([`framing`]), the parse scratch both head parsers share ([`scratch`]), which fields a proxy
//! forwards ([`headers`]), the server ([`server`]: request heads, the response's framing and
//! head, the connection loop), the client ([`client`]: the forwarded request's head, the
//! replica's response head and body; the head's fields stay the replica's bytes for an HTTP/1
//! client, whose server writes them with the hop-by-hop ones cut), and the body types the request path passes around
//! ([`body`]); beside it, the replica's side of HTTP/2 ([`h2`]: a request as a stream on
//! hyper's client connection, its response body and trailers, the gRPC health check).
//! Must not touch: routing, retries, or what a failure means for a replica (the proxy decides);
//! connections to replicas are [`crate::upstream`]'s.

// The request path is read more than it is written: no function in it is longer than 100 lines
// (clippy's default threshold), which `make lint` checks.
#![warn(clippy::too_many_lines)]

pub mod body;
pub mod client;
pub mod fields;
pub mod framing;
pub mod h2;
pub mod headers;
pub mod scratch;
pub mod server;
pub mod syntax;
