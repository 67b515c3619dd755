pub mod analysis;
pub mod loadgen;
