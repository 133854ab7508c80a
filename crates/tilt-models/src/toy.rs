//! A tiny, non-neural [`Policy`] whose sequence distribution can be enumerated exactly.
//!
//! Why it exists: the decoding strategies (best-of-n, worst-of-n, soft best-of-n, rewind,
//! controlled decoding) have exact output laws in tilt-core. To test an implementation
//! against its law we need a policy whose every sequence, and its probability, is known. A
//! neural model has too many; this one has a vocabulary of three letters and an end token,
//! and its next-token pmf depends on the previous token (a first-order Markov chain), so
//! sequences are not iid tokens and the tests see the effect of context.
//!
//! The model, exactly (rows: the last token of the context; columns: the next token):
//!
//! ```text
//!            a     b     c     <eos>
//! after a   0.10  0.40  0.30  0.20
//! after b   0.30  0.10  0.40  0.20
//! after c   0.40  0.30  0.10  0.20
//! ```
//!
//! Tokens: `a` = 0, `b` = 1, `c` = 2, `<eos>` = 3. `encode` maps each character `a`, `b`,
//! `c` to its token (any other character is an error); `decode` writes them back and skips
//! `<eos>`. The context holds [`ToyPolicy::CONTEXT_LENGTH`] tokens. The hidden state at a
//! position is the one-hot of the token there (4 entries) followed by the position divided
//! by the context length: enough for a prefix scorer to learn something.
//!
//! The policy counts its calls to [`Policy::prefill`] and [`Policy::step`] so that tests can
//! check that a strategy shares one prefill among its samples.

use crate::{ModelError, Policy, StepOutput, TokenId};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The end-of-sequence token of the toy policy.
pub const TOY_EOS: TokenId = 3;

/// Next-token probabilities by previous token (see the module docs).
const TRANSITIONS: [[f64; 4]; 3] = [
    [0.10, 0.40, 0.30, 0.20],
    [0.30, 0.10, 0.40, 0.20],
    [0.40, 0.30, 0.10, 0.20],
];

/// The toy policy (see the module docs).
///
/// ```
/// use tilt_models::{toy::ToyPolicy, Policy};
/// let toy = ToyPolicy::new();
/// let seqs = toy.enumerate_sequences(&[0], 2).unwrap();
/// let total: f64 = seqs.iter().map(|(_, p)| p).sum();
/// assert!((total - 1.0).abs() < 1e-12);
/// // "<eos>" right away after "a": 0.2.
/// assert!(seqs.contains(&(vec![3], 0.2)));
/// ```
#[derive(Debug, Default)]
pub struct ToyPolicy {
    prefill_calls: AtomicUsize,
    step_calls: AtomicUsize,
}

impl ToyPolicy {
    /// Longest context (prompt + generated tokens).
    pub const CONTEXT_LENGTH: usize = 32;
    /// Vocabulary size: `a`, `b`, `c`, `<eos>`.
    pub const VOCAB: usize = 4;

    /// A new toy policy with zeroed call counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times [`Policy::prefill`] ran.
    pub fn prefill_calls(&self) -> usize {
        self.prefill_calls.load(Ordering::SeqCst)
    }

    /// How many times [`Policy::step`] ran (one per batched step).
    pub fn step_calls(&self) -> usize {
        self.step_calls.load(Ordering::SeqCst)
    }

    /// The exact next-token pmf after `last` (a, b or c).
    ///
    /// # Errors
    /// `last` is `<eos>` or out of the vocabulary.
    pub fn next_token_probs(&self, last: TokenId) -> Result<[f64; 4], ModelError> {
        TRANSITIONS.get(last as usize).copied().ok_or_else(|| {
            ModelError::InvalidInput(format!(
                "toy policy: no continuation after token {last} (only a=0, b=1, c=2 continue)"
            ))
        })
    }

