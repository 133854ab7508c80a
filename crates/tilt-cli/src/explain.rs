//! `tilt explain [CODE]`: what an output's `kl_note` code means (the one place the long
//! texts live is the engine's `KlNote::explain`; the README lists the same).

use crate::usage;
use clap::Args;
use serde_json::json;
use tilt_engine::KlNote;
use tilt_output::{emit, Format};

/// Flags of `tilt explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// A `kl_note` code (e.g. `selection-bound`); without it, every code.
    code: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// Run `tilt explain`.
pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let notes: Vec<KlNote> = match &args.code {
        None => KlNote::ALL.to_vec(),
        Some(c) => vec![KlNote::from_code(c).ok_or_else(|| {
            usage(format!(
                "{c:?} is not a kl_note code; the codes are {}",
                KlNote::ALL.map(KlNote::code).join(", ")
            ))
        })?],
    };
    let rows: Vec<_> = notes
        .iter()
        .map(|n| json!({"kl_note": n.code(), "meaning": n.explain()}))
        .collect();
    Ok(emit(
        &json!({ "units": "nats", "kl_notes": rows }),
        args.format,
    )?)
}
