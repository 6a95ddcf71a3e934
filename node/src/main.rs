//! `iq-node`: parse the command line, run the command, print errors as one line.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = iq_node::cli::Cli::parse();
    iq_node::cli::main_with(iq_node::cli::run(cli))
}
