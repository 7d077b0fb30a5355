//! Containers for the end-to-end tests that run the shipped image ([`Docker`]): run,
//! kill, pause, stop and start containers, cut them off a network and join them again,
//! read back published ports, addresses, exit codes and logs. Everything a [`Docker`]
//! creates is named with a per-run prefix (`moe-<tag>-<pid>-<n>`) and labelled with the
//! test's pid, and is removed when it is dropped, panicking or not; a panicking test first
//! prints every container's `docker logs`. Leftovers of runs that were killed before they
//! could clean up (their pid is gone) are removed by the next [`Docker::new`].
//!
//! Also the image side of the offline reference: [`generate_in_container`] runs
//! `moe generate` in a container of the image under test, so that the reference and the
//! cluster run the very same binary.
//!
//! The image comes from `MOE_TEST_IMAGE` ([`test_image`]); `scripts/test.sh` builds it and
//! exports it. Needs the `docker` CLI and a running Docker Engine.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::{GreedyReq, Tok};

/// The label every resource of ours carries; its value is the owning test's pid.
const OWNER_LABEL: &str = "moe-tests.owner";
/// How long one `docker` command may take (a `docker stop` waits for the drain).
const DOCKER_DEADLINE: Duration = Duration::from_secs(180);

/// The image under test, from `MOE_TEST_IMAGE`: `Some(image)`, or `None` when it is set to
/// the empty string (the container tests are deliberately skipped: this prints so).
/// Panics when it is unset, saying how to build the image.
pub fn test_image(test: &str) -> Option<String> {
    match std::env::var("MOE_TEST_IMAGE") {
        Ok(image) if image.is_empty() => {
            eprintln!("MOE_TEST_IMAGE is empty: container test {test} skipped");
            None
        }
        Ok(image) => Some(image),
        Err(_) => panic!(
            "MOE_TEST_IMAGE is not set: {test} runs the cluster from the shipped image. Run \
             scripts/test.sh (it builds the image and exports MOE_TEST_IMAGE), or build it with \
             `CARGO_PROFILE=dev bash scripts/build-image.sh moe-cluster:test` and \
             `export MOE_TEST_IMAGE=moe-cluster:test` (MOE_TEST_IMAGE=\"\" skips the container \
             tests)"
        ),
    }
}

