//! `cargo xtask bench generate`: inference speed against the peers, all in one run — the
//! `mamba` binary, candle and llama.cpp on the same random-weight models — plus this machine's
//! DRAM bound measured in the same run ([`crate::machine`]).
//!
//! The models and peers come from the team's peer kit (`../shared/peer`, copied and set up as
//! its README says): `$MAMBA_PEER` (default `../peer` beside the checkout) must hold
//! `out/{mamba-S,mamba-M,mamba2-M}` (made by `make_ref.py … --weights-only`),
//! `candle-bench/target/release/candle-bench` and, for the llama.cpp rows,
//! `llama.cpp/build/bin/llama-bench` with `out/gguf/mamba-M-{f32,BF16,Q8_0}.gguf`. A peer that
//! is missing is reported as such; its rows are left out.
//!
//! Rows: batch-1 greedy decode (16-token prompt, 128 new tokens, 2 threads) of each model and
//! weight format, the aggregate decode rate of a batch of 8, and prefill of 2,048 and 16,384
//! prompt tokens with the peak resident memory. Each figure is the median of `--runs` runs
//! (default 3). Every decode row is also stated as a share of the DRAM bound: the machine's
//! 2-thread read bandwidth divided by the bytes of weights one token reads. Our rows also give
//! the process's peak resident memory (from `wait4`); they run before the bandwidth
//! measurement, whose 1 GiB buffer would otherwise show in the children's high-water marks.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::machine;

const THREADS: &str = "2";

/// One measured row.
struct Row {
    what: String,
    tokens_per_s: f64,
    /// Bytes of weights read per decode token (decode rows).
    bytes_per_token: Option<f64>,
    /// Peak resident memory of the process, bytes (our rows).
    peak_rss: Option<f64>,
}

impl Row {
    /// A peer's row (no memory figure).
    fn peer(what: String, tokens_per_s: f64, bytes_per_token: Option<f64>) -> Self {
        Self { what, tokens_per_s, bytes_per_token, peak_rss: None }
    }
}

/// The bytes per token of our decode row for `model` in `dtype`, if it ran.
fn our_bytes(rows: &[Row], model: &str, dtype: &str) -> Option<f64> {
    rows.iter().find(|r| r.what == format!("ours: {model} {dtype} decode")).and_then(|r| r.bytes_per_token)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

/// Runs `cmd`, returning its stdout and peak RSS in bytes.
pub(crate) fn run_measured(cmd: &mut Command) -> Result<(String, f64)> {
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn();
    let mut child = child.with_context(|| format!("starting {cmd:?}"))?;
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    child.stdout.take().expect("piped").read_to_string(&mut out)?;
    child.stderr.take().expect("piped").read_to_string(&mut err)?;
    let (status, rss) = wait_rss(child.id() as i32)?;
    if status != 0 {
        bail!("{cmd:?} failed (status {status}):\n{err}");
    }
    Ok((out, rss))
}

/// Waits for process `pid`; its exit status and peak RSS (bytes).
fn wait_rss(pid: i32) -> Result<(i32, f64)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child `pid`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `status` and `usage` are valid for writes; `pid` is a child of this process.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    Ok((code, usage.ru_maxrss as f64 * 1024.0))
}

/// The 16-token prompt: the same xorshift ids candle-bench uses, within `vocab`.
fn prompt_ids(n: usize, vocab: u64) -> String {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab).to_string()
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn vocab_of(model: &Path) -> Result<u64> {
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json"))?)?;
    cfg["vocab_size"].as_u64().context("config.json has no vocab_size")
}

/// Runs `mamba generate ARGS --json` `runs` times: the median of its `field`, its last
/// `weight_bytes_per_token` and the largest peak RSS.
fn ours(bin: &Path, args: &[&str], field: &str, runs: usize) -> Result<Row> {
    let (mut rates, mut bytes, mut rss) = (Vec::new(), None, 0.0f64);
    for _ in 0..runs {
        let mut cmd = Command::new(bin);
        cmd.arg("generate").args(args).args(["--temperature", "0", "--threads", THREADS, "--json"]);
        let (out, peak) = run_measured(&mut cmd)?;
        let v: Value = serde_json::from_str(out.trim()).context("generate --json output")?;
        rates.push(v[field].as_f64().with_context(|| format!("no {field} in {v}"))?);
        bytes = v["weight_bytes_per_token"].as_f64();
        rss = rss.max(peak);
    }
    Ok(Row { what: String::new(), tokens_per_s: median(rates), bytes_per_token: bytes, peak_rss: Some(rss) })
}

/// Our batch-1 decode rate with weights in `dtype`.
fn ours_decode(bin: &Path, model: &Path, dtype: &str, runs: usize) -> Result<Row> {
    let ids = prompt_ids(16, vocab_of(model)?);
    let m = model.to_string_lossy();
    let args = ["--model", &m, "--prompt-ids", &ids, "--max-new-tokens", "128", "--dtype", dtype];
    ours(bin, &args, "decode_tokens_per_s", runs)
}

