//! Compiles the .proto files with a vendored protoc, so a fresh machine needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Safety: build scripts are single-threaded at this point.
    std::env::set_var("PROTOC", protoc);

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Public services get a descriptor set for reflection; the peer service does not.
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("sequencer_v1_descriptor.bin"))
        .compile_protos(&["proto/sequencer.proto"], &["proto"])?;
    tonic_prost_build::configure().compile_protos(&["proto/peer.proto"], &["proto"])?;
    // etcd's own services (its schema, cut down), for the benchmark only; the server side
    // serves its tests.
    tonic_prost_build::configure()
        .compile_protos(&["third_party/etcd/rpc.proto"], &["third_party"])?;
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=third_party");
    Ok(())
}
