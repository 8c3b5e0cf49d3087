//! Project automation, run as `cargo xtask <task>` (the alias in `.cargo/config.toml`).
//!
//! Tasks:
//! - `bench generate`: inference against candle and llama.cpp ([`generate`]).
//! - `machine [THREADS]`: this machine's DRAM read bandwidth and f32 FMA peak ([`machine`]).
//! - `bench [FILTER]`: runs `cargo bench -p mamba-benches -- [FILTER]` (criterion's filter is a
//!   regex on the bench id), then reads this run's criterion results
//!   (`<target>/criterion/**/new/{benchmark,estimates}.json`) and writes
//!   `target/bench/report.json` (an array of `{"name", "median_ns", "elements_per_s"}`) and
//!   `target/bench/report.md` (a table with speedups and the performance targets), and prints the
//!   table.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

mod generate;
mod long;
mod machine;
use serde_json::{Value, json};

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  bench [FILTER]   run the criterion benches (FILTER: regex on the bench id, e.g. `conv/fwd/`),
                   then write target/bench/report.json and target/bench/report.md
  bench generate [--peer DIR] [--runs N]
                   decode and prefill speed of the mamba binary against candle and llama.cpp on
                   the peer kit's models (DIR, default $MAMBA_PEER or ../peer), with the DRAM
                   bound measured in the same run; writes target/bench/generate.{json,md}
  bench long [--steps N]
                   Mamba-1 S training at windows 256 to 65,536 (16,384 tokens per step where it
                   fits), with and without --checkpoint-layers: tokens/s and peak RSS, each in a
                   process of its own; writes target/bench/long.{json,md}
  machine [THREADS]
                   measure this machine's DRAM read bandwidth and f32 FMA peak on 1 thread and
                   on THREADS (default 2)
";

/// Performance targets: bench id and the minimum elements/s.
/// The model benches count tokens: a training step (forward + loss + backward) of the "S" configs
/// must reach 6× and 2× a full PyTorch step on this machine kind (1,038 and 6,726 tokens/s).
const TARGETS: &[(&str, f64)] = &[
    ("scan/mamba1/fwd/B8-L256-D512-N16", 4.0e9),
    ("scan/mamba1/fwd_bwd/B8-L256-D512-N16", 1.0e9),
    ("model/mamba1-S/train_step", 6_000.0),
    ("model/mamba2-S/train_step", 13_500.0),
];

/// PyTorch `selective_scan_ref` on this machine kind (B8 L256 D512 N16), state updates/s.
const TORCH: &[(&str, &str, f64)] = &[
    ("scan/mamba1/fwd/B8-L256-D512-N16", "forward", 0.107e9),
    ("scan/mamba1/fwd_bwd/B8-L256-D512-N16", "forward+backward", 0.038e9),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bench") if args.get(1).map(String::as_str) == Some("generate") => {
            generate::bench(&root(), &args[2..])
        }
        Some("bench") if args.get(1).map(String::as_str) == Some("long") => long::bench(&root(), &args[2..]),
        Some("bench") if args.len() <= 2 => bench(args.get(1).map(String::as_str)),
        Some("machine") if args.len() <= 2 => match args.get(1).map(|t| t.parse::<usize>()) {
            None => {
                print!("{}", machine::report(&machine::measure(2)));
                Ok(())
            }
            Some(Ok(t)) if t >= 1 => {
                print!("{}", machine::report(&machine::measure(t)));
                Ok(())
            }
            Some(_) => {
                eprint!("machine: THREADS must be a whole number ≥ 1, got {}\n\n{USAGE}", args[1]);
                return ExitCode::from(2);
            }
        },
        Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        None => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(_) => {
            eprint!("unknown arguments: {}\n\n{USAGE}", args.join(" "));
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (this crate sits in `<root>/xtask`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent directory").to_path_buf()
}

/// One benchmark result of this run.
#[derive(Debug)]
struct Row {
    name: String,
    median_ns: f64,
    elements_per_s: Option<f64>,
}

fn bench(filter: Option<&str>) -> Result<()> {
    let root = root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let criterion_dir =
        std::env::var_os("CRITERION_HOME").map(PathBuf::from).unwrap_or_else(|| target.join("criterion"));
    let start = SystemTime::now();

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root).args(["bench", "-p", "mamba-benches", "--"]);
    if let Some(f) = filter {
        cmd.arg(f);
    }
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().context("running cargo bench")?;
    if !status.success() {
        bail!("cargo bench failed: {status}");
    }

    let mut rows = Vec::new();
    if criterion_dir.is_dir() {
        collect(&criterion_dir, start, &mut rows)?;
    }
    if rows.is_empty() {
        bail!(
            "no benchmark results newer than this run under {} (does the filter {:?} match any bench id?)",
            criterion_dir.display(),
            filter.unwrap_or("")
        );
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));

    let out_dir = root.join("target").join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let report: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "median_ns": r.median_ns,
                "elements_per_s": r.elements_per_s,
            })
        })
        .collect();
    let json_path = out_dir.join("report.json");
    fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md = markdown(&rows, filter);
    let md_path = out_dir.join("report.md");
    fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    println!("{md}");
    eprintln!("xtask: wrote {} and {}", json_path.display(), md_path.display());
    Ok(())
}

