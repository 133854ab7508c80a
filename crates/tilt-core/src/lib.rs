//! # tilt-core: the exact theory of inference-time alignment
//!
//! A reference policy `p` over a finite set of outcomes, a reward `r` on them, and the
//! policies that alignment methods make of them: the KL-optimal exponential tilt, best-of-n
//! and worst-of-n (with ties), soft best-of-n; their KL, win rates and other divergences, the
//! known bounds and estimators; the memoryless-model asymptotics of arXiv 2404.01730 and
//! the calibrated-reward (InfAlign, arXiv 2412.19792) curves.
//!
//! This crate depends on no ML library: it is pure `f64` arithmetic, in log space wherever
//! powers and tiny probabilities meet. All divergences are in nats.
//!
//! Every formula implemented here is stated, with its source, in the repository's
//! `docs/theory.md` (numbered sections, cited from the functions as "docs/theory.md §N").
//! Errors say whose fault they are ([`TiltError::kind`]).
#![deny(missing_docs)]

pub mod distribution;
pub mod error;

pub use distribution::RewardDistribution;
pub use error::{ErrorKind, Result, TiltError};

pub mod best_of_n;
pub mod bounds;
pub mod calibration;
pub mod divergence;
pub mod frontier;
pub mod infalign;
pub mod input;
pub mod lattice;
pub mod levels;
pub mod memoryless;
pub mod numerics;
pub mod optimize;
pub mod quadrature;
pub mod report;
pub mod soft_best_of_n;
pub mod tilt;
pub mod win_rate;
