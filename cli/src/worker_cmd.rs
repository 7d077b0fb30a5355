//! `moe worker`: runs one worker process. Binds the gRPC and HTTP listeners, starts a
//! [`moe_worker::Node`] over the checkpoint with one actor per device, and serves
//! `ExpertService` (plus health and reflection) and `/metrics`, `/health` until SIGTERM
//! or SIGINT, then drains in-flight work within `--drain-timeout-secs` and exits 0.
//!
//! Once both listeners are bound and the node has started, it prints exactly one line
//! to stdout, `moe worker listening grpc=<addr> http=<addr>`, so that scripts and tests
//! that pass port 0 learn the ports.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use moe_control::{DeviceRecord, EtcdConfig, EtcdRegistry, Registry, WorkerRecord};
use moe_model::WeightDtype;
use moe_worker::{serve_worker_with, Node, NodeConfig, WorkerServeConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// Checkpoint directory (Hugging Face format). Only the tensors of the experts this
    /// worker is asked to host are read.
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
    /// Devices to host experts on, comma-separated (`cpu:0,cpu:1`); one actor each.
    #[arg(
        long,
        env = "MOE_DEVICES",
        default_value = "cpu:0",
        value_delimiter = ','
    )]
    devices: Vec<String>,
    /// gRPC listen address (HOST:PORT; port 0 picks a free port).
    #[arg(long, env = "MOE_WORKER_LISTEN", default_value = "127.0.0.1:50061")]
    listen: String,
    /// HTTP listen address for /metrics and /health (HOST:PORT; port 0 allowed).
    #[arg(long, env = "MOE_WORKER_HTTP_LISTEN", default_value = "127.0.0.1:9461")]
    http_listen: String,
    /// The address routers should use to reach this worker (default: the bound gRPC
    /// address, or this host's own address, resolved from its name, when listening on
    /// 0.0.0.0).
    #[arg(long, env = "MOE_WORKER_ADVERTISE")]
    advertise: Option<String>,
    /// Worker identifier (default: derived from the advertised address).
    #[arg(long, env = "MOE_WORKER_ID")]
    worker_id: Option<String>,
    /// Storage precision of loaded expert weights: f32, bf16 or int8 (blocks of 32
    /// weights with a scale; CPU kernel devices only).
    #[arg(long, env = "MOE_DTYPE", default_value = "f32")]
    dtype: WeightDtype,
    /// Compute threads of each device that computes on this host (`cpu:N`,
    /// `candle-cpu:N`); default: the available cores split evenly between them.
    #[arg(long, env = "MOE_THREADS_PER_DEVICE")]
    threads_per_device: Option<usize>,
    /// On SIGTERM/SIGINT, how long in-flight work may take to finish.
    #[arg(long, env = "MOE_DRAIN_TIMEOUT_SECS", default_value_t = 10)]
    drain_timeout_secs: u64,
    /// etcd endpoints (`http://host:2379`, comma-separated): register this worker in the
    /// cluster's membership so routers started with `--etcd` discover it.
    #[arg(long, env = "MOE_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Cluster name: the etcd key prefix `/moe/<cluster>/` (with `--etcd`).
    #[arg(long, env = "MOE_CLUSTER", default_value = "default")]
    cluster: String,
    /// Lease TTL of the registration, in seconds (kept alive every TTL/2); a worker that
    /// dies leaves the membership this long after.
    #[arg(long, env = "MOE_LEASE_TTL_SECS", default_value_t = 10)]
    lease_ttl_secs: u64,
    /// With `--etcd`, on SIGTERM: how long to wait for the controller to place this
    /// worker's experts elsewhere (it keeps serving meanwhile) before draining and exiting.
    #[arg(long, env = "MOE_LEAVE_TIMEOUT_SECS", default_value_t = 60)]
    leave_timeout_secs: u64,
    /// Memory each device may give to expert weights, in MiB, announced to the placement
    /// controller (0: unlimited on the host, 9/10 of the free memory on a GPU). Hot-expert
    /// copies fill what the base placement leaves.
    #[arg(long, env = "MOE_CAPACITY_MIB", default_value_t = 0)]
    capacity_mib: u64,
    /// Most rows one dispatch may carry (at least the routers' --max-batch-tokens); larger
    /// ones are refused before their rows are decoded, and the gRPC message limit is
    /// sized from it.
    #[arg(long, env = "MOE_MAX_DISPATCH_ROWS", default_value_t = moe_worker::wire::DEFAULT_MAX_DISPATCH_ROWS)]
    max_dispatch_rows: usize,
    /// Validate the flags and the files they name, print the effective configuration as
    /// JSON on stdout and exit (0 when valid) without starting anything.
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    tls: crate::tls_args::ClusterTlsArgs,
    #[command(flatten)]
    etcd_security: crate::tls_args::EtcdSecurityArgs,
    /// Test hook: the device actor that performs the Nth compute panics once.
    #[arg(long, env = "MOE_TEST_PANIC_AT_COMPUTE", hide = true)]
    test_panic_at_compute: Option<u64>,
}

