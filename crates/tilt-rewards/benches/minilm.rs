//! MiniLM embedding throughput (sentences per second) on the default model, against the
//! figures in `docs/speed.md` (candle bert ≈ 79 sentences/s at batch 16 × 40 tokens;
//! sentence-transformers ≈ 143 on the same two cores).
//!
//! `cargo bench -p tilt-rewards --bench minilm` (build it in release: `cargo bench` does).

use std::time::Instant;
use tilt_rewards::{MiniLmEmbedder, MiniLmRelevance, Reward};

fn main() {
    let dir = tilt_assets::default_reward_dir().expect("MiniLM");
    let embedder = MiniLmEmbedder::load(&dir).expect("load");
    // ~40 word pieces each, distinct so nothing is cached.
    let texts: Vec<String> = (0..64)
        .map(|i| {
            format!(
                "Response number {i}: the quick brown fox jumps over the lazy dog while the \
                 committee reviews item {} of the quarterly budget and the weather stays mild.",
                i * 7
            )
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    embedder.embed(&refs[..16]).expect("warm-up");
    for batch in [1usize, 8, 16, 32] {
        let e = MiniLmEmbedder::load(&dir)
            .expect("load")
            .with_batch_size(batch);
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            e.embed(&refs).expect("embed");
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "minilm embed, batch {batch:>2}, 64 texts x ~40 tokens: {:7.1} sentences/s (best of 3)",
            refs.len() as f64 / best
        );
    }
    let reward = MiniLmRelevance::new(std::sync::Arc::new(embedder), None);
    let pairs: Vec<(&str, &str)> = refs.iter().map(|r| ("What does the fox do?", *r)).collect();
    let t = Instant::now();
    reward.score(&pairs).expect("score");
    println!(
        "minilm relevance, 64 pairs sharing one prompt: {:7.1} pairs/s",
        pairs.len() as f64 / t.elapsed().as_secs_f64()
    );
}