    /// Every response the policy can generate after `prompt_tokens` with at most `max_new`
    /// new tokens, with its exact probability. A response either ends with `<eos>` (included
    /// in the list) or has exactly `max_new` tokens. Probabilities sum to 1.
    ///
    /// # Errors
    /// An empty or invalid prompt, `max_new` = 0, or prompt + `max_new` beyond the context.
    pub fn enumerate_sequences(
        &self,
        prompt_tokens: &[TokenId],
        max_new: usize,
    ) -> Result<Vec<(Vec<TokenId>, f64)>, ModelError> {
        self.check_prompt(prompt_tokens)?;
        if max_new == 0 {
            return Err(ModelError::InvalidInput(
                "toy policy: max_new must be >= 1".into(),
            ));
        }
        if prompt_tokens.len() + max_new > Self::CONTEXT_LENGTH {
            return Err(ModelError::InvalidInput(format!(
                "toy policy: prompt of {} tokens + {max_new} new tokens exceeds the context of {}",
                prompt_tokens.len(),
                Self::CONTEXT_LENGTH
            )));
        }
        let last = *prompt_tokens
            .last()
            .ok_or_else(|| ModelError::Internal("checked prompt is empty".into()))?;
        let mut out = Vec::new();
        let mut stack: Vec<(Vec<TokenId>, TokenId, f64)> = vec![(Vec::new(), last, 1.0)];
        while let Some((seq, last, p)) = stack.pop() {
            let probs = self.next_token_probs(last)?;
            for (tok, &q) in probs.iter().enumerate() {
                let mut s = seq.clone();
                s.push(tok as TokenId);
                let ps = p * q;
                if tok as TokenId == TOY_EOS || s.len() == max_new {
                    out.push((s, ps));
                } else {
                    stack.push((s, tok as TokenId, ps));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn check_prompt(&self, tokens: &[TokenId]) -> Result<(), ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::InvalidInput("toy policy: empty prompt".into()));
        }
        if tokens.len() > Self::CONTEXT_LENGTH {
            return Err(ModelError::InvalidInput(format!(
                "toy policy: prompt of {} tokens is longer than the context of {}",
                tokens.len(),
                Self::CONTEXT_LENGTH
            )));
        }
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t >= TOY_EOS) {
            return Err(ModelError::InvalidInput(format!(
                "toy policy: prompt token {i} is {t}; prompts hold only a=0, b=1, c=2"
            )));
        }
        Ok(())
    }

    /// The output at a position holding `token` at index `position` of the context.
    fn output_at(&self, token: TokenId, position: usize) -> StepOutput {
        let mut hidden = vec![0.0f32; Self::VOCAB + 1];
        hidden[token as usize] = 1.0;
        hidden[Self::VOCAB] = position as f32 / Self::CONTEXT_LENGTH as f32;
        // After <eos> the chain stays at <eos> (never sampled by well-behaved callers).
        let log_probs = match TRANSITIONS.get(token as usize) {
            Some(row) => row.iter().map(|p| p.ln() as f32).collect(),
            None => {
                let mut v = vec![f32::NEG_INFINITY; Self::VOCAB];
                v[TOY_EOS as usize] = 0.0;
                v
            }
        };
        StepOutput { log_probs, hidden }
    }

    fn append(&self, cache: &mut Vec<TokenId>, token: TokenId) -> Result<StepOutput, ModelError> {
        if token as usize >= Self::VOCAB {
            return Err(ModelError::InvalidInput(format!(
                "toy policy: token {token} is outside the vocabulary of {}",
                Self::VOCAB
            )));
        }
        if cache.len() >= Self::CONTEXT_LENGTH {
            return Err(ModelError::InvalidInput(format!(
                "toy policy: the context of {} tokens is full",
                Self::CONTEXT_LENGTH
            )));
        }
        cache.push(token);
        Ok(self.output_at(token, cache.len() - 1))
    }
}

impl Policy for ToyPolicy {
    type Cache = Vec<TokenId>;

    fn name(&self) -> &str {
        "toy-markov-abc"
    }

    fn vocab_size(&self) -> usize {
        Self::VOCAB
    }

    fn hidden_size(&self) -> usize {
        Self::VOCAB + 1
    }

    fn context_length(&self) -> usize {
        Self::CONTEXT_LENGTH
    }

    fn eos_token_ids(&self) -> &[TokenId] {
        &[TOY_EOS]
    }

    fn encode(&self, text: &str) -> Result<Vec<TokenId>, ModelError> {
        text.chars()
            .enumerate()
            .map(|(i, c)| match c {
                'a' => Ok(0),
                'b' => Ok(1),
                'c' => Ok(2),
                other => Err(ModelError::Tokenizer(format!(
                    "toy policy: character {i} is {other:?}; the vocabulary is a, b, c"
                ))),
            })
            .collect()
    }