/// Our aggregate decode rate for a batch of `n` prompts of 20 bytes.
fn ours_batch(bin: &Path, model: &Path, n: usize, runs: usize, dir: &Path) -> Result<Row> {
    let file = dir.join(format!("prompts-{n}.txt"));
    let lines: Vec<String> = (0..n).map(|i| format!("prompt {i:>2} of the batch")).collect();
    std::fs::write(&file, lines.join("\n") + "\n")?;
    let (m, f) = (model.to_string_lossy(), file.to_string_lossy());
    let args = ["--model", &m, "--prompt-file", &f, "--max-new-tokens", "128"];
    let mut row = ours(bin, &args, "decode_tokens_per_s", runs)?;
    row.bytes_per_token = None;
    Ok(row)
}

/// Our prefill rate for a prompt of `n` bytes (byte-level: `n` tokens).
fn ours_prefill(bin: &Path, model: &Path, n: usize, runs: usize) -> Result<Row> {
    let text: String = (0..n).map(|i| (b'a' + ((i * 7 + i / 13) % 26) as u8) as char).collect();
    let m = model.to_string_lossy();
    let args = ["--model", &m, "--prompt", &text, "--max-new-tokens", "1"];
    let mut row = ours(bin, &args, "prefill_tokens_per_s", runs)?;
    row.bytes_per_token = None;
    Ok(row)
}

