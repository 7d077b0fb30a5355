//! `moe serve` (router with in-process device actors: the standalone cluster) and
//! `moe router` (router with remote workers). Flags → a validated `RouterConfig`; the
//! effective config is logged once; SIGTERM/SIGINT drain and exit.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use moe_model::tiny::{self, Size, StoreDtype, TinyOptions};
use moe_model::{Arch, WeightDtype};
use moe_router::api_keys::ApiKeys;
use moe_router::dispatch::DispatchConfig;
use moe_router::elastic::EtcdMembership;
use moe_router::scheduler::EngineConfig;
use moe_router::{run_router, ExpertSource, RouterConfig};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Checkpoint directory (Hugging Face format). `moe serve` without it serves the
    /// built-in demo model (random weights).
    #[arg(long, env = "MOE_MODEL")]
    model: Option<PathBuf>,
    /// gRPC listen address (port 0: any free port).
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// HTTP listen address: /v1/completions, /metrics, /health.
    #[arg(long, env = "MOE_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: String,
    /// In-process devices, one expert actor each (`moe serve` only; default
    /// `cpu:0,cpu:1`). A router hosts no experts, so it refuses this flag.
    #[arg(long, env = "MOE_DEVICES", value_delimiter = ',')]
    devices: Vec<String>,
    /// Worker addresses, host:port (`moe router` only).
    #[arg(long, env = "MOE_WORKERS", value_delimiter = ',')]
    workers: Vec<String>,
    /// etcd endpoints (`http://host:2379`, comma-separated; `moe router` only): take the
    /// workers from the cluster membership instead of `--workers`, and re-place experts
    /// when workers join or leave.
    #[arg(long, env = "MOE_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Cluster name: the etcd key prefix `/moe/<cluster>/` (with `--etcd`).
    #[arg(long, env = "MOE_CLUSTER", default_value = "default")]
    cluster: String,
    /// With `--etcd`: the gRPC address other processes see for this router, recorded in
    /// etcd and used for its default id (default: the --listen address, or this host's
    /// address when listening on 0.0.0.0).
    #[arg(long, env = "MOE_ADVERTISE")]
    advertise: Option<String>,
    /// With `--etcd`: registered workers to wait for before the first placement.
    #[arg(long, env = "MOE_MIN_WORKERS", default_value_t = 1)]
    min_workers: usize,
    /// With `--etcd`: this router's id in the controller election and under
    /// `/moe/<cluster>/routers/` (default: `router-<grpc address>`).
    #[arg(long, env = "MOE_ROUTER_ID")]
    router_id: Option<String>,
    /// With `--etcd`: TTL of this router's leases in seconds (controller candidacy,
    /// presence, load report). A dead controller is replaced within about this.
    #[arg(long, env = "MOE_LEASE_TTL_SECS", default_value_t = 10)]
    lease_ttl_secs: u64,
    /// With `--etcd`: every this many seconds the controller re-plans from the expert
    /// load the routers observed, giving hot experts extra copies (0: never).
    #[arg(long, env = "MOE_REBALANCE_INTERVAL_SECS", default_value_t = 0)]
    rebalance_interval_secs: u64,
    /// With `--rebalance-interval-secs`: extra copies, beyond `--expert-replicas`, the
    /// controller may give the hottest experts (device capacities still apply).
    #[arg(long, env = "MOE_HOT_COPIES", default_value_t = 8)]
    hot_copies: usize,
    /// Weight precision on CPU.
    #[arg(long, env = "MOE_DTYPE", default_value = "f32")]
    dtype: WeightDtype,
    /// Tokens per engine step (decodes + prefill chunks).
    #[arg(long, env = "MOE_MAX_BATCH_TOKENS", default_value_t = 512)]
    max_batch_tokens: usize,
    /// Sequences in the running batch.
    #[arg(long, env = "MOE_MAX_RUNNING", default_value_t = 64)]
    max_running: usize,
    /// Requests allowed to wait; beyond that RESOURCE_EXHAUSTED / HTTP 429.
    #[arg(long, env = "MOE_MAX_WAITING", default_value_t = 256)]
    max_waiting: usize,
    /// Test hook: the engine thread panics before its Nth step (what a dead engine does
    /// to requests and health; tests/tests/engine_panic.rs).
    #[arg(long, env = "MOE_TEST_ENGINE_PANIC_AT_STEP", hide = true)]
    test_engine_panic_at_step: Option<u64>,
    /// KV cache capacity in tokens.
    #[arg(long, env = "MOE_KV_TOKENS", default_value_t = 1 << 17)]
    kv_tokens: usize,
    /// Copies of each expert.
    #[arg(long, env = "MOE_EXPERT_REPLICAS", default_value_t = 1)]
    expert_replicas: usize,
    /// Deadline of one expert dispatch to one worker, in milliseconds.
    #[arg(long, env = "MOE_DISPATCH_TIMEOUT_MS", default_value_t = 10_000)]
    dispatch_timeout_ms: u64,
    /// Retries of a failed expert dispatch.
    #[arg(long, env = "MOE_DISPATCH_RETRIES", default_value_t = 3)]
    dispatch_retries: u32,
    /// How long a worker whose dispatch failed is skipped while another copy of its
    /// experts exists, in milliseconds.
    #[arg(long, env = "MOE_MARK_DOWN_MS", default_value_t = 5_000)]
    mark_down_ms: u64,
    /// Overlap expert dispatch with computation (router with workers): shared experts,
    /// and with --micro-batches 2 the other half of the step, are computed while a
    /// layer's rows are on the workers. `false`: every layer waits for its round trip.
    #[arg(long, env = "MOE_OVERLAP", default_value_t = true, action = clap::ArgAction::Set)]
    overlap: bool,
    /// With --overlap: split steps of two or more sequences into this many micro-batches
    /// (1 or 2), pipelined so that one half's dispatch overlaps the other's attention.
    /// 2 pays when the network, not the workers' compute, is the bottleneck: on CPU
    /// workers it reads every expert's weights twice per step (docs/benchmarks.md).
    #[arg(long, env = "MOE_MICRO_BATCHES", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    micro_batches: u8,
    /// Element type of rows sent to workers and of their answers: `f32` (exact: greedy
    /// tokens match `moe generate`) or `bf16` (half the bytes, rounded).
    #[arg(long, env = "MOE_DISPATCH_DTYPE", default_value = "f32", value_parser = ["f32", "bf16"])]
    dispatch_dtype: String,
    /// How long workers may take to appear and load experts, in seconds.
    #[arg(long, env = "MOE_STARTUP_TIMEOUT_SECS", default_value_t = 120)]
    startup_timeout_secs: u64,
    /// How long in-flight requests may take to finish on SIGTERM, in seconds.
    #[arg(long, env = "MOE_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    drain_timeout_secs: u64,
    /// Names clients use for the model in the HTTP API (`model`, `/v1/models`); repeat
    /// or separate with commas for aliases; the first is the default. Default: the
    /// checkpoint folder's name.
    #[arg(
        long = "served-model-name",
        env = "MOE_SERVED_MODEL_NAME",
        value_delimiter = ','
    )]
    served_model_name: Vec<String>,
    /// A Jinja chat template file for /v1/chat/completions, replacing the checkpoint's.
    #[arg(long, env = "MOE_CHAT_TEMPLATE")]
    chat_template: Option<PathBuf>,
    /// An API key clients must send (`Authorization: Bearer KEY` on /v1/*, `authorization`
    /// metadata on gRPC Generation); repeat, or separate with commas in the env var.
    /// No keys at all: the APIs are open.
    #[arg(
        long = "api-key",
        env = "MOE_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_key: Vec<String>,
    /// A file of API keys, one per line (blank lines and `#` comments ignored); re-read
    /// on SIGHUP, keeping the previous keys if it cannot be read.
    #[arg(long, env = "MOE_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// Also export per-expert series on /metrics (`moe_expert_tokens_total`,
    /// `moe_expert_copies`: layers × experts series, 14,848 for DeepSeek-V3). Per-expert
    /// load is always in /v1/cluster.
    #[arg(long, env = "MOE_METRICS_EXPERT_DETAIL")]
    metrics_expert_detail: bool,
    #[command(flatten)]
    limits: crate::limit_flags::LimitArgs,
    /// Validate the flags and the files they name, print the effective configuration as
    /// JSON on stdout and exit (0 when valid) without starting anything.
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    tls: crate::tls_args::ClusterTlsArgs,
    #[command(flatten)]
    api_tls: crate::tls_args::ApiTlsArgs,
    #[command(flatten)]
    etcd_security: crate::tls_args::EtcdSecurityArgs,
}

