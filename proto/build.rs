//! Generates Rust code for the protobuf files with a vendored protoc, so a
//! fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: the build script is single-threaded; nothing else reads the
    // environment while it is set.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(
        &["mesh/echo/v1/echo.proto", "mesh/v1/mesh.proto", "grpc/health/v1/health.proto"],
        &["."],
    )?;
    Ok(())
}
