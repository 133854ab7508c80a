//! The `Policy` trait: what decoding strategies need of a language model.
//!
//! Design: a policy owns its weights; a [`Policy::Cache`] is the state of *one* sequence
//! (its KV cache), a value passed into the forward like candle's `Cache`, so one set of
//! weights serves many sequences. `Clone` on a cache is a fork: prefill a prompt once,
//! clone the cache N times, and step the N sequences together in one batched
//! [`Policy::step`]. Implementations should make the prompt part of a forked cache shared
//! (e.g. behind an `Arc`) so that forking costs only the generated suffix.
//!
//! Chat is part of the trait ([`Policy::render_chat`]): a request may be a whole
//! conversation (system, user and assistant turns), and only the policy knows its template.

use crate::{ChatMessage, ModelError};

/// A token id in the policy's vocabulary.
pub type TokenId = u32;

/// The model's output at one position of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// log p(next token = v | context) for every token v of the vocabulary: natural log,
    /// normalised (log-sum-exp = 0), before any temperature or truncation.
    pub log_probs: Vec<f32>,
    /// The last hidden state at this position (after the final norm), of length
    /// [`Policy::hidden_size`]: the input of prefix scorers.
    pub hidden: Vec<f32>,
}

/// A language model as decoding strategies see it.
pub trait Policy: Send + Sync {
    /// The state of one sequence (its KV cache). `clone()` forks it.
    type Cache: Clone + Send + Sync;

    /// A short name for logs and manifests (e.g. the model file's stem).
    fn name(&self) -> &str;
    /// Size of the vocabulary (length of [`StepOutput::log_probs`]).
    fn vocab_size(&self) -> usize;
    /// Size of [`StepOutput::hidden`].
    fn hidden_size(&self) -> usize;
    /// Longest context (prompt + generated tokens) the model accepts.
    fn context_length(&self) -> usize;
    /// Tokens that end a sequence.
    fn eos_token_ids(&self) -> &[TokenId];
    /// Tokenise `text` as is (no special tokens added; special-token strings in `text`, such
    /// as those a chat template writes, map to their ids).
    fn encode(&self, text: &str) -> Result<Vec<TokenId>, ModelError>;
    /// Detokenise, skipping special tokens.
    fn decode(&self, tokens: &[TokenId]) -> Result<String, ModelError>;
    /// The text of a chat, ready for generation: the model's chat template applied to
    /// `messages`, followed by the opening of the assistant's turn (the template's generation
    /// prompt). A model without a template renders one user message as its text and
    /// refuses anything else.
    ///
    /// # Errors
    /// [`ModelError::ChatTemplate`] when the template fails on these messages (e.g. a role
    /// order it does not accept) or the model has no template for them.
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ModelError>;
    /// The text of a chat with one user message: [`Policy::render_chat`] of that message.
    ///
    /// # Errors
    /// As [`Policy::render_chat`].
    fn chat_prompt(&self, user_message: &str) -> Result<String, ModelError> {
        self.render_chat(&[ChatMessage::user(user_message)])
    }
    /// Bytes of KV cache one more token of one sequence takes (for memory estimates before
    /// a batch is run); 0 for a policy that keeps no per-token state worth counting.
    fn kv_bytes_per_token(&self) -> u64 {
        0
    }
    /// Files whose bytes determine this policy (for manifests: they are hashed).
    fn artifacts(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }

    /// Run `tokens` from an empty context; return the cache and the output at the last
    /// position.
    ///
    /// # Errors
    /// Empty `tokens`, a token out of the vocabulary, or more tokens than the context holds.
    fn prefill(&self, tokens: &[TokenId]) -> Result<(Self::Cache, StepOutput), ModelError>;

    /// Append `tokens[i]` to `caches[i]` for every i, in one batched forward, and return the
    /// output at each new position. Caches may have different lengths.
    ///
    /// # Errors
    /// Unequal lengths of `caches` and `tokens`, a token out of the vocabulary, a full cache.
    fn step(
        &self,
        caches: &mut [Self::Cache],
        tokens: &[TokenId],
    ) -> Result<Vec<StepOutput>, ModelError>;

    /// Append several tokens to one sequence; return the output at each appended position.
    ///
    /// # Errors
    /// As [`Policy::step`].
    fn extend(
        &self,
        cache: &mut Self::Cache,
        tokens: &[TokenId],
    ) -> Result<Vec<StepOutput>, ModelError>;

    /// Number of tokens in a cache.
    fn cache_len(&self, cache: &Self::Cache) -> usize;

    /// Get `cache` ready to be cloned `forks` times (blockwise decoding forks a sequence
    /// that already has a private suffix). A policy whose forks copy the private part of
    /// a cache can move it into the shared part here when that copies less; the default
    /// does nothing, which is always correct.
    fn prepare_fork(&self, cache: &mut Self::Cache, forks: usize) {
        let _ = (cache, forks);
    }

    /// `f` of each item, in order, computed possibly at once on the policy's own threads
    /// (the engine samples its sequences' next tokens this way). Each call sees only its own
    /// item, so the results do not depend on how the calls are spread. The default runs
    /// them one after another.
    fn map_parallel<T: Send, R: Send>(
        &self,
        items: &mut [T],
        f: impl Fn(&mut T) -> R + Sync + Send,
    ) -> Vec<R>
    where
        Self: Sized,
    {
        items.iter_mut().map(f).collect()
    }

    /// log p(response | context) token by token: element i is log p(response[i] | context,
    /// response[..i]). Their sum is the full-sequence log-probability.
    ///
    /// # Errors
    /// As [`Policy::prefill`]; an empty `context`.
    fn response_log_probs(
        &self,
        context: &[TokenId],
        response: &[TokenId],
    ) -> Result<Vec<f32>, ModelError> {
        let (mut cache, first) = self.prefill(context)?;
        let mut out = Vec::with_capacity(response.len());
        let mut prev = first;
        for (i, &tok) in response.iter().enumerate() {
            let lp = *prev.log_probs.get(tok as usize).ok_or_else(|| {
                ModelError::InvalidInput(format!(
                    "response token {tok} at position {i} is outside the vocabulary of {}",
                    self.vocab_size()
                ))
            })?;
            out.push(lp);
            if i + 1 < response.len() {
                prev = self
                    .extend(&mut cache, &[tok])?
                    .pop()
                    .ok_or_else(|| ModelError::Internal("extend returned no output".into()))?;
            }
        }
        Ok(out)
    }
}
