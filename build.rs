//! Compiles `proto/` with protox (pure Rust: no `protoc` needed) into the
//! server stubs, and writes the file descriptor set that server reflection
//! serves. The message types and the client stubs are the client crate's
//! (`fleetcare_client::pb`, built from the same `proto/`), so the server's
//! stubs refer to them rather than generating a second copy.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build prints no rerun-if-changed for descriptor sets, and
    // `sqlx::migrate!` embeds `migrations/`: without these, edits would not rebuild.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");

    // Every .proto under proto/fleetcare/v1, in a stable order.
    let mut protos: Vec<PathBuf> = std::fs::read_dir("proto/fleetcare/v1")?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    protos.retain(|p| p.extension().is_some_and(|ext| ext == "proto"));
    protos.sort();
    let fds = protox::compile(&protos, ["proto"])?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("fleetcare_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    tonic_prost_build::configure()
        // Malformed protobuf is the caller's fault: INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::grpc::codec::ProstCodec")
        .extern_path(".fleetcare.v1", "::fleetcare_client::pb")
        .build_server(true)
        .build_client(false)
        .compile_fds(fds)?;
    Ok(())
}
