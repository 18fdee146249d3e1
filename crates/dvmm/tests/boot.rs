//! Real guest boots under KVM: the guest kernel from `make guest`, the `dvmm` binary.

mod common;

use common::{dvmm, idle_initrd, kernel, tail_bytes as tail, text, torture};

#[test]
fn two_vcpus_boot_run_locktorture_and_power_off() {
    let k = kernel();
    let out = dvmm(&[
        "run",
        "--nodes",
        "1",
        "--vcpus",
        "2",
        "--memory",
        "512M",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        &idle_initrd(),
        "--cmdline",
        // acpi=off: the MP table describes the machine, and the VMM sees the power-off
        // only on the console (its fallback for guests without ACPI).
        &format!("acpi=off {}", torture("spin_lock", 2, 10)),
        "--timeout",
        "240",
    ]);
    let console = text(&out.stdout);
    let err = text(&out.stderr);
    assert!(
        out.status.success(),
        "dvmm run failed: {err}\n--- console tail ---\n{}",
        tail(&console, 3000)
    );
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "{console}"
    );
    assert!(console.contains("End of test: SUCCESS"), "{console}");
    assert!(!console.contains("Fail: 1"), "{console}");
    assert!(console.contains("reboot: Power down"), "{console}");
    // Whether the kernel reaches /init before locktorture ends depends on the host's
    // speed; either way the idle init keeps it from panicking.
    assert!(!console.contains("No working init found"), "{console}");
    assert!(console.contains("ACPI: Interpreter disabled"), "{console}");
    assert!(err.contains("guest powered off after"), "{err}");
    assert!(!err.contains("powered off through ACPI"), "{err}");
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let k = kernel();
    let k = k.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--kernel", "/nonexistent/vmlinux"], "not found"),
        (
            vec!["run", "--kernel", "/etc/hostname"],
            "is not a Linux kernel",
        ),
        (vec!["run", "--kernel", k, "--memory", "1M"], "memory size"),
        (
            vec!["run", "--kernel", k, "--memory", "3000G"],
            "memory size",
        ),
        (
            vec!["run", "--kernel", k, "--vcpus", "0"],
            "vCPUs is not possible",
        ),
        (
            vec!["run", "--kernel", k, "--vcpus", "1000"],
            "vCPUs is not possible",
        ),
        (
            vec!["run", "--kernel", k, "--memory", "lots"],
            "invalid size",
        ),
        (
            vec!["run", "--kernel", k, "--disk", "/nonexistent/disk.img"],
            "/nonexistent/disk.img",
        ),
        (vec!["run", "--kernel", k, "--disk", "/etc"], "/etc"),
        (
            vec![
                "run",
                "--kernel",
                k,
                "--nodes",
                "2",
                "--disk",
                "/nonexistent/disk.img",
            ],
            "/nonexistent/disk.img",
        ),
    ];
    for (args, want) in cases {
        let out = dvmm(&args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            lines.len() == 1 || err.contains("For more information"),
            "{args:?}: not one line: {err}"
        );
    }
}
