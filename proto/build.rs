//! Generates Rust code for the protobuf files with a vendored protoc, so a
//! fresh machine needs no system protobuf compiler.

use tonic_build::manual::{Builder, Method, Service};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: the build script is single-threaded; nothing else reads the
    // environment while it is set.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().bytes(".mesh.v1.RoutingUpdateWire").compile_protos(
        &["mesh/echo/v1/echo.proto", "mesh/v1/mesh.proto", "grpc/health/v1/health.proto"],
        &["."],
    )?;
    // meshd's side of Discovery sends RoutingUpdateWire, the same bytes as
    // RoutingUpdate with its routes encoded once per publication.
    let subscribe = Method::builder()
        .name("subscribe")
        .route_name("Subscribe")
        .input_type("crate::mesh::v1::SubscribeRequest")
        .output_type("crate::mesh::v1::RoutingUpdateWire")
        .codec_path("tonic_prost::ProstCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let discovery = Service::builder().name("Discovery").package("mesh.v1").method(subscribe).build();
    Builder::new().build_client(false).compile(&[discovery]);
    Ok(())
}
