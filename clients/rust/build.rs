//! Compiles the wire contract with protox (pure Rust: no `protoc` needed) into
//! the message types and the client stubs.
//!
//! The protos are read from `proto/` in this package: in the repository a
//! symlink to the top-level `proto/` (the one source of truth, which the
//! server compiles too), in the published crate the files `cargo package`
//! copied through it. Where the symlink is not one (a checkout without
//! symlink support leaves a small text file), the repository's own
//! `../../proto` is used.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = [Path::new("proto"), Path::new("../../proto")]
        .into_iter()
        .find(|root| root.join("fleetcare/v1").is_dir())
        .ok_or("no proto/fleetcare/v1 here or in ../../proto")?;
    println!("cargo:rerun-if-changed={}", root.display());

    // Every .proto under fleetcare/v1, in a stable order.
    let mut protos: Vec<PathBuf> = std::fs::read_dir(root.join("fleetcare/v1"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    protos.retain(|p| p.extension().is_some_and(|ext| ext == "proto"));
    protos.sort();
    let fds = protox::compile(&protos, [root])?;

    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
