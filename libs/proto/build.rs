//! Compiles `proto/hodei/v1/*.proto` with the pure-Rust `protox` compiler (no protoc needed)
//! and writes the descriptor set used by gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "hodei/v1/jobs.proto",
        "hodei/v1/workers.proto",
        "hodei/v1/pipelines.proto",
        "hodei/v1/access.proto",
        "hodei/v1/schedules.proto",
        "hodei/v1/tenants.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("hodei_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
