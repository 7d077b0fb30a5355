//! Mutual TLS between real `moe router` and `moe worker` processes, with certificates
//! made by `moe cert`: the router serves through a TLS worker; a worker refuses
//! ExpertService to callers without a router certificate of the cluster CA (no
//! certificate: UNAUTHENTICATED; the worker role, another CA, plain TCP: the handshake
//! or the connection fails) while health stays reachable; a router refuses a worker
//! whose certificate another CA signed; rotated files are picked up without a restart
//! and a stream that was open across the rotation finishes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use moe_proto::v1::expert_service_client::ExpertServiceClient;
use moe_proto::v1::InfoRequest;
use moe_tests::{
    generate, path_str, run_moe, server_args, tiny_checkpoint, wait_until, GreedyReq, Proc,
};
use moe_tls::{Material, Role, TlsFiles};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const PATIENCE: Duration = Duration::from_secs(10);

/// `moe cert issue` into `dir` as `name`.crt/.key; returns the cert path.
fn issue(dir: &Path, role: &str, names: &str, out: &str) -> PathBuf {
    run_moe(
        &[
            "cert",
            "issue",
            "--dir",
            path_str(dir),
            "--role",
            role,
            "--name",
            names,
            "--out",
            out,
        ],
        true,
    );
    dir.join(format!("{out}.crt"))
}

fn tls_flags(dir: &Path, name: &str) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join(format!("{name}.crt")).display().to_string(),
        "--tls-key".into(),
        dir.join(format!("{name}.key")).display().to_string(),
        "--tls-ca".into(),
        dir.join("ca.crt").display().to_string(),
        // Fast re-reads for the rotation check.
        "--tls-reload-secs".into(),
        "1".into(),
    ]
}

fn material(dir: &Path, name: &str, ca_dir: &Path, role: Role) -> Arc<Material> {
    Material::load(
        TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: Some(ca_dir.join("ca.crt")),
        },
        Some(role),
    )
    .expect("load test material")
}

