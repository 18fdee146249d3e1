//! `dvmm bench boot`: time from start to `smp: Brought up` and to guest power-off.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Arguments of `dvmm bench boot`.
#[derive(clap::Args)]
pub struct BenchBootArgs {
    /// vCPU counts to measure, comma separated.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    pub vcpus: Vec<usize>,
    /// Guest memory.
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// One measured boot.
#[derive(Debug)]
pub struct BootTiming {
    /// vCPUs.
    pub vcpus: usize,
    /// Seconds to the `smp: Brought up` line.
    pub brought_up_s: Option<f64>,
    /// Seconds to the end of the run.
    pub end_s: f64,
    /// Whether the run exited 0.
    pub ok: bool,
}

/// Boots the guest once as a child `dvmm run` and times its console.
pub fn time_boot(vcpus: usize, memory: &str, extra: &[&str]) -> Result<BootTiming, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args([
            "run",
            "--vcpus",
            &vcpus.to_string(),
            "--memory",
            memory,
            "--timeout",
            "300",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start dvmm run: {e}"))?;
    let mut brought_up = None;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if brought_up.is_none() && line.contains("smp: Brought up") {
                brought_up = Some(start.elapsed().as_secs_f64());
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    Ok(BootTiming {
        vcpus,
        brought_up_s: brought_up,
        end_s: start.elapsed().as_secs_f64(),
        ok: status.success(),
    })
}

/// Runs the boot benchmark.
pub fn bench(args: BenchBootArgs) -> Result<(), String> {
    let mut results = Vec::new();
    for &v in &args.vcpus {
        let t = time_boot(v, &args.memory, &[])?;
        println!(
            "boot 1 node x {} vCPU: brought_up {} s, power-off {:.1} s{}",
            v,
            t.brought_up_s.map_or("-".into(), |s| format!("{s:.1}")),
            t.end_s,
            if t.ok { "" } else { " (FAILED)" }
        );
        results.push(t);
    }
    if args.json {
        let items: Vec<String> = results
            .iter()
            .map(|t| {
                format!(
                    "{{\"nodes\":1,\"vcpus\":{},\"brought_up_s\":{},\"end_s\":{:.2},\"ok\":{}}}",
                    t.vcpus,
                    t.brought_up_s.map_or("null".into(), |s| format!("{s:.2}")),
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
