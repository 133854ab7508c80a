//! # tilt-rewards: reward models
//!
//! The [`Reward`] trait and its implementations. A reward scores (prompt, response) pairs
//! with finite `f32`s or says clearly why it cannot: never a silent NaN.
//!
//! | spec (CLI `--reward`) | type | score |
//! |---|---|---|
//! | `minilm` | [`MiniLmRelevance`] | cosine of MiniLM embeddings of response and prompt |
//! | `minilm:target=TEXT` | [`MiniLmRelevance`] | cosine of response and `TEXT` |
//! | `head:PATH` | [`HeadReward`] | a trained head (safetensors) over MiniLM embeddings |
//! | `command:CMD` | [`CommandReward`] | a long-lived child `sh -c CMD`, JSON lines |
//! | `http:URL` (or a bare `http://…`) | [`HttpReward`] | POST JSON to a service |
//! | `vllm:URL[,options]` | [`ServedReward`] | vLLM's pooling runner, `POST URL/classify` (a logit) |
//! | `tei:URL[,options]` | [`ServedReward`] | text-embeddings-inference, `POST URL/predict` (a label's raw score) or `URL/rerank` |
//! | `openrlhf:URL[,options]` | [`ServedReward`] | OpenRLHF's `serve_rm`, `POST URL/get_reward` |
//!
//! Rewards are traits and data ([`RewardSpec`]), not flags: a decoding strategy takes a
//! `&dyn Reward` and never knows which it has. Everything that can fail from outside (a
//! model file, a child process, a network service) fails with a [`RewardError`] naming the
//! reward, and every score is checked (one per pair, finite, within `f32`'s range) before
//! it leaves this crate. [`RewardError::is_invalid_input`] tells a configuration the user
//! must fix (a malformed spec, a missing `head:` file, an invalid URL, a command that
//! cannot start) from a reward failing while it runs. The protocols of the command, HTTP
//! and served rewards are in this crate's `README.md` (and in [`command`], [`http`],
//! [`served`]).
#![deny(missing_docs)]

pub mod command;
pub mod head;
pub mod http;
mod json;
pub mod minilm;
pub mod served;

pub use command::{CommandReward, DEFAULT_COMMAND_TIMEOUT, MAX_REPLY_BYTES};
pub use head::{Head, HeadInput, HeadReward};
pub use http::{HttpReward, DEFAULT_HTTP_TIMEOUT, MAX_ANSWER_BYTES};
pub use minilm::{MiniLmEmbedder, MiniLmRelevance, MINILM_DIM};
pub use served::{ServedApi, ServedOptions, ServedReward, TeiEndpoint, PAIR_SEPARATOR};

use std::path::PathBuf;
use std::sync::Arc;

/// What can go wrong while setting up a reward or scoring with it.
///
/// Every variant names the reward. [`RewardError::is_invalid_input`] tells the two kinds
/// apart: a reward that cannot be set up as given ([`RewardError::Invalid`]: the user's
/// configuration is wrong, and trying again will not help) from a reward that failed
/// while it ran (the rest: a child that died, a timeout, an HTTP 500, a NaN score).
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// The reward cannot be set up as given: a malformed spec, a `head:` file that is
    /// missing or malformed, a model directory without its files, a URL that is not a
    /// valid `http://` URL, a command that cannot be started. Nothing was scored.
    #[error("reward {reward}: {message}")]
    Invalid {
        /// The reward's name (or the spec, when it did not parse).
        reward: String,
        /// What is wrong with it.
        message: String,
    },
    /// The reward returned a non-finite score (NaN or ±∞).
    #[error("reward {reward}: score {index} is {value}, not finite")]
    NonFinite {
        /// The reward's name.
        reward: String,
        /// Index of the pair in the batch.
        index: usize,
        /// The value it returned.
        value: f32,
    },
    /// The reward returned a finite number too large in magnitude for an `f32` score
    /// (beyond ±3.4028235e38), such as `1e300`.
    #[error(
        "reward {reward}: score {index} is {value}, outside the range of f32 \
         (magnitudes up to 3.4028235e38)"
    )]
    OutOfRange {
        /// The reward's name.
        reward: String,
        /// Index of the pair in the batch.
        index: usize,
        /// The number as the reward sent it (e.g. `1e300`).
        value: String,
    },
    /// Any other failure while the reward ran, with the reward's name and what happened.
    #[error("reward {reward}: {message}")]
    Failed {
        /// The reward's name.
        reward: String,
        /// What happened.
        message: String,
    },
}

