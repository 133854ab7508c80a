//! The three runs a face records and replays: generate, eval and train-scorer, each with
//! its canonical output (JSON lines), so that a manifest ([`crate::manifest`]) holds
//! exactly what [`replay`] reproduces.
//!
//! A face prints the canonical lines (or a table made from them) and writes files; the
//! engine computes them. Replay runs the same [`Run`] on an engine loaded from the same
//! [`EngineConfig`] and compares bytes, so a face's printing never affects what is checked.

use crate::engine::{Engine, EngineConfig, HashedFile};
use crate::error::{EngineError, ErrorKind, Result};
use crate::eval::{evaluate, evaluate_remote, EvalConfig, EvalReport};
use crate::manifest::{check_files, compare_outputs, sha256_hex, Comparison, FileCheck, Manifest};
use crate::progress::Progress;
use crate::prompts::{read_prompt_lines, read_prompts, PromptLine};
use crate::remote::RemoteEngine;
use crate::request::{Input, Output, Params, Request};
use crate::scorer_training::{train_scorer, CardFile, TrainOutputs, TrainScorerConfig, Trained};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tilt_models::Policy;

/// Where the prompts of a generate run come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PromptSource {
    /// One prompt, given inline.
    Input(Input),
    /// A prompts file (see [`crate::prompts`]).
    File(PathBuf),
}

/// What ran (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Run {
    /// `generate`: every prompt with the same parameters.
    Generate {
        /// The prompts.
        prompts: PromptSource,
        /// Apply the chat template to the file's prompts (an inline input says it itself).
        chat_template: bool,
        /// How to generate.
        params: Params,
    },
    /// `eval`.
    Eval {
        /// The prompts file.
        prompts: PathBuf,
        /// The evaluation.
        config: EvalConfig,
    },
    /// `train-scorer`.
    TrainScorer {
        /// The prompts file.
        prompts: PathBuf,
        /// The training.
        config: TrainScorerConfig,
        /// Where the scorer and its card go.
        outputs: TrainOutputs,
    },
}

impl Run {
    /// The command's name (`generate`, `eval`, `train-scorer`).
    pub fn command(&self) -> &'static str {
        match self {
            Run::Generate { .. } => "generate",
            Run::Eval { .. } => "eval",
            Run::TrainScorer { .. } => "train-scorer",
        }
    }

    /// The prompts file it reads, if any.
    pub fn prompts_file(&self) -> Option<&Path> {
        match self {
            Run::Generate {
                prompts: PromptSource::File(p),
                ..
            }
            | Run::Eval { prompts: p, .. }
            | Run::TrainScorer { prompts: p, .. } => Some(p),
            Run::Generate { .. } => None,
        }
    }
}

/// One line of generate's output: an output of a prompt, or the error of a prompt line.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateLine {
    /// A choice of a prompt.
    Output {
        /// The prompt's index (its line number − 1, 0 for an inline prompt).
        index: u64,
        /// The prompt as the reward saw it.
        prompt: String,
        /// The output.
        output: Box<Output>,
    },
    /// A prompt line that could not run; the others still do.
    Error {
        /// Its index.
        index: u64,
        /// Its line number.
        line: usize,
        /// What was wrong, naming the file and line.
        error: String,
    },
}

#[derive(Serialize)]
struct OutputLine<'a> {
    index: u64,
    prompt: &'a str,
    #[serde(flatten)]
    output: &'a Output,
}

#[derive(Serialize)]
struct ErrorLine<'a> {
    index: u64,
    line: usize,
    error: &'a str,
}

impl Serialize for GenerateLine {
    /// An output line is `{"index", "prompt", …the output's fields}`; an error line
    /// `{"index", "line", "error"}`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            GenerateLine::Output {
                index,
                prompt,
                output,
            } => OutputLine {
                index: *index,
                prompt,
                output,
            }
            .serialize(s),
            GenerateLine::Error { index, line, error } => ErrorLine {
                index: *index,
                line: *line,
                error,
            }
            .serialize(s),
        }
    }
}

/// The canonical bytes of a value: one line of JSON, its fields in their declared order.
///
/// # Errors
/// [`EngineError::Internal`] if it cannot be serialised (a bug).
pub fn json_line<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut s =
        serde_json::to_string(value).map_err(|e| EngineError::Internal(format!("output: {e}")))?;
    s.push('\n');
    Ok(s.into_bytes())
}

