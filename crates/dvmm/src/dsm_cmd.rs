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
    /// Samples per latency measurement.
    #[arg(long, default_value_t = 2000)]
    pub samples: u64,
    /// Size of the sequential-read pass in MiB.
    #[arg(long, default_value_t = 16)]
    pub seq_mib: u64,
    /// Page hold time after a wake, in µs.
    #[arg(long, default_value_t = 50)]
    pub hold_us: u64,
    /// Read-ahead window in pages on sequential remote read faults (0 = off).
    #[arg(long, default_value_t = 0)]
    pub readahead: u64,
}

/// Arguments of one DSM node process.
#[derive(clap::Args)]
pub struct DsmNodeArgs {
    #[command(flatten)]
    node: testlab::node::NodeArgs,
}

/// Runs the DSM benchmark.
pub fn bench(args: BenchDsmArgs) -> Result<(), String> {
    let nodes = u16::try_from(args.nodes)
        .ok()
        .filter(|&n| n >= 2)
        .ok_or_else(|| format!("--nodes {}: need 2..=65535", args.nodes))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate dvmm: {e}"))?;
    let opts = testlab::bench::BenchOptions {
        nodes,
        samples: args.samples,
        seq_mib: args.seq_mib,
        hold_us: args.hold_us,
        readahead: args.readahead,
    };
    let r = testlab::bench::run(&exe, &["dsm-node"], &opts)?;
    testlab::bench::print_human(&r);
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(|e| format!("cannot encode the result: {e}"))?
        );
    }
    Ok(())
}

/// Runs one DSM node process.
pub fn node(args: DsmNodeArgs) -> Result<(), String> {
    testlab::node::node_main(args.node)
}
