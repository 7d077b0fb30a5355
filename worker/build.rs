//! Records the git commit this build comes from as `MOE_GIT_COMMIT` (for
//! `moe_build_info`): the variable when the builder sets it (container builds have no
//! `.git`), else `git rev-parse`, else "unknown".

fn main() {
    println!("cargo:rerun-if-env-changed=MOE_GIT_COMMIT");
    let commit = std::env::var("MOE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=MOE_GIT_COMMIT={commit}");
    // A new commit changes HEAD (or the ref it points at). In a git worktree HEAD is in
    // the worktree's own git dir but the branch refs are in the common one. Only paths
    // that exist are named: cargo reruns this script on every build for a missing one.
    let git = |arg: &str| {
        let out = std::process::Command::new("git")
            .args(["rev-parse", arg])
            .output()
            .ok()?;
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !dir.is_empty()).then_some(dir)
    };
    let watched = [
        git("--git-dir").map(|d| format!("{d}/HEAD")),
        git("--git-common-dir").map(|d| format!("{d}/refs/heads")),
        git("--git-common-dir").map(|d| format!("{d}/packed-refs")),
    ];
    for path in watched.into_iter().flatten() {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
