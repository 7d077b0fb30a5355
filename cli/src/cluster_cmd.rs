//! `moe cluster status`: what an operator asks first — which device hosts which experts,
//! whether any expert has no copy, and where the load goes. Reads the router's
//! `GET /v1/cluster` over plain HTTP.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use serde_json::Value;

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Print the placement in force and the per-expert and per-device load.
    Status(StatusArgs),
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The router's HTTP address (`--http-listen` of `moe router` / `moe serve`).
    #[arg(long, env = "MOE_ROUTER_HTTP", default_value = "127.0.0.1:8080")]
    router: String,
    /// Experts to list, hottest first.
    #[arg(long, env = "MOE_STATUS_TOP", default_value_t = 10)]
    top: usize,
    /// Print the raw JSON instead of tables.
    #[arg(long, env = "MOE_STATUS_JSON")]
    json: bool,
}

/// A minimal HTTP/1.1 GET (the router answers with Content-Length, no chunking).
fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let mut s = TcpStream::connect(addr)
        .with_context(|| format!("cannot connect to the router at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .context("reading the router's answer")?;
    let (head, body) = buf
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("the router answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

fn experts_summary(list: &[Value]) -> String {
    // Group by layer: "L1: 0,2,5  L2: 1,3".
    let mut by_layer: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for v in list {
        if let (Some(l), Some(e)) = (v[0].as_u64(), v[1].as_u64()) {
            by_layer.entry(l).or_default().push(e);
        }
    }
    by_layer
        .iter()
        .map(|(l, es)| {
            format!(
                "L{l}: {}",
                es.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
            )
        })
        .collect::<Vec<_>>()
        .join("  ")
}

/// The etcd side: controller, routers, workers, a placement being loaded.
fn print_membership(m: &Value) {
    crate::out!(
        "cluster {} | controller {} | this router {} ({}) | etcd {}",
        m["cluster"].as_str().unwrap_or("?"),
        m["controller"].as_str().unwrap_or("none"),
        m["router_id"].as_str().unwrap_or("?"),
        if m["this_router_is_controller"].as_bool() == Some(true) {
            "controller"
        } else {
            "follower"
        },
        if m["etcd_connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "DISCONNECTED (serving on the last membership seen)"
        },
    );
    for r in m["routers"].as_array().into_iter().flatten() {
        crate::out!(
            "  router {:<28} {:<22} routes by placement {}",
            r["id"].as_str().unwrap_or("?"),
            r["address"].as_str().unwrap_or("?"),
            r["placement_version"]
        );
    }
    for w in m["workers"].as_array().into_iter().flatten() {
        let state = match (w["routed"].as_bool(), w["draining"].as_bool()) {
            (_, Some(true)) => "draining",
            (Some(true), _) => "ready",
            _ => "joining (not routed yet)",
        };
        crate::out!(
            "  worker {:<28} {:<22} {}",
            w["id"].as_str().unwrap_or("?"),
            w["address"].as_str().unwrap_or("?"),
            state
        );
    }
    if let Some(l) = m.get("loading").filter(|l| l.is_object()) {
        let n: usize = l["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| d["experts"].as_array().map_or(0, Vec::len))
            .sum();
        crate::out!(
            "  loading placement {} ({n} expert copies), not routed to until ready",
            l["version"]
        );
    }
}

pub fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    let ClusterCommand::Status(a) = cmd;
    let body = get(&a.router, "/v1/cluster")?;
    let v: Value = serde_json::from_str(&body).context("the router's /v1/cluster is not JSON")?;
    if a.json {
        crate::out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    crate::out!("placement version {}", v["placement_version"]);
    if let Some(m) = v.get("membership").filter(|m| m.is_object()) {
        print_membership(m);
    }
    let missing = v["missing_experts"].as_array().map(Vec::len).unwrap_or(0);
    if missing > 0 {
        crate::out!(
            "WARNING: {missing} experts have no copy: {}",
            experts_summary(
                v["missing_experts"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
            )
        );
    }
    crate::out!(
        "{:<24} {:<8} {:>8} {:>12}  experts",
        "worker",
        "device",
        "experts",
        "tokens"
    );
    for d in v["devices"].as_array().into_iter().flatten() {
        let list = d["experts"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        crate::out!(
            "{:<24} {:<8} {:>8} {:>12}  {}",
            d["worker"].as_str().unwrap_or("?"),
            d["device"].as_str().unwrap_or("?"),
            list.len(),
            d["tokens"].as_u64().unwrap_or(0),
            experts_summary(list)
        );
    }
    crate::out!(
        "device load max/mean: {:.2}",
        v["device_load_max_over_mean"].as_f64().unwrap_or(0.0)
    );
    let mut experts: Vec<&Value> = v["experts"].as_array().into_iter().flatten().collect();
    experts.sort_by_key(|e| std::cmp::Reverse(e["tokens"].as_u64().unwrap_or(0)));
    crate::out!("hottest experts:");
    crate::out!(
        "{:>6} {:>7} {:>12} {:>7}",
        "layer",
        "expert",
        "tokens",
        "copies"
    );
    for e in experts.iter().take(a.top) {
        crate::out!(
            "{:>6} {:>7} {:>12} {:>7}",
            e["layer"].as_u64().unwrap_or(0),
            e["expert"].as_u64().unwrap_or(0),
            e["tokens"].as_u64().unwrap_or(0),
            e["copies"].as_u64().unwrap_or(0)
        );
    }
    Ok(())
}
