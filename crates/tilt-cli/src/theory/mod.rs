//! `tilt theory …`: the exact core, on a finite reference distribution.

use clap::Subcommand;

pub mod bon;
pub mod bounds;
pub mod divergence;
pub mod frontier;
pub mod infalign;
pub mod input;
pub mod memoryless;
pub mod progress;
pub mod tilt;

/// The theory subcommands.
#[derive(Debug, Subcommand)]
pub enum TheoryCommand {
    /// The exact KL-regularised optimum φ_β ∝ p·e^(r/β), by β or by KL budget (nats).
    Tilt(tilt::TiltArgs),
    /// Exact best-of-n (or worst-of-n) with ties: pmf, KL (nats), bound, estimator, win rate.
    Bon(bon::BonArgs),
    /// Best-of-n for n = 1…N next to the tilt at the same KL (nats), optionally plotted.
    Frontier(frontier::FrontierArgs),
    /// KL both ways, Rényi, total variation, χ², squared Hellinger between two pmfs (nats).
    Divergence(divergence::DivergenceArgs),
    /// Sub-Gaussian proxy σ² and the √(2σ²·KL) bound next to exact best-of-n and tilt gains.
    Bounds(bounds::BoundsArgs),
    /// Memoryless model, linear reward (arXiv 2404.01730): rate function, x*, the optimal
    /// tilt and best-of-N with N = e^(LΔ), exactly at each length (nats).
    Memoryless(memoryless::MemorylessArgs),
    /// InfAlign on the calibrated reward (arXiv 2412.19792): KL (nats), standard and
    /// inference-time win rates of g ∝ e^(Φ(c)/β); --optimize-t for the CTRL transform.
    Infalign(infalign::InfalignArgs),
    /// Inference-time win rate vs KL (nats): identity, CTRL with optimised t, best-of-m.
    InfalignFrontier(infalign::InfalignFrontierArgs),
}

/// Run one theory subcommand.
pub fn run(cmd: TheoryCommand) -> anyhow::Result<()> {
    match cmd {
        TheoryCommand::Tilt(a) => tilt::run(a),
        TheoryCommand::Bon(a) => bon::run(a),
        TheoryCommand::Frontier(a) => frontier::run(a),
        TheoryCommand::Divergence(a) => divergence::run(a),
        TheoryCommand::Bounds(a) => bounds::run(a),
        TheoryCommand::Memoryless(a) => memoryless::run(a),
        TheoryCommand::Infalign(a) => infalign::run(a),
        TheoryCommand::InfalignFrontier(a) => infalign::run_frontier(a),
    }
}
