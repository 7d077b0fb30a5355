//! Starting a router: load the dense model, place the experts (on in-process device
//! actors, or on remote workers given statically), start the engine, serve gRPC and HTTP,
//! and drain on shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moe_control::{plan, DeviceSlot, PlacementPlan, PlanInput};
use moe_model::checkpoint::Checkpoint;
use moe_model::{ExpertBackend, LocalExperts, Model, ModelSpec, Tokenizer, WeightDtype};
use moe_proto::v1::generation_server::GenerationServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster_status::PlacementSource;
use crate::dispatch::{DispatchConfig, LocalBackend, RemoteBackend};
use crate::elastic::{self, EtcdMembership};
use crate::grpc::Api;
use crate::http::{router, HttpState};
use crate::metrics::RouterMetrics;
use crate::readiness::{self, Readiness};
use crate::scheduler::{Engine, EngineConfig};

/// Where the routed experts live.
#[derive(Debug, Clone)]
pub enum ExpertSource {
    /// Device actors in this process (standalone mode).
    Local { devices: Vec<String> },
    /// Remote workers at these addresses.
    Remote { workers: Vec<String> },
    /// Remote workers from the cluster membership in etcd; placement follows it.
    Etcd(Box<EtcdMembership>),
}

/// Everything a router needs, validated.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub model_dir: PathBuf,
    pub dtype: WeightDtype,
    pub experts: ExpertSource,
    pub engine: EngineConfig,
    pub dispatch: DispatchConfig,
    /// Copies of each expert.
    pub replicas: usize,
    /// How long workers may take to appear and load their experts.
    pub startup_timeout: Duration,
    /// How long in-flight requests may take to finish on shutdown.
    pub drain_timeout: Duration,
    /// The gRPC address other processes should use for this router (default: the bound
    /// address, or this host's address when bound to 0.0.0.0).
    pub advertise: Option<String>,
    /// Names the model is served under (`/v1/models`, the `model` field); empty: the
    /// checkpoint folder's name.
    pub served_model_names: Vec<String>,
    /// A Jinja file that replaces the checkpoint's chat template.
    pub chat_template: Option<PathBuf>,
    /// Keys the client APIs require (`Debug` prints only their count); empty: open.
    pub api_keys: crate::api_keys::ApiKeys,
    /// Export per-expert series (`moe_expert_tokens_total`, `moe_expert_copies`).
    pub metrics_expert_detail: bool,
    /// TLS on the client-facing ports (gRPC and HTTP): the certificate clients see.
    /// `None`: plain TCP. Separate from the cluster's mutual TLS to workers
    /// ([`DispatchConfig::worker_tls`](crate::DispatchConfig)).
    pub api_tls: Option<Arc<moe_tls::Material>>,
    /// Bounds on requests and client connections.
    pub limits: crate::limits::Limits,
}

/// The default served name: the checkpoint folder's name, never a path.
pub fn default_model_name(dir: &std::path::Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "model".to_owned())
}

/// Addresses a started router listens on.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

fn expert_keys(spec: &ModelSpec) -> Vec<(usize, u32)> {
    LocalExperts::all_of(spec)
}

/// The gRPC address this router records in etcd: `--advertise`, or what the bound
/// address resolves to; an unspecified address (nobody can dial it) is refused.
fn advertised(cfg: &RouterConfig, bound: SocketAddr) -> anyhow::Result<String> {
    if let Some(a) = &cfg.advertise {
        return Ok(a.clone());
    }
    let a = moe_control::advertise_address(bound);
    if a.parse::<SocketAddr>()
        .is_ok_and(|a| a.ip().is_unspecified())
    {
        anyhow::bail!("listening on {bound} and this host's name resolves to no other address: set --advertise to the address other routers and operators can dial");
    }
    Ok(a)
}

/// Window of `moe_layer_load_imbalance`.
const IMBALANCE_WINDOW: Duration = Duration::from_secs(15);

/// Sets `moe_layer_load_imbalance` from the load of each window and the placement.
async fn track_imbalance(
    metrics: RouterMetrics,
    placement: PlacementSource,
    stop: CancellationToken,
) {
    let seen = |m: &RouterMetrics| -> BTreeMap<(usize, u32), u64> { m.expert_load.snapshot() };
    let mut before = seen(&metrics);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(IMBALANCE_WINDOW) => {}
        }
        let now = seen(&metrics);
        let window: BTreeMap<(usize, u32), u64> = now
            .iter()
            .map(|(k, n)| (*k, n.saturating_sub(before.get(k).copied().unwrap_or(0))))
            .collect();
        for (layer, v) in crate::load::layer_imbalance(&window, &placement()) {
            metrics
                .layer_imbalance
                .with_label_values(&[layer.to_string().as_str()])
                .set(v);
        }
        before = now;
    }
}

