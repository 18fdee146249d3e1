//! The machine the guest sees: ACPI tables, one NUMA node per node process, the virtio
//! disk, power-off through ACPI. One 2-node guest checks all of it.

mod common;

use common::{dvmm, initramfs, kernel, tail_bytes as tail, text, workspace};
use std::path::{Path, PathBuf};
use std::process::Command;

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
/// sync, unmount, power off (through ACPI).
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
umount+/mnt;\
poweroff+-f";

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

#[test]
fn numa_nodes_disk_and_acpi_power_off_on_2_nodes() {
    let img = ImageCopy::new("machine");
    let k = kernel();
    let out = dvmm(&[
        "run",
        "--nodes",
        "2",
        "--vcpus",
        "2",
        "--memory",
        "512M",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        &initramfs(),
        "--disk",
        img.0.to_str().unwrap(),
        "--cmdline",
        &format!("dvmm.script={SCRIPT}"),
        "--timeout",
        "900",
    ]);
    let console = text(&out.stdout);
    let err = text(&out.stderr);
    let t = tail(&console, 4000);
    assert!(out.status.success(), "dvmm run failed:\n{err}\n{t}");

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
    assert_eq!(
        console.matches("DVMM-GUEST exit=0").count(),
        14,
        "a command failed:\n{t}"
    );
    assert!(!console.contains("I/O error"), "{t}");
    assert!(
        err.contains("guest powered off through ACPI"),
        "not an ACPI power-off:\n{err}"
    );

    // The host sees what the guest wrote, and the file system is clean.
    let data = file_in_image(&img.0, "/data.bin");
    assert_eq!(data.len(), 1 << 20);
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
