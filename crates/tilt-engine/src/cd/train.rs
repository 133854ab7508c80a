//! Fitting a prefix scorer V_θ on reference rollouts, by CD-FUDGE or CD-Q (Mudgal et al.,
//! *Controlled Decoding from Language Models*, arXiv 2310.17022 §2; docs/theory.md §9).
//!
//! ```text
//! draw y ~ p(· | x) to EOS, label it with r([x, y]);
//! CD-FUDGE:  ℓ_F = ½ Σ_t ( V_θ([x, y^t]) − r([x, y]) )²           over every prefix y^t, t = 0..|y|
//! CD-Q:      ℓ_Q = ½ Σ_t ( V_θ([x, y^t]) − v̇([x, y^t]) )²,
//!            v̇ = V_θ̄([x, y^{t+1}]) for t < |y|,  v̇ = r([x, y]) at t = |y|   (θ̄ frozen)
//! ```
//!
//! Because y is drawn from p, E[r | prefix y^t] = V*([x, y^t]): FUDGE's population
//! minimiser is the base policy's value function. CD-Q regresses every prefix on the frozen
//! scorer's value of the next prefix instead; the next token of a rollout drawn from p is a
//! sample z ~ p(·|[x, y^t]), so v̇ is an unbiased one-sample estimate of the paper's target
//! E_{z~p}[V_θ̄([x, y^t, z])], and V* is the fixed point. The engine's scorer training draws
//! the rollouts and records the hidden state at every prefix (t = 0 is the prompt's last
//! position); [`fit_head`] fits a linear or tanh-MLP head on them with candle's autodiff
//! and AdamW.
//!
//! Design choices, and why:
//! - The held-out split is **by prompt** (all prefixes of a prompt's rollouts go to the same
//!   side): prefixes of one rollout share most of their information, so a split by row
//!   would measure memorisation, not generalisation to new prompts.
//! - Features are standardised with the training rows' mean and std, targets with the mean
//!   and std of the training rows' final rewards; the saved head folds both back, so V is
//!   in reward units. AdamW's decay then pulls the head towards the constant predictor (the
//!   training mean), which is the baseline it is judged against. CD-Q keeps the same target
//!   standardisation in every round, so one parameter vector means the same V throughout
//!   and each round can start from the previous one.
//! - CD-Q is fitted-value iteration: round 0 is the FUDGE fit (regression on r is the
//!   natural first iterate: it already estimates V*, so the rounds start near the fixed
//!   point), then each of `rounds` rounds recomputes the targets with the previous round's
//!   head (a frozen target network: no gradient flows through v̇) and refits from it with a
//!   fresh AdamW. Each round moves information one prefix back along the rollouts.
//! - Both methods report the same held-out figure, the MSE of V against the rollouts' final
//!   rewards on the held-out prompts, so their cards compare directly; CD-Q's card adds the
//!   held-out Bellman residual and one line per round.
//! - Full-batch steps: the data (a few thousand prefixes × hidden size) fits in memory, and
//!   full-batch AdamW from a seeded initialisation is deterministic.
//! - The initial weights come from a seeded ChaCha stream, not candle's unseeded
//!   `randn`, so the same seed gives the same scorer file.

use super::scorer::{LinearHead, MlpHead, ScorerHead, Standardizer};
use crate::error::{EngineError, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

/// A ChaCha20 stream for the training split and initialisation (`seed`, `stream`).
fn sequence_rng(seed: u64, stream: u64) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Prefix features and their regression targets, grouped by prompt.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PrefixDataset {
    /// Hidden size d.
    pub hidden_size: usize,
    /// One hidden state per prefix (length d each).
    pub features: Vec<Vec<f32>>,
    /// The final reward of the rollout each prefix belongs to (CD-FUDGE's target).
    pub targets: Vec<f64>,
    /// The prompt index of each prefix.
    pub groups: Vec<usize>,
    /// Number of prompts.
    pub n_prompts: usize,
    /// The final reward of every rollout, per prompt.
    pub rollout_rewards: Vec<Vec<f64>>,
    /// The number of prefixes (rows) of every rollout, per prompt: its length + 1 (t = 0 is
    /// the prompt's last position). With `rollout_rewards` this is the whole target column.
    /// The rows are stored prompt by prompt, rollout by rollout, t = 0..|y| in order, so row
    /// i + 1 is the next prefix of row i unless row i ends its rollout (CD-Q reads this).
    pub rollout_prefixes: Vec<Vec<usize>>,
}

/// The head to fit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// V = w·u + b.
    Linear,
    /// V = w2·tanh(W1 u + b1) + b2 with `hidden` units.
    Mlp {
        /// Hidden units H ≥ 1.
        hidden: usize,
    },
}

/// The most CD-Q rounds (`q_rounds`): each round is a full refit of `epochs` AdamW steps,
/// and information moves one prefix back per round, so a few hundred rounds cover any
/// rollout this engine draws from a start that is already the FUDGE fit.
pub const MAX_Q_ROUNDS: usize = 256;

/// How [`fit_head`] forms its regression targets (arXiv 2310.17022 §2: the paper's two ways
/// of training a prefix scorer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainMethod {
    /// CD-FUDGE: every prefix is regressed on its rollout's final reward r([x, y]).
    #[default]
    Fudge,
    /// CD-Q by fitted-value iteration: after a FUDGE fit (round 0), `rounds` times regress
    /// every non-final prefix on the previous round's frozen value of the next prefix along
    /// its rollout, and the final prefix on r([x, y]) (the sampled Bellman target).
    Q {
        /// Bellman rounds after round 0 (1 to [`MAX_Q_ROUNDS`]).
        rounds: usize,
    },
}

impl TrainMethod {
    /// Whether this is CD-FUDGE (the default, left out of serialised settings so that files
    /// written before CD-Q existed read, and re-run, byte for byte the same).
    pub fn is_fudge(&self) -> bool {
        matches!(self, TrainMethod::Fudge)
    }

