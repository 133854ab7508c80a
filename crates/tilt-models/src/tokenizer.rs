//! The tokenizer stored in a GGUF file's metadata, rebuilt with the `tokenizers` crate.
//!
//! GGUF files carry their tokenizer as data (`tokenizer.ggml.*`): the model kind
//! (`gpt2` = byte-level BPE), the vocabulary, the merges, each token's type (normal,
//! control, user-defined …) and a pre-tokenizer name (`tokenizer.ggml.pre`) standing for
//! the regular expressions that split text before BPE. We rebuild the same pipeline the
//! original `tokenizer.json` described, so that ids agree with Python `transformers` and
//! llama.cpp; the end-to-end test pins ids for fixed strings against transformers.
//!
//! Pre-tokenizers, by the names llama.cpp's converter writes (`llama-vocab.cpp` holds the
//! same regular expressions):
//! - `smollm`, `starcoder`, `refact` (SmolLM/SmolLM2, StarCoder): every digit alone, then
//!   GPT-2's byte-level split;
//! - `gpt-2`: GPT-2's byte-level split;
//! - `llama-bpe`, `llama3`, `llama-v3` (Llama 3): Llama 3's split regex, then the byte-level
//!   mapping, with BPE's `ignore_merges` (a word that is a token is that token, merges or
//!   not), as in Llama 3's `tokenizer.json` and llama.cpp.
//!
//! Anything else is refused with [`ModelError::BadFile`] naming the key, rather than
//! tokenised approximately: another `tokenizer.ggml.model` (SentencePiece `llama`, `bert`
//! …), another pre-tokenizer, and a missing `tokenizer.ggml.pre` or `default` (what
//! llama.cpp's converter wrote before it recorded pre-tokenizers: the file does not say
//! how text was split).
//!
//! Special tokens: control tokens (type 3) are matched as special (skipped on decode),
//! user-defined tokens (type 4) are matched before BPE. End of sequence is any of
//! `eos_token_id`, `eot_token_id` and `eom_token_id`. [`GgufTokenizer::encode`] adds no
//! token, whatever `tokenizer.ggml.add_bos_token` and `add_eos_token` say: a chat
//! template writes the BOS its model expects, and a raw prompt is tokenised as written
//! ([`GgufTokenizer::adds_bos`] tells what the file asks for).

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

/// The pre-tokenizer names tilt implements, for error messages.
const KNOWN_PRE: &str = "smollm, starcoder, refact, gpt-2, llama-bpe, llama3, llama-v3";

/// How text is split before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pre {
    /// Every digit alone, then GPT-2's split.
    Digits,
    /// GPT-2's split.
    Gpt2,
    /// Llama 3's split (and `ignore_merges`).
    Llama3,
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE tokenizer built from GGUF metadata.
#[derive(Clone)]
pub struct GgufTokenizer {
    inner: Tokenizer,
    tokens: Vec<String>,
    eos_ids: Vec<TokenId>,
    bos_id: Option<TokenId>,
    adds_bos: bool,
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
    /// [`ModelError::BadFile`] naming the file and the key: missing or inconsistent
    /// metadata, a tokenizer model or pre-tokenizer tilt does not implement.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let path = gguf.path().display().to_string();
        let bad = |problem: String| ModelError::BadFile {
            path: path.clone(),
            problem,
        };
        let model = gguf.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer.ggml.model = \"{}\" is not supported (tilt reads byte-level BPE \
                 vocabularies, tokenizer.ggml.model = \"gpt2\")",
                model.escape_default()
            )));
        }
        // Decided before the vocabulary is built: the BPE model depends on it.
        let pre = if gguf.has("tokenizer.ggml.pre") {
            gguf.string("tokenizer.ggml.pre")?
        } else {
            return Err(bad(format!(
                "metadata key tokenizer.ggml.pre is missing: the file does not say how text is \
                 split before BPE (llama.cpp's converter wrote files without it before May \
                 2024; convert the model again). Supported: {KNOWN_PRE}"
            )));
        };
        let pre_kind = match pre {
            "smollm" | "starcoder" | "refact" => Pre::Digits,
            "gpt-2" => Pre::Gpt2,
            "llama-bpe" | "llama3" | "llama-v3" => Pre::Llama3,
            "default" => {
                return Err(bad(format!(
                    "tokenizer.ggml.pre = \"default\" does not say how text is split before BPE \
                     (llama.cpp's converter writes it when it did not recognise the \
                     pre-tokenizer); supported: {KNOWN_PRE}"
                )))
            }
            other => {
                return Err(bad(format!(
                    "tokenizer.ggml.pre = \"{}\" is not a pre-tokenizer tilt implements \
                     (supported: {KNOWN_PRE})",
                    other.escape_default()
                )))
            }
        };
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
            .ignore_merges(pre_kind == Pre::Llama3)
            .build()
            .map_err(|e| bad(format!("cannot build BPE from vocabulary and merges: {e}")))?;
        let mut inner = Tokenizer::new(bpe);

        let pre_tokenizer: PreTokenizerWrapper = match pre_kind {
            Pre::Digits => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            Pre::Gpt2 => ByteLevel::new(false, true, true).into(),
            Pre::Llama3 => Sequence::new(vec![
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
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = id_key(key)? {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let bos_id = id_key("tokenizer.ggml.bos_token_id")?;
        let flag = |key: &str| -> Result<bool, ModelError> {
            if gguf.has(key) {
                gguf.bool(key)
            } else {
                Ok(false)
            }
        };
        // llama.cpp adds a BOS to Llama 3 prompts unless the file says otherwise.
        let adds_bos = if gguf.has("tokenizer.ggml.add_bos_token") {
            flag("tokenizer.ggml.add_bos_token")?
        } else {
            pre_kind == Pre::Llama3
        };
        if adds_bos && bos_id.is_none() {
            return Err(bad(
                "tokenizer.ggml.add_bos_token is set but tokenizer.ggml.bos_token_id is missing"
                    .into(),
            ));
        }
        if adds_bos && !gguf.has("tokenizer.chat_template") {
            tracing::warn!(
                path = %path,
                "the file asks for a BOS token before each prompt (tokenizer.ggml.add_bos_token) \
                 and has no chat template: tilt tokenises prompts as written, so begin them \
                 with the BOS token's text"
            );
        }
        if flag("tokenizer.ggml.add_eos_token")? {
            tracing::warn!(
                path = %path,
                "the file asks for an EOS token after each text (tokenizer.ggml.add_eos_token); \
                 tilt tokenises prompts as written"
            );
        }
        Ok(Self {
            inner,
            tokens,
            eos_ids,
            bos_id,
            adds_bos,
        })
    }

    /// Whether the file asks for a BOS token before each text
    /// (`tokenizer.ggml.add_bos_token`, by default true for Llama 3's pre-tokenizer as in
    /// llama.cpp). [`Self::encode`] never adds one: a chat template writes it.
    pub fn adds_bos(&self) -> bool {
        self.adds_bos
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
