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

/// The python of the clients' venv: `$MOE_CLIENTS_PYTHON`, else what
/// `scripts/python-clients.sh` prints last (it makes or reuses the venv).
pub fn clients_python() -> String {
    if let Ok(p) = std::env::var("MOE_CLIENTS_PYTHON") {
        return p;
    }
    let script = repo_root().join("scripts/python-clients.sh");
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
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .last()
        .expect("the script prints the python path")
        .trim()
        .to_owned()
}
