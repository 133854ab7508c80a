//! `tilt serve` on the real default models, driven by the official `openai` Python client
//! (installed on first use into a venv under $TILT_HOME, then reused): chat, completions,
//! `n = 2`, every strategy through `extra_body` with its `tilt` object, seeds, streaming,
//! and errors that name their field. The server runs on a free loopback port under
//! `timeout`, so it stops by itself even if the test is killed.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The openai client the test drives the server with.
const OPENAI_CLIENT: &str = "openai==1.109.1";

/// A venv with the openai client, created and cached on first use.
fn client_python() -> PathBuf {
    let venv = tilt_assets::tilt_home().join("test-venvs/openai-1.109.1");
    let python = venv.join("bin/python");
    let ready = venv.join(".installed");
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&venv);
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv")
            .success();
        assert!(ok, "creating the venv {}", venv.display());
        let ok = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                OPENAI_CLIENT,
            ])
            .status()
            .expect("pip install openai")
            .success();
        assert!(ok, "pip install {OPENAI_CLIENT}");
        std::fs::write(&ready, OPENAI_CLIENT).unwrap();
    }
    python
}

mod common;
use common::Server as Serve;

/// Start `tilt serve` on a free port; return it and its base URL once it serves.
fn serve(extra: &[&str]) -> (Serve, String) {
    let mut args = vec!["--threads", "2"];
    args.extend_from_slice(extra);
    let (server, url, _) = common::tilt_serve(Path::new(env!("CARGO_BIN_EXE_tilt")), &args);
    (server, url)
}

const CLIENT: &str = r#"
import json, sys
import openai
from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
out = {}
MODEL = client.models.list().data[0].id
out["model"] = MODEL
msgs = [{"role": "user", "content": "Name a fruit that is rich in vitamin C."}]

def chat(**kw):
    return client.chat.completions.create(model=MODEL, messages=msgs,
                                          max_tokens=12, **kw)

r = chat(seed=7, n=2)
out["chat"] = {
    "object": r.object, "n": len(r.choices),
    "texts": [c.message.content for c in r.choices],
    "finish": [c.finish_reason for c in r.choices],
    "tilt": [c.model_extra["tilt"] for c in r.choices],
    "usage": r.usage.model_dump(),
    "fingerprint": r.system_fingerprint,
}
out["chat_again"] = [c.message.content for c in chat(seed=7, n=2).choices]

strategies = {
    "bon": {"strategy": "bon", "candidates": 4, "return_candidates": True},
    "won": {"strategy": "won", "candidates": 4},
    "soft-bon": {"strategy": "soft-bon", "candidates": 4, "lambda": 1.0},
    "rewind": {"strategy": "rewind", "candidates": 2, "threshold": 0.5, "max_draws": 4},
    "cd-block": {"strategy": "cd-block", "block_k": 2, "block_m": 4},
    "cd-token": {"strategy": "cd-token", "lambda": 2.0, "top_k": 4},
}
out["strategies"] = {}
for name, extra in strategies.items():
    r = chat(seed=3, extra_body=extra)
    out["strategies"][name] = {"text": r.choices[0].message.content,
                               "tilt": r.choices[0].model_extra["tilt"],
                               "completion_tokens": r.usage.completion_tokens}

r = client.completions.create(model=MODEL, prompt="The capital of France is",
                              max_tokens=8, seed=1)
out["completion"] = {"object": r.object, "text": r.choices[0].text}

text = ""
last = None
usage = None
for chunk in chat(seed=7, n=1, stream=True, stream_options={"include_usage": True}):
    if chunk.choices:
        d = chunk.choices[0].delta.content
        text += d or ""
        if chunk.choices[0].finish_reason is not None:
            last = chunk.choices[0].model_extra.get("tilt")
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
out["stream"] = {"text": text, "tilt": last, "usage": usage,
                 "whole": chat(seed=7, n=1).choices[0].message.content}

