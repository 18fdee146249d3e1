//! `dvmm`: the one binary of the distributed virtual machine monitor.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::TypedValueParser as _;
use clap::{Parser, Subcommand};

mod bench_boot;
mod bench_cluster;
mod bench_idle;
mod bench_ssi;
mod child_run;
mod dsm_cmd;
mod local;
mod metrics;
mod ops;
use vmm::boot::bzimage::UnpackBzImage;
use vmm::compat::HostKind;
use vmm::devices::ConsoleOut;
use vmm::memory::parse_size;
use vmm::term::{eprint_line, RawTerminal};
use vmm::{GuestEnd, VmConfig};

/// The guest kernel `make guest` builds.
const DEFAULT_KERNEL: &str = "guest/out/vmlinux";
/// The busybox initramfs `make guest` builds (its /init opens a shell on the console).
const DEFAULT_INITRD: &str = "guest/out/initramfs.cpio.gz";

#[derive(Parser)]
#[command(
    name = "dvmm",
    version,
    about = "A distributed virtual machine monitor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest on a local cluster started by this command.
    Run(RunArgs),
    /// Run one node of a cluster described in a TOML file.
    Node(NodeArgs),
    /// Print the counters of a running cluster's nodes (once, or every second).
    Stats(ops::StatsArgs),
    /// Ask a running cluster's guest to power off, and wait until the cluster is gone.
    Stop(ops::StopArgs),
    /// Benchmarks that print numbers (and a floor measured in the same run).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// One DSM test/bench node process (spawned by `dvmm bench dsm` and the tests).
    #[command(hide = true)]
    DsmNode(dsm_cmd::DsmNodeArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Guest boot: time to `smp: Brought up` and to power-off.
    Boot(bench_boot::BenchBootArgs),
    /// The distributed shared memory: fault latencies, invalidations, throughput.
    Dsm(dsm_cmd::BenchDsmArgs),
    /// The guest on several cluster shapes: boot time, locktorture ops/s, DSM counters.
    Cluster(bench_cluster::BenchClusterArgs),
    /// A parallel user-space workload on 1 node x N vCPUs and N nodes x 1 vCPU: the
    /// ratio is the SSI efficiency.
    Ssi(bench_ssi::BenchSsiArgs),
    /// The DSM traffic of an idle 2-node guest (and of one CPU busy in user mode), with
    /// and without the NUMA topology, read live from the nodes.
    Idle(bench_idle::BenchIdleArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Number of node processes.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Number of vCPUs of the guest, spread over the nodes [default: one per node].
    #[arg(long)]
    vcpus: Option<usize>,
    /// Guest memory, e.g. 512M or 1G.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    memory: u64,
    /// Kernel image (ELF vmlinux or bzImage).
    #[arg(long, default_value = DEFAULT_KERNEL)]
    kernel: PathBuf,
    /// Who unpacks a bzImage kernel: `auto` (the VMM on a software-KVM host, where the
    /// kernel's own decompressor takes minutes; the decompressor on a hardware host),
    /// `always` (the VMM) or `never` (the kernel's decompressor).
    #[arg(long, default_value = "auto", value_name = "WHEN",
          value_parser = clap::builder::PossibleValuesParser::new(UnpackBzImage::NAMES)
              .try_map(|s| s.parse::<UnpackBzImage>()))]
    unpack_bzimage: UnpackBzImage,
    /// Initial ramdisk (cpio, gzip-compressed or not), or `none`.
    #[arg(long, default_value = DEFAULT_INITRD)]
    initrd: PathBuf,
    /// Appended to the kernel command line the VMM needs (console, reboot policy, host quirks).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Stop the guest with an error after this many seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Put every node in its own network namespace, joined by veth pairs on a bridge.
    #[arg(long)]
    netns: bool,
    /// With several nodes: how long (µs) a node keeps a guest page it just received
    /// before the DSM may take it away again [default: 50].
    #[arg(long)]
    dsm_hold_us: Option<u64>,
    /// Give the guest no ACPI tables (only the MP table; power-off is then seen on the
    /// console). See docs/ACPI.md.
    #[arg(long)]
    no_acpi: bool,
    /// With several nodes: show the guest one flat machine instead of one NUMA node per
    /// node process. See docs/ACPI.md.
    #[arg(long)]
    no_numa: bool,
    /// A virtio block device backed by this image file (raw; e.g. ext4). See docs/DISK.md.
    #[arg(long, value_name = "PATH", conflicts_with = "no_acpi")]
    disk: Option<PathBuf>,
    /// The guest may only read the disk.
    #[arg(long, requires = "disk")]
    disk_readonly: bool,
    /// On SIGTERM, SIGINT or `dvmm stop`: how long the guest has to power off after its
    /// power button is pressed, in seconds. See docs/OPERATIONS.md.
    #[arg(long, default_value_t = DEFAULT_STOP_TIMEOUT_S, value_name = "SECS")]
    stop_timeout: u64,
    /// Serve the nodes' counters in the Prometheus text format at this address
    /// (e.g. 127.0.0.1:9464; path /metrics). See docs/OPERATIONS.md.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// A virtio network device on a TAP interface the VMM creates (removed when it ends):
    /// the host at 172.30.213.1/24, the guest at 172.30.213.2 (as eth0).
    #[arg(long, conflicts_with = "no_acpi")]
    net: bool,
    /// With --net: the TAP's name [default: dvmm<pid>].
    #[arg(long, value_name = "NAME", requires = "net")]
    net_tap: Option<String>,
    /// With --net: the host's address and prefix length on the TAP [default:
    /// 172.30.213.1/24].
    #[arg(long, value_name = "ADDR/PREFIX", requires = "net",
          value_parser = vmm::devices::virtio::net::parse_host)]
    net_host: Option<(std::net::Ipv4Addr, u8)>,
    /// With --net: the guest's address, in the host's subnet [default: 172.30.213.2].
    #[arg(long, value_name = "ADDR", requires = "net",
          value_parser = vmm::devices::virtio::net::parse_guest)]
    net_guest: Option<std::net::Ipv4Addr>,
}

