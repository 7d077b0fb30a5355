//! The router's and workers' gRPC health services, as a client sees them.

use std::net::SocketAddr;
use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::PATIENCE;

/// What `Health/Check` says of `service` ("" is the server as a whole) at `addr`.
pub async fn grpc_health(addr: SocketAddr, service: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(PATIENCE)
        .connect()
        .await
        .expect("connect to the server");
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("Health/Check {service:?}: {s:?}"))
        .into_inner();
    ServingStatus::try_from(resp.status).expect("a known status")
}

/// Polls [`grpc_health`] until it says `want`; fails the test after [`PATIENCE`].
pub async fn wait_grpc_health(addr: SocketAddr, service: &str, want: ServingStatus) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let got = grpc_health(addr, service).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health of {service:?} stayed {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
