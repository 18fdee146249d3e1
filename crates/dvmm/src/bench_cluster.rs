//! `dvmm bench cluster`: the guest on several cluster shapes (nodes x vCPUs), each run
//! timed to `smp: Brought up`, then locktorture for a fixed time: lock acquisitions per
//! second and the DSM counters of every node. The first shape (by default 1 node x 2
//! vCPUs, no DSM) is the floor the others are compared with, measured in the same run.

use std::io::{BufRead, BufReader};
use std::time::Instant;

/// Arguments of `dvmm bench cluster`.
#[derive(clap::Args)]
pub struct BenchClusterArgs {
    /// Cluster shapes as NODESxVCPUS (vCPUs per node), comma separated; the first is
    /// the reference. A shape ending in `flat` runs without the NUMA topology
    /// (`dvmm run --no-numa`), e.g. `1x2,2x2flat,2x2` to compare.
    #[arg(long, default_value = "1x2,2x1,2x2,4x1", value_delimiter = ',')]
    pub configs: Vec<String>,
    /// Guest memory.
    #[arg(long, default_value = "1G")]
    pub memory: String,
    /// Lock type tortured (locktorture.torture_type).
    #[arg(long, default_value = "spin_lock")]
    pub lock: String,
    /// Seconds of locktorture before the guest powers off (locktorture.shutdown_secs).
    #[arg(long, default_value_t = 30)]
    pub secs: u64,
    /// More kernel command line for every run (e.g. other locktorture parameters:
    /// `locktorture.shuffle_interval=0 locktorture.stutter=0`).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Run each shape in network namespaces (`dvmm run --netns`).
    #[arg(long)]
    pub netns: bool,
    /// DSM hold time in µs (`dvmm run --dsm-hold-us`; default: the DSM's).
    #[arg(long)]
    pub dsm_hold_us: Option<u64>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// DSM counters summed over the nodes of a run.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DsmTotals {
    /// Read + write + upgrade faults.
    pub faults: u64,
    /// Upgrade faults (write on a read-only copy).
    pub upgrades: u64,
    /// DSM messages sent.
    pub messages: u64,
    /// DSM bytes sent.
    pub bytes: u64,
    /// Pages sent.
    pub pages: u64,
    /// Invalidations sent.
    pub invalidations: u64,
    /// The hottest pages over all nodes (guest-physical address, fault events), most
    /// first.
    pub hot: Vec<(u64, u64)>,
}

/// How many hot pages a run reports.
const HOT_PAGES: usize = 6;

/// One measured run.
#[derive(Debug)]
pub struct ClusterRun {
    /// Node processes.
    pub nodes: usize,
    /// vCPUs in all (the same number on every node).
    pub vcpus: usize,
    /// Run without the NUMA topology (`--no-numa`).
    pub flat: bool,
    /// Wall seconds from start to the `smp: Brought up` line.
    pub brought_up_s: Option<f64>,
    /// Wall seconds to the end of the run.
    pub end_s: f64,
    /// Lock acquisitions counted by locktorture.
    pub ops: Option<u64>,
    /// Guest seconds the writers ran (first writer start to shutdown).
    pub torture_s: Option<f64>,
    /// DSM counters (None for a single node, which has no DSM).
    pub dsm: Option<DsmTotals>,
    /// Whether the run exited 0 with locktorture's SUCCESS.
    pub ok: bool,
}

impl ClusterRun {
    /// "NxV", with "flat" for a run without NUMA topology.
    pub fn shape(&self) -> String {
        let flat = if self.flat { "flat" } else { "" };
        format!("{}x{}{flat}", self.nodes, self.vcpus / self.nodes.max(1))
    }

    /// DSM fault events per second of the whole run (boot and locktorture).
    pub fn faults_per_s(&self) -> Option<f64> {
        let d = self.dsm.as_ref()?;
        (self.end_s > 0.0).then(|| d.faults as f64 / self.end_s)
    }

