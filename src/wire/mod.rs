//! HTTP/1.1 on the wire, both legs: the one codec for the client's side (our server) and the
//! replica's side (our client), as siblings (the shape of pingora's
//! `protocols/http/v1/{server,client}`).
//!
//! Owns: the strict rules for the framing fields both legs read ([`fields`]: `Content-Length`,
//! `Transfer-Encoding`), the body decoder and the chunk encoder ([`framing`]), the parse scratch
//! both head parsers share ([`scratch`]), which fields a proxy forwards and how ([`headers`]), the server ([`server`]: request heads, the response's
//! framing and head, the connection loop), the client ([`client`]: the forwarded request's head,
//! the replica's response head and body), and the body types the request path passes around
//! ([`body`]). Must not touch: routing, retries, or what a failure means for a replica (the
//! proxy decides); connections to replicas are [`crate::upstream`]'s.

pub mod body;
pub mod client;
pub mod fields;
pub mod framing;
pub mod headers;
pub mod scratch;
pub mod server;
pub mod syntax;