/// A rustls client config that trusts `ca_dir`'s CA and presents no certificate.
fn anonymous(ca_dir: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_dir.join("ca.crt")).expect("ca pem") {
        roots.add(c.expect("ca cert")).expect("add ca");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(moe_tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

fn channel(addr: SocketAddr, tls: Option<Arc<rustls::ClientConfig>>) -> Channel {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(PATIENCE)
        .timeout(PATIENCE);
    match tls {
        Some(tls) => ep.connect_with_connector_lazy(moe_tls::client::Connector::new(tls, PATIENCE)),
        None => ep.connect_lazy(),
    }
}

/// `Info` on the worker through `tls`: Ok or the status.
async fn info(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(), tonic::Status> {
    ExpertServiceClient::new(channel(addr, tls))
        .info(InfoRequest {})
        .await
        .map(|_| ())
}

/// The leaf certificate a worker presents now: a full handshake (a fresh config, so no
/// resumed session reports the old certificate).
async fn served_leaf(addr: SocketAddr, ca: &Path) -> Vec<u8> {
    let tls = moe_tls::client::config(material(ca, "router", ca, Role::Router), Role::Worker)
        .expect("router config");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(addr.ip().to_string()).expect("server name");
    let s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("handshake");
    s.get_ref().1.peer_certificates().expect("peer certs")[0].to_vec()
}

fn leaf_in(file: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(file)
        .expect("cert file")
        .to_vec()
}

async fn served(router: &Proc, what: &str) {
    let out = generate(router.grpc, GreedyReq::text(what, 4).to_proto())
        .await
        .unwrap_or_else(|s| panic!("{what}: the router did not serve: {s}"));
    assert!(
        out.last().is_some_and(|m| m.finish_reason != 0),
        "{what}: no finish reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_only_routers_of_the_cluster_ca() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(tmp.path(), 47);
    let (ca, other) = (tmp.path().join("ca"), tmp.path().join("other-ca"));
    run_moe(&["cert", "new-ca", "--dir", path_str(&ca)], true);
    run_moe(&["cert", "new-ca", "--dir", path_str(&other)], true);
    issue(&ca, "worker", "127.0.0.1", "worker");
    issue(&ca, "router", "router-0", "router");
    issue(&ca, "worker", "127.0.0.1", "worker-as-router");
    issue(&other, "router", "router-x", "foreign-router");
    issue(&other, "worker", "127.0.0.1", "foreign-worker");

    // Without TLS flags and without --insecure, routers and workers refuse to start.
    let out = run_moe(
        &[
            "router",
            "--model",
            path_str(&model),
            "--workers",
            "127.0.0.1:1",
        ],
        false,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--insecure") && err.contains("--tls-cert"),
        "{err}"
    );
    // A router given a worker's certificate refuses to start, naming the role.
    let wrong: Vec<String> = tls_flags(&ca, "worker-as-router");
    let mut args = vec![
        "router",
        "--model",
        path_str(&model),
        "--workers",
        "127.0.0.1:1",
    ];
    args.extend(wrong.iter().map(String::as_str));
    let out = run_moe(&args, false);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&Role::Router.uri()),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let wflags = tls_flags(&ca, "worker");
    let wflags: Vec<&str> = wflags.iter().map(String::as_str).collect();
    let worker = Proc::worker(&model, "cpu:0", &wflags);
    let rflags = tls_flags(&ca, "router");
    let rflags: Vec<&str> = rflags.iter().map(String::as_str).collect();
    let router = Proc::router(&model, &[&worker], &rflags);
    served(&router, "Through mutual TLS").await;

    // Callers of the worker's ExpertService.
    let router_tls =
        moe_tls::client::config(material(&ca, "router", &ca, Role::Router), Role::Worker)
            .expect("router config");
    info(worker.grpc, Some(router_tls.clone()))
        .await
        .expect("a router certificate of the cluster CA is accepted");
    let anon = info(worker.grpc, Some(anonymous(&ca))).await;
    assert_eq!(
        anon.as_ref().map_err(|s| s.code()),
        Err(tonic::Code::Unauthenticated),
        "no client certificate: {anon:?}"
    );
    // Health stays reachable without a client certificate (probes).
    let health = HealthClient::new(channel(worker.grpc, Some(anonymous(&ca))))
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without a client certificate");
    assert_eq!(health.into_inner().status, 1, "SERVING");
    // A worker-role certificate posing as a router: fails verification on the worker.
    let worker_as_router = moe_tls::client::config(
        material(&ca, "worker-as-router", &ca, Role::Worker),
        Role::Worker,
    )
    .expect("config");
    let e = info(worker.grpc, Some(worker_as_router)).await;
    assert!(e.is_err(), "worker role accepted as a router");
    assert_ne!(
        e.as_ref().map_err(|s| s.code()),
        Err(tonic::Code::Unauthenticated),
        "refused at the handshake, before any call: {e:?}"
    );
    // A router certificate of another CA.
    let foreign = moe_tls::client::config(
        material(&other, "foreign-router", &ca, Role::Router),
        Role::Worker,
    )
    .expect("config");
    assert!(
        info(worker.grpc, Some(foreign)).await.is_err(),
        "another CA's router got in"
    );
    // Plain TCP to a TLS port.
    assert!(
        info(worker.grpc, None).await.is_err(),
        "plain gRPC reached ExpertService"
    );
    // None of this disturbed serving.
    served(&router, "Still serving").await;

    // A router refuses a worker whose certificate another CA signed: it never routes to
    // it and gives up at its start-up deadline.
    let fflags = tls_flags(&other, "foreign-worker");
    let fflags: Vec<&str> = fflags.iter().map(String::as_str).collect();
    let foreign_worker = Proc::worker(&model, "cpu:0", &fflags);
    let addr = foreign_worker.grpc.to_string();
    let mut extra = vec!["--workers", addr.as_str(), "--startup-timeout-secs", "3"];
    extra.extend(rflags.iter().copied());
    let args = server_args("router", &model, &extra);
    let out = run_moe(&args, false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr), "the failure names the worker: {err}");

    // Rotation: a new worker certificate (same CA, new key) in the same files.
    let mut streams = moe_tests::cluster::Streams::start(
        router.grpc,
        &[GreedyReq::text("A stream across the rotation", 400)],
        Duration::from_secs(120),
    );
    streams.wait_all_started().await;
    let before = served_leaf(worker.grpc, &ca).await;
    let rotated = issue(&ca, "worker", "127.0.0.1", "worker");
    assert_ne!(before, leaf_in(&rotated), "a new certificate was issued");
    assert!(
        wait_until(PATIENCE, || worker
            .log()
            .contains("new handshakes use them")),
        "the worker never noticed the rotation:\n{}",
        worker.log()
    );
    assert_eq!(
        served_leaf(worker.grpc, &ca).await,
        leaf_in(&rotated),
        "new handshakes use the rotated certificate"
    );
    issue(&ca, "router", "router-0", "router");
    assert!(
        wait_until(PATIENCE, || router
            .log()
            .contains("new handshakes use them")),
        "the router never noticed the rotation:\n{}",
        router.log()
    );
    let batch = streams.finish().await;
    assert!(
        batch.iter().all(|r| r.is_ok()),
        "a stream open across the rotation failed: {batch:?}"
    );
    served(&router, "After the rotation").await;
}
