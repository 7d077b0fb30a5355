//! A network namespace of the test's own ([`Netns`]), joined to the host by a veth pair
//! with addresses from 198.18.0.0/15 (the range reserved for network tests), so that a
//! test can run a process behind a link it can cut and heal. Nothing routes beyond the
//! pair: the namespace has no default route, and the host reaches only its /30.
//!
//! Needs root and iproute2's `ip`; [`Netns::create`] panics naming what is missing.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Runs `ip ARGS`; the error names the command and what it printed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        format!(
            "cannot run `ip {}` (is iproute2 installed?): {e}",
            args.join(" ")
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` exited with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS`, panicking with the reason on failure.
fn must_ip(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// The IPv4 addresses configured on the host now (`ip -o -4 addr show`).
fn host_addresses() -> String {
    Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A network namespace with a veth pair to the host: host side `198.18.a.b/30` ending
/// in 1, namespace side ending in 2, `lo` up inside. Dropping it deletes the namespace
/// and both ends of the pair.
pub struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: String,
    ns_ip: String,
}

impl Netns {
    /// Creates the namespace and its link; `tag` (a few letters) and the test's pid make
    /// the names unique. Panics with a clear message when it cannot (not root, no `ip`).
    pub fn create(tag: &str) -> Netns {
        static MADE: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let name = format!("moe-{tag}-{pid}-{n}");
        // Interface names are at most 15 bytes (pids are at most 7 digits).
        let host_if = format!("m{n}h{pid}");
        let ns_if = format!("m{n}n{pid}");
        // A /30 of 198.18.0.0/16 chosen by pid, skipping any already on the host
        // (198.19.0.0/16 is left to the container tests' Docker networks).
        let taken = host_addresses();
        let (host_ip, ns_ip) = (0..16_384u32)
            .map(|i| (pid + i) % 16_384)
            .map(|k| {
                let base = (198u32 << 24) | (18 << 16) | (k * 4);
                let ip4 = |x: u32| std::net::Ipv4Addr::from(base + x).to_string();
                (ip4(1), ip4(2))
            })
            .find(|(h, _)| !taken.contains(&format!(" {h}/")))
            .expect("a free /30 in 198.18.0.0/16");
        // A namespace of ours left by a killed run with the same pid (its owner is gone).
        let _ = ip(&["link", "del", &host_if]);
        let _ = ip(&["netns", "del", &name]);
        if let Err(e) = ip(&["netns", "add", &name]) {
            panic!(
                "this test needs its own network namespace and could not create one \
                 (it must run as root, with iproute2's `ip` on PATH): {e}"
            );
        }
        // From here on, Drop cleans up whatever was made.
        let ns = Netns {
            name,
            host_if,
            ns_if,
            host_ip,
            ns_ip,
        };
        must_ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ]);
        must_ip(&["link", "set", &ns.ns_if, "netns", &ns.name]);
        must_ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        must_ip(&["link", "set", &ns.host_if, "up"]);
        must_ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/30", ns.ns_ip),
            "dev",
            &ns.ns_if,
        ]);
        must_ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        must_ip(&["-n", &ns.name, "link", "set", &ns.ns_if, "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on the link (`198.18.a.b`, ending in 1).
    pub fn host_ip(&self) -> &str {
        &self.host_ip
    }

    /// The namespace's address on the link (ending in 2).
    pub fn ns_ip(&self) -> &str {
        &self.ns_ip
    }

    /// The command prefix that runs a program inside: `ip netns exec NAME`. `ip` execs
    /// the program, so the spawned pid is the program's own.
    pub fn exec_prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Cuts the link by taking the namespace's end down. The host's route to the /30
    /// stays (marked `linkdown`), so packets to the namespace are dropped silently on
    /// the pair rather than sent anywhere else; inside, the namespace has no route out.
    pub fn cut(&self) {
        must_ip(&["-n", &self.name, "link", "set", &self.ns_if, "down"]);
    }

    /// Brings the namespace's end up again.
    pub fn heal(&self) {
        must_ip(&["-n", &self.name, "link", "set", &self.ns_if, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting either end removes the pair; the namespace itself goes once the last
        // process in it has exited (the caller stops those first).
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
