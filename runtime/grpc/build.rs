//! Compiles the protocol's definitions with `protox` (no system `protoc` needed) and
//! generates the gRPC service with tonic.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/grpc_service.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".")
        .build_server(true)
        .build_client(true)
        .build_transport(std::env::var_os("CARGO_FEATURE_CLIENT").is_some())
        .compile_fds(descriptors)?;
    Ok(())
}