/// What a generate run saw besides its lines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateSummary {
    /// The prompt lines that failed (`FILE line K: …`), in order.
    pub failures: Vec<String>,
}

/// What runs a batch of requests or an evaluation: the local [`Engine`] or a
/// [`RemoteEngine`].
pub trait Generator {
    /// Run `requests`, handing each result to `on_response` in input order; it returns
    /// false to stop the run.
    fn generate_all(
        &self,
        requests: Vec<Request>,
        on_response: &mut dyn FnMut(usize, Result<crate::request::Response>) -> bool,
    );

    /// Evaluate `config` on `prompts` ([`evaluate`] or [`evaluate_remote`]).
    ///
    /// # Errors
    /// Those of the evaluation.
    fn evaluate(
        &self,
        prompts: &[Input],
        config: &EvalConfig,
        progress: &dyn Progress,
    ) -> Result<EvalReport>;
}

impl<P: Policy> Generator for Engine<P> {
    fn generate_all(
        &self,
        requests: Vec<Request>,
        on_response: &mut dyn FnMut(usize, Result<crate::request::Response>) -> bool,
    ) {
        self.generate_many(requests, on_response)
    }

    fn evaluate(
        &self,
        prompts: &[Input],
        config: &EvalConfig,
        progress: &dyn Progress,
    ) -> Result<EvalReport> {
        evaluate(self, prompts, config, progress)
    }
}

impl Generator for RemoteEngine {
    fn generate_all(
        &self,
        requests: Vec<Request>,
        on_response: &mut dyn FnMut(usize, Result<crate::request::Response>) -> bool,
    ) {
        self.generate_many(requests, on_response)
    }

    fn evaluate(
        &self,
        prompts: &[Input],
        config: &EvalConfig,
        progress: &dyn Progress,
    ) -> Result<EvalReport> {
        evaluate_remote(self, prompts, config, progress)
    }
}

