//! Generated protobuf types and gRPC stubs of the mesh.

/// The echo workload's gRPC API (`mesh.echo.v1`).
pub mod echo {
    pub mod v1 {
        tonic::include_proto!("mesh.echo.v1");
    }
}

/// The control plane's APIs (`mesh.v1`): registry, discovery and admin.
pub mod mesh {
    pub mod v1 {
        tonic::include_proto!("mesh.v1");
    }
}

/// The standard gRPC health-checking API (`grpc.health.v1`).
pub mod health {
    pub mod v1 {
        tonic::include_proto!("grpc.health.v1");
    }
}
