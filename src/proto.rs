//! The generated protobuf and gRPC code, and the descriptor set for reflection.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("fleetcare.v1");
}

/// Every fleetcare proto, encoded, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fleetcare_descriptor.bin"));