impl RewardError {
    /// Whether the error is the user's configuration ([`RewardError::Invalid`]) rather than
    /// a failure of the reward while it ran. Faces map it to their "bad request" answer:
    /// the CLI exits with status 2 for these and 1 for the others; a server answers 400
    /// for these and 503 for the others.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Self::Invalid { .. })
    }

    /// The name of the reward concerned.
    pub fn reward(&self) -> &str {
        match self {
            Self::Invalid { reward, .. }
            | Self::NonFinite { reward, .. }
            | Self::OutOfRange { reward, .. }
            | Self::Failed { reward, .. } => reward,
        }
    }

    /// The same error, naming `reward` instead (for a reward that wraps another's errors).
    pub(crate) fn renamed(self, name: &str) -> Self {
        let reward = name.to_string();
        match self {
            Self::Invalid { message, .. } => Self::Invalid { reward, message },
            Self::NonFinite { index, value, .. } => Self::NonFinite {
                reward,
                index,
                value,
            },
            Self::OutOfRange { index, value, .. } => Self::OutOfRange {
                reward,
                index,
                value,
            },
            Self::Failed { message, .. } => Self::Failed { reward, message },
        }
    }
}

/// A malformed spec is invalid input: [`RewardError::Invalid`] naming the spec.
impl From<RewardSpecError> for RewardError {
    fn from(e: RewardSpecError) -> Self {
        let message = e.to_string();
        Self::Invalid {
            reward: e.spec,
            message,
        }
    }
}

pub(crate) use tilt_remote::net::{quote, quote_excerpt};

/// A reward model: scores a batch of (prompt, response) pairs.
pub trait Reward: Send + Sync {
    /// A name for errors, logs and manifests (e.g. `minilm-relevance`).
    fn name(&self) -> String;
    /// One finite score per pair, in order.
    ///
    /// # Errors
    /// [`RewardError`] naming this reward.
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError>;
    /// Files whose bytes determine this reward (for manifests: they are hashed).
    fn artifacts(&self) -> Vec<PathBuf> {
        Vec::new()
    }
    /// Whether a pair's score is the same bits whatever else is in the batch, so that a
    /// caller may pool pairs of several requests into one call without changing any
    /// result. False unless an implementation knows it (a neural reward that pads its
    /// batches usually does not).
    fn batch_invariant(&self) -> bool {
        false
    }
}

/// Check that a batch of scores is complete and finite; the helper every implementation
/// runs on what it computed or received.
///
/// # Errors
/// [`RewardError::Failed`] on a wrong count, [`RewardError::NonFinite`] on NaN or ±∞.
pub fn check_scores(
    reward: &str,
    expected: usize,
    scores: Vec<f32>,
) -> Result<Vec<f32>, RewardError> {
    if scores.len() != expected {
        return Err(RewardError::Failed {
            reward: reward.to_string(),
            message: format!("returned {} scores for {expected} pairs", scores.len()),
        });
    }
    if let Some((index, &value)) = scores.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(RewardError::NonFinite {
            reward: reward.to_string(),
            index,
            value,
        });
    }
    Ok(scores)
}

