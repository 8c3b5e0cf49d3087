//! `mamba`: train, run and inspect Mamba language models on the CPU.
//!
//! ```text
//! mamba train                         # built-in offline demo (about two minutes)
//! mamba train --data input.txt --time-budget 180
//! mamba generate --model runs/run-001 --prompt "ROMEO:" --max-new-tokens 200
//! mamba eval --model runs/run-001 --data input.txt
//! mamba info --model runs/run-001
//! ```

/// `println!` that returns the write error (a closed pipe) to the caller instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

mod corpus;
mod eval;
mod flags;
mod generate;
mod info;
mod merge;
mod model_dir;
mod train;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Train, run and inspect Mamba and Mamba-2 language models on the CPU.
#[derive(Parser, Debug)]
#[command(
    name = "mamba",
    version,
    about = "Train, run and inspect Mamba and Mamba-2 language models on the CPU.",
    long_about = None,
    propagate_version = true,
    after_help = "Examples:\n  \
        mamba train                                  # a small model on a built-in corpus, offline, ~2 minutes\n  \
        mamba train --data input.txt --time-budget 180\n  \
        mamba generate --model runs/run-001 --prompt \"ROMEO:\" --max-new-tokens 200\n  \
        mamba eval --model runs/run-001 --data held_out.txt\n  \
        mamba info --model runs/run-001             # and which CPU kernels run (AVX-512, AVX2 or portable)\n  \
        mamba train --from runs/run-001 --data mine.txt --lora-rank 8   # fine-tune a LoRA adapter\n  \
        mamba merge --model runs/run-001 --adapter runs/run-002 --out merged\n\n\
        A model directory is what `mamba train` writes, or any Hugging Face Mamba / Mamba-2 checkpoint\n\
        (config.json + model.safetensors, and tokenizer.json when it is not byte-level).\n\
        `mamba <command> --help` lists a command's options."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model on a text file, a directory of text files, a synthetic task, or (with
    /// neither) a built-in generated corpus that runs offline in about two minutes.
    Train(train::TrainArgs),
    /// Generate text from a trained model or any Hugging Face Mamba / Mamba-2 directory.
    Generate(generate::GenerateArgs),
    /// Measure next-token cross-entropy, perplexity and bits per byte on text or token ids.
    Eval(eval::EvalArgs),
    /// Show a model's architecture, parameter count and memory, and which CPU kernels run.
    Info(info::InfoArgs),
    /// Merge a LoRA adapter into its base model's weights, writing a plain model directory.
    Merge(merge::MergeArgs),
}

fn main() -> ExitCode {
    // An impossible MAMBA_SIMD (unknown, or an instruction set this CPU lacks) is an error here,
    // before any kernel could run it.
    if let Err(e) = mamba_nn::ssm_kernel::isa::init() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Which `train` flags were given, as opposed to defaulted: `--resume` checks them.
    let train_matches = matches.subcommand_matches("train").cloned().unwrap_or_default();
    // Training allocates and frees the same large activations every step: keep freed memory in
    // the heap rather than returning it to the system and faulting it back in. Inference reuses
    // its own buffers, and loading a model frees large temporaries (f32 tensors turned into
    // bf16 / q8) that must go back to the system, so it keeps the default.
    if matches!(cli.command, Command::Train(_)) {
        mamba_nn::tensor::keep_freed_memory();
    }
    let threads = match &cli.command {
        Command::Train(a) => a.threads,
        Command::Generate(a) => a.threads,
        Command::Eval(a) => a.threads,
        Command::Info(_) => 1,
        Command::Merge(_) => 0,
    };
    let result = in_pool(threads, move || match cli.command {
        Command::Train(a) => train::run(a, &train_matches),
        Command::Generate(a) => generate::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Info(a) => info::run(a),
        Command::Merge(a) => merge::run(a),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`mamba generate | head -1`): nothing to report.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// Runs `f` on a rayon pool of `threads` workers (0: one per core) with the calling work on one
/// of them. Running the whole command inside the pool matters: from outside, the main thread
/// does the serial parts of every step while the workers spin beside it — three busy threads on
/// two cores, which measured 40 % slower than the same step inside the pool.
fn in_pool(threads: usize, f: impl FnOnce() -> anyhow::Result<()> + Send) -> anyhow::Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start {threads} worker threads: {e}"))?;
    pool.install(f)
}

/// The error and its causes, joined by `: `, each cause left out when the text before it already
/// says it (the library's errors include their cause in their own message).
fn message(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg += ": ";
            msg += &c;
        }
    }
    msg
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