/// Panics unless the local Docker Engine has `image`, naming `how` to make it.
pub fn require_image(image: &str, how: &str) {
    let out = docker_output(&["image", "inspect", "--format", "{{.Id}}", image], None);
    assert!(
        out.status.success(),
        "image {image} is missing: {how}\n{}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs `docker ARGS` (feeding `stdin` when given) under [`DOCKER_DEADLINE`]; panics when
/// docker cannot be run or does not finish in time.
fn docker_output(args: &[&str], stdin: Option<&str>) -> Output {
    let cmdline = format!("docker {}", args.join(" "));
    let mut child = Command::new("docker")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{cmdline}` (is docker installed?): {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("`{cmdline}`: writing stdin: {e}"));
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DOCKER_DEADLINE) {
        Ok(out) => out.unwrap_or_else(|e| panic!("`{cmdline}`: {e}")),
        Err(_) => panic!("`{cmdline}` did not finish within {DOCKER_DEADLINE:?}"),
    }
}

/// `docker ARGS`, panicking with the command line and what it printed unless it
/// succeeds; its stdout, trimmed.
fn docker(args: &[&str]) -> String {
    docker_in(args, None)
}

fn docker_in(args: &[&str], stdin: Option<&str>) -> String {
    let out = docker_output(args, stdin);
    if !out.status.success() {
        panic!(
            "`docker {}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// What one test created in the Docker Engine, removed on drop.
#[derive(Default)]
struct Created {
    containers: Vec<String>,
    networks: Vec<String>,
    volumes: Vec<String>,
}

/// The containers, networks and volumes of one test, under one name prefix.
pub struct Docker {
    prefix: String,
    pid: String,
    created: Mutex<Created>,
}

impl Docker {
    /// A fresh prefix `moe-<tag>-<pid>-<n>`; first removes what earlier runs whose
    /// process is gone left behind (killed before their drop could run).
    pub fn new(tag: &str) -> Docker {
        static MADE: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id().to_string();
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        remove_orphans();
        Docker {
            prefix: format!("moe-{tag}-{pid}-{n}"),
            pid,
            created: Mutex::default(),
        }
    }

    /// The full name of our resource `what`: `<prefix>-<what>`.
    pub fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    fn label(&self) -> String {
        format!("{OWNER_LABEL}={}", self.pid)
    }

    fn created(&self) -> std::sync::MutexGuard<'_, Created> {
        self.created
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A bridge network `<prefix>-<what>` on one /24 of `candidates` (tried in order: the
    /// first free one wins; a subnet in use by another network or on a host interface is
    /// skipped). A plain bridge, not `--internal`: Docker (20.10 here) publishes no port of
    /// a container on an internal network (`docker port` answers "No public port"). IP
    /// masquerading is off instead: the containers reach each other and the host's
    /// published ports reach them, but nothing of theirs is NATed out to other networks.
    /// Returns the network's name and its subnet.
    pub fn network(&self, what: &str, candidates: &[String]) -> (String, String) {
        let name = self.name(what);
        let on_host = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut tried = Vec::new();
        for subnet in candidates {
            // "198.19.7.0/24" → " 198.19.7." appears in `ip addr` when a host interface
            // (another test's bridge or veth) holds an address in it.
            let stem = subnet.rsplit_once('.').map_or(subnet.as_str(), |s| s.0);
            if on_host.contains(&format!(" {stem}.")) {
                continue;
            }
            let label = self.label();
            let args = [
                "network",
                "create",
                "--driver",
                "bridge",
                "--subnet",
                subnet,
                "--label",
                &label,
                "-o",
                "com.docker.network.bridge.enable_ip_masquerade=false",
                &name,
            ];
            let out = docker_output(&args, None);
            if out.status.success() {
                self.created().networks.push(name.clone());
                return (name, subnet.clone());
            }
            tried.push(format!(
                "{subnet}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        panic!(
            "no free subnet for network {name} among {} candidates:\n{}",
            candidates.len(),
            tried.join("\n")
        );
    }

    /// A named volume `<prefix>-<what>`; returns its name.
    pub fn volume(&self, what: &str) -> String {
        let name = self.name(what);
        let label = self.label();
        docker(&["volume", "create", "--label", &label, &name]);
        self.created().volumes.push(name.clone());
        name
    }

    /// `docker run -d --name <prefix>-<what> OPTIONS IMAGE ARGS`: starts a container in
    /// the background; returns its name.
    pub fn run(&self, what: &str, options: &[&str], image: &str, args: &[&str]) -> String {
        let name = self.name(what);
        // Recorded first: a container that was created but failed to start is removed too.
        self.created().containers.push(name.clone());
        let label = self.label();
        let mut all = vec!["run", "-d", "--name", &name, "--label", &label];
        all.extend_from_slice(options);
        all.push(image);
        all.extend_from_slice(args);
        docker(&all);
        name
    }

    /// `docker run --rm -i OPTIONS IMAGE ARGS` to completion with `stdin` as its input;
    /// returns its stdout. Panics with what it printed unless it exits 0.
    pub fn run_once(&self, options: &[&str], image: &str, args: &[&str], stdin: &str) -> String {
        let label = self.label();
        let mut all = vec!["run", "--rm", "-i", "--label", &label];
        all.extend_from_slice(options);
        all.push(image);
        all.extend_from_slice(args);
        docker_in(&all, Some(stdin))
    }

    /// The host address `docker port` reports for `container_port` (e.g. `8080/tcp`) of a
    /// container that published it (`-p 127.0.0.1::8080`).
    pub fn port(&self, container: &str, container_port: &str) -> SocketAddr {
        let out = docker(&["port", container, container_port]);
        let first = out.lines().next().unwrap_or_default();
        first
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("`docker port {container} {container_port}`: {out:?}: {e}"))
    }

    /// The container's IPv4 address on `network` (empty when it is not attached).
    pub fn ip(&self, container: &str, network: &str) -> String {
        let format = format!("{{{{with index .NetworkSettings.Networks \"{network}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}");
        docker(&["inspect", "--format", &format, container])
    }

    /// `docker inspect --format FORMAT CONTAINER`, trimmed.
    pub fn inspect(&self, container: &str, format: &str) -> String {
        docker(&["inspect", "--format", format, container])
    }

    /// `docker exec CONTAINER ARGS` to completion; its stdout, trimmed.
    pub fn exec(&self, container: &str, args: &[&str]) -> String {
        let mut all = vec!["exec", container];
        all.extend_from_slice(args);
        docker(&all)
    }

    /// The exit code of a container that has stopped (`.State.ExitCode`).
    pub fn exit_code(&self, container: &str) -> i64 {
        let code = self.inspect(container, "{{.State.ExitCode}}");
        code.parse()
            .unwrap_or_else(|e| panic!("exit code of {container}: {code:?}: {e}"))
    }

    /// True while the container runs (paused counts as running).
    pub fn is_running(&self, container: &str) -> bool {
        self.inspect(container, "{{.State.Running}}") == "true"
    }

    /// `docker kill` (SIGKILL), then waits until the container has stopped.
    pub fn kill(&self, container: &str) {
        docker(&["kill", container]);
        docker(&["wait", container]);
    }

    /// `docker pause`: every process of the container is frozen (cgroup freezer).
    pub fn pause(&self, container: &str) {
        docker(&["pause", container]);
    }

    /// `docker unpause`.
    pub fn unpause(&self, container: &str) {
        docker(&["unpause", container]);
    }

    /// `docker stop -t GRACE`: SIGTERM to PID 1, SIGKILL after `grace`; returns once the
    /// container has stopped.
    pub fn stop(&self, container: &str, grace: Duration) {
        let secs = grace.as_secs().to_string();
        docker(&["stop", "-t", &secs, container]);
    }

    /// `docker start`: runs a stopped container again, with the command it was made with.
    pub fn start(&self, container: &str) {
        docker(&["start", container]);
    }

    /// `docker network disconnect`: the container loses its interface on `network`.
    pub fn disconnect(&self, network: &str, container: &str) {
        docker(&["network", "disconnect", network, container]);
    }

    /// `docker network connect --ip IP`: attaches the container to `network` again, on
    /// the address it had (so that what it advertised stays true).
    pub fn connect(&self, network: &str, container: &str, ip: &str) {
        docker(&["network", "connect", "--ip", ip, network, container]);
    }

    /// Everything the container wrote to stdout and stderr so far (both, in that order).
    pub fn logs(&self, container: &str) -> String {
        let out = docker_output(&["logs", container], None);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Every container's logs, with a header each, for failure messages.
    pub fn describe(&self) -> String {
        let names = self.created().containers.clone();
        let mut out = String::new();
        for name in names {
            let state = docker_output(
                &[
                    "inspect",
                    "--format",
                    "{{.State.Status}} exit={{.State.ExitCode}} {{.Path}} {{join .Args \" \"}}",
                    &name,
                ],
                None,
            );
            out.push_str(&format!(
                "=== container {name}: {} ===\n{}\n",
                String::from_utf8_lossy(&state.stdout).trim(),
                self.logs(&name)
            ));
        }
        out
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.describe());
        }
        let created = std::mem::take(&mut *self.created());
        // Best effort, never panicking in drop: what is left is removed by the next run.
        let rm = |args: Vec<&str>| {
            let _ = Command::new("docker")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        if !created.containers.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(created.containers.iter().map(String::as_str));
            rm(args);
        }
        for n in &created.networks {
            rm(vec!["network", "rm", n]);
        }
        if !created.volumes.is_empty() {
            let mut args = vec!["volume", "rm", "-f"];
            args.extend(created.volumes.iter().map(String::as_str));
            rm(args);
        }
    }
}

/// Removes containers, networks and volumes labelled by a test process that is gone.
fn remove_orphans() {
    let alive = |pid: &str| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let filter = format!("label={OWNER_LABEL}");
    let format = format!("{{{{.ID}}}} {{{{.Label \"{OWNER_LABEL}\"}}}}");
    let list = |kind: &[&str]| -> Vec<String> {
        let mut args = kind.to_vec();
        args.extend(["--filter", &filter, "--format", &format]);
        let out = docker_output(&args, None);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, pid)| !alive(pid))
            .map(|(id, _)| id.to_owned())
            .collect()
    };
    let quiet = |args: Vec<&str>| {
        let _ = docker_output(&args, None);
    };
    for id in list(&["ps", "-a"]) {
        quiet(vec!["rm", "-f", "-v", &id]);
    }
    for id in list(&["network", "ls"]) {
        quiet(vec!["network", "rm", &id]);
    }
    // `docker volume ls --format` has no .ID: volumes are listed by name.
    let vformat = format!("{{{{.Name}}}} {{{{.Label \"{OWNER_LABEL}\"}}}}");
    let out = docker_output(
        &["volume", "ls", "--filter", &filter, "--format", &vformat],
        None,
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((name, pid)) = line.split_once(' ') {
            if !alive(pid) {
                quiet(vec!["volume", "rm", "-f", name]);
            }
        }
    }
}

/// Runs `moe generate` over `reqs` in a throw-away container of `image` that mounts the
/// checkpoint volume at `mount` (read-only): requests in on stdin, results out on stdout.
/// The tokens of each request, in order (read as [`crate::generate_offline`] reads them);
/// panics on an error line.
pub fn generate_in_container(
    docker: &Docker,
    image: &str,
    volume_mount: &str,
    model: &str,
    reqs: &[GreedyReq],
) -> Vec<Vec<Tok>> {
    let input: String = reqs
        .iter()
        .map(|r| r.to_json().to_string() + "\n")
        .collect();
    let out = docker.run_once(
        &["-v", volume_mount, "-e", "MOE_LOG=warn"],
        image,
        &[
            "generate",
            "--model",
            model,
            "--input",
            "/dev/stdin",
            "--output",
            "/dev/stdout",
        ],
        &input,
    );
    let toks: Vec<Vec<Tok>> = out
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("moe generate wrote a line that is not JSON ({e}): {l}")
            });
            assert!(v.get("error").is_none(), "moe generate failed a line: {v}");
            crate::offline_tokens(&v)
        })
        .collect();
    assert_eq!(
        toks.len(),
        reqs.len(),
        "one output line per request:\n{out}"
    );
    toks
}