/// A reward described as data, as the CLI's `--reward` flag gives it.
///
/// Forms (parsed by [`RewardSpec::parse`]):
/// - `minilm`: relevance of the response to the prompt (cosine of MiniLM embeddings);
/// - `minilm:target=TEXT`: relevance of the response to the fixed `TEXT`;
/// - `head:PATH`: a trained head over MiniLM embeddings (format in [`head`]);
/// - `command:CMD`: an external command run as `sh -c CMD` (protocol in [`command`]);
/// - `http:URL`, or a bare `http://…` URL: a service (protocol in [`http`]);
/// - `vllm:URL[,model=NAME][,label=I][,COMMON]`: vLLM's `POST URL/classify`, the raw
///   logit of label `I` (default: the only one);
/// - `tei:URL[,label=NAME][,COMMON]`: text-embeddings-inference's `POST URL/predict`, the
///   raw score of label `NAME` (default: the only one);
///   `tei:URL,endpoint=rerank[,COMMON]`: its `POST URL/rerank`;
/// - `openrlhf:URL[,COMMON]`: OpenRLHF's `POST URL/get_reward`;
///
/// where `COMMON` is any of `batch=B` (pairs per request, 1 to 4096, default 32),
/// `concurrency=K` (requests in flight, 1 to 64, default 4), `timeout=SECS` (per request,
/// default 60) and `retries=R` (0 to 10, default 2), comma-separated (protocols in
/// [`served`]). Only the first `:` separates the kind, so `vllm:http://host:8000` is the
/// kind `vllm` and the URL `http://host:8000`.
///
/// ```
/// use tilt_rewards::RewardSpec;
/// assert_eq!(RewardSpec::parse("minilm").unwrap(), RewardSpec::MiniLm { target: None });
/// assert_eq!(
///     RewardSpec::parse("minilm:target=be kind").unwrap(),
///     RewardSpec::MiniLm { target: Some("be kind".into()) }
/// );
/// assert_eq!(
///     RewardSpec::parse("http://127.0.0.1:8000/score").unwrap(),
///     RewardSpec::Http { url: "http://127.0.0.1:8000/score".into() }
/// );
/// assert_eq!(
///     RewardSpec::parse("tei:http://127.0.0.1:8080,label=toxic,batch=16").unwrap(),
///     RewardSpec::Tei {
///         url: "http://127.0.0.1:8080".into(),
///         endpoint: tilt_rewards::TeiEndpoint::Predict,
///         label: Some("toxic".into()),
///         options: tilt_rewards::ServedOptions { batch: 16, ..Default::default() },
///     }
/// );
/// assert!(RewardSpec::parse("bleu").is_err());
/// assert!(RewardSpec::parse("vllm:http://127.0.0.1:8000,batch=0").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RewardSpec {
    /// MiniLM relevance, to `target` or (when `None`) to the prompt.
    MiniLm {
        /// Fixed target text.
        target: Option<String>,
    },
    /// A trained head file over MiniLM embeddings.
    Head {
        /// The safetensors file.
        path: PathBuf,
    },
    /// An external command (run with `sh -c`).
    Command {
        /// The command line.
        command: String,
    },
    /// An HTTP service.
    Http {
        /// Its URL.
        url: String,
    },
    /// vLLM's pooling runner (`POST URL/classify`).
    Vllm {
        /// The server's base URL, as given.
        url: String,
        /// The model name to send; `None`: the first of `GET URL/v1/models`.
        model: Option<String>,
        /// Which entry of `probs` is the score; `None`: the only one.
        label: Option<usize>,
        /// Batch, concurrency, timeout, retries.
        options: ServedOptions,
    },
    /// text-embeddings-inference (`POST URL/predict` or `URL/rerank`).
    Tei {
        /// The server's base URL, as given.
        url: String,
        /// `/predict` or `/rerank`.
        endpoint: TeiEndpoint,
        /// The label whose raw score is the reward (`/predict`); `None`: the only one.
        label: Option<String>,
        /// Batch, concurrency, timeout, retries.
        options: ServedOptions,
    },
    /// OpenRLHF's `serve_rm` (`POST URL/get_reward`).
    OpenRlhf {
        /// The server's base URL, as given.
        url: String,
        /// Batch, concurrency, timeout, retries.
        options: ServedOptions,
    },
}

/// What [`RewardSpec::parse`] rejects: the spec and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid reward spec {}: {reason} (expected minilm, minilm:target=TEXT, head:PATH, \
     command:CMD, http:URL, vllm:URL[,options], tei:URL[,options] or \
     openrlhf:URL[,options])",
    quote(.spec)
)]
pub struct RewardSpecError {
    /// The spec as given.
    pub spec: String,
    /// What was wrong.
    pub reason: String,
}

