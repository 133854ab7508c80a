//! The tokenizer stored in a GGUF file's metadata, rebuilt with the `tokenizers` crate.
//!
//! GGUF files carry their tokenizer as data (`tokenizer.ggml.*`): the model kind
//! (`gpt2` = byte-level BPE), the vocabulary, the merges, each token's type (normal,
//! control, user-defined …) and a pre-tokenizer name (`tokenizer.ggml.pre`) standing for
//! the regular expressions that split text before BPE. We rebuild the same pipeline the
//! original `tokenizer.json` described, so that ids agree with Python `transformers` and
//! llama.cpp; the end-to-end test pins ids for fixed strings against transformers.
//!
//! Pre-tokenizers (the regexes are llama.cpp's, `llama-vocab.cpp`):
//! - `smollm` (SmolLM/SmolLM2, StarCoder): every digit alone, then GPT-2's byte-level
//!   split;
//! - `gpt2` / `default`: GPT-2's byte-level split;
//! - `llama-bpe` (Llama 3): Llama 3's split regex, then byte-level mapping.
//!
//! Other names (and SentencePiece `llama` vocabularies) are reported as unsupported
//! rather than tokenised approximately.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::gguf::GgufFile;
use crate::{ModelError, TokenId};

/// llama.cpp's token type for control tokens (`<|im_start|>` …).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// llama.cpp's token type for user-defined tokens (matched before BPE, not special).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE tokenizer built from GGUF metadata.
#[derive(Clone)]
pub struct GgufTokenizer {
    inner: Tokenizer,
    tokens: Vec<String>,
    eos_ids: Vec<TokenId>,
    bos_id: Option<TokenId>,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab", &self.tokens.len())
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl GgufTokenizer {
    /// Build the tokenizer from the metadata of `gguf`.
    ///
    /// # Errors
    /// [`ModelError::BadFile`] for missing or inconsistent metadata,
    /// [`ModelError::Tokenizer`] for an unsupported tokenizer model or pre-tokenizer.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let path = gguf.path().display().to_string();
        let bad = |problem: String| ModelError::BadFile {
            path: path.clone(),
            problem,
        };
        let model = gguf.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "{path}: tokenizer model {model:?} is not supported (tilt reads byte-level BPE \
                 vocabularies, tokenizer.ggml.model = \"gpt2\")"
            )));
        }
        let tokens: Vec<String> = gguf
            .string_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        if tokens.is_empty() {
            return Err(bad("tokenizer.ggml.tokens is empty".into()));
        }
        let types = if gguf.has("tokenizer.ggml.token_type") {
            let t = gguf.int_array("tokenizer.ggml.token_type")?;
            if t.len() != tokens.len() {
                return Err(bad(format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    t.len(),
                    tokens.len()
                )));
            }
            t
        } else {
            vec![1; tokens.len()]
        };
        let merges = gguf
            .string_array("tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(format!("tokenizer.ggml.merges[{i}] = {m:?} has no space")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut vocab = Vocab::default();
        for (id, t) in tokens.iter().enumerate() {
            // Duplicates keep the first id, as llama.cpp does.
            vocab.entry(t.clone()).or_insert(id as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(format!("cannot build BPE from vocabulary and merges: {e}")))?;
        let mut inner = Tokenizer::new(bpe);

        let pre = if gguf.has("tokenizer.ggml.pre") {
            gguf.string("tokenizer.ggml.pre")?
        } else {
            "default"
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" | "starcoder" | "refact" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            "gpt2" | "gpt-2" | "default" => ByteLevel::new(false, true, true).into(),
            "llama-bpe" | "llama3" => Sequence::new(vec![
                Split::new(
                    SplitPattern::Regex(LLAMA3_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| ModelError::Tokenizer(format!("llama-bpe split regex: {e}")))?
                .into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "{path}: pre-tokenizer {other:?} is not supported (known: smollm, starcoder, \
                     gpt2, llama-bpe)"
                )))
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.clone(), false))
            .collect();
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);

        let id_key = |key: &str| -> Result<Option<TokenId>, ModelError> {
            if !gguf.has(key) {
                return Ok(None);
            }
            let id = gguf.uint(key)?;
            if id as usize >= tokens.len() {
                return Err(bad(format!(
                    "{key} = {id} is outside the vocabulary of {}",
                    tokens.len()
                )));
            }
            Ok(Some(id as TokenId))
        };
        let mut eos_ids = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = id_key(key)? {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let bos_id = id_key("tokenizer.ggml.bos_token_id")?;
        Ok(Self {
            inner,
            tokens,
            eos_ids,
            bos_id,
        })
    }

    /// Tokenise `text` as is: no BOS added; special-token strings map to their ids.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] if the tokenizer fails.
    pub fn encode(&self, text: &str) -> Result<Vec<TokenId>, ModelError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Detokenise; special tokens are skipped when `skip_special` is set.
    ///
    /// # Errors
    /// A token outside the vocabulary, or a tokenizer failure.
    pub fn decode(&self, ids: &[TokenId], skip_special: bool) -> Result<String, ModelError> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.tokens.len()) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.tokens.len()
            )));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(format!("cannot decode {} tokens: {e}", ids.len())))
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The string of token `id` (byte-level encoded, as stored in the file).
    pub fn token(&self, id: TokenId) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// End-of-sequence ids (`eos_token_id`, and `eot_token_id` where given).
    pub fn eos_ids(&self) -> &[TokenId] {
        &self.eos_ids
    }

    /// The beginning-of-sequence id, if the file names one.
    pub fn bos_id(&self) -> Option<TokenId> {
        self.bos_id
    }

    /// The `tokenizers` tokenizer underneath.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