/// Leaving on SIGTERM with a cluster: marks this worker draining in its record, so the
/// placement controller places its experts elsewhere, has the routers switch, then
/// unloads them here; waits (at most `timeout`) until this worker hosts nothing, still
/// serving dispatches meanwhile.
async fn leave_cluster(
    reg: &moe_control::Registration,
    record: &WorkerRecord,
    node: &Node,
    timeout: Duration,
) {
    let hosted = |n: &Node| -> usize { n.info().devices.iter().map(|d| d.experts.len()).sum() };
    if hosted(node) == 0 {
        return;
    }
    if !reg.state().is_registered() {
        tracing::warn!("etcd unreachable: cannot hand this worker's experts over; leaving (routers route around it)");
        return;
    }
    let draining = WorkerRecord {
        draining: true,
        ..record.clone()
    };
    if let Err(e) = reg.update(&draining) {
        tracing::warn!(error = %e, "could not mark this worker draining; leaving without handing over");
        return;
    }
    tracing::info!(
        experts = hosted(node),
        timeout_secs = timeout.as_secs(),
        "marked draining: waiting for the controller to move this worker's experts"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = hosted(node);
        if n == 0 {
            tracing::info!("experts handed over: leaving");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                experts = n,
                "experts not handed over within --leave-timeout-secs; leaving anyway"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A number that differs between two starts of the same worker: the start time in
/// nanoseconds mixed with the process id.
fn incarnation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 48)
}

/// `--check-config`: flags and the checkpoint, then the effective configuration.
fn check_config(args: &WorkerArgs) -> anyhow::Result<()> {
    use crate::check_config as check;
    let grpc = check::listen_addr("--listen", &args.listen)?;
    let http = check::listen_addr("--http-listen", &args.http_listen)?;
    if let Some(a) = &args.advertise {
        check::host_port("--advertise", a)?;
    } else if !args.etcd.is_empty() {
        check::dialable("--listen", &moe_control::advertise_address(grpc))?;
    }
    moe_worker::config::parse_devices(&args.devices).context("--devices")?;
    anyhow::ensure!(
        args.max_dispatch_rows > 0,
        "--max-dispatch-rows must be at least 1"
    );
    let model = check::model(&args.model)?;
    if !args.etcd.is_empty() {
        anyhow::ensure!(args.lease_ttl_secs > 0, "--lease-ttl-secs must be positive");
        let mut cfg =
            EtcdConfig::new(args.etcd.clone(), &args.cluster).context("--etcd/--cluster")?;
        args.etcd_security.apply(&mut cfg)?;
    }
    let tls = args.tls.material(moe_tls::Role::Worker)?;
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| moe_control::advertise_address(grpc));
    check::print(&serde_json::json!({
        "command": "worker",
        "grpc_listen": grpc.to_string(),
        "http_listen": http.to_string(),
        "advertise": advertise,
        "worker_id": args.worker_id.clone().unwrap_or_else(|| moe_control::id_from_address("worker", &advertise)),
        "model": model,
        "devices": args.devices,
        "dtype": args.dtype.as_str(),
        "etcd": args.etcd,
        "cluster": args.cluster,
        "lease_ttl_secs": args.lease_ttl_secs,
        "capacity_mib": args.capacity_mib,
        "threads_per_device": args.threads_per_device,
        "drain_timeout_secs": args.drain_timeout_secs,
        "leave_timeout_secs": args.leave_timeout_secs,
        "mutual_tls": tls.is_some(),
        "max_dispatch_rows": args.max_dispatch_rows,
    }))
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    if args.check_config {
        return check_config(&args);
    }
    anyhow::ensure!(
        args.max_dispatch_rows > 0,
        "--max-dispatch-rows must be at least 1"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("moe-worker")
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: WorkerArgs) -> anyhow::Result<()> {
    let tls = args.tls.material(moe_tls::Role::Worker)?;
    if let Some(m) = &tls {
        m.watch(args.tls.reload_every());
    }
    let grpc_listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding the gRPC listener on {}", args.listen))?;
    let http_listener = TcpListener::bind(&args.http_listen)
        .await
        .with_context(|| format!("binding the HTTP listener on {}", args.http_listen))?;
    let grpc_addr: SocketAddr = grpc_listener.local_addr()?;
    let http_addr: SocketAddr = http_listener.local_addr()?;
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| moe_control::advertise_address(grpc_addr));
    if args.advertise.is_none() && grpc_addr.ip().is_unspecified() {
        if advertise == grpc_addr.to_string() {
            // With etcd the advertised address is what routers dial: refuse a useless one.
            if !args.etcd.is_empty() {
                anyhow::bail!("listening on {grpc_addr} and this host's name resolves to no other address: set --advertise to the address routers dial");
            }
            tracing::warn!(
                %grpc_addr,
                "listening on an unspecified address without --advertise, and this host's name resolves to no other address: set --advertise"
            );
        } else {
            tracing::info!(
                %grpc_addr,
                %advertise,
                "listening on an unspecified address without --advertise: advertising this host's address"
            );
        }
    }
    let worker_id: String = args
        .worker_id
        .clone()
        .unwrap_or_else(|| moe_control::id_from_address("worker", &advertise));
    let drain_timeout = Duration::from_secs(args.drain_timeout_secs);
    tracing::info!(
        model = %args.model.display(),
        devices = ?args.devices,
        grpc = %grpc_addr,
        http = %http_addr,
        %advertise,
        %worker_id,
        dtype = ?args.dtype,
        drain_timeout_secs = args.drain_timeout_secs,
        max_dispatch_rows = args.max_dispatch_rows,
        test_panic_at_compute = ?args.test_panic_at_compute,
        "moe worker config"
    );

    let node = Node::start(NodeConfig {
        model_dir: args.model,
        devices: args.devices,
        dtype: args.dtype,
        worker_id: worker_id.clone(),
        test_panic_at_compute: args.test_panic_at_compute,
        threads_per_device: args.threads_per_device,
        capacity_bytes: args.capacity_mib.saturating_mul(1 << 20),
    })
    .await
    .context("starting the worker node")?;

    // Registered once the node is up; etcd being down now is not fatal (the registration
    // keeps retrying with backoff).
    let registration = if args.etcd.is_empty() {
        None
    } else {
        anyhow::ensure!(args.lease_ttl_secs > 0, "--lease-ttl-secs must be positive");
        let mut config =
            EtcdConfig::new(args.etcd.clone(), &args.cluster).context("--etcd/--cluster")?;
        args.etcd_security.apply(&mut config)?;
        let record = WorkerRecord {
            worker_id: worker_id.clone(),
            address: advertise.clone(),
            devices: node
                .info()
                .devices
                .into_iter()
                .map(|d| DeviceRecord {
                    name: d.name,
                    capacity_bytes: d.capacity_bytes,
                    kind: d.kind.to_owned(),
                    dtype: d.dtype.as_str().to_owned(),
                    expert_bytes: d.bytes_per_expert,
                })
                .collect(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            draining: false,
            incarnation: incarnation(),
        };
        let ttl = Duration::from_secs(args.lease_ttl_secs);
        let reg = EtcdRegistry::new(config)
            .register(record.clone(), ttl)
            .context("registering in etcd")?;
        tracing::info!(etcd = ?args.etcd, cluster = %args.cluster, ttl_secs = args.lease_ttl_secs, "registering in the cluster membership");
        Some((reg, record))
    };

    let shutdown = CancellationToken::new();

    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "moe worker listening grpc={grpc_addr} http={http_addr}"
        )?;
        out.flush()?;
    }

    let mut server = tokio::spawn(serve_worker_with(
        node.clone(),
        grpc_listener,
        http_listener,
        shutdown.clone(),
        WorkerServeConfig {
            drain_timeout,
            tls,
            max_dispatch_rows: args.max_dispatch_rows,
            ..WorkerServeConfig::default()
        },
    ));
    let ended_early = tokio::select! {
        _ = crate::signals::wait_for_termination() => None,
        r = &mut server => Some(r),
    };
    if ended_early.is_none() {
        tracing::info!("termination signal received: draining");
        if let Some((reg, record)) = &registration {
            leave_cluster(
                reg,
                record,
                &node,
                Duration::from_secs(args.leave_timeout_secs),
            )
            .await;
        }
    }
    shutdown.cancel();
    let served = match ended_early {
        Some(r) => r,
        None => server.await,
    }
    .context("the worker server task")
    .and_then(|r| r);
    if let Some((reg, _)) = registration {
        match tokio::time::timeout(Duration::from_secs(5), reg.revoke()).await {
            Ok(Ok(())) => tracing::info!("left the cluster membership"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "revoking the registration failed; it expires by TTL")
            }
            Err(_) => tracing::warn!("revoking the registration timed out; it expires by TTL"),
        }
    }
    node.stop().await;
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WorkerArgs,
    }

    #[test]
    fn flags_parse_with_defaults() {
        let cli =
            Cli::try_parse_from(["moe", "--model", "/m", "--devices", "cpu:0,cpu:1"]).unwrap();
        assert_eq!(cli.args.devices, ["cpu:0", "cpu:1"]);
        assert_eq!(cli.args.listen, "127.0.0.1:50061");
        assert_eq!(cli.args.http_listen, "127.0.0.1:9461");
        assert_eq!(cli.args.drain_timeout_secs, 10);
        assert_eq!(cli.args.dtype, WeightDtype::F32);
        assert!(cli.args.advertise.is_none());
        assert!(cli.args.test_panic_at_compute.is_none());
        assert!(cli.args.etcd.is_empty());
        assert_eq!(cli.args.cluster, "default");
        assert_eq!(cli.args.lease_ttl_secs, 10);
    }
}
