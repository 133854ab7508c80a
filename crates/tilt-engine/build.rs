//! Records the git commit the binary is built from (for run manifests) as the
//! `TILT_GIT_COMMIT` environment variable: `git rev-parse HEAD`, with `-dirty` when the
//! working tree has changes, or `unknown` outside a git checkout or without git.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = match git(&["rev-parse", "HEAD"]) {
        Some(c) if !c.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c}-dirty")
            } else {
                c
            }
        }
        _ => "unknown".to_string(),
    };
    println!("cargo:rustc-env=TILT_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves or the branch it points at advances.
    if let Some(git_dir) = git(&["rev-parse", "--git-dir"]) {
        let head = Path::new(&git_dir).join("HEAD");
        println!("cargo:rerun-if-changed={}", head.display());
        if let Ok(text) = std::fs::read_to_string(&head) {
            if let Some(r) = text.strip_prefix("ref: ") {
                println!(
                    "cargo:rerun-if-changed={}",
                    Path::new(&git_dir).join(r.trim()).display()
                );
            }
        }
        println!(
            "cargo:rerun-if-changed={}",
            Path::new(&git_dir).join("index").display()
        );
    }
    println!("cargo:rerun-if-changed=build.rs");
}