fn log_plan(p: &PlacementPlan) {
    for (slot, experts) in &p.assignments {
        tracing::info!(worker = %slot.worker, device = %slot.device, experts = experts.len(), version = p.version, "placement");
    }
}

/// Runs a router until `shutdown` is cancelled. `on_ready` gets the bound addresses once
/// it serves.
pub async fn run_router(
    mut cfg: RouterConfig,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    let bound = Bound {
        grpc: grpc_listener.local_addr()?,
        http: http_listener.local_addr()?,
    };
    let spec = ModelSpec::from_dir(&cfg.model_dir)?;
    cfg.limits.check_model(spec.max_position_embeddings)?;
    cfg.dispatch.max_message_bytes = moe_worker::wire::max_dispatch_message_bytes(
        cfg.engine.max_batch_tokens,
        spec.hidden_size,
        spec.moe.top_k,
    );
    let tokenizer = Arc::new(Tokenizer::from_dir(&cfg.model_dir)?);
    let chat_template =
        crate::chat_template::ChatTemplate::load(&cfg.model_dir, cfg.chat_template.as_deref())?
            .map(Arc::new);
    if chat_template.is_none() {
        tracing::warn!("the model has no chat template: /v1/chat/completions answers 400 (pass --chat-template FILE)");
    }
    let model = {
        let (dir, spec, dtype) = (cfg.model_dir.clone(), spec.clone(), cfg.dtype);
        tokio::task::spawn_blocking(move || -> anyhow::Result<Model> {
            let ckpt = Checkpoint::open(&dir, spec.fp8_block)?;
            Ok(Model::load_from(&ckpt, spec, dtype)?)
        })
        .await??
    };
    let metrics = RouterMetrics::with_detail(cfg.metrics_expert_detail);
    metrics.set_build_info(&default_model_name(&cfg.model_dir));
    metrics.max_waiting.set(cfg.engine.max_waiting as i64);
    let mut extra_registries = Vec::new();
    let mut cluster_view = None;
    let mut static_view = None;
    let all_experts = expert_keys(&spec);
    let (backend, placement_source, ready_source): (
        Arc<dyn ExpertBackend>,
        PlacementSource,
        readiness::Source,
    ) = match &cfg.experts {
        ExpertSource::Local { devices } => {
            let node = moe_worker::Node::start(moe_worker::NodeConfig {
                model_dir: cfg.model_dir.clone(),
                devices: devices.clone(),
                dtype: cfg.dtype,
                worker_id: "local".into(),
                test_panic_at_compute: None,
                threads_per_device: None,
                capacity_bytes: 0,
            })
            .await?;
            let slots: Vec<DeviceSlot> = node
                .device_names()
                .into_iter()
                .map(|d| DeviceSlot {
                    worker: "local".into(),
                    device: d,
                    capacity_bytes: 0,
                    expert_bytes: spec.expert_bytes(cfg.dtype) as u64,
                })
                .collect();
            let experts = expert_keys(&spec);
            let mut placement = plan(&PlanInput {
                experts: &experts,
                expert_bytes: spec.expert_bytes_f32() as u64,
                devices: &slots,
                replicas: cfg.replicas,
                previous: None,
                load: None,
                extra_copies: 0,
            })?;
            placement.version = 1;
            log_plan(&placement);
            let assignments = placement
                .assignments
                .iter()
                .map(|(slot, set): (&DeviceSlot, &BTreeSet<(usize, u32)>)| {
                    (slot.device.clone(), set.iter().copied().collect())
                })
                .collect();
            node.load(1, assignments).await?;
            metrics.placement_version.set(1);
            extra_registries.push(node.metrics().registry().clone());
            let backend = Arc::new(LocalBackend::new(
                node,
                tokio::runtime::Handle::current(),
                cfg.dispatch.clone(),
                metrics.clone(),
            ));
            let copies = cfg.replicas.min(slots.len()).max(1);
            (
                backend,
                Arc::new(move || placement.clone()),
                readiness::Source::Local { copies },
            )
        }
        ExpertSource::Remote { .. } => {
            let (backend, seen) =
                crate::static_control::start(&cfg, &spec, &metrics, shutdown.child_token()).await?;
            static_view = Some(seen);
            let view = backend.clone();
            let ready = readiness::Source::Remote {
                backend: backend.clone(),
                experts: all_experts.clone(),
            };
            (backend, Arc::new(move || view.placement()), ready)
        }
        ExpertSource::Etcd(source) => {
            let backend = Arc::new(
                RemoteBackend::new(
                    Vec::new(),
                    spec.hidden_size,
                    tokio::runtime::Handle::current(),
                    cfg.dispatch.clone(),
                    metrics.clone(),
                )
                .with_wait_for_copies(),
            );
            let view = Arc::new(elastic::ClusterView::default());
            cluster_view = Some(view.clone());
            elastic::start(
                source,
                backend.clone(),
                metrics.clone(),
                view,
                &spec,
                cfg.replicas,
                cfg.startup_timeout,
                advertised(&cfg, bound.grpc)?,
                shutdown.child_token(),
            )
            .await?;
            let view = backend.clone();
            let ready = readiness::Source::Remote {
                backend: backend.clone(),
                experts: all_experts.clone(),
            };
            (backend, Arc::new(move || view.placement()), ready)
        }
    };
    let model = Arc::new(model);
    let engine = Engine {
        model: model.clone(),
        tokenizer: tokenizer.clone(),
        backend,
        config: cfg.engine.clone(),
        metrics: metrics.clone(),
    }
    .start()?;
    let api = Api {
        engine: engine.clone(),
        tokenizer,
        spec: Arc::new(spec),
        model_path: cfg.model_dir.display().to_string(),
        served_model_names: Arc::new(if cfg.served_model_names.is_empty() {
            vec![default_model_name(&cfg.model_dir)]
        } else {
            cfg.served_model_names.clone()
        }),
        metrics: metrics.clone(),
        chat_template,
        limits: Arc::new(cfg.limits.request.clone()),
    };
    let serving = Arc::new(AtomicBool::new(true));
    if cfg.api_keys.is_open() {
        tracing::warn!("no API keys configured: the HTTP /v1 API and gRPC Generation are unauthenticated (pass --api-key or --api-keys-file)");
    } else {
        tracing::info!(
            keys = cfg.api_keys.len(),
            "API keys required on /v1/* and moe.v1.Generation"
        );
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    // NOT_SERVING until the first readiness evaluation (a few ms: one probe round).
    health.set_not_serving::<GenerationServer<Api>>().await;
    let readiness = Readiness::new();
    readiness.follow_engine(engine.watch_stopped());
    let readiness_stop = CancellationToken::new();
    let readiness_task = tokio::spawn(readiness::run(
        ready_source,
        readiness.clone(),
        health.clone(),
        metrics.clone(),
        readiness_stop.clone(),
    ));
    tokio::spawn(track_imbalance(
        metrics.clone(),
        placement_source.clone(),
        readiness_stop.clone(),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcio-reflection and older tools still ask v1alpha.
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (grpc_tls, http_tls) = match &cfg.api_tls {
        Some(m) => (
            Some(moe_tls::server::config(
                m.clone(),
                None,
                moe_tls::server::ALPN_GRPC,
            )?),
            Some(moe_tls::server::config(
                m.clone(),
                None,
                moe_tls::server::ALPN_HTTP,
            )?),
        ),
        None => (None, None),
    };
    let grpc_stop = CancellationToken::new();
    let grpc = crate::limits::grpc_server(&cfg.limits.grpc)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(crate::limits::generation_service(
            api.clone(),
            cfg.api_keys.clone(),
            &cfg.limits.grpc,
        ))
        .serve_with_incoming_shutdown(
            moe_tls::server::incoming_stream(grpc_listener, grpc_tls),
            grpc_stop.clone().cancelled_owned(),
        );
    let http_stop = CancellationToken::new();
    let app = router(HttpState {
        api,
        extra_registries,
        serving: serving.clone(),
        readiness: readiness.clone(),
        placement: placement_source,
        cluster: cluster_view,
        static_workers: static_view,
        created: crate::http::unix_now(),
        api_keys: cfg.api_keys.clone(),
        limits: cfg.limits.http.clone(),
    });
    let grpc_task = tokio::spawn(grpc);
    let http_task = tokio::spawn(crate::http::server::serve(
        moe_tls::server::incoming(http_listener, http_tls),
        app,
        cfg.limits.http.clone(),
        http_stop.clone(),
    ));
    on_ready(bound);

    shutdown.cancelled().await;
    tracing::info!("shutting down: refusing new requests, draining in-flight ones");
    serving.store(false, Ordering::Release);
    readiness.set_draining();
    readiness_stop.cancel();
    let _ = readiness_task.await;
    metrics.ready.set(0);
    health.set_not_serving::<GenerationServer<Api>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    engine.begin_shutdown();
    if !engine.drained(cfg.drain_timeout).await {
        tracing::warn!(timeout = ?cfg.drain_timeout, "drain deadline passed with requests still running");
    }
    grpc_stop.cancel();
    http_stop.cancel();
    let _ = grpc_task.await;
    let _ = http_task.await;
    Ok(())
}
