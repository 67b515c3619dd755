//! ringgate-lab: what measures ringgate, kept out of the gateway so its binary and image carry
//! none of it (plotters, indicatif, criterion). It drives the `ringgate` and `ringgate-server`
//! binaries like an operator does, and uses the `ringgate` library only for the product's own
//! logic (ring, hash functions, the `listening on` line), never a copy of it.
//!
//! # Layout
//! - [`loadgen`]: the load generator (`ringgate-lab load`).
//! - [`analysis`]: the experiments, charts, report and proxy benchmark (`ringgate-lab analysis`).
//! - [`backend`]: the lightest HTTP/1.1 backend we can make (`ringgate-lab backend`), for
//!   `make bench`.
//! - [`forward`]: the floor of `make bench`, a proxy that only moves bytes (`ringgate-lab
//!   forward`): what the socket operations of a request cost before any proxy logic runs.
//! - [`procs`]: the processes the lab starts: finding the binaries, their listening line,
//!   signals, `/proc`.
//!
//! The criterion microbenches of the library are this package's `benches/` (`make bench-micro`).

pub mod analysis;
pub mod backend;
pub mod forward;
pub mod loadgen;
pub mod procs;