/// The network of `dvmm run --net`: the defaults of this process, with --net-tap,
/// --net-host and --net-guest instead; checked (and the TAP's name free, without
/// --netns: there node 0 makes it in its own namespace).
fn net_spec(args: &RunArgs) -> Result<Option<vmm::vm::NetSpec>, String> {
    if !args.net {
        return Ok(None);
    }
    let mut spec = vmm::vm::NetSpec::default_for(std::process::id());
    if let Some(tap) = &args.net_tap {
        spec.tap.clone_from(tap);
    }
    if let Some((addr, prefix_len)) = args.net_host {
        (spec.host_addr, spec.prefix_len) = (addr, prefix_len);
    }
    if let Some(addr) = args.net_guest {
        spec.guest_addr = addr;
    }
    spec.validate().map_err(|e| format!("--net: {e}"))?;
    if !args.netns && vmm::devices::virtio::tap::interface_exists(&spec.tap) {
        return Err(vmm::devices::virtio::TapError::Exists(spec.tap).to_string());
    }
    Ok(Some(spec))
}

/// The default of `--stop-timeout`.
const DEFAULT_STOP_TIMEOUT_S: u64 = cluster::node::DEFAULT_STOP_TIMEOUT.as_secs();

/// Set by SIGTERM / SIGINT in `dvmm node`: ask the guest to power off.
static NODE_STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_node_signal(_: libc::c_int) {
    NODE_STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// SIGTERM and SIGINT set [`NODE_STOP`] (a stop request) instead of killing the process.
fn catch_stop_signals() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_node_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGINT,
            on_node_signal as *const () as libc::sighandler_t,
        );
    }
}