fn candle(bin: &Path, model: &Path, runs: usize) -> Result<f64> {
    let out = Command::new(bin)
        .env("RAYON_NUM_THREADS", THREADS)
        .args([
            "bench",
            &model.to_string_lossy(),
            "--prompt",
            "16",
            "--gen",
            "128",
            "--runs",
            &runs.to_string(),
            "--no-prefill",
        ])
        .output()
        .context("running candle-bench")?;
    if !out.status.success() {
        bail!("candle-bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with('{')).context("no JSON from candle-bench")?;
    let v: Value = serde_json::from_str(line)?;
    v["decode_tokens_per_s"]["median"].as_f64().context("candle decode_tokens_per_s")
}

/// llama-bench's average tokens/s for `-p P -n N`.
fn llama(bin: &Path, gguf: &Path, p: usize, n: usize, runs: usize) -> Result<f64> {
    let out = Command::new(bin)
        .env("LD_LIBRARY_PATH", bin.parent().unwrap_or(Path::new(".")))
        .args([
            "-m",
            &gguf.to_string_lossy(),
            "-t",
            THREADS,
            "-p",
            &p.to_string(),
            "-n",
            &n.to_string(),
            "-r",
            &runs.to_string(),
            "-o",
            "json",
        ])
        .output()
        .context("running llama-bench")?;
    if !out.status.success() {
        bail!("llama-bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("llama-bench JSON")?;
    v.as_array().and_then(|a| a.first()).and_then(|r| r["avg_ts"].as_f64()).context("llama-bench avg_ts")
}

/// `cargo xtask bench generate [--peer DIR] [--runs N]`.
pub fn bench(root: &Path, args: &[String]) -> Result<()> {
    let mut peer = std::env::var_os("MAMBA_PEER").map(PathBuf::from).unwrap_or_else(|| root.join("../peer"));
    let mut runs = 3usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--peer" => peer = PathBuf::from(it.next().context("--peer needs a directory")?),
            "--runs" => runs = it.next().context("--runs needs a number")?.parse().context("--runs")?,
            other => bail!("bench generate: unknown argument {other:?} (takes --peer DIR, --runs N)"),
        }
    }
    let out_models = peer.join("out");
    for m in ["mamba-S", "mamba-M", "mamba2-M"] {
        if !out_models.join(m).join("config.json").is_file() {
            bail!(
                "{} is missing: set MAMBA_PEER (or --peer) to a set-up copy of the peer kit and run its \
                 `make_ref.py mamba-S mamba-M mamba2-M --weights-only` (see ../shared/peer/README.md)",
                out_models.join(m).display()
            );
        }
    }
    eprintln!("xtask: building the mamba binary (release)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status =
        Command::new(cargo).current_dir(root).args(["build", "--release", "-p", "mamba-cli"]).status()?;
    if !status.success() {
        bail!("building mamba failed");
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let bin = target.join("release/mamba");
    let work = target.join("bench");
    std::fs::create_dir_all(&work)?;

    let (m, s, m2) = (out_models.join("mamba-M"), out_models.join("mamba-S"), out_models.join("mamba2-M"));
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |what: &str, r: Result<Row>| match r {
        Ok(mut r) => {
            eprintln!("xtask: {what}: {:.1} tokens/s", r.tokens_per_s);
            r.what = what.into();
            rows.push(r);
        }
        Err(e) => eprintln!("xtask: {what}: skipped ({e:#})"),
    };
    for (name, model) in [("Mamba-1 M", &m), ("Mamba-1 S", &s), ("Mamba-2 M", &m2)] {
        let dtypes: &[&str] = if name == "Mamba-1 M" { &["f32", "bf16", "f16", "q8"] } else { &["f32"] };
        for dt in dtypes {
            push(&format!("ours: {name} {dt} decode"), ours_decode(&bin, model, dt, runs));
        }
    }
    push("ours: Mamba-1 M f32 batch 8 decode (aggregate)", ours_batch(&bin, &m, 8, runs, &work));
    for n in [2048, 16384] {
        push(&format!("ours: Mamba-1 M f32 prefill {n}"), ours_prefill(&bin, &m, n, runs.min(2)));
    }
    // Measured after our rows: a child's peak RSS includes the high-water mark the process had
    // when it forked, and the measurement maps a 1 GiB buffer.
    eprintln!("xtask: measuring the machine");
    let mach = machine::measure(2);
    eprint!("{}", machine::report(&mach));
    let candle_bin = peer.join("candle-bench/target/release/candle-bench");
    let mut peer_rows = Vec::new();
    if candle_bin.is_file() {
        for (name, model, dt) in
            [("Mamba-1 M", &m, "f32"), ("Mamba-1 S", &s, "f32"), ("Mamba-2 M", &m2, "f32")]
        {
            match candle(&candle_bin, model, runs) {
                Ok(t) => peer_rows.push(Row::peer(
                    format!("candle: {name} f32 decode"),
                    t,
                    our_bytes(&rows, name, dt),
                )),
                Err(e) => eprintln!("xtask: candle {name}: skipped ({e:#})"),
            }
        }
    } else {
        eprintln!("xtask: {} not found: no candle rows", candle_bin.display());
    }
    let llama_bin = peer.join("llama.cpp/build/bin/llama-bench");
    if llama_bin.is_file() {
        for (q, ours) in [("f32", "f32"), ("BF16", "bf16"), ("F16", "f16"), ("Q8_0", "q8")] {
            let gguf = out_models.join(format!("gguf/mamba-M-{q}.gguf"));
            if !gguf.is_file() {
                eprintln!("xtask: {} not found", gguf.display());
                continue;
            }
            match llama(&llama_bin, &gguf, 0, 128, runs) {
                Ok(t) => peer_rows.push(Row::peer(
                    format!("llama.cpp: Mamba-1 M {q} decode"),
                    t,
                    our_bytes(&rows, "Mamba-1 M", ours),
                )),
                Err(e) => eprintln!("xtask: llama.cpp {q}: skipped ({e:#})"),
            }
        }
        let gguf = out_models.join("gguf/mamba-M-f32.gguf");
        if let Ok(t) = llama(&llama_bin, &gguf, 2048, 0, runs.min(2)) {
            peer_rows.push(Row::peer("llama.cpp: Mamba-1 M f32 prefill 2048".into(), t, None));
        }
    } else {
        eprintln!("xtask: {} not found: no llama.cpp rows", llama_bin.display());
    }
    rows.extend(peer_rows);

    let md = markdown(&rows, &mach);
    let json_rows: Vec<Value> = rows
        .iter()
        .map(|r| json!({"row": r.what, "tokens_per_s": r.tokens_per_s, "bytes_per_token": r.bytes_per_token, "peak_rss_bytes": r.peak_rss}))
        .collect();
    let report = json!({
        "machine": {"dram_read_bytes_per_s_1": mach.bandwidth_1, "dram_read_bytes_per_s": mach.bandwidth,
                    "fma_flops_1": mach.flops_1, "fma_flops": mach.flops, "threads": mach.threads},
        "rows": json_rows,
    });
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("generate.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    std::fs::write(out_dir.join("generate.md"), &md)?;
    println!("{md}");
    eprintln!("xtask: wrote {}/generate.{{json,md}}", out_dir.display());
    Ok(())
}

fn markdown(rows: &[Row], m: &machine::Machine) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Machine, measured in this run: DRAM read {:.1} GB/s (2 threads; {:.1} on 1), f32 FMA peak {:.0} GFLOP/s (2 threads).\n",
        m.bandwidth / 1e9,
        m.bandwidth_1 / 1e9,
        m.flops / 1e9
    );
    let _ = writeln!(s, "| row | tokens/s | MB read per token | share of the DRAM bound | peak RSS |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    for r in rows {
        let (mb, share) = match r.bytes_per_token {
            Some(b) if r.what.contains("decode") && !r.what.contains("batch") => {
                let bound = m.bandwidth / b;
                (
                    format!("{:.0}", b / 1e6),
                    format!("{:.0} % (bound {:.0} tok/s)", 100.0 * r.tokens_per_s / bound, bound),
                )
            }
            _ => ("–".into(), "–".into()),
        };
        let rss = r.peak_rss.map_or("–".into(), |b| format!("{:.2} GB", b / 1e9));
        let _ = writeln!(s, "| {} | {:.1} | {mb} | {share} | {rss} |", r.what, r.tokens_per_s);
    }
    s
}
