//! One DSM test node process (the same code as the hidden `dvmm dsm-node`).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "dsm-node", about = "One dvmm DSM test/bench node process")]
struct Cli {
    #[command(flatten)]
    node: testlab::node::NodeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let id = cli.node.id;
    match testlab::node::node_main(cli.node) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsm-node {id}: error: {e}");
            ExitCode::FAILURE
        }
    }
}
