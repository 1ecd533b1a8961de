//! The gRPC side of mesh-echo: `mesh.echo.v1.Echo`, unary and
//! server-streaming, with the same knobs as the HTTP side.

use std::pin::Pin;
use std::sync::Arc;

use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mesh_proto::echo::v1::echo_server::{Echo, EchoServer};
use mesh_proto::echo::v1::{EchoReply, EchoRequest};
use mesh_proto::health::v1::health_check_response::ServingStatus;
use mesh_proto::health::v1::health_server::{Health, HealthServer};
use mesh_proto::health::v1::{HealthCheckRequest, HealthCheckResponse};
use rand::Rng;
use tokio_stream::Stream;
use tonic::{Response, Status};
use tower::ServiceExt;

use crate::http_echo::EchoBody;
use crate::Shared;

struct EchoService {
    shared: Arc<Shared>,
}

pub fn routes(shared: Arc<Shared>) -> tonic::service::Routes {
    tonic::service::Routes::new(EchoServer::new(EchoService { shared: shared.clone() }))
        .add_service(HealthServer::new(HealthService { shared }))
}

/// `grpc.health.v1`: SERVING unless the echo is set not ready.
struct HealthService {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let status = if self.shared.knobs.load().not_ready {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        Ok(Response::new(HealthCheckResponse { status: status.into() }))
    }
}

/// Hands a gRPC request to tonic and boxes its answer like the HTTP ones.
pub async fn serve(
    shared: &Shared,
    routes: tonic::service::Routes,
    request: Request<Incoming>,
) -> http::Response<EchoBody> {
    let knobs = shared.knobs.load_full();
    if knobs.hang {
        std::future::pending::<()>().await;
    }
    match routes.oneshot(request).await {
        Ok(response) => response.map(|body| body.map_err(Into::into).boxed_unsync()),
        Err(never) => match never {},
    }
}

impl EchoService {
    async fn apply_knobs(&self, request: &EchoRequest) -> Result<(), Status> {
        let knobs = self.shared.knobs.load_full();
        if !knobs.latency.is_zero() {
            tokio::time::sleep(knobs.latency).await;
        }
        if request.fail_with_code != 0 {
            return Err(Status::new(request.fail_with_code.into(), "failure requested by the caller"));
        }
        if knobs.fail_rate > 0.0 && rand::rng().random::<f64>() < knobs.fail_rate {
            return Err(Status::unavailable("mesh-echo fail-rate"));
        }
        Ok(())
    }

    fn reply(&self, message: &str, sequence: u32) -> EchoReply {
        EchoReply {
            message: message.to_owned(),
            version: self.shared.version.clone(),
            instance: self.shared.instance.clone(),
            sequence,
        }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: tonic::Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let request = request.into_inner();
        self.apply_knobs(&request).await?;
        Ok(Response::new(self.reply(&request.message, 0)))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let request = request.into_inner();
        self.apply_knobs(&request).await?;
        let replies: Vec<Result<EchoReply, Status>> =
            (0..request.count).map(|i| Ok(self.reply(&request.message, i))).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(replies))))
    }
}
