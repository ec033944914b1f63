//! Compiles `proto/` with `protox` (pure Rust: a fresh machine needs no
//! `protoc`) and generates the tonic services with `tonic-prost-build`. The
//! encoded descriptor set is written beside the generated code so that the
//! server can offer gRPC reflection.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/licensing/v1/licensing.proto"];
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("licensing_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    // sqlx::migrate! embeds migrations/ when the crate compiles.
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