/// Walks `dir` for criterion's `new/benchmark.json` + `new/estimates.json` pairs written after
/// `start` (results of older runs are skipped).
fn collect(dir: &Path, start: SystemTime, rows: &mut Vec<Row>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            let (bench, est) = (path.join("benchmark.json"), path.join("estimates.json"));
            if bench.is_file() && est.is_file() && modified(&est)? >= start {
                rows.push(read_result(&bench, &est)?);
            }
        } else {
            collect(&path, start, rows)?;
        }
    }
    Ok(())
}

fn modified(path: &Path) -> Result<SystemTime> {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading the mtime of {}", path.display()))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn read_result(bench: &Path, est: &Path) -> Result<Row> {
    let b = read_json(bench)?;
    let e = read_json(est)?;
    let name =
        b["full_id"].as_str().with_context(|| format!("{}: no `full_id`", bench.display()))?.to_string();
    let median_ns = e["median"]["point_estimate"]
        .as_f64()
        .with_context(|| format!("{}: no `median.point_estimate`", est.display()))?;
    let elements = b["throughput"]["Elements"].as_f64();
    Ok(Row { name, median_ns, elements_per_s: elements.map(|n| n / (median_ns * 1e-9)) })
}

/// `a/b/op/shape[/t1]` → the reference bench of the same shape, `a/b/op_ref/shape`
/// (`ssd_*` ops compare against the sequential reference `*_ref`).
fn reference_candidates(name: &str) -> Vec<String> {
    let base = name.strip_suffix("/t1").unwrap_or(name);
    let parts: Vec<&str> = base.split('/').collect();
    if parts.len() < 2 {
        return Vec::new();
    }
    let (op_i, op) = (parts.len() - 2, parts[parts.len() - 2]);
    if op.ends_with("_ref") {
        return Vec::new();
    }
    let mut ops = vec![format!("{op}_ref")];
    if let Some(plain) = op.strip_prefix("ssd_") {
        ops.push(format!("{plain}_ref"));
    }
    ops.into_iter()
        .map(|o| {
            let mut p: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
            p[op_i] = o;
            p.join("/")
        })
        .collect()
}

fn find<'a>(rows: &'a [Row], name: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.name == name)
}

