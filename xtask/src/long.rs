//! `cargo xtask bench long`: training speed and memory of the Mamba-1 "S" model as the window
//! grows, with and without activation checkpointing, all in one run.
//!
//! Each configuration runs `mamba-train`'s `train_window` example in a process of its own (one
//! warm-up step, then the median of the timed steps), so its peak RSS is that configuration's
//! alone. Windows 256, 4,096 and 16,384 keep batch × window at 16,384 tokens per step; 65,536
//! runs one row. The targets of the long-sequence issue are checked as ratios within the run.

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
    checkpoint: bool,
    step_s: f64,
    tokens_per_s: f64,
    peak_rss: f64,
}

/// (window, batch) pairs.
const CONFIGS: &[(usize, usize)] = &[(256, 64), (4096, 4), (16384, 1), (65536, 1)];

fn measure(bin: &Path, seq_len: usize, batch: usize, checkpoint: bool, steps: usize) -> Result<Row> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--seq-len",
        &seq_len.to_string(),
        "--batch",
        &batch.to_string(),
        "--steps",
        &steps.to_string(),
    ]);
    if checkpoint {
        cmd.arg("--checkpoint-layers");
    }
    let (out, peak_rss) = run_measured(&mut cmd)?;
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("train_window printed {out:?}"))?;
    let num = |k: &str| v[k].as_f64().with_context(|| format!("train_window output lacks {k}: {out}"));
    Ok(Row {
        seq_len,
        batch,
        checkpoint,
        step_s: num("step_s")?,
        tokens_per_s: num("tokens_per_s")?,
        peak_rss,
    })
}

fn find(rows: &[Row], seq_len: usize, checkpoint: bool) -> Option<&Row> {
    rows.iter().find(|r| r.seq_len == seq_len && r.checkpoint == checkpoint)
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
    for &(seq_len, batch) in CONFIGS {
        for checkpoint in [false, true] {
            eprintln!(
                "xtask: window {seq_len} × batch {batch}{}",
                if checkpoint { ", checkpointed" } else { "" }
            );
            rows.push(measure(&bin, seq_len, batch, checkpoint, steps)?);
        }
    }
    let md = markdown(&rows);
    let json_rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"seq_len": r.seq_len, "batch": r.batch, "checkpoint_layers": r.checkpoint,
                   "step_s": r.step_s, "tokens_per_s": r.tokens_per_s, "peak_rss_bytes": r.peak_rss})
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
    let _ = writeln!(s, "| window | batch | checkpointing | step | tokens/s | vs window 256 | peak RSS |");
    let _ = writeln!(s, "|---:|---:|---|---:|---:|---:|---:|");
    for r in rows {
        let base = find(rows, 256, r.checkpoint).map_or(f64::NAN, |b| r.tokens_per_s / b.tokens_per_s);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} s | {:.0} | {:.2}× | {:.2} GB |",
            r.seq_len,
            r.batch,
            if r.checkpoint { "yes" } else { "no" },
            r.step_s,
            r.tokens_per_s,
            base,
            r.peak_rss / 1e9
        );
    }
    s.push('\n');
    let check = |s: &mut String, what: &str, got: Option<f64>, ok: &dyn Fn(f64) -> bool, bound: &str| {
        let (val, verdict) = match got {
            Some(g) => (format!("{g:.2}"), if ok(g) { "met" } else { "MISSED" }),
            None => ("—".into(), "not measured"),
        };
        let _ = writeln!(s, "- {what}: {val} (target {bound}): {verdict}");
    };
    let ratio = |a: Option<&Row>, b: Option<&Row>, f: fn(&Row) -> f64| a.zip(b).map(|(a, b)| f(a) / f(b));
    check(
        &mut s,
        "tokens/s at 16,384 ÷ at 256 (no checkpointing)",
        ratio(find(rows, 16384, false), find(rows, 256, false), |r| r.tokens_per_s),
        &|g| g >= 0.85,
        "≥ 0.85",
    );
    check(
        &mut s,
        "peak RSS at 16,384, checkpointed ÷ not",
        ratio(find(rows, 16384, true), find(rows, 16384, false), |r| r.peak_rss),
        &|g| g <= 0.4,
        "≤ 0.40",
    );
    check(
        &mut s,
        "step time at 16,384, checkpointed ÷ not",
        ratio(find(rows, 16384, true), find(rows, 16384, false), |r| r.step_s),
        &|g| g <= 1.35,
        "≤ 1.35",
    );
    s
}
