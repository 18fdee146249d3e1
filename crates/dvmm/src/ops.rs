//! `dvmm stats` and `dvmm stop`: a running cluster seen and stopped from outside,
//! through its nodes' control sockets (`cluster::control`). See docs/OPERATIONS.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cluster::control::{self, NodeSnapshot};

#[derive(clap::Args)]
pub struct StatsArgs {
    /// The cluster (its name; `dvmm run` names its clusters run-<pid>) [default: the
    /// only one running].
    #[arg(long)]
    cluster: Option<String>,
    /// Print every second until interrupted (or until --count samples).
    #[arg(long)]
    watch: bool,
    /// With --watch: stop after this many samples.
    #[arg(long, requires = "watch")]
    count: Option<u64>,
    /// Print the nodes' raw snapshots as JSON lines (one per node) instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct StopArgs {
    /// The cluster [default: the only one running].
    #[arg(long)]
    cluster: Option<String>,
    /// How long to wait for the cluster to be gone, in seconds (the nodes' own
    /// --stop-timeout decides when they give up on the guest).
    #[arg(long, default_value_t = 90)]
    wait: u64,
}

/// One sample of every node (in node order); nodes that stopped answering are named.
fn sample(nodes: &[(u16, PathBuf)]) -> (Vec<NodeSnapshot>, Vec<String>) {
    let mut snaps = Vec::new();
    let mut errors = Vec::new();
    for (id, path) in nodes {
        match control::fetch_snapshot(path) {
            Ok(s) => snaps.push(s),
            Err(e) => errors.push(format!("node {id}: {e}")),
        }
    }
    (snaps, errors)
}

/// One JSON line per node snapshot.
fn print_json(snaps: &[NodeSnapshot]) -> Result<(), String> {
    for s in snaps {
        println!("{}", serde_json::to_string(s).map_err(|e| e.to_string())?);
    }
    Ok(())
}

pub fn stats(args: StatsArgs) -> Result<(), String> {
    let (name, nodes) = control::find_cluster(args.cluster.as_deref())?;
    let (mut prev, errors) = sample(&nodes);
    if prev.is_empty() {
        return Err(format!(
            "cluster {name}: no node answered ({})",
            errors.join("; ")
        ));
    }
    if args.json {
        print_json(&prev)?;
        if !args.watch {
            return Ok(());
        }
    }
    let mut printed = 0u64;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let (now, errors) = sample(&nodes);
        if now.is_empty() {
            if printed > 0 {
                println!("cluster {name}: gone");
                return Ok(());
            }
            return Err(format!(
                "cluster {name}: no node answered ({})",
                errors.join("; ")
            ));
        }
        if args.json {
            print_json(&now)?;
        } else {
            print!("{}", table(&name, &prev, &now, &errors));
        }
        printed += 1;
        if !args.watch || args.count.is_some_and(|c| printed >= c) {
            return Ok(());
        }
        prev = now;
    }
}

fn per_s(now: u64, before: u64, secs: f64) -> f64 {
    now.saturating_sub(before) as f64 / secs.max(1e-3)
}

fn get(v: &[(String, u64)], key: &str) -> u64 {
    v.iter().find(|(k, _)| k == key).map_or(0, |(_, n)| *n)
}