/// Run generate: every prompt of `prompts` with `params`, many at once on the engine's
/// stepper, handing each line to `on_line` in input order as soon as it is done.
///
/// A prompt line that is not a prompt, or whose prompt the engine refuses (too long, say),
/// becomes a [`GenerateLine::Error`] and the others still run; any other failure (a reward
/// backend down, say) stops the run with an error naming the prompt. An inline prompt's
/// refusal is the run's error.
///
/// # Errors
/// As above; the file's errors; `on_line`'s.
pub fn run_generate<G: Generator + ?Sized>(
    engine: &G,
    prompts: &PromptSource,
    chat_template: bool,
    params: &Params,
    progress: &dyn Progress,
    mut on_line: impl FnMut(&GenerateLine) -> Result<()>,
) -> Result<GenerateSummary> {
    params.validate()?;
    let (lines, source) = match prompts {
        PromptSource::Input(i) => (
            vec![PromptLine::Ok {
                index: 0,
                input: i.clone(),
            }],
            None,
        ),
        PromptSource::File(p) => (read_prompt_lines(p)?, Some(p.display().to_string())),
    };
    let mut summary = GenerateSummary::default();
    let mut requests = Vec::new();
    let mut slots: Vec<Option<usize>> = Vec::with_capacity(lines.len()); // line → request
    for l in &lines {
        match l {
            PromptLine::Ok { index, input } => {
                let input = match (input, chat_template) {
                    (Input::Prompt(p), false) => Input::Raw(p.clone()),
                    (other, _) => other.clone(),
                };
                slots.push(Some(requests.len()));
                requests.push(Request {
                    input,
                    index: *index,
                    params: params.clone(),
                });
            }
            PromptLine::Bad { .. } => slots.push(None),
        }
    }
    let total = lines.len() as u64;
    progress.begin("prompts", total);
    let mut results: Vec<Option<Result<crate::request::Response>>> =
        (0..requests.len()).map(|_| None).collect();
    let mut next_line = 0usize;
    let mut failure: Option<EngineError> = None;
    // Emit every line whose turn has come: error lines at once, request lines when done.
    let mut flush = |results: &mut Vec<Option<Result<crate::request::Response>>>,
                     next_line: &mut usize,
                     summary: &mut GenerateSummary|
     -> Result<bool> {
        while *next_line < lines.len() {
            let out = match (&lines[*next_line], slots[*next_line]) {
                (PromptLine::Bad { index, error }, _) => {
                    summary.failures.push(error.clone());
                    vec![GenerateLine::Error {
                        index: *index,
                        line: *index as usize + 1,
                        error: error.clone(),
                    }]
                }
                (PromptLine::Ok { index, .. }, Some(r)) => match results[r].take() {
                    None => return Ok(true),
                    Some(Ok(resp)) => resp
                        .outputs
                        .into_iter()
                        .map(|output| GenerateLine::Output {
                            index: resp.index,
                            prompt: resp.prompt.clone(),
                            output: Box::new(output),
                        })
                        .collect(),
                    Some(Err(e)) if e.kind() == ErrorKind::InvalidInput && source.is_some() => {
                        let error = format!(
                            "{} line {}: {e}",
                            source.as_deref().unwrap_or_default(),
                            index + 1
                        );
                        summary.failures.push(error.clone());
                        vec![GenerateLine::Error {
                            index: *index,
                            line: *index as usize + 1,
                            error,
                        }]
                    }
                    Some(Err(e)) => {
                        return Err(match &source {
                            Some(s) => EngineError::context(format!("{s} line {}", index + 1), e),
                            None => e,
                        })
                    }
                },
                (PromptLine::Ok { .. }, None) => unreachable!("every prompt line has a request"),
            };
            for line in &out {
                on_line(line)?;
            }
            *next_line += 1;
            progress.advance("prompts", *next_line as u64);
        }
        Ok(true)
    };
    flush(&mut results, &mut next_line, &mut summary)?;
    engine.generate_all(requests, &mut |i, r| {
        results[i] = Some(r);
        match flush(&mut results, &mut next_line, &mut summary) {
            Ok(go) => go,
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    });
    progress.end("prompts");
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(summary)
}

/// Run an evaluation of the prompts file, on the local model or a remote engine.
///
/// # Errors
/// The file's and the evaluation's ([`evaluate`], [`evaluate_remote`]).
pub fn run_eval<G: Generator + ?Sized>(
    engine: &G,
    prompts: &Path,
    config: &EvalConfig,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    config.validate()?;
    let inputs = read_prompts(prompts)?;
    engine.evaluate(&inputs, config, progress)
}

/// Train a scorer on the prompts file (nothing written).
///
/// # Errors
/// The file's and [`train_scorer`]'s.
pub fn run_train_scorer<P: Policy>(
    engine: &Engine<P>,
    prompts: &Path,
    config: &TrainScorerConfig,
    outputs: &TrainOutputs,
    progress: &dyn Progress,
) -> Result<Trained> {
    config.validate()?;
    let inputs = read_prompts(prompts)?;
    let file = HashedFile::of("prompts", prompts)?;
    train_scorer(
        engine,
        &inputs,
        CardFile {
            path: prompts.to_path_buf(),
            sha256: file.sha256,
        },
        outputs,
        config,
        progress,
    )
}

/// What a run produced: its canonical output and the files it would write.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutput {
    /// The canonical output (JSON lines).
    pub bytes: Vec<u8>,
    /// Files written besides the output: (role, path, bytes).
    pub files: Vec<(String, PathBuf, Vec<u8>)>,
    /// The failed prompt lines of a generate run.
    pub failures: Vec<String>,
}

/// Run `run` on `engine` and collect its canonical output (what replay compares).
///
/// # Errors
/// The run's.
pub fn execute<P: Policy>(
    engine: &Engine<P>,
    run: &Run,
    progress: &dyn Progress,
) -> Result<RunOutput> {
    match run {
        Run::Generate {
            prompts,
            chat_template,
            params,
        } => {
            let mut bytes = Vec::new();
            let summary = run_generate(engine, prompts, *chat_template, params, progress, |l| {
                bytes.extend(json_line(l)?);
                Ok(())
            })?;
            Ok(RunOutput {
                bytes,
                files: Vec::new(),
                failures: summary.failures,
            })
        }
        Run::Eval { prompts, config } => {
            let report = run_eval(engine, prompts, config, progress)?;
            Ok(RunOutput {
                bytes: json_line(&report)?,
                files: Vec::new(),
                failures: Vec::new(),
            })
        }
        Run::TrainScorer {
            prompts,
            config,
            outputs,
        } => {
            let t = run_train_scorer(engine, prompts, config, outputs, progress)?;
            Ok(RunOutput {
                bytes: json_line(&t.card)?,
                files: vec![("scorer".into(), outputs.scorer.clone(), t.bytes)],
                failures: Vec::new(),
            })
        }
    }
}

