//! `moe`: the one binary of moe-cluster. Thin by design: each subcommand parses its
//! flags into a typed config and calls the libraries.

mod bench_agreement;
mod bench_engine;
mod bench_proxy;
mod bench_serve;
mod cert_cmd;
mod check_config;
mod checkpoint_cmd;
mod cluster_cmd;
mod generate_cmd;
mod limit_flags;
mod progress;
mod serve_cmd;
mod signals;
mod stdout;
mod tls_args;
mod worker_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "moe",
    version,
    about = "Serve Mixture-of-Experts models over a cluster of modest devices"
)]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `moe_model=debug`.
    #[arg(long, env = "MOE_LOG", default_value = "info", global = true)]
    log: String,
    /// Log line format: `text` for people, `json` (one object per line) for log shippers.
    #[arg(long, env = "MOE_LOG_FORMAT", default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Checkpoint tools.
    Checkpoint {
        #[command(subcommand)]
        command: checkpoint_cmd::CheckpointCommand,
    },
    /// Offline batch inference over a JSONL file of requests.
    Generate(generate_cmd::GenerateArgs),
    /// The standalone cluster: router plus in-process expert actors (demo model by default).
    Serve(serve_cmd::ServeArgs),
    /// A router: attention and scheduling here, experts on `--workers`.
    Router(serve_cmd::ServeArgs),
    /// A worker: hosts expert shards on its devices, one actor per device.
    Worker(worker_cmd::WorkerArgs),
    /// Certificates for mutual TLS: a development CA, router and worker certificates.
    Cert {
        #[command(subcommand)]
        command: cert_cmd::CertCommand,
    },
    /// Cluster inspection.
    Cluster {
        #[command(subcommand)]
        command: cluster_cmd::ClusterCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Decode throughput of the engine in-process, side by side with candle-transformers.
    Engine(bench_engine::BenchEngineArgs),
    /// How close a lower precision (int8, bf16) stays to f32 on a checkpoint.
    Agreement(bench_agreement::BenchAgreementArgs),
    /// Load-test a running router over gRPC: throughput, TTFT, inter-token and end-to-end latency.
    Serve(bench_serve::BenchServeArgs),
    /// A TCP proxy that adds a one-way delay (and optionally a bandwidth cap), to put an
    /// emulated network between a router and its workers.
    Proxy(bench_proxy::BenchProxyArgs),
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        // Spans (the request id) go with every event: `span` and `spans` fields.
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    let result = match cli.command {
        Command::Checkpoint { command } => checkpoint_cmd::run(command),
        Command::Generate(args) => generate_cmd::run(args),
        Command::Cert { command } => cert_cmd::run(command),
        Command::Cluster { command } => cluster_cmd::run(command),
        Command::Serve(args) => serve_cmd::run(args, serve_cmd::Mode::Standalone),
        Command::Router(args) => serve_cmd::run(args, serve_cmd::Mode::Router),
        Command::Worker(args) => worker_cmd::run(args),
        Command::Bench { command } => match command {
            BenchCommand::Engine(args) => bench_engine::run(args),
            BenchCommand::Agreement(args) => bench_agreement::run(args),
            BenchCommand::Serve(args) => bench_serve::run(args),
            BenchCommand::Proxy(args) => bench_proxy::run(args),
        },
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