#[derive(clap::Args)]
struct NodeArgs {
    /// The cluster description (TOML).
    #[arg(long)]
    config: PathBuf,
    /// This node's id (its index in the description; 0 is the boot and I/O node).
    #[arg(long)]
    id: u16,
    /// Stop the guest with an error after this many seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// An inherited, already bound listening socket for this node's address (set by
    /// `dvmm run`).
    #[arg(long, hide = true)]
    listen_fd: Option<i32>,
    /// On SIGTERM, SIGINT or `dvmm stop`: how long the guest has to power off after its
    /// power button is pressed, in seconds (node 0 decides).
    #[arg(long, default_value_t = DEFAULT_STOP_TIMEOUT_S, value_name = "SECS")]
    stop_timeout: u64,
    /// Serve this node's counters in the Prometheus text format at this address
    /// (path /metrics).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

fn node(args: NodeArgs) -> Result<(), String> {
    let cfg = cluster::ClusterConfig::load(&args.config).map_err(|e| e.to_string())?;
    let listener = args
        .listen_fd
        .map(|fd| local::inherited_listener(fd, &cfg, args.id))
        .transpose()?;
    // The metrics endpoint first: an address in use is refused before the node joins.
    let _metrics = args
        .metrics
        .map(|addr| {
            metrics::MetricsServer::start(
                addr,
                metrics::Source::Node {
                    cluster: cfg.name.clone(),
                    id: args.id,
                },
            )
        })
        .transpose()?;
    catch_stop_signals();
    // Node 0 has the console: raw keyboard input while it runs (restored on return).
    let _raw = (args.id == 0).then(|| RawTerminal::enter(0)).flatten();
    let report = cluster::run_node(
        &cfg,
        args.id,
        cluster::NodeOptions {
            timeout: (args.timeout > 0).then(|| std::time::Duration::from_secs(args.timeout)),
            listener,
            stop_signal: Some(&NODE_STOP),
            stop_timeout: Some(std::time::Duration::from_secs(args.stop_timeout)),
        },
    )
    .map_err(|e| e.to_string())?;
    let how = match report.end {
        GuestEnd::PowerOff => "powered off",
        GuestEnd::AcpiPowerOff => "powered off through ACPI",
        GuestEnd::Reboot => "asked for a reboot",
    };
    if args.id == 0 {
        eprint_line(&format!(
            "\ndvmm: guest {how} after {:.1} s",
            report.elapsed.as_secs_f64()
        ));
    }
    for line in &report.vcpu_stats {
        eprint_line(&format!("dvmm: node {} stats {line}", args.id));
    }
    eprint_line(&format!(
        "dvmm: node {} stats {}",
        args.id, report.link_stats
    ));
    eprint_line(&format!(
        "dvmm: node {} stats dsm {}",
        args.id, report.dsm_stats
    ));
    Ok(())
}

fn run(args: RunArgs) -> Result<(), String> {
    let vcpus = args.vcpus.unwrap_or(args.nodes.max(1));
    let disk = args.disk.clone().map(|path| vmm::vm::DiskSpec {
        path,
        read_only: args.disk_readonly,
    });
    let net = net_spec(&args)?;
    let initrd = (args.initrd.as_os_str() != "none").then_some(args.initrd);
    if let Some(i) = initrd.as_ref().filter(|i| !i.is_file()) {
        return Err(format!(
            "initrd {} not found (build it with `make guest`, or pass --initrd none)",
            i.display()
        ));
    }
    // The guest's console has the keyboard: raw input while the guest runs, restored
    // on every way out of this function (and before `exit`). Ctrl-A x stops the VM.
    let raw = RawTerminal::enter(0);
    if args.nodes != 1 || args.netns {
        let code = local::run(&local::LocalRun {
            nodes: args.nodes,
            vcpus,
            memory: args.memory,
            kernel: args.kernel,
            unpack_bzimage: args.unpack_bzimage,
            initrd,
            cmdline: args.cmdline,
            netns: args.netns,
            timeout: args.timeout,
            dsm_hold_us: args.dsm_hold_us,
            acpi: !args.no_acpi,
            numa: !args.no_numa && !args.no_acpi,
            disk: disk.clone(),
            stop_timeout: args.stop_timeout,
            metrics: args.metrics,
            net: net.clone(),
        })?;
        if code == 0 {
            return Ok(());
        }
        drop(raw);
        std::process::exit(code);
    }
    let _metrics = args
        .metrics
        .map(|addr| {
            metrics::MetricsServer::start(addr, metrics::Source::Cluster(local::local_name()))
        })
        .transpose()?;
    let (console, _watch) = ConsoleOut::new(Box::new(std::io::stdout()));
    let vm = vmm::Vm::create(VmConfig {
        vcpus,
        memory: args.memory,
        kernel: args.kernel,
        initrd,
        cmdline_extra: args.cmdline,
        console,
        host: HostKind::detect(),
        unpack_bzimage: args.unpack_bzimage,
        timeout: (args.timeout > 0).then(|| std::time::Duration::from_secs(args.timeout)),
        placement: None,
        guest_memory: None,
        acpi: !args.no_acpi,
        numa: Vec::new(),
        disk,
        net,
    })
    .map_err(|e| e.to_string())?;
    vmm::term::spawn_console_input(vm.handle()).map_err(|e| format!("console input: {e}"))?;
    // `dvmm stats`, `dvmm stop` and SIGTERM/SIGINT, as for a node of a cluster.
    let _control = ops::serve_single(
        &vm.handle(),
        std::time::Duration::from_secs(args.stop_timeout),
        &NODE_STOP,
    )?;
    catch_stop_signals();
    let report = vm.run().map_err(|e| e.to_string())?;
    drop(raw);
    let how = match report.end {
        GuestEnd::PowerOff => "powered off",
        GuestEnd::AcpiPowerOff => "powered off through ACPI",
        GuestEnd::Reboot => "asked for a reboot",
    };
    eprint_line(&format!(
        "\ndvmm: guest {how} after {:.1} s",
        report.elapsed.as_secs_f64()
    ));
    for line in &report.vcpu_stats {
        eprint_line(&format!("dvmm: stats {line}"));
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DVMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Run(a) => run(a),
        Command::Node(a) => node(a),
        Command::Stats(a) => ops::stats(a),
        Command::Stop(a) => ops::stop(a),
        Command::Bench(BenchCommand::Dsm(a)) => dsm_cmd::bench(a),
        Command::Bench(BenchCommand::Boot(a)) => bench_boot::bench(a),
        Command::Bench(BenchCommand::Cluster(a)) => bench_cluster::bench(a),
        Command::Bench(BenchCommand::Ssi(a)) => bench_ssi::bench(a),
        Command::Bench(BenchCommand::Idle(a)) => bench_idle::bench(a),
        Command::DsmNode(a) => dsm_cmd::node(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dvmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<RunArgs, String> {
        let argv = ["dvmm", "run"].iter().chain(extra);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Run(a) => Ok(a),
            _ => unreachable!("not a run"),
        }
    }

    #[test]
    fn net_options() {
        assert_eq!(net_spec(&run_args(&[]).unwrap()).unwrap(), None);
        // The defaults: the TAP named after this process.
        let spec = net_spec(&run_args(&["--net"]).unwrap()).unwrap().unwrap();
        assert_eq!(spec, vmm::vm::NetSpec::default_for(std::process::id()));
        let spec = net_spec(
            &run_args(&[
                "--net",
                "--net-tap",
                "dvmmtest0",
                "--net-host",
                "10.7.0.1/16",
                "--net-guest",
                "10.7.3.4",
            ])
            .unwrap(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                spec.tap.as_str(),
                spec.host_addr,
                spec.prefix_len,
                spec.guest_addr
            ),
            ("dvmmtest0", [10, 7, 0, 1].into(), 16, [10, 7, 3, 4].into())
        );
        assert_eq!(
            spec.kernel_ip_option(),
            "ip=10.7.3.4::10.7.0.1:255.255.0.0::eth0:off"
        );
        // Refused by the parser.
        for (argv, want) in [
            (
                &["--net", "--net-host", "10.0.0.1"][..],
                "'10.0.0.1' is not an IPv4 address with a prefix length (e.g. 172.30.213.1/24)",
            ),
            (
                &["--net", "--net-guest", "10.0.0.300"],
                "'10.0.0.300' is not an IPv4 address (e.g. 172.30.213.2)",
            ),
            (&["--net-tap", "x"], "--net"),
            (&["--net", "--no-acpi"], "cannot be used with"),
        ] {
            let e = run_args(argv).err().expect("refused");
            assert!(e.contains(want), "{argv:?}: {e}");
        }
        // Refused by the checks, in one line.
        for (argv, want) in [
            (
                &["--net", "--net-guest", "10.0.0.2"][..],
                "--net: the guest address 10.0.0.2 is not in the host's subnet 172.30.213.0/24",
            ),
            (
                &["--net", "--net-guest", "172.30.213.1"],
                "--net: the host and the guest have the same address 172.30.213.1",
            ),
            (
                &["--net", "--net-host", "172.30.213.1/31"],
                "--net: prefix length /31 is out of range: use 8 to 30",
            ),
            (
                &["--net", "--net-tap", "a-name-too-long-for-linux"],
                "--net: invalid TAP name \"a-name-too-long-for-linux\"",
            ),
            (
                &["--net", "--net-tap", "lo"],
                "network interface lo already exists: choose another TAP name",
            ),
        ] {
            let e = net_spec(&run_args(argv).unwrap()).unwrap_err();
            assert!(e.starts_with(want), "{argv:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}
