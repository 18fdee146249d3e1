//! `dvmm bench boot`: boot to user space on several cluster shapes: time to
//! `smp: Brought up`, to the initramfs' first line (`DVMM-GUEST nproc=...`, the shell
//! would prompt here) and to the end of the run (`poweroff -f`), with each shape's
//! ratio against the first one, measured in the same run.

use std::io::{BufRead, BufReader};
use std::time::Instant;

use crate::bench_cluster::parse_shapes;

/// Arguments of `dvmm bench boot`.
#[derive(clap::Args)]
pub struct BenchBootArgs {
    /// Cluster shapes as NODESxVCPUS_PER_NODE, comma separated; ratios are against the
    /// first.
    #[arg(long, default_value = "1x1,2x1")]
    pub shapes: String,
    /// Guest memory.
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// The initramfs (its /init prints `DVMM-GUEST nproc=` and runs `dvmm.script=`).
    #[arg(long, default_value = "guest/out/initramfs.cpio.gz")]
    pub initrd: String,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// One measured boot.
#[derive(Debug)]
pub struct BootTiming {
    /// Node processes.
    pub nodes: usize,
    /// vCPUs in all.
    pub vcpus: usize,
    /// Seconds to the `smp: Brought up` line.
    pub brought_up_s: Option<f64>,
    /// Seconds to the init's first line (user space reached).
    pub user_s: Option<f64>,
    /// Seconds to the end of the run.
    pub end_s: f64,
    /// Whether the run exited 0.
    pub ok: bool,
}

/// Boots the guest once as a child `dvmm run` and times its console.
pub fn time_boot(nodes: usize, vcpus: usize, args: &BenchBootArgs) -> Result<BootTiming, String> {
    let start = Instant::now();
    let mut cmd = crate::child_run::command(nodes, vcpus)?;
    cmd.args(["--memory", &args.memory, "--timeout", "600"])
        .args(["--initrd", &args.initrd])
        .args(["--cmdline", "dvmm.script=poweroff+-f"]);
    let (mut child, _) = crate::child_run::spawn(cmd, false)?;
    let (mut brought_up, mut user) = (None, None);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if brought_up.is_none() && line.contains("smp: Brought up") {
                brought_up = Some(start.elapsed().as_secs_f64());
            }
            if user.is_none() && line.contains("DVMM-GUEST nproc=") {
                user = Some(start.elapsed().as_secs_f64());
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    Ok(BootTiming {
        nodes,
        vcpus,
        brought_up_s: brought_up,
        user_s: user,
        end_s: start.elapsed().as_secs_f64(),
        ok: status.success() && user.is_some(),
    })
}

fn secs(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| format!("{s:.1}"))
}

fn json_num(s: Option<f64>) -> String {
    s.map_or("null".into(), |s| format!("{s:.2}"))
}

/// Runs the boot benchmark.
pub fn bench(args: BenchBootArgs) -> Result<(), String> {
    let shapes = parse_shapes(&args.shapes)?;
    let mut results: Vec<BootTiming> = Vec::new();
    for &(nodes, per) in &shapes {
        let t = time_boot(nodes, nodes * per, &args)?;
        let ratio = match (results.first().and_then(|b| b.user_s), t.user_s) {
            (Some(b), Some(u)) if b > 0.0 => format!(" (x{:.2} of the first shape)", u / b),
            _ => String::new(),
        };
        println!(
            "boot {}x{}: brought_up {} s, user space {} s{ratio}, power-off {:.1} s{}",
            nodes,
            per,
            secs(t.brought_up_s),
            secs(t.user_s),
            t.end_s,
            if t.ok { "" } else { " (FAILED)" }
        );
        results.push(t);
    }
    if args.json {
        let base = results.first().and_then(|b| b.user_s);
        let items: Vec<String> = results
            .iter()
            .map(|t| {
                let ratio = match (base, t.user_s) {
                    (Some(b), Some(u)) if b > 0.0 => format!("{:.3}", u / b),
                    _ => "null".into(),
                };
                format!(
                    "{{\"nodes\":{},\"vcpus\":{},\"brought_up_s\":{},\"user_s\":{},\"user_ratio\":{ratio},\"end_s\":{:.2},\"ok\":{}}}",
                    t.nodes,
                    t.vcpus,
                    json_num(t.brought_up_s),
                    json_num(t.user_s),
                    t.end_s,
                    t.ok
                )
            })
            .collect();
        println!("{{\"boot\":[{}]}}", items.join(","));
    }
    if results.iter().all(|t| t.ok) {
        Ok(())
    } else {
        Err("a boot failed".into())
    }
}