    /// The method's name: `fudge` or `q`.
    pub fn name(&self) -> &'static str {
        match self {
            TrainMethod::Fudge => "fudge",
            TrainMethod::Q { .. } => "q",
        }
    }
}

/// Settings of [`fit_head`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The head.
    pub head: HeadKind,
    /// Full-batch AdamW steps (per round, for CD-Q).
    pub epochs: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Fraction of prompts held out (at least one prompt on each side).
    pub heldout_fraction: f64,
    /// Seed of the split and the initialisation.
    pub seed: u64,
    /// CD-FUDGE or CD-Q (absent in settings written before CD-Q: FUDGE).
    #[serde(default, skip_serializing_if = "TrainMethod::is_fudge")]
    pub method: TrainMethod,
}

impl TrainConfig {
    /// Check the settings (call it before drawing rollouts: [`fit_head`] checks them again,
    /// but only after the rollouts are paid for).
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `epochs` (0), `learning_rate` (not finite and > 0),
    /// `weight_decay` (not finite and ≥ 0), `heldout_fraction` (not in (0, 1)),
    /// `mlp_hidden` (0) or `q_rounds` (0 or above [`MAX_Q_ROUNDS`]).
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(EngineError::invalid("epochs", "is 0; at least 1"));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(EngineError::invalid(
                "learning_rate",
                format!("is {}; must be a finite number > 0", self.learning_rate),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(EngineError::invalid(
                "weight_decay",
                format!("is {}; must be a finite number ≥ 0", self.weight_decay),
            ));
        }
        if !(self.heldout_fraction > 0.0 && self.heldout_fraction < 1.0) {
            return Err(EngineError::invalid(
                "heldout_fraction",
                format!("is {}; must be in (0, 1)", self.heldout_fraction),
            ));
        }
        if let HeadKind::Mlp { hidden: 0 } = self.head {
            return Err(EngineError::invalid("mlp_hidden", "is 0; at least 1 unit"));
        }
        if let TrainMethod::Q { rounds } = self.method {
            if rounds == 0 {
                return Err(EngineError::invalid(
                    "q_rounds",
                    "is 0; CD-Q needs at least 1 Bellman round (0 rounds is CD-FUDGE)",
                ));
            }
            if rounds > MAX_Q_ROUNDS {
                return Err(EngineError::invalid(
                    "q_rounds",
                    format!(
                        "{rounds} is above the cap of {MAX_Q_ROUNDS} (each round refits the head \
                         for every epoch)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Mean squared errors at one point of training, in squared reward units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossPoint {
    /// AdamW steps taken.
    pub epoch: usize,
    /// MSE on the training prefixes.
    pub train_mse: f64,
    /// MSE on the held-out prefixes.
    pub heldout_mse: f64,
}

/// One CD-Q round's figures, in squared reward units (after that round's refit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QRound {
    /// The round, 1 to `rounds` (round 0 is the FUDGE fit of `loss_curve`).
    pub round: usize,
    /// MSE against this round's Bellman targets on the training prefixes (the loss fitted).
    pub train_mse_target: f64,
    /// MSE against the rollouts' final rewards on the training prefixes.
    pub train_mse: f64,
    /// MSE against the rollouts' final rewards on the held-out prefixes (FUDGE's figure).
    pub heldout_mse: f64,
    /// Held-out Bellman residual: mean of (V(row) − v̇(row))², v̇ from this round's head.
    pub heldout_bellman_mse: f64,
    /// Largest change of V over the training prefixes since the previous round (reward
    /// units): 0 at the fixed point.
    pub max_change: f64,
}

/// What a fit produced and how good it is: the JSON card saved beside the scorer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainCard {
    /// The settings.
    pub config: TrainConfig,
    /// Hidden size d.
    pub hidden_size: usize,
    /// Prompt indices used for training.
    pub train_prompts: Vec<usize>,
    /// Prompt indices held out.
    pub heldout_prompts: Vec<usize>,
    /// Training prefixes.
    pub train_rows: usize,
    /// Held-out prefixes.
    pub heldout_rows: usize,
    /// Mean of the training targets: the constant predictor.
    pub constant_prediction: f64,
    /// The loss curve (MSE, squared reward units) of the regression on final rewards (for
    /// CD-Q, its round 0).
    pub loss_curve: Vec<LossPoint>,
    /// Final MSE of the scorer against the final rewards on the held-out prefixes.
    pub heldout_mse_scorer: f64,
    /// MSE of the constant predictor (training mean) on the held-out prefixes.
    pub heldout_mse_constant: f64,
    /// 1 − scorer MSE / constant MSE on the held-out prefixes (> 0: the scorer beats the
    /// constant predictor).
    pub heldout_r2_vs_constant: f64,
    /// Final MSE against the final rewards on the training prefixes.
    pub train_mse: f64,
    /// CD-Q only: the final scorer's held-out Bellman residual, the mean over held-out
    /// prefixes of (V(row) − v̇(row))² with v̇ = V(next row), or r at a rollout's last row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout_bellman_mse: Option<f64>,
    /// CD-Q only: one entry per Bellman round.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub q_rounds: Vec<QRound>,
}

/// The error of a fit that diverged.
fn diverged(epoch: usize, train_mse: f64, config: &TrainConfig) -> EngineError {
    EngineError::invalid(
        "learning_rate",
        format!(
            "training diverged at epoch {epoch} (training MSE {train_mse:e}, worse than where it \
             started) with learning rate {}; lower it (nothing was written)",
            config.learning_rate
        ),
    )
}

fn mean_std(xs: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = xs.clone().count().max(1) as f64;
    let mean = xs.clone().sum::<f64>() / n;
    let var = xs.map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// For every row, the row of the next prefix along its rollout (`None` at a rollout's last
/// prefix, t = |y|), from `rollout_prefixes` and the row order it documents.
///
/// # Errors
/// [`EngineError::Invalid`] naming `dataset` when the rollout counts do not cover the rows
/// exactly, a rollout has no row, or a row's prompt disagrees with its rollout's.
pub fn next_prefix_rows(data: &PrefixDataset) -> Result<Vec<Option<usize>>> {
    let bad = |why: String| EngineError::invalid("dataset", why);
    if data.rollout_prefixes.len() != data.n_prompts {
        return Err(bad(format!(
            "rollout prefix counts are given for {} prompts, not {} (CD-Q needs every \
             rollout's rows)",
            data.rollout_prefixes.len(),
            data.n_prompts
        )));
    }
    let mut next = Vec::with_capacity(data.groups.len());
    for (p, counts) in data.rollout_prefixes.iter().enumerate() {
        for (j, &n) in counts.iter().enumerate() {
            if n == 0 {
                return Err(bad(format!("rollout {j} of prompt {p} has no prefix")));
            }
            let first = next.len();
            if first + n > data.groups.len() {
                return Err(bad(format!(
                    "the rollouts' prefix counts add up to more than the {} rows",
                    data.groups.len()
                )));
            }
            if let Some(i) = (first..first + n).find(|&i| data.groups[i] != p) {
                return Err(bad(format!(
                    "row {i} belongs to prompt {} but is counted in a rollout of prompt {p}",
                    data.groups[i]
                )));
            }
            next.extend((first + 1..first + n).map(Some));
            next.push(None);
        }
    }
    if next.len() != data.groups.len() {
        return Err(bad(format!(
            "the rollouts' prefix counts add up to {} rows, not {}",
            next.len(),
            data.groups.len()
        )));
    }
    Ok(next)
}

/// The sampled CD-Q target of every row (arXiv 2310.17022 §2, CD-Q): v̇ = V(next prefix)
/// along the rollout, or the rollout's final reward at its last prefix.
fn bellman_targets(values: &[f64], rewards: &[f64], next: &[Option<usize>]) -> Vec<f64> {
    next.iter()
        .zip(rewards)
        .map(|(n, &r)| n.map_or(r, |j| values[j]))
        .collect()
}

/// V of a batch of (standardised) rows under the parameters `vars` of head `kind`, in
/// standardised target units: (N, d) → (N, 1).
fn forward(kind: HeadKind, vars: &[Var], x: &Tensor) -> Result<Tensor> {
    Ok(match kind {
        // (N, d) @ (d, 1) + (1) → (N, 1)
        HeadKind::Linear => x
            .matmul(vars[0].as_tensor())?
            .broadcast_add(vars[1].as_tensor())?,
        // tanh((N, d) @ (d, H) + (H)) @ (H, 1) + (1) → (N, 1)
        HeadKind::Mlp { .. } => x
            .matmul(vars[0].as_tensor())?
            .broadcast_add(vars[1].as_tensor())?
            .tanh()?
            .matmul(vars[2].as_tensor())?
            .broadcast_add(vars[3].as_tensor())?,
    })
}

/// Minimise the mean of (f(x) − y)² over the training rows by `config.epochs` full-batch
/// AdamW steps from the current `vars`, recording the curve into `curve` when given (MSE in
/// reward units: `scale2` is the target std squared; the held-out side is scored against
/// `y_held`).
///
/// # Errors
/// A diverging fit (non-finite loss, or a final loss above both the start and the constant
/// predictor's 1 in standardised units), as a `learning_rate` error; candle failing.
#[allow(clippy::too_many_arguments)]
fn adamw_fit(
    config: &TrainConfig,
    vars: &[Var],
    x_train: &Tensor,
    y_train: &Tensor,
    x_held: &Tensor,
    y_held: &Tensor,
    scale2: f64,
    mut curve: Option<&mut Vec<LossPoint>>,
) -> Result<f64> {
    let mse = |x: &Tensor, y: &Tensor| -> Result<Tensor> {
        Ok(forward(config.head, vars, x)?.sub(y)?.sqr()?.mean_all()?)
    };
    let mut opt = AdamW::new(
        vars.to_vec(),
        ParamsAdamW {
            lr: config.learning_rate,
            weight_decay: config.weight_decay,
            ..Default::default()
        },
    )?;
    let every = (config.epochs / 50).max(1);
    let mut start_loss = None;
    for epoch in 0..config.epochs {
        let loss = mse(x_train, y_train)?;
        let value = f64::from(loss.to_scalar::<f32>()?);
        if !value.is_finite() {
            return Err(diverged(epoch, value * scale2, config));
        }
        start_loss.get_or_insert(value);
        opt.backward_step(&loss)?;
        if let Some(c) = curve.as_deref_mut() {
            if (epoch + 1) % every == 0 || epoch + 1 == config.epochs {
                c.push(LossPoint {
                    epoch: epoch + 1,
                    train_mse: mse(x_train, y_train)?.to_scalar::<f32>()? as f64 * scale2,
                    heldout_mse: mse(x_held, y_held)?.to_scalar::<f32>()? as f64 * scale2,
                });
            }
        }
    }
    // A fit that ends worse than it started (and worse than the constant predictor, MSE 1
    // in standardised units) diverged: full-batch AdamW with a sane rate does not do that.
    let final_loss = f64::from(mse(x_train, y_train)?.to_scalar::<f32>()?);
    let start = start_loss.unwrap_or(1.0).max(1.0);
    if !final_loss.is_finite() || final_loss > start * (1.0 + 1e-6) {
        return Err(diverged(config.epochs, final_loss * scale2, config));
    }
    Ok(final_loss)
}

/// The head of parameters `vars`, with the feature standardisation and the target one
/// (V = ȳ + s_y·f(u)) folded in, so that it scores in reward units.
fn fold_head(
    kind: HeadKind,
    vars: &[Var],
    standardizer: &Standardizer,
    y_mean: f64,
    y_std: f64,
) -> Result<ScorerHead> {
    let ys = y_std as f32;
    Ok(match kind {
        HeadKind::Linear => {
            let w = vars[0].as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let b = vars[1].as_tensor().to_vec1::<f32>()?[0];
            ScorerHead::Linear(LinearHead {
                standardizer: standardizer.clone(),
                weight: w.iter().map(|x| x * ys).collect(),
                bias: y_mean as f32 + ys * b,
            })
        }
        HeadKind::Mlp { .. } => {
            let w1t = vars[0].as_tensor().t()?.contiguous()?.to_vec2::<f32>()?; // (H, d)
            let b1 = vars[1].as_tensor().to_vec1::<f32>()?;
            let w2 = vars[2].as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let b2 = vars[3].as_tensor().to_vec1::<f32>()?[0];
            ScorerHead::Mlp(MlpHead {
                standardizer: standardizer.clone(),
                w1: w1t,
                b1,
                w2: w2.iter().map(|x| x * ys).collect(),
                b2: y_mean as f32 + ys * b2,
            })
        }
    })
}

/// Mean of (a_i − b_i)² over the rows `idx`.
fn mse_on(idx: &[usize], a: &[f64], b: &[f64]) -> f64 {
    idx.iter().map(|&i| (a[i] - b[i]).powi(2)).sum::<f64>() / idx.len().max(1) as f64
}

/// Fit a prefix scorer head (arXiv 2310.17022 §2) by CD-FUDGE regression — minimise the
/// mean over training prefixes of (V_θ(prefix) − r(rollout))² with AdamW, full batch,
/// holding out a fraction of the prompts — or, with [`TrainMethod::Q`], by CD-Q: that fit
/// followed by `rounds` refits on the sampled Bellman targets v̇ = V_θ̄(next prefix) (r at
/// a rollout's last prefix) of the previous round's frozen head.
///
/// # Errors
/// Invalid settings; fewer than 2 prompts; rows of the wrong length or non-finite; for
/// CD-Q, rollout prefix counts that do not match the rows (`dataset`); a fit that diverges
/// (a non-finite loss or value, or a final training error above where it started), named
/// as a `learning_rate` error; candle failing.
pub fn fit_head(data: &PrefixDataset, config: &TrainConfig) -> Result<(ScorerHead, TrainCard)> {
    config.validate()?;
    let d = data.hidden_size;
    if data.n_prompts < 2 {
        return Err(EngineError::invalid(
            "prompts",
            format!(
                "{} prompt(s); training needs at least 2 (one is held out)",
                data.n_prompts
            ),
        ));
    }
    if data.features.len() != data.targets.len() || data.features.len() != data.groups.len() {
        return Err(EngineError::invalid(
            "dataset",
            "features, targets and groups differ in length",
        ));
    }
    if let Some(i) = data
        .features
        .iter()
        .position(|f| f.len() != d || f.iter().any(|x| !x.is_finite()))
    {
        return Err(EngineError::invalid(
            "dataset",
            format!("row {i} has the wrong length or a non-finite entry (hidden size {d})"),
        ));
    }
    if let Some(i) = data.targets.iter().position(|t| !t.is_finite()) {
        return Err(EngineError::invalid(
            "dataset",
            format!("target {i} is not finite"),
        ));
    }
    if let Some(i) = data.groups.iter().position(|&g| g >= data.n_prompts) {
        return Err(EngineError::invalid(
            "dataset",
            format!(
                "row {i} belongs to prompt {} of {}",
                data.groups[i], data.n_prompts
            ),
        ));
    }
    let next = match config.method {
        TrainMethod::Fudge => None,
        TrainMethod::Q { rounds } => Some((rounds, next_prefix_rows(data)?)),
    };
    // Split by prompt.
    let mut rng = sequence_rng(config.seed, u64::MAX);
    let mut order: Vec<usize> = (0..data.n_prompts).collect();
    order.shuffle(&mut rng);
    let n_held = ((config.heldout_fraction * data.n_prompts as f64).round() as usize)
        .clamp(1, data.n_prompts - 1);
    let mut heldout_prompts: Vec<usize> = order[..n_held].to_vec();
    let mut train_prompts: Vec<usize> = order[n_held..].to_vec();
    heldout_prompts.sort_unstable();
    train_prompts.sort_unstable();
    let mut is_held = vec![false; data.n_prompts];
    for &p in &heldout_prompts {
        is_held[p] = true;
    }
    let (train_idx, held_idx): (Vec<usize>, Vec<usize>) =
        (0..data.targets.len()).partition(|&i| !is_held[data.groups[i]]);
    if train_idx.is_empty() || held_idx.is_empty() {
        return Err(EngineError::invalid(
            "dataset",
            "the training or held-out side has no prefixes",
        ));
    }
    // Standardisation from the training rows (the targets' from the final rewards, kept for
    // every CD-Q round).
    let mut mean = vec![0f32; d];
    let mut std = vec![1f32; d];
    for j in 0..d {
        let (m, s) = mean_std(train_idx.iter().map(|&i| data.features[i][j] as f64));
        mean[j] = m as f32;
        std[j] = if s > 1e-6 { s as f32 } else { 1.0 };
    }
    let (y_mean, y_std) = mean_std(train_idx.iter().map(|&i| data.targets[i]));
    let y_std = if y_std > 1e-12 { y_std } else { 1.0 };
    let standardizer = Standardizer { mean, std };
    let dev = Device::Cpu;
    let features = |idx: &[usize]| -> Result<Tensor> {
        let mut x = Vec::with_capacity(idx.len() * d);
        for &i in idx {
            for (j, &v) in data.features[i].iter().enumerate() {
                x.push((v - standardizer.mean[j]) / standardizer.std[j]);
            }
        }
        Ok(Tensor::from_vec(x, (idx.len(), d), &dev)?)
    };
    let column = |idx: &[usize], y: &[f64]| -> Result<Tensor> {
        let v: Vec<f32> = idx
            .iter()
            .map(|&i| ((y[i] - y_mean) / y_std) as f32)
            .collect();
        Ok(Tensor::from_vec(v, (idx.len(), 1), &dev)?)
    };
    let x_train = features(&train_idx)?;
    let x_held = features(&held_idx)?;
    let y_train = column(&train_idx, &data.targets)?;
    let y_held = column(&held_idx, &data.targets)?;

    // Parameters, initialised from the seeded stream (shapes in comments).
    let mut init = sequence_rng(config.seed, u64::MAX - 1);
    let mut uniform = |n: usize, scale: f64| -> Vec<f32> {
        (0..n)
            .map(|_| ((init.random::<f64>() * 2.0 - 1.0) * scale) as f32)
            .collect()
    };
    let vars: Vec<Var> = match config.head {
        HeadKind::Linear => vec![
            Var::from_tensor(&Tensor::zeros((d, 1), DType::F32, &dev)?)?, // w (d, 1)
            Var::from_tensor(&Tensor::zeros(1, DType::F32, &dev)?)?,      // b (1)
        ],
        HeadKind::Mlp { hidden: h } => vec![
            Var::from_tensor(&Tensor::from_vec(
                uniform(d * h, 1.0 / (d as f64).sqrt()),
                (d, h),
                &dev,
            )?)?, // W1ᵀ (d, H)
            Var::from_tensor(&Tensor::zeros(h, DType::F32, &dev)?)?, // b1 (H)
            Var::from_tensor(&Tensor::from_vec(
                uniform(h, 1.0 / (h as f64).sqrt()),
                (h, 1),
                &dev,
            )?)?, // w2 (H, 1)
            Var::from_tensor(&Tensor::zeros(1, DType::F32, &dev)?)?, // b2 (1)
        ],
    };
    let scale2 = y_std * y_std;
    // Round 0 (all of CD-FUDGE): regression on the final rewards.
    let mut curve = Vec::new();
    adamw_fit(
        config,
        &vars,
        &x_train,
        &y_train,
        &x_held,
        &y_held,
        scale2,
        Some(&mut curve),
    )?;
    // CD-Q's rounds: targets from the frozen previous head, refit from it.
    let mut q_rounds = Vec::new();
    let mut heldout_bellman_mse = None;
    if let Some((rounds, next)) = &next {
        // V of every row in reward units, from the current parameters (a copy: no gradient
        // flows into the targets).
        let values_of = |vars: &[Var]| -> Result<Vec<f64>> {
            let mut v = vec![0f64; data.targets.len()];
            for (idx, x) in [(&train_idx, &x_train), (&held_idx, &x_held)] {
                let f = forward(config.head, vars, x)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                for (&i, fi) in idx.iter().zip(f) {
                    v[i] = y_mean + y_std * f64::from(fi);
                }
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(EngineError::invalid(
                    "learning_rate",
                    format!(
                        "CD-Q diverged: the value of row {i} is not finite with learning rate \
                         {}; lower it (nothing was written)",
                        config.learning_rate
                    ),
                ));
            }
            Ok(v)
        };
        let mut values = values_of(&vars)?;
        for round in 1..=*rounds {
            let targets = bellman_targets(&values, &data.targets, next);
            let y_round = column(&train_idx, &targets)?;
            adamw_fit(
                config, &vars, &x_train, &y_round, &x_held, &y_held, scale2, None,
            )?;
            let new_values = values_of(&vars)?;
            let max_change = train_idx
                .iter()
                .map(|&i| (new_values[i] - values[i]).abs())
                .fold(0.0, f64::max);
            let residual_targets = bellman_targets(&new_values, &data.targets, next);
            q_rounds.push(QRound {
                round,
                train_mse_target: mse_on(&train_idx, &new_values, &targets),
                train_mse: mse_on(&train_idx, &new_values, &data.targets),
                heldout_mse: mse_on(&held_idx, &new_values, &data.targets),
                heldout_bellman_mse: mse_on(&held_idx, &new_values, &residual_targets),
                max_change,
            });
            values = new_values;
        }
    }
    let head = fold_head(config.head, &vars, &standardizer, y_mean, y_std)?;
    // Final metrics from the saved head itself (f64 path), against the constant predictor.
    use super::PrefixScorer;
    let hs: Vec<&[f32]> = data.features.iter().map(Vec::as_slice).collect();
    let v = head.score(&hs)?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(diverged(config.epochs, f64::INFINITY, config));
    }
    let heldout_mse_scorer = mse_on(&held_idx, &v, &data.targets);
    let train_mse = mse_on(&train_idx, &v, &data.targets);
    if let Some((_, next)) = &next {
        let t = bellman_targets(&v, &data.targets, next);
        heldout_bellman_mse = Some(mse_on(&held_idx, &v, &t));
    }
    let heldout_mse_constant = held_idx
        .iter()
        .map(|&i| (data.targets[i] - y_mean).powi(2))
        .sum::<f64>()
        / held_idx.len() as f64;
    let heldout_r2_vs_constant = if heldout_mse_constant > 0.0 {
        1.0 - heldout_mse_scorer / heldout_mse_constant
    } else {
        0.0
    };
    tracing::info!(
        method = config.method.name(),
        heldout_mse_scorer,
        heldout_mse_constant,
        "prefix scorer fit done"
    );
    let card = TrainCard {
        config: config.clone(),
        hidden_size: d,
        train_prompts,
        heldout_prompts,
        train_rows: train_idx.len(),
        heldout_rows: held_idx.len(),
        constant_prediction: y_mean,
        loss_curve: curve,
        heldout_mse_scorer,
        heldout_mse_constant,
        heldout_r2_vs_constant,
        train_mse,
        heldout_bellman_mse,
        q_rounds,
    };
    Ok((head, card))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two prompts' worth of prefixes with a learnable target.
    fn data() -> PrefixDataset {
        let mut d = PrefixDataset {
            hidden_size: 3,
            n_prompts: 4,
            ..Default::default()
        };
        for i in 0..40 {
            let x = [
                (i % 7) as f32,
                (i % 3) as f32 - 1.0,
                (i as f32 / 10.0).sin(),
            ];
            d.targets.push(f64::from(0.5 * x[0] - x[1] + 0.1 * x[2]));
            d.features.push(x.to_vec());
            d.groups.push(i % 4);
        }
        d
    }

    fn config(learning_rate: f64) -> TrainConfig {
        TrainConfig {
            head: HeadKind::Linear,
            epochs: 40,
            learning_rate,
            weight_decay: 0.0,
            heldout_fraction: 0.25,
            seed: 1,
            method: TrainMethod::Fudge,
        }
    }

    #[test]
    fn a_sane_rate_fits_and_a_diverging_one_is_an_error_never_a_non_finite_head() {
        let (head, card) = fit_head(&data(), &config(0.05)).unwrap();
        assert!(card.train_mse < card.heldout_mse_constant, "{card:?}");
        assert!(head.to_bytes().is_ok());
        for lr in [100.0, 1e30] {
            let e = fit_head(&data(), &config(lr)).unwrap_err();
            assert_eq!(e.param(), Some("learning_rate"), "{lr}: {e}");
            assert!(e.to_string().contains("diverged"), "{e}");
        }
    }

    #[test]
    fn a_non_finite_head_is_never_serialised() {
        let (mut head, _) = fit_head(&data(), &config(0.05)).unwrap();
        if let ScorerHead::Linear(l) = &mut head {
            l.weight[1] = f32::INFINITY;
        }
        let e = head.to_bytes().unwrap_err().to_string();
        assert!(e.contains("not finite"), "{e}");
    }

    /// A Markov chain over one-hot states: `next[s]` lists (s', p(s'|s)); a state with no
    /// successor is terminal, with reward `reward[s]`.
    struct Chain {
        next: Vec<Vec<(usize, f64)>>,
        reward: Vec<f64>,
    }

    impl Chain {
        /// V*(s) by backward recursion: r(s) at a terminal, Σ p(s'|s)·V*(s') otherwise
        /// (the chain is acyclic, so the recursion ends).
        fn value(&self, s: usize) -> f64 {
            if self.next[s].is_empty() {
                self.reward[s]
            } else {
                self.next[s].iter().map(|&(t, p)| p * self.value(t)).sum()
            }
        }

        /// Every path from `s` to a terminal with its probability.
        fn paths(&self, s: usize) -> Vec<(Vec<usize>, f64)> {
            if self.next[s].is_empty() {
                return vec![(vec![s], 1.0)];
            }
            let mut out = Vec::new();
            for &(t, p) in &self.next[s] {
                for (mut path, q) in self.paths(t) {
                    path.insert(0, s);
                    out.push((path, p * q));
                }
            }
            out
        }
    }

    /// `n_prompts` copies of the same rollouts (state paths, each ending at a terminal of
    /// reward `reward[last]`), one row per prefix with the one-hot feature of its state, in
    /// the row order `collect_rollouts` writes.
    fn one_hot_rollouts(
        paths: &[Vec<usize>],
        reward: &[f64],
        n_states: usize,
        n_prompts: usize,
    ) -> PrefixDataset {
        let mut d = PrefixDataset {
            hidden_size: n_states,
            n_prompts,
            ..Default::default()
        };
        for p in 0..n_prompts {
            let mut rewards = Vec::new();
            let mut prefixes = Vec::new();
            for path in paths {
                let r = reward[*path.last().unwrap()];
                for &s in path {
                    let mut x = vec![0f32; n_states];
                    x[s] = 1.0;
                    d.features.push(x);
                    d.targets.push(r);
                    d.groups.push(p);
                }
                rewards.push(r);
                prefixes.push(path.len());
            }
            d.rollout_rewards.push(rewards);
            d.rollout_prefixes.push(prefixes);
        }
        d
    }

    fn one_hot_values(head: &ScorerHead, n_states: usize) -> Vec<f64> {
        use super::super::PrefixScorer;
        let rows: Vec<Vec<f32>> = (0..n_states)
            .map(|s| (0..n_states).map(|j| f32::from(u8::from(j == s))).collect())
            .collect();
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        head.score(&refs).unwrap()
    }

    fn tabular(method: TrainMethod) -> TrainConfig {
        TrainConfig {
            head: HeadKind::Linear,
            epochs: 1500,
            learning_rate: 0.02,
            weight_decay: 0.0,
            heldout_fraction: 0.25,
            seed: 5,
            method,
        }
    }

    /// Full-batch AdamW on a least-squares problem with 7 one-hot columns converges to well
    /// under this in 1500 steps (the fitted values are means of rewards in [0, 1]); the
    /// values compared differ from one another and from the wrong answers by 0.05 or more.
    const TOL: f64 = 2e-3;

    #[test]
    fn cd_q_converges_to_the_exact_value_function_of_a_toy_chain() {
        // S → A (1/4) | B (3/4); A → M (1/2) | T1 (1/2); B → M (2/3) | T0 (1/3);
        // M → T1 (1/4) | T2 (3/4); r(T1) = 1, r(T2) = 0.4, r(T0) = 0. M is reached from A
        // and from B, so the chain merges histories.
        let (s, a, b, m, t1, t2, t0) = (0, 1, 2, 3, 4, 5, 6);
        let chain = Chain {
            next: vec![
                vec![(a, 0.25), (b, 0.75)],
                vec![(m, 0.5), (t1, 0.5)],
                vec![(m, 2.0 / 3.0), (t0, 1.0 / 3.0)],
                vec![(t1, 0.25), (t2, 0.75)],
                vec![],
                vec![],
                vec![],
            ],
            reward: vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.4, 0.0],
        };
        // Every path, repeated in proportion to its probability (all are multiples of
        // 1/32), so the rollouts' empirical law is the chain's law exactly.
        let mut rollouts = Vec::new();
        for (path, p) in chain.paths(s) {
            let copies = p * 32.0;
            assert!((copies - copies.round()).abs() < 1e-9, "{path:?} {p}");
            rollouts.extend(std::iter::repeat_n(path, copies.round() as usize));
        }
        assert_eq!(rollouts.len(), 32);
        let data = one_hot_rollouts(&rollouts, &chain.reward, 7, 4);
        let exact: Vec<f64> = (0..7).map(|x| chain.value(x)).collect();
        // Worked by hand: V*(M) = 0.55, V*(A) = 0.775, V*(B) = 0.3667, V*(S) = 0.46875.
        assert!((exact[m] - 0.55).abs() < 1e-12 && (exact[s] - 0.46875).abs() < 1e-12);
        let (head, card) = fit_head(&data, &tabular(TrainMethod::Q { rounds: 4 })).unwrap();
        let v = one_hot_values(&head, 7);
        for x in 0..7 {
            assert!(
                (v[x] - exact[x]).abs() < TOL,
                "state {x}: V {} vs V* {}",
                v[x],
                exact[x]
            );
        }
        // The fixed point: V(s) = Σ p(s'|s) V(s') at every non-terminal, V = r at the ends.
        for x in 0..7 {
            let backed_up = if chain.next[x].is_empty() {
                chain.reward[x]
            } else {
                chain.next[x].iter().map(|&(t, p)| p * v[t]).sum()
            };
            assert!(
                (v[x] - backed_up).abs() < TOL,
                "state {x}: {} vs {backed_up}",
                v[x]
            );
        }
        assert_eq!(card.q_rounds.len(), 4);
        let last = card.q_rounds.last().unwrap();
        assert!(last.max_change < TOL, "{last:?}");
        // The held-out prompts see the same law, and V* is the best predictor of r there:
        // the held-out error is V*'s (the conditional variance of r), and the sampled
        // Bellman residual is the variance of V*(next state) given the state.
        let held = |f: &dyn Fn(usize) -> f64| -> f64 {
            rollouts
                .iter()
                .flat_map(|path| {
                    path.iter()
                        .map(|&x| (x, chain.reward[*path.last().unwrap()]))
                })
                .map(|(x, r)| f(x) - r)
                .map(|e| e * e)
                .sum::<f64>()
        };
        let rows: usize = rollouts.iter().map(Vec::len).sum();
        let exact_mse = held(&|x| exact[x]) / rows as f64;
        assert!(
            (card.heldout_mse_scorer - exact_mse).abs() < TOL,
            "{card:?}"
        );
        assert!(card.heldout_bellman_mse.unwrap() > 0.0);
        // With the exact law, FUDGE's regression has the same minimiser: both are V*.
        let (fudge, fcard) = fit_head(&data, &tabular(TrainMethod::Fudge)).unwrap();
        let vf = one_hot_values(&fudge, 7);
        for x in 0..7 {
            assert!((vf[x] - exact[x]).abs() < TOL, "FUDGE state {x}: {}", vf[x]);
        }
        assert!(fcard.q_rounds.is_empty() && fcard.heldout_bellman_mse.is_none());
    }

    #[test]
    fn cd_q_pools_merged_states_where_fudge_keeps_each_states_own_returns() {
        // A finite sample, not the law: S A A2 M T1 twice, S B M T0 once, S B M T1 once.
        // FUDGE's fixed point is each state's mean of its own rollouts' rewards
        // (V(A) = V(A2) = 1, V(B) = 1/2); CD-Q's is the value of the sample's empirical
        // transition model (certainty equivalence): every path runs through M, whose mean
        // is 3/4, so V = 3/4 at S, A, A2, B and M. Each round carries the value one state
        // back, so after 1 round V(A) is still A2's old FUDGE value 1 and after 2 it is 3/4.
        let (s, a, a2, b, m, t1, t0) = (0, 1, 2, 3, 4, 5, 6);
        let reward = vec![0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        let rollouts = vec![
            vec![s, a, a2, m, t1],
            vec![s, a, a2, m, t1],
            vec![s, b, m, t0],
            vec![s, b, m, t1],
        ];
        let data = one_hot_rollouts(&rollouts, &reward, 7, 4);
        // The two fixed points, computed from the sample directly.
        let mut own = [(0.0, 0usize); 7];
        let mut moves = [[0usize; 7]; 7];
        for path in &rollouts {
            let r = reward[*path.last().unwrap()];
            for (i, &x) in path.iter().enumerate() {
                own[x].0 += r;
                own[x].1 += 1;
                if let Some(&y) = path.get(i + 1) {
                    moves[x][y] += 1;
                }
            }
        }
        let mc: Vec<f64> = own.iter().map(|&(sum, n)| sum / n as f64).collect();
        let model = Chain {
            next: moves
                .iter()
                .map(|row| {
                    let n: usize = row.iter().sum();
                    (0..7)
                        .filter(|&y| row[y] > 0)
                        .map(|y| (y, row[y] as f64 / n as f64))
                        .collect()
                })
                .collect(),
            reward: reward.clone(),
        };
        let ce: Vec<f64> = (0..7).map(|x| model.value(x)).collect();
        assert_eq!((mc[a], mc[b], ce[a], ce[b]), (1.0, 0.5, 0.75, 0.75));
        let (fudge, fcard) = fit_head(&data, &tabular(TrainMethod::Fudge)).unwrap();
        let (q, qcard) = fit_head(&data, &tabular(TrainMethod::Q { rounds: 3 })).unwrap();
        let (q1, _) = fit_head(&data, &tabular(TrainMethod::Q { rounds: 1 })).unwrap();
        let (vf, vq, vq1) = (
            one_hot_values(&fudge, 7),
            one_hot_values(&q, 7),
            one_hot_values(&q1, 7),
        );
        for x in 0..7 {
            assert!(
                (vf[x] - mc[x]).abs() < TOL,
                "FUDGE {x}: {} vs {}",
                vf[x],
                mc[x]
            );
            assert!(
                (vq[x] - ce[x]).abs() < TOL,
                "CD-Q {x}: {} vs {}",
                vq[x],
                ce[x]
            );
        }
        assert!(
            (vq1[a] - 1.0).abs() < TOL && (vq1[a2] - 0.75).abs() < TOL,
            "{vq1:?}"
        );
        // FUDGE minimises the squared error to r on rows drawn like the held-out ones, so
        // CD-Q cannot beat it there; CD-Q instead makes V the mean of its sampled Bellman
        // targets in every state, so its Bellman residual is their within-state variance
        // alone, below FUDGE's (which adds the squared gaps V(s) − mean target).
        assert!(fcard.heldout_mse_scorer < qcard.heldout_mse_scorer - 0.01);
        let next = next_prefix_rows(&data).unwrap();
        let vf_rows: Vec<f64> = data
            .features
            .iter()
            .map(|f| vf[f.iter().position(|&u| u == 1.0).unwrap()])
            .collect();
        let t = bellman_targets(&vf_rows, &data.targets, &next);
        let fudge_residual = mse_on(&(0..t.len()).collect::<Vec<_>>(), &vf_rows, &t);
        let q_residual = qcard.heldout_bellman_mse.unwrap();
        assert!(
            q_residual < fudge_residual - 0.01,
            "{q_residual} vs {fudge_residual}"
        );
        // The within-state variance of CD-Q's targets, worked by hand: at M the target is
        // r ∈ {1, 1, 0, 1} (variance 3/16), elsewhere V(next) = 3/4 exactly; M is 4 of the
        // 18 rows of a prompt.
        assert!(
            (q_residual - 4.0 / 18.0 * 3.0 / 16.0).abs() < TOL,
            "{q_residual}"
        );

        // Without merges (A's and B's paths through distinct states M_A, M_B: a tree), every
        // state is reached by one history and the two fixed points coincide.
        let (ma, mb) = (m, 7);
        let mut tree_reward = reward.clone();
        tree_reward.push(0.0);
        let tree = vec![
            vec![s, a, a2, ma, t1],
            vec![s, a, a2, ma, t1],
            vec![s, b, mb, t0],
            vec![s, b, mb, t1],
        ];
        let data = one_hot_rollouts(&tree, &tree_reward, 8, 4);
        let (fudge, _) = fit_head(&data, &tabular(TrainMethod::Fudge)).unwrap();
        let (q, _) = fit_head(&data, &tabular(TrainMethod::Q { rounds: 3 })).unwrap();
        let (vf, vq) = (one_hot_values(&fudge, 8), one_hot_values(&q, 8));
        for x in 0..8 {
            assert!(
                (vf[x] - vq[x]).abs() < TOL,
                "state {x}: {} vs {}",
                vf[x],
                vq[x]
            );
        }
        assert!(
            (vq[b] - 0.5).abs() < TOL && (vq[a] - 1.0).abs() < TOL,
            "{vq:?}"
        );
    }

    #[test]
    fn bad_cd_q_settings_and_data_are_refused_naming_the_parameter() {
        for rounds in [0, MAX_Q_ROUNDS + 1] {
            let e = TrainConfig {
                method: TrainMethod::Q { rounds },
                ..config(0.05)
            }
            .validate()
            .unwrap_err();
            assert_eq!(e.param(), Some("q_rounds"), "{rounds}: {e}");
        }
        // CD-Q needs every rollout's rows; FUDGE does not.
        let q = TrainConfig {
            method: TrainMethod::Q { rounds: 2 },
            ..config(0.05)
        };
        let mut d = data();
        assert!(fit_head(&d, &config(0.05)).is_ok());
        let e = fit_head(&d, &q).unwrap_err();
        assert_eq!(e.param(), Some("dataset"), "{e}");
        // A row counted under the wrong prompt (these rows interleave the prompts), and,
        // once sorted by prompt, counts that leave a row out.
        d.rollout_prefixes = vec![vec![10]; 4];
        let e = fit_head(&d, &q).unwrap_err();
        assert!(e.to_string().contains("belongs to prompt"), "{e}");
        let mut idx: Vec<usize> = (0..40).collect();
        idx.sort_by_key(|&i| d.groups[i]);
        let mut sorted = PrefixDataset {
            features: idx.iter().map(|&i| d.features[i].clone()).collect(),
            targets: idx.iter().map(|&i| d.targets[i]).collect(),
            groups: idx.iter().map(|&i| d.groups[i]).collect(),
            rollout_prefixes: vec![vec![10], vec![10], vec![10], vec![9]],
            ..d.clone()
        };
        let e = fit_head(&sorted, &q).unwrap_err();
        assert!(e.to_string().contains("add up to 39"), "{e}");
        sorted.rollout_prefixes[3] = vec![4, 0, 6];
        let e = fit_head(&sorted, &q).unwrap_err();
        assert!(e.to_string().contains("has no prefix"), "{e}");
        // Valid CD-Q data fit, and a diverging CD-Q fit is an error like FUDGE's, never a
        // non-finite head.
        sorted.rollout_prefixes[3] = vec![4, 6];
        assert!(fit_head(&sorted, &q).is_ok());
        let e = fit_head(
            &sorted,
            &TrainConfig {
                learning_rate: 1e30,
                ..q.clone()
            },
        )
        .unwrap_err();
        assert_eq!(e.param(), Some("learning_rate"), "{e}");
    }

    #[test]
    fn settings_and_cards_written_before_cd_q_read_as_fudge() {
        let old = r#"{"head":"linear","epochs":300,"learning_rate":0.01,"weight_decay":0.05,
            "heldout_fraction":0.25,"seed":0}"#;
        let c: TrainConfig = serde_json::from_str(old).unwrap();
        assert_eq!(c.method, TrainMethod::Fudge);
        // FUDGE's settings serialise as before (so old manifests re-run byte for byte)...
        let text = serde_json::to_string(&c).unwrap();
        assert!(!text.contains("method"), "{text}");
        // ...and CD-Q's carry their method and rounds.
        let q = TrainConfig {
            method: TrainMethod::Q { rounds: 8 },
            ..c.clone()
        };
        let text = serde_json::to_string(&q).unwrap();
        assert!(text.contains(r#""method":{"q":{"rounds":8}}"#), "{text}");
        assert_eq!(serde_json::from_str::<TrainConfig>(&text).unwrap(), q);
        // The card of the example scorer, written before CD-Q.
        let card: serde_json::Value =
            serde_json::from_str(include_str!("../../../../examples/cd/scorer.json")).unwrap();
        let t: TrainCard = serde_json::from_value(card["training"].clone()).unwrap();
        assert_eq!(t.config.method, TrainMethod::Fudge);
        assert!(t.q_rounds.is_empty() && t.heldout_bellman_mse.is_none());
        let again = serde_json::to_value(&t).unwrap();
        assert_eq!(again, card["training"]);
    }
}
