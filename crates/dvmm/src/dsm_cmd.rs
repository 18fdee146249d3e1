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
    /// What to measure (as every node process gets it).
    #[command(flatten)]
    pub bench: testlab::bench::BenchArgs,
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
        bench: args.bench,
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
