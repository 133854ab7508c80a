//! The Python package end to end: build `tilt` with maturin into a venv (created once and
//! cached under `$TILT_HOME/test-venvs`, with pinned numpy, pytest and maturin from PyPI),
//! then run its pytest suite (`crates/tilt-py/tests/test_*.py`): the theory against NumPy
//! and against the CLI's bits, the TRL contract, and the engine on the real models.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const PINS: [&str; 3] = ["numpy==2.2.6", "pytest==8.3.5", "maturin==1.9.6"];

fn tilt_home() -> PathBuf {
    std::env::var_os("TILT_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME or TILT_HOME");
            Path::new(&home).join(".cache/tilt")
        })
}

/// Run `cmd` to the end within `limit`, failing the test with its output otherwise.
fn run(what: &str, cmd: &mut Command, limit: Duration) -> String {
    let out_path = std::env::temp_dir().join(format!("tilt-py-{}-{what}.log", std::process::id()));
    let log = std::fs::File::create(&out_path).unwrap();
    let mut child = cmd
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what}: still running after {limit:?}:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    assert!(status.success(), "{what} failed ({status}):\n{text}");
    text
}

fn venv() -> PathBuf {
    let dir = tilt_home()
        .join("test-venvs")
        .join(format!("tilt-py-{}", PINS.join("-").replace("==", "")));
    let python = dir.join("bin/python");
    if !python.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        run(
            "venv",
            Command::new("python3").args(["-m", "venv"]).arg(&dir),
            Duration::from_secs(300),
        );
        let installed = std::panic::catch_unwind(|| {
            run(
                "pip-install-pins",
                Command::new(&python)
                    .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                    .args(PINS),
                Duration::from_secs(900),
            )
        });
        if let Err(e) = installed {
            let _ = std::fs::remove_dir_all(&dir);
            std::panic::resume_unwind(e);
        }
    }
    dir
}

#[test]
fn the_python_package_builds_and_its_tests_pass() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = venv();
    let python = venv.join("bin/python");
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // `pip install ./crates/tilt-py`, as a user does (maturin builds the extension in
    // release mode, in the workspace's target directory).
    run(
        "pip-install-tilt",
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(["--no-build-isolation", "--no-deps", "--force-reinstall"])
            .arg(crate_dir)
            .env("PATH", &path),
        Duration::from_secs(2400),
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate_dir.join("../../target"));
    let cli = target.join("debug/tilt");
    let mut pytest = Command::new(&python);
    pytest
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"])
        .arg(crate_dir.join("tests"))
        .current_dir(std::env::temp_dir())
        .env("PATH", &path);
    if cli.exists() {
        pytest.env("TILT_CLI", &cli);
    }
    let out = run("pytest", &mut pytest, Duration::from_secs(1200));
    println!("{out}");
    assert!(out.contains(" passed"), "{out}");
    assert!(!out.contains("failed"), "{out}");
}
