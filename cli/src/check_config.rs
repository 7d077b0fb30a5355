//! `--check-config` for `moe serve`, `moe router` and `moe worker`: validates the flags
//! and the files they name without starting anything, then prints the effective
//! configuration as one JSON object on stdout. Deployment checks run it with the exact
//! command line of every container, so a manifest that would crash-loop fails in CI.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use moe_model::{ModelSpec, Tokenizer};
use serde_json::{json, Value};

/// Checks that `addr` is `IP:PORT` (what the listeners bind) and returns it.
pub fn listen_addr(flag: &str, addr: &str) -> anyhow::Result<SocketAddr> {
    addr.parse::<SocketAddr>()
        .with_context(|| format!("{flag} {addr:?} is not an IP:PORT address"))
}

/// Checks that `addr` is `HOST:PORT` with a numeric port (an advertised or dialled
/// address; the host may be a DNS name).
pub fn host_port(flag: &str, addr: &str) -> anyhow::Result<()> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("{flag} {addr:?} has no :PORT"))?;
    anyhow::ensure!(!host.is_empty(), "{flag} {addr:?} has no host");
    port.parse::<u16>()
        .with_context(|| format!("{flag} {addr:?}: port {port:?} is not a number 0-65535"))?;
    Ok(())
}

/// Checks that an address others will dial is not an unspecified one (`0.0.0.0:P`),
/// which is what the default advertised address falls back to when this host's name
/// resolves to no other address.
pub fn dialable(flag: &str, advertised: &str) -> anyhow::Result<()> {
    if advertised
        .parse::<SocketAddr>()
        .is_ok_and(|a| a.ip().is_unspecified())
    {
        anyhow::bail!(
            "{flag} is an unspecified address and this host's name resolves to no other: others cannot dial {advertised}; set --advertise"
        );
    }
    Ok(())
}

/// Opens the checkpoint's config and tokenizer and describes the model.
pub fn model(dir: &Path) -> anyhow::Result<Value> {
    let spec = ModelSpec::from_dir(dir)
        .with_context(|| format!("--model {}: reading config.json", dir.display()))?;
    Tokenizer::from_dir(dir)
        .with_context(|| format!("--model {}: reading the tokenizer", dir.display()))?;
    Ok(json!({
        "path": dir.display().to_string(),
        "architecture": spec.arch.hf_class(),
        "layers": spec.num_layers,
        "routed_experts": spec.moe.num_experts,
    }))
}

/// Prints the effective configuration (one line of JSON) and returns.
pub fn print(config: &Value) -> anyhow::Result<()> {
    crate::out!("{config}");
    Ok(())
}
