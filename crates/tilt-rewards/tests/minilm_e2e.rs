//! all-MiniLM-L6-v2 in candle against sentence-transformers.
//!
//! `fixtures/minilm_embeddings.json` holds sentence-transformers' embeddings of 8 texts
//! (made by `fixtures/make_minilm_fixture.py` from the same files `tilt models fetch`
//! unpacks); ours must agree to cosine ≥ 0.999 each, from the same number of word pieces.
//! The model is fetched on first use.

use std::sync::{Arc, OnceLock};
use tilt_rewards::{MiniLmEmbedder, MiniLmRelevance, Reward, RewardError};

fn embedder() -> Arc<MiniLmEmbedder> {
    static E: OnceLock<Arc<MiniLmEmbedder>> = OnceLock::new();
    E.get_or_init(|| Arc::new(MiniLmEmbedder::load_default().expect("load MiniLM")))
        .clone()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    let na: f64 = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn embeddings_match_sentence_transformers() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/minilm_embeddings.json")).unwrap();
    assert_eq!(fixture["max_seq_length"], 256);
    let items = fixture["items"].as_array().unwrap();
    assert_eq!(items.len(), 8);
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    let reference: Vec<Vec<f32>> = items
        .iter()
        .map(|i| {
            i["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let e = embedder();
    assert_eq!(e.max_seq_length(), 256);
    // The same word pieces as sentence-transformers, truncation included (the last text
    // is cut at 256).
    let reference_tokens: Vec<usize> = items
        .iter()
        .map(|i| i["tokens"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(
        reference_tokens[7], 256,
        "the fixture's long text is truncated"
    );
    assert_eq!(e.token_counts(&texts).unwrap(), reference_tokens);
    let ours = e.embed(&texts).unwrap();
    let mut worst = 1.0f64;
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        assert_eq!(a.len(), 384);
        let norm: f64 = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "text {i}: norm {norm}");
        let c = cosine(a, b);
        worst = worst.min(c);
        assert!(c >= 0.999, "text {i} ({:?}): cosine {c}", texts[i]);
    }
    eprintln!("worst cosine to sentence-transformers: {worst:.7}");
    // Batch composition does not change an embedding beyond float noise.
    let alone = e.embed(&[texts[2]]).unwrap();
    assert!(cosine(&alone[0], &ours[2]) > 0.99999);
    // Same input, same bytes.
    assert_eq!(e.embed(&texts).unwrap(), ours);
}

#[test]
fn relevance_orders_related_above_unrelated() {
    let r = MiniLmRelevance::new(embedder(), None);
    assert_eq!(r.name(), "minilm-relevance");
    let prompt = "How do I bake sourdough bread at home?";
    let pairs = [
        (
            prompt,
            "Mix flour, water and starter, let it rise overnight, then bake it.",
        ),
        (prompt, "Quarterly revenue grew by twelve percent."),
        ("The cat sat on the mat.", "A kitten is resting on a rug."),
        ("The cat sat on the mat.", "Interest rates rose again."),
        (prompt, prompt),
    ];
    let s = r.score(&pairs).unwrap();
    assert!(s[0] > s[1] + 0.2, "{s:?}");
    assert!(s[2] > s[3] + 0.2, "{s:?}");
    assert!((s[4] - 1.0).abs() < 1e-5, "self-similarity {}", s[4]);
    assert!(s.iter().all(|x| (-1.0..=1.0 + 1e-5).contains(x)), "{s:?}");

    let t = MiniLmRelevance::new(embedder(), Some("a recipe for bread".into()));
    let s = t
        .score(&[
            ("ignored", "Knead the dough and bake it."),
            ("ignored", "Stocks fell."),
        ])
        .unwrap();
    assert!(s[0] > s[1] + 0.2, "{s:?}");
    assert!(t
        .artifacts()
        .iter()
        .any(|p| p.ends_with("model.safetensors")));
    assert_eq!(t.score(&[]).unwrap(), Vec::<f32>::new());
}

#[test]
fn missing_and_truncated_model_files_are_named() {
    let src = tilt_assets::default_reward_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = MiniLmEmbedder::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("config.json is missing"), "{err}");
    assert!(
        err.is_invalid_input(),
        "a directory given without its files: {err}"
    );
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let err = MiniLmEmbedder::load(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("model.safetensors is missing"),
        "{err}"
    );
    // A truncated copy: header intact, data cut short.
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), &bytes[..1 << 20]).unwrap();
    let err = MiniLmEmbedder::load(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RewardError::Invalid { .. }), "{err}");
    assert!(
        msg.contains("not a valid safetensors file") && msg.contains("truncated"),
        "{msg}"
    );
    // Garbage.
    std::fs::write(dir.path().join("model.safetensors"), b"not a model").unwrap();
    let msg = MiniLmEmbedder::load(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("not a valid safetensors file"), "{msg}");
    // A config that is not BERT's.
    std::fs::write(dir.path().join("config.json"), b"{\"vocab_size\": 3}").unwrap();
    let err = MiniLmEmbedder::load(dir.path()).unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("is not a BERT config"), "{msg}");
}

/// Same texts, same bytes, whatever the thread count: this test re-runs itself in child
/// processes with `RAYON_NUM_THREADS` = 1 and 2 (candle's CPU thread count) and compares the
/// embeddings bit for bit.
#[test]
fn embeddings_do_not_depend_on_the_thread_count() {
    const NAME: &str = "embeddings_do_not_depend_on_the_thread_count";
    let texts = [
        "The cat sat on the mat.",
        "Mix flour, water and starter, let it rise overnight, then bake at 230 degrees.",
        "Quarterly revenue grew by twelve percent, beating analyst expectations.",
    ];
    if let Ok(path) = std::env::var("TILT_MINILM_DUMP") {
        let emb = MiniLmEmbedder::load_default()
            .unwrap()
            .embed(&texts)
            .unwrap();
        let bytes: Vec<u8> = emb.iter().flatten().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(path, bytes).unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut dumps = Vec::new();
    for threads in ["1", "2"] {
        let path = dir.path().join(format!("threads{threads}"));
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--test-threads", "1"])
            .env("TILT_MINILM_DUMP", &path)
            .env("RAYON_NUM_THREADS", threads)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        dumps.push(std::fs::read(&path).unwrap());
    }
    assert_eq!(dumps[0].len(), 3 * 384 * 4);
    assert!(
        dumps[0] == dumps[1],
        "embeddings differ between 1 and 2 threads"
    );
}
