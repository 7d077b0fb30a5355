//! The control plane over a real etcd that requires TLS with client certificates and
//! has authentication enabled: a worker and a router given the CA, a client
//! certificate, a user and its password file join through it and serve; a router
//! without a client certificate, or with a wrong password, cannot join.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use moe_tests::cluster::free_port;
use moe_tests::{
    generate, http, path_str, run_moe, server_args, tiny_checkpoint, wait_until, GreedyReq, Proc,
};

/// etcd on 127.0.0.1 with `--client-cert-auth`; killed on drop.
struct TlsEtcd {
    child: Child,
    client_url: String,
    _data: tempfile::TempDir,
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_etcd(certs: &Path) -> TlsEtcd {
    let data = tempfile::tempdir().expect("tempdir");
    let (client, peer, metrics) = (free_port(), free_port(), free_port());
    let client_url = format!("https://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let file = |n: &str| certs.join(n).display().to_string();
    let log = std::fs::File::create(data.path().join("etcd.log")).expect("log");
    let child = Command::new("etcd")
        .args([
            "--name",
            "default",
            "--data-dir",
            &data.path().join("data").display().to_string(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("default={peer_url}"),
            "--listen-metrics-urls",
            &format!("http://127.0.0.1:{metrics}"),
            "--cert-file",
            &file("etcd.crt"),
            "--key-file",
            &file("etcd.key"),
            "--trusted-ca-file",
            &file("ca.crt"),
            "--client-cert-auth",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("cannot run etcd (apt-get install etcd-server)");
    let etcd = TlsEtcd {
        child,
        client_url,
        _data: data,
    };
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], metrics));
    assert!(
        wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(metrics).is_ok()
                && http(metrics, "GET", "/health", None)
                    .1
                    .contains("\"health\":\"true\"")
        }),
        "etcd with TLS did not become healthy"
    );
    etcd
}

/// Creates user root (password `password`) and turns authentication on.
async fn enable_auth(etcd: &TlsEtcd, certs: &Path, password: &str) {
    let read = |n: &str| std::fs::read(certs.join(n)).expect("cert file");
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")))
        .identity(Identity::from_pem(read("router.crt"), read("router.key")));
    let mut c = Client::connect(
        [etcd.client_url.as_str()],
        Some(ConnectOptions::new().with_tls(tls)),
    )
    .await
    .expect("connect to etcd over TLS");
    c.user_add("root", password, None).await.expect("user add");
    c.user_grant_role("root", "root").await.expect("grant root");
    c.auth_enable().await.expect("auth enable");
}

fn etcd_flags<'a>(
    url: &'a str,
    certs: &'a Path,
    identity: Option<&str>,
    password_file: &'a Path,
) -> Vec<String> {
    let file = |n: &str| certs.join(n).display().to_string();
    let mut f = vec![
        "--etcd".to_owned(),
        url.to_owned(),
        "--cluster".to_owned(),
        "secure".to_owned(),
        "--etcd-ca".to_owned(),
        file("ca.crt"),
        "--etcd-user".to_owned(),
        "root".to_owned(),
        "--etcd-password-file".to_owned(),
        password_file.display().to_string(),
    ];
    if let Some(id) = identity {
        f.extend([
            "--etcd-cert".to_owned(),
            file(&format!("{id}.crt")),
            "--etcd-key".to_owned(),
            file(&format!("{id}.key")),
        ]);
    }
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_joins_through_etcd_with_client_certificates_and_auth() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(tmp.path(), 53);
    let certs = tmp.path().join("certs");
    let dir = path_str(&certs);
    run_moe(&["cert", "new-ca", "--dir", dir], true);
    for (role, out) in [
        ("worker", "etcd"),
        ("router", "router"),
        ("worker", "worker"),
    ] {
        run_moe(
            &[
                "cert",
                "issue",
                "--dir",
                dir,
                "--role",
                role,
                "--name",
                "127.0.0.1",
                "--out",
                out,
            ],
            true,
        );
    }
    let etcd = start_etcd(&certs);
    enable_auth(&etcd, &certs, "s3cret").await;
    let good_pw = tmp.path().join("password");
    std::fs::write(&good_pw, "s3cret\n").expect("password file");

    let wflags = etcd_flags(&etcd.client_url, &certs, Some("worker"), &good_pw);
    let wflags: Vec<&str> = wflags.iter().map(String::as_str).collect();
    let worker = Proc::worker(&model, "cpu:0", &wflags);
    let rflags = etcd_flags(&etcd.client_url, &certs, Some("router"), &good_pw);
    let mut rflags: Vec<&str> = rflags.iter().map(String::as_str).collect();
    rflags.extend(["--min-workers", "1"]);
    let router = Proc::start(&server_args("router", &model, &rflags));
    let out = generate(
        router.grpc,
        GreedyReq::text("Through a secured etcd", 4).to_proto(),
    )
    .await
    .expect("served");
    assert!(out.last().is_some_and(|m| m.finish_reason != 0));
    drop((router, worker));

    // No client certificate: etcd refuses the connection; the router cannot join.
    let bad_pw = tmp.path().join("wrong");
    std::fs::write(&bad_pw, "not-the-password").expect("password file");
    for (what, identity, pw) in [
        ("no client certificate", None, &good_pw),
        ("a wrong password", Some("router"), &bad_pw),
    ] {
        let flags = etcd_flags(&etcd.client_url, &certs, identity, pw);
        let mut args: Vec<&str> = server_args(
            "router",
            &model,
            &["--startup-timeout-secs", "3", "--min-workers", "1"],
        );
        args.extend(flags.iter().map(String::as_str));
        let out = run_moe(&args, false);
        assert!(
            !out.status.success(),
            "{what}: the router joined: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