/// Which command is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Standalone,
    Router,
}

/// `--check-config`: the listeners and the model are checked too, then the effective
/// configuration is printed.
fn check_config(a: &ServeArgs, cfg: &RouterConfig, mode: Mode) -> anyhow::Result<()> {
    use crate::check_config as check;
    let grpc = check::listen_addr("--listen", &a.listen)?;
    let http = check::listen_addr("--http-listen", &a.http_listen)?;
    if let Some(adv) = &a.advertise {
        check::host_port("--advertise", adv)?;
    } else if matches!(cfg.experts, ExpertSource::Etcd(_)) {
        check::dialable("--listen", &moe_control::advertise_address(grpc))?;
    }
    let model = if a.model.is_some() {
        let context = moe_model::ModelSpec::from_dir(&cfg.model_dir)
            .map(|s| s.max_position_embeddings)
            .unwrap_or(usize::MAX);
        cfg.limits.check_model(context)?;
        check::model(&cfg.model_dir)?
    } else {
        serde_json::json!({"path": null, "builtin_demo": true})
    };
    let experts = match &cfg.experts {
        ExpertSource::Local { devices } => serde_json::json!({"local_devices": devices}),
        ExpertSource::Remote { workers } => {
            for w in workers {
                check::host_port("--workers", w)?;
            }
            serde_json::json!({"workers": workers})
        }
        ExpertSource::Etcd(m) => serde_json::json!({
            "etcd": m.endpoints, "cluster": m.cluster, "min_workers": m.min_workers,
            "router_id": m.router_id, "lease_ttl_secs": m.lease_ttl.as_secs(),
            "rebalance_interval_secs": m.rebalance_interval.map(|d| d.as_secs()),
            "hot_copies": m.hot_copies,
        }),
    };
    check::print(&serde_json::json!({
        "command": if mode == Mode::Standalone { "serve" } else { "router" },
        "grpc_listen": grpc.to_string(),
        "http_listen": http.to_string(),
        "advertise": a.advertise.clone().unwrap_or_else(|| moe_control::advertise_address(grpc)),
        "model": model,
        "dtype": format!("{:?}", cfg.dtype).to_lowercase(),
        "experts": experts,
        "expert_replicas": cfg.replicas,
        "max_batch_tokens": cfg.engine.max_batch_tokens,
        "max_running": cfg.engine.max_running,
        "max_waiting": cfg.engine.max_waiting,
        "kv_tokens": cfg.engine.kv_capacity_tokens,
        "dispatch_timeout_ms": cfg.dispatch.deadline.as_millis() as u64,
        "dispatch_retries": cfg.dispatch.max_retries,
        "mark_down_ms": cfg.dispatch.mark_down_for.as_millis() as u64,
        "overlap": cfg.dispatch.overlap,
        "micro_batches": cfg.dispatch.micro_batches,
        "dispatch_dtype": a.dispatch_dtype,
        "startup_timeout_secs": cfg.startup_timeout.as_secs(),
        "drain_timeout_secs": cfg.drain_timeout.as_secs(),
        "served_model_names": if !cfg.served_model_names.is_empty() {
            cfg.served_model_names.clone()
        } else if a.model.is_none() {
            vec![DEMO_DIR_NAME.to_owned()]
        } else {
            vec![moe_router::serve::default_model_name(&cfg.model_dir)]
        },
        "chat_template": cfg.chat_template.as_ref().map(|p| p.display().to_string()),
        // The count and the file only: keys never appear in output.
        "api_keys": {
            "count": cfg.api_keys.len(),
            "file": cfg.api_keys.file().map(|p| p.display().to_string()),
        },
        "metrics_expert_detail": cfg.metrics_expert_detail,
        "limits": crate::limit_flags::to_json(&cfg.limits),
        // Router-worker traffic (mutual TLS) and the client ports (TLS), each on or off.
        "mutual_tls": cfg.dispatch.worker_tls.is_some(),
        "api_tls": cfg.api_tls.is_some(),
    }))
}

