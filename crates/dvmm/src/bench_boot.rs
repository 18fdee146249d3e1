//! `dvmm bench boot`: boot to user space on several cluster shapes: time to
//! `smp: Brought up`, to the initramfs' first line (`DVMM-GUEST nproc=...`, the shell
//! would prompt here) and to the end of the run (`poweroff -f`), with each shape's
//! ratio against the first one, measured in the same run. With several `--kernels`
//! (e.g. a bzImage and the vmlinux inside it) every shape boots each kernel, and the
//! time to `Brought up` is also given as a ratio against the first kernel.

use std::io::{BufRead, BufReader, Write};
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
    /// Kernel images (ELF vmlinux or bzImage), comma separated; each shape boots each.
    #[arg(long, default_value = "guest/out/vmlinux")]
    pub kernels: String,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// Also write each boot's console to DIR/boot-<kernel file name>-<shape>.log.
    #[arg(long, value_name = "DIR")]
    pub console_dir: Option<String>,
}

/// One measured boot.
#[derive(Debug)]
pub struct BootTiming {
    /// The kernel image.
    pub kernel: String,
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
pub fn time_boot(
    nodes: usize,
    vcpus: usize,
    kernel: &str,
    args: &BenchBootArgs,
) -> Result<BootTiming, String> {
    let start = Instant::now();
    let mut cmd = crate::child_run::command(nodes, vcpus)?;
    cmd.args(["--memory", &args.memory, "--timeout", "2400"])
        .args(["--kernel", kernel])
        .args(["--initrd", &args.initrd])
        .args(["--cmdline", "dvmm.script=poweroff+-f"]);
    let (mut child, _) = crate::child_run::spawn(cmd, false)?;
    let (mut brought_up, mut user) = (None, None);
    let mut log = match &args.console_dir {
        Some(dir) => {
            let name = std::path::Path::new(kernel)
                .file_name()
                .map_or("kernel".into(), |n| n.to_string_lossy().into_owned());
            let path = std::path::Path::new(dir)
                .join(format!("boot-{name}-{nodes}x{}.log", vcpus / nodes.max(1)));
            let f = std::fs::File::create(&path)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Some(std::io::BufWriter::new(f))
        }
        None => None,
    };
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(f) = log.as_mut() {
                let _ = writeln!(f, "{line}");
                let _ = f.flush();
            }
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
        kernel: kernel.to_string(),
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

/// `new / base`, or None when either is missing or the base is zero.
fn ratio(base: Option<f64>, new: Option<f64>) -> Option<f64> {
    match (base, new) {
        (Some(b), Some(n)) if b > 0.0 => Some(n / b),
        _ => None,
    }
}

/// Runs the boot benchmark.
pub fn bench(args: BenchBootArgs) -> Result<(), String> {
    let shapes = parse_shapes(&args.shapes)?;
    let kernels: Vec<&str> = args.kernels.split(',').filter(|k| !k.is_empty()).collect();
    for k in &kernels {
        if !std::path::Path::new(k).is_file() {
            return Err(format!(
                "kernel {k} not found (`make guest` builds guest/out/vmlinux)"
            ));
        }
    }
    let mut results: Vec<BootTiming> = Vec::new();
    // (user-space ratio against the first shape, brought-up ratio against the first
    // kernel) for each result.
    let mut ratios: Vec<(Option<f64>, Option<f64>)> = Vec::new();
    for &(nodes, per) in &shapes {
        for kernel in &kernels {
            let t = time_boot(nodes, nodes * per, kernel, &args)?;
            // The first boot of the same kernel (or of the same shape) is the base; the
            // first one of each is its own base (ratio 1).
            let same_kernel = results.iter().find(|b| b.kernel == t.kernel).unwrap_or(&t);
            let same_shape = results
                .iter()
                .find(|b| b.nodes == t.nodes && b.vcpus == t.vcpus)
                .unwrap_or(&t);
            let r = (
                ratio(same_kernel.user_s, t.user_s),
                ratio(same_shape.brought_up_s, t.brought_up_s),
            );
            let notes =
                r.0.map_or(String::new(), |x| format!(" (x{x:.2} of the first shape)"));
            let up_note = match r.1 {
                Some(x) if kernels.len() > 1 => format!(" (x{x:.2} of {})", same_shape.kernel),
                _ => String::new(),
            };
            println!(
                "boot {kernel} {}x{}: brought_up {} s{up_note}, user space {} s{notes}, power-off {:.1} s{}",
                nodes,
                per,
                secs(t.brought_up_s),
                secs(t.user_s),
                t.end_s,
                if t.ok { "" } else { " (FAILED)" }
            );
            results.push(t);
            ratios.push(r);
        }
    }
    if args.json {
        let num = |r: Option<f64>| r.map_or("null".into(), |r| format!("{r:.3}"));
        let items: Vec<String> = results
            .iter()
            .zip(&ratios)
            .map(|(t, r)| {
                format!(
                    "{{\"kernel\":{:?},\"nodes\":{},\"vcpus\":{},\"brought_up_s\":{},\"brought_up_ratio\":{},\"user_s\":{},\"user_ratio\":{},\"end_s\":{:.2},\"ok\":{}}}",
                    t.kernel,
                    t.nodes,
                    t.vcpus,
                    json_num(t.brought_up_s),
                    num(r.1),
                    json_num(t.user_s),
                    num(r.0),
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
