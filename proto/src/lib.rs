//! moe-proto: the wire of moe-cluster, package `moe.v1`.
//!
//! - `Generation`: the client API (streaming `Generate`, `Tokenize`, `ModelInfo`).
//! - `ExpertService`: router → worker (`Dispatch` stream, `Info`, `LoadExperts`,
//!   `UnloadExperts`).
//!
//! Generated from `proto/moe/v1/*.proto` at build time; [`FILE_DESCRIPTOR_SET`] feeds
//! gRPC server reflection.

#![allow(clippy::all, missing_docs)]

/// Generated messages and services of package `moe.v1`.
pub mod v1 {
    tonic::include_proto!("moe.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/moe_descriptor.bin"));

pub mod rows;
pub mod traceparent;

/// Sentinel expert id for a slot a worker must skip (`expert_ids` in `DispatchRequest`).
pub const NO_EXPERT: u32 = u32::MAX;