/// The files a run read, hashed: the engine's and the prompts file.
///
/// # Errors
/// A file that cannot be read.
pub fn input_files<P: Policy>(engine: &Engine<P>, run: &Run) -> Result<Vec<HashedFile>> {
    let mut files = engine.hashed_files()?;
    if let Some(p) = run.prompts_file() {
        files.push(HashedFile::of("prompts", p)?);
    }
    Ok(files)
}

/// What [`replay`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replay {
    /// The command replayed.
    pub command: String,
    /// The output compared with the recorded one.
    pub comparison: Comparison,
    /// Every recorded input file against the one the re-run read.
    pub inputs: Vec<FileCheck>,
    /// Every recorded output file against the one the re-run produced.
    pub outputs: Vec<FileCheck>,
    /// The thread count of the re-run.
    pub threads: usize,
}

impl Replay {
    /// The output is byte-identical and every file agrees.
    pub fn reproduced(&self) -> bool {
        self.comparison.identical
            && self.inputs.iter().all(|f| f.same)
            && self.outputs.iter().all(|f| f.same)
    }
}

/// Re-run a manifest (optionally with another thread count: the output must not change)
/// and compare its output and files with the recorded ones.
///
/// # Errors
/// Loading or running failed.
pub fn replay(
    manifest: &Manifest,
    threads: Option<usize>,
    progress: &dyn Progress,
) -> Result<Replay> {
    let mut config: EngineConfig = manifest.engine.clone();
    if let Some(t) = threads {
        config.threads = t;
    }
    if let Some(spec) = &config.engine {
        return replay_remote(manifest, spec, &config, progress);
    }
    let engine = Engine::load(&config, progress)?;
    let out = execute(&engine, &manifest.run, progress)?;
    let comparison = compare_outputs(&manifest.output, &out.bytes);
    let current_inputs = input_files(&engine, &manifest.run)?;
    let current_outputs: Vec<HashedFile> = out
        .files
        .iter()
        .map(|(role, path, bytes)| HashedFile {
            role: role.clone(),
            path: path.clone(),
            sha256: sha256_hex(bytes),
        })
        .collect();
    Ok(Replay {
        command: manifest.run.command().into(),
        comparison,
        inputs: check_files(&manifest.inputs, &current_inputs),
        outputs: check_files(&manifest.outputs, &current_outputs),
        threads: engine.threads(),
    })
}

/// [`replay`] of a generate or eval run drawn from a remote engine: connect again and
/// compare. The same bytes come back only if the engine is deterministic under the seeds
/// tilt sends.
fn replay_remote(
    manifest: &Manifest,
    spec: &str,
    config: &EngineConfig,
    progress: &dyn Progress,
) -> Result<Replay> {
    let engine = RemoteEngine::connect(spec, &config.rewards, progress)?;
    let bytes = match &manifest.run {
        Run::Generate {
            prompts,
            chat_template,
            params,
        } => {
            let mut bytes = Vec::new();
            run_generate(&engine, prompts, *chat_template, params, progress, |l| {
                bytes.extend(json_line(l)?);
                Ok(())
            })?;
            bytes
        }
        Run::Eval { prompts, config } => json_line(&run_eval(&engine, prompts, config, progress)?)?,
        other => {
            return Err(EngineError::invalid(
                "engine",
                format!("a {} run cannot use a remote engine", other.command()),
            ))
        }
    };
    let comparison = compare_outputs(&manifest.output, &bytes);
    let current_inputs = remote_input_files(&manifest.run)?;
    Ok(Replay {
        command: manifest.run.command().into(),
        comparison,
        inputs: check_files(&manifest.inputs, &current_inputs),
        outputs: Vec::new(),
        threads: manifest.host.threads,
    })
}

/// The files a run on a remote engine read, hashed: the prompts file (the engine's model is
/// not a file here; the manifest records its spec).
///
/// # Errors
/// A file that cannot be read.
pub fn remote_input_files(run: &Run) -> Result<Vec<HashedFile>> {
    run.prompts_file()
        .map(|p| HashedFile::of("prompts", p))
        .into_iter()
        .collect()
}

/// A run's output files as manifest entries.
pub fn output_files(out: &RunOutput) -> Vec<HashedFile> {
    out.files
        .iter()
        .map(|(role, path, bytes)| HashedFile {
            role: role.clone(),
            path: path.clone(),
            sha256: sha256_hex(bytes),
        })
        .collect()
}
