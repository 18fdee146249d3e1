//! `dvmm bench ssi`: the parallel user-space benchmark of the guest (`usertest par`) on
//! one node with N vCPUs and on N nodes with one vCPU each, in one run of this command,
//! and their ratio, the "SSI efficiency" (1.0: spreading the vCPUs over nodes costs
//! nothing). Two variants: every thread on its own memory (private) and every thread
//! adding to counters shared by all (shared: the counters' page moves between nodes).
//! And two kernel-heavy ones between the first and the last CPU (on N nodes: different
//! nodes): a pipe ping-pong (`pipe`) and process creation (`spawn`: fork, move to the
//! other CPU, exec, exit, wait). `--compare-flat` also runs the N nodes without the
//! NUMA topology (`--no-numa`), for the efficiency with and without it.

use std::io::Read;

/// Arguments of `dvmm bench ssi`.
#[derive(clap::Args)]
pub struct BenchSsiArgs {
    /// vCPUs (and threads) of the guest: 1 node x N vCPUs against N nodes x 1 vCPU.
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// Work units per thread, private variant (1,024 memory updates each).
    #[arg(long, default_value_t = 400_000)]
    pub iters: u64,
    /// Additions per thread, shared variant.
    #[arg(long, default_value_t = 2_000_000)]
    pub shared_iters: u64,
    /// Round trips of the pipe variant.
    #[arg(long, default_value_t = 2_000)]
    pub pipe_rounds: u64,
    /// Children of the spawn variant.
    #[arg(long, default_value_t = 40)]
    pub spawns: u64,
    /// Also run the N nodes without the NUMA topology (`dvmm run --no-numa`).
    #[arg(long)]
    pub compare_flat: bool,
    /// Guest memory.
    #[arg(long, default_value = "1G")]
    pub memory: String,
    /// The initramfs with `usertest`.
    #[arg(long, default_value = "guest/out/initramfs.cpio.gz")]
    pub initrd: String,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// One `PAR` line of the guest.
#[derive(Debug, Clone, PartialEq)]
pub struct Par {
    /// private or shared.
    pub mode: String,
    /// Seconds the threads took.
    pub secs: f64,
    /// Millions of work units per second.
    pub mops: f64,
    /// The CPUs the threads ended on.
    pub ran_on: String,
}

/// Parses `PAR mode=private threads=2 iters=.. secs=.. mops_per_s=.. ran_on=0,1`.
pub fn parse_par(line: &str) -> Option<Par> {
    let rest = line.split("PAR ").nth(1)?;
    let field = |k: &str| {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_owned)
    };
    Some(Par {
        mode: field("mode=")?,
        secs: field("secs=")?.parse().ok()?,
        mops: field("mops_per_s=")?.parse().ok()?,
        ran_on: field("ran_on=")?,
    })
}

/// The variants, in the order the guest runs them.
const MODES: [&str; 4] = ["private", "shared", "pipe", "spawn"];

fn measure(args: &BenchSsiArgs, nodes: usize, flat: bool) -> Result<Vec<Par>, String> {
    let n = args.vcpus;
    let script = format!(
        "dvmm.script=usertest+par+{n}+{}+private;usertest+par+{n}+{}+shared;\
         usertest+pipe+{};usertest+spawn+{};poweroff+-f",
        args.iters, args.shared_iters, args.pipe_rounds, args.spawns
    );
    let mut cmd = crate::child_run::command(nodes, n)?;
    cmd.args(["--memory", &args.memory, "--initrd", &args.initrd])
        .args(["--cmdline", &script, "--timeout", "1800"]);
    if flat {
        cmd.arg("--no-numa");
    }
    let (mut child, err_reader) = crate::child_run::spawn(cmd, true)?;
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let err = crate::child_run::stderr_of(err_reader);
    let pars: Vec<Par> = out.lines().filter_map(parse_par).collect();
    if !status.success() || pars.len() != MODES.len() {
        let tail: Vec<&str> = out.lines().rev().take(15).collect();
        return Err(format!(
            "the {nodes}-node run failed ({status}):\n{}\n{err}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    Ok(pars)
}

/// Runs the benchmark.
pub fn bench(args: BenchSsiArgs) -> Result<(), String> {
    if args.vcpus < 2 {
        return Err("--vcpus: at least 2".into());
    }
    let n = args.vcpus;
    println!(
        "usertest par, {n} threads: private {} units x 1,024 updates, shared {} additions per thread",
        args.iters, args.shared_iters
    );
    println!(
        "kernel-heavy, first and last CPU: pipe {} round trips, spawn {} children",
        args.pipe_rounds, args.spawns
    );
    let one = measure(&args, 1, false)?;
    let many = measure(&args, n, false)?;
    let flat = if args.compare_flat {
        Some(measure(&args, n, true)?)
    } else {
        None
    };
    let mut json = Vec::new();
    for (i, (a, b)) in one.iter().zip(&many).enumerate() {
        let eff = |x: &Par| if a.mops > 0.0 { x.mops / a.mops } else { 0.0 };
        println!(
            "{:<8} 1x{n}: {:>11.5} Mops/s ({:.2} s, ran_on={})   {n}x1: {:>11.5} Mops/s ({:.2} s, ran_on={})   SSI efficiency {:.3}",
            a.mode, a.mops, a.secs, a.ran_on, b.mops, b.secs, b.ran_on, eff(b)
        );
        let f = flat.as_ref().and_then(|f| f.get(i));
        if let Some(f) = f {
            println!(
                "{:<8} {n}x1 without NUMA: {:>11.5} Mops/s ({:.2} s, ran_on={})   SSI efficiency {:.3}   NUMA/flat {:.2}",
                f.mode,
                f.mops,
                f.secs,
                f.ran_on,
                eff(f),
                if f.mops > 0.0 { b.mops / f.mops } else { 0.0 }
            );
        }
        json.push(format!(
            "\"{}\":{{\"one_node_mops\":{:.6},\"n_nodes_mops\":{:.6},\"ssi_efficiency\":{:.4}{}}}",
            a.mode,
            a.mops,
            b.mops,
            eff(b),
            f.map_or(String::new(), |f| format!(
                ",\"n_nodes_flat_mops\":{:.6},\"ssi_efficiency_flat\":{:.4}",
                f.mops,
                eff(f)
            ))
        ));
    }
    if args.json {
        println!("{{\"vcpus\":{n},{}}}", json.join(","));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_par_lines() {
        let p =
            parse_par("PAR mode=shared threads=2 iters=10 secs=1.500 mops_per_s=98.67 ran_on=0,1")
                .unwrap();
        assert_eq!(p.mode, "shared");
        assert_eq!(p.secs, 1.5);
        assert_eq!(p.mops, 98.67);
        assert_eq!(p.ran_on, "0,1");
        assert!(parse_par("PAR FAIL bad arguments").is_none());
        assert!(parse_par("nothing").is_none());
    }
}
