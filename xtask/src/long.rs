//! `cargo xtask bench long`: training speed and memory of the Mamba-1 "S" model as the window
//! grows, with and without activation checkpointing, all in one run.
//!
//! Each configuration runs `mamba-train`'s `train_window` example in a process of its own (one
//! warm-up step, then the median of the timed steps), so its peak RSS is that configuration's
//! alone. Windows 256, 4,096 and 16,384 keep batch × window at 16,384 tokens per step; 65,536
//! runs one row; a 24-layer model of the same widths adds a 16,384 pair (checkpointing saves
//! more the deeper the model: all blocks' activations against one block's). The targets of the
//! long-sequence issue are checked as ratios within the run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::generate::run_measured;

/// One measured configuration.
struct Row {
    seq_len: usize,
    batch: usize,
    n_layer: usize,
    checkpoint: bool,
    step_s: f64,
    tokens_per_s: f64,
    peak_rss: f64,
}

/// (window, batch, layers).
const CONFIGS: &[(usize, usize, usize)] =
    &[(256, 64, 4), (4096, 4, 4), (16384, 1, 4), (65536, 1, 4), (16384, 1, 24)];

fn measure(
    bin: &Path,
    (seq_len, batch, n_layer): (usize, usize, usize),
    checkpoint: bool,
    steps: usize,
) -> Result<Row> {
    let mut cmd = Command::new(bin);
    let (l, b, n, s) = (seq_len.to_string(), batch.to_string(), n_layer.to_string(), steps.to_string());
    cmd.args(["--seq-len", &l, "--batch", &b, "--n-layer", &n, "--steps", &s]);
    if checkpoint {
        cmd.arg("--checkpoint-layers");
    }
    let (out, peak_rss) = run_measured(&mut cmd)?;
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("train_window printed {out:?}"))?;
    let num = |k: &str| v[k].as_f64().with_context(|| format!("train_window output lacks {k}: {out}"));
    let (step_s, tokens_per_s) = (num("step_s")?, num("tokens_per_s")?);
    Ok(Row { seq_len, batch, n_layer, checkpoint, step_s, tokens_per_s, peak_rss })
}

/// The row of `seq_len` with `n_layer` blocks.
fn find(rows: &[Row], seq_len: usize, n_layer: usize, checkpoint: bool) -> Option<&Row> {
    rows.iter().find(|r| r.seq_len == seq_len && r.n_layer == n_layer && r.checkpoint == checkpoint)
}

/// `cargo xtask bench long [--steps N]`.
pub fn bench(root: &Path, args: &[String]) -> Result<()> {
    let steps = match args {
        [] => 3,
        [flag, n] if flag == "--steps" => n.parse().with_context(|| format!("--steps {n}: not a number"))?,
        _ => bail!("bench long takes only --steps N, got {}", args.join(" ")),
    };
    eprintln!("xtask: building the train_window example (release)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = ["build", "--release", "-p", "mamba-train", "--example", "train_window"];
    if !Command::new(cargo).current_dir(root).args(build).status()?.success() {
        bail!("building the train_window example failed");
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let bin = target.join("release/examples/train_window");
    let mut rows = Vec::new();
    for &cfg in CONFIGS {
        for checkpoint in [false, true] {
            let ck = if checkpoint { ", checkpointed" } else { "" };
            eprintln!("xtask: window {} × batch {}, {} layers{ck}", cfg.0, cfg.1, cfg.2);
            rows.push(measure(&bin, cfg, checkpoint, steps)?);
        }
    }
    let md = markdown(&rows);
    let json_rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"seq_len": r.seq_len, "batch": r.batch, "n_layer": r.n_layer,
                   "checkpoint_layers": r.checkpoint, "step_s": r.step_s,
                   "tokens_per_s": r.tokens_per_s, "peak_rss_bytes": r.peak_rss})
        })
        .collect();
    let out_dir = target.join("bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(
        out_dir.join("long.json"),
        serde_json::to_string_pretty(&json!({"rows": json_rows}))? + "\n",
    )?;
    std::fs::write(out_dir.join("long.md"), &md)?;
    println!("{md}");
    eprintln!("xtask: wrote {}/long.{{json,md}}", out_dir.display());
    Ok(())
}

fn markdown(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| layers | window | batch | checkpointing | step | tokens/s | vs window 256 | peak RSS |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---|---:|---:|---:|---:|");
    for r in rows {
        let base = find(rows, 256, r.n_layer, r.checkpoint).map(|b| r.tokens_per_s / b.tokens_per_s);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} s | {:.0} | {} | {:.2} GB |",
            r.n_layer,
            r.seq_len,
            r.batch,
            if r.checkpoint { "yes" } else { "no" },
            r.step_s,
            r.tokens_per_s,
            base.map_or("—".to_string(), |b| format!("{b:.2}×")),
            r.peak_rss / 1e9
        );
    }
    s.push('\n');
    let ratio = |a: Option<&Row>, b: Option<&Row>, f: fn(&Row) -> f64| a.zip(b).map(|(a, b)| f(a) / f(b));
    let at = |n, ck| find(rows, 16384, n, ck);
    let checks: [(&str, Option<f64>, bool, &str); 3] = [
        (
            "tokens/s at 16,384 ÷ at 256 (4 layers, no checkpointing)",
            ratio(at(4, false), find(rows, 256, 4, false), |r| r.tokens_per_s),
            true,
            "0.85",
        ),
        (
            "peak RSS at 16,384, checkpointed ÷ not (4 layers)",
            ratio(at(4, true), at(4, false), |r| r.peak_rss),
            false,
            "0.40",
        ),
        (
            "step time at 16,384, checkpointed ÷ not (4 layers)",
            ratio(at(4, true), at(4, false), |r| r.step_s),
            false,
            "1.35",
        ),
    ];
    for (what, got, at_least, bound) in checks {
        let b: f64 = bound.parse().expect("a number");
        let (val, verdict) = match got {
            Some(g) if (at_least && g >= b) || (!at_least && g <= b) => (format!("{g:.2}"), "met"),
            Some(g) => (format!("{g:.2}"), "MISSED"),
            None => ("—".into(), "not measured"),
        };
        let op = if at_least { "≥" } else { "≤" };
        let _ = writeln!(s, "- {what}: {val} (target {op} {bound}): {verdict}");
    }
    if let (Some(m), Some(t)) =
        (ratio(at(24, true), at(24, false), |r| r.peak_rss), ratio(at(24, true), at(24, false), |r| r.step_s))
    {
        let _ = writeln!(s, "- 24 layers at 16,384, checkpointed ÷ not: peak RSS {m:.2}, step time {t:.2}");
    }
    s
}
