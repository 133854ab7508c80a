//! CD-FUDGE: fitting a prefix scorer by Monte-Carlo regression (arXiv 2310.17022 §2.2;
//! docs/theory.md).
//!
//! ```text
//! draw y ~ p(· | x) to EOS, label it with r([x, y]);
//! loss  ℓ_F = ½ Σ_t ( V_θ([x, y^t]) − r([x, y]) )²  over every prefix y^t, t = 0..|y|
//! ```
//!
//! Because y is drawn from p, E[r | prefix y^t] = V*([x, y^t]): the population minimiser is
//! the base policy's value function. The engine's scorer training draws the rollouts and
//! records the hidden state at every prefix (t = 0 is the prompt's last position);
//! [`fit_head`] fits a linear or tanh-MLP head on them with candle's autodiff and AdamW.
//!
//! Design choices, and why:
//! - The held-out split is **by prompt** (all prefixes of a prompt's rollouts go to the same
//!   side): prefixes of one rollout share most of their information, so a split by row
//!   would measure memorisation, not generalisation to new prompts.
//! - Features are standardised with the training rows' mean and std, targets with their
//!   mean and std; the saved head folds both back, so V is in reward units. AdamW's decay
//!   then pulls the head towards the constant predictor (the training mean), which is the
//!   baseline it is judged against.
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
    /// The final reward of the rollout each prefix belongs to.
    pub targets: Vec<f64>,
    /// The prompt index of each prefix.
    pub groups: Vec<usize>,
    /// Number of prompts.
    pub n_prompts: usize,
    /// The final reward of every rollout, per prompt.
    pub rollout_rewards: Vec<Vec<f64>>,
    /// The number of prefixes (rows) of every rollout, per prompt: its length + 1 (t = 0 is
    /// the prompt's last position). With `rollout_rewards` this is the whole target column.
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

/// Settings of [`fit_head`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The head.
    pub head: HeadKind,
    /// Full-batch AdamW steps.
    pub epochs: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Fraction of prompts held out (at least one prompt on each side).
    pub heldout_fraction: f64,
    /// Seed of the split and the initialisation.
    pub seed: u64,
}

impl TrainConfig {
    /// Check the settings (call it before drawing rollouts: [`fit_head`] checks them again,
    /// but only after the rollouts are paid for).
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `epochs` (0), `learning_rate` (not finite and > 0),
    /// `weight_decay` (not finite and ≥ 0), `heldout_fraction` (not in (0, 1)) or
    /// `mlp_hidden` (0).
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
    /// The loss curve (MSE, squared reward units).
    pub loss_curve: Vec<LossPoint>,
    /// Final MSE of the scorer on the held-out prefixes.
    pub heldout_mse_scorer: f64,
    /// MSE of the constant predictor (training mean) on the held-out prefixes.
    pub heldout_mse_constant: f64,
    /// 1 − scorer MSE / constant MSE on the held-out prefixes (> 0: the scorer beats the
    /// constant predictor).
    pub heldout_r2_vs_constant: f64,
    /// Final MSE on the training prefixes.
    pub train_mse: f64,
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

/// Fit a prefix scorer head by CD-FUDGE regression (arXiv 2310.17022 §2.2): minimise the
/// mean over training prefixes of (V_θ(prefix) − r(rollout))² with AdamW, full batch,
/// holding out a fraction of the prompts.
///
/// # Errors
/// Invalid settings; fewer than 2 prompts; rows of the wrong length or non-finite; a fit
/// that diverges (a non-finite loss, or a final training error above where it started),
/// named as a `learning_rate` error; candle failing.
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
    // Standardisation from the training rows.
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
    let to_tensors = |idx: &[usize]| -> Result<(Tensor, Tensor)> {
        let mut x = Vec::with_capacity(idx.len() * d);
        let mut y = Vec::with_capacity(idx.len());
        for &i in idx {
            for (j, &v) in data.features[i].iter().enumerate() {
                x.push((v - standardizer.mean[j]) / standardizer.std[j]);
            }
            y.push(((data.targets[i] - y_mean) / y_std) as f32);
        }
        Ok((
            Tensor::from_vec(x, (idx.len(), d), &dev)?,
            Tensor::from_vec(y, (idx.len(), 1), &dev)?,
        ))
    };
    let (x_train, y_train) = to_tensors(&train_idx)?;
    let (x_held, y_held) = to_tensors(&held_idx)?;

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
    let forward = |x: &Tensor| -> Result<Tensor> {
        Ok(match config.head {
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
    };
    let mse =
        |x: &Tensor, y: &Tensor| -> Result<Tensor> { Ok(forward(x)?.sub(y)?.sqr()?.mean_all()?) };
    let scale2 = y_std * y_std;
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: config.learning_rate,
            weight_decay: config.weight_decay,
            ..Default::default()
        },
    )?;
    let mut curve = Vec::new();
    let every = (config.epochs / 50).max(1);
    let mut start_loss = None;
    for epoch in 0..config.epochs {
        let loss = mse(&x_train, &y_train)?;
        let value = f64::from(loss.to_scalar::<f32>()?);
        if !value.is_finite() {
            return Err(diverged(epoch, value * scale2, config));
        }
        start_loss.get_or_insert(value);
        opt.backward_step(&loss)?;
        if (epoch + 1) % every == 0 || epoch + 1 == config.epochs {
            curve.push(LossPoint {
                epoch: epoch + 1,
                train_mse: mse(&x_train, &y_train)?.to_scalar::<f32>()? as f64 * scale2,
                heldout_mse: mse(&x_held, &y_held)?.to_scalar::<f32>()? as f64 * scale2,
            });
        }
    }
    // A fit that ends worse than it started (and worse than the constant predictor, MSE 1
    // in standardised units) diverged: full-batch AdamW with a sane rate does not do that.
    let final_loss = f64::from(mse(&x_train, &y_train)?.to_scalar::<f32>()?);
    let start = start_loss.unwrap_or(1.0).max(1.0);
    if !final_loss.is_finite() || final_loss > start * (1.0 + 1e-6) {
        return Err(diverged(config.epochs, final_loss * scale2, config));
    }
    // Fold the target standardisation back: V = ȳ + s_y·f(u).
    let ys = y_std as f32;
    let head = match config.head {
        HeadKind::Linear => {
            let w = vars[0].as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let b = vars[1].as_tensor().to_vec1::<f32>()?[0];
            ScorerHead::Linear(LinearHead {
                standardizer,
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
                standardizer,
                w1: w1t,
                b1,
                w2: w2.iter().map(|x| x * ys).collect(),
                b2: y_mean as f32 + ys * b2,
            })
        }
    };
    // Final metrics from the saved head itself (f64 path), against the constant predictor.
    use super::PrefixScorer;
    let eval = |idx: &[usize]| -> Result<f64> {
        let hs: Vec<&[f32]> = idx.iter().map(|&i| data.features[i].as_slice()).collect();
        let v = head.score(&hs)?;
        Ok(idx
            .iter()
            .zip(&v)
            .map(|(&i, vi)| (vi - data.targets[i]).powi(2))
            .sum::<f64>()
            / idx.len() as f64)
    };
    let heldout_mse_scorer = eval(&held_idx)?;
    let train_mse = eval(&train_idx)?;
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
        heldout_mse_scorer,
        heldout_mse_constant,
        "CD-FUDGE fit done"
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
}
