//! Real handshakes over loopback sockets between a worker-side server config and
//! router-side client configs: who gets in, who is refused, and rotation.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use moe_tls::dev_ca::{self, Pem};
use moe_tls::server::{self, PeerInfo, ServerIo, ALPN_GRPC};
use moe_tls::{client, Material, Role, TlsFiles};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn write(dir: &Path, name: &str, pem: &Pem, ca: &Pem) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        ca: Some(dir.join(format!("{name}-ca.crt"))),
    };
    std::fs::write(&files.cert, &pem.cert).expect("write cert");
    std::fs::write(&files.key, &pem.key).expect("write key");
    std::fs::write(files.ca.as_ref().expect("ca path"), &ca.cert).expect("write ca");
    files
}

/// A worker-side server on 127.0.0.1 that answers "ok" after reading one byte and
/// reports what it learnt about each peer.
async fn worker_server(material: Arc<Material>) -> (u16, tokio::sync::mpsc::Receiver<PeerInfo>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let cfg = server::config(material, Some(Role::Router), ALPN_GRPC).expect("server config");
    let mut conns = server::incoming(listener, Some(cfg));
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(Ok(mut io)) = conns.recv().await {
            let _ = tx.send(io.peer()).await;
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if io.read_exact(&mut b).await.is_ok() {
                    let _ = io.write_all(b"ok").await;
                    let _ = io.shutdown().await;
                }
                drop::<ServerIo>(io);
            });
        }
    });
    (port, rx)
}

/// Connects as `material` (expecting a worker) to `name`:`port`; Ok(reply) if the server
/// answered, Err(reason) if either side refused.
async fn call(material: Arc<Material>, name: &str, port: u16) -> Result<String, String> {
    let cfg = client::config(material, Role::Worker).expect("client config");
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let mut s = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    s.write_all(b"x").await.map_err(|e| e.to_string())?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    if out.is_empty() {
        return Err("closed without an answer".into());
    }
    Ok(out)
}

#[tokio::test]
async fn routers_of_the_cluster_ca_get_in_and_nobody_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dev_ca::new_ca("test CA", 30).expect("ca");
    let other_ca = dev_ca::new_ca("another CA", 30).expect("other ca");
    let names = vec!["127.0.0.1".to_owned(), "worker-0.test".to_owned()];
    let worker_pem = dev_ca::issue(&ca, Role::Worker, &names, 30).expect("worker cert");
    let worker = Material::load(write(dir.path(), "w", &worker_pem, &ca), Some(Role::Worker))
        .expect("worker material");
    let (port, mut peers) = worker_server(worker).await;

    let router = |pem: &Pem, ca: &Pem, name: &str| {
        Material::load(write(dir.path(), name, pem, ca), Some(Role::Router))
            .expect("router material")
    };
    let good = router(
        &dev_ca::issue(&ca, Role::Router, &["router-0".into()], 30).expect("router cert"),
        &ca,
        "good",
    );

    // A router of this CA, dialing the worker by IP or by DNS name: in, seen as router.
    assert_eq!(
        call(good.clone(), "127.0.0.1", port).await.as_deref(),
        Ok("ok")
    );
    let peer = peers.recv().await.expect("peer info");
    assert!(peer.tls && peer.roles == vec![Role::Router], "{peer:?}");
    assert_eq!(
        call(good.clone(), "worker-0.test", port).await.as_deref(),
        Ok("ok")
    );
    peers.recv().await.expect("peer info");

    // A name the worker's certificate does not carry: the router refuses the worker.
    let wrong_name = call(good.clone(), "worker-1.test", port).await;
    assert!(
        wrong_name.as_ref().is_err_and(|e| e.contains("handshake")),
        "{wrong_name:?}"
    );

    // A certificate with the worker role used as a client: refused by the worker.
    let as_worker = dev_ca::issue(&ca, Role::Worker, &["x".into()], 30).expect("cert");
    let files = write(dir.path(), "wrongrole", &as_worker, &ca);
    assert!(
        Material::load(files.clone(), Some(Role::Router)).is_err(),
        "a router must refuse to start with a worker certificate"
    );
    let wrong_role = Material::load(files, Some(Role::Worker)).expect("loads as a worker");
    // Dial as if it were a router (a client config from worker material).
    let refused = call(wrong_role, "127.0.0.1", port).await;
    assert!(refused.is_err(), "wrong role got in: {refused:?}");

    // A router certificate from another CA: refused by the worker; and a router that
    // trusts only the other CA refuses the worker.
    let foreign = router(
        &dev_ca::issue(&other_ca, Role::Router, &["r".into()], 30).expect("cert"),
        &ca,
        "foreign",
    );
    assert!(call(foreign, "127.0.0.1", port).await.is_err());
    let distrustful = router(
        &dev_ca::issue(&other_ca, Role::Router, &["r".into()], 30).expect("cert"),
        &other_ca,
        "distrustful",
    );
    let e = call(distrustful, "127.0.0.1", port).await;
    assert!(e.as_ref().is_err_and(|e| e.contains("handshake")), "{e:?}");
}

#[tokio::test]
async fn rotated_files_are_used_by_new_handshakes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dev_ca::new_ca("test CA", 30).expect("ca");
    let worker_pem = dev_ca::issue(&ca, Role::Worker, &["127.0.0.1".into()], 30).expect("cert");
    let worker_files = write(dir.path(), "w", &worker_pem, &ca);
    let worker = Material::load(worker_files.clone(), Some(Role::Worker)).expect("material");
    let (port, mut peers) = worker_server(worker.clone()).await;
    let router_pem = dev_ca::issue(&ca, Role::Router, &["r".into()], 30).expect("cert");
    let router_files = write(dir.path(), "r", &router_pem, &ca);
    let router = Material::load(router_files.clone(), Some(Role::Router)).expect("material");
    assert_eq!(
        call(router.clone(), "127.0.0.1", port).await.as_deref(),
        Ok("ok")
    );
    peers.recv().await.expect("peer");

    // Unchanged files: nothing to do. A half-written file: refused, old one kept.
    assert!(!worker.reload_if_changed().expect("reload"));
    std::fs::write(&worker_files.key, "-----BEGIN PRIVATE KEY-----\ntrunc").expect("write");
    assert!(worker.reload_if_changed().is_err());
    assert_eq!(
        call(router.clone(), "127.0.0.1", port).await.as_deref(),
        Ok("ok")
    );
    peers.recv().await.expect("peer");

    // The whole cluster moves to a new CA: worker first (its CA file lists both CAs
    // during the change), then the router.
    let new_ca = dev_ca::new_ca("new CA", 30).expect("new ca");
    let both = Pem {
        cert: format!("{}{}", ca.cert, new_ca.cert),
        key: String::new(),
    };
    let new_worker = dev_ca::issue(&new_ca, Role::Worker, &["127.0.0.1".into()], 30).expect("cert");
    write(dir.path(), "w", &new_worker, &both);
    assert!(worker.reload_if_changed().expect("reload"));
    // The router still trusts only the old CA: it refuses the rotated worker.
    assert!(call(router.clone(), "127.0.0.1", port).await.is_err());
    let new_router = dev_ca::issue(&new_ca, Role::Router, &["r".into()], 30).expect("cert");
    write(dir.path(), "r", &new_router, &new_ca);
    assert!(router.reload_if_changed().expect("reload"));
    assert_eq!(call(router, "127.0.0.1", port).await.as_deref(), Ok("ok"));
}
