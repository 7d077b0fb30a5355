//! moe-tests: end-to-end tests that drive the real `moe` binary live in `tests/`; this
//! library is their shared harness: where the binary is, and running it so that a
//! failure shows the command line and everything the process printed.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `moe` binary of this build (`target/<profile>/moe`), or `$MOE_BIN`.
pub fn moe_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MOE_BIN") {
        return PathBuf::from(p);
    }
    // Test executables live in target/<profile>/deps/; the binary one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let bin = dir.join(format!("moe{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} does not exist: build it first with `cargo build -p moe-cli` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Runs `moe ARGS`, returning its output; panics with the command line, exit status,
/// stdout and stderr when `expect_success` disagrees with the outcome.
pub fn run_moe(args: &[&str], expect_success: bool) -> Output {
    let bin = moe_bin();
    let out = Command::new(&bin)
        .args(args)
        .env("MOE_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    if out.status.success() != expect_success {
        panic!(
            "`{} {}` exited with {} (expected {})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            bin.display(),
            args.join(" "),
            out.status,
            if expect_success { "success" } else { "failure" },
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}
