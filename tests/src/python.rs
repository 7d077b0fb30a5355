//! Python clients nobody here wrote (the official `openai` package, grpcio): the
//! interpreter of the cached venv that `scripts/python-clients.sh` makes, or
//! `$MOE_CLIENTS_PYTHON`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (the test crate's parent folder).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// A tool's path: `$env` when set, else the last line `scripts/<script>` prints (such
/// scripts install or build the tool when it is missing, then print where it is).
pub fn tool_path(env: &str, script: &str) -> String {
    if let Ok(p) = std::env::var(env) {
        return p;
    }
    let script = repo_root().join("scripts").join(script);
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| panic!("{} printed no path", script.display()))
}

/// The python of the clients' venv: `$MOE_CLIENTS_PYTHON`, else what
/// `scripts/python-clients.sh` prints last (it makes or reuses the venv).
pub fn clients_python() -> String {
    tool_path("MOE_CLIENTS_PYTHON", "python-clients.sh")
}

/// Runs `tests/python/<script>` with the clients' python and `args`; panics with its
/// output and `context` (the servers' logs) unless it exits 0 and prints `ALL OK`.
pub fn run_client_script(script: &str, args: &[String], context: impl FnOnce() -> String) {
    let python = clients_python();
    let script = repo_root().join("tests/python").join(script);
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "`{python} {} …` failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}\n--- servers ---\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        context()
    );
}
