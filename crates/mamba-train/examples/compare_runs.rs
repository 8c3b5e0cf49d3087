//! Plots the validation loss of several `mamba train` runs against wall-clock time, in one SVG.
//!
//! ```sh
//! cargo run --release -p mamba-train --example compare_runs -- OUT.svg RUN_DIR[=LABEL] ...
//! ```
//!
//! Each run's `metrics.jsonl` gives one series of (`elapsed_s`, `val_loss`) points, labelled
//! with LABEL or the directory's name.

use std::path::Path;
use std::process::ExitCode;

use mamba_train::plot::{Series, svg};

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

/// (elapsed seconds, validation loss) of every line of `dir/metrics.jsonl`.
fn curve(dir: &Path) -> Result<Vec<(f64, f64)>, String> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?;
            match (v["elapsed_s"].as_f64(), v["val_loss"].as_f64()) {
                (Some(t), Some(l)) => Ok((t, l)),
                _ => Err(format!("{} line {}: no elapsed_s / val_loss", path.display(), i + 1)),
            }
        })
        .collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: compare_runs OUT.svg RUN_DIR[=LABEL] ...");
        return ExitCode::from(2);
    }
    let mut runs = Vec::new();
    for arg in &args[1..] {
        let (dir, label) = arg.split_once('=').unwrap_or((arg, arg));
        match curve(Path::new(dir)) {
            Ok(points) => runs.push((label.to_string(), points)),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let series: Vec<Series> = runs
        .iter()
        .zip(COLORS.iter().cycle())
        .map(|((name, points), color)| Series { name, color, points })
        .collect();
    let plot = svg("Validation loss", "seconds", "nats per token", &series);
    if let Err(e) = std::fs::write(&args[0], plot) {
        eprintln!("error: {}: {e}", args[0]);
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