    /// Lock acquisitions per second.
    pub fn ops_per_s(&self) -> Option<f64> {
        match (self.ops, self.torture_s) {
            (Some(o), Some(s)) if s > 0.0 => Some(o as f64 / s),
            _ => None,
        }
    }
}

/// Parses "NxV" (N nodes with V vCPUs each) into (nodes, vCPUs per node).
/// Parses a comma-separated list of shapes (at least one).
pub fn parse_shapes(list: &str) -> Result<Vec<(usize, usize)>, String> {
    let shapes = list
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| parse_shape(s.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    if shapes.is_empty() {
        return Err("no cluster shape given".into());
    }
    Ok(shapes)
}

fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("bad cluster shape '{s}': expected NODESxVCPUS (per node), e.g. 2x2");
    let (n, v) = s.trim().split_once('x').ok_or_else(bad)?;
    let n: usize = n.parse().map_err(|_| bad())?;
    let v: usize = v.parse().map_err(|_| bad())?;
    if n == 0 || v == 0 || n > 64 {
        return Err(bad());
    }
    Ok((n, v))
}

/// The guest's timestamp of a console line (`[   12.345678] ...`).
fn guest_time(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    rest.split_once(']')?.0.trim().parse().ok()
}

/// The number after `key` in `line` (`key` includes its `=` or `:`).
fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Adds one node's `stats dsm` line to `t`.
fn add_dsm_line(t: &mut DsmTotals, line: &str) -> bool {
    let Some(rest) = line.split_once("stats dsm ").map(|(_, r)| r) else {
        return false;
    };
    let read = number_after(rest, "faults read=").unwrap_or(0);
    let write = number_after(rest, " write=").unwrap_or(0);
    let upgrade = number_after(rest, " upgrade=").unwrap_or(0);
    t.faults += read + write + upgrade;
    t.upgrades += upgrade;
    t.messages += number_after(rest, "msgs out=").unwrap_or(0);
    t.bytes += number_after(rest, "bytes out=").unwrap_or(0);
    t.pages += number_after(rest, "pages out=").unwrap_or(0);
    t.invalidations += number_after(rest, "inval out=").unwrap_or(0);
    if let Some((_, hot)) = rest.split_once(" hot ") {
        for item in hot.split_whitespace() {
            let Some((addr, n)) = item.split_once(':') else {
                continue;
            };
            let (Ok(addr), Ok(n)) = (
                u64::from_str_radix(addr.trim_start_matches("0x"), 16),
                n.parse::<u64>(),
            ) else {
                continue;
            };
            match t.hot.iter_mut().find(|(a, _)| *a == addr) {
                Some(e) => e.1 += n,
                None => t.hot.push((addr, n)),
            }
        }
        t.hot.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        t.hot.truncate(HOT_PAGES);
    }
    true
}

/// A shape of `--configs`: "NxV", or "NxVflat" for a run without NUMA topology.
pub fn parse_cluster_shapes(list: &str) -> Result<Vec<(usize, usize, bool)>, String> {
    let mut out = Vec::new();
    for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (shape, flat) = match s.strip_suffix("flat") {
            Some(sh) => (sh, true),
            None => (s, false),
        };
        let (n, v) = parse_shape(shape)?;
        out.push((n, v, flat));
    }
    if out.is_empty() {
        return Err("no cluster shape given".into());
    }
    Ok(out)
}

/// The initramfs whose /init only waits: the kernel must not run out of things to do
/// before locktorture powers it off.
const IDLE_INITRD: &str = "guest/out/idle.cpio";

