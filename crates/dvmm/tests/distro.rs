//! A distribution's stock kernel (Debian's `linux-image-amd64`) on 2 nodes, as shipped
//! (bzImage, unpacked by the VMM on a software-KVM host) and as the vmlinux extracted
//! from it, with the project's initramfs. Slow (minutes per boot under instruction
//! emulation), so kept out of `make test`: `make test-distro` fetches the kernel and
//! runs these (docs/COMPAT.md).

mod common;

use std::path::PathBuf;

use common::{dvmm, initramfs, tail_bytes as tail, text, workspace};

/// A file of the kernel `make distro-kernel` fetched.
fn distro(name: &str) -> PathBuf {
    let p = workspace().join("guest/distro").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `make distro-kernel` (make test-distro does)",
        p.display()
    );
    p
}

/// Boots `kernel` on 2 nodes x 1 vCPU to user space and a power-off.
fn boots_to_user_space_on_two_nodes(kernel: &str) {
    let k = distro(kernel);
    let out = dvmm(&[
        "run",
        "--nodes",
        "2",
        "--memory",
        "512M",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        &initramfs(),
        "--cmdline",
        "dvmm.script=avxtest+procs+1000;poweroff+-f",
        "--timeout",
        "1500",
    ]);
    let console = text(&out.stdout);
    let err = text(&out.stderr);
    assert!(
        out.status.success(),
        "dvmm run failed: {err}\n--- console tail ---\n{}",
        tail(&console, 3000)
    );
    let version =
        std::fs::read_to_string(workspace().join("guest/distro/VERSION")).unwrap_or_default();
    assert!(
        console.contains("Linux version 6.") && console.contains("Debian"),
        "not the Debian kernel ({version}): {}",
        tail(&console, 3000)
    );
    assert!(
        console.contains("smp: Brought up 2 nodes, 2 CPUs"),
        "{}",
        tail(&console, 3000)
    );
    assert!(
        console.contains("DVMM-GUEST nproc=2"),
        "{}",
        tail(&console, 3000)
    );
    assert!(
        !console.contains("Oops")
            && !console.contains("BUG:")
            && !console.contains("WARNING: CPU:"),
        "{console}"
    );
    common::hidden_features_cleared(&console);
    // Its processes keep their own vector registers (the XSAVE emulation).
    let avx = console
        .lines()
        .find(|l| l.starts_with("AVXTEST mode=procs "))
        .unwrap_or("(no avxtest line)");
    assert!(
        avx.contains(" corrupt=0 ") && avx.ends_with(" ok"),
        "{avx}\n{}",
        tail(&console, 3000)
    );
    assert!(err.contains("guest powered off"), "{err}");
}

#[test]
#[ignore = "minutes per boot: `make test-distro`"]
fn debian_stock_bzimage_boots_on_two_nodes() {
    boots_to_user_space_on_two_nodes("vmlinuz");
}

#[test]
#[ignore = "minutes per boot: `make test-distro`"]
fn debian_stock_vmlinux_boots_on_two_nodes() {
    boots_to_user_space_on_two_nodes("vmlinux");
}
