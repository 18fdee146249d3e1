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
}

/// The default of `--stop-timeout`.
const DEFAULT_STOP_TIMEOUT_S: u64 = cluster::node::DEFAULT_STOP_TIMEOUT.as_secs();

/// Set by SIGTERM / SIGINT in `dvmm node`: ask the guest to power off.
static NODE_STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_node_signal(_: libc::c_int) {
    NODE_STOP.store(true, std::sync::atomic::Ordering::SeqCst);
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
    })
    .map_err(|e| e.to_string())?;
    vmm::term::spawn_console_input(vm.handle()).map_err(|e| format!("console input: {e}"))?;
    // `dvmm stats`, `dvmm stop` and SIGTERM/SIGINT, as for a node of a cluster.
    let _control = ops::serve_single(
        &vm.handle(),
        std::time::Duration::from_secs(args.stop_timeout),
        &NODE_STOP,
    )?;
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