    fn decode(&self, tokens: &[TokenId]) -> Result<String, ModelError> {
        tokens
            .iter()
            .filter(|&&t| t != TOY_EOS)
            .map(|&t| match t {
                0 => Ok('a'),
                1 => Ok('b'),
                2 => Ok('c'),
                other => Err(ModelError::Tokenizer(format!(
                    "toy policy: token {other} is outside the vocabulary of {}",
                    Self::VOCAB
                ))),
            })
            .collect()
    }

    /// The toy has no chat template: one user message renders as its text.
    fn render_chat(&self, messages: &[crate::ChatMessage]) -> Result<String, ModelError> {
        crate::chat_template::render_without_template(self.name(), messages)
    }

    fn prefill(&self, tokens: &[TokenId]) -> Result<(Self::Cache, StepOutput), ModelError> {
        self.prefill_calls.fetch_add(1, Ordering::SeqCst);
        self.check_prompt(tokens)?;
        let cache = tokens.to_vec();
        let last = cache.len() - 1;
        let out = self.output_at(cache[last], last);
        Ok((cache, out))
    }

    fn step(
        &self,
        caches: &mut [Self::Cache],
        tokens: &[TokenId],
    ) -> Result<Vec<StepOutput>, ModelError> {
        self.step_calls.fetch_add(1, Ordering::SeqCst);
        if caches.len() != tokens.len() {
            return Err(ModelError::InvalidInput(format!(
                "toy policy: step got {} caches and {} tokens",
                caches.len(),
                tokens.len()
            )));
        }
        caches
            .iter_mut()
            .zip(tokens)
            .map(|(c, &t)| self.append(c, t))
            .collect()
    }

    fn extend(
        &self,
        cache: &mut Self::Cache,
        tokens: &[TokenId],
    ) -> Result<Vec<StepOutput>, ModelError> {
        tokens.iter().map(|&t| self.append(cache, t)).collect()
    }

    fn cache_len(&self, cache: &Self::Cache) -> usize {
        cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enumeration_sums_to_one_and_matches_response_log_probs() {
        let toy = ToyPolicy::new();
        let prompt = toy.encode("ab").unwrap();
        let seqs = toy.enumerate_sequences(&prompt, 3).unwrap();
        // 3 sequences of length 3 ending without eos + those ending with eos at 1..=3:
        // 1 + 3 + 9 (eos) + 27 (length) = 40.
        assert_eq!(seqs.len(), 1 + 3 + 9 + 27);
        let total: f64 = seqs.iter().map(|(_, p)| p).sum();
        assert!((total - 1.0).abs() < 1e-12);
        for (resp, p) in &seqs {
            let lps = toy.response_log_probs(&prompt, resp).unwrap();
            let sum: f64 = lps.iter().map(|&l| f64::from(l)).sum();
            assert!((sum - p.ln()).abs() < 1e-5, "{resp:?}: {sum} vs {}", p.ln());
        }
        // By hand: after "b", "c" then <eos>: 0.4 * 0.2.
        assert!(seqs.contains(&(vec![2, 3], 0.4 * 0.2)));
    }

    #[test]
    fn encode_decode_round_trip_and_errors() {
        let toy = ToyPolicy::new();
        assert_eq!(toy.encode("cab").unwrap(), vec![2, 0, 1]);
        assert_eq!(toy.decode(&[2, 0, 1, 3]).unwrap(), "cab");
        assert!(toy.encode("abx").is_err());
        assert!(toy.decode(&[7]).is_err());
        assert!(toy.prefill(&[]).is_err());
        assert!(toy.prefill(&[0; 33]).is_err());
        assert!(toy.enumerate_sequences(&[0], 0).is_err());
    }

    #[test]
    fn forked_caches_step_independently_and_calls_are_counted() {
        let toy = ToyPolicy::new();
        let (cache, first) = toy.prefill(&[0]).unwrap();
        assert_eq!(first.hidden, vec![1.0, 0.0, 0.0, 0.0, 0.0]);
        let mut caches = vec![cache.clone(), cache];
        let outs = toy.step(&mut caches, &[1, 2]).unwrap();
        assert_eq!(caches, vec![vec![0, 1], vec![0, 2]]);
        assert_eq!(outs[0].hidden, vec![0.0, 1.0, 0.0, 0.0, 1.0 / 32.0]);
        assert!((f64::from(outs[1].log_probs[0]) - 0.4f64.ln()).abs() < 1e-6);
        assert_eq!((toy.prefill_calls(), toy.step_calls()), (1, 1));
        assert!(toy.step(&mut caches, &[1]).is_err());
    }
}
