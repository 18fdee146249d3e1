//! `dvmm bench dsm` and the hidden `dvmm dsm-node` used by it (and by the DSM tests).

/// Arguments of `dvmm bench dsm`.
#[derive(clap::Args)]
pub struct BenchDsmArgs {
    /// Number of node processes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of one DSM node process.
#[derive(clap::Args)]
pub struct DsmNodeArgs {}

/// Runs the DSM benchmark.
pub fn bench(_args: BenchDsmArgs) -> Result<(), String> {
    Err("dvmm bench dsm is not available yet".into())
}

/// Runs one DSM node process.
pub fn node(_args: DsmNodeArgs) -> Result<(), String> {
    Err("dvmm dsm-node is not available yet".into())
}
