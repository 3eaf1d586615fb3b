//! Generates Rust code for every `.proto` file with protox, a protobuf compiler written in Rust,
//! so building Herald needs no `protoc` on the machine.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "herald/v1/herald.proto",
    "herald/client/v1/client.proto",
    "herald/raft/v1/raft.proto",
    "herald/callback/v1/callback.proto",
    "herald/peer/v1/peer.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC server reflection.
    std::fs::write(
        out.join("herald_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // The public API's files only: what the public port's reflection may advertise.
    let mut public = fds.clone();
    public.file.retain(|f| f.name() == "herald/v1/herald.proto");
    assert_eq!(
        public.file.len(),
        1,
        "herald/v1/herald.proto missing from the descriptor set"
    );
    std::fs::write(
        out.join("herald_public_descriptor.bin"),
        prost::Message::encode_to_vec(&public),
    )?;
    tonic_prost_build::configure()
        // Undecodable requests are INVALID_ARGUMENT, not tonic-prost's INTERNAL (src/codec.rs).
        .codec_path("crate::codec::HeraldCodec")
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