/// The text `dvmm stats` prints: per node, totals and rates over the last interval.
pub fn table(name: &str, prev: &[NodeSnapshot], now: &[NodeSnapshot], errors: &[String]) -> String {
    let mut out = format!("cluster {name}: {} node(s) answering\n", now.len());
    for n in now {
        let p = prev.iter().find(|p| p.node == n.node);
        let secs = p.map_or(n.uptime_us as f64 / 1e6, |p| {
            n.uptime_us.saturating_sub(p.uptime_us) as f64 / 1e6
        });
        out.push_str(&format!(
            "node {} ({}, pid {}, up {:.0} s)\n",
            n.node,
            n.phase,
            n.pid,
            n.uptime_us as f64 / 1e6
        ));
        for v in &n.vcpus {
            let pv = p.and_then(|p| p.vcpus.iter().find(|x| x.vcpu == v.vcpu));
            let exits: u64 = v.exits.iter().map(|(_, c)| c).sum();
            let exits_before: u64 = pv.map_or(0, |pv| pv.exits.iter().map(|(_, c)| c).sum());
            let mut shares = String::new();
            for (state, us) in &v.state_us {
                let before = pv.map_or(0, |pv| get(&pv.state_us, state));
                let pct = 100.0 * us.saturating_sub(before) as f64 / 1e6 / secs.max(1e-3);
                if pct >= 0.5 {
                    shares.push_str(&format!(" {state} {pct:.0}%"));
                }
            }
            out.push_str(&format!(
                "  vcpu{:<3} {:<8} exits {:>10} ({:.0}/s)  irqs {:.0}/s  time:{shares}\n",
                v.vcpu,
                v.state,
                exits,
                per_s(exits, exits_before, secs),
                per_s(v.injected, pv.map_or(0, |pv| pv.injected), secs),
            ));
        }
        let l = &n.link;
        let pl = p.map(|p| p.link.clone()).unwrap_or_default();
        out.push_str(&format!(
            "  link    irqs out {} in {} ({:.0}/s, {:.0}/s)  io forwarded {} served {} \
             ({:.0}/s, {:.0}/s)  shadow flushes {}\n",
            l.irqs_sent,
            l.irqs_received,
            per_s(l.irqs_sent, pl.irqs_sent, secs),
            per_s(l.irqs_received, pl.irqs_received, secs),
            l.io_forwarded,
            l.io_served,
            per_s(l.io_forwarded, pl.io_forwarded, secs),
            per_s(l.io_served, pl.io_served, secs),
            l.shadow_flushes,
        ));
        if let Some(d) = &n.dsm {
            let pd = p.and_then(|p| p.dsm.clone()).unwrap_or_default();
            let faults = d.read_faults + d.write_faults + d.upgrade_faults;
            let faults_before = pd.read_faults + pd.write_faults + pd.upgrade_faults;
            out.push_str(&format!(
                "  dsm     faults {faults} ({:.0}/s: read {:.0} write {:.0} upgrade {:.0})  \
                 msgs out {:.0}/s in {:.0}/s  pages out {:.0}/s in {:.0}/s  \
                 MB out {:.2}/s in {:.2}/s\n",
                per_s(faults, faults_before, secs),
                per_s(d.read_faults, pd.read_faults, secs),
                per_s(d.write_faults, pd.write_faults, secs),
                per_s(d.upgrade_faults, pd.upgrade_faults, secs),
                per_s(d.messages_sent, pd.messages_sent, secs),
                per_s(d.messages_received, pd.messages_received, secs),
                per_s(d.pages_sent, pd.pages_sent, secs),
                per_s(d.pages_received, pd.pages_received, secs),
                per_s(d.bytes_out, pd.bytes_out, secs) / 1e6,
                per_s(d.bytes_in, pd.bytes_in, secs) / 1e6,
            ));
        }
        for dev in &n.devices {
            let pdev = p.and_then(|p| p.devices.iter().find(|x| x.device == dev.device));
            let cols: Vec<String> = dev
                .counters
                .iter()
                .map(|(k, v)| {
                    let before = pdev.map_or(0, |x| get(&x.counters, k));
                    format!("{k} {v} ({:.0}/s)", per_s(*v, before, secs))
                })
                .collect();
            out.push_str(&format!("  {:<7} {}\n", dev.device, cols.join("  ")));
        }
        for h in n.hot_pages.iter().take(5) {
            out.push_str(&format!(
                "  hot     {:#012x} {:>8} faults  {}\n",
                h.gpa,
                h.faults,
                h.what.as_deref().unwrap_or("")
            ));
        }
    }
    for e in errors {
        out.push_str(&format!("{e}\n"));
    }
    out
}

