//! The machine the guest sees and how it is operated: ACPI tables, one NUMA node per
//! node process, the virtio disk, the virtio network, `dvmm stats`, `--metrics`, and a
//! clean stop by SIGTERM (the ACPI power button, then power-off through ACPI). One
//! 2-node guest checks all of it (each guest boot costs minutes on a software-KVM host).

mod common;

use common::{dvmm, initramfs, kernel, lines, node_pids, tail_bytes as tail, text, workspace};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A copy of the disk image `make guest` builds, removed on drop.
struct ImageCopy(PathBuf);

impl ImageCopy {
    fn new(tag: &str) -> Self {
        let template = workspace().join("guest/out/disk.img");
        assert!(
            template.is_file(),
            "{} is missing: run `make guest`",
            template.display()
        );
        let p = std::env::temp_dir().join(format!("dvmm-{tag}-{}.img", std::process::id()));
        std::fs::copy(&template, &p).expect("copy the disk image");
        ImageCopy(p)
    }
}

impl Drop for ImageCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A file of an ext4 image, read on the host with debugfs.
fn file_in_image(img: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(img)
        .output()
        .expect("run debugfs");
    assert!(out.status.success(), "debugfs: {}", text(&out.stderr));
    out.stdout
}

/// The guest's script: the NUMA topology from sysfs, then the disk: mount it, read
/// what the host put there, write two files from a process pinned to vCPU 1 (node 1),
/// sync; then serve the disk over HTTP (busybox httpd) and say so. The shell comes
/// next; the test types into it, and stops the guest with SIGTERM.
const SCRIPT: &str = "cat+/sys/devices/system/node/online;\
echo+NUMA0+cpus=$(cat+/sys/devices/system/node/node0/cpulist);\
echo+NUMA1+cpus=$(cat+/sys/devices/system/node/node1/cpulist);\
grep+MemTotal+/sys/devices/system/node/node0/meminfo;\
grep+MemTotal+/sys/devices/system/node/node1/meminfo;\
mkdir+-p+/mnt;\
mount+-t+ext4+/dev/vda+/mnt;\
cat+/mnt/hello.txt;\
cd+/mnt+&&+sha256sum+-c+data.sha256;\
taskset+-c+1+grep+Cpus_allowed_list+/proc/self/status;\
taskset+-c+1+cp+/mnt/data.bin+/mnt/copy.bin;\
taskset+-c+1+cp+/sys/devices/system/node/node1/cpulist+/mnt/written-on-node1.txt;\
sync;\
ip+addr+show+eth0;\
httpd+-p+80+-h+/mnt;\
echo+DVMM-GUEST+ready";

/// Commands of the script that must exit 0.
const SCRIPT_COMMANDS: usize = 16;

/// The guest's and the host's ends of the network `--net` makes (its defaults).
const GUEST_IP: &str = "172.30.213.2";
const HOST_IP: &str = "172.30.213.1";