fn fmt_time(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn fmt_rate(r: Option<f64>) -> String {
    r.map_or_else(|| "—".into(), |r| format!("{r:.3e}"))
}

fn markdown(rows: &[Row], filter: Option<&str>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmark report\n");
    let _ = writeln!(
        s,
        "Filter: `{}`. Median of criterion's samples; elements are state updates for scans \
         (B·L·D·N, Mamba-2 B·L·H·P·N) and multiply-adds for the conv (B·L·C·K). \
         \"vs ref\" = reference time / this time (same shape, reference loop single-threaded); \
         \"2t vs 1t\" = `/t1` time / this time.\n",
        filter.unwrap_or("")
    );
    let _ = writeln!(s, "| name | median | elements/s | vs ref | 2t vs 1t |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    for r in rows {
        let vs_ref = reference_candidates(&r.name)
            .iter()
            .find_map(|n| find(rows, n))
            .map_or_else(|| "—".into(), |f| format!("{:.1}×", f.median_ns / r.median_ns));
        let vs_t1 = if r.name.ends_with("/t1") || r.name.contains("_ref/") {
            "—".into()
        } else {
            find(rows, &format!("{}/t1", r.name))
                .map_or_else(|| "—".into(), |t1| format!("{:.2}×", t1.median_ns / r.median_ns))
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r.name,
            fmt_time(r.median_ns),
            fmt_rate(r.elements_per_s),
            vs_ref,
            vs_t1
        );
    }

    let _ = writeln!(s, "\n## Targets (2 threads)\n");
    let _ = writeln!(s, "| bench | target | measured | result |");
    let _ = writeln!(s, "|---|---:|---:|---|");
    for &(name, min) in TARGETS {
        // Model benches count tokens (thousands per second); kernels count state updates.
        let (fmt, unit): (fn(f64) -> String, &str) = if name.starts_with("model/") {
            (|v| format!("{v:.0}"), "tokens/s")
        } else {
            (|v| format!("{v:.3e}"), "elements/s")
        };
        let (measured, result) = match find(rows, name).and_then(|r| r.elements_per_s) {
            Some(v) if v >= min => (fmt(v), "pass"),
            Some(v) => (fmt(v), "FAIL"),
            None => ("—".into(), "not run"),
        };
        let _ = writeln!(s, "| {name} | ≥ {} {unit} | {measured} | {result} |", fmt(min));
    }

    let lora = rows.iter().filter_map(|r| {
        let full = find(rows, &r.name.replace("/finetune_lora", "/finetune_full"))?;
        r.name.ends_with("/finetune_lora").then_some((r, full))
    });
    let mut lora = lora.peekable();
    if lora.peek().is_some() {
        let _ = writeln!(
            s,
            "\n## Fine-tuning: LoRA against full\n\nA whole step (forward, loss, backward, clipping, \
             AdamW), tokens/s; LoRA trains rank-8 adapters on `in_proj` and `x_proj` with the base \
             frozen.\n"
        );
        let _ = writeln!(s, "| model | full tokens/s | LoRA tokens/s | LoRA vs full |");
        let _ = writeln!(s, "|---|---:|---:|---:|");
        for (l, f) in lora {
            let model = l.name.trim_end_matches("/finetune_lora");
            let _ = writeln!(
                s,
                "| {model} | {} | {} | {:.2}× |",
                fmt_rate(f.elements_per_s),
                fmt_rate(l.elements_per_s),
                f.median_ns / l.median_ns
            );
        }
    }

    let _ = writeln!(
        s,
        "\n## PyTorch for context\n\nPyTorch `selective_scan_ref`, B8 L256 D512 N16, on this machine kind \
         (2-core Zen4, 2 threads).\n"
    );
    let _ = writeln!(s, "| pass | PyTorch elements/s | ours | speedup |");
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for &(name, what, torch) in TORCH {
        let ours = find(rows, name).and_then(|r| r.elements_per_s);
        let _ = writeln!(
            s,
            "| {what} (`{name}`) | {torch:.3e} | {} | {} |",
            fmt_rate(ours),
            ours.map_or_else(|| "—".into(), |v| format!("{:.1}×", v / torch))
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_names() {
        assert_eq!(
            reference_candidates("scan/mamba1/fwd/B8-L256-D512-N16/t1"),
            ["scan/mamba1/fwd_ref/B8-L256-D512-N16"]
        );
        assert_eq!(
            reference_candidates("scan/mamba2/ssd_fwd_bwd/S"),
            ["scan/mamba2/ssd_fwd_bwd_ref/S", "scan/mamba2/fwd_bwd_ref/S"]
        );
        assert!(reference_candidates("conv/fwd_ref/S").is_empty());
    }
}