out["errors"] = {}
for name, kw in {
    "misspelt": {"extra_body": {"candidatez": 4}},
    "unread": {"extra_body": {"strategy": "bon", "candidates": 2, "threshold": 0.5}},
    "n_zero": {"n": 0},
    "temperature": {"temperature": -1.0},
    "strategy": {"extra_body": {"strategy": "beam"}},
}.items():
    try:
        chat(**kw)
        out["errors"][name] = None
    except openai.BadRequestError as e:
        out["errors"][name] = {"status": e.status_code, "param": e.body.get("param"),
                               "message": e.body.get("message")}
print(json.dumps(out))
"#;

fn run_client(python: &Path, url: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let out = Command::new("timeout")
        .arg("600")
        .arg(python)
        .arg(&script)
        .arg(url)
        .output()
        .expect("run the client");
    assert!(
        out.status.success(),
        "client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the client prints JSON")
}

#[test]
fn the_openai_python_client_drives_every_strategy() {
    let python = client_python();
    // The scorer trained on this model in examples/cd, for the cd strategies.
    let scorer = format!(
        "cd={}/../../examples/cd/scorer.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let (_server, url) = serve(&["--scorer", &scorer]);
    let out = run_client(&python, &url);

    // The README's example names the model as the server lists it.
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let model = out["model"].as_str().unwrap();
    assert!(
        readme.contains(&format!("model=\"{model}\"")),
        "README's serve example should use model=\"{model}\""
    );

    let chat = &out["chat"];
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["n"], 2);
    assert_eq!(
        chat["texts"], out["chat_again"],
        "the same seed, the same answers"
    );
    assert_ne!(chat["texts"][0], chat["texts"][1], "two choices, two draws");
    for t in chat["tilt"].as_array().unwrap() {
        assert_eq!(t["strategy"], "sample");
        assert_eq!(t["units"], "nats");
        assert_eq!(t["seed"], 7);
        assert_eq!(t["kl_bound"], 0.0);
    }
    let usage = &chat["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(chat["fingerprint"].as_str().unwrap().starts_with("tilt-"));

    let s = &out["strategies"];
    for name in ["bon", "won", "soft-bon", "rewind", "cd-block", "cd-token"] {
        let t = &s[name]["tilt"];
        assert_eq!(t["strategy"], name, "{out}");
        assert_eq!(t["units"], "nats");
        assert!(t["kl_note"].is_string());
        assert!(s[name]["text"].is_string());
    }
    // Best-of-4: the bound log 4 − 3/4 nats, the best of the candidates returned, and usage
    // counting all four.
    let bon = &s["bon"]["tilt"];
    let bound = bon["kl_bound"].as_f64().unwrap();
    assert!((bound - (4f64.ln() - 0.75)).abs() < 1e-12, "{bound}");
    let cands = bon["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 4);
    let best = cands
        .iter()
        .map(|c| c["reward"].as_f64().unwrap())
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(bon["reward"].as_f64().unwrap(), best);
    assert!(s["bon"]["completion_tokens"].as_u64().unwrap() > 12);

    assert_eq!(out["completion"]["object"], "text_completion");
    assert!(out["completion"]["text"].is_string());

    let st = &out["stream"];
    assert_eq!(st["text"], st["whole"], "streamed = unstreamed");
    assert_eq!(st["tilt"]["strategy"], "sample");
    assert!(st["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    let e = &out["errors"];
    for (name, param) in [
        ("misspelt", "candidatez"),
        ("unread", "threshold"),
        ("n_zero", "n"),
        ("temperature", "temperature"),
        ("strategy", "strategy"),
    ] {
        assert_eq!(e[name]["status"], 400, "{name}: {e}");
        assert_eq!(e[name]["param"], param, "{name}: {e}");
        assert!(
            e[name]["message"].as_str().unwrap().contains(param),
            "{name}: {e}"
        );
    }
}
