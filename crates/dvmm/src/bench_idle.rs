//! `dvmm bench idle`: the DSM traffic of a 2-node guest that does (almost) nothing, read
//! live from the nodes' control sockets (`dvmm stats`), with the NUMA topology and
//! without it (`--no-numa`), in one run of this command.
//!
//! Each guest boots to user space, then sleeps (phase `idle`: only the kernel's own
//! housekeeping: timers, RCU, workqueues), then computes in user mode on vCPU 1 (phase
//! `spin`: `usertest spin`, no system calls). In each phase the bench waits `--settle`
//! seconds, samples both nodes, waits `--window` seconds and samples again: the rates
//! are over that window. Pages are the 4 KiB payloads the DSM carried (in + out, both
//! nodes, each page counted once: out of one node is in of the other).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cluster::control::{self, NodeSnapshot};

/// Arguments of `dvmm bench idle`.
#[derive(clap::Args)]
pub struct BenchIdleArgs {
    /// Seconds to wait in each phase before the first sample.
    #[arg(long, default_value_t = 20)]
    pub settle: u64,
    /// Seconds between the two samples of a phase.
    #[arg(long, default_value_t = 30)]
    pub window: u64,
    /// Only the NUMA guest (skip the flat one).
    #[arg(long)]
    pub numa_only: bool,
}

/// Rates of one phase, both nodes together.
#[derive(Debug, Clone, Copy, Default)]
struct Rates {
    pages: f64,
    messages: f64,
    faults: f64,
    irqs: f64,
}

fn totals(s: &[NodeSnapshot]) -> (f64, f64, f64, f64) {
    let mut t = (0.0, 0.0, 0.0, 0.0);
    for n in s {
        if let Some(d) = &n.dsm {
            // Each page and message crosses once: count what the nodes sent.
            t.0 += d.pages_sent as f64;
            t.1 += d.messages_sent as f64;
            t.2 += (d.read_faults + d.write_faults + d.upgrade_faults) as f64;
        }
        t.3 += n.link.irqs_sent as f64;
    }
    t
}

fn snapshots(cluster: &str) -> Result<Vec<NodeSnapshot>, String> {
    let (_, nodes) = control::find_cluster(Some(cluster))?;
    nodes
        .iter()
        .map(|(_, p)| control::fetch_snapshot(p))
        .collect()
}

fn wait_line(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains(needle) => return Ok(()),
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Err(format!("the guest never printed '{needle}'"))
}

fn phase(cluster: &str, args: &BenchIdleArgs) -> Result<Rates, String> {
    std::thread::sleep(Duration::from_secs(args.settle));
    let t0 = Instant::now();
    let a = totals(&snapshots(cluster)?);
    std::thread::sleep(Duration::from_secs(args.window));
    let b = totals(&snapshots(cluster)?);
    let secs = t0.elapsed().as_secs_f64();
    Ok(Rates {
        pages: (b.0 - a.0) / secs,
        messages: (b.1 - a.1) / secs,
        faults: (b.2 - a.2) / secs,
        irqs: (b.3 - a.3) / secs,
    })
}

fn measure(args: &BenchIdleArgs, numa: bool) -> Result<(Rates, Rates), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let idle = idle_secs(args);
    let script = format!(
        "dvmm.script=echo+DVMM-BENCH+idle;sleep+{idle};echo+DVMM-BENCH+spin;\
         taskset+-c+1+usertest+spin+{idle};poweroff+-f"
    );
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--nodes", "2", "--vcpus", "2", "--memory", "1G"])
        .args(["--timeout", "1800", "--cmdline", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !numa {
        cmd.arg("--no-numa");
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start dvmm run: {e}"))?;
    let cluster = format!("run-{}", child.id());
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let r: Result<(Rates, Rates), String> = (|| {
        wait_line(&rx, "DVMM-BENCH idle", Duration::from_secs(900))?;
        let idle = phase(&cluster, args)?;
        wait_line(
            &rx,
            "DVMM-BENCH spin",
            Duration::from_secs(idle_secs(args) * 2),
        )?;
        let spin = phase(&cluster, args)?;
        Ok((idle, spin))
    })();
    if r.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let r = r?;
    if !status.success() {
        return Err(format!("the guest run ended with {status}"));
    }
    Ok(r)
}

fn idle_secs(args: &BenchIdleArgs) -> u64 {
    args.settle + args.window + 15
}

pub fn bench(args: BenchIdleArgs) -> Result<(), String> {
    let mut results = Vec::new();
    let shapes: &[bool] = if args.numa_only {
        &[true]
    } else {
        &[true, false]
    };
    for &numa in shapes {
        let name = if numa { "numa" } else { "flat" };
        eprintln!("bench idle: 2 nodes x 1 vCPU, {name}: booting");
        let (idle, spin) = measure(&args, numa)?;
        for (phase, r) in [("idle", idle), ("spin", spin)] {
            println!(
                "bench idle: {name:<4} {phase:<4} pages/s {:>7.1}  messages/s {:>7.1}  \
                 faults/s {:>7.1}  cross-node irqs/s {:>6.1}",
                r.pages, r.messages, r.faults, r.irqs
            );
        }
        results.push((name, idle, spin));
    }
    if let [(_, ni, ns), (_, fi, fs)] = results.as_slice() {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        println!(
            "bench idle: pages/s numa/flat: idle {:.2}, spin {:.2}",
            ratio(ni.pages, fi.pages),
            ratio(ns.pages, fs.pages)
        );
    }
    Ok(())
}
