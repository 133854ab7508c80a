//! Memory a batch needs, checked before it runs.

use crate::error::{EngineError, Result};

/// Bytes of memory `n` sequences need beyond the weights: the shared prompt's KV cache, each
/// sequence's own KV cache for `max_new_tokens` tokens, and two vocabulary-sized f32
/// vectors per sequence (log-probs in and out of the sampler).
///
/// ```text
/// bytes = (prompt_len + n·max_new_tokens)·kv_bytes_per_token + n·vocab·4·2
/// kv_bytes_per_token = 2 (K and V) · layers · kv_heads · head_dim · 4 (f32)
/// ```
pub fn batch_memory_bytes(
    n: usize,
    prompt_len: usize,
    max_new_tokens: usize,
    kv_bytes_per_token: u64,
    vocab: usize,
) -> u64 {
    let tokens = prompt_len as u64 + n as u64 * max_new_tokens as u64;
    tokens
        .saturating_mul(kv_bytes_per_token)
        .saturating_add(n as u64 * vocab as u64 * 8)
}

/// Refuse a batch whose [`batch_memory_bytes`] exceed `available_bytes`. `param` names the
/// parameter that sets the batch size (`n`, `block_k`, `reference_samples`, …), so that the
/// error says what to lower.
///
/// # Errors
/// [`EngineError::Invalid`] naming `param`, with the estimate and what is available.
pub fn check_batch_memory(
    param: &str,
    n: usize,
    prompt_len: usize,
    max_new_tokens: usize,
    kv_bytes_per_token: u64,
    vocab: usize,
    available_bytes: u64,
) -> Result<()> {
    let need = batch_memory_bytes(n, prompt_len, max_new_tokens, kv_bytes_per_token, vocab);
    if need > available_bytes {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(EngineError::invalid(
            param,
            format!(
                "a batch of {n} sequences of up to {max_new_tokens} new tokens needs about \
                 {:.2} GiB of KV cache and log-probabilities, more than the {:.2} GiB of memory \
                 available; lower {param} or max_new_tokens",
                gib(need),
                gib(available_bytes)
            ),
        ));
    }
    Ok(())
}

/// Memory available to this process now, from `/proc/meminfo`'s `MemAvailable` (None where
/// it cannot be read, e.g. off Linux).
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_and_the_refusal_name_the_parameter() {
        assert_eq!(
            batch_memory_bytes(2, 10, 5, 100, 3),
            (10 + 10) * 100 + 2 * 3 * 8
        );
        let e = check_batch_memory("block_k", 4096, 0, 4096, 1 << 20, 49152, 1 << 30).unwrap_err();
        assert_eq!(e.param(), Some("block_k"));
        assert!(e.to_string().contains("GiB"), "{e}");
        check_batch_memory("n", 1, 1, 1, 1, 1, 1 << 30).unwrap();
    }
}