impl RewardSpec {
    /// Parse a `--reward` value (forms in the type's docs).
    ///
    /// # Errors
    /// [`RewardSpecError`] naming the spec.
    pub fn parse(spec: &str) -> Result<Self, RewardSpecError> {
        let err = |reason: &str| RewardSpecError {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        if spec.starts_with("http://") || spec.starts_with("https://") {
            return Ok(Self::Http {
                url: spec.to_string(),
            });
        }
        let (kind, arg) = match spec.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (spec, None),
        };
        match (kind, arg) {
            ("minilm", None) => Ok(Self::MiniLm { target: None }),
            ("minilm", Some(a)) => match a.strip_prefix("target=") {
                Some(t) if !t.is_empty() => Ok(Self::MiniLm {
                    target: Some(t.to_string()),
                }),
                Some(_) => Err(err("empty target")),
                None => Err(err("minilm takes only target=TEXT")),
            },
            ("head", Some(p)) if !p.is_empty() => Ok(Self::Head {
                path: PathBuf::from(p),
            }),
            ("command", Some(c)) if !c.trim().is_empty() => Ok(Self::Command {
                command: c.to_string(),
            }),
            ("http", Some(u)) if !u.is_empty() => Ok(Self::Http { url: u.to_string() }),
            ("vllm" | "tei" | "openrlhf", Some(a)) => {
                served::parse_spec(kind, a).map_err(|reason| err(&reason))
            }
            ("head" | "command" | "http" | "vllm" | "tei" | "openrlhf", _) => {
                Err(err(&format!("{kind} needs an argument after ':'")))
            }
            _ => Err(err(&format!("unknown reward kind {}", quote(kind)))),
        }
    }

    /// Build the reward, loading the MiniLM model (fetched on first use) where needed.
    ///
    /// # Errors
    /// [`RewardError::Invalid`] if the head file, command or URL cannot be set up as given
    /// (the head file is checked before the model is loaded);
    /// [`RewardError::Failed`] if the default model cannot be fetched or loaded, or if a
    /// `vllm:` reward without `model=` cannot learn the model name from `GET URL/v1/models`.
    pub fn build(&self) -> Result<Box<dyn Reward>, RewardError> {
        self.build_with(None)
    }

    /// [`Self::build`] with an already loaded embedder to share (so that several rewards
    /// over MiniLM hold one copy of the model).
    ///
    /// # Errors
    /// As [`Self::build`].
    pub fn build_with(
        &self,
        embedder: Option<Arc<MiniLmEmbedder>>,
    ) -> Result<Box<dyn Reward>, RewardError> {
        let embedder = || -> Result<Arc<MiniLmEmbedder>, RewardError> {
            match &embedder {
                Some(e) => Ok(Arc::clone(e)),
                None => Ok(Arc::new(MiniLmEmbedder::load_default()?)),
            }
        };
        Ok(match self {
            Self::MiniLm { target } => Box::new(MiniLmRelevance::new(embedder()?, target.clone())),
            Self::Head { path } => {
                let head = Head::load(path)?;
                Box::new(HeadReward::new(embedder()?, head)?)
            }
            Self::Command { command } => Box::new(CommandReward::spawn_shell(
                command,
                DEFAULT_COMMAND_TIMEOUT,
            )?),
            Self::Http { url } => Box::new(HttpReward::new(url, DEFAULT_HTTP_TIMEOUT)?),
            Self::Vllm {
                url,
                model,
                label,
                options,
            } => Box::new(ServedReward::new(
                ServedApi::Vllm {
                    model: model.clone(),
                    label: *label,
                },
                url,
                options.clone(),
            )?),
            Self::Tei {
                url,
                endpoint,
                label,
                options,
            } => Box::new(ServedReward::new(
                ServedApi::Tei {
                    endpoint: *endpoint,
                    label: label.clone(),
                },
                url,
                options.clone(),
            )?),
            Self::OpenRlhf { url, options } => Box::new(ServedReward::new(
                ServedApi::OpenRlhf,
                url,
                options.clone(),
            )?),
        })
    }
}

impl std::str::FromStr for RewardSpec {
    type Err = RewardSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Build the reward a spec describes; see [`RewardSpec::build`].
///
/// # Errors
/// As [`RewardSpec::build`].
pub fn build(spec: &RewardSpec) -> Result<Box<dyn Reward>, RewardError> {
    spec.build()
}

#[cfg(test)]
mod spec_tests {
    use super::*;

