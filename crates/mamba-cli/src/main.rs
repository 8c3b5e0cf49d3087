//! The `mamba` command-line tool.
//!
//! **Status: skeleton.** The subcommands `train`, `generate`, `eval` and `info` are built on
//! `mamba-train` and `mamba-nn` and arrive with them; until then the binary says so and exits
//! with status 2 rather than pretending to work.

use std::process::ExitCode;

fn main() -> ExitCode {
    let _ = &mamba_train::mamba_nn::ssm_kernel::VERSION;
    eprintln!(
        "mamba {}: the train / generate / eval / info subcommands are not implemented yet \
         (only the ssm-kernel crate is complete in this version).",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