/// The demo checkpoint's folder: `$MOE_CACHE_DIR`, else `$XDG_CACHE_HOME/moe-cluster`,
/// else `~/.cache/moe-cluster`.
fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MOE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("moe-cluster");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("moe-cluster"),
        None => std::env::temp_dir().join("moe-cluster"),
    }
}

/// The demo checkpoint's folder name, also its default served name.
const DEMO_DIR_NAME: &str = "demo-deepseek_v3-tiny-seed0";

/// Writes the built-in demo model on first use (deterministic: seed 0).
fn demo_model() -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join(DEMO_DIR_NAME);
    if dir.join("config.json").exists() && dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    // Write next to it, then rename: a crash never leaves a half-written demo behind.
    let tmp = cache_dir().join(format!(".demo-tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    tiny::write(
        &tmp,
        &TinyOptions {
            arch: Arch::DeepseekV3,
            size: Size::Tiny,
            dtype: StoreDtype::F32,
            seed: 0,
            max_shard_bytes: None,
        },
    )
    .with_context(|| format!("writing the demo model to {}", tmp.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("moving the demo model to {}", dir.display()))?;
    Ok(dir)
}

/// `--served-model-name` values: trimmed, non-empty, each once.
fn served_names(given: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for n in given.iter().map(|n| n.trim()) {
        anyhow::ensure!(!n.is_empty(), "--served-model-name: a name is empty");
        if !out.iter().any(|o| o == n) {
            out.push(n.to_owned());
        }
    }
    Ok(out)
}

pub fn run(a: ServeArgs, mode: Mode) -> anyhow::Result<()> {
    let model_dir = match (&a.model, mode) {
        (Some(m), _) => m.clone(),
        // Checking writes nothing: the demo model is described, not created.
        (None, Mode::Standalone) if a.check_config => PathBuf::new(),
        (None, Mode::Standalone) => {
            let d = demo_model()?;
            tracing::warn!(path = %d.display(), "serving the built-in demo model: a tiny DeepSeek-V3-style checkpoint with RANDOM weights (its text is gibberish); pass --model DIR for a real one");
            d
        }
        (None, Mode::Router) => anyhow::bail!("--model is required"),
    };
    // Router ↔ worker mutual TLS: a router needs it (or --insecure); `moe serve` has no
    // workers to talk to.
    let worker_tls = match mode {
        Mode::Router => a
            .tls
            .material(moe_tls::Role::Router)?
            .map(|m| moe_tls::client::config(m.clone(), moe_tls::Role::Worker).map(|c| (m, c)))
            .transpose()?,
        Mode::Standalone => {
            anyhow::ensure!(
                a.tls.tls_cert.is_none(),
                "--tls-cert is for `moe router` and `moe worker` (mutual TLS between them); `moe serve` serves its API over TLS with --api-tls-cert"
            );
            None
        }
    };
    let api_tls = a.api_tls.material()?;
    let experts = match mode {
        Mode::Standalone => {
            anyhow::ensure!(
                a.etcd.is_empty() && a.workers.is_empty(),
                "--etcd and --workers are `moe router` flags: `moe serve` hosts its experts in-process (--devices)"
            );
            let devices = if a.devices.is_empty() {
                vec!["cpu:0".to_owned(), "cpu:1".to_owned()]
            } else {
                a.devices.clone()
            };
            ExpertSource::Local { devices }
        }
        Mode::Router if !a.devices.is_empty() => anyhow::bail!(
            "--devices (MOE_DEVICES) is a `moe serve`/`moe worker` flag: a router hosts no experts"
        ),
        Mode::Router if !a.etcd.is_empty() => {
            anyhow::ensure!(
                a.workers.is_empty(),
                "--workers and --etcd exclude each other: workers come from one or the other"
            );
            anyhow::ensure!(a.min_workers > 0, "--min-workers must be at least 1");
            anyhow::ensure!(a.lease_ttl_secs > 0, "--lease-ttl-secs must be positive");
            let (tls, auth) = a.etcd_security.resolve(&a.etcd)?;
            ExpertSource::Etcd(Box::new(EtcdMembership {
                tls,
                auth,
                endpoints: a.etcd.clone(),
                cluster: a.cluster.clone(),
                min_workers: a.min_workers,
                router_id: a.router_id.clone(),
                lease_ttl: Duration::from_secs(a.lease_ttl_secs),
                rebalance_interval: (a.rebalance_interval_secs > 0)
                    .then(|| Duration::from_secs(a.rebalance_interval_secs)),
                hot_copies: a.hot_copies,
            }))
        }
        Mode::Router => {
            anyhow::ensure!(
                !a.workers.is_empty(),
                "--workers must list at least one worker address (host:port), or --etcd its membership"
            );
            ExpertSource::Remote {
                workers: a.workers.clone(),
            }
        }
    };
    anyhow::ensure!(
        a.max_batch_tokens > 0 && a.max_running > 0,
        "--max-batch-tokens and --max-running must be positive"
    );
    anyhow::ensure!(
        a.expert_replicas > 0,
        "--expert-replicas must be at least 1"
    );
    let cfg = RouterConfig {
        model_dir,
        dtype: a.dtype,
        experts,
        engine: EngineConfig {
            max_batch_tokens: a.max_batch_tokens,
            max_running: a.max_running,
            max_waiting: a.max_waiting.max(1),
            kv_capacity_tokens: a.kv_tokens,
            test_panic_at_step: a.test_engine_panic_at_step,
        },
        dispatch: DispatchConfig {
            deadline: Duration::from_millis(a.dispatch_timeout_ms.max(1)),
            max_retries: a.dispatch_retries,
            retry_backoff: Duration::from_millis(50),
            mark_down_for: Duration::from_millis(a.mark_down_ms),
            worker_tls: worker_tls.as_ref().map(|(_, c)| c.clone()),
            overlap: a.overlap,
            micro_batches: usize::from(a.micro_batches),
            dtype: if a.dispatch_dtype == "bf16" {
                moe_proto::rows::RowDtype::Bf16
            } else {
                moe_proto::rows::RowDtype::F32
            },
            ..DispatchConfig::default()
        },
        replicas: a.expert_replicas,
        startup_timeout: Duration::from_secs(a.startup_timeout_secs),
        drain_timeout: Duration::from_secs(a.drain_timeout_secs),
        advertise: a.advertise.clone(),
        served_model_names: served_names(&a.served_model_name)?,
        chat_template: a.chat_template.clone(),
        api_keys: ApiKeys::load(&a.api_key, a.api_keys_file.clone())?,
        metrics_expert_detail: a.metrics_expert_detail,
        api_tls: api_tls.clone(),
        limits: a.limits.limits()?,
    };
    if a.check_config {
        return check_config(&a, &cfg, mode);
    }
    tracing::info!(config = ?cfg, "starting router");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let grpc = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("binding --listen {}", a.listen))?;
        let http = tokio::net::TcpListener::bind(&a.http_listen)
            .await
            .with_context(|| format!("binding --http-listen {}", a.http_listen))?;
        // Certificates are re-read while serving (Kubernetes rotates Secrets in place).
        let every = a.tls.reload_every();
        for m in worker_tls.iter().map(|(m, _)| m).chain(api_tls.iter()) {
            m.watch(every);
        }
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            crate::signals::wait_for_termination().await;
            stop.cancel();
        });
        if cfg.api_keys.file().is_some() {
            tokio::spawn(crate::signals::reload_keys_on_hangup(cfg.api_keys.clone()));
        }
        let name = if mode == Mode::Standalone { "serve" } else { "router" };
        run_router(cfg, grpc, http, shutdown, |b| {
            // A closed stdout must not stop the server: these lines are only a courtesy.
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "moe {name} listening grpc={} http={}", b.grpc, b.http);
            let _ = writeln!(
                out,
                "try: curl -s http://{}/v1/completions -H 'content-type: application/json' -d '{{\"prompt\": \"Hello\", \"max_tokens\": 16, \"temperature\": 0}}'",
                b.http
            );
            let _ = out.flush();
        })
        .await
    })
}