    #[test]
    fn specs_parse_and_reject() {
        assert_eq!(
            RewardSpec::parse("head:/tmp/h.safetensors").unwrap(),
            RewardSpec::Head {
                path: "/tmp/h.safetensors".into()
            }
        );
        assert_eq!(
            RewardSpec::parse("command:python3 r.py --x=1:2").unwrap(),
            RewardSpec::Command {
                command: "python3 r.py --x=1:2".into()
            }
        );
        assert_eq!(
            RewardSpec::parse("http:http://127.0.0.1:9/s").unwrap(),
            RewardSpec::Http {
                url: "http://127.0.0.1:9/s".into()
            }
        );
        for bad in [
            "",
            "minilm:",
            "minilm:foo",
            "minilm:target=",
            "head:",
            "command: ",
            "http",
            "bleu:x",
        ] {
            let e = RewardSpec::parse(bad).unwrap_err();
            assert!(e.to_string().contains("invalid reward spec"), "{bad}: {e}");
        }
    }

    #[test]
    fn served_specs_split_on_the_first_colon_and_name_their_options() {
        assert_eq!(
            RewardSpec::parse("vllm:http://127.0.0.1:8000,model=a/b,label=2").unwrap(),
            RewardSpec::Vllm {
                url: "http://127.0.0.1:8000".into(),
                model: Some("a/b".into()),
                label: Some(2),
                options: ServedOptions::default(),
            }
        );
        assert_eq!(
            RewardSpec::parse("openrlhf:http://localhost:5000/").unwrap(),
            RewardSpec::OpenRlhf {
                url: "http://localhost:5000/".into(),
                options: ServedOptions::default(),
            }
        );
        assert!(matches!(
            RewardSpec::parse("tei:http://h:1,endpoint=rerank,timeout=2").unwrap(),
            RewardSpec::Tei { endpoint: TeiEndpoint::Rerank, label: None, options, .. }
                if options.timeout == std::time::Duration::from_secs(2)
        ));
        for (bad, expected) in [
            ("vllm", "vllm needs an argument after ':'"),
            ("tei:", "tei needs a URL"),
            ("openrlhf:http://h:1,bogus=1", "unknown option \"bogus=1\""),
            ("tei:http://h:1,batch=x", "option \"batch=x\""),
            ("vllm:ftp://h", "must start with http://"),
        ] {
            let e = RewardSpec::parse(bad).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("invalid reward spec {}", quote(bad)))
                    && msg.contains(expected)
                    && msg.contains("tei:URL[,options]"),
                "{bad}: {msg}"
            );
            assert!(RewardError::from(e).is_invalid_input());
        }
    }

    #[test]
    fn setup_errors_are_invalid_input_and_say_so_in_json_quotes() {
        for bad in ["bleu:x", "minilm:foo", "head:", "http"] {
            let e = RewardError::from(RewardSpec::parse(bad).unwrap_err());
            assert!(e.is_invalid_input(), "{bad}: {e}");
            assert_eq!(e.reward(), bad);
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("invalid reward spec {}", quote(bad))),
                "{msg}"
            );
        }
        let e = RewardSpec::parse("bleu:x").unwrap_err().to_string();
        assert!(e.contains("unknown reward kind \"bleu\""), "{e}");
        // A spec that parses but cannot be set up: no model is loaded to find out.
        for spec in [
            "head:/nonexistent/tilt-head.safetensors",
            "http:https://example.com/score",
            "http://",
            "http:ftp://example.com",
        ] {
            let e = RewardSpec::parse(spec).unwrap().build().err().expect(spec);
            assert!(e.is_invalid_input(), "{spec}: {e}");
        }
        // Failures at run time are not.
        let e = check_scores("r", 1, vec![f32::NAN]).unwrap_err();
        assert!(!e.is_invalid_input());
        let e = RewardError::Failed {
            reward: "r".into(),
            message: "HTTP 500".into(),
        };
        assert!(!e.is_invalid_input());
        assert_eq!(quote("a \"b\"\n"), r#""a \"b\"\n""#);
        assert_eq!(quote_excerpt("héllo", 2), "\"hé\"… (6 bytes in all)");
        assert_eq!(quote_excerpt("hé", 2), "\"hé\"");
    }

    #[test]
    fn check_scores_names_the_problem() {
        assert_eq!(
            check_scores("r", 2, vec![1.0, -1.0]).unwrap(),
            vec![1.0, -1.0]
        );
        let e = check_scores("r", 2, vec![1.0]).unwrap_err();
        assert!(e.to_string().contains("1 scores for 2 pairs"), "{e}");
        let e = check_scores("r", 2, vec![1.0, f32::NAN]).unwrap_err();
        assert!(matches!(e, RewardError::NonFinite { index: 1, .. }), "{e}");
    }
}
