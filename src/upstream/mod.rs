//! The connector to the replicas: connections (plain TCP or TLS) and the serving thread's pool
//! of idle ones.
//!
//! Owns: [`pool`]. Must not touch: HTTP (the codec in [`crate::wire`] speaks it over these
//! connections) or what a failed connect means for a replica (the proxy decides).

pub mod pool;