/// The kB after `Node N MemTotal:` in the console.
fn node_memtotal(console: &str, node: usize) -> u64 {
    let key = format!("Node {node} MemTotal:");
    console
        .lines()
        .find_map(|l| l.split(&key).nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no '{key}' line:\n{}", tail(console, 3000)))
}

/// A port nobody listens on now.
fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` from `addr` over HTTP/1.0; returns the body of a 200 answer.
fn http_get(addr: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut r = Vec::new();
    c.read_to_end(&mut r)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let split = r
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header from {addr}"))?;
    let head = String::from_utf8_lossy(&r[..split]).into_owned();
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        return Err(format!("{addr}{path}: {head}"));
    }
    Ok(r[split + 4..].to_vec())
}

/// Serves `body` at any path, once per connection, on `listener` until the test ends.
fn serve(listener: TcpListener, body: Vec<u8>) {
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { break };
            let mut req = [0u8; 1024];
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = c.read(&mut req);
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = c.write_all(&body);
        }
    });
}

/// The sum of the samples of `metric` for node `node` in a scrape.
fn metric_sum(scrape: &str, metric: &str, node: u16) -> f64 {
    let label = format!("node=\"{node}\"");
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (bounded) for the console line that holds `needle`; returns it.
fn line_with(
    rx: &mpsc::Receiver<String>,
    console: &mut String,
    needle: &str,
    limit: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            console.push_str(&l);
            console.push('\n');
            if l.contains(needle) {
                return Ok(l);
            }
        }
    }
    Err(format!("'{needle}' not seen:\n{}", tail(console, 3000)))
}

#[test]
fn numa_disk_network_stats_metrics_and_sigterm_on_2_nodes() {
    let img = ImageCopy::new("machine");
    let k = kernel();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let stop_timeout = 120;
    let mut run = Command::new(env!("CARGO_BIN_EXE_dvmm"))
        .current_dir(workspace())
        .args(["run", "--nodes", "2", "--vcpus", "2", "--memory", "512M"])
        .arg("--kernel")
        .arg(&k)
        .args(["--initrd", &initramfs()])
        .arg("--disk")
        .arg(&img.0)
        .args(["--net", "--metrics", &metrics.to_string()])
        .args([
            "--stop-timeout",
            &stop_timeout.to_string(),
            "--timeout",
            "1200",
        ])
        .args(["--cmdline", &format!("dvmm.script={SCRIPT}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dvmm run");
    let pid = run.id();
    let cluster = format!("run-{pid}");
    let mut stdin = run.stdin.take().unwrap();
    let rx = lines(&mut run);
    let mut stderr = run.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut e = String::new();
        let _ = stderr.read_to_string(&mut e);
        e
    });
    let mut console = String::new();
    let fail = |run: &mut std::process::Child, why: String| -> ! {
        let _ = run.kill();
        let _ = run.wait();
        panic!("{why}");
    };
    if let Err(e) = line_with(
        &rx,
        &mut console,
        "DVMM-GUEST ready",
        Duration::from_secs(900),
    ) {
        fail(&mut run, e);
    }

    // The network: the host reaches the guest (ping, HTTP from busybox httpd, byte for
    // byte), and the guest reaches the host (a command typed on its console; the
    // echo of the typed line must not match the answer's marker, hence GO''T).
    // busybox's ping: the project installs busybox-static (iputils may be missing).
    let ping = Command::new("busybox")
        .args(["ping", "-c", "3", "-W", "10", GUEST_IP])
        .output()
        .expect("run ping");
    if !ping.status.success() {
        fail(
            &mut run,
            format!(
                "ping {GUEST_IP}: {}{}",
                text(&ping.stdout),
                text(&ping.stderr)
            ),
        );
    }
    let data = file_in_image(&img.0, "/data.bin");
    let guest_http: SocketAddr = format!("{GUEST_IP}:80").parse().unwrap();
    match http_get(guest_http, "/data.bin") {
        Ok(body) if body == data => {}
        Ok(body) => fail(
            &mut run,
            format!(
                "data.bin over HTTP: {} bytes, not the image's {}",
                body.len(),
                data.len()
            ),
        ),
        Err(e) => fail(&mut run, e),
    }
    let payload: Vec<u8> = (0..(256u32 << 10))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let host_listener =
        TcpListener::bind((HOST_IP, 0)).expect("listen on the host's end of the guest network");
    let host_port = host_listener.local_addr().unwrap().port();
    serve(host_listener, payload.clone());
    let _ = line_with(
        &rx,
        &mut console,
        "DVMM-GUEST shell",
        Duration::from_secs(30),
    );
    let cmd = format!(
        "wget -q -O /tmp/h.bin http://{HOST_IP}:{host_port}/h.bin && echo GUEST-GO''T $(wc -c < /tmp/h.bin) $(sha256sum /tmp/h.bin)\n"
    );
    stdin.write_all(cmd.as_bytes()).unwrap();
    let got = match line_with(&rx, &mut console, "GUEST-GOT ", Duration::from_secs(300)) {
        Ok(l) => l,
        Err(e) => fail(&mut run, e),
    };
    let want_sha = {
        let mut h = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        h.stdin.take().unwrap().write_all(&payload).unwrap();
        text(&h.wait_with_output().unwrap().stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    if !got.contains(&format!("GUEST-GOT {} {want_sha}", payload.len())) {
        fail(
            &mut run,
            format!(
                "the guest's copy of the host's file differs: {got} (want {} {want_sha})",
                payload.len()
            ),
        );
    }

    // Live statistics of both nodes, from their control sockets.
    let stats = dvmm(&["stats", "--cluster", &cluster, "--json"]);
    if !stats.status.success() {
        fail(&mut run, format!("dvmm stats: {}", text(&stats.stderr)));
    }
    let snaps: Vec<serde_json::Value> = text(&stats.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON snapshot per line"))
        .collect();
    assert_eq!(snaps.len(), 2, "{}", text(&stats.stdout));
    for (i, s) in snaps.iter().enumerate() {
        assert_eq!(s["node"], i, "{s}");
        assert_eq!(s["phase"], "running", "{s}");
        let dsm = &s["dsm"];
        for c in [
            "read_faults",
            "messages_sent",
            "messages_received",
            "pages_received",
        ] {
            assert!(
                dsm[c].as_u64().unwrap_or(0) > 0,
                "node {i}: {c} is 0: {dsm}"
            );
        }
        assert_eq!(s["vcpus"].as_array().map(Vec::len), Some(1), "{s}");
        let v = &s["vcpus"][0];
        let state = v["state"].as_str().unwrap_or("");
        assert!(
            ["guest", "page", "halted", "device", "vmm"].contains(&state),
            "node {i}: vCPU state {state}"
        );
        assert_ne!(v["tid"], 0, "node {i}: {v}");
        let guest_us = v["state_us"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p[0] == "guest"))
            .and_then(|p| p[1].as_u64())
            .unwrap_or(0);
        assert!(guest_us > 1_000_000, "node {i}: {v}");
    }
    // The table names the hot pages (System.map next to the kernel).
    let table = dvmm(&["stats", "--cluster", &cluster]);
    let table_text = text(&table.stdout);
    assert!(table.status.success(), "{}", text(&table.stderr));
    assert!(
        table_text.contains("per-CPU") || table_text.contains("kernel: "),
        "{table_text}"
    );

    // Metrics: two scrapes, counters grow on both nodes.
    let first = String::from_utf8(http_get(metrics, "/metrics").unwrap()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let second = String::from_utf8(http_get(metrics, "/metrics").unwrap()).unwrap();
    for node in 0..2 {
        let (a, b) = (
            metric_sum(&first, "dvmm_dsm_messages_total", node),
            metric_sum(&second, "dvmm_dsm_messages_total", node),
        );
        assert!(
            a > 0.0 && b > a,
            "node {node}: dvmm_dsm_messages_total {a} then {b}"
        );
        assert!(metric_sum(&second, "dvmm_vcpu_exits_total", node) > 0.0);
    }
    assert!(
        second.contains(&format!(
            "dvmm_node_up{{cluster=\"{cluster}\",node=\"1\"}} 1"
        )),
        "{second}"
    );

    // SIGTERM: the power button, the guest's clean power-off through ACPI, exit 0.
    let asked = Instant::now();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(st) = run.try_wait().unwrap() {
            break st;
        }
        if asked.elapsed() > Duration::from_secs(stop_timeout + 30) {
            fail(
                &mut run,
                format!("dvmm run still runs {} s after SIGTERM", stop_timeout + 30),
            );
        }
        while let Ok(l) = rx.try_recv() {
            console.push_str(&l);
            console.push('\n');
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = asked.elapsed();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        console.push_str(&l);
        console.push('\n');
    }
    let err = err_thread.join().unwrap();
    let t = tail(&console, 4000);
    assert!(
        status.success(),
        "dvmm run after SIGTERM: {status}\n{err}\n{t}"
    );
    assert!(
        console.contains("DVMM-GUEST power button: powering off"),
        "{t}"
    );
    assert!(
        err.contains("guest powered off through ACPI"),
        "not an ACPI power-off:\n{err}"
    );
    eprintln!("SIGTERM to exit: {:.1} s", took.as_secs_f64());
    // Nothing left behind: node processes, control sockets, the TAP device.
    assert!(
        node_pids(&format!("dvmm-run-{pid}")).is_empty(),
        "node processes left behind"
    );
    assert!(
        !cluster::control::cluster_dir(&cluster).exists(),
        "control sockets left behind"
    );
    assert!(
        !Path::new(&format!("/sys/class/net/dvmm{pid}")).exists(),
        "TAP device left behind"
    );

    // The kernel read the SRAT: each vCPU and each memory share in its node.
    for needle in [
        "SRAT: PXM 0 -> APIC 0x00 -> Node 0",
        "SRAT: PXM 1 -> APIC 0x01 -> Node 1",
        "ACPI: SRAT: Node 0 PXM 0 [mem 0x00000000-0x0fffffff]",
        "ACPI: SRAT: Node 1 PXM 1 [mem 0x10000000-0x1fffffff]",
        "Initmem setup node 1 [mem 0x0000000010000000-0x000000001fffffff]",
    ] {
        assert!(
            console.contains(needle),
            "no '{needle}' in the kernel log:\n{t}"
        );
    }
    // And the running guest sees two nodes with their CPU and memory.
    assert!(console.contains("\n0-1"), "nodes online:\n{t}");
    assert!(console.contains("NUMA0 cpus=0"), "{t}");
    assert!(console.contains("NUMA1 cpus=1"), "{t}");
    for node in 0..2 {
        let kb = node_memtotal(&console, node);
        assert!(
            (150_000..=262_144).contains(&kb),
            "node {node} has {kb} kB of its 256 MiB share:\n{t}"
        );
    }
    // The disk: the host's files read back, the writer ran on vCPU 1.
    assert!(console.contains("hello from the host's disk image"), "{t}");
    assert!(console.contains("data.bin: OK"), "{t}");
    assert!(console.contains("Cpus_allowed_list:\t1"), "{t}");
    assert!(console.contains(&format!("inet {GUEST_IP}/24")), "{t}");
    assert_eq!(
        console.matches("DVMM-GUEST exit=0").count(),
        SCRIPT_COMMANDS,
        "a command failed:\n{t}"
    );
    assert!(!console.contains("I/O error"), "{t}");

    // The host sees what the guest wrote, and the file system is clean (unmounted by
    // the power button's clean power-off).
    assert!(
        file_in_image(&img.0, "/copy.bin") == data,
        "copy.bin differs from data.bin"
    );
    assert_eq!(file_in_image(&img.0, "/written-on-node1.txt"), b"1\n");
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&img.0)
        .output()
        .expect("run e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck -fn: {}{}",
        text(&fsck.stdout),
        text(&fsck.stderr)
    );
}

/// Bad input to the operations commands: one line each, nothing started or left.
#[test]
fn operations_refuse_bad_input_in_one_line() {
    let empty = std::env::temp_dir().join(format!("dvmm-no-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    for args in [&["stats"][..], &["stop"], &["stats", "--cluster", "nosuch"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_dvmm"))
            .args(args)
            .env("DVMM_RUN_DIR", &empty)
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains("no cluster is running")
                || err.contains("no running cluster named 'nosuch'"),
            "{err}"
        );
    }
    // A metrics address in use: refused before any node starts.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_dvmm"))
        .current_dir(workspace())
        .args(["run", "--nodes", "2", "--metrics", &addr])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("--metrics {addr}: cannot listen")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // A TAP name that exists: refused, and the interface is not touched.
    let tap = format!("dvmmx{}", std::process::id() % 100_000);
    let made = Command::new("ip")
        .args(["tuntap", "add", "dev", &tap, "mode", "tap"])
        .status()
        .unwrap();
    assert!(made.success(), "ip tuntap add {tap}");
    let out = Command::new(env!("CARGO_BIN_EXE_dvmm"))
        .current_dir(workspace())
        .args(["run", "--nodes", "2", "--net", "--net-tap", &tap])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let still_there = Path::new(&format!("/sys/class/net/{tap}")).exists();
    let _ = Command::new("ip")
        .args(["tuntap", "del", "dev", &tap, "mode", "tap"])
        .status();
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("network interface {tap} already exists")),
        "{err}"
    );
    assert!(still_there, "the existing TAP was removed");
    std::fs::remove_dir_all(&empty).unwrap();
}
