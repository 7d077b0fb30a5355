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
    // A new commit changes HEAD (or the ref it points at).
    if let Ok(git_dir) = std::process::Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .output()
    {
        let dir = String::from_utf8_lossy(&git_dir.stdout).trim().to_owned();
        if !dir.is_empty() {
            println!("cargo:rerun-if-changed={dir}/HEAD");
            println!("cargo:rerun-if-changed={dir}/refs/heads");
        }
    }
}