/// Boots the guest once on `nodes` nodes with `per_node` vCPUs each and measures it.
fn measure(
    args: &BenchClusterArgs,
    nodes: usize,
    per_node: usize,
    flat: bool,
) -> Result<ClusterRun, String> {
    let vcpus = nodes * per_node;
    let cmdline = format!(
        "locktorture.torture_type={} locktorture.nwriters_stress={} locktorture.shutdown_secs={} {}",
        args.lock,
        2 * vcpus,
        args.secs,
        args.cmdline
    );
    let start = Instant::now();
    let mut cmd = crate::child_run::command(nodes, vcpus)?;
    cmd.args([
        "--memory",
        &args.memory,
        "--timeout",
        "1200",
        "--cmdline",
        &cmdline,
        "--initrd",
        IDLE_INITRD,
    ]);
    if args.netns {
        cmd.arg("--netns");
    }
    if flat {
        cmd.arg("--no-numa");
    }
    if let Some(h) = args.dsm_hold_us {
        cmd.args(["--dsm-hold-us", &h.to_string()]);
    }
    let (mut child, err_reader) = crate::child_run::spawn(cmd, true)?;
    let (mut brought_up, mut t0, mut t1, mut ops, mut success) = (None, None, None, None, false);
    let success_tag = format!("{}-torture:--- End of test: SUCCESS", args.lock);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if brought_up.is_none() && line.contains("smp: Brought up") {
                brought_up = Some(start.elapsed().as_secs_f64());
            }
            if t0.is_none() && line.contains("lock_torture_writer task started") {
                t0 = guest_time(&line);
            }
            if line.contains("torture_shutdown task shutting down system") {
                t1 = guest_time(&line);
            }
            if line.contains("Writes:  Total:") {
                ops = number_after(&line, "Total:").or(ops);
            }
            success |= line.contains(&success_tag);
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let err = crate::child_run::stderr_of(err_reader);
    let mut dsm = DsmTotals::default();
    let dsm_lines = err.lines().filter(|l| add_dsm_line(&mut dsm, l)).count();
    let ok = status.success() && success;
    if !ok {
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        eprintln!(
            "dvmm: bench: {nodes}x{per_node} failed ({status}); stderr ends with:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(ClusterRun {
        nodes,
        vcpus,
        flat,
        brought_up_s: brought_up,
        end_s: start.elapsed().as_secs_f64(),
        ops,
        torture_s: match (t0, t1) {
            (Some(a), Some(b)) if b > a => Some(b - a),
            _ => None,
        },
        dsm: (dsm_lines > 0).then_some(dsm),
        ok,
    })
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// Runs the cluster benchmark.
pub fn bench(args: BenchClusterArgs) -> Result<(), String> {
    let shapes = parse_cluster_shapes(&args.configs.join(","))?;
    println!(
        "locktorture {} for {} s per run{}, {} of guest memory{}; ratios are against {}x{}",
        args.lock,
        args.secs,
        if args.cmdline.is_empty() {
            String::new()
        } else {
            format!(" ({})", args.cmdline)
        },
        args.memory,
        if args.netns {
            ", nodes in namespaces"
        } else {
            ""
        },
        shapes[0].0,
        shapes[0].1
    );
    println!(
        "{:>10} {:>11} {:>7} {:>8} {:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9}",
        "shape",
        "brought_up",
        "end",
        "ops",
        "ops/s",
        "ratio",
        "faults",
        "faults/s",
        "upgrades",
        "msgs",
        "MiB",
        "inval"
    );
    let mut runs: Vec<ClusterRun> = Vec::new();
    for &(n, v, flat) in &shapes {
        let r = measure(&args, n, v, flat)?;
        let ratio = match (r.ops_per_s(), runs.first().and_then(|f| f.ops_per_s())) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            (Some(_), None) if runs.is_empty() => Some(1.0),
            _ => None,
        };
        let d = r.dsm.clone();
        println!(
            "{:>10} {:>10}s {:>6.1}s {:>8} {:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9}{}",
            r.shape(),
            opt(r.brought_up_s, 1),
            r.end_s,
            r.ops.map_or("-".into(), |o| o.to_string()),
            opt(r.ops_per_s(), 1),
            opt(ratio, 3),
            d.as_ref().map_or("-".into(), |d| d.faults.to_string()),
            opt(r.faults_per_s(), 0),
            d.as_ref().map_or("-".into(), |d| d.upgrades.to_string()),
            d.as_ref().map_or("-".into(), |d| d.messages.to_string()),
            d.as_ref()
                .map_or("-".into(), |d| format!("{:.1}", d.bytes as f64 / 1048576.0)),
            d.as_ref()
                .map_or("-".into(), |d| d.invalidations.to_string()),
            if r.ok { "" } else { "  FAILED" }
        );
        runs.push(r);
    }
    for r in runs.iter().filter(|r| r.dsm.is_some()) {
        let hot: Vec<String> = r
            .dsm
            .iter()
            .flat_map(|d| d.hot.iter())
            .map(|(a, n)| format!("{a:#x}:{n}"))
            .collect();
        println!("{:>10} hot pages: {}", r.shape(), hot.join(" "));
    }
    if args.json {
        let floor = runs.first().and_then(|f| f.ops_per_s());
        let items: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "nodes": r.nodes,
                    "vcpus": r.vcpus,
                    "vcpus_per_node": r.vcpus / r.nodes,
                    "numa": !r.flat && r.nodes > 1,
                    "faults_per_s": r.faults_per_s(),
                    "brought_up_s": r.brought_up_s,
                    "end_s": r.end_s,
                    "ops": r.ops,
                    "torture_s": r.torture_s,
                    "ops_per_s": r.ops_per_s(),
                    "ratio": r.ops_per_s().zip(floor).map(|(a, b)| a / b),
                    "dsm": r.dsm.as_ref().map(|d| serde_json::json!({
                        "faults": d.faults,
                        "upgrades": d.upgrades,
                        "messages": d.messages,
                        "bytes": d.bytes,
                        "pages": d.pages,
                        "invalidations": d.invalidations,
                        "hot_pages": d.hot.iter().map(|(a, n)| serde_json::json!([format!("{a:#x}"), n])).collect::<Vec<_>>(),
                    })),
                    "ok": r.ok,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "lock": args.lock, "secs": args.secs, "runs": items })
        );
    }
    if runs.iter().all(|r| r.ok) {
        Ok(())
    } else {
        Err("a run failed (see above)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse() {
        assert_eq!(parse_shape("2x4"), Ok((2, 4)));
        assert_eq!(parse_shape("4x1"), Ok((4, 1)));
        assert!(parse_shape("0x1").is_err());
        assert!(parse_shape("2x0").is_err());
        assert!(parse_shape("2").is_err());
        assert!(parse_shape("ax2").is_err());
        assert_eq!(
            parse_cluster_shapes("1x2, 2x2flat,2x2"),
            Ok(vec![(1, 2, false), (2, 2, true), (2, 2, false)])
        );
        assert!(parse_cluster_shapes("2xflat").is_err());
        assert!(parse_cluster_shapes(",").is_err());
    }

    #[test]
    fn console_lines_parse() {
        assert_eq!(
            guest_time("[   72.378244] spin_lock-torture: x"),
            Some(72.378244)
        );
        assert_eq!(guest_time("no stamp"), None);
        let w = "[   75.6] Writes:  Total: 4380  Max/Min: 929/272 ???  Fail: 0 ";
        assert_eq!(number_after(w, "Total:"), Some(4380));
    }

    #[test]
    fn dsm_lines_add_up() {
        let mut t = DsmTotals::default();
        let l = "dvmm: node 1 stats dsm faults read=10 write=2 upgrade=3 merged=4 zero_fill=0 \
                 msgs out=100 in=90 bytes out=4096 in=0 pages out=1 in=0 inval out=7 in=1 fwd=0 \
                 read_us p50=30 p99=90 hot 0x1000:5 0x2000:9";
        assert!(add_dsm_line(&mut t, l));
        assert!(add_dsm_line(&mut t, &l.replace("0x1000:5", "0x3000:1")));
        assert!(!add_dsm_line(&mut t, "dvmm: node 1 stats irqs_sent=3"));
        assert_eq!(
            t,
            DsmTotals {
                faults: 30,
                upgrades: 6,
                messages: 200,
                bytes: 8192,
                pages: 2,
                invalidations: 14,
                hot: vec![(0x2000, 18), (0x1000, 5), (0x3000, 1)],
            }
        );
    }
}