/// The control socket of a one-node `dvmm run` (the VM runs in the `dvmm` process
/// itself): the same requests as a cluster node's, with no DSM or link counters.
/// `stop_signal` (SIGTERM/SIGINT) is looked at every 100 ms.
pub fn serve_single(
    vm: &vmm::VmHandle,
    stop_timeout: Duration,
    stop_signal: &'static std::sync::atomic::AtomicBool,
) -> Result<control::ControlServer, String> {
    let name = crate::local::local_name();
    let started = Instant::now();
    let (h, h2, cluster) = (vm.clone(), vm.clone(), name.clone());
    let handler = control::handler(
        move || NodeSnapshot {
            cluster: cluster.clone(),
            node: 0,
            nodes: 1,
            pid: std::process::id(),
            uptime_us: started.elapsed().as_micros() as u64,
            phase: "running".into(),
            vcpus: h.vcpu_snapshots(),
            devices: h.device_counters(),
            ..Default::default()
        },
        move || h2.request_power_off(stop_timeout),
    );
    let h = vm.clone();
    let tick = Box::new(move || {
        if stop_signal.swap(false, std::sync::atomic::Ordering::SeqCst) {
            if let Err(e) = h.request_power_off(stop_timeout) {
                vmm::term::eprint_line(&format!("dvmm: stop: {e}"));
            }
        }
    });
    control::ControlServer::start(&control::socket_path(&name, 0), handler, tick)
}

pub fn stop(args: StopArgs) -> Result<(), String> {
    let (name, nodes) = control::find_cluster(args.cluster.as_deref())?;
    // Node 0 presses the power button; any other node passes the request on.
    let mut last_err = String::new();
    let mut asked = false;
    for (id, path) in &nodes {
        match control::request(path, "stop") {
            Ok(reply) => {
                let v: serde_json::Value = serde_json::from_str(&reply).unwrap_or_default();
                if let Some(ok) = v.get("ok").and_then(|x| x.as_str()) {
                    eprintln!("dvmm: cluster {name}, node {id}: {ok}");
                    asked = true;
                    break;
                }
                last_err = v
                    .get("error")
                    .and_then(|x| x.as_str())
                    .unwrap_or(reply.trim())
                    .to_string();
            }
            Err(e) => last_err = e,
        }
    }
    if !asked {
        return Err(format!("cluster {name}: stop refused: {last_err}"));
    }
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    while Instant::now() < deadline {
        if control::find_cluster(Some(&name)).is_err() {
            eprintln!("dvmm: cluster {name} stopped");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "cluster {name} still runs {} s after the stop request (see its node logs)",
        args.wait
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::stats::VcpuSnapshot;

    #[test]
    fn table_shows_rates_and_shares() {
        let vcpu = |guest_us: u64, exits: u64| VcpuSnapshot {
            vcpu: 1,
            state: "guest".into(),
            state_us: vec![("guest".into(), guest_us), ("halted".into(), 0)],
            exits: vec![("io_in".into(), exits)],
            injected: 0,
            ipis_sent: 0,
            tid: 0,
        };
        let snap = |up: u64, guest_us: u64, exits: u64, faults: u64| NodeSnapshot {
            cluster: "c".into(),
            node: 1,
            nodes: 2,
            uptime_us: up,
            phase: "running".into(),
            vcpus: vec![vcpu(guest_us, exits)],
            dsm: Some(dsm::DsmStats {
                read_faults: faults,
                ..Default::default()
            }),
            hot_pages: vec![control::HotPage {
                gpa: 0x1f000,
                faults: 9,
                what: Some("cpu1 per-CPU +0x1f000: runqueues".into()),
            }],
            ..Default::default()
        };
        let t = table(
            "c",
            &[snap(1_000_000, 0, 10, 100)],
            &[snap(3_000_000, 1_000_000, 210, 700)],
            &["node 0: gone".into()],
        );
        assert!(t.contains("vcpu1"), "{t}");
        assert!(t.contains("(100/s)"), "exits per second: {t}");
        assert!(t.contains("guest 50%"), "{t}");
        assert!(t.contains("faults 700 (300/s: read 300"), "{t}");
        assert!(t.contains("runqueues"), "{t}");
        assert!(t.contains("node 0: gone"), "{t}");
    }
}
